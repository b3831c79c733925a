"""hrad.imaging.resize, the one resize of the strategies and export runtimes: exact values on
small arrays and the antialias rule against the helpers it replaced."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hrad.imaging import resize


def interpolate(tensor: torch.Tensor, size: tuple[int, int], antialias: bool) -> torch.Tensor:
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=antialias)


def test_upsampling_is_plain_bilinear_with_clamped_borders() -> None:
    row = torch.tensor([[[[0.0, 4.0]]]])  # 1 x 1 x 1 x 2 -> 1 x 4
    # output centres map to source -0.25, 0.25, 0.75, 1.25; the outer two clamp to the border
    assert torch.equal(resize(row, (1, 4)), torch.tensor([[[[0.0, 1.0, 3.0, 4.0]]]]))


def test_shrinking_averages_with_the_stretched_triangle_kernel() -> None:
    row = torch.tensor([[[[1.0, 2.0, 4.0, 8.0]]]])  # 1 x 4 -> 1 x 2: kernel 1/8, 3/8, 3/8, 1/8
    # at the borders the missing neighbour's weight is dropped and the rest renormalised (/ 7/8)
    expected = torch.tensor([[[[(3 * 1 + 3 * 2 + 4) / 7, (2 + 3 * 4 + 3 * 8) / 7]]]])
    assert torch.allclose(resize(row, (1, 2)), expected, atol=1e-6)
    # plain bilinear would sample between pixels 0-1 and 2-3 only: (1.5, 6.0)
    assert not torch.allclose(resize(row, (1, 2)), torch.tensor([[[[1.5, 6.0]]]]), atol=0.1)


def test_same_size_returns_the_tensor_itself() -> None:
    image = torch.rand(2, 3, 5, 7)
    assert resize(image, (5, 7)) is image


@pytest.mark.parametrize(
    ("shape", "size"),
    [
        ((1, 3, 64, 48), (32, 24)),  # shrinking both ways
        ((2, 1, 30, 40), (30, 17)),  # shrinking one way, the other unchanged
        ((1, 3, 20, 64), (50, 32)),  # growing one way, shrinking the other
    ],
)
def test_shrinking_in_any_axis_is_antialiased_as_every_old_helper_was(
    shape: tuple[int, ...], size: tuple[int, int]
) -> None:
    """tiled.resize, tiling.resize_windows, ensemble._resize and hiad resize_images all
    antialiased these: the output is unchanged, bit for bit."""
    image = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(resize(image, size), interpolate(image, size, antialias=True))


@pytest.mark.parametrize(("shape", "size"), [((1, 3, 37, 53), (100, 120)), ((1, 1, 5, 7), (1023, 2049))])
def test_upsampling_is_not_antialiased_and_matches_the_old_antialiased_helpers_to_rounding(
    shape: tuple[int, ...], size: tuple[int, int]
) -> None:
    """tiled.resize and tiling.resize_windows did not antialias upsampling (unchanged, bit for
    bit); ensemble._resize and hiad resize_images did, which changes only float rounding."""
    image = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    out = resize(image, size)
    assert torch.equal(out, interpolate(image, size, antialias=False))
    assert float((out - interpolate(image, size, antialias=True)).abs().max()) < 1e-5


@pytest.mark.parametrize("source", [(6, 8), (6, 1), (9, 5)])
@pytest.mark.parametrize("height", [1, 3, 4])
def test_shrinking_to_one_column_keeps_the_rows_apart(source: tuple[int, int], height: int) -> None:
    """An image whose rows are constant, resized to one column, keeps its row profile resized on
    its own (torch's antialiased kernel gave every output row the first row's value), and the
    pixel-path resizes (whole and by rows) agree with it."""
    from hrad.strategies.pixels import PixelImage, resize_pixels, resize_pixels_by_rows

    rows, columns = source
    profile = torch.arange(rows, dtype=torch.float32) * 10.0
    image = profile[:, None].expand(rows, columns)[None, None].contiguous()
    got = resize(image, (height, 1))
    expected_profile = resize(profile[None, None, None, :], (1, height))  # 1 x rows -> 1 x height
    torch.testing.assert_close(got.flatten(), expected_profile.flatten(), rtol=0, atol=1e-5)
    if height > 1:
        assert len(set(got.flatten().tolist())) == height  # the rows stay apart
    pixels = (image[0].clamp(0, 255)).to(torch.uint8).numpy().transpose(1, 2, 0)
    reference = resize(torch.from_numpy(pixels.transpose(2, 0, 1)).float()[None] / 255.0, (height, 1))[0]
    for resized in (resize_pixels(PixelImage(pixels), (height, 1)), resize_pixels_by_rows(PixelImage(pixels), (height, 1))):
        torch.testing.assert_close(resized, reference, rtol=0, atol=1e-6)
