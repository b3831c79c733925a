"""The map post-processing on torch tensors (hrad.postprocess.device_maps) against the host functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hrad.hiad_math import pooled_max
from hrad.postprocess import device_maps
from hrad.postprocess.smoothing import gaussian_smooth


@pytest.mark.parametrize("shape", [(64, 96), (10, 7), (37, 5), (1, 1), (200, 3)])
def test_blur_and_pooled_max_equal_the_host_functions(shape: tuple[int, int]) -> None:
    """OpenCV's kernel and BORDER_REFLECT border (mirrored again where a side is shorter than the
    kernel's radius), rows first; the pooled maximum of windows inside the map."""
    values = np.random.default_rng(3).random(shape, dtype=np.float32)
    tensor = torch.from_numpy(values)
    for sigma in (0.5, 1.0, 4.0):
        blurred = device_maps.gaussian_blur(tensor, sigma)
        assert blurred.shape == shape and blurred.dtype == torch.float32
        np.testing.assert_allclose(blurred.numpy(), gaussian_smooth(values, sigma), rtol=0, atol=1e-6)
    assert device_maps.gaussian_blur(tensor, 0.0) is tensor
    for pool in (1, 4, 16):
        assert float(device_maps.pooled_max(tensor, pool)) == pytest.approx(pooled_max(values, pool), abs=1e-6)


@pytest.mark.gpu
def test_on_cuda_the_blur_equals_opencv_in_float32() -> None:
    """On the GPU too (no TF32 anywhere: a convolution there may run in TF32, 1e-3 of the values)."""
    values = np.random.default_rng(4).random((512, 768), dtype=np.float32)
    blurred = device_maps.gaussian_blur(torch.from_numpy(values).cuda(), 4.0).cpu().numpy()
    np.testing.assert_allclose(blurred, gaussian_smooth(values, 4.0), rtol=0, atol=1e-5)
