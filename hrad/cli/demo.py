"""``hrad demo``: the whole job on a built-in default, in a few minutes on a 2-core CPU.

It writes a synthetic 2048x2048 dataset (scikit-image textures with generated scratches,
spots, cracks and stains, exact masks), fits the same detector twice — uniform downsampling
to 256 and full-resolution tiles — evaluates both at full resolution and writes a report that
shows what full resolution gains on small defects. The result table and the verdict on the
difference go to stdout, progress and messages to stderr.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import typer
from rich.text import Text

from hrad import strict_json
from hrad.cli.progress import console, progress_bars
from hrad.comparison import compare, differences_markdown, read_evaluation
from hrad.config import load_config
from hrad.data.datasets import load_dataset
from hrad.data.images import ImageList, prepare_output_dir
from hrad.data.synthetic import check_demo_size, make_demo_dataset
from hrad.evaluation import environment, evaluate
from hrad.model import AnomalyModel
from hrad.profiling import PeakMemory
from hrad.reports.markdown import table
from hrad.staging import move_into_place, staging_beside

SETUPS: dict[str, dict[str, Any]] = {
    "downsample-256": {"name": "downsample", "image_size": 256},
    "tiled-512": {"name": "tiled", "tile": 512, "stride": 512},
}
#: a smaller memory bank than the library default keeps the demo to a few minutes on 2 cores
DEMO_DETECTOR: dict[str, Any] = {"name": "patchcore", "max_fit_patches": 60_000, "max_bank_size": 6_000}
COLUMNS = ["setup", "image_auroc", "pixel_auroc", "pixel_ap", "aupro_30", "aupro_05", "aupro_30_q1", "fit_seconds", "seconds_per_image", "peak_rss_mb"]


def run_demo(out: Path, size: int = 2048, backbone: str = "efficientnet-lite0") -> dict[str, dict[str, Any]]:
    """The demo into ``out``; its dataset (``out/data``) is made once, and used again by a later run."""
    check_demo_size(size)  # before the line that says it writes one
    prepare_output_dir(out)  # an unwritable --out is one line, not a traceback from the first image
    data_dir = out / "data"
    if not (data_dir / "train").is_dir():
        console.print(f"writing synthetic {size}x{size} dataset to {data_dir}")
        # built beside and moved into place: a run stopped while writing (minutes at 2048) left a
        # data/ with some images, which the next run took for the whole dataset
        staging = staging_beside(data_dir)
        try:
            make_demo_dataset(staging, image_size=size)
            move_into_place(staging, data_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    dataset = load_dataset(data_dir)
    results: dict[str, dict[str, Any]] = {}
    for setup, strategy in SETUPS.items():
        config = load_config(None, {"backbone": {"name": backbone}, "detector": DEMO_DETECTOR, "strategy": strategy})
        console.print(Text.assemble((setup, "bold"), f": fitting PatchCore on {len(dataset.train)} images"))
        with progress_bars() as progress, PeakMemory() as fit_memory:
            model = AnomalyModel(config).fit(ImageList(dataset.train), progress=progress)
        model.save(out / "models" / setup)
        with progress_bars() as progress:
            metrics = evaluate(model, dataset.test, out / "report" / setup, progress=progress)
        metrics["fit_seconds"] = fit_memory.seconds
        metrics["peak_rss_mb"] = max(metrics["peak_rss_mb"], fit_memory.peak_rss_mb)
        results[setup] = metrics
    rows = [{"setup": name, **values} for name, values in results.items()]
    report = "# hrad demo\n\n"
    report += f"Synthetic {size}x{size} images ({len(dataset.train)} train, {len(dataset.test)} test), PatchCore on {backbone}.\n"
    report += "Pixel metrics exact at full resolution; `aupro_30_q1` is AUPRO on the smallest quarter of defects.\n\n"
    report += table(rows, COLUMNS)
    # how sure the image-level difference is on this few test images (hrad compare's paired bootstrap)
    difference = differences_markdown(compare([read_evaluation(out / "report" / name) for name in results]))
    report += "\n## Is the image AUROC difference real?\n\n" + difference
    report += "\nCase pictures: " + ", ".join(f"[{name}](report/{name}/cases.png)" for name in results) + "\n"
    (out / "README.md").write_text(report)
    (out / "results.json").write_text(strict_json.dumps({"environment": environment(), "results": results}, indent=2, default=str))
    # the command's result on stdout (`hrad demo > demo.md` keeps it), as hrad evaluate's and compare's; messages on stderr
    typer.echo(table(rows, COLUMNS))
    typer.echo(difference.rstrip())
    console.print(f"report: {out / 'README.md'}")
    return results
