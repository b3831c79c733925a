"""A/B check that a refactor leaves every detector unchanged, bit for bit (no data, seconds).

``fit`` mode (run with ``PYTHONPATH`` at a checkout or ``git archive`` snapshot of the revision to
test): every registered detector, in one or more small configurations (``SETUPS``: options that
take other code paths, e.g. RD++ with loss terms switched off, PaDiM / PatchCore in several
chunks, ViTAD with chunked attention), is fitted on two seeded random embedding batches, predicts
a third, and is reloaded from its state; maps, scores, loss histories, the analysis helpers'
outputs (ViTAD reconstructions, VarAD directional predictions, the students' direction maps),
every state tensor and the reloaded detector's maps go to an ``.npz``. ``compare`` is
:func:`benchmarks.ab_states.compare` (largest absolute difference per setup and kind, Markdown).
Single-threaded, so the same code gives the same bits.

    PYTHONPATH=/tmp/before python benchmarks/ab_detectors.py fit --out before.npz
    PYTHONPATH=/tmp/after python benchmarks/ab_detectors.py fit --out after.npz
    PYTHONPATH=. python benchmarks/ab_detectors.py compare before.npz after.npz --md result.md --note "..."
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

#: label -> (detector config, embedding channels, grid side)
SETUPS: dict[str, tuple[dict, int, int]] = {
    "students_tok": ({"name": "students", "epochs": 2, "batch_tokens": 50, "max_tokens": 300}, 16, 6),
    "students_img": (
        {"name": "students", "epochs": 3, "batch_images": 2, "val_fraction": 0.3, "patience": 1},
        16,
        6,
    ),
    "students_split": (
        {"name": "students", "epochs": 1, "split_at": 6, "fusion": "sum", "image_score": "max"},
        16,
        6,
    ),
    "vitad": ({"name": "vitad", "epochs": 3, "level_channels": [8, 8, 8, 8], "decoder_depth": 3}, 32, 6),
    "vitad_levels": (
        {
            "name": "vitad",
            "epochs": 2,
            "fuser_input": "levels",
            "levels": 2,
            "decoder_depth": 2,
            "loss": "token+flat",
            "projection": "linear",
        },
        16,
        6,
    ),
    "vitad_chunk": (
        {
            "name": "vitad",
            "epochs": 1,
            "level_channels": [8, 8, 8, 8],
            "decoder_depth": 3,
            "attention_chunk": 5,
        },
        32,
        6,
    ),
    "varad": ({"name": "varad", "epochs": 2, "level_channels": [8, 8], "scan": "chunked"}, 16, 6),
    "varad_m": (
        {
            "name": "varad",
            "epochs": 1,
            "step_m": 1.0,
            "bos": "repeated",
            "combine": "normalized_mean",
            "directions": 1,
            "scan": "sequential",
        },
        24,
        6,
    ),
    "fastflow": ({"name": "fastflow", "epochs": 2, "level_channels": [6, 10], "flow_steps": 3}, 16, 6),
    "fastflow_nll": (
        {
            "name": "fastflow",
            "epochs": 1,
            "flow_steps": 2,
            "anomaly_map": "nll",
            "global_affine": False,
            "conv3x3_only": True,
        },
        8,
        6,
    ),
    "rdpp": ({"name": "rdpp", "epochs": 2, "level_channels": [8, 8], "ssot_points": 8}, 16, 8),
    "rdpp_mean": (
        {
            "name": "rdpp",
            "epochs": 1,
            "distill_loss": "flattened",
            "map_reduction": "mean",
            "bottleneck_stride": 1,
        },
        8,
        6,
    ),
    "rdpp_contrast": (
        {"name": "rdpp", "epochs": 1, "noise_reconstruction_weight": 0, "ssot_weight": 0},
        8,
        6,
    ),
    "rdpp_recon": (
        {"name": "rdpp", "epochs": 1, "noise_contrast_weight": 0, "distill_loss": "position"},
        8,
        6,
    ),
    "rdpp_off": ({"name": "rdpp", "epochs": 1, "projection_weight": 0}, 8, 6),
    "destseg": (
        {
            "name": "destseg",
            "student_epochs": 1,
            "segmentation_epochs": 1,
            "level_channels": [8, 8],
            "student_channels": 8,
            "segmentation_channels": 8,
        },
        16,
        8,
    ),
    "realnet": (
        {
            "name": "realnet",
            "epochs": 1,
            "level_channels": [8, 8],
            "reconstruction_channels": 8,
            "residual_channels": 4,
            "discriminator_channels": 8,
        },
        16,
        8,
    ),
    "padim": ({"name": "padim", "n_features": 5}, 16, 6),
    "padim_chunks": ({"name": "padim", "n_features": 6, "position_batch": 5}, 16, 6),
    "patchcore": ({"name": "patchcore", "coreset_ratio": 0.3, "max_fit_patches": 100}, 16, 6),
    "patchcore_chunks": ({"name": "patchcore", "query_batch": 7, "index": "exact"}, 16, 6),
    "patchcore_nn": ({"name": "patchcore", "num_neighbors": 3, "reweight": False}, 16, 6),
}
#: analysis helpers whose outputs are compared too, where a detector has them
HELPERS = ("reconstructions", "directional_predictions", "direction_maps")


def fit(out: Path) -> None:
    import torch

    import hrad
    from hrad.detectors import DETECTORS, build_detector, detector_config

    torch.set_num_threads(1)

    def embeddings(seed: int, count: int, channels: int, side: int) -> torch.Tensor:
        return (
            torch.randn(count, channels, side, side, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5
        )

    arrays: dict[str, np.ndarray] = {}
    for label, (options, channels, side) in SETUPS.items():
        train = [embeddings(1, 3, channels, side), embeddings(2, 2, channels, side)]
        test = embeddings(3, 2, channels, side)
        if "synthesis" in DETECTORS.get(options["name"]).config_type.model_fields:
            options = {**options, "synthesis": "feature"}  # the only kind before image-space synthesis
        detector = build_detector(detector_config(options))
        detector.fit(train)
        result = detector.predict(test)
        arrays[f"{label}/maps/0"], arrays[f"{label}/scores/0"] = result.maps.numpy(), result.scores.numpy()
        for name in ("loss_history", "val_history", "term_history"):
            history = getattr(detector, name, None)
            if history:
                rows = [list(entry.values()) if isinstance(entry, dict) else entry for entry in history]
                arrays[f"{label}/{name}/0"] = np.array(rows, dtype=np.float64)
        for helper in HELPERS:
            if hasattr(detector, helper):
                for index, value in enumerate(getattr(detector, helper)(test)):
                    arrays[f"{label}/{helper}/{index}"] = value.numpy()
        state = detector.state_dict()
        for key, value in state.items():
            arrays[f"{label}/state/{key}"] = value.numpy()
        reloaded = build_detector(detector_config(options))
        reloaded.load_state_dict(state)
        arrays[f"{label}/reloaded_maps/0"] = reloaded.predict(test).maps.numpy()
        print(label, "fitted", flush=True)
    arrays["hrad_path"] = np.array(str(Path(hrad.__file__).parent))
    np.savez(out, **arrays)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fit").add_argument("--out", type=Path, required=True)
    compare_parser = commands.add_parser("compare")
    compare_parser.add_argument("first", type=Path)
    compare_parser.add_argument("second", type=Path)
    compare_parser.add_argument("--md", type=Path, default=None)
    compare_parser.add_argument("--note", default="")
    args = parser.parse_args()
    if args.command == "fit":
        fit(args.out)
    else:
        from benchmarks.ab_states import compare

        compare(args.first, args.second, args.md, args.note)


if __name__ == "__main__":
    main()
