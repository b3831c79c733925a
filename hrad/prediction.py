"""What a prediction is and the thresholds that decide it (no torch: exported models use it too).

:class:`Prediction` is what :meth:`hrad.model.AnomalyModel.predict` and the exported models'
predictors (:mod:`hrad.export_runtime`) return, :class:`Predictor` what both of them are to the
commands that run them; :class:`Thresholds` are the model's, learned from held-out normal images,
stored in the artifact and in an export's sidecar.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from hrad.errors import ArtifactError, ConfigError, InputError, tell_request, warn

if TYPE_CHECKING:
    from hrad.postprocess.roi import RegionOfInterest


@dataclass
class Prediction:
    """Full-resolution map, image score and the decisions from the validation thresholds."""

    anomaly_map: np.ndarray
    score: float
    image_threshold: float | None
    pixel_threshold: float | None
    #: bool ``H x W`` at the map's size, True where the model's region of interest inspects
    #: (:mod:`hrad.postprocess.roi`); None: the whole image. Pictures of the prediction show it
    inspected: np.ndarray | None = None

    @property
    def is_anomalous(self) -> bool | None:
        return None if self.image_threshold is None else self.score > self.image_threshold

    @property
    def mask(self) -> np.ndarray | None:
        return None if self.pixel_threshold is None else self.anomaly_map > self.pixel_threshold


class Predictor(Protocol):
    """What ``hrad predict``, ``hrad evaluate`` and ``hrad serve`` use of a saved model, whichever
    form it was saved in: a fitted :class:`~hrad.model.AnomalyModel` and an export's predictor
    (:class:`hrad.export_runtime.ExportedPredictor`) both satisfy it, so one code drives both and
    an export is measured on the same images as the model it came from. Their ``predict_batch``
    loops differ (the model shares backbone batches across images, an export runs one image at a
    time); this is the signature they keep alike."""

    @property
    def thresholds(self) -> Thresholds | None: ...

    @property
    def bit_depth(self) -> int | None: ...

    @property
    def roi(self) -> RegionOfInterest | None: ...

    def decision_thresholds(
        self, threshold: float | None = None, pixel_threshold: float | None = None, sigmas: float | None = None
    ) -> tuple[float | None, float | None]: ...

    def predict(
        self,
        image: np.ndarray | str | Path,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        sigmas: float | None = None,
        name: str | None = None,
    ) -> Prediction: ...

    def predict_batch(
        self,
        images: Sequence[np.ndarray | str | Path],
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        sigmas: float | None = None,
        names: Sequence[str] | None = None,
    ) -> list[Prediction]: ...


@dataclass
class Thresholds:
    """Mean + k std of held-out normal image scores and pixel values.

    ``pixel_mean`` / ``pixel_std`` (the held-out normal pixels' statistics) and ``sigmas`` (the
    k used) let :meth:`at_sigmas` move both thresholds to another k without refitting; artifacts
    written before they were stored lack them (None).
    """

    image: float
    pixel: float
    image_scores: list[float]
    pixel_mean: float | None = None
    pixel_std: float | None = None
    sigmas: float | None = None
    #: the held-out normal maps' excess at each distance from the image border, divided out of
    #: every map (:mod:`hrad.postprocess.border`); None: no excess, or an artifact from before it
    border_ratios: list[float] | None = None
    #: True when they come from new good images given to :meth:`AnomalyModel.calibrate` (``hrad
    #: calibrate``) after the fit, not from the fit's own held-out images
    calibrated: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "pixel": self.pixel,
            "validation_image_scores": self.image_scores,
            "pixel_mean": self.pixel_mean,
            "pixel_std": self.pixel_std,
            "sigmas": self.sigmas,
            "border_ratios": self.border_ratios,
            "calibrated": self.calibrated,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Thresholds:
        return cls(
            image=data["image"],
            pixel=data["pixel"],
            image_scores=list(data.get("validation_image_scores", [])),
            pixel_mean=data.get("pixel_mean"),
            pixel_std=data.get("pixel_std"),
            sigmas=data.get("sigmas"),
            border_ratios=checked_border_ratios(data.get("border_ratios")),
            calibrated=bool(data.get("calibrated", False)),
        )

    def at_sigmas(self, sigmas: float) -> tuple[float, float]:
        """``(image, pixel)`` thresholds at mean + ``sigmas`` x std of the same held-out normals."""
        if not self.image_scores or self.pixel_mean is None or self.pixel_std is None:
            raise ConfigError(
                "this model does not store its held-out normal statistics (fitted by an older hrad): "
                "refit it to change sigmas, or give the thresholds themselves"
            )
        scores = np.asarray(self.image_scores, dtype=np.float64)
        return float(scores.mean() + sigmas * scores.std()), float(self.pixel_mean + sigmas * self.pixel_std)


def checked_border_ratios(values: Any) -> list[float] | None:
    """A stored border profile, refused (one-line :class:`~hrad.errors.ArtifactError`) unless it is
    a list of finite numbers >= 1: anything else would scale maps the wrong way, or to NaN."""
    if not values:
        return None
    try:
        ratios = [float(value) for value in values]
    except (TypeError, ValueError):
        ratios = []
    if not ratios or not all(math.isfinite(r) and r >= 1.0 for r in ratios):
        raise ArtifactError("thresholds.border_ratios must be a list of finite numbers >= 1; the artifact is corrupt")
    return ratios


#: An image whose short side is under this fraction of the fitted images' short side is refused:
#: its features would come from a scale the model never saw (a 1x1 image vs a 2048x2048 fit).
MIN_SIDE_FRACTION = 1 / 8


def check_image_size(image: np.ndarray, fitted_size: tuple[int, int] | None, name: str, set_by: str | None = None) -> None:
    """Refuse (one-line :class:`InputError` naming ``name``) an image far smaller than the fitted
    ones; ``set_by``: the training image that set the fitted size (a fit checking its own images)."""
    if fitted_size is None:
        return
    height, width = image.shape[:2]
    fitted_height, fitted_width = fitted_size
    if min(height, width) < MIN_SIDE_FRACTION * min(fitted_height, fitted_width):
        source = f" (set by {set_by}, the first training image)" if set_by is not None else ""
        raise InputError(
            f"{name}: image is {width}x{height}, its short side is under 1/{round(1 / MIN_SIDE_FRACTION)} of "
            f"the {fitted_width}x{fitted_height} images the model was fitted on{source}; resize it to that scale"
        )


def check_ensemble_size(image: np.ndarray, fitted_size: tuple[int, int], set_by: str | None = None) -> None:
    """Refuse an image of another size than a tiled ensemble without ``image_size`` was fitted on
    (its tile models are bound to tile positions); one wording for its fit (``set_by``: the first
    training image, whose size the others must have), the model and its export."""
    height, width = image.shape[:2]
    if (height, width) != tuple(fitted_size):
        fitted_height, fitted_width = fitted_size
        source = f" (set by {set_by})" if set_by is not None else ""
        raise InputError(
            f"image {width}x{height} differs from the fitted size {fitted_width}x{fitted_height}{source}: a tiled "
            "ensemble has one model per tile position (fit with image_size set to resize every input)"
        )


def check_pool_size(image: np.ndarray, fitted_size: tuple[int, int], assignment: str, what: str = "image") -> None:
    """Refuse an image of another size than a HiAD model whose pool is bound to patch positions
    was fitted on; one wording for the strategy and its export."""
    height, width = image.shape[:2]
    if (height, width) != tuple(fitted_size):
        fitted_height, fitted_width = fitted_size
        raise InputError(
            f"hiad: {what} is {width}x{height} but the model was fitted on {fitted_width}x{fitted_height} images; "
            f"{assignment} binds detectors to patch positions (use a2o or ra for mixed sizes)"
        )


def scaled_apart(scale: tuple[float, float], reference: tuple[float, float]) -> bool:
    """Whether two images' (rows, columns) scale factors differ by more than 2% (working-size
    rounding stays below it)."""
    return any(abs(math.log(factor / other)) > math.log(1.02) for factor, other in zip(scale, reference, strict=True))


def scale_factor(scale: tuple[float, float]) -> str:
    """``x0.5`` or, when the two axes differ (a stretch), ``x0.5 across, x0.67 down``."""
    rows, columns = scale
    return f"x{columns:.2g}" if not scaled_apart((rows, rows), (columns, columns)) else f"x{columns:.2g} across, x{rows:.2g} down"


def scale_problem(
    name: str,
    size: tuple[int, int],
    fitted_size: tuple[int, int],
    input_scale: Callable[[int, int], tuple[float, float]],
    resizing: str,
    use: str = "predict",
    once: bool = True,
) -> str | None:
    """The warning, or None, for an image of ``size`` (H, W) that the model scales unlike its
    ``fitted_size`` training images (``input_scale(height, width)``: the (rows, columns) factors,
    :meth:`hrad.strategies.base.Strategy.input_scale`; ``resizing`` says what scales them:
    :meth:`hrad.strategies.base.Strategy.resizing`): its defects reach the detector at another
    apparent size. One wording for the model and its export.
    ``use``: ``predict`` (an image predicted) or ``calibrate`` (a good image thresholds are learned
    from); ``once``: the line says it is told for the first such image only."""
    scale, fitted_scale = input_scale(*size), input_scale(*fitted_size)
    if not scaled_apart(scale, fitted_scale):
        return None
    (height, width), (fitted_height, fitted_width) = size, fitted_size
    effect = {
        "predict": "its scores may not compare with the thresholds; predict images",
        "calibrate": "thresholds learned from its scores may not fit the training-size images; calibrate on images",
    }[use]
    return (
        f"{name}: a {width}x{height} image, the model was fitted on {fitted_width}x{fitted_height} ones: "
        f"{resizing}, this one by {scale_factor(scale)}, the training images by {scale_factor(fitted_scale)}: its "
        f"defects reach the detector at another apparent size than the training parts did, and {effect} of the "
        f"training size (crop or resize them alike){'. Said once, for the first such image' if once else ''}"
    )


def tell_scale(
    told: bool,
    name: str,
    size: tuple[int, int],
    fitted_size: tuple[int, int],
    input_scale: Callable[[int, int], tuple[float, float]],
    resizing: str,
    stacklevel: int = 1,
) -> bool:
    """Tell of an image predicted that is scaled unlike the training images (the arguments as
    for :func:`scale_problem`): :func:`tell_once`. Returns whether the model has told it now.
    ``stacklevel`` counts from the caller."""
    return tell_once(told, partial(scale_problem, name, size, fitted_size, input_scale, resizing), stacklevel + 1)


#: why a gray image among colour ones (or a colour one among gray) is read unlike them: the
#: reason every such warning gives (fit, calibrate, predict)
GRAY_AS_COLOUR = "the model reads a gray image as colour, its one channel in all three"


def colour_problem(name: str, gray: bool, training_gray: bool, once: bool = True) -> str | None:
    """The warning, or None, for an image predicted that is gray (:func:`~hrad.data.images.is_gray`)
    when the training images were colour, or colour when they were gray: usually a camera set to
    another colour mode, or converted files. One wording for the model and its export; ``once``
    as for :func:`scale_problem`."""
    if gray == training_gray:
        return None
    kind, training = ("gray", "colour") if gray else ("colour", "gray")
    return (
        f"{name}: a {kind} image, the model's training images are {training}: {GRAY_AS_COLOUR}, so the backbone sees "
        "it unlike the training ones and its score may not compare with the thresholds; another camera, or one set to "
        f"another colour mode? Predict {training} images, as the training ones{'. Said once, for the first such image' if once else ''}"
    )


def tell_colour(told: bool, name: str, gray: bool, training_gray: bool | None, stacklevel: int = 1) -> bool:
    """Tell of an image predicted that is gray (``gray``: :func:`~hrad.data.images.is_gray` of
    its pixels, which the caller reads: this module sits below ``hrad.data``) when the training
    images were colour, or the reverse (:func:`colour_problem`):
    :func:`tell_once`. ``training_gray`` None (a model or export saved before hrad kept it):
    nothing to compare with, no word. Returns whether the model has told it now."""
    if training_gray is None:
        return told
    return tell_once(told, partial(colour_problem, name, gray, training_gray), stacklevel + 1)


def tell_once(told: bool, problem: Callable[..., str | None], stacklevel: int = 1) -> bool:
    """One warning for the model of a ``problem`` of the image predicted (``problem(once=...)``:
    the line or None; ``told``: given already), and for ``hrad serve`` the line in every response
    it concerns (:func:`~hrad.errors.tell_request`), not only the first. Returns whether the model
    has told it now. ``stacklevel`` counts from the caller.

    Run for every image (every ``hrad serve`` request), nothing cached: the scale and colour checks
    together took 0.05-0.24% of the predict of a 192x128 image by a tiny-cnn model, far faster
    than a real one (benchmarks/results/predict_check_cost.md)."""
    line = problem(once=False)
    if line is None:
        return told
    tell_request(line)  # this request's own line: it is not "said once" there
    if not told:
        warn(problem(once=True) or line, stacklevel + 1, collect=False)
    return True


def check_finite(name: str, value: float | None, minimum: float | None = None) -> None:
    """A threshold setting (``threshold``, ``pixel threshold``, ``sigmas``) must be a finite
    number when given: NaN compares false with every score and would decide nothing. ``minimum``:
    its lowest sensible value (``sigmas`` 0: a negative k puts the thresholds below the good
    images' mean, so most good parts would be flagged)."""
    if value is not None and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    if value is not None and minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be {minimum:g} or more, got {value:g}")


def decision_thresholds(
    thresholds: Thresholds | None, threshold: float | None = None, pixel_threshold: float | None = None, sigmas: float | None = None
) -> tuple[float | None, float | None]:
    """``(image, pixel)`` thresholds: ``thresholds``', moved to ``sigmas`` (mean + k std of the
    held-out normals), or replaced by ``threshold`` (image score) / ``pixel_threshold``."""
    for name, value in (("threshold", threshold), ("pixel threshold", pixel_threshold)):
        check_finite(name, value)
    check_finite("sigmas", sigmas, minimum=0)
    image, pixel = (thresholds.image, thresholds.pixel) if thresholds else (None, None)
    if sigmas is not None:
        if thresholds is None:
            raise ConfigError("sigmas: this model has no thresholds (it was fitted without held-out normal images)")
        image, pixel = thresholds.at_sigmas(sigmas)
    return (image if threshold is None else float(threshold), pixel if pixel_threshold is None else float(pixel_threshold))
