"""Peak memory of ``predict`` on one large synthetic PNG: images kept in their pixel type vs float32 whole.

Issue 13 asked that a decoded image cost its bytes, not 12 bytes a pixel (float32 RGB). This
script writes a synthetic 8-bit RGB PNG (a smooth texture with a brighter square), then, for
each size, runs ``model.predict(<png path>)`` in a fresh Python process: the process fits a tiny model
(tiny-cnn backbone, PatchCore, tiled strategy with 512-pixel tiles, seeded, on two 512x512
crops of the same texture), then predicts the file while ``hrad.profiling.PeakMemory`` samples
its RSS every 10 ms. Recorded: RSS just before the call, the peak during it (sampled, and the
kernel's ``ru_maxrss`` high-water mark) and the call's seconds.

"before" runs the same worker against the package as of ``--before`` (a git revision, extracted
with ``git archive`` into a temporary folder and put first on ``PYTHONPATH``), "after" against
this checkout; the two maps of one size are compared (max absolute difference) and the ratio
of peak increases is reported. Sizes in ``--after-only`` run only "after" (the old path would
need about 50 bytes a pixel: 14 GB at 16000x16000, more than this shared machine may take).

    PYTHONPATH=. python benchmarks/image_memory.py --sizes 6000x8000 --after-only 16000x16000 --before 9b56832~1

``--strategies`` measures instead how predict memory scales with the image for every
high-resolution strategy (issue 18: flat from 2K to 8K): for each strategy and square size, one
process fits a tiny tiny-cnn model (tiled and downsample: on two 512 crops, since they predict any size; the
others on two images of that size, since a native tiled ensemble, HiAD and MRF are fitted at
their input size) and saves it, and a fresh process loads it and predicts the synthetic PNG of
that size under ``PeakMemory``. Flat means the call's bytes a pixel stay constant (or fall) as
the image grows: the decoded image (3 B/px) and the float32 map (4 B/px) are the floor.

    PYTHONPATH=. python benchmarks/image_memory.py --strategies downsample tiled tiled-ensemble hiad mrf \
        --strategy-sizes 2048 4096 8192 --name image_memory_scaling_all
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
CONFIG = {
    "backbone": {"name": "tiny-cnn"},
    "detector": {"name": "patchcore"},
    "strategy": {"name": "tiled", "tile": 512},
    "seed": 0,
}


#: the strategies of the scaling table (tiny-cnn, PatchCore where a detector is used)
STRATEGIES: dict[str, dict[str, Any]] = {
    "downsample": {"name": "downsample", "image_size": 512},
    "tiled": {"name": "tiled", "tile": 512},
    "tiled-ensemble": {"name": "tiled-ensemble", "tile": 1024, "stride": 1024},
    "hiad": {"name": "hiad", "patch_size": 512},
    "mrf": {"name": "mrf"},
}


def texture(height: int, width: int, top: int = 0, left: int = 0) -> np.ndarray:
    """A smooth 8-bit RGB texture (a crop at ``top, left`` of one infinite pattern)."""
    ys = np.arange(top, top + height, dtype=np.float32)[:, None]
    xs = np.arange(left, left + width, dtype=np.float32)[None, :]
    base = 128 + 50 * np.sin(xs / 23.0) * np.cos(ys / 31.0) + 20 * np.sin((xs + ys) / 97.0)
    gray = np.clip(base, 0, 245).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2) + np.array([0, 5, 10], np.uint8)


def banded_texture(height: int, width: int, top: int = 0, left: int = 0) -> np.ndarray:
    """:func:`texture` built in bands of rows (its float pattern of a 16K image would take GBs)."""
    image = np.empty((height, width, 3), np.uint8)
    for row in range(0, height, 1024):
        image[row : row + 1024] = texture(min(1024, height - row), width, top + row, left)
    return image


def write_png(path: Path, height: int, width: int) -> None:
    import cv2

    image = banded_texture(height, width)
    side = max(16, min(height, width) // 40)
    image[height // 3 : height // 3 + side, width // 2 : width // 2 + side] = 250  # a defect
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1]):
        raise RuntimeError(f"{path}: could not be written")


def worker(png: Path, out_map: Path) -> dict[str, Any]:
    """Fit the tiny model, then ``predict`` the file under ``PeakMemory``; runs in its own process."""
    import torch

    import hrad
    from hrad.config import load_config
    from hrad.model import AnomalyModel

    torch.manual_seed(0)
    config = load_config(None, CONFIG)
    model = AnomalyModel(config).fit([texture(512, 512, 0, 0).astype(np.float32) / 255, texture(512, 512, 700, 900).astype(np.float32) / 255])
    prediction, measured = measured_predict(model, png)
    np.save(out_map, prediction.anomaly_map)
    return {"hrad": str(Path(hrad.__file__).parent), **measured}


def measured_predict(model: Any, png: Path) -> tuple[Any, dict[str, Any]]:
    """``model.predict(png)`` under ``PeakMemory``: the prediction, and its memory and time figures."""
    from hrad.profiling import PeakMemory

    with PeakMemory(interval=0.01) as memory:
        start_rss_mb = memory.peak_rss_mb
        started = time.perf_counter()
        prediction = model.predict(png)
        seconds = time.perf_counter() - started
    return prediction, {
        "rss_before_mb": start_rss_mb,
        "peak_rss_mb": memory.peak_rss_mb,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "predict_seconds": seconds,
        "score": prediction.score,
    }


def strategy_worker(phase: str, strategy: str, size: int, folder: Path) -> dict[str, Any]:
    """``fit``: fit and save the tiny model of ``strategy`` for ``size``; ``predict``: load it and
    predict the PNG of that size under ``PeakMemory`` (each phase in its own process)."""
    import torch

    from hrad.config import load_config
    from hrad.model import AnomalyModel

    artifact = folder / f"model_{strategy}_{size}"
    if phase == "fit":
        torch.manual_seed(0)
        config = load_config(None, {**CONFIG, "strategy": STRATEGIES[strategy]})
        if strategy in ("tiled", "downsample"):  # any input size: fitted on crops, as the before/after rows
            train = [banded_texture(512, 512), banded_texture(512, 512, 700, 900)]
        else:  # fitted at the size it predicts
            train = [banded_texture(size, size), banded_texture(size, size, 37, 53)]
        # HiAD calibrates its branches on held-out good images; the others need none here
        validation = [banded_texture(size, size, 91, 17)] if strategy == "hiad" else []
        started = time.perf_counter()
        AnomalyModel(config).fit(train, validation=validation).save(artifact)
        return {"fit_seconds": time.perf_counter() - started}
    model = AnomalyModel.load(artifact)
    return measured_predict(model, folder / f"synthetic_{size}x{size}.png")[1]


def run_strategy_worker(phase: str, strategy: str, size: int, folder: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(Path(__file__).resolve()), "--strategy-worker", phase, strategy, str(size), str(folder)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{phase} {strategy} {size} failed ({done.returncode}): {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def scaling(args: argparse.Namespace) -> None:
    """The strategies x sizes table of predict peak memory (``--strategies``)."""
    from hrad.evaluation import environment
    from hrad.reports.markdown import table

    rows: list[dict[str, Any]] = []
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "hrad"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.rstrip()
    with tempfile.TemporaryDirectory(prefix="hrad-image-memory-") as scratch:
        folder = Path(scratch)
        for size in args.strategy_sizes:
            write_png(folder / f"synthetic_{size}x{size}.png", size, size)
            for strategy in args.strategies:
                print(f"[{strategy} {size}] fit ...", file=sys.stderr, flush=True)
                row: dict[str, Any] = {"strategy": strategy, "size": f"{size}x{size}", "megapixels": round(size * size / 1e6, 1)}
                try:
                    row.update(run_strategy_worker("fit", strategy, size, folder))
                    row.update(run_strategy_worker("predict", strategy, size, folder))
                except RuntimeError as error:
                    row["error"] = str(error).strip().splitlines()[-1][:200]
                    print(f"[{strategy} {size}] {row['error']}", file=sys.stderr, flush=True)
                    rows.append(row)
                    continue
                row["increase_mb"] = row["peak_rss_mb"] - row["rss_before_mb"]
                row["bytes_per_pixel"] = row["increase_mb"] * 2**20 / (size * size)
                rows.append(row)
                print(f"[{strategy} {size}] +{row['increase_mb']:.0f} MB ({row['bytes_per_pixel']:.2f} B/px), {row['predict_seconds']:.1f} s", file=sys.stderr, flush=True)
                write_scaling(args, rows, commit, dirty, environment(), table)
            (folder / f"synthetic_{size}x{size}.png").unlink()
    print(RESULTS / f"{args.name}.md")


def marginal_bytes(rows: list[dict[str, Any]]) -> None:
    """``marginal_bytes_per_pixel``: the call's extra peak RSS per extra pixel from the strategy's
    previous (smaller) size; the warm-up constants cancel, so flat = this stays near the floor."""
    previous: dict[str, dict[str, Any]] = {}
    for row in rows:
        if "increase_mb" not in row:
            continue
        before = previous.get(row["strategy"])
        if before is not None:
            pixels = row["megapixels"] * 1e6 - before["megapixels"] * 1e6
            row["marginal_bytes_per_pixel"] = (row["increase_mb"] - before["increase_mb"]) * 2**20 / pixels
        previous[row["strategy"]] = row


def write_scaling(
    args: argparse.Namespace, rows: list[dict[str, Any]], commit: str, dirty: str, env: dict[str, Any], table: Any, command: str | None = None
) -> None:
    """Results so far (rewritten after every row)."""
    command = command or "PYTHONPATH=. python " + " ".join(["benchmarks/image_memory.py", *sys.argv[1:]])
    marginal_bytes(rows)
    notes = (
        "`model.predict(<png path>)` on a synthetic 8-bit RGB PNG (smooth texture, one brighter square) of each size, "
        "tiny-cnn backbone, PatchCore where the strategy uses a detector, default options except: "
        + "; ".join(f"{name} {json.dumps(options)}" for name, options in STRATEGIES.items() if name in args.strategies)
        + ". tiled and downsample are fitted on two 512x512 crops; the others on two images of the size they predict (HiAD "
        "calibrated on a third). One process "
        "fits and saves, a fresh one loads and predicts; RSS sampled every 10 ms. `increase_mb` = peak RSS during the "
        "call minus RSS just before it (model loaded; the call decodes the file and predicts). The floor is the "
        "decoded image (3 B/px) plus the float32 map (4 B/px): flat = `bytes_per_pixel` constant or falling with size. "
        f"Checkout {commit[:10]}" + (f" (uncommitted changes in: {', '.join(line[3:] for line in dirty.splitlines())})" if dirty else "")
        + ". `marginal_bytes_per_pixel`: extra peak per extra pixel from the strategy's previous size (start-up "
        "constants cancel). Seconds are of one run on a shared, loaded 2-core CPU."
    )
    payload = {"command": command, "environment": env, "commit": commit, "notes": notes, "strategies": {k: STRATEGIES[k] for k in args.strategies}, "rows": rows}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=2, default=str))
    columns = ["strategy", "size", "megapixels", "rss_before_mb", "peak_rss_mb", "increase_mb", "bytes_per_pixel", "marginal_bytes_per_pixel", "ru_maxrss_mb", "predict_seconds", "fit_seconds", "error"]
    text = f"# {args.name}\n\n{notes}\n\nData: synthetic, generated by the script (no dataset).\n\nCommand: `{command}`\n\n"
    text += f"Machine: {env['machine']}, {env['cpus']} CPUs, torch {env['torch']} on {env['device']}; date {env['date']}.\n\n"
    text += table(rows, [c for c in columns if any(c in row for row in rows)])
    (RESULTS / f"{args.name}.md").write_text(text)


def run_worker(tree: Path, png: Path, out_map: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(png), str(out_map)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False, cwd=tree)
    if done.returncode != 0:
        raise RuntimeError(f"worker failed ({done.returncode}): {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def extract(revision: str, folder: Path) -> str:
    """The ``hrad`` package as of ``revision`` into ``folder``; returns the full commit id."""
    commit = subprocess.run(["git", "rev-parse", revision], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    archive = folder / "hrad.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), commit, "hrad"], cwd=ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    archive.unlink()
    return commit


def parse_size(text: str) -> tuple[int, int]:
    height, width = (int(part) for part in text.lower().split("x"))
    return height, width


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=["6000x8000"], help="HxW run before and after")
    parser.add_argument("--after-only", nargs="*", default=[], help="HxW run only with this checkout")
    parser.add_argument("--before", default="9b56832~1", help="git revision of the float32-whole path")
    parser.add_argument("--name", default="image_memory")
    parser.add_argument("--strategies", nargs="*", choices=sorted(STRATEGIES), help="run the scaling table instead")
    parser.add_argument("--strategy-sizes", nargs="*", type=int, default=[2048, 4096, 8192], help="square sides")
    parser.add_argument("--rewrite", action="store_true", help="rewrite the scaling table of --name from its JSON")
    args = parser.parse_args()
    if args.strategies:
        scaling(args)
        return
    if args.rewrite:  # the scaling table again from its JSON (same rows and command; columns derived anew)
        from hrad.reports.markdown import table

        payload = json.loads((RESULTS / f"{args.name}.json").read_text())
        args.strategies = list(payload["strategies"])
        found = re.search(r"\(uncommitted changes in: ([^)]*)\)", payload["notes"])
        dirty = "\n".join(f"   {path}" for path in found.group(1).split(", ")) if found else ""
        write_scaling(args, payload["rows"], payload["commit"], dirty, payload["environment"], table, payload["command"])
        return
    from hrad.evaluation import environment
    from hrad.reports.markdown import table

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hrad-image-memory-") as scratch:
        folder = Path(scratch)
        old_tree = folder / "before"
        old_tree.mkdir()
        before_commit = extract(args.before, old_tree)
        after_commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "hrad"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.rstrip()
        plan = [(size, True) for size in args.sizes] + [(size, False) for size in args.after_only]
        for text, with_before in plan:
            height, width = parse_size(text)
            png = folder / f"synthetic_{height}x{width}.png"
            write_png(png, height, width)
            pixels = height * width
            runs: dict[str, dict[str, Any]] = {}
            for label, tree in ([("before", old_tree)] if with_before else []) + [("after", ROOT)]:
                print(f"[{text}] {label} ...", file=sys.stderr, flush=True)
                result = run_worker(tree, png, folder / f"{label}.npy")
                result["increase_mb"] = result["peak_rss_mb"] - result["rss_before_mb"]
                result["bytes_per_pixel"] = result["increase_mb"] * 2**20 / pixels
                runs[label] = result
                rows.append({"size": f"{height}x{width}", "megapixels": round(pixels / 1e6, 1), "png_mb": png.stat().st_size / 2**20, "path": label, **result})
                print(f"[{text}] {label}: +{result['increase_mb']:.0f} MB ({result['bytes_per_pixel']:.2f} B/px), {result['predict_seconds']:.1f} s", file=sys.stderr, flush=True)
            if with_before:
                before_map = np.load(folder / "before.npy")
                after_map = np.load(folder / "after.npy")
                difference = float(np.abs(before_map - after_map).max())
                ratio = runs["before"]["increase_mb"] / runs["after"]["increase_mb"]
                for row in rows[-2:]:
                    row["max_abs_map_difference"] = difference
                    row["map_range"] = float(after_map.max() - after_map.min())
                    row["increase_ratio_before_over_after"] = ratio
                del before_map, after_map
            for label in runs:
                (folder / f"{label}.npy").unlink()
            png.unlink()
    env = environment()
    command = "PYTHONPATH=. python " + " ".join(["benchmarks/image_memory.py", *sys.argv[1:]])
    notes = (
        f"`model.predict(<png path>)` on a synthetic 8-bit RGB PNG (smooth texture, one brighter square), "
        f"tiny-cnn + PatchCore, tiled strategy, 512-pixel tiles, default context and smoothing (sigma 4); one fresh "
        f"process per row, RSS sampled every 10 ms. `increase_mb` = peak RSS during the call minus RSS just before it "
        f"(the model is fitted and loaded; the call decodes the file and predicts). before = the package at "
        f"{before_commit[:10]} (`--before {args.before}`: image decoded to float32 RGB whole, float64 tile merging); "
        f"after = this checkout at {after_commit[:10]}"
        + (f" (uncommitted changes in: {', '.join(line[3:] for line in dirty.splitlines())})" if dirty else "")
        + ". "
        "Speed is not a target here; seconds are of one run on a shared, loaded 2-core CPU."
    )
    columns = ["size", "megapixels", "png_mb", "path", "rss_before_mb", "peak_rss_mb", "increase_mb", "bytes_per_pixel", "ru_maxrss_mb", "predict_seconds", "increase_ratio_before_over_after", "max_abs_map_difference", "map_range"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "environment": env, "before_commit": before_commit, "after_commit": after_commit, "after_dirty": bool(dirty), "notes": notes, "config": CONFIG, "rows": rows}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=2, default=str))
    text = f"# {args.name}\n\n{notes}\n\nData: synthetic, generated by the script (no dataset).\n\nCommand: `{command}`\n\n"
    text += f"Machine: {env['machine']}, {env['cpus']} CPUs, torch {env['torch']} on {env['device']}; date {env['date']}.\n\n"
    text += table(rows, [c for c in columns if any(c in row for row in rows)])
    for row in rows:
        if row["path"] == "after" and "increase_ratio_before_over_after" in row:
            text += (
                f"\n{row['size']}: the call's peak RSS increase is {row['increase_ratio_before_over_after']:.2f}x smaller than "
                f"before; maps differ by at most {row['max_abs_map_difference']:.2g} on a range of {row['map_range']:.3g}.\n"
            )
    (RESULTS / f"{args.name}.md").write_text(text)
    print(RESULTS / f"{args.name}.md")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--strategy-worker":
        print(json.dumps(strategy_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), Path(sys.argv[5]))))
    elif len(sys.argv) == 4 and sys.argv[1] == "--worker":
        print(json.dumps(worker(Path(sys.argv[2]), Path(sys.argv[3]))))
    else:
        main()
