"""HiAD's typed configuration (paper defaults; see docs of each field)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import model_validator

from hrad.errors import ConfigError
from hrad.seeds import Seed
from hrad.strategies.tiling import ContextTilingConfig

AssignmentKind = Literal["a2o", "o2o", "na", "sca", "ra"]


class HiADConfig(ContextTilingConfig):
    """Dual-branch HiAD: detector pool over fused multi-resolution patch features + low branch."""

    name: Literal["hiad"] = "hiad"
    #: high-branch patch side in pixels; a multiple of the embedding layer's stride
    patch_size: int = 512
    #: patch stride; None = patch_size (no overlap, the paper's setting)
    stride: int | None = None
    #: downsampling rates k (image / 2^k) fused into each patch feature; None = automatic:
    #: 0..K with K the number of halvings that bring sqrt(H*W) down to ~fusion_base (K=1 at 2K)
    fusion_rates: tuple[int, ...] | None = None
    #: weight per rate (same order as fusion_rates), summing to 1; None = equal weights
    fusion_weights: tuple[float, ...] | None = None
    #: target resolution of the automatic rate choice
    fusion_base: int = 1024
    #: detector assignment: a2o (one detector), o2o (one per position), na (M spatial
    #: neighbourhoods), sca (KMeans over per-position mean features), ra (KMeans over patch
    #: features, nearest centroid at test time; also the multi-class mode)
    assignment: AssignmentKind = "sca"
    #: M, the pool size for na / sca / ra (a2o uses 1, o2o one per position)
    num_detectors: int = 4
    #: low-resolution branch: whole image resized so its long side is low_res_size
    low_branch: bool = True
    #: long side of the low-resolution branch's image
    low_res_size: int = 512
    #: validation copies with pasted pseudo-anomalies join the good validation images
    pseudo_anomalies: bool = True
    #: a pool detector whose validation patches no pseudo-anomaly reached takes the largest
    #: calibration maximum of those one reached (False: its own, the paper's rule; with few
    #: held-out images that lifts its normal maps to anomaly level): MinMaxCalibration.complete_pool
    shared_anomaly_peak: bool = True
    #: the low branch's map is divided by its own border ratios (hrad.postprocess.border), learned in
    #: calibrate() from the held-out good images' low maps, before the branches' max. The whole
    #: image at low_res_size sees padding over a band of full-resolution pixels several times
    #: wider than a patch's, and its frame (good images' maps 2.5x their interior at the border on
    #: hrad's textures) survives the max, where the returned map's own calibration cannot tell it
    #: from the high branch's (benchmarks/hiad_branch_border.py). Not in the paper; False: off
    low_border_calibration: bool = True
    #: with low_border_calibration: the low branch's ratios are a table by (distance to the
    #: nearer of top / bottom, distance to the nearer of left / right) that adds the two edge
    #: profiles' excesses (hrad.postprocess.border.BorderProfile.corner_ratios), so a corner near
    #: two sides is divided by both; False: by the distance to the nearest side only, which left
    #: the low map's corner cell ~1.3x the inside on hrad's textures
    #: (benchmarks/results/hiad_border_corners.md). Measured (SCA-4, one run): with
    #: balance_branches image AUROC gravel / brick / grass 0.82 / 0.98 / 0.88 -> 0.89 / 1.00 / 1.00,
    #: without it unchanged, capsules learn no ratios (hiad_low_border_corners*.md). Not in the paper
    low_border_corners: bool = True
    #: after the min-max, the branch whose held-out good images peak higher (mean image score by
    #: the score rule) has its range widened until both branches' normal peaks agree, so neither
    #: branch's normal texture outranks the other's defects in the max (min-max alone sets each
    #: branch's pseudo-anomaly peak to 1, not their normal peaks level). Not in the paper. Off by
    #: default. At two seeds it helped SCA pools on textures both times, but at seed 1 it hurt A2O
    #: on textures (gravel AUPRO@30 off 0.97, on 0.86) and on capsules SCA lost a little at both seeds
    #: (benchmarks/results/hiad_branch_balance_corners.md, hiad_branch_balance_corners_seed1.md)
    balance_branches: bool = False
    #: Gaussian sigma (full-resolution pixels) applied to the returned map; 0 (default) leaves
    #: smoothing to the model's post-processing, whose default is the reference's sigma 4
    smoothing_sigma: float = 0.0
    #: image score (reference rule) = max of the map blurred with score_sigma and averaged over
    #: score_pool x score_pool windows (stride 1)
    score_sigma: float = 4.0
    #: window side of the image-score average pooling
    score_pool: int = 16
    #: worker processes that fit detectors of the pool in parallel (0 or 1 = in process)
    workers: int = 0
    #: where fused training features are spilled to disk while fitting; None = system temp dir
    work_dir: str | None = None
    #: also return the calibrated high and low maps in AnomalyResult.extras
    return_branch_maps: bool = False
    #: seed of the pool assignment (KMeans) and pseudo-anomalies; torch's range (hrad.seeds), as the
    #: top-level seed (a negative one read as its 64-bit two's complement)
    seed: Seed = 0

    @model_validator(mode="after")
    def _check(self) -> HiADConfig:
        if self.patch_size <= 0:
            raise ConfigError(f"hiad: patch_size must be positive, got {self.patch_size}")
        if self.stride is not None and not 0 < self.stride <= self.patch_size:
            raise ConfigError(f"hiad: stride must be in 1..patch_size ({self.patch_size}), got {self.stride}")
        if self.num_detectors < 1:
            raise ConfigError(f"hiad: num_detectors must be at least 1, got {self.num_detectors}")
        if self.low_res_size <= 0:
            raise ConfigError(f"hiad: low_res_size must be positive, got {self.low_res_size}")
        if self.fusion_base <= 0:
            raise ConfigError(f"hiad: fusion_base must be positive, got {self.fusion_base}")
        if self.score_pool < 1 or self.smoothing_sigma < 0 or self.score_sigma < 0 or self.workers < 0:
            raise ConfigError("hiad: score_pool must be >= 1; smoothing_sigma, score_sigma and workers >= 0")
        if self.fusion_rates is not None:
            rates = self.fusion_rates
            if not rates or len(set(rates)) != len(rates) or min(rates) < 0 or 0 not in rates:
                raise ConfigError(
                    f"hiad: fusion_rates must be distinct non-negative integers including 0 (the patch's own "
                    f"resolution), got {list(rates)}"
                )
        if self.fusion_weights is not None:
            check_weights(self.fusion_weights, None if self.fusion_rates is None else len(self.fusion_rates))
        return self

    @property
    def patch_stride(self) -> int:
        return self.patch_size if self.stride is None else self.stride


def check_weights(weights: tuple[float, ...], count: int | None) -> None:
    """Fusion weights: one per rate, each in [0, 1], summing to 1."""
    if count is not None and len(weights) != count:
        raise ConfigError(
            f"hiad: {len(weights)} fusion_weights for {count} fusion_rates; give one weight per rate"
        )
    if any(w < 0 or w > 1 for w in weights) or not math.isclose(sum(weights), 1.0, abs_tol=1e-6):
        raise ConfigError(f"hiad: fusion_weights must lie in [0, 1] and sum to 1, got {list(weights)}")
