"""``AnomalyModel``: the object users fit, save, load and predict with.

It owns the backbone, the strategy (which owns the detectors), the full-resolution
post-processing and the thresholds learned from held-out normal images.
"""

from __future__ import annotations

import dataclasses
import math
import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from hrad.artifact import locate_artifact, open_weights, read_manifest, write_artifact
from hrad.config import ModelConfig, first_problem
from hrad.data.bit_depth import (
    exceeds,
    is_wide,
    significant_bits,
    stored_bit_depth,
    to_full_range,
    warn_saturated,
)
from hrad.data.images import as_pixels, is_gray, model_input, stored_gray
from hrad.errors import ArtifactError, ConfigError, DivergedError, HradError, InputError, named, warn
from hrad.features import build_backbone
from hrad.postprocess import device_maps
from hrad.postprocess.border import BorderProfile
from hrad.postprocess.roi import RegionOfInterest, finished_prediction, read_roi
from hrad.postprocess.smoothing import smooth_and_score
from hrad.prediction import (
    GRAY_AS_COLOUR,
    check_finite,
    check_image_size,
    decision_thresholds,
    scale_factor,
    scale_problem,
    scaled_apart,
    tell_colour,
    tell_scale,
)
from hrad.prediction import MIN_SIDE_FRACTION as MIN_SIDE_FRACTION
from hrad.prediction import Prediction as Prediction
from hrad.prediction import Thresholds as Thresholds
from hrad.progress import ProgressCallback, no_progress
from hrad.strategies.base import (
    AnomalyResult,
    DeviceResult,
    ImageSource,
    Strategy,
    build_strategy,
    image_name,
)


class ArrayImages:
    """An :class:`ImageSource` over in-memory arrays (for the Python API), in their pixel type."""

    def __init__(self, images: Sequence[np.ndarray]) -> None:
        self._images = list(images)

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> np.ndarray:
        return as_pixels(self._images[index])


class FullRangeImages:
    """An :class:`ImageSource` whose 16-bit images of ``bits`` significant bits are scaled to the
    full 16-bit range (:func:`~hrad.data.bit_depth.to_full_range`; a new array, the source's own
    may be the caller's). An image brighter than ``bits`` allows (a ``bit_depth`` set below the
    files', or a validation image brighter than the training images) saturates with one warning
    naming it, as at predict: the model would otherwise learn clipped parts without a word."""

    def __init__(self, source: ImageSource, bits: int) -> None:
        self.source = source
        self.bits = bits
        self._warned: set[int] = set()  # the fit reads an image more than once: one warning each

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> np.ndarray:
        image = self.source[index]
        peak = exceeds(image, self.bits)
        if peak is not None and index not in self._warned:
            self._warned.add(index)
            warn_saturated(self.name(index), peak, self.bits, at_fit=True, stacklevel=2)
        return to_full_range(image, self.bits)

    def name(self, index: int) -> str:
        return image_name(self.source, index)


#: what a mix of training images is told by: their pixel types' names
_PIXEL_KINDS = {"uint8": "8-bit", "uint16": "16-bit"}
#: 16-bit training images this many bits darker than the brightest (1/16 of its range) are of another depth
_OTHER_DEPTH_BITS = 4


def pixel_kind(image: np.ndarray) -> str:
    """``8-bit``, ``16-bit`` or ``float``: the pixel type a training image came in."""
    return _PIXEL_KINDS.get(image.dtype.name, "float")


def _stored_pixel_type(value: object, bit_depth: int | None, where: str) -> str | None:
    """The training images' pixel type read back from a manifest (``where`` names it); a model
    saved before hrad kept it has none (16-bit when it learned a bit depth: only those have one)."""
    if value is None:
        return "16-bit" if bit_depth is not None else None
    if value not in (*_PIXEL_KINDS.values(), "float"):
        raise ArtifactError(f"{where}: pixel_type {value!r} is not 8-bit, 16-bit or float; the file is corrupt")
    return str(value)


class TrainingImages:
    """The training source as a fit reads it: notes each image's pixel type, size and channels (gray or colour) as it is
    read (a folder mixing 8-bit and 16-bit files is flagged: :meth:`mix_problem`), and can hold one
    image for the next read of it (:meth:`peek`), so the images the fit looks at before training
    (the first, whose type decides whether a depth is learned and whose size is the fitted size)
    are not decoded again when the strategy reads them."""

    def __init__(self, source: ImageSource, role: str = "training", unnamed: str = "image") -> None:
        self.source = source
        #: what the images are to the fit, in its lines: ``training``, ``validation`` or (to
        #: :meth:`AnomalyModel.calibrate`) ``good``
        self.role = role
        self._unnamed = unnamed  # what an image without a name of its own (an array) is called: "<unnamed> <index>"
        self.kinds: dict[int, str] = {}
        self.sizes: dict[int, tuple[int, int]] = {}
        #: whether each image read came as gray (one channel) rather than colour (:func:`~hrad.data.images.is_gray`)
        self.gray: dict[int, bool] = {}
        #: ``(height, width, first image's index)`` once the fit knows its fitted size: every later
        #: read refuses an image far smaller, as predict would (a thumbnail among the training
        #: images was learned, silently, unless the split happened to hold it out)
        self.fitted: tuple[int, int, int] | None = None
        self._held: tuple[int, np.ndarray] | None = None
        self._sticky = False

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> np.ndarray:
        index = index + len(self) if index < 0 else index
        held = self._held
        if held is not None and held[0] == index:
            self._held, self._sticky = None, False
            return held[1]
        if not self._sticky:
            self._held = None  # held for the next read only: an image the fit does not read next is not kept
        image = self.source[index]
        self.kinds[index] = pixel_kind(image)
        self.sizes[index] = (int(image.shape[0]), int(image.shape[1]))
        self.gray[index] = is_gray(image)
        if self.fitted is not None:
            height, width, first = self.fitted
            check_image_size(image, (height, width), self.name(index), set_by=self.name(first))
            if min(height, width) < MIN_SIDE_FRACTION * min(image.shape[:2]):  # the first is the thumbnail
                raise InputError(
                    f"{self.name(first)}: image is {width}x{height}, the first training image (it sets the size the model "
                    f"is fitted on), its short side under 1/{round(1 / MIN_SIDE_FRACTION)} of {self.name(index)}'s "
                    f"{image.shape[1]}x{image.shape[0]}; resize it to the others' scale or leave it out"
                )
        return image

    def peek(self, index: int, sticky: bool = False) -> np.ndarray:
        """Image ``index``, held for the next read of it: the next read of any image, or with
        ``sticky`` the next read of this one (reads of others in between, until :meth:`unstick`)."""
        image = self[index]
        self._held, self._sticky = (index, image), sticky
        return image

    def unstick(self) -> None:
        """A sticky held image goes on to the next read only."""
        self._sticky = False

    def size(self, index: int) -> tuple[int, int]:
        """``(height, width)`` of image ``index``; read (and held for the next read) when not yet seen."""
        if index not in self.sizes:
            self.peek(index)
        return self.sizes[index]

    def name(self, index: int) -> str:
        return image_name(self.source, index, self._unnamed)

    def first_kind(self) -> str | None:
        """The pixel type of the first image read (the training images' type a model records)."""
        return self.kinds[min(self.kinds)] if self.kinds else None

    def mix_problem(self, bit_depth: int | None, training: TrainingImages | str | None = None) -> str | None:
        """A line when the images read so far are of more than one pixel type (two cameras, a
        converted subset: a model reads each type by its own rule and learns a depth from the
        16-bit ones alone), naming the first of another type than the first image; else None.
        With ``training`` (these are images given apart from the training ones: a validation
        set, or the good images of :meth:`AnomalyModel.calibrate`): a line when any of these is of
        another type than the first training image (the thresholds would come from images the
        model reads unlike its training ones); a string is the training images' type as a loaded
        model recorded it (:attr:`AnomalyModel.pixel_type`)."""
        advice = "two cameras, or a converted subset? Fit on images of one type"
        if isinstance(training, str):
            first, first_said = training, f"the model's training images are {training}"
            advice = f"another camera, or converted files? Calibrate on {training} images, as the training ones"
        else:
            reference = training if training is not None else self
            if not reference.kinds:
                return None
            first_index = min(reference.kinds)
            first = reference.kinds[first_index]
            first_said = f"{reference.name(first_index)} is {first}"
        others = sorted(index for index, kind in self.kinds.items() if kind != first)
        if not others:
            return None
        kinds = sorted({*self.kinds.values(), first})
        among, count, effect = f"{first} ones", f"{len(others)} of {len(self.kinds)}", ""
        if training is not None:
            among, count = f"{first} training ones", f"{count} {self.role} images"
            effect = "; the thresholds come from images read unlike the training ones"
        rules = {
            "8-bit": "8-bit ones as 0..255",
            "16-bit": "16-bit ones as stored (0..65535)" if bit_depth is None else f"16-bit ones scaled from {bit_depth} significant bits",
            "float": "float ones as they are",
        }
        return (
            f"{self.name(others[0])}: {'an' if self.kinds[others[0]] == '8-bit' else 'a'} {self.kinds[others[0]]} "
            f"{self.role} image among {among} "
            f"({count} are not {first}, this the first; {first_said}): "
            f"the model reads {', '.join(rules[kind] for kind in kinds)}{effect}; {advice}"
        )

    def first_gray(self) -> bool | None:
        """Whether the first image read was gray (the training images' kind a model records)."""
        return self.gray[min(self.gray)] if self.gray else None

    def colour_problem(self, training: bool | None = None) -> str | None:
        """A line when the images read so far mix gray and colour ones (two cameras, a converted
        subset: the model reads a gray image as colour with its one channel in all three, so the
        backbone sees those without colour and the detector learns two kinds of normal image),
        naming the first of another kind than the first image; else None. With ``training``
        (whether a loaded model's training images were gray: :attr:`AnomalyModel.gray`): a line
        when any of these images (the good ones of :meth:`AnomalyModel.calibrate`) is of the other kind."""
        if not self.gray:
            return None
        if training is not None:
            others = sorted(index for index, gray in self.gray.items() if gray != training)
            if not others:
                return None
            kind, other = ("gray", "colour") if training else ("colour", "gray")
            return (
                f"{self.name(others[0])}: a {other} {self.role} image, the model's training images are {kind} "
                f"({len(others)} of {len(self.gray)} {self.role} images are not {kind}, this the first): {GRAY_AS_COLOUR}, "
                "so the thresholds come from images the backbone sees "
                f"unlike the training ones; another camera, or converted files? Calibrate on {kind} images, as the training ones"
            )
        first = min(self.gray)
        others = sorted(index for index, gray in self.gray.items() if gray != self.gray[first])
        if not others:
            return None
        kind, other = ("gray", "colour") if self.gray[first] else ("colour", "gray")
        return (
            f"{self.name(others[0])}: a {other} {self.role} image among {kind} ones ({len(others)} of {len(self.gray)} "
            f"are not {kind}, this the first; {self.name(first)} is {kind}): {GRAY_AS_COLOUR}, "
            "so the backbone sees the gray ones without colour and the model learns two kinds of "
            "normal image; two cameras, or a converted subset? Fit on images of one kind (convert them alike)"
        )

    def size_problem(self, scale: Callable[[int, int], tuple[float, float]], resizing: str) -> str | None:
        """A line when the images read so far come in sizes the strategy scales unlike (``scale``:
        its :meth:`~hrad.strategies.base.Strategy.input_scale`, ``resizing`` its
        :meth:`~hrad.strategies.base.Strategy.resizing`; a fixed working size over a folder
        of mixed sizes): the detector learns features of several scales, a defect's size in them
        set by its image's. Names the first image scaled unlike the first one; sizes scaled alike
        (strips of several lengths tiled at native resolution) are fine and say nothing."""
        if len(set(self.sizes.values())) < 2:
            return None
        first = min(self.sizes)
        reference = scale(*self.sizes[first])
        others = [index for index in sorted(self.sizes) if scaled_apart(scale(*self.sizes[index]), reference)]
        if not others:
            return None
        odd = others[0]
        (height, width), (first_height, first_width) = self.sizes[odd], self.sizes[first]
        return (
            f"{self.name(odd)}: a {width}x{height} {self.role} image among {first_width}x{first_height} ones (the first, "
            f"{self.name(first)}; {len(others)} of {len(self.sizes)} scaled unlike it, this the first): {resizing}, "
            f"this one by {scale_factor(scale(height, width))}, the first by "
            f"{scale_factor(reference)}: the model learns features of several scales and a defect's apparent size depends on "
            "its image's; fit on images of one size (crop or resize them alike)"
        )


class Subset:
    def __init__(self, source: ImageSource, indices: Sequence[int]) -> None:
        self.source = source
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.source[self.indices[index]]

    def name(self, index: int) -> str:
        """The source's name for the image (its file), by the source's own index."""
        return image_name(self.source, self.indices[index])


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:N``; a name torch does not know or a
    CUDA device this machine lacks is a one-line :class:`ConfigError`, not a traceback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: this machine's torch has no CUDA device; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise ConfigError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


class AnomalyModel:
    #: finish a map the strategy leaves on its device (:attr:`~hrad.strategies.base.Strategy.maps_on_device`:
    #: HiAD on a GPU) there: border calibration, blur, region and score in torch, one copy of the
    #: finished map and score back (:func:`hrad.postprocess.device_maps.smooth_and_score`). False:
    #: copy the strategy's map to the host and finish it there, as every CPU predict does (the
    #: benchmarks compare the two on one model)
    device_postprocess: bool = True

    def __init__(self, config: ModelConfig | None = None) -> None:
        self.config = config or ModelConfig()
        self.device = resolve_device(self.config.device)
        self.extractor = build_backbone(self.config.backbone).to(self.device)
        self.strategy: Strategy = build_strategy(self.config.strategy, self.config.detector, self.extractor)
        self.thresholds: Thresholds | None = None
        #: per-epoch mean training losses of trainable detectors, by training stage (saved in the artifact)
        self.training_history: dict[str, list[float]] = {}
        self.fitted_size: tuple[int, int] | None = None
        #: significant bits of the 16-bit images, scaled to the full range before anything else
        #: sees them (:mod:`hrad.data.bit_depth`); None: 16-bit images as stored (and 8-bit data)
        self.bit_depth: int | None = None
        #: the part of every image that is inspected (:mod:`hrad.postprocess.roi`); None: all of it
        self.roi: RegionOfInterest | None = None
        #: with ``bit_depth: auto``, the brightest pixel of the 16-bit training images and the image
        #: holding it, which set the depth learned (known after fit only, not saved): one hot
        #: image can lift a 12-bit line to 14 bits, and the fit's message names it
        self.brightest: tuple[int, str] | None = None
        #: the pixel type of the training images (of the first, when they mix): ``8-bit``,
        #: ``16-bit`` or ``float``; :meth:`calibrate` tells good images of another type. None: a
        #: model saved before hrad kept it (16-bit when it has a bit depth), or not fitted
        self.pixel_type: str | None = None
        #: whether the training images were gray (of the first, when they mix); :meth:`calibrate`
        #: tells good images of the other kind. None: a model saved before hrad kept it, or not fitted
        self.gray: bool | None = None
        self._mix_told = False  # the fit told a mix of training image types already (after the depth's pass)
        self._scale_told = False  # predict told of an image the strategy scales unlike the training images already
        self._colour_told = False  # predict told of a gray image among colour training ones (or the reverse) already

    # -- training -------------------------------------------------------------------------------
    def fit(
        self,
        images: ImageSource | Sequence[np.ndarray],
        validation: ImageSource | Sequence[np.ndarray] | None = None,
        progress: ProgressCallback = no_progress,
        roi: RegionOfInterest | np.ndarray | str | Path | None = None,
    ) -> AnomalyModel:
        """Fit on good images; thresholds come from ``validation`` or a held-out fraction of them.

        ``roi``: the region of interest (:mod:`hrad.postprocess.roi`: a mask array or file,
        non-zero = inspect), kept by the model and applied to every map, thresholds included.

        A model that could only mislead is refused, never returned: :class:`DivergedError`
        when the threshold images' maps are NaN or inf, or all one value (a training collapsed
        to a constant output: thresholds of zero spread flag everything or nothing; see
        :meth:`_thresholds`). With no threshold images (``threshold.validation_fraction`` 0 and
        no ``validation``) the model has no thresholds (:attr:`thresholds` None) and the fit
        predicts the first training image once, so a model mapping it to NaN or inf is refused
        too; that one prediction is the only cost, and only there."""
        source: ImageSource = ArrayImages(images) if isinstance(images, (list, tuple)) else images  # type: ignore[arg-type]
        if len(source) == 0:
            raise InputError("no normal training images")
        torch.manual_seed(self.config.seed)
        if roi is None or isinstance(roi, RegionOfInterest):
            self.roi = roi
        else:
            self.roi = read_roi(roi) if isinstance(roi, (str, Path)) else RegionOfInterest.from_pixels(roi, "roi array")
        observed = TrainingImages(source)
        self.bit_depth = self._learn_bit_depth(observed, progress)
        source = self._full_range_source(observed)
        if validation is None:
            train, validation_source = self._split(source)
        else:
            train = source
            given = ArrayImages(validation) if isinstance(validation, (list, tuple)) else validation  # type: ignore[arg-type]
            observed_validation = TrainingImages(given, role="validation")  # its pixel types, against the training's
            validation_source = self._full_range_source(observed_validation)
        if self.strategy.needs_calibration and (validation_source is None or len(validation_source) == 0):
            raise InputError(
                f"strategy {self.config.strategy.name!r} calibrates on held-out good images, but none are held out "
                f"({len(source)} training image(s), threshold.validation_fraction "
                f"{self.config.threshold.validation_fraction}); give more training images or a validation set"
            )
        first = train.indices[0] if isinstance(train, Subset) else 0
        self.fitted_size = observed.size(first)  # no read after the depth's
        self._scale_told = self._colour_told = False
        observed.fitted = (*self.fitted_size, first)
        problem = self.roi.stretch_problem(self.fitted_size) if self.roi is not None else None
        if problem is not None:
            warnings.warn(problem, stacklevel=2)
        self.strategy.fit(train, progress)
        self.training_history = self.strategy.training_history()
        if validation_source is not None and len(validation_source) > 0:
            self.strategy.calibrate(validation_source, progress)
            self.thresholds = self._thresholds(validation_source, progress)
        else:
            self._held_out_statistics(Subset(train, [0]), progress, None, None, "training")  # NaN / inf: refused
        if not self._mix_told:  # every training image read by now
            self._tell_mix(observed, stacklevel=2)
        sizes = observed.size_problem(self.strategy.input_scale, self.strategy.resizing())
        if sizes is not None:
            warn(sizes, stacklevel=2)
        colours = observed.colour_problem()
        if colours is not None:
            warn(colours, stacklevel=2)
        if validation is not None:  # every validation image read by now too
            self._tell_mix(observed_validation, stacklevel=2, training=observed)
        self.pixel_type = observed.first_kind()  # the reference the lines above compare with
        self.gray = observed.first_gray()
        return self

    def _tell_mix(self, observed: TrainingImages, stacklevel: int, training: TrainingImages | str | None = None) -> None:
        """One warning when the training images read so far mix pixel types, or with
        ``training`` when the validation (or calibration) images ``observed`` are of another type
        than the training images, or than the type a loaded model recorded (a string; see
        :meth:`TrainingImages.mix_problem`). ``stacklevel``: the caller of fit, counted from this
        method's caller."""
        problem = observed.mix_problem(self.bit_depth, training)
        if problem is not None:
            warn(problem, stacklevel=stacklevel + 1)
        self._mix_told = True

    def _learn_bit_depth(self, images: TrainingImages, progress: ProgressCallback) -> int | None:
        """``config.bit_depth``, or with ``auto`` the smallest camera depth holding every pixel of
        the 16-bit training images (one reading pass, only when the first image is 16-bit; the
        first image is held for the fit's read, so it is decoded once). That pass sees every
        image: a mix of pixel types or of 16-bit depths far apart is told before training."""
        setting = self.config.bit_depth
        self.brightest = None
        self._mix_told = False
        if setting != "auto":
            return setting if setting < 16 else None
        first = images.peek(0, sticky=True)
        if not is_wide(first):
            return None
        peaks: dict[int, int] = {}
        for index in range(len(images)):
            image = first if index == 0 else images[index]
            if is_wide(image):
                peaks[index] = int(image.max()) if image.size else 0
            progress(index + 1, len(images), "bit depth of the 16-bit training images")
        images.unstick()
        brightest = max(peaks, key=lambda index: (peaks[index], -index))  # the first of the brightest
        self.brightest = (peaks[brightest], images.name(brightest))
        bits = significant_bits(peaks[brightest])
        depth = bits if bits < 16 else None
        self.bit_depth = depth  # what the mix's line says 16-bit images are read by
        self._tell_mix(images, stacklevel=3)
        dark = [index for index in sorted(peaks) if significant_bits(peaks[index]) <= bits - _OTHER_DEPTH_BITS]
        if dark:
            warn(
                f"{images.name(dark[0])}: a 16-bit training image of another depth: its brightest pixel is {peaks[dark[0]]} "
                f"({significant_bits(peaks[dark[0]])} bits), the training images' {peaks[brightest]} ({bits} bits, in "
                f"{images.name(brightest)}); {len(dark)} of {len(peaks)} are as dark (this the first) and, scaled from "
                f"{bits} bits, reach the backbone almost black; two cameras, or a converted subset? Fit on images of one depth",
                stacklevel=3,  # the caller of fit
            )
        return depth

    def _full_range_source(self, source: ImageSource) -> ImageSource:
        return source if self.bit_depth is None else FullRangeImages(source, self.bit_depth)

    def _split(self, source: ImageSource) -> tuple[ImageSource, ImageSource | None]:
        fraction = self.config.threshold.validation_fraction
        count = int(round(len(source) * fraction))
        if fraction == 0 or count == 0 or len(source) - count < 1:
            return source, None
        order = list(range(len(source)))
        random.Random(self.config.seed).shuffle(order)
        return Subset(source, sorted(order[count:])), Subset(source, sorted(order[:count]))

    def _thresholds(self, images: ImageSource, progress: ProgressCallback, kind: str = "held-out") -> Thresholds:
        """Thresholds from the held-out normal images, on maps as every prediction finishes them.
        ``kind``: what the progress and errors call the images ("good": given to :meth:`calibrate`).

        The first pass also profiles the raw maps' excess along the image border
        (:mod:`hrad.postprocess.border`); only when it finds one are the images predicted again,
        their maps divided by it, for the thresholds (most of all when there is no frame, one pass).

        Maps that are all one value, the same in every image, with all scores equal
        (:func:`_one_value`, from the first pass's statistics, at no cost) are refused
        (:meth:`_constant_maps`): thresholds of zero spread flag everything or nothing.
        """
        profile = BorderProfile() if self.config.postprocess.border_calibration else None
        scores, pixels = self._held_out_statistics(images, progress, None, profile, kind)
        if _one_value(scores, pixels):
            raise self._constant_maps(images, kind, _mean_and_std(pixels)[0], len(scores))
        border = profile.ratios() if profile is not None else None
        if border:
            scores, pixels = self._held_out_statistics(images, progress, border, None, kind)
        k = self.config.threshold.sigmas
        mean, std = _mean_and_std(pixels)
        return Thresholds(
            image=float(np.mean(scores) + k * np.std(scores)),
            pixel=float(mean + k * std),
            image_scores=scores,
            pixel_mean=float(mean),
            pixel_std=float(std),
            sigmas=float(k),
            border_ratios=border,
        )

    def _held_out_statistics(
        self, images: ImageSource, progress: ProgressCallback, border: list[float] | None, profile: BorderProfile | None, kind: str
    ) -> tuple[list[float], tuple[float, float, float]]:
        """Image scores and the pixels' sum, sum of squares and count of the finished maps
        (border-calibrated by ``border``); ``profile`` also takes each raw map."""
        scores: list[float] = []
        pixel_sum = pixel_sq = pixel_count = 0.0
        description = "thresholds on border-calibrated maps" if border else f"thresholds from {'held-out normal' if kind == 'held-out' else kind} images"
        if kind == "training":
            description = "a training image's map (no threshold images)"
        for index in range(len(images)):
            name = image_name(images, index, f"{kind} image")
            try:
                image = images[index]
                self._check_size(image, name)
                with torch.inference_mode():
                    result = self.strategy.predict(image)
            except HradError as error:
                raise named(name, error) from None
            if profile is not None:
                profile.update(result.anomaly_map)  # the raw map, before smoothing works in place
            anomaly_map, score = smooth_and_score(result.anomaly_map, result.score, self.config.postprocess, border, self.roi, self.strategy.map_score)
            values = (anomaly_map if self.roi is None else self.roi.inside(anomaly_map)).astype(np.float64)
            image_sum, image_sq = float(values.sum()), float(np.square(values).sum())  # NaN / inf when any value is
            if not (math.isfinite(score) and math.isfinite(image_sum) and math.isfinite(image_sq)):
                raise self._non_finite_map(name, image, kind)
            scores.append(score)
            pixel_sum += image_sum
            pixel_sq += image_sq
            pixel_count += values.size
            progress(index + 1, len(images), description)
        return scores, (pixel_sum, pixel_sq, pixel_count)

    def _non_finite_map(self, name: str, image: np.ndarray, kind: str) -> HradError:
        """The error for a NaN / inf map or score of a threshold image, which would give NaN
        thresholds (a model no load accepts): :class:`InputError` when the image is one flat value
        (a detector dividing by its zero spread: the data's fault), else :class:`DivergedError`."""
        consequence = "so the model would map and score images as NaN" if kind == "training" else "so no thresholds can come from it"
        where = f"{name}: the anomaly map of this {kind} image is NaN or inf, {consequence}"
        value = _flat_value(image)
        if value is not None:
            return InputError(
                f"{where}: the image is one flat value ({value:g} everywhere), which "
                f"{self.config.detector.name} cannot score; give images of the parts themselves"
            )
        last = self._last_epoch_loss()
        if last is not None:
            stage, loss = last
            cause = (
                f"the training diverged (last {stage} epoch's mean loss {loss:.3g}); lower the detector's learning "
                f"rate (hrad options detector {self.config.detector.name})"
            )
        else:
            cause = "the backbone or detector gives NaN or inf on it (a float16 overflow, or degenerate backbone weights?)"
        return DivergedError(f"{where}: {cause}")

    def _last_epoch_loss(self) -> tuple[str, float] | None:
        """The last trained stage and its last epoch's mean loss (None: nothing was trained)."""
        last = {stage: losses[-1] for stage, losses in self.training_history.items() if losses}
        return next(reversed(last.items())) if last else None

    def _constant_maps(self, images: ImageSource, kind: str, value: float, count: int) -> HradError:
        """The error for threshold images whose maps are all one ``value`` (:func:`_one_value`):
        :class:`InputError` when every image is itself one flat value (nothing to score: the
        data's fault, named by its first image), else :class:`DivergedError` saying what to do:
        a trained detector collapsed to a constant output, a memory-bank one has features that
        tell no part from another. Reads the images again until one is not flat (one read,
        unless they are all flat), on this failure only."""
        detector = self.config.detector.name
        images_said = f"this {kind} image" if count == 1 else f"all {count} {kind} images"
        where = (
            f"every anomaly map of {images_said} is one value ({value:.6g} everywhere), so thresholds from "
            f"{'it' if count == 1 else 'them'} would flag everything or nothing"
        )
        flat: tuple[str, float] | None = None
        for index in range(len(images)):
            image = images[index]
            flat_value = _flat_value(image)
            if flat_value is None:
                break
            flat = flat or (image_name(images, index, f"{kind} image"), flat_value)
        else:
            if flat is not None:
                return InputError(
                    f"{flat[0]}: {where}: the {kind} images are each one flat value ({flat[1]:g} everywhere in this "
                    f"one), which {detector} cannot score; give images of the parts themselves"
                )
        last = self._last_epoch_loss()
        if last is not None:
            stage, loss = last
            refit = "refit it with" if kind == "good" else "fit again with"
            cause = (
                f"the training collapsed to a constant output (last {stage} epoch's mean loss {loss:.3g}); "
                f"{refit} a lower learning rate or more epochs (hrad options detector {detector})"
            )
        else:
            cause = (
                f"the backbone's features tell no part of these images from another (degenerate backbone weights? "
                f"check --weights), or the {kind} images are identical to the training ones; give varied {kind} images"
            )
        return DivergedError(f"{detector}: {where}: {cause}")

    def calibrate(
        self,
        images: ImageSource | Sequence[np.ndarray],
        progress: ProgressCallback = no_progress,
        sigmas: float | None = None,
    ) -> Thresholds | None:
        """Calibrate a fitted model again on new good ``images``, as its fit did on held-out ones:
        the strategy's calibration (a pool's map ranges), the border profile and both thresholds,
        at ``sigmas`` (default: the model's). For a line whose good parts drifted from the
        training images (new lighting, another batch): its false alarms go, without a refit.
        The training itself, the bit depth and the region of interest stay. Returns the
        thresholds it replaced (None: the model had none)."""
        source: ImageSource = ArrayImages(images) if isinstance(images, (list, tuple)) else images  # type: ignore[arg-type]
        if len(source) == 0:
            raise InputError("no good images to calibrate on")
        if self.fitted_size is None:
            raise InputError("the model is not fitted: fit it first (hrad fit)")
        check_finite("sigmas", sigmas, minimum=0)
        if sigmas is not None:
            self.config.threshold = self.config.threshold.model_copy(update={"sigmas": float(sigmas)})
        previous = self.thresholds
        observed = TrainingImages(source, role="good", unnamed="good image")  # its pixel types, against the training images'
        source = self._full_range_source(observed)
        self.strategy.calibrate(source, progress)
        self.thresholds = dataclasses.replace(self._thresholds(source, progress, "good"), calibrated=True)
        if self.pixel_type is not None:  # every good image read by now
            self._tell_mix(observed, stacklevel=2, training=self.pixel_type)
        colours = observed.colour_problem(training=self.gray) if self.gray is not None else None
        if colours is not None:
            warn(colours, stacklevel=2)
        scales = self._scale_problem(observed)
        if scales is not None:
            warn(scales, stacklevel=2)
        return previous

    def _scale_problem(self, observed: TrainingImages) -> str | None:
        """The line for the first of the good images ``observed`` by :meth:`calibrate` that the
        strategy scales unlike the training images (:func:`~hrad.prediction.scale_problem`): the
        thresholds would be learned from maps of another scale than the model's predictions; else None."""
        if self.fitted_size is None:
            return None
        strategy = self.strategy
        for index in sorted(observed.sizes):
            problem = scale_problem(
                observed.name(index), observed.sizes[index], self.fitted_size, strategy.input_scale, strategy.resizing(), use="calibrate"
            )
            if problem is not None:
                return problem
        return None

    # -- inference --------------------------------------------------------------------------------
    @property
    def border_ratios(self) -> list[float] | None:
        """The held-out normal maps' excess along the image border (:mod:`hrad.postprocess.border`),
        divided out of every map while ``postprocess.border_calibration`` is on."""
        return self.thresholds.border_ratios if self.thresholds is not None else None

    def _on_device(self) -> bool:
        """Whether predictions are finished on the strategy's device (:attr:`device_postprocess`)."""
        return self.device_postprocess and self.strategy.maps_on_device

    def _predict_raw(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        with torch.inference_mode():
            result = self.strategy.predict_on_device(image) if self._on_device() else self.strategy.predict(image)
            return self._finish(result)

    def _predict_raw_batch(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        if self._on_device():  # one image at a time (HiAD's predict_batch is that loop too)
            return [self._predict_raw(image) for image in images]
        with torch.inference_mode():
            results = self.strategy.predict_batch(images)
        return [self._finish(result) for result in results]

    def _finish(self, result: AnomalyResult | DeviceResult) -> tuple[np.ndarray, float]:
        """A strategy's map border-calibrated, smoothed, restricted to the region and scored: on
        the host, or on the strategy's device for a :class:`DeviceResult` (same values to float32
        rounding; the host then waits once, for the finished map and score)."""
        settings = (self.config.postprocess, self.border_ratios, self.roi, self.strategy.map_score)
        if isinstance(result, DeviceResult):
            return device_maps.smooth_and_score(result.anomaly_map, result.score, *settings)
        return smooth_and_score(result.anomaly_map, result.score, *settings)

    def _check_size(self, image: np.ndarray, name: str) -> None:
        """Refuse an image far smaller than the fitted ones (:data:`hrad.prediction.MIN_SIDE_FRACTION`),
        or one the strategy cannot take (another size than a tiled ensemble's), naming it."""
        check_image_size(image, self.fitted_size, name)
        try:
            self.strategy.check_input(image)
        except HradError as error:
            raise named(name, error) from None

    def _tell_scale(self, image: np.ndarray, name: str) -> None:
        """One warning, the first time only (a folder of them is one line, not one a file), when
        the strategy scales an image unlike the images the model was fitted on (its
        :meth:`~hrad.strategies.base.Strategy.input_scale` more than 2% apart: another size or
        aspect under a fixed working size): its defects reach the detector at another apparent
        size than the training images' parts did. Native-resolution strategies say nothing.
        A served request (``hrad serve``) gets the line for each such image of its own
        (:func:`~hrad.prediction.tell_scale`)."""
        if self.fitted_size is None:
            return
        self._scale_told = tell_scale(
            self._scale_told, name, image.shape[:2], self.fitted_size, self.strategy.input_scale, self.strategy.resizing(),
            stacklevel=3,  # the caller of predict
        )

    def _tell_colour(self, image: np.ndarray, name: str) -> None:
        """One warning, the first time only, when an image is gray and the training images were
        colour, or the reverse (a camera set to another colour mode: :func:`~hrad.prediction.colour_problem`);
        a served request gets the line for each such image of its own. A model saved before it kept
        its training images' kind (:attr:`gray` None) says nothing."""
        self._colour_told = tell_colour(self._colour_told, name, is_gray(image), self.gray, stacklevel=3)  # the caller of predict

    def decision_thresholds(
        self, threshold: float | None = None, pixel_threshold: float | None = None, sigmas: float | None = None
    ) -> tuple[float | None, float | None]:
        """``(image, pixel)`` thresholds: the model's, moved to ``sigmas`` (mean + k std of its
        held-out normals), or replaced by ``threshold`` (image score) / ``pixel_threshold``."""
        return decision_thresholds(self.thresholds, threshold, pixel_threshold, sigmas)

    def predict(
        self,
        image: np.ndarray | str | Path,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        sigmas: float | None = None,
        name: str | None = None,
    ) -> Prediction:
        """Anomaly map at the image's own resolution and its score; independent of other images.

        Decisions use the model's thresholds unless overridden (see :meth:`decision_thresholds`).
        The image stays in its pixel type (uint8, uint16; :func:`~hrad.data.images.as_pixels`) and
        is converted to float one tile window at a time; 16-bit data is first scaled by the
        model's :attr:`bit_depth`, so pass the path or the integer array, not a float conversion.
        ``name`` is what errors and warnings call the image (default: its path, or "image array").
        The first image the strategy scales unlike the training images (another size or aspect
        under a fixed working size) is one warning, once for the model (:meth:`_tell_scale`), and so
        is the first gray image when the training images were colour, or the reverse (:meth:`_tell_colour`).
        """
        array, name = model_input(image, self.bit_depth, name)
        self._check_size(array, name)
        self._tell_colour(array, name)
        self._tell_scale(array, name)
        decisions = self.decision_thresholds(threshold, pixel_threshold, sigmas)
        anomaly_map, score = self._predict_raw(array)
        return finished_prediction(anomaly_map, score, decisions, self.roi)

    def predict_batch(
        self,
        images: Sequence[np.ndarray | str | Path],
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        sigmas: float | None = None,
        names: Sequence[str] | None = None,
    ) -> list[Prediction]:
        """:meth:`predict` of several images at once, in order, each equal to predicting it alone
        (float tolerance). :meth:`~hrad.strategies.base.Strategy.predict_batch` shares work across
        them (tiled, downsample: tiles of several images in one backbone batch; tiled ensemble:
        each tile model loaded once). Images are checked before any is computed."""
        inputs = [
            model_input(image, self.bit_depth, name)
            for image, name in zip(images, names if names is not None else [None] * len(images), strict=True)
        ]
        for array, name in inputs:
            self._check_size(array, name)
        for array, name in inputs:
            self._tell_colour(array, name)
            self._tell_scale(array, name)
        arrays = [array for array, _ in inputs]
        decisions = self.decision_thresholds(threshold, pixel_threshold, sigmas)
        return [finished_prediction(anomaly_map, score, decisions, self.roi) for anomaly_map, score in self._predict_raw_batch(arrays)]

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        manifest = {
            "config": self.config.model_dump(mode="json"),
            "fitted_size": self.fitted_size,
            "bit_depth": self.bit_depth,
            "pixel_type": self.pixel_type,
            "gray": self.gray,
            "roi": self.roi.to_json() if self.roi is not None else None,
            "backbone_weights": self.extractor.weights_source,
            "thresholds": self.thresholds.to_json() if self.thresholds else None,
            "training_history": self.training_history,
        }
        write_artifact(Path(path), manifest, self.strategy.save_state_to)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> AnomalyModel:
        path = locate_artifact(Path(path))  # the .old backup while an overwrite is in flight
        manifest = read_manifest(path)
        try:
            config = ModelConfig.model_validate(manifest["config"])
        except ValidationError as error:
            raise ArtifactError(f"{path}: model config does not validate ({first_problem(error)})") from None
        except Exception as error:
            raise ArtifactError(f"{path}: model config does not validate ({str(error).splitlines()[0]})") from None
        if device is not None:
            config = config.model_copy(update={"device": device})
        weights = open_weights(path, manifest)  # size, shapes and sha256 checked before any model is built
        model = cls(config)
        saved_source = manifest.get("backbone_weights")
        if saved_source and saved_source != model.extractor.weights_source:
            warnings.warn(
                f"{path}: fitted with backbone weights from {saved_source}, now loaded from "
                f"{model.extractor.weights_source}; features may differ (pass --weights to pin them)",
                stacklevel=2,
            )
        model.strategy.load_state(weights)
        size = manifest.get("fitted_size")
        model.fitted_size = tuple(size) if size else None  # type: ignore[assignment]
        model.bit_depth = stored_bit_depth(manifest.get("bit_depth"), f"{path} manifest")
        model.pixel_type = _stored_pixel_type(manifest.get("pixel_type"), model.bit_depth, f"{path} manifest")
        model.gray = stored_gray(manifest.get("gray"), f"{path} manifest")
        model.roi = RegionOfInterest.from_json(manifest.get("roi"), f"{path} manifest")
        thresholds = manifest.get("thresholds")
        model.thresholds = Thresholds.from_json(thresholds) if thresholds else None
        history = manifest.get("training_history") or {}
        model.training_history = {str(k): [float(x) for x in v] for k, v in history.items()} if isinstance(history, dict) else {}
        return model


#: threshold maps whose values lie within this share of their mean (a few float32 roundings:
#: the border calibration, the blur and upsampling round a constant map by an ulp or two) are
#: one value; a real model's spread is orders of magnitude above it
_ONE_VALUE_SPREAD = 8 * float(np.finfo(np.float32).eps)


def _flat_value(image: np.ndarray) -> float | None:
    """The one value of an image that is one flat value everywhere (nothing a detector can
    score), else None."""
    if not image.size:
        return None
    low = float(np.min(image))
    return low if low == float(np.max(image)) else None


def _mean_and_std(pixels: tuple[float, float, float]) -> tuple[float, float]:
    """Mean and standard deviation of the pixels whose sum, sum of squares and count are ``pixels``."""
    pixel_sum, pixel_sq, pixel_count = pixels
    mean = pixel_sum / pixel_count
    return mean, max(pixel_sq / pixel_count - mean**2, 0.0) ** 0.5


def _one_value(scores: Sequence[float], pixels: tuple[float, float, float]) -> bool:
    """Whether every threshold map is one value, the same in all, and every image score equal:
    maps of no information (a training collapsed to a constant output, an all-zero map). Up to
    :data:`_ONE_VALUE_SPREAD` of the magnitude, not exactly: a constant map comes out of the
    float32 post-processing a few roundings apart (a map of 1234.5678 everywhere: a std of 6e-8
    of its mean), and the float64 sums' own cancellation error is about 2e-8 of the mean, so
    only maps varying by less than about a millionth of their mean (a few float32 steps, below
    what a float32 map resolves) are taken for one value."""
    if pixels[2] < 2:
        return False  # one value is no map
    mean, std = _mean_and_std(pixels)
    spread = max(scores) - min(scores)
    return std <= _ONE_VALUE_SPREAD * abs(mean) and spread <= _ONE_VALUE_SPREAD * max(abs(score) for score in scores)


def load(path: str | Path, device: str | None = None) -> AnomalyModel:
    """Load a model artifact written by ``hrad fit`` or :meth:`AnomalyModel.save`."""
    return AnomalyModel.load(path, device=device)
