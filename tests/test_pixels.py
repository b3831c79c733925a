"""PixelImage's device-resident path (the pixels copied to the device once, regions converted
there) against the host path: the same float32 regions, bit for bit, for every pixel type the
readers produce, and the same predictions through a strategy. On the CPU the resident path is
forced (``resident=True``); on an accelerator it is the default."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hrad.strategies.pixels import PixelImage, resize_pixels, resize_pixels_by_rows


def pixel_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "uint8": rng.integers(0, 256, (13, 17, 3), dtype=np.uint8),
        "uint16": rng.integers(0, 65536, (13, 17, 3), dtype=np.uint16),
        "int16": rng.integers(-300, 3000, (13, 17, 3), dtype=np.int16),  # negatives clip to 0
        "bool": rng.random((13, 17, 3)) > 0.5,
        "float32": rng.random((13, 17, 3), dtype=np.float32),
        "float64": rng.random((13, 17, 3)),
    }


@pytest.mark.parametrize("kind", sorted(pixel_arrays()))
def test_resident_regions_equal_the_host_conversion(kind: str) -> None:
    pixels = pixel_arrays()[kind]
    host, resident = PixelImage(pixels), PixelImage(pixels, resident=True)
    assert host._resident is None and resident._resident is not None
    for box in [(0, 13, 0, 17), (2, 9, 5, 16), (10, 13, 0, 3), (4, 20, 8, 25)]:  # the last passes the pixels
        expected = host.region(*box)
        got = resident.region(*box)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert torch.equal(got, expected), (kind, box)
    assert float(resident.tensor().min()) >= 0.0 and float(resident.tensor().max()) <= 1.0
    # zero-extended views keep the device copy and agree with the host view
    view_host, view_resident = host.zero_extended((16, 20)), resident.zero_extended((16, 20))
    assert view_resident._resident is resident._resident and view_resident.shape == (3, 16, 20)
    assert torch.equal(view_resident.tensor(), view_host.tensor())
    with pytest.raises(ValueError, match="cannot pad"):
        resident.zero_extended((12, 17))


@pytest.mark.parametrize("size", [(6, 8), (26, 9), (13, 40)])
def test_resident_resizes_equal_the_host_resizes(size: tuple[int, int]) -> None:
    pixels = pixel_arrays()["uint8"]
    host, resident = PixelImage(pixels), PixelImage(pixels, resident=True)
    assert torch.equal(resize_pixels(resident, size), resize_pixels(host, size))
    assert torch.equal(resize_pixels_by_rows(resident, size), resize_pixels_by_rows(host, size))


def test_cpu_images_are_not_copied_by_default() -> None:
    assert PixelImage(pixel_arrays()["uint8"], "cpu")._resident is None


@pytest.mark.parametrize("strategy", [{"name": "tiled", "tile": 32}, {"name": "hiad", "patch_size": 32}])
def test_predictions_with_resident_pixels_equal_the_host_path(
    strategy: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole predict path (tiled windows with context; HiAD's level-0 windows, level-1 map and
    low branch) gives the same maps and scores when every PixelImage keeps its pixels resident."""
    from hrad.config import load_config
    from hrad.model import AnomalyModel

    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(5)]
    torch.manual_seed(0)
    config = load_config(
        None, {"backbone": {"name": "tiny-cnn"}, "detector": {"name": "patchcore"}, "strategy": strategy, "seed": 0}
    )
    model = AnomalyModel(config).fit(images[:2], validation=images[2:3] if strategy["name"] == "hiad" else [])
    expected = [model.predict(image) for image in images[3:]]
    host_init = PixelImage.__init__

    def resident_init(self: PixelImage, pixels: np.ndarray, device: object = "cpu", padded_to: object = None, resident: object = None) -> None:
        host_init(self, pixels, device, padded_to, True)  # type: ignore[arg-type]

    monkeypatch.setattr(PixelImage, "__init__", resident_init)
    for image, before in zip(images[3:], expected, strict=True):
        after = model.predict(image)
        np.testing.assert_allclose(after.anomaly_map, before.anomaly_map, rtol=0, atol=1e-6)
        assert after.score == pytest.approx(before.score, abs=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["uint8", "uint16", "float32"])
def test_cuda_images_are_resident_and_convert_as_on_the_host(kind: str) -> None:
    pixels = pixel_arrays()[kind]
    on_device = PixelImage(pixels, "cuda")
    assert on_device._resident is not None and on_device._resident[0].is_cuda
    torch.testing.assert_close(on_device.region(2, 9, 5, 16).cpu(), PixelImage(pixels).region(2, 9, 5, 16), rtol=0, atol=0)
