"""MRF-AD strategy: geometry, kNN banks, fusion, foreground masking, state, memory reduction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import textured_image, with_spot
from scipy import ndimage

from hrad.config import load_config
from hrad.detectors.base import DetectorConfig
from hrad.detectors.knn import IVF_POINTS_PER_LIST
from hrad.errors import ArtifactError, ConfigError
from hrad.features import BackboneConfig, build_backbone
from hrad.features.tiny import TinyViT
from hrad.model import AnomalyModel
from hrad.postprocess.foreground import PCAForegroundMasker, border_ring
from hrad.strategies import build_strategy, strategy_config
from hrad.strategies.base import DictStateReader
from hrad.strategies.mrf import (
    MRFStrategy,
    bank_bytes_estimate,
    build_index,
    default_layers,
    fuse_maps,
    image_coreset,
    scaled_size,
    search,
    working_size,
)

DETECTOR = DetectorConfig(name="unused")  # mrf owns its banks and ignores the detector section
SMALL = {"name": "mrf", "pixel_budget": None, "scales": (0.5, 1.0)}


def mrf(extractor=None, **options) -> MRFStrategy:
    extractor = extractor or build_backbone(BackboneConfig(name="tiny-vit"))
    strategy = build_strategy(strategy_config({**SMALL, **options}), DETECTOR, extractor)
    assert isinstance(strategy, MRFStrategy)
    return strategy


@pytest.fixture
def normals(rng: np.random.Generator) -> list[np.ndarray]:
    return [textured_image(rng, 84, 112) for _ in range(4)]


# -- geometry ----------------------------------------------------------------------------------


def test_default_layers_follow_the_paper_and_relative_depth() -> None:
    assert default_layers(TinyViT(depth=12)) == ("block7", "block9", "block11")
    assert default_layers(TinyViT(depth=4)) == ("block2", "block3", "block4")
    assert default_layers(build_backbone(BackboneConfig(name="tiny-cnn"))) == ("layer2", "layer3")


def test_working_size_keeps_aspect_and_budget_and_scales_round_to_the_patch() -> None:
    height, width = working_size(1000, 1500, 5_000_000)
    assert abs(height * width - 5_000_000) < 5_000
    assert abs(width / height - 1.5) < 1e-3
    for scale in (0.3, 0.7):
        size = scaled_size((height, width), scale, 14)
        assert size[0] % 14 == 0 and size[1] % 14 == 0
        assert abs(size[0] - scale * height) <= 7 and abs(size[1] - scale * width) <= 7


def test_bank_size_formula_for_the_defaults() -> None:
    # 300 images, ViT-S (384 dims), 3 layers, 5 scales: 47.6 GB float32 -> coreset needed for 24 GiB
    estimate = bank_bytes_estimate(300, 5_000_000, (0.3, 0.4, 0.5, 0.6, 0.7), 3, 384)
    assert 47.0e9 < estimate < 48.0e9


def test_config_sorts_scales_and_rejects_unknown_layers() -> None:
    assert strategy_config({"name": "mrf", "scales": (0.7, 0.3)}).scales == (0.3, 0.7)
    with pytest.raises(ConfigError, match="block9"):
        mrf(layers=("block9",))
    with pytest.raises(ConfigError):
        load_config(None, {"strategy": {"name": "mrf", "scales": []}})


# -- nearest neighbours --------------------------------------------------------------------------


def test_index_kind_follows_the_bank_size() -> None:
    nlist = 8
    config = strategy_config({"name": "mrf", "nlist": nlist, "nprobe": 8})
    generator = torch.Generator().manual_seed(0)
    threshold = IVF_POINTS_PER_LIST * nlist  # the knn module's own rule
    small = torch.randn(threshold - 1, 8, generator=generator)
    big = torch.randn(threshold, 8, generator=generator)
    assert (build_index(small, config).index_kind, build_index(big, config).index_kind) == ("exact", "ivf")
    forced = strategy_config({"name": "mrf", "index": "ivf", "nlist": 4})
    assert build_index(small, forced).index_kind == "ivf"
    exact = strategy_config({"name": "mrf", "index": "exact", "nlist": 4})
    assert build_index(big, exact).index_kind == "exact"


def test_big_training_sets_get_ivf_banks_and_report_them(normals: list[np.ndarray]) -> None:
    strategy = mrf(nlist=1, scales=(0.5, 1.0))  # 4 images x 48 patches at scale 1 >= 39 x nlist
    strategy.fit(normals)
    kinds = {(row["layer"], row["scale"]): row["index"] for row in strategy.bank_report}
    assert kinds[("block2", 1.0)] == "ivf" and kinds[("block2", 0.5)] == "ivf"
    strategy = mrf(nlist=2, scales=(0.5, 1.0))  # 192 >= 78 but 48 < 78
    strategy.fit(normals)
    kinds = {(row["layer"], row["scale"]): row["index"] for row in strategy.bank_report}
    assert kinds[("block4", 1.0)] == "ivf" and kinds[("block4", 0.5)] == "exact"


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_search_matches_brute_force(distance: str) -> None:
    generator = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(300, 12, generator=generator), torch.randn(50, 12, generator=generator)
    if distance == "cosine":
        bank, queries = torch.nn.functional.normalize(bank, dim=1), torch.nn.functional.normalize(queries, dim=1)
    config = strategy_config({"name": "mrf", "index": "exact", "distance": distance})
    index = build_index(bank, config)
    found = search(index, queries, distance)
    if distance == "l2":
        expected = torch.cdist(queries, bank).min(1).values
    else:
        expected = 1 - (queries @ bank.T).max(1).values
    torch.testing.assert_close(found, expected, atol=1e-4, rtol=1e-4)


# -- fusion ------------------------------------------------------------------------------------------


def test_mean_fusion_equals_averaging_individually_upsampled_maps() -> None:
    generator = torch.Generator().manual_seed(2)
    maps = [torch.rand(3, 4, generator=generator), torch.rand(3, 4, generator=generator), torch.rand(6, 8, generator=generator)]
    size = (30, 41)
    upsampled = [
        torch.nn.functional.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        for m in maps
    ]
    torch.testing.assert_close(fuse_maps(maps, size, "mean"), torch.stack(upsampled).mean(0))
    torch.testing.assert_close(fuse_maps(maps, size, "max"), torch.stack(upsampled).max(0).values)


def test_one_map_per_layer_and_scale_at_the_patch_grid(normals: list[np.ndarray]) -> None:
    strategy = mrf()
    strategy.fit(normals)
    maps = strategy.distance_maps(normals[0])
    assert set(maps) == {(layer, scale) for layer in ("block2", "block3", "block4") for scale in (0.5, 1.0)}
    for (_, scale), grid in maps.items():
        size = strategy.scale_sizes(84, 112)[scale]
        assert tuple(grid.shape) == (size[0] // 14, size[1] // 14)
    result = strategy.predict(normals[0])
    assert result.anomaly_map.shape == (84, 112) and result.anomaly_map.dtype == np.float32
    assert result.score == pytest.approx(float(result.anomaly_map.max()))
    # training images are in the banks: exact search finds them at distance 0
    # (up to the float16 rounding of the stored banks)
    assert max(float(grid.max()) for grid in maps.values()) < 1e-2
    other = strategy.distance_maps(textured_image(np.random.default_rng(11), 84, 112))
    assert min(float(grid.max()) for grid in other.values()) > 0.05
    report = result.extras["banks"]
    assert len(report) == 6 and {row["index"] for row in report} == {"exact"}
    assert report[0]["vectors"] == 4 * 3 * 4  # 4 images x (42x56 -> 3x4 patches)


def test_fused_map_finds_a_planted_anomaly(normals: list[np.ndarray]) -> None:
    strategy = mrf()
    strategy.fit(normals)
    image, mask = with_spot(textured_image(np.random.default_rng(9), 84, 112), 35, 56, 20)
    normal = strategy.predict(textured_image(np.random.default_rng(10), 84, 112))
    anomalous = strategy.predict(image)
    assert anomalous.score > 1.5 * normal.score
    peak = np.unravel_index(np.argmax(anomalous.anomaly_map), mask.shape)
    assert abs(peak[0] - 45) <= 14 and abs(peak[1] - 66) <= 14
    assert anomalous.anomaly_map[mask].mean() > 3 * anomalous.anomaly_map[~mask].mean()


# -- foreground ----------------------------------------------------------------------------------------


def object_image(rng: np.random.Generator, center: tuple[int, int], size: tuple[int, int] = (112, 140)) -> tuple[np.ndarray, np.ndarray]:
    """Bright noisy disk on a dark noisy background; returns the image and the disk mask."""
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]]
    disk = (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= 30**2
    gray = np.where(disk, 0.85, 0.1) + rng.normal(0, 0.03, size)
    return np.repeat(np.clip(gray, 0, 1)[..., None], 3, axis=2).astype(np.float32), disk


def test_pca_masker_covers_a_bright_object_on_a_dark_background(rng: np.random.Generator) -> None:
    extractor = build_backbone(BackboneConfig(name="tiny-vit"))

    def features(image: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(image.transpose(2, 0, 1))[None]
        return extractor.extract(tensor, ["block4"])["block4"][0]

    train = [object_image(rng, (56 + dy, 70 + dx))[0] for dy, dx in ((0, 0), (-10, 12), (8, -15), (5, 5))]
    masker = PCAForegroundMasker(dilation=0)
    masker.fit([features(image) for image in train])
    image, disk = object_image(rng, (50, 60))
    foreground = masker.mask(torch.from_numpy(image.transpose(2, 0, 1)), features(image)).numpy()
    truth = torch.nn.functional.avg_pool2d(torch.from_numpy(disk.astype(np.float32))[None], 14)[0].numpy()
    assert foreground.shape == truth.shape == (8, 10)
    assert foreground[truth > 0.9].all()  # patches fully on the object
    assert not foreground[truth < 0.1].any()  # patches fully on the background
    assert not foreground[border_ring(8, 10)].all()
    dilated = PCAForegroundMasker(dilation=1)
    dilated.mean, dilated.component = masker.mean, masker.component
    assert dilated.mask(torch.zeros(1), features(image)).sum() > foreground.sum()


def test_foreground_zeroes_background_patches_and_round_trips(rng: np.random.Generator) -> None:
    train = [object_image(rng, (56 + dy, 70 + dx))[0] for dy, dx in ((0, 0), (-10, 12), (8, -15), (5, 5))]
    strategy = mrf(foreground=True, scales=(1.0,))
    strategy.fit(train)
    image, disk = object_image(rng, (50, 60))
    image[5:20, 5:30] = [1.0, 0.0, 0.0]  # a red mark on the background: masked away
    grid = strategy.distance_maps(image)[("block4", 1.0)]
    truth = torch.nn.functional.avg_pool2d(torch.from_numpy(disk.astype(np.float32))[None], 14)[0]
    far_from_object = ~torch.from_numpy(ndimage.binary_dilation(truth.numpy() > 0, np.ones((3, 3), bool)))
    assert far_from_object.sum() > 20 and (grid[far_from_object] == 0).all()  # the mask dilates by one patch
    assert (grid[truth > 0.9] > 0).any()
    state = strategy.state_dict()
    assert {"foreground.mean", "foreground.component"} <= set(state)
    restored = mrf(foreground=True, scales=(1.0,))
    restored.load_state(DictStateReader(state))
    np.testing.assert_array_equal(restored.predict(image).anomaly_map, strategy.predict(image).anomaly_map)


# -- state and memory ------------------------------------------------------------------------------------


def test_state_round_trip_through_an_artifact(normals: list[np.ndarray], tmp_path) -> None:
    config = load_config(
        None,
        {"backbone": {"name": "tiny-vit"}, "detector": {"name": "test-gaussian"}, "strategy": SMALL, "device": "cpu"},
    )
    model = AnomalyModel(config).fit(normals[:3], validation=normals[3:])
    state = model.strategy.state_dict()
    assert {"banks.block2.0.5", "banks.block4.1"} <= set(state)
    assert state["banks.block2.0.5"].dtype == torch.float16
    image, _ = with_spot(normals[0], 20, 20, 12)
    expected = model.predict(image)
    model.save(tmp_path / "model")
    loaded = AnomalyModel.load(tmp_path / "model")
    again = loaded.predict(image)
    np.testing.assert_array_equal(again.anomaly_map, expected.anomaly_map)
    assert again.score == expected.score
    partial = DictStateReader({key: value for key, value in state.items() if key != "banks.block4.1"})
    with pytest.raises(ArtifactError, match="banks.block4.1"):
        mrf().load_state(partial)


def test_image_coreset_is_the_greedy_k_center_selection() -> None:
    generator = torch.Generator().manual_seed(3)
    points = torch.randn(300, 6, generator=generator)
    chosen = image_coreset(points, 25, seed=4)
    start = int(torch.randint(300, (1,), generator=torch.Generator().manual_seed(4)))
    expected = [start]
    for _ in range(24):  # brute force: the point farthest from everything chosen so far
        distances = torch.cdist(points, points[expected]).min(1).values
        expected.append(int(torch.argmax(distances)))
    assert chosen.tolist() == expected
    assert image_coreset(points, 400).tolist() == list(range(300))


def test_memory_cap_reduces_every_image_by_a_coreset(normals: list[np.ndarray]) -> None:
    full = mrf(max_bank_gib=None)
    full.fit(normals)
    # per image: 2 scales x 3 layers x (12 + 48 patches) ... float32 bytes of all banks, then half of it
    full_bytes = sum(bank.numel() * 4 for bank in full.banks.values())
    capped = mrf(max_bank_gib=full_bytes / 2 / 2**30)
    capped.fit(normals)
    assert capped.coreset_ratio == pytest.approx(0.5)
    for key, bank in capped.banks.items():
        per_image = len(full.banks[key]) // len(normals)
        assert len(bank) == len(normals) * int(np.ceil(0.5 * per_image))
        # each kept vector is one of the full bank's
        assert (bank[:, None] == full.banks[key][None]).all(-1).any(1).all()
    explicit = mrf(coreset_ratio=0.25)
    explicit.fit(normals)
    assert explicit.coreset_ratio == 0.25 and explicit.bank_report[0]["coreset_ratio"] == 0.25
