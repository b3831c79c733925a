"""``hrad compare``: reports of ``hrad evaluate`` side by side, with how sure each difference is
(:mod:`hrad.comparison`; no model runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hrad import strict_json
from hrad.cli.progress import console
from hrad.errors import ConfigError


def compare(
    reports: Annotated[list[Path], typer.Argument(help="Report folders written by hrad evaluate (--out), on the same test set; the first is the baseline")],
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for comparison.md and comparison.json (default: print only): new, empty, or an earlier comparison, replaced whole"),
    ] = None,
    names: Annotated[
        str | None, typer.Option(metavar="A,B,...", help="Names of the models, comma-separated, in the reports' order (default: the folders' names)")
    ] = None,
    resamples: Annotated[int, typer.Option(min=100, metavar="N", help="Bootstrap resamples of the test set")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the resampling (the same seed gives the same intervals)")] = 0,
) -> None:
    """Compare models evaluated on the same test images: their metrics side by side, and each
    model's image AUROC against the first's with a 95% interval from a paired bootstrap over
    the shared images. An interval that includes 0 is a difference this test set does not
    support. The comparison (Markdown) goes to stdout."""
    from hrad.comparison import COMPARISON_REPORT, comparison_markdown, read_evaluation
    from hrad.comparison import compare as run_comparison
    from hrad.data.images import atomic_write_bytes

    given = [name.strip() for name in names.split(",")] if names is not None else None
    if given is not None and len(given) != len(reports):
        raise ConfigError(f"--names gives {len(given)} names for {len(reports)} reports")
    if given is not None and not all(given):  # two equal names are refused with the reports' (hrad.comparison.compare)
        raise ConfigError(f"--names {names!r}: every report needs a name of its own")
    if out is not None:  # before the reports are read: new, empty or an earlier comparison (replaced whole)
        COMPARISON_REPORT.check(out, reports)
    evaluations = [read_evaluation(folder, given[index] if given else None) for index, folder in enumerate(reports)]
    result = run_comparison(evaluations, resamples=resamples, seed=seed)
    text = comparison_markdown(result)
    typer.echo(text)
    if out is not None:
        with COMPARISON_REPORT.staged(out) as staging:
            atomic_write_bytes(staging / "comparison.md", text.encode("utf-8"))
            atomic_write_bytes(staging / "comparison.json", strict_json.dumps(result, indent=2).encode("utf-8"))
        console.print(f"comparison written to {out}")
