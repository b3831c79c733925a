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


def _framed(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Noise with a brighter border frame and one bright spot: the border ratios have something to
    divide and the peak (raw) lies on the frame."""
    values = np.random.default_rng(seed).random(shape, dtype=np.float32)
    values[:6] *= 3.0
    values[:, -4:] *= 2.0
    values[40:44, 30:36] += 1.5
    return values


ONE_D = [2.5, 1.8, 1.3, 1.1]
TABLE = [[2.4, 1.9, 1.5, 1.3], [1.9, 1.5, 1.2, 1.1], [1.6, 1.3, 1.1, 1.0], [1.4, 1.2, 1.0, 1.0]]


@pytest.mark.parametrize("rule", ["strategy", "max", "top-fraction"])
@pytest.mark.parametrize("ratios", [None, ONE_D, TABLE], ids=["no-border", "1d", "table"])
@pytest.mark.parametrize("region", [None, "drawn", "everything"])
def test_device_post_processing_equals_the_host_path(rule: str, ratios: list | None, region: str | None) -> None:
    """hrad.postprocess.device_maps.smooth_and_score (the model's finish on a strategy's device,
    here forced on the CPU) against the host's smooth_and_score: the same finished map and score
    for each score rule, border ratios off / 1-D / a corner table, no region / a region drawn at
    another size / one covering everything, and each way a strategy's score follows the border
    calibration (scaled, pooled on the smoothed map, pooled under its own blur)."""
    from hrad.postprocess.roi import RegionOfInterest
    from hrad.postprocess.smoothing import MapScore, PostprocessConfig, smooth_and_score

    raw = _framed((64, 96), seed=5)
    roi = None
    if region is not None:
        mask = np.ones((32, 48), dtype=bool)
        if region == "drawn":
            mask[:, :6] = False  # the left columns (and the bright frame rows' left end) not inspected
            mask[20:, 40:] = False
        roi = RegionOfInterest(mask)
    config = PostprocessConfig(sigma=4.0, image_score=rule, top_fraction=0.01)  # type: ignore[arg-type]
    for map_score in (None, MapScore(4.0, 16), MapScore(2.0, 8)):
        strategy_score = 0.8 if map_score is None else MapScore(map_score.sigma, map_score.pool).of(raw)
        expected_map, expected = smooth_and_score(raw.copy(), strategy_score, config, ratios, roi, map_score)
        tensor = torch.from_numpy(raw.copy())
        anomaly_map, score = device_maps.smooth_and_score(tensor, torch.tensor(strategy_score), config, ratios, roi, map_score)
        assert isinstance(anomaly_map, np.ndarray) and anomaly_map.dtype == np.float32 and anomaly_map.shape == raw.shape
        np.testing.assert_allclose(anomaly_map, expected_map, rtol=0, atol=1e-5)
        assert score == pytest.approx(expected, abs=1e-5), map_score
        np.testing.assert_array_equal(tensor.numpy(), raw)  # the strategy's tensor is not written
    # a plain number as the strategy's score, and the border calibration switched off
    off = config.model_copy(update={"border_calibration": False})
    expected_map, expected = smooth_and_score(raw.copy(), 0.8, off, ratios, roi)
    anomaly_map, score = device_maps.smooth_and_score(torch.from_numpy(raw.copy()), 0.8, off, ratios, roi)
    np.testing.assert_allclose(anomaly_map, expected_map, rtol=0, atol=1e-5)
    assert score == pytest.approx(expected, abs=1e-6)


def test_the_border_factors_are_the_host_division() -> None:
    """A map times border_factors is calibrate_border's division (1-D list and corner table), and
    the factors are made once per size, ratios and device."""
    from hrad.postprocess.border import calibrate_border

    raw = _framed((40, 52), seed=6)
    for ratios in (ONE_D, TABLE):
        factors = device_maps.border_factors((40, 52), ratios, torch.device("cpu"))
        np.testing.assert_allclose((torch.from_numpy(raw) * factors).numpy(), calibrate_border(raw.copy(), ratios), rtol=1e-6)
        assert device_maps.border_factors((40, 52), list(ratios), torch.device("cpu")) is factors


def test_a_hiad_model_finishes_its_maps_on_the_strategys_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """AnomalyModel.predict / predict_batch with HiAD's device path forced on the CPU: the map
    comes from predict_on_device (predict itself is never called) and is finished by the device
    post-processing, with border ratios, a region and each score rule: the host path's map and
    score to float32 rounding. Off (the CPU default), or with the model's device_postprocess off,
    the host path runs."""
    import dataclasses

    from export_helpers import make_model

    from hrad.postprocess.roi import RegionOfInterest
    from hrad.strategies.hiad import HiAD

    hiad = {"name": "hiad", "patch_size": 32, "low_res_size": 32, "assignment": "a2o"}
    rng = np.random.default_rng(3)
    images = [np.clip(0.5 + rng.normal(0, 0.1, (64, 96, 3)), 0, 1).astype(np.float32) for _ in range(8)]
    model = make_model(hiad, {"name": "patchcore", "coreset_ratio": 0.5}).fit(images[:6])
    strategy = model.strategy
    assert isinstance(strategy, HiAD) and model.thresholds is not None and not model._on_device()
    model.thresholds = dataclasses.replace(model.thresholds, border_ratios=[1.6, 1.3, 1.1])
    mask = np.ones((64, 96), dtype=bool)
    mask[:, 80:] = False
    model.roi = RegionOfInterest(mask)
    tests = images[6:]
    tests[1][20:30, 40:50] = 1.0
    for rule in ("strategy", "max", "top-fraction"):
        model.config.postprocess = model.config.postprocess.model_copy(update={"image_score": rule})
        strategy.device_maps = False
        expected = [model.predict(image) for image in tests]
        strategy.device_maps = True
        with monkeypatch.context() as patched:
            patched.setattr(strategy, "predict", lambda image: pytest.fail("the host path ran"))
            results = [model.predict(image) for image in tests] + model.predict_batch(tests)
        for result, reference in zip(results, expected + expected, strict=True):
            np.testing.assert_allclose(result.anomaly_map, reference.anomaly_map, rtol=0, atol=1e-5)
            assert result.score == pytest.approx(reference.score, abs=1e-5)
        model.device_postprocess = False  # the strategy's map copied to the host and finished there
        with monkeypatch.context() as patched:
            patched.setattr(device_maps, "smooth_and_score", lambda *args: pytest.fail("the device finish ran"))
            assert model.predict(tests[1]).score == pytest.approx(expected[1].score, abs=1e-5)
        model.device_postprocess = True
