"""hrad.metrics against slow brute-force references on small arrays."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.measure import label as label_components
from sklearn.metrics import average_precision_score, roc_auc_score

from hrad.errors import ConfigError, InputError
from hrad.metrics import PixelMetrics, cumulative_quartile_sets, image_metrics, robustness_rho

# ---------------------------------------------------------------- brute-force references


def brute_curve_area(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Area under the polyline (0,0),(x_i,y_i) from 0 to limit, by clipping each segment; / limit."""
    xs = np.concatenate(([0.0], x))
    ys = np.concatenate(([0.0], y))
    area = 0.0
    for i in range(len(xs) - 1):
        x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def brute_pixel(maps, masks, fpr_limit: float, region_filter=None) -> dict[str, float]:
    """Every threshold = every distinct score; regions from skimage (8-connectivity)."""
    scores = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    truth = np.concatenate(
        [(np.zeros(m.shape, bool) if k is None else k).ravel() for m, k in zip(maps, masks, strict=True)]
    )
    regions = []  # (image index, boolean region mask)
    for index, mask in enumerate(masks):
        if mask is None:
            continue
        labels = label_components(mask, connectivity=2)
        for value in range(1, labels.max() + 1):
            regions.append((index, labels == value))
    if region_filter is not None:
        regions = [r for r in regions if region_filter(int(r[1].sum()))]
    thresholds = np.unique(scores)[::-1]
    fpr, tpr, pro, f1 = [], [], [], []
    n_normal, n_anomalous = (~truth).sum(), truth.sum()
    for t in thresholds:
        predicted = scores >= t
        tp = (predicted & truth).sum()
        fp = (predicted & ~truth).sum()
        fpr.append(fp / n_normal)
        tpr.append(tp / n_anomalous)
        f1.append(2 * tp / (2 * tp + fp + (n_anomalous - tp)))
        pro.append(np.mean([(maps[i][region] >= t).sum() / region.sum() for i, region in regions]))
    fpr_a, tpr_a, pro_a = np.array(fpr), np.array(tpr), np.array(pro)
    return {
        "auroc_limited": brute_curve_area(fpr_a, tpr_a, fpr_limit),
        "aupro": brute_curve_area(fpr_a, pro_a, fpr_limit),
        "f1_max": max(f1),
        "sk_auroc": roc_auc_score(truth, scores),
        "sk_ap": average_precision_score(truth, scores),
    }


def random_blob_mask(rng: np.random.Generator, shape: tuple[int, int], n_blobs: int) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    for _ in range(n_blobs):
        center = (int(rng.integers(0, shape[1])), int(rng.integers(0, shape[0])))
        axes = (int(rng.integers(0, 5)), int(rng.integers(0, 4)))
        cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return mask.astype(bool)


def make_dataset(seed: int, values: str = "grid"):
    """6 images 20x30 (2 normal); scores on a 2**-12 grid in [1, 2) (exact bins, with ties) or any float."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for index in range(6):
        mask = None if index < 2 else random_blob_mask(rng, (20, 30), int(rng.integers(1, 4)))
        if values == "grid":
            steps = rng.integers(0, 3000, size=(20, 30))
            if mask is not None:
                steps[mask] += rng.integers(0, 1500, size=int(mask.sum()))
            score = (1.0 + steps / 4096.0).astype(np.float32)
        else:  # arbitrary float32, negatives included
            score = rng.normal(size=(20, 30)).astype(np.float32)
            if mask is not None:
                score[mask] += np.float32(1.0)
        maps.append(score)
        masks.append(mask)
    return maps, masks


def filled(maps, masks, **kwargs) -> PixelMetrics:
    metrics = PixelMetrics(**kwargs)
    for score, mask in zip(maps, masks, strict=True):
        metrics.add(score, mask)
    return metrics


# ---------------------------------------------------------------- pixel metrics vs brute force


@pytest.mark.parametrize(("seed", "values", "bits"), [(0, "grid", 24), (1, "grid", 24), (2, "any", 32)])
def test_pixel_metrics_equal_brute_force(seed: int, values: str, bits: int) -> None:
    maps, masks = make_dataset(seed, values)
    metrics = filled(maps, masks, score_bits=bits)
    result = metrics.result()
    for limit, key in ((0.3, "aupro_30"), (0.05, "aupro_05")):
        brute = brute_pixel(maps, masks, limit)
        assert result[key] == pytest.approx(brute["aupro"], abs=1e-12)
        assert metrics.aupro(limit) == pytest.approx(brute["aupro"], abs=1e-12)
        assert metrics.auroc(limit) == pytest.approx(brute["auroc_limited"], abs=1e-12)
    brute = brute_pixel(maps, masks, 1.0)
    assert result["pixel_auroc"] == pytest.approx(brute["sk_auroc"], abs=1e-12)
    assert result["pixel_auroc"] == pytest.approx(brute["auroc_limited"], abs=1e-12)
    assert result["pixel_ap"] == pytest.approx(brute["sk_ap"], abs=1e-12)
    assert result["pixel_f1_max"] == pytest.approx(brute["f1_max"], abs=1e-12)
    assert result["pixel_auroc_05"] == pytest.approx(metrics.auroc(0.05))
    assert metrics.n_regions >= 4 and 0.0 < result["aupro_30"] < 1.0


def test_default_binning_is_close_on_continuous_scores() -> None:
    maps, masks = make_dataset(3, "any")
    approximate = filled(maps, masks).result()
    exact = filled(maps, masks, score_bits=32).result()
    for key, value in exact.items():
        assert approximate[key] == pytest.approx(value, abs=2e-3), key


def test_aupro_on_selected_components_matches_brute_force() -> None:
    maps, masks = make_dataset(4)
    metrics = filled(maps, masks)
    areas = metrics.region_areas
    cut = float(np.median(areas))
    brute = brute_pixel(maps, masks, 0.3, region_filter=lambda area: area <= cut)
    assert metrics.aupro(0.3, components=areas <= cut) == pytest.approx(brute["aupro"], abs=1e-12)
    indices = np.flatnonzero(areas <= cut)
    assert metrics.aupro(0.3, components=indices) == pytest.approx(brute["aupro"], abs=1e-12)


def test_f1_threshold_and_seg_f1() -> None:
    maps, masks = make_dataset(5, "any")
    exact_threshold = 0.123456
    metrics = filled(maps, masks, score_bits=24, seg_thresholds=[exact_threshold])
    scores = np.concatenate([m.ravel() for m in maps])
    truth = np.concatenate(
        [(np.zeros(m.shape, bool) if k is None else k).ravel() for m, k in zip(maps, masks, strict=True)]
    )

    def brute_f1(threshold: float) -> float:
        predicted = scores >= np.float32(threshold)
        tp = (predicted & truth).sum()
        return 2 * tp / (2 * tp + (predicted & ~truth).sum() + (~predicted & truth).sum())

    best_f1, best_threshold = metrics.f1_max()
    assert brute_f1(best_threshold) == pytest.approx(best_f1, abs=1e-12)  # the threshold realises the F1
    assert metrics.f1_at(exact_threshold) == pytest.approx(brute_f1(exact_threshold), abs=1e-12)
    assert metrics.f1_at(best_threshold) == pytest.approx(best_f1, abs=1e-12)  # a bin edge: exact from bins
    assert metrics.f1_at(-1.0) == pytest.approx(brute_f1(-1.0), abs=2e-3)  # any threshold: within a bin


# ---------------------------------------------------------------- size-aware metrics


def test_quartile_sets_are_cumulative_and_follow_percentiles() -> None:
    sets = cumulative_quartile_sets(np.array([1, 1, 4, 4, 16, 16, 64, 64]))
    assert [int(s.sum()) for s in sets] == [2, 4, 6, 8]
    for smaller, larger in zip(sets, sets[1:], strict=False):
        assert np.all(larger[smaller])


def test_size_aware_aupro_on_a_map_that_misses_small_defects() -> None:
    """Defects of 1, 4, 16, 64 px (two each); the map hits the 16 and 64 px ones and misses the rest.

    Quartiles (linear percentiles of [1,1,4,4,16,16,64,64]) are 3.25, 10, 28, so Q1..Q4 hold 2, 4, 6, 8
    regions. PRO jumps at FPR 0 to p = (hit regions)/(regions) and the curve runs straight to (1, 1):
    AUPRO@L = p + (1 - p) * L / 2.
    """
    metrics = PixelMetrics()
    for side in (1, 1, 2, 2, 4, 4, 8, 8):
        mask = np.zeros((20, 20), bool)
        mask[5 : 5 + side, 5 : 5 + side] = True
        score = np.zeros((20, 20), np.float32)
        if side >= 4:
            score[mask] = 1.0
        metrics.add(score, mask)
    metrics.add(np.zeros((20, 20), np.float32), None)
    result = metrics.result()
    hit_fraction = {1: 0.0, 2: 0.0, 3: 2 / 6, 4: 4 / 8}
    for limit, tag in ((0.3, "30"), (0.05, "05")):
        expected = [hit_fraction[k] + (1 - hit_fraction[k]) * limit / 2 for k in (1, 2, 3, 4)]
        for k in (1, 2, 3, 4):
            assert result[f"aupro_{tag}_q{k}"] == pytest.approx(expected[k - 1], abs=1e-12)
        assert result[f"aupro_{tag}"] == pytest.approx(expected[3], abs=1e-12)
        weight = sum(expected) / 4
        sensitivity = abs(expected[3] - expected[0]) / max(expected[0], expected[3])
        assert result[f"rho_{tag}"] == pytest.approx(weight * (1 - sensitivity), abs=1e-12)
    assert result["aupro_30_q1"] < result["aupro_30_q4"]


def test_robustness_rho_by_hand() -> None:
    assert robustness_rho([0.5, 0.6, 0.7, 0.8]) == pytest.approx(0.65 * (1 - 0.3 / 0.8))
    assert robustness_rho([0.9, 0.9, 0.9, 0.9]) == pytest.approx(0.9)
    assert robustness_rho([0.0, 0.2, 0.2, 0.0]) == pytest.approx(0.1)
    assert math.isnan(robustness_rho([float("nan"), 0.5, 0.5, 0.5]))


# ---------------------------------------------------------------- protocol, memory, edge cases


def test_hiad512_protocol_equals_metrics_on_torch_resized_inputs() -> None:
    rng = np.random.default_rng(6)
    maps, masks, resized_maps, resized_masks = [], [], [], []
    for index in range(3):
        score = cv2.GaussianBlur(rng.random((300, 700), dtype=np.float32), (0, 0), 3)
        mask = None if index == 0 else random_blob_mask(rng, (300, 700), 3) | (score > 0.55)
        maps.append(score)
        masks.append(mask)
        map_tensor = torch.from_numpy(score)[None, None]
        resized_maps.append(
            F.interpolate(map_tensor, size=(512, 512), mode="bilinear", align_corners=False)[0, 0].numpy()
        )
        if mask is not None:
            mask_tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
            resized_masks.append(
                F.interpolate(mask_tensor, size=(512, 512), mode="nearest")[0, 0].numpy() > 0.5
            )
        else:
            resized_masks.append(None)
    hiad = filled(maps, masks, protocol="hiad512")
    reference = filled(resized_maps, resized_masks)
    assert hiad.n_regions == reference.n_regions
    np.testing.assert_array_equal(np.sort(hiad.region_areas), np.sort(reference.region_areas))
    hiad_result, reference_result = hiad.result(), reference.result()
    for key, value in reference_result.items():
        assert hiad_result[key] == pytest.approx(value, abs=1e-3), key
    full = filled(maps, masks).result()
    assert full["aupro_30"] != hiad_result["aupro_30"]


def test_memory_does_not_grow_with_images_of_the_same_bins() -> None:
    rng = np.random.default_rng(7)
    values = (1.0 + np.arange(200) / 256.0).astype(np.float32)
    metrics = PixelMetrics()
    for _ in range(3):
        metrics.add(rng.choice(values, size=(64, 64)), None)
    bins_before, bytes_before = metrics.n_bins, metrics.state_nbytes
    for _ in range(40):
        metrics.add(rng.choice(values, size=(64, 64)), None)
    assert metrics.n_bins == bins_before == 200
    assert metrics.state_nbytes == bytes_before
    assert metrics.n_images == 43


def test_nan_when_metrics_are_undefined() -> None:
    only_normal = filled([np.ones((5, 5), np.float32)] * 2, [None, np.zeros((5, 5), bool)])
    assert only_normal.n_anomalous_images == 0
    assert all(math.isnan(v) for v in only_normal.result().values())
    only_anomalous = filled([np.ones((5, 5), np.float32)], [np.ones((5, 5), bool)])
    result = only_anomalous.result()
    assert (
        math.isnan(result["pixel_auroc"]) and math.isnan(result["aupro_30"]) and math.isnan(result["rho_05"])
    )
    assert result["pixel_ap"] == pytest.approx(1.0)
    assert math.isnan(PixelMetrics().result()["pixel_auroc"])


def test_input_errors() -> None:
    metrics = PixelMetrics()
    with pytest.raises(InputError, match="a.png"):
        metrics.add(np.zeros((4, 4), np.float32), np.zeros((4, 5), bool), name="a.png")
    with pytest.raises(InputError, match="NaN"):
        metrics.add(np.full((4, 4), np.nan, np.float32))
    with pytest.raises(InputError):
        metrics.add(np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ConfigError):
        PixelMetrics(protocol="fast")
    with pytest.raises(ConfigError):
        PixelMetrics().aupro(0.0)
    with pytest.raises(InputError):
        image_metrics([0.1, 0.2], [0, 1, 1])


# ---------------------------------------------------------------- image metrics


def test_image_metrics_against_brute_force() -> None:
    rng = np.random.default_rng(8)
    labels = rng.random(40) < 0.4
    scores = np.round(rng.normal(size=40) + labels, 1)  # rounded: ties on purpose
    result = image_metrics(scores, labels)
    positives, negatives = scores[labels], scores[~labels]
    pairs = (positives[:, None] > negatives[None, :]).sum() + 0.5 * (
        positives[:, None] == negatives[None, :]
    ).sum()
    assert result["image_auroc"] == pytest.approx(pairs / (positives.size * negatives.size))
    best = 0.0
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        tp = (predicted & labels).sum()
        best = max(best, 2 * tp / (2 * tp + (predicted & ~labels).sum() + (~predicted & labels).sum()))
    assert result["image_f1_max"] == pytest.approx(best)
    assert result["image_ap"] == pytest.approx(average_precision_score(labels, scores))
    only_anomalous = image_metrics([0.3, 0.4], [1, 1])
    assert math.isnan(only_anomalous["image_auroc"]) and only_anomalous["image_ap"] == pytest.approx(1.0)
    assert math.isnan(image_metrics([0.3, 0.4], [0, 0])["image_ap"])


def test_sortable_keys_preserve_float_order() -> None:
    from hrad.metrics.pixel import key_to_value, sortable_keys

    values = np.array(
        [-np.inf, -3e38, -2.5, -1e-40, -0.0, 0.0, 1e-45, 1e-40, 1e-3, 1.0, 1.0000001, 3e38, np.inf],
        np.float32,
    )
    keys = sortable_keys(values)
    assert np.all(np.diff(keys.astype(np.int64)) >= 0)
    assert keys[4] == keys[5]  # -0.0 and +0.0 are one score
    np.testing.assert_array_equal(key_to_value(keys)[5:], values[5:])
    np.testing.assert_array_equal(key_to_value(keys)[:4], values[:4])
