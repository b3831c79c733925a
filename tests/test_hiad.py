"""HiAD strategy: fusion geometry, assignment, calibration, multi-class RA, state, parallel fit."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

import hrad.strategies.hiad.fusion as fusion_module
import hrad.strategies.pixels as pixels_module
from hrad.detectors.base import DETECTORS, Detector, DetectorConfig, DetectorOutput, register_detector
from hrad.errors import ArtifactError, ConfigError, InputError
from hrad.features import BackboneConfig, build_backbone
from hrad.features.base import EmbeddingSpec, FeatureExtractor
from hrad.hiad_math import maximum_upsampled, normalize_range, pooled_max, pooled_max_of_bands
from hrad.imaging import resize
from hrad.postprocess.border import BorderProfile, calibrate_border
from hrad.postprocess.calibration import paste_pseudo_anomalies
from hrad.postprocess.smoothing import blurred_bands, gaussian_smooth
from hrad.strategies import build_strategy, strategy_config
from hrad.strategies.base import DictStateReader
from hrad.strategies.hiad import HiAD, HiADConfig
from hrad.strategies.hiad.assignment import Assignment, fit_assignment, nearest_centroid, neighbourhood_labels
from hrad.strategies.hiad.fusion import (
    LevelMap,
    MultiResolutionFusion,
    auto_fusion_rates,
    resolve_fusion,
    sample_patch_windows,
)
from hrad.strategies.pixels import PixelImage, resampling_weights, resize_pixels, resize_pixels_by_rows

T = TypeVar("T")

TEST_DETECTOR = "test-nn-bank"


class BankConfig(DetectorConfig):
    name: str = TEST_DETECTOR
    bank_size: int = 512


class BankDetector(Detector[BankConfig]):
    """Nearest-neighbour distance to a seeded random subset of training vectors (a mini PatchCore)."""

    def __init__(self, config: BankConfig) -> None:
        super().__init__(config)
        self.bank = torch.empty(0)

    @classmethod
    def default_embedding(cls, extractor: FeatureExtractor) -> EmbeddingSpec:
        return EmbeddingSpec(layers=("layer2",))

    def fit(self, batches: Iterable[Tensor]) -> None:
        total = sum(batch.shape[0] for batch in batches)  # a first pass: batches must be re-iterable
        vectors = torch.cat([b.permute(0, 2, 3, 1).reshape(-1, b.shape[1]) for b in batches]).float().cpu()
        assert total > 0
        generator = torch.Generator().manual_seed(self.config.seed)
        if len(vectors) > self.config.bank_size:
            vectors = vectors[torch.randperm(len(vectors), generator=generator)[: self.config.bank_size]]
        self.bank = vectors

    def predict(self, embeddings: Tensor) -> DetectorOutput:
        b, c, h, w = embeddings.shape
        queries = embeddings.permute(0, 2, 3, 1).reshape(-1, c).float().cpu()
        maps = torch.cdist(queries, self.bank).min(dim=1).values.reshape(b, h, w)
        return DetectorOutput(maps, maps.flatten(1).max(dim=1).values)

    def state_dict(self) -> dict[str, Tensor]:
        return {"bank": self.bank}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.bank = state["bank"]


@pytest.fixture(scope="module")
def detector() -> Iterator[BankConfig]:
    register_detector(TEST_DETECTOR, BankConfig, BankDetector)
    yield BankConfig()
    DETECTORS._items.pop(TEST_DETECTOR)


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return build_backbone(BackboneConfig(name="tiny-cnn"))


def make(detector: BankConfig, extractor: FeatureExtractor, **options: object) -> HiAD:
    config = strategy_config({"name": "hiad", "patch_size": 32, "low_res_size": 32, **options})
    strategy = build_strategy(config, detector, extractor)
    assert isinstance(strategy, HiAD)
    return strategy


def noise_images(count: int, height: int, width: int, seed: int, std: float = 0.1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        np.clip(0.5 + rng.normal(0, std, (height, width, 3)), 0, 1).astype(np.float32) for _ in range(count)
    ]


def stripes(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    rows = (np.arange(height)[:, None, None] // 4) % 2
    base = 0.15 + 0.7 * rows * np.ones((1, width, 3))
    return np.clip(base + rng.normal(0, 0.03, (height, width, 3)), 0, 1).astype(np.float32)


def flat(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    base = np.array([0.8, 0.3, 0.2])[None, None] * np.ones((height, width, 1))
    return np.clip(base + rng.normal(0, 0.03, (height, width, 3)), 0, 1).astype(np.float32)


# ---------------------------------------------------------------------------- fusion geometry


def test_window_sampling_equals_upsample_then_crop() -> None:
    torch.manual_seed(0)
    level_map = torch.randn(5, 6, 8)  # level-1 map, 4-pixel cells, of a 48 x 64 level-0 image
    level = LevelMap(level_map, ratio_y=0.5, ratio_x=0.5, cell=4.0)
    upsampled = F.interpolate(level_map[None], scale_factor=2, mode="bilinear", align_corners=False)[0]
    corners = [(0, 0), (16, 8), (32, 48), (16, 32)]  # includes the bottom-right border patch
    windows = sample_patch_windows(level, corners, grid_h=4, grid_w=4, cell0=4.0)
    for (y, x), window in zip(corners, windows, strict=True):
        expected = upsampled[:, y // 4 : y // 4 + 4, x // 4 : x // 4 + 4]
        torch.testing.assert_close(window, expected, rtol=1e-5, atol=1e-5)


def test_fused_patch_features_are_the_weighted_sum_of_upsampled_levels() -> None:
    def embed(images: Tensor) -> Tensor:  # a tile-local "backbone": 4 x 4 average pooling
        return F.avg_pool2d(images, 4)

    torch.manual_seed(1)
    image = torch.rand(1, 3, 64, 48)
    weights = (0.25, 0.75)
    fusion = MultiResolutionFusion(embed, patch=16, stride=16, rates=(0, 1), weights=weights, batch_size=3)
    positions, fused = fusion.all_patches(image)
    level0 = embed(image)[0]  # 16 x 12 cells
    level1 = embed(resize(image, (32, 24)))  # 8 x 6 cells
    up1 = F.interpolate(level1, scale_factor=2, mode="bilinear", align_corners=False)[0]
    full = weights[0] * level0 + weights[1] * up1
    assert len(positions) == 4 * 3
    for position, feature in zip(positions, fused, strict=True):
        expected = full[:, position.y // 4 : position.y // 4 + 4, position.x // 4 : position.x // 4 + 4]
        torch.testing.assert_close(feature, expected, rtol=1e-5, atol=1e-5)
    # rate 0 alone is plain tiling
    plain = MultiResolutionFusion(embed, 16, 16, (0,), (1.0,)).all_patches(image)[1]
    torch.testing.assert_close(plain[5], level0[:, 4:8, 8:12])


def test_automatic_rates_and_weights() -> None:
    assert auto_fusion_rates(2048, 2048) == (0, 1)
    assert auto_fusion_rates(4096, 4096) == (0, 1, 2)
    assert auto_fusion_rates(1000, 1500) == (0,)
    assert auto_fusion_rates(64, 64) == (0,)
    assert resolve_fusion(None, None, 4096, 4096, 1024) == ((0, 1, 2), (1 / 3, 1 / 3, 1 / 3))
    assert resolve_fusion((1, 0), (0.3, 0.7), 64, 64, 1024) == ((0, 1), (0.7, 0.3))
    with pytest.raises(ConfigError, match="sum to 1"):
        HiADConfig(fusion_rates=(0, 1), fusion_weights=(0.5, 0.6))
    with pytest.raises(ConfigError, match="one weight per rate"):
        HiADConfig(fusion_rates=(0, 1), fusion_weights=(1.0,))
    with pytest.raises(ConfigError, match="including 0"):
        HiADConfig(fusion_rates=(1, 2))
    with pytest.raises(ConfigError):
        resolve_fusion(None, (0.5, 0.5), 64, 64, 1024)  # auto picks one rate, two weights given


# ---------------------------------------------------------------------------- assignment


def test_neighbourhoods_are_contiguous_blocks() -> None:
    quadrants = neighbourhood_labels(4, 4, 4).reshape(4, 4)
    np.testing.assert_array_equal(quadrants, [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    np.testing.assert_array_equal(neighbourhood_labels(2, 3, 3).reshape(2, 3), [[0, 1, 2], [0, 1, 2]])
    odd = neighbourhood_labels(3, 3, 5).reshape(3, 3)  # no 5-block layout fits: serpentine runs
    assert sorted(np.unique(odd)) == [0, 1, 2, 3, 4]
    from scipy import ndimage

    for label in range(5):
        assert ndimage.label(odd == label)[1] == 1  # each neighbourhood is one connected block
    with pytest.raises(ConfigError):
        neighbourhood_labels(2, 2, 5)


def test_sca_groups_positions_with_the_same_texture() -> None:
    rng = np.random.default_rng(0)
    texture = np.array([[0, 1, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1], [1, 0, 0, 1]]).reshape(-1)
    prototypes = rng.normal(size=(2, 16)) * 5
    descriptors = [prototypes[texture] + rng.normal(0, 0.3, size=(16, 16)) for _ in range(6)]
    fitted = fit_assignment("sca", 2, (4, 4), descriptors, seed=0)
    labels = fitted.assign(np.arange(16), None)
    assert fitted.count == 2
    assert (labels == texture).all() or (labels == 1 - texture).all()
    assert (fit_assignment("a2o", 9, (4, 4), descriptors).assign(np.arange(16), None) == 0).all()
    np.testing.assert_array_equal(
        fit_assignment("o2o", 9, (4, 4), descriptors).assign(np.arange(16), None), np.arange(16)
    )
    with pytest.raises(ConfigError, match="larger than the 16 patch positions"):
        fit_assignment("sca", 17, (4, 4), descriptors)


def test_ra_assigns_each_patch_to_its_nearest_centroid() -> None:
    rng = np.random.default_rng(2)
    centres = np.array([[0.0, 0.0, 10.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    kinds = rng.integers(0, 3, size=(5, 12))
    descriptors = [centres[k] + rng.normal(0, 0.5, size=(12, 3)) for k in kinds]
    fitted = fit_assignment("ra", 3, (3, 4), descriptors, seed=0)
    assert fitted.count == 3 and fitted.centroids is not None
    train_labels = np.concatenate([fitted.assign(np.arange(12), d) for d in descriptors])
    for kind in range(3):  # each true group lands in exactly one cluster, a different one per group
        assert len(np.unique(train_labels[kinds.reshape(-1) == kind])) == 1
    assert len(np.unique(train_labels)) == 3
    probe = centres + rng.normal(0, 0.5, size=(3, 3))
    expected = [train_labels[kinds.reshape(-1) == kind][0] for kind in range(3)]
    np.testing.assert_array_equal(fitted.assign(np.zeros(3), probe), expected)
    brute = np.array([np.argmin([np.sum((p - c) ** 2) for c in fitted.centroids]) for p in probe])
    np.testing.assert_array_equal(nearest_centroid(probe, fitted.centroids), brute)
    restored = Assignment.from_state("ra", fitted.state_dict())
    np.testing.assert_array_equal(restored.assign(np.zeros(3), probe), expected)


# ---------------------------------------------------------------------------- strategy


def test_config_errors(detector: BankConfig, extractor: FeatureExtractor) -> None:
    with pytest.raises(ConfigError, match="not a multiple of the embedding stride 8"):
        make(detector, extractor, patch_size=36)
    with pytest.raises(ConfigError, match="stride"):
        HiADConfig(patch_size=32, stride=40)
    strategy = make(detector, extractor, assignment="sca", num_detectors=5, low_branch=False)
    with pytest.raises(ConfigError, match="larger than the 4 patch positions"):
        strategy.fit(noise_images(2, 64, 64, 0))


def test_calibration_makes_a_quiet_detector_comparable_to_a_noisy_one(
    detector: BankConfig, extractor: FeatureExtractor
) -> None:
    """Left patch: strong texture (large raw distances); right patch: quiet texture. A defect in
    the quiet half is invisible in a max over raw maps and the top of the calibrated one."""

    def product(rng: np.random.Generator) -> np.ndarray:
        image = np.full((64, 128, 3), 0.5, dtype=np.float32)
        image[:, :64] += rng.normal(0, 0.2, (64, 64, 3)).astype(np.float32)
        image[:, 64:] += rng.normal(0, 0.01, (64, 64, 3)).astype(np.float32)
        return np.clip(image, 0, 1)

    rng = np.random.default_rng(3)
    train, validation = [product(rng) for _ in range(10)], [product(rng) for _ in range(6)]
    # context 0: the halves are two textures by construction; a context margin would show the
    # noisy half to the quiet patch's border features, which is not what this test is about
    strategy = make(detector, extractor, patch_size=64, assignment="o2o", low_branch=False, context=0)
    strategy.fit(train)
    assert strategy.detector_count == 2
    strategy.calibrate(validation)
    assert strategy.calibration is not None
    left_range, right_range = strategy.calibration.range("high.0"), strategy.calibration.range("high.1")
    assert left_range[0] > 5 * right_range[0]  # the raw scales differ by far
    test = product(rng)
    test[24:40, 88:104] = np.clip(test[24:40, 88:104] + 0.1, 0, 1)  # a faint defect, quiet half
    raw = strategy.raw_outputs(test)
    assert float(raw.patch_maps[1].max()) < left_range[1]  # raw: below what the left calls normal
    result = strategy.predict(test)
    calibrated_defect = result.anomaly_map[28:36, 92:100].mean()
    assert calibrated_defect > result.anomaly_map[:, :64].max()  # calibrated: the top of the map
    assert result.anomaly_map.min() >= 0 and result.anomaly_map.max() <= 1
    good = strategy.predict(product(rng))
    assert result.score > good.score


@pytest.mark.parametrize("shared", [True, False])
def test_a_detector_no_pseudo_anomaly_reached_does_not_light_its_normal_patches(
    detector: BankConfig, extractor: FeatureExtractor, monkeypatch: pytest.MonkeyPatch, shared: bool
) -> None:
    """Two detectors over one texture (o2o, two patches); the held-out copies get a pseudo-anomaly
    in the left patch only. The paper's rule (shared=False) scales the right detector by its
    largest normal score, so a good image's right half reaches 1; the shared peak keeps both
    halves of a good image on one scale, below the left's anomalous response."""

    def left_square(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        pasted, mask = image.copy(), np.zeros(image.shape[:2], dtype=bool)
        mask[20:44, 20:44] = True
        pasted[mask] = 1.0
        return pasted, mask

    monkeypatch.setattr("hrad.strategies.hiad.strategy.paste_pseudo_anomalies", left_square)
    strategy = make(
        detector, extractor, patch_size=64, assignment="o2o", low_branch=False, context=0, shared_anomaly_peak=shared
    )
    strategy.fit(noise_images(8, 64, 128, seed=11))
    strategy.calibrate(noise_images(2, 64, 128, seed=12))
    assert strategy.calibration is not None
    left, right = strategy.calibration.range("high.0"), strategy.calibration.range("high.1")
    good = strategy.predict(noise_images(1, 64, 128, seed=13)[0]).anomaly_map
    right_over_left = float(good[:, 64:].max() / good[:, :64].max())
    if shared:
        assert right[1] == left[1]
        assert 0.5 < right_over_left < 2 and good.max() < 0.7
    else:
        assert right[1] < 0.5 * left[1]
        assert right_over_left > 2 and good[:, 64:].max() > 0.7


@pytest.mark.gpu
def test_on_cuda_a_pool_that_answers_on_the_cpu_predicts_as_on_the_cpu(detector: BankConfig) -> None:
    """The pool's maps are gathered on the features' device and read back once per chunk; a
    detector answering on the CPU (as the test bank here, or a faiss-cpu index) is moved there."""
    images = noise_images(4, 64, 96, seed=21)
    results = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        extractor = build_backbone(BackboneConfig(name="tiny-cnn")).to(device)
        strategy = make(detector, extractor, assignment="na", num_detectors=2)
        strategy.fit(images[:2])
        strategy.calibrate(images[2:3])
        results.append(strategy.predict(images[3]))
    # cuDNN may use TF32 convolutions: equal to rounding of the calibrated [0, 1] maps, not bits
    np.testing.assert_allclose(results[1].anomaly_map, results[0].anomaly_map, rtol=0, atol=1e-2)
    assert results[1].score == pytest.approx(results[0].score, abs=1e-2)


def _synchronising_calls(run: Callable[[], T]) -> tuple[T, list[str]]:
    """``run()`` under torch's CUDA sync debug mode: its result and the warning of each call that
    made the host wait for the device (a plain ``.to(cuda)`` of a host array is one)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return result, [str(warning.message) for warning in caught if "synchroniz" in str(warning.message)]


@pytest.mark.gpu
def test_on_cuda_predict_waits_for_the_device_only_for_its_result() -> None:
    """On CUDA the whole predict is queued and the host waits at its end only: the image's copy
    there, the finished map's copy back and the score are its only synchronising calls (torch's
    sync debug mode warns at each; a plain ``.to(cuda)`` of a host array is one), and the map is
    the host path's."""
    from hrad.detectors.destseg import DeSTSegConfig

    torch.manual_seed(0)
    extractor = build_backbone(BackboneConfig(name="tiny-cnn")).to("cuda")
    config = strategy_config({"name": "hiad", "patch_size": 32, "low_res_size": 32, "assignment": "na", "num_detectors": 2, "fusion_rates": (0, 1)})
    strategy = build_strategy(config, DeSTSegConfig(student_epochs=1, segmentation_epochs=1), extractor)
    assert isinstance(strategy, HiAD)
    strategy.fit(noise_images(4, 64, 96, seed=4))
    strategy.calibrate(noise_images(2, 64, 96, seed=5))
    image = noise_images(1, 64, 96, seed=8)[0]
    strategy.predict(image)  # the first: the pool's networks move to the device, constants are copied once
    result, waits = _synchronising_calls(lambda: strategy.predict(image))
    assert len(waits) <= 3, waits
    strategy.device_maps = False
    expected = strategy.predict(image)
    np.testing.assert_allclose(result.anomaly_map, expected.anomaly_map, rtol=0, atol=1e-4)
    assert result.score == pytest.approx(expected.score, abs=1e-4)


@pytest.mark.gpu
def test_on_cuda_a_model_predict_waits_for_the_device_once_more_than_the_image_copy() -> None:
    """AnomalyModel.predict of HiAD-DeSTSeg on CUDA, with border ratios, a region and the top-fraction
    score: the strategy's map stays on the device and the model finishes it there
    (hrad.postprocess.device_maps.smooth_and_score), so the image's copy there and the finished
    map's and score's one copy back are its only synchronising calls; the map and score are the
    host path's (the strategy's map copied back and finished on the host)."""
    import dataclasses

    from hrad.config import ModelConfig
    from hrad.model import AnomalyModel
    from hrad.postprocess.roi import RegionOfInterest

    torch.manual_seed(0)
    config = ModelConfig(
        backbone=BackboneConfig(name="tiny-cnn"),
        detector={"name": "destseg", "student_epochs": 1, "segmentation_epochs": 1},  # type: ignore[arg-type]
        strategy=strategy_config({"name": "hiad", "patch_size": 32, "low_res_size": 32, "assignment": "na", "num_detectors": 2, "fusion_rates": (0, 1)}),
        device="cuda",
    )
    config.postprocess = config.postprocess.model_copy(update={"image_score": "top-fraction", "top_fraction": 0.01})
    model = AnomalyModel(config).fit(noise_images(6, 64, 96, seed=4))
    assert model.thresholds is not None and model._on_device()
    model.thresholds = dataclasses.replace(model.thresholds, border_ratios=[1.6, 1.3, 1.1])
    mask = np.ones((64, 96), dtype=bool)
    mask[:, 80:] = False
    model.roi = RegionOfInterest(mask)
    image = noise_images(1, 64, 96, seed=8)[0]
    model.predict(image)  # the first: networks moved, border factors and the region copied once
    result, waits = _synchronising_calls(lambda: model.predict(image))
    assert len(waits) <= 2, waits
    model.device_postprocess = False
    model.strategy.device_maps = False  # type: ignore[attr-defined]
    expected = model.predict(image)
    np.testing.assert_allclose(result.anomaly_map, expected.anomaly_map, rtol=0, atol=1e-4)
    assert result.score == pytest.approx(expected.score, abs=1e-4)


@pytest.fixture(scope="module")
def fitted(detector: BankConfig, extractor: FeatureExtractor) -> HiAD:
    strategy = make(
        detector, extractor, assignment="na", num_detectors=2, return_branch_maps=True, fusion_rates=(0, 1)
    )
    strategy.fit(noise_images(6, 64, 96, seed=4))
    strategy.calibrate(noise_images(2, 64, 96, seed=5))
    return strategy


def test_final_map_is_the_max_of_calibrated_branches(fitted: HiAD) -> None:
    image = noise_images(1, 64, 96, seed=6)[0]
    image[10:20, 70:80] = 0.0
    no_blur = fitted.config.model_copy(update={"smoothing_sigma": 0.0, "score_sigma": 0.0})
    strategy = HiAD(no_blur, fitted.detector_config, fitted.extractor)
    strategy.load_state(DictStateReader(fitted.state_dict()))
    result = strategy.predict(image)
    high, low = result.extras["high_map"], result.extras["low_map"]
    assert high.shape == low.shape == result.anomaly_map.shape == (64, 96)
    np.testing.assert_array_equal(result.anomaly_map, np.maximum(high, low))
    assert low.min() >= 0 and low.max() <= 1 and high.min() >= 0 and high.max() <= 1
    # without branch maps the maximum is taken in place into the high map: same map and score
    lean = HiAD(no_blur.model_copy(update={"return_branch_maps": False}), fitted.detector_config, fitted.extractor)
    lean.load_state(DictStateReader(fitted.state_dict()))
    lean_result = lean.predict(image)  # the low map upsampled in bands, not whole: float32 rounding
    np.testing.assert_allclose(lean_result.anomaly_map, result.anomaly_map, rtol=0, atol=1e-6)
    assert lean_result.score == pytest.approx(result.score, abs=1e-6) and "high_map" not in lean_result.extras
    np.testing.assert_array_equal(result.extras["patch_detectors"], [[0, 0, 1], [0, 0, 1]])
    pooled = F.avg_pool2d(torch.from_numpy(result.anomaly_map)[None, None], 16, stride=1)
    assert result.score == pytest.approx(float(pooled.max()))
    # default: map returned unsmoothed (the model blurs it), score by the reference rule on sigma 4
    default = fitted.predict(image)
    np.testing.assert_array_equal(default.anomaly_map, result.anomaly_map)  # both keep the branch maps whole
    blurred = gaussian_smooth(default.anomaly_map, 4.0)
    reference = F.avg_pool2d(torch.from_numpy(blurred)[None, None], 16, stride=1).max()
    assert default.score == pytest.approx(float(reference))
    high_only = HiAD(
        no_blur.model_copy(update={"low_branch": False}), fitted.detector_config, fitted.extractor
    )
    high_only.fit(noise_images(6, 64, 96, seed=4))
    high_only.calibrate(noise_images(2, 64, 96, seed=5))
    alone = high_only.predict(image)
    assert alone.extras["low_map"] is None
    np.testing.assert_array_equal(alone.anomaly_map, alone.extras["high_map"])
    np.testing.assert_allclose(alone.anomaly_map, high, atol=1e-6)  # same high branch either way


@pytest.mark.parametrize("shape", [(64, 96), (10, 7), (37, 5)])
def test_banded_map_arithmetic_equals_the_whole_map_computation(shape: tuple[int, int]) -> None:
    """Score pooling, blurring and low-branch upsampling a band of rows at a time (any band
    height, pool larger than a side) equal the whole-map computation to float32 rounding."""
    rng = np.random.default_rng(11)
    values = rng.random(shape, dtype=np.float32)
    for pool in (1, 4, 16):
        expected = float(F.avg_pool2d(torch.from_numpy(values)[None, None], (min(pool, shape[0]), min(pool, shape[1])), stride=1).max())
        assert pooled_max(values, pool) == pytest.approx(expected, abs=1e-6)
        for rows in (1, 3, pool, pool + 1, 1000):
            bands = (values[top : top + rows] for top in range(0, shape[0], rows))
            assert pooled_max_of_bands(bands, shape[0], pool) == pytest.approx(expected, abs=1e-6)
    for sigma in (0.0, 1.0, 4.0):
        whole = gaussian_smooth(values, sigma)
        for band_values in (shape[1], 5 * shape[1], 10**9):
            parts = list(blurred_bands(values, sigma, band_values))
            assert [top for top, _ in parts] == list(np.cumsum([0] + [len(rows) for _, rows in parts[:-1]]))
            np.testing.assert_allclose(np.concatenate([rows for _, rows in parts]), whole, rtol=0, atol=1e-6)
    in_place = values.copy()
    np.testing.assert_allclose(gaussian_smooth(in_place, 4.0, in_place=True), gaussian_smooth(values, 4.0), rtol=0, atol=1e-6)
    for small_shape in ((3, 4), (shape[0], 2), (1, 1), shape):
        small = rng.random(small_shape, dtype=np.float32)
        upsampled = resize(torch.from_numpy(small)[None, None], shape)[0, 0].numpy()
        for band_values in (shape[1], 3 * shape[1], None):
            target = values.copy()
            assert maximum_upsampled(target, small, band_values) is target
            np.testing.assert_allclose(target, np.maximum(values, upsampled), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="enlarges only"):
        maximum_upsampled(values.copy(), rng.random((shape[0] + 1, shape[1]), dtype=np.float32))


@pytest.mark.parametrize("size", [(14, 20), (9, 41), (30, 13), (60, 90), (29, 41), (3, 2)])
def test_resize_by_rows_equals_the_banded_resize(size: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrinking (antialiased), enlarging, mixed, the same height; bands of 2 source rows."""
    rng = np.random.default_rng(12)
    u8 = rng.integers(0, 255, (29, 41, 3), endpoint=True).astype(np.uint8)
    expected = resize_pixels(PixelImage(u8), size)
    monkeypatch.setattr(pixels_module, "ROW_BAND_PIXELS", 2 * 41)
    torch.testing.assert_close(resize_pixels_by_rows(PixelImage(u8), size), expected, rtol=0, atol=1e-6)
    starts, weights = resampling_weights(29, size[0], size[0] < 29 or size[1] < 41)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
    assert starts.min() >= 0 and starts.max() < 29


def test_lean_predict_equals_the_whole_map_computation(fitted: HiAD, monkeypatch: pytest.MonkeyPatch) -> None:
    """predict (patch maps merged a chunk at a time, the low map upsampled into the high map in
    bands, the score blurred and pooled in bands, levels resized by rows) against the
    straightforward computation from the same raw outputs: every map whole."""
    import hrad.hiad_math as hiad_math
    import hrad.postprocess.smoothing as smoothing
    import hrad.strategies.hiad.strategy as strategy_module

    image = noise_images(1, 64, 96, seed=8)[0]
    image[40:50, 20:30] = 1.0
    lean = HiAD(fitted.config.model_copy(update={"return_branch_maps": False}), fitted.detector_config, fitted.extractor)
    lean.load_state(DictStateReader(fitted.state_dict()))
    monkeypatch.setattr(hiad_math, "BAND_VALUES", 5 * 96)  # bands of 5 rows
    monkeypatch.setattr(smoothing, "_BAND_VALUES", 7 * 96)
    monkeypatch.setattr(strategy_module, "MERGE_CHUNK", 1)
    monkeypatch.setattr(pixels_module, "ROW_BAND_PIXELS", 3 * 96)
    result = lean.predict(image)
    raw = lean.raw_outputs(image)
    calibration = lean.calibration
    assert calibration is not None and raw.low_map is not None
    calibrated = torch.stack([
        normalize_range(patch_map, *calibration.range(f"high.{int(m)}")) for patch_map, m in zip(raw.patch_maps, raw.labels, strict=True)
    ])
    upsampled = resize(calibrated[:, None], (32, 32))[:, 0].numpy()
    total, count = np.zeros((64, 96)), np.zeros((64, 96))
    for position, tile_map in zip(raw.positions, upsampled, strict=True):
        total[position.y : position.y + 32, position.x : position.x + 32] += tile_map
        count[position.y : position.y + 32, position.x : position.x + 32] += 1
    low = resize(calibration.normalize("low", raw.low_map)[None, None], (64, 96))[0, 0].numpy()
    expected = np.maximum(total / count, low).astype(np.float32)
    np.testing.assert_allclose(result.anomaly_map, expected, rtol=0, atol=1e-6)
    blurred = gaussian_smooth(expected, lean.config.score_sigma)
    score = F.avg_pool2d(torch.from_numpy(blurred)[None, None], 16, stride=1).max()
    assert result.score == pytest.approx(float(score), abs=1e-6)
    # the level and low-branch images resized by rows: the raw outputs of the whole-image resize
    monkeypatch.setattr(fusion_module, "resize_pixels_by_rows", resize_pixels)  # levels and the low branch
    whole = lean.raw_outputs(image)
    torch.testing.assert_close(raw.patch_maps, whole.patch_maps, rtol=0, atol=1e-5)
    torch.testing.assert_close(raw.low_map, whole.low_map, rtol=0, atol=1e-5)


def _twins(strategy: HiAD, **update: object) -> tuple[HiAD, HiAD]:
    """Two copies of a fitted strategy (``update`` applied to the config): the host map path and
    the device path (forced on the CPU), from the same state."""
    copies = []
    for on_device in (False, True):
        copy = HiAD(strategy.config.model_copy(update=update), strategy.detector_config, strategy.extractor)
        copy.load_state(DictStateReader(strategy.state_dict()))
        copy.device_maps = on_device
        copies.append(copy)
    return copies[0], copies[1]


def _assert_same_result(host: HiAD, device: HiAD, image: np.ndarray) -> None:
    expected, result = host.predict(image), device.predict(image)
    np.testing.assert_allclose(result.anomaly_map, expected.anomaly_map, rtol=0, atol=2e-6)
    assert result.anomaly_map.dtype == np.float32 and result.anomaly_map.shape == image.shape[:2]
    assert result.score == pytest.approx(expected.score, abs=2e-6)
    np.testing.assert_array_equal(result.extras["patch_detectors"], expected.extras["patch_detectors"])
    for key in ("high_map", "low_map"):
        if expected.extras.get(key) is None:
            assert result.extras.get(key) is None
        else:
            np.testing.assert_allclose(result.extras[key], expected.extras[key], rtol=0, atol=2e-6)


@pytest.mark.parametrize(
    "update",
    [
        {},  # branch maps kept, unsmoothed, score blurred at sigma 4
        {"return_branch_maps": False, "smoothing_sigma": 4.0},  # one blur for map and score
        {"return_branch_maps": False, "smoothing_sigma": 1.5, "score_sigma": 0.0},
        {"low_branch": False},
    ],
)
def test_device_map_path_equals_the_host_path(fitted: HiAD, update: dict) -> None:
    """predict's map work in torch on the maps' device (what a GPU runs) against the host path it
    replaces there: same map, score, branch maps and patch detectors to float32 rounding."""
    image = noise_images(1, 64, 96, seed=8)[0]
    image[40:50, 20:30] = 1.0
    host, device = _twins(fitted, **update)
    _assert_same_result(host, device, image)


@pytest.mark.parametrize(
    "ratios",
    [
        [1.8, 1.4, 1.1],  # nearest-side ratios
        [[2.4, 1.9, 1.5, 1.3], [1.9, 1.5, 1.2, 1.1], [1.6, 1.3, 1.1, 1.0], [1.4, 1.2, 1.0, 1.0]],  # a corner table
    ],
)
def test_device_map_path_divides_the_low_border_and_averages_overlaps(
    detector: BankConfig, extractor: FeatureExtractor, ratios: list
) -> None:
    """Overlapping patches (averaged by the count of patches over each pixel), a retrieval pool
    (labels from the features, patches out of grid order) and the low branch's border ratios
    (applied on the device as a factor map, 1-D or a corner table) give the host path's results."""
    size = (128, 192)  # a 16 x 24 low map: deep enough for border ratios
    strategy = make(
        detector, extractor, assignment="ra", num_detectors=2, patch_size=64, stride=32, low_res_size=192, return_branch_maps=True
    )
    strategy.fit(noise_images(4, *size, seed=4))
    strategy.calibrate(noise_images(2, *size, seed=5))
    strategy._low_border = ratios
    image = noise_images(1, *size, seed=9)[0]
    image[5:12, 3:9] = 0.0
    host, device = _twins(strategy)
    assert host.low_border_ratios == device.low_border_ratios == ratios
    raw = device._device_outputs(image)
    assert raw.low_map is not None and tuple(raw.low_map.shape) == (16, 24)
    assert len(set(raw.labels)) == 2 and len(raw.positions) == 3 * 5
    _assert_same_result(host, device, image)
    # the raw outputs come back in grid order whatever order the pool scored the patches in
    ordered = device.raw_outputs(image)
    assert [p.index for p in ordered.positions] == list(range(len(ordered.positions)))
    np.testing.assert_array_equal(ordered.labels.reshape(ordered.grid.rows, ordered.grid.cols), raw.grid_labels())


def test_each_pool_detector_predicts_its_patches_together(fitted: HiAD, monkeypatch: pytest.MonkeyPatch) -> None:
    """A positional pool hands each detector its patches of the image in batches of batch_size,
    not one call per detector per chunk of the grid (a GPU pays a launch sequence per call)."""
    calls: list[int] = []
    original = BankDetector.predict

    def counted(self: BankDetector, embeddings: Tensor) -> DetectorOutput:
        calls.append(len(embeddings))
        return original(self, embeddings)

    monkeypatch.setattr(BankDetector, "predict", counted)
    raw = fitted._device_outputs(noise_images(1, 64, 96, seed=8)[0])
    per_detector = np.bincount(raw.labels)
    batch = fitted.config.batch_size
    expected = [min(batch, n - start) for n in per_detector for start in range(0, n, batch)] + [1]  # + the low branch
    assert calls == expected


def test_smoothing_at_the_score_sigma_blurs_once_and_keeps_the_score(fitted: HiAD) -> None:
    """With ``smoothing_sigma == score_sigma`` the smoothed map is the one pooled for the score:
    the map is the unsmoothed one blurred, the score the same as without smoothing."""
    image = noise_images(1, 64, 96, seed=8)[0]
    image[40:50, 20:30] = 1.0
    results = []
    for sigma in (0.0, fitted.config.score_sigma):
        config = fitted.config.model_copy(update={"return_branch_maps": False, "smoothing_sigma": sigma})
        strategy = HiAD(config, fitted.detector_config, fitted.extractor)
        strategy.load_state(DictStateReader(fitted.state_dict()))
        results.append(strategy.predict(image))
    plain, smoothed = results
    expected = gaussian_smooth(plain.anomaly_map, fitted.config.score_sigma)
    np.testing.assert_allclose(smoothed.anomaly_map, expected, rtol=0, atol=1e-6)
    assert smoothed.score == pytest.approx(plain.score, abs=1e-6)


def calibrated_with_low_profile(
    detector: BankConfig, extractor: FeatureExtractor, size: tuple[int, int], **options: object
) -> tuple[HiAD, list[np.ndarray], BorderProfile]:
    """An A2O HiAD with a low branch fitted and calibrated on noise images of ``size``, its
    held-out images, and the border profile of their raw low maps (what calibrate learns from)."""
    held = noise_images(2, *size, seed=5)
    strategy = make(detector, extractor, assignment="a2o", patch_size=64, low_res_size=192, return_branch_maps=True, **options)
    strategy.fit(noise_images(4, *size, seed=4))
    strategy.calibrate(held)
    profile = BorderProfile()
    for image in held:
        low_map = strategy.raw_outputs(image).low_map
        assert low_map is not None
        profile.update(low_map.numpy())
    return strategy, held, profile


def test_low_branch_is_divided_by_its_own_border_ratios(detector: BankConfig, extractor: FeatureExtractor) -> None:
    """calibrate learns the low branch's border ratios from the good held-out images' raw low maps
    (not their pseudo-anomaly copies), takes the low range from the divided maps of both, and
    predict divides before the min-max; the ratios travel in the state; an artifact without them
    (saved before this calibration) and ``low_border_calibration=False`` divide nothing."""
    size = (128, 192)  # a 16 x 24 low map: deep enough for a border profile
    # the min-max range itself is checked below (the balance widens one branch's afterwards)
    strategy, held, profile = calibrated_with_low_profile(detector, extractor, size, balance_branches=False, low_border_corners=False)
    ratios = profile.ratios()
    assert ratios is not None and max(ratios) > 1.0
    assert strategy.low_border_ratios == pytest.approx(ratios)
    divided = []
    for index, image in enumerate(held):
        rng = np.random.default_rng([strategy.config.seed, index])
        for variant in (image, paste_pseudo_anomalies(image, rng)[0]):
            low_map = strategy.raw_outputs(variant).low_map
            assert low_map is not None
            divided.append(calibrate_border(low_map.numpy(), ratios))
    calibration = strategy.calibration
    assert calibration is not None
    assert calibration.range("low") == pytest.approx((min(m.min() for m in divided), max(m.max() for m in divided)))
    image = noise_images(1, *size, seed=6)[0]
    image[100:110, 170:180] = 0.0  # a defect near the corner
    raw_low = strategy.raw_outputs(image).low_map
    assert raw_low is not None
    expected = resize(calibration.normalize("low", torch.from_numpy(calibrate_border(raw_low.numpy().copy(), ratios)))[None, None], size)[0, 0]
    result = strategy.predict(image)
    np.testing.assert_allclose(result.extras["low_map"], expected.numpy(), rtol=0, atol=1e-6)
    # the state keeps the ratios; without them (an older artifact) the low map is not divided
    state = strategy.state_dict()
    restored = HiAD(strategy.config, strategy.detector_config, strategy.extractor)
    restored.load_state(DictStateReader(state))
    assert restored.low_border_ratios == pytest.approx(ratios)
    np.testing.assert_array_equal(restored.predict(image).anomaly_map, result.anomaly_map)
    older = HiAD(strategy.config, strategy.detector_config, strategy.extractor)
    older.load_state(DictStateReader({key: value for key, value in state.items() if key != "border.low"}))
    undivided = resize(calibration.normalize("low", raw_low)[None, None], size)[0, 0]
    assert older.low_border_ratios is None
    np.testing.assert_allclose(older.predict(image).extras["low_map"], undivided.numpy(), rtol=0, atol=1e-6)
    off = make(detector, extractor, assignment="a2o", patch_size=64, low_res_size=192, low_border_calibration=False)
    off.fit(noise_images(4, *size, seed=4))
    off.calibrate(held)
    assert off.low_border_ratios is None and "border.low" not in off.state_dict()


def test_low_branch_corner_ratios_are_learned_saved_and_old_lists_still_load(detector: BankConfig, extractor: FeatureExtractor) -> None:
    """``low_border_corners``: calibrate learns the low branch's ratios as the 2-D table of
    :meth:`BorderProfile.corner_ratios` over the good held-out images' raw low maps, predict
    divides by it, the state keeps the table; the stored ratios, not the option, decide how a
    loaded model divides, so a 1-D list saved before still divides as then."""
    size = (128, 192)  # a 16 x 24 low map
    strategy, _, profile = calibrated_with_low_profile(detector, extractor, size, low_border_corners=True)
    table, ratios = profile.corner_ratios(), profile.ratios()
    assert table is not None and ratios is not None
    np.testing.assert_allclose(strategy.low_border_ratios, table, rtol=1e-12)  # type: ignore[arg-type]
    image = noise_images(1, *size, seed=6)[0]
    raw_low = strategy.raw_outputs(image).low_map
    assert raw_low is not None
    calibration = strategy.calibration
    assert calibration is not None

    def low_divided_by(stored: object) -> np.ndarray:
        divided = calibrate_border(raw_low.numpy().copy(), stored)  # type: ignore[arg-type]
        return resize(calibration.normalize("low", torch.from_numpy(divided))[None, None], size)[0, 0].numpy()

    result = strategy.predict(image)
    np.testing.assert_allclose(result.extras["low_map"], low_divided_by(table), rtol=0, atol=1e-6)
    state = strategy.state_dict()
    assert state["border.low"].shape == (len(table), len(table))
    restored = HiAD(strategy.config, strategy.detector_config, strategy.extractor)
    restored.load_state(DictStateReader(state))
    np.testing.assert_array_equal(restored.predict(image).anomaly_map, result.anomaly_map)
    older = HiAD(strategy.config, strategy.detector_config, strategy.extractor)
    older.load_state(DictStateReader({**state, "border.low": torch.tensor(ratios, dtype=torch.float64)}))
    assert older.low_border_ratios == pytest.approx(ratios)
    np.testing.assert_allclose(older.predict(image).extras["low_map"], low_divided_by(ratios), rtol=0, atol=1e-6)
    with pytest.raises(ArtifactError, match="border.low"):
        older.load_state(DictStateReader({**state, "border.low": torch.ones(2, 3, dtype=torch.float64)}))


def test_branches_are_balanced_on_their_good_images_peaks(detector: BankConfig, extractor: FeatureExtractor) -> None:
    """calibrate widens the min-max range of the branch whose held-out good images score higher
    (mean of HiAD's score rule on each branch's calibrated map) until both branches' means agree;
    the other branch keeps its min-max range, and ``balance_branches=False`` keeps both."""
    size = (64, 96)
    held = noise_images(3, *size, seed=5)
    strategies = {}
    for balance in (False, True):
        strategy = make(detector, extractor, assignment="na", num_detectors=2, return_branch_maps=True, balance_branches=balance)
        strategy.fit(noise_images(6, *size, seed=4))
        strategy.calibrate(held)
        strategies[balance] = strategy

    def mean_peaks(strategy: HiAD) -> dict[str, float]:
        peaks: dict[str, list[float]] = {"high": [], "low": []}
        for image in held:
            extras = strategy.predict(image).extras
            for branch in peaks:
                blurred = gaussian_smooth(extras[f"{branch}_map"], strategy.config.score_sigma)
                pooled = F.avg_pool2d(torch.from_numpy(blurred)[None, None], strategy.config.score_pool, stride=1)
                peaks[branch].append(float(pooled.max()))
        return {branch: float(np.mean(values)) for branch, values in peaks.items()}

    before, after = mean_peaks(strategies[False]), mean_peaks(strategies[True])
    higher = max(before, key=lambda branch: before[branch])
    lower = "low" if higher == "high" else "high"
    assert before[higher] > 1.1 * before[lower]  # the two branches' good images peak apart
    assert after[higher] == pytest.approx(after[lower], rel=1e-4)
    assert after[lower] == pytest.approx(before[lower], rel=1e-5)
    plain, balanced = strategies[False].calibration, strategies[True].calibration
    assert plain is not None and balanced is not None
    widened = ["low"] if higher == "low" else ["high.0", "high.1"]
    for name in ["low", "high.0", "high.1"]:
        (low, high), (low_b, high_b) = plain.range(name), balanced.range(name)
        assert low_b == low
        if name in widened:
            assert high_b - low_b == pytest.approx((high - low) * before[higher] / before[lower], rel=1e-4)
        else:
            assert high_b == high


def test_prediction_never_depends_on_other_images(fitted: HiAD) -> None:
    images = noise_images(3, 64, 96, seed=7)
    first = fitted.predict(images[0])
    for other in images[1:]:
        fitted.predict(other)
    again = fitted.predict(images[0])
    np.testing.assert_array_equal(first.anomaly_map, again.anomaly_map)
    assert first.score == again.score


def test_state_round_trips_through_safetensors(fitted: HiAD, tmp_path) -> None:
    state = fitted.state_dict()
    prefixes = ("high.", "low.", "assignment.", "calibration.", "fusion.", "geometry.")
    assert all(key.startswith(prefixes) for key in state)
    assert {"high.0.bank", "high.1.bank", "low.bank", "assignment.labels", "calibration.low.min"} <= set(
        state
    )
    path = tmp_path / "weights.safetensors"
    save_file(state, str(path))

    class Reader:
        def __init__(self) -> None:
            self.handle = safe_open(str(path), framework="pt")
            self.loaded: list[str] = []

        def keys(self) -> list[str]:
            return list(self.handle.keys())

        def get(self, key: str) -> Tensor:
            self.loaded.append(key)
            return self.handle.get_tensor(key)

    reader = Reader()
    restored = HiAD(fitted.config, fitted.detector_config, fitted.extractor)
    restored.load_state(reader)
    assert not any(key.startswith("high.") for key in reader.loaded)  # detectors load lazily
    image = noise_images(1, 64, 96, seed=8)[0]
    expected, actual = fitted.predict(image), restored.predict(image)
    np.testing.assert_array_equal(expected.anomaly_map, actual.anomaly_map)
    assert expected.score == actual.score
    assert restored.fitted_image_size() == (64, 96)


def test_usage_errors(detector: BankConfig, extractor: FeatureExtractor, fitted: HiAD) -> None:
    strategy = make(detector, extractor, assignment="a2o", low_branch=False)
    with pytest.raises(ConfigError, match="fit"):
        strategy.calibrate(noise_images(1, 64, 64, 0))
    strategy.fit(noise_images(2, 64, 64, 0))
    with pytest.raises(ConfigError, match="calibrate"):
        strategy.predict(noise_images(1, 64, 64, 0)[0])
    with pytest.raises(InputError, match="at least one held-out"):
        strategy.calibrate([])
    with pytest.raises(InputError, match="image is 80x64 but the model was fitted on 96x64 images"):  # width x height
        fitted.predict(noise_images(1, 64, 80, 0)[0])
    with pytest.raises(InputError, match="training image 1"):
        make(detector, extractor, assignment="o2o").fit(
            noise_images(1, 64, 64, 0) + noise_images(1, 32, 64, 0)
        )


def test_sca_and_ra_separate_two_textures(detector: BankConfig, extractor: FeatureExtractor) -> None:
    """Single category with two textures at fixed places (SCA) and two unlabeled categories (RA)."""
    rng = np.random.default_rng(9)

    def product() -> np.ndarray:  # left two patch columns striped, right two flat
        image = stripes(64, 128, rng)
        image[:, 64:] = flat(64, 64, rng)
        return image

    sca = make(detector, extractor, assignment="sca", num_detectors=2, low_branch=False)
    sca.fit([product() for _ in range(4)])
    labels = sca.raw_outputs(product()).labels.reshape(2, 4)
    assert (labels[:, :2] == labels[0, 0]).all() and (labels[:, 2:] == 1 - labels[0, 0]).all()

    categories = [stripes(64, 64, rng) for _ in range(4)] + [flat(64, 64, rng) for _ in range(4)]
    order = rng.permutation(len(categories))
    ra = make(detector, extractor, assignment="ra", num_detectors=2, low_branch=False)
    ra.fit([categories[i] for i in order])  # mixed, no labels
    assert ra.fitted_image_size() is None
    striped = ra.raw_outputs(stripes(64, 64, rng)).labels
    plain = ra.raw_outputs(flat(64, 64, rng)).labels
    assert len(set(striped)) == 1 and len(set(plain)) == 1 and striped[0] != plain[0]
    # RA ignores positions: a differently sized image works
    assert len(ra.raw_outputs(flat(96, 64, rng)).labels) == 6


def test_parallel_fit_equals_serial(detector: BankConfig, extractor: FeatureExtractor) -> None:
    train, validation = noise_images(4, 64, 64, seed=10), noise_images(2, 64, 64, seed=11)
    results = []
    for workers in (0, 2):
        strategy = make(detector, extractor, assignment="o2o", workers=workers, fusion_rates=(0, 1))
        strategy.fit(train)
        strategy.calibrate(validation)
        results.append((strategy.state_dict(), strategy.predict(validation[0])))
    (serial_state, serial), (parallel_state, parallel) = results
    assert serial_state.keys() == parallel_state.keys()
    for key in serial_state:
        torch.testing.assert_close(serial_state[key], parallel_state[key], rtol=0, atol=0)
    np.testing.assert_array_equal(serial.anomaly_map, parallel.anomaly_map)


def test_through_anomaly_model_save_and_load(detector: BankConfig, tmp_path) -> None:
    from hrad.config import ModelConfig
    from hrad.model import AnomalyModel

    config = ModelConfig(
        backbone=BackboneConfig(name="tiny-cnn"),
        detector=detector,
        strategy=strategy_config(
            {"name": "hiad", "patch_size": 32, "low_res_size": 32, "assignment": "sca", "num_detectors": 2}
        ),
        device="cpu",
    )
    model = AnomalyModel(config).fit(noise_images(10, 64, 64, seed=12))  # 2 of them held out
    assert model.strategy.calibration is not None  # type: ignore[attr-defined]
    image = noise_images(1, 64, 64, seed=13)[0]
    expected = model.predict(image)
    restored = AnomalyModel.load(model.save(tmp_path / "hiad-model"))
    actual = restored.predict(image)
    np.testing.assert_array_equal(expected.anomaly_map, actual.anomaly_map)
    assert expected.score == actual.score


def test_fit_refuses_when_nothing_is_held_out_for_calibration(detector: BankConfig) -> None:
    """Two images with a 20% hold-out leave none to calibrate on: a clear error before fitting,
    not a model that fits and then cannot predict."""
    from hrad.config import ModelConfig
    from hrad.errors import InputError
    from hrad.model import AnomalyModel

    config = ModelConfig(
        backbone=BackboneConfig(name="tiny-cnn"),
        detector=detector,
        strategy=strategy_config({"name": "hiad", "patch_size": 32, "low_res_size": 32, "num_detectors": 1}),
        device="cpu",
    )
    with pytest.raises(InputError, match=r"'hiad' calibrates on held-out good images.*2 training image"):
        AnomalyModel(config).fit(noise_images(2, 64, 64, seed=14))
