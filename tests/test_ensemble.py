"""Tiled ensemble: merging against brute force, bounded residency, state round trips, errors."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

import hrad.features  # noqa: F401  (registers tiny-cnn)
from hrad.detectors.base import DETECTORS, Detector, DetectorConfig, DetectorOutput, register_detector
from hrad.errors import ArtifactError, ConfigError, InputError
from hrad.features.base import BackboneConfig, Embedder, EmbeddingSpec, FeatureExtractor, build_backbone
from hrad.postprocess.seams import smooth_seams
from hrad.strategies import STRATEGIES, strategy_config
from hrad.strategies.base import DictStateReader, to_tensor
from hrad.strategies.ensemble import TiledEnsemble, TiledEnsembleConfig

DETECTOR = "test-position-stats"
HEIGHT, WIDTH = 56, 72  # not a multiple of the grid: exercises the shifted last row and column


class PositionStatsConfig(DetectorConfig):
    name: str = DETECTOR


class PositionStatsDetector(Detector[PositionStatsConfig]):
    """Per-position mean/std of the embedding; counts its live instances (per process)."""

    live: ClassVar[int] = 0
    peak_live: ClassVar[int] = 0

    def __init__(self, config: PositionStatsConfig) -> None:
        super().__init__(config)
        cls = type(self)
        cls.live += 1
        cls.peak_live = max(cls.peak_live, cls.live)

    def __del__(self) -> None:
        type(self).live -= 1

    @classmethod
    def default_embedding(cls, extractor: FeatureExtractor) -> EmbeddingSpec:
        return EmbeddingSpec(layers=("layer1",))

    def fit(self, batches: Iterable[Tensor]) -> None:
        stacked = torch.cat(list(batches)).double()
        self.mean = stacked.mean(0).float()
        self.std = (stacked.std(0, unbiased=False) + 1e-3).float()

    def predict(self, embeddings: Tensor) -> DetectorOutput:
        z = (embeddings - self.mean) / self.std
        maps = z.pow(2).mean(1).sqrt()
        return DetectorOutput(maps=maps, scores=maps.flatten(1).amax(1))

    def state_dict(self) -> dict[str, Tensor]:
        return {"mean": self.mean, "std": self.std}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.mean, self.std = state["mean"], state["std"]


@pytest.fixture(scope="module", autouse=True)
def position_detector() -> Iterator[None]:
    register_detector(DETECTOR, PositionStatsConfig, PositionStatsDetector)
    yield
    DETECTORS._items.pop(DETECTOR)


@pytest.fixture(scope="module")
def backbone() -> FeatureExtractor:
    return build_backbone(BackboneConfig(name="tiny-cnn"))


def noise_images(count: int, seed: int, height: int = HEIGHT, width: int = WIDTH) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        np.clip(0.5 + 0.05 * rng.standard_normal((height, width, 3)), 0, 1).astype(np.float32)
        for _ in range(count)
    ]


def make(backbone: FeatureExtractor, **options: object) -> TiledEnsemble:
    config = TiledEnsembleConfig(
        **{"tile": 32, "stride": 16, "seam_smoothing": False, "batch_size": 3, **options}
    )
    return TiledEnsemble(config, PositionStatsConfig(), backbone)


@pytest.fixture(scope="module")
def train() -> list[np.ndarray]:
    return noise_images(5, seed=1)


@pytest.fixture(scope="module")
def fitted(backbone: FeatureExtractor, train: list[np.ndarray]) -> TiledEnsemble:
    strategy = make(backbone)
    strategy.fit(train)
    return strategy


def reloaded(strategy: TiledEnsemble, backbone: FeatureExtractor, **options: object) -> TiledEnsemble:
    other = make(backbone, **options)
    other.load_state(DictStateReader(strategy.state_dict()))
    return other


def brute_force(
    backbone: FeatureExtractor, train: list[np.ndarray], image: np.ndarray, margin: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Per-location detectors fitted by hand, maps averaged pixel by pixel; returns map and tile scores.

    Tiles start every 16 pixels, the last row/column shifted to end at the image border; each is
    embedded with ``margin`` pixels of context (reflected past the image border) that are cropped
    off the embedding (layer1: 4 pixels per cell).
    """
    tile, stride = 32, 16
    rows = int(np.ceil((HEIGHT - tile) / stride)) + 1
    cols = int(np.ceil((WIDTH - tile) / stride)) + 1

    def window(img: np.ndarray, y: int, x: int) -> Tensor:
        reflected = np.pad(img, ((margin, margin), (margin, margin), (0, 0)), mode="reflect")
        return to_tensor(reflected[y : y + tile + 2 * margin, x : x + tile + 2 * margin])

    cells = margin // 4
    embedder = Embedder(backbone, EmbeddingSpec(layers=("layer1",)))

    def embed(batch: Tensor) -> Tensor:
        embedded = embedder(batch)
        return embedded[..., cells : embedded.shape[-2] - cells, cells : embedded.shape[-1] - cells]

    total = np.zeros((HEIGHT, WIDTH))
    count = np.zeros((HEIGHT, WIDTH))
    scores = []
    for row in range(rows):
        for col in range(cols):
            y, x = min(row * stride, HEIGHT - tile), min(col * stride, WIDTH - tile)
            detector = PositionStatsDetector(PositionStatsConfig())
            detector.fit([embed(torch.cat([window(img, y, x) for img in train]))])
            output = detector.predict(embed(window(image, y, x)))
            upsampled = F.interpolate(
                output.maps[:, None], size=(tile, tile), mode="bilinear", align_corners=False
            )
            for dy in range(tile):
                for dx in range(tile):
                    total[y + dy, x + dx] += float(upsampled[0, 0, dy, dx])
                    count[y + dy, x + dx] += 1
            scores.append(float(output.scores[0]))
    return total / count, np.array(scores)


def test_registered_and_config_validated() -> None:
    assert "tiled-ensemble" in STRATEGIES
    config = strategy_config({"name": "tiled-ensemble", "tile": 64, "stride": 32, "image_size": 128})
    assert isinstance(config, TiledEnsembleConfig) and config.tile_stride == 32
    with pytest.raises(ConfigError, match="stride 40 is larger than the tile 32"):
        TiledEnsembleConfig(tile=32, stride=40)
    with pytest.raises(ConfigError, match="image_size 16 is smaller than the tile 32"):
        TiledEnsembleConfig(tile=32, image_size=16)


def test_overlapping_tiles_merge_like_brute_force(
    fitted: TiledEnsemble, backbone: FeatureExtractor, train: list[np.ndarray]
) -> None:
    image = noise_images(1, seed=7)[0]
    assert fitted.tiles.margin == backbone.default_context == 16  # the backbone's default context
    expected_map, expected_scores = brute_force(backbone, train, image, margin=16)
    result = fitted.predict(image)
    assert len(fitted.grid) == 12 and result.anomaly_map.shape == (HEIGHT, WIDTH)
    assert result.anomaly_map.dtype == np.float32
    np.testing.assert_allclose(result.anomaly_map, expected_map, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.extras["tile_scores"], expected_scores, rtol=1e-5)
    assert result.score == pytest.approx(expected_scores.mean(), rel=1e-5)

    maximum = reloaded(fitted, backbone, score_merge="max").predict(image)
    assert maximum.score == pytest.approx(expected_scores.max(), rel=1e-5)
    np.testing.assert_array_equal(maximum.anomaly_map, result.anomaly_map)


def test_context_margin_tiles_merge_like_brute_force(backbone: FeatureExtractor, train: list[np.ndarray]) -> None:
    strategy = make(backbone, context=8)
    assert strategy.tiles.margin == 8 and strategy.tiles.crop_cells == 2
    strategy.fit(train)
    image = noise_images(1, seed=7)[0]
    expected_map, expected_scores = brute_force(backbone, train, image, margin=8)
    result = strategy.predict(image)
    np.testing.assert_allclose(result.anomaly_map, expected_map, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.extras["tile_scores"], expected_scores, rtol=1e-5)


def test_seam_smoothing_applies_band_blur_to_merged_map(
    fitted: TiledEnsemble, backbone: FeatureExtractor
) -> None:
    image = noise_images(1, seed=8)[0]
    raw = fitted.predict(image).anomaly_map
    smoothed = reloaded(fitted, backbone, seam_smoothing=True, seam_band=0.25, seam_sigma=1.5).predict(image)
    grid = fitted.grid
    np.testing.assert_allclose(smoothed.anomaly_map, smooth_seams(raw, grid, 0.25, 1.5), rtol=1e-5, atol=1e-6)
    assert not np.allclose(smoothed.anomaly_map, raw)


def test_defect_is_localised_and_raises_the_score(fitted: TiledEnsemble) -> None:
    clean = noise_images(1, seed=9)[0]
    spotted = clean.copy()
    spotted[30:38, 44:52] = [1.0, 0.0, 0.0]
    clean_result, spotted_result = fitted.predict_many([clean, spotted])
    y, x = np.unravel_index(np.argmax(spotted_result.anomaly_map), spotted_result.anomaly_map.shape)
    assert 24 <= y < 44 and 38 <= x < 58
    assert spotted_result.score > clean_result.score


def test_predict_many_equals_predict_and_loads_each_model_once(fitted: TiledEnsemble) -> None:
    images = noise_images(3, seed=11)
    before = fitted.models_loaded
    batch = fitted.predict_many(images)
    assert fitted.models_loaded - before == len(fitted.grid)
    for image, result in zip(images, batch, strict=True):
        single = fitted.predict(image)
        np.testing.assert_allclose(result.anomaly_map, single.anomaly_map, rtol=1e-6, atol=1e-7)
        assert result.score == pytest.approx(single.score, rel=1e-6)


def test_locations_share_backbone_batches(fitted: TiledEnsemble, backbone: FeatureExtractor) -> None:
    """The windows of several locations (and images) fill each backbone call up to batch_size;
    results equal one image at a time, and predict_batch is predict_many."""
    strategy = reloaded(fitted, backbone, batch_size=5)
    calls: list[int] = []
    embed = strategy.tiles.embedder

    def counting(windows: Tensor) -> Tensor:
        calls.append(len(windows))
        return embed(windows)

    strategy.tiles.embedder = counting  # type: ignore[assignment]
    images = noise_images(2, seed=12)
    tiles = len(strategy.grid)
    assert tiles == 12
    single = strategy.predict(images[0])
    # one image: 5 locations per group (12 = 5 + 5 + 2), each group one backbone call
    assert calls == [5, 5, 2]
    calls.clear()
    batch = strategy.predict_batch(images)
    # two images: 2 locations x 2 images per group, the last group 4 windows as well
    assert calls == [4] * 6 and sum(calls) == tiles * len(images)
    np.testing.assert_allclose(batch[0].anomaly_map, single.anomaly_map, rtol=1e-5, atol=1e-6)
    assert batch[0].score == pytest.approx(single.score, rel=1e-5)
    for image, result in zip(images, batch, strict=True):
        expected = fitted.predict(image)  # batch_size 3: other groups, same maps
        np.testing.assert_allclose(result.anomaly_map, expected.anomaly_map, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.extras["tile_scores"], expected.extras["tile_scores"], rtol=1e-5)


def test_only_one_tile_model_resident_during_fit_and_predict(backbone: FeatureExtractor) -> None:
    train = noise_images(3, seed=2, height=96, width=96)  # 25 overlapping tiles
    strategy = make(backbone)
    PositionStatsDetector.peak_live = PositionStatsDetector.live
    baseline = PositionStatsDetector.live
    strategy.fit(train)
    assert len(strategy.grid) == 25
    assert PositionStatsDetector.peak_live - baseline == 1
    assert strategy.max_resident_models == 1 and strategy.resident_models == 0
    assert PositionStatsDetector.live == baseline

    strategy.max_resident_models = 0
    strategy.predict_many(noise_images(2, seed=3, height=96, width=96))
    strategy.predict(noise_images(1, seed=4, height=96, width=96)[0])
    assert PositionStatsDetector.peak_live - baseline == 1
    assert strategy.max_resident_models == 1 and PositionStatsDetector.live == baseline


def test_resident_tiles_cache_keeps_models_between_predictions(
    fitted: TiledEnsemble, backbone: FeatureExtractor
) -> None:
    cached = reloaded(fitted, backbone, resident_tiles=12)
    image = noise_images(1, seed=5)[0]
    first = cached.predict(image)
    loaded = cached.models_loaded
    second = cached.predict(image)
    assert loaded == 12 and cached.models_loaded == 12 and cached.resident_models == 12
    np.testing.assert_array_equal(first.anomaly_map, second.anomaly_map)
    small = reloaded(fitted, backbone, resident_tiles=4)
    small.predict(image)
    assert small.max_resident_models == 4


class RecordingReader(DictStateReader):
    def __init__(self, state: dict[str, Tensor]) -> None:
        super().__init__(state)
        self.requested: list[str] = []

    def get(self, key: str) -> Tensor:
        self.requested.append(key)
        return super().get(key)


class SafetensorsReader:
    """A lazy reader like the artifact's: tensors are read from the file on demand."""

    def __init__(self, path: Path) -> None:
        self.handle = safe_open(str(path), framework="pt")

    def keys(self) -> list[str]:
        return list(self.handle.keys())

    def get(self, key: str) -> Tensor:
        return self.handle.get_tensor(key)


def test_state_round_trip_reproduces_predictions_and_loads_lazily(
    fitted: TiledEnsemble, backbone: FeatureExtractor, tmp_path: Path
) -> None:
    image = noise_images(1, seed=12)[0]
    expected = fitted.predict(image)
    state = fitted.state_dict()
    assert {key.split(".")[1] for key in state if key.startswith("tiles.")} == {str(i) for i in range(12)}

    reader = RecordingReader(state)
    restored = make(backbone)
    restored.load_state(reader)
    assert restored.fitted_image_size() == (HEIGHT, WIDTH)
    assert not any(key.startswith("tiles.") for key in reader.requested)  # nothing loaded yet
    result = restored.predict(image)
    np.testing.assert_array_equal(result.anomaly_map, expected.anomaly_map)
    assert result.score == expected.score
    tile_order = [int(key.split(".")[1]) for key in reader.requested if key.startswith("tiles.")]
    assert tile_order == sorted(tile_order) and len(tile_order) == 2 * 12  # mean + std per tile, in turn

    path = tmp_path / "weights.safetensors"
    fitted.save_state_to(path, metadata={"format": "test"})
    written = load_file(path)
    assert written.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(written[key], value), key
    streamed = make(backbone)
    streamed.load_state(SafetensorsReader(path))
    np.testing.assert_array_equal(streamed.predict(image).anomaly_map, expected.anomaly_map)


def test_two_workers_fit_the_same_models_as_one(
    fitted: TiledEnsemble, backbone: FeatureExtractor, train: list[np.ndarray]
) -> None:
    parallel = make(backbone, workers=2)
    parallel.fit(train)
    serial_state, parallel_state = fitted.state_dict(), parallel.state_dict()
    assert serial_state.keys() == parallel_state.keys()
    for key, value in serial_state.items():
        assert torch.equal(parallel_state[key], value), key
    image = noise_images(1, seed=13)[0]
    np.testing.assert_array_equal(parallel.predict(image).anomaly_map, fitted.predict(image).anomaly_map)


def test_image_size_resizes_every_input_back_to_its_own_resolution(
    backbone: FeatureExtractor, train: list[np.ndarray]
) -> None:
    strategy = make(backbone, image_size=64, stride=32)
    strategy.fit(train)
    assert strategy.working_size == (64, 64) and len(strategy.grid) == 4
    assert strategy.fitted_image_size() is None  # not bound to one input size
    for height, width in [(40, 50), (90, 70), (HEIGHT, WIDTH)]:
        result = strategy.predict(noise_images(1, seed=14, height=height, width=width)[0])
        assert result.anomaly_map.shape == (height, width) and np.isfinite(result.anomaly_map).all()
    aspect = make(backbone, image_size=64, keep_aspect=True)
    aspect.fit(train)
    assert aspect.working_size == (50, 64)


@pytest.mark.parametrize("mode", ["tile", "image"])
def test_minmax_normalization_from_validation_images(
    fitted: TiledEnsemble, backbone: FeatureExtractor, mode: str
) -> None:
    strategy = reloaded(fitted, backbone, normalization=mode, seam_smoothing=mode == "image")
    validation = noise_images(4, seed=20)
    with pytest.raises(ConfigError, match=f"normalization '{mode}' needs calibrate"):
        strategy.predict(validation[0])
    strategy.calibrate(validation)
    results = strategy.predict_many(validation)
    maps = np.stack([r.anomaly_map for r in results])
    assert maps.min() >= -1e-6 and maps.max() <= 1 + 1e-6
    if mode == "image":
        assert maps.min() == pytest.approx(0, abs=1e-6) and maps.max() == pytest.approx(1, abs=1e-6)
        scores = [r.score for r in results]
        assert min(scores) == pytest.approx(0, abs=1e-9) and max(scores) == pytest.approx(1, abs=1e-9)
    else:
        tile_scores = np.stack([r.extras["tile_scores"] for r in results])
        np.testing.assert_allclose(tile_scores.min(0), 0, atol=1e-6)
        np.testing.assert_allclose(tile_scores.max(0), 1, atol=1e-6)
    again = reloaded(strategy, backbone, normalization=mode, seam_smoothing=mode == "image")
    np.testing.assert_array_equal(again.predict(validation[1]).anomaly_map, results[1].anomaly_map)


def test_zscore_image_normalization_standardises_validation_maps(
    fitted: TiledEnsemble, backbone: FeatureExtractor
) -> None:
    strategy = reloaded(fitted, backbone, normalization="image", normalization_stat="zscore")
    validation = noise_images(3, seed=21)
    strategy.calibrate(validation)
    maps = np.stack([r.anomaly_map for r in strategy.predict_many(validation)]).astype(np.float64)
    assert maps.mean() == pytest.approx(0, abs=1e-4) and maps.std() == pytest.approx(1, abs=1e-4)
    with pytest.raises(InputError, match="validation split is empty"):
        strategy.calibrate([])


def test_errors_are_one_clear_line(fitted: TiledEnsemble, backbone: FeatureExtractor) -> None:
    with pytest.raises(InputError, match=re.escape("image 30x20 is smaller than the tile 32x32")):
        make(backbone).fit(noise_images(2, seed=0, height=20, width=30))
    with pytest.raises(InputError, match=re.escape("image 50x40 differs from the fitted size 72x56")):
        fitted.predict(noise_images(1, seed=0, height=40, width=50)[0])
    with pytest.raises(InputError, match=re.escape("training image 1: image 60x56 differs from the fitted size 72x56 (set by training image 0): a tiled")):
        make(backbone).fit([noise_images(1, 0)[0], noise_images(1, 0, width=60)[0]])
    with pytest.raises(InputError, match="H x W x 3"):
        fitted.predict(np.zeros((HEIGHT, WIDTH), dtype=np.float32))

    state = {key: value for key, value in fitted.state_dict().items() if not key.startswith("tiles.5.")}
    with pytest.raises(ArtifactError, match=r"^tile model 5 missing from artifact$"):
        make(backbone).load_state(DictStateReader(state))
    other_geometry = TiledEnsemble(TiledEnsembleConfig(tile=32, stride=32), PositionStatsConfig(), backbone)
    with pytest.raises(ArtifactError, match="stride 16 but the config says 32px with stride 32"):
        other_geometry.load_state(DictStateReader(fitted.state_dict()))
    for error in (InputError, ArtifactError):
        assert "\n" not in str(error)
