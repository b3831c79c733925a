"""Image-space synthetic anomalies (hrad.data.anomalies) and their way to the detectors: exact mask
and blend math, the packed training batches the strategies hand over, RealNet on them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import ClassVar, Literal

import numpy as np
import pytest
import torch
from torch import Tensor

from hrad.config import BackboneConfig
from hrad.data.anomalies import (
    AnomalyRule,
    AnomalySynthesiser,
    blend,
    cell_fractions,
    jitter,
    perlin_mask,
    perlin_noise,
)
from hrad.detectors import detector_config
from hrad.detectors.base import (
    DETECTORS,
    Detector,
    DetectorConfig,
    DetectorOutput,
    register_detector,
    unpack_anomalies,
)
from hrad.detectors.realnet import RealNet, RealNetConfig
from hrad.errors import ConfigError, InputError
from hrad.features import build_backbone
from hrad.features.base import EmbeddingSpec, FeatureExtractor
from hrad.strategies.base import (
    AnomalyResult,
    DictStateReader,
    ImageSource,
    ProgressCallback,
    StateReader,
    Strategy,
    StrategyConfig,
    build_strategy,
    no_progress,
    strategy_config,
)
from hrad.strategies.tiled import TiledStrategy, prepare_image

pytestmark = pytest.mark.usefixtures("one_thread")

RECORDER = "test-image-anomalies"


# --------------------------------------------------------------------------- the math
def test_cell_fractions_equal_the_brute_force_area_of_every_cell() -> None:
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 10, 14, generator=generator) < 0.3
    for grid in ((3, 4), (5, 7), (10, 14), (4, 3)):
        # brute force: repeat every pixel grid-many times, so every cell is a whole block
        fine = masks.repeat_interleave(grid[0], dim=1).repeat_interleave(grid[1], dim=2).double()
        blocks = fine.view(3, grid[0], 10, grid[1], 14).mean(dim=(2, 4))
        assert torch.allclose(cell_fractions(masks, grid).double(), blocks, atol=1e-6)
    assert torch.equal(cell_fractions(masks, (10, 14)), masks.float())  # one pixel per cell


def test_perlin_noise_is_zero_on_the_lattice_and_bounded() -> None:
    noise = perlin_noise(32, 48, (4, 3), torch.Generator().manual_seed(1))
    # pixel i sits at lattice coordinate i * periods / size: multiples of 8 rows and 16 columns
    assert noise.shape == (32, 48)
    assert torch.equal(noise[::8, ::16], torch.zeros(4, 3))
    assert float(noise.abs().max()) <= 1 and float(noise.std()) > 0.05


def test_perlin_mask_covers_the_drawn_fraction_of_its_region_only() -> None:
    generator = torch.Generator().manual_seed(2)
    mask = perlin_mask(40, 50, (20, 20), 0.1, generator, region=(5, 6, 30, 40))
    assert mask.dtype == torch.bool and int(mask.sum()) == 120  # round(0.1 * 30 * 40)
    assert int(mask[5:35, 6:46].sum()) == 120
    whole = perlin_mask(40, 50, (20, 20), 0.001, generator)
    assert int(whole.sum()) == 2  # round(0.001 * 2000)


def test_blend_is_draems_paste_inside_and_the_image_outside() -> None:
    generator = torch.Generator().manual_seed(3)
    image, donor = torch.rand(2, 3, 6, 5, generator=generator)
    mask = torch.rand(6, 5, generator=generator) < 0.5
    out = blend(image, donor, mask, 0.3)
    assert torch.equal(out[:, ~mask], image[:, ~mask])
    assert torch.allclose(out[:, mask], 0.3 * image[:, mask] + 0.7 * donor[:, mask])


def test_jittered_donor_has_no_wrap_seam() -> None:
    """Flips and monotone colour maps keep a ramp monotone along every row and column; a shift
    with wrap-around (the donor's former roll) would put a max-to-min step inside it."""
    rows, cols = torch.meshgrid(torch.arange(12.0), torch.arange(16.0), indexing="ij")
    ramp = (0.1 + 0.4 * rows / 11 + 0.4 * cols / 15).expand(3, 12, 16)
    generator = torch.Generator().manual_seed(5)
    for _ in range(20):
        donor = jitter(ramp, generator)
        assert donor.shape == ramp.shape and 0 <= float(donor.min()) <= float(donor.max()) <= 1
        for steps in (donor.diff(dim=1), donor.diff(dim=2)):
            # each row / column of each channel only rises or only falls
            dim = 1 if steps.shape[1] == 11 else 2
            assert bool(((steps >= 0).all(dim=dim) | (steps <= 0).all(dim=dim)).all())
        assert not torch.equal(donor, ramp)


def test_synthesiser_is_seeded_and_pastes_inside_the_mask_only() -> None:
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    first = AnomalySynthesiser(7, (0.05, 0.2), 0.0, (32, 32))
    corrupted, masks = first(images, (4, 4, 24, 24))
    again, again_masks = AnomalySynthesiser(7, (0.05, 0.2), 0.0, (32, 32))(images, (4, 4, 24, 24))
    assert torch.equal(corrupted, again) and torch.equal(masks, again_masks)
    other, _ = AnomalySynthesiser(8, (0.05, 0.2), 0.0, (32, 32))(images, (4, 4, 24, 24))
    assert not torch.equal(other, corrupted)
    changed = (corrupted != images).any(dim=1)
    assert not bool((changed & ~masks).any())  # nothing outside the masks
    assert not bool(masks[:, :4].any() or masks[:, :, 28:].any())  # nothing outside the region
    counts = masks.sum(dim=(1, 2)).tolist()
    assert all(29 <= count <= 115 for count in counts)  # 5-20 % of 576 pixels
    clean, clean_masks = AnomalySynthesiser(7, (0.05, 0.2), 1.0, (32, 32))(images)
    assert torch.equal(clean, images) and not bool(clean_masks.any())


# --------------------------------------------------------------------------- plumbing
class RecorderConfig(DetectorConfig):
    name: str = RECORDER
    synthesis: Literal["feature", "image"] = "image"


class Recorder(Detector[RecorderConfig]):
    """Keeps every training batch (packed with anomalies when its config asks for them)."""

    batches: ClassVar[list[Tensor]] = []

    @classmethod
    def default_embedding(cls, extractor: FeatureExtractor) -> EmbeddingSpec:
        return EmbeddingSpec(layers=("layer2",))

    @classmethod
    def image_anomalies(cls, config: DetectorConfig) -> AnomalyRule | None:
        assert isinstance(config, RecorderConfig)
        return AnomalyRule(config.seed, (0.05, 0.2), 0.0) if config.synthesis == "image" else None

    def fit(self, batches: Iterable[Tensor]) -> None:
        Recorder.batches.extend(batch.clone() for batch in batches)
        self.channels = Recorder.batches[-1].shape[1]

    def predict(self, embeddings: Tensor) -> DetectorOutput:
        maps = embeddings.mean(dim=1)
        return DetectorOutput(maps=maps, scores=maps.flatten(1).amax(1))

    def state_dict(self) -> dict[str, Tensor]:
        return {"channels": torch.tensor(self.channels)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.channels = int(state["channels"])


@pytest.fixture(scope="module")
def recorder() -> Iterator[None]:
    register_detector(RECORDER, RecorderConfig, Recorder)
    yield
    DETECTORS._items.pop(RECORDER)


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return build_backbone(BackboneConfig(name="tiny-cnn"))


def images(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((64, 96, 3)).astype(np.float32) for _ in range(count)]


@pytest.mark.usefixtures("recorder")
def test_tiled_strategy_hands_anomalous_embeddings_with_the_pasted_masks(extractor: FeatureExtractor) -> None:
    Recorder.batches.clear()
    config = strategy_config({"name": "tiled", "tile": 32, "context": 8, "batch_size": 4})
    strategy = build_strategy(config, RecorderConfig(seed=3), extractor)
    assert isinstance(strategy, TiledStrategy)
    train = images(2, 0)
    strategy.fit(train)
    # the same stream by hand: the windows of both images in fit order, through one synthesiser
    synthesiser = AnomalySynthesiser(3, (0.05, 0.2), 0.0, (32, 32))
    expected = []
    for image in train:
        tensor = prepare_image(image, strategy._working_size, False)
        grid, tiles = strategy._tiles(*tensor.shape[-2:])
        margin = grid.margin
        assert margin > 0
        for _, windows in grid.batches(grid.pad(tensor), 4):
            corrupted, masks = synthesiser(windows, (margin, margin, 32, 32))
            inside = masks[:, margin : margin + 32, margin : margin + 32]
            assert int(inside.sum()) == int(masks.sum()) > 0  # pasted inside the tiles only
            expected.append((tiles(windows), tiles(corrupted), inside))
    assert len(Recorder.batches) == len(expected) == 4  # 2 x 3 tiles per image, batches of 4
    for batch, (clean, anomalous, inside) in zip(Recorder.batches, expected, strict=True):
        got_clean, got_anomalous, fractions = unpack_anomalies(batch)
        assert torch.equal(got_clean, clean) and torch.equal(got_anomalous, anomalous)
        # tiny-cnn layer2: stride 8, so every token is an 8 x 8 pixel cell of the tile
        blocks = inside.float().view(-1, 4, 8, 4, 8).mean(dim=(2, 4))
        assert fractions.shape == blocks.shape and torch.allclose(fractions, blocks)
        assert not torch.equal(got_anomalous, got_clean)


@pytest.mark.usefixtures("recorder")
def test_hiad_hands_every_pool_detector_and_the_low_branch_packed_rows(extractor: FeatureExtractor) -> None:
    Recorder.batches.clear()
    config = strategy_config(
        {"name": "hiad", "patch_size": 32, "low_res_size": 32, "assignment": "o2o", "fusion_rates": [0]}
    )
    strategy = build_strategy(config, RecorderConfig(), extractor)
    strategy.fit(images(2, 1))
    # o2o: one detector per patch position (2 x 3), one batch per image; then the low branch
    assert len(Recorder.batches) == 7 * 2
    patches = Recorder.batches[:12]
    for batch in patches:
        clean, anomalous, fractions = unpack_anomalies(batch)
        assert batch.shape[1] == 2 * clean.shape[1] + 1 and fractions.shape == (1, 4, 4)
        assert float(fractions.sum()) == 0 or not torch.equal(clean, anomalous)
    # the patches tile the 64 x 96 image exactly (16 tokens of 8 x 8 pixels each): their fractions
    # add up to the image's mask area, which the low branch's grid over the whole image sees too
    for image_index in range(2):
        patch_area = sum(float(unpack_anomalies(b)[2].sum()) * 64 for b in patches[image_index::2])
        low = unpack_anomalies(Recorder.batches[12 + image_index])[2]
        assert low.shape == (1, 3, 4) and patch_area > 0  # the 24 x 32 low image, stride 8
        assert patch_area == pytest.approx(float(low.sum()) * 64 * 96 / 12, rel=1e-5)


@pytest.mark.usefixtures("recorder")
def test_the_tiled_ensemble_spills_packed_rows_per_location(extractor: FeatureExtractor) -> None:
    Recorder.batches.clear()
    config = strategy_config({"name": "tiled-ensemble", "tile": 32, "context": 0, "batch_size": 2})
    strategy = build_strategy(config, RecorderConfig(), extractor)
    strategy.fit(images(2, 4))
    assert len(Recorder.batches) == 6  # one detector per tile location, both images in one batch
    areas = []
    for batch in Recorder.batches:
        clean, anomalous, fractions = unpack_anomalies(batch)
        assert clean.shape[0] == 2 and fractions.shape == (2, 4, 4)
        assert float(fractions.min()) >= 0 and float(fractions.max()) <= 1
        areas.append(fractions.sum(dim=(1, 2)))
    # every tile got its own mask of 5-20 % of its 32 x 32 pixels (16 tokens of 64 pixels)
    covered = torch.stack(areas) * 64
    assert bool(((covered >= 51) & (covered <= 205)).all())


class NoSynthesis(Strategy):
    """A strategy that does not make image-space anomalies (the contract's default)."""

    def fit(self, images: ImageSource, progress: ProgressCallback = no_progress) -> None:
        raise NotImplementedError

    def predict(self, image: np.ndarray) -> AnomalyResult:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state(self, reader: StateReader) -> None:
        raise NotImplementedError


@pytest.mark.usefixtures("recorder")
def test_strategies_without_image_synthesis_and_detectors_without_the_option_refuse(
    extractor: FeatureExtractor,
) -> None:
    config = StrategyConfig(name="custom")
    with pytest.raises(ConfigError, match="custom strategy cannot make image-space anomalies for"):
        NoSynthesis(config, RecorderConfig(), extractor)
    NoSynthesis(config, RecorderConfig(synthesis="feature"), extractor)
    with pytest.raises(ConfigError, match="patchcore has no synthesis option"):
        detector_config({"name": "patchcore", "synthesis": "image"})
    realnet = RealNet(RealNetConfig(synthesis="image"))
    with pytest.raises(InputError, match="realnet synthesis=image trains on"):
        realnet.fit([torch.randn(2, 12, 8, 8)])


REALNET = {
    "name": "realnet",
    "synthesis": "image",
    "epochs": 2,
    "reconstruction_channels": 8,
    "discriminator_channels": 8,
    "residual_channels": 4,
    "reconstruction_stages": 0,
    "aspp_rates": (1,),
}


def test_realnet_on_image_anomalies_is_seeded_and_round_trips(extractor: FeatureExtractor) -> None:
    config = strategy_config({"name": "downsample", "image_size": 64})
    train, test = images(3, 2), images(1, 3)[0]
    fitted = []
    for seed in (0, 0, 1):
        strategy = build_strategy(config, detector_config({**REALNET, "seed": seed}), extractor)
        strategy.fit(train)
        fitted.append(strategy)
    first, again, other = (strategy.state_dict() for strategy in fitted)
    assert first.keys() == again.keys() and all(torch.equal(first[key], again[key]) for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in first)
    history = fitted[0].training_history()
    assert [len(losses) for losses in history.values()] == [2]
    loaded = build_strategy(config, detector_config(REALNET), extractor)
    loaded.load_state(DictStateReader(first))
    expected, got = fitted[0].predict(test), loaded.predict(test)
    assert np.array_equal(expected.anomaly_map, got.anomaly_map) and expected.score == got.score
    # feature synthesis on the same images trains another model
    feature = build_strategy(config, detector_config({**REALNET, "synthesis": "feature"}), extractor)
    feature.fit(train)
    assert not np.array_equal(feature.predict(test).anomaly_map, expected.anomaly_map)


def test_destseg_trains_on_image_anomalies_through_the_same_hook(extractor: FeatureExtractor) -> None:
    config = strategy_config({"name": "downsample", "image_size": 64})
    options = {"name": "destseg", "student_epochs": 1, "segmentation_epochs": 1, "student_stages": 1}
    options |= {"student_channels": 8, "segmentation_channels": 8, "aspp_rates": (1,), "layers": ("layer2", "layer3")}
    strategy = build_strategy(config, detector_config({**options, "synthesis": "image"}), extractor)
    strategy.fit(images(3, 5))
    assert sorted(strategy.training_history()) == ["segmentation", "student"]
    result = strategy.predict(images(1, 6)[0])
    assert result.anomaly_map.shape == (64, 96) and np.isfinite(result.anomaly_map).all()
