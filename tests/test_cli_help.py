"""Every help page reads whole at 80 columns: no line wider, nothing cut with '…', every option
name and every word of every option's help shown intact (Rich truncates a cell that does not
fit its column, and folds words in the type column, when other columns are wide)."""

from __future__ import annotations

import re

import pytest
import typer
from cli_helpers import run as run_cli

from hrad.cli.main import app

GROUP = typer.main.get_command(app)  # a group of whichever click typer ships (its own, in newer typer)
COMMANDS: list[str] = sorted(GROUP.commands)  # type: ignore[attr-defined]


def shown_tokens(page: str) -> set[str]:
    """The words of a help page, without the panels' box drawing."""
    return set(re.sub(r"[│╭╮╰╯─]", " ", page).split())


def help_words(text: str) -> set[str]:
    """The words of a help text as the markdown mode shows them (code spans lose their backticks)."""
    return set(text.replace("`", "").split())


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_every_help_page_reads_whole_at_80_columns(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """hrad serve's --health-details was '--no-health-de…' and predict-distributed's
    --gpus-per-worker '--gpus-per-work…' (their '<float range> [x>=0.0]' types widened their
    column); evaluate's help cut a path to 'benchmarks/results/…'; predict's --pixel-threshold
    was '--pixel-thresho…'."""
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.delenv("LINES", raising=False)
    capsys.readouterr()
    assert run_cli([*([command] if command else []), "--help"], monkeypatch) == 0
    out = capsys.readouterr().out
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80, out
    shown = shown_tokens(out)
    target = GROUP.commands[command] if command else GROUP  # type: ignore[attr-defined]
    for param in target.params:
        for name in [*param.opts, *param.secondary_opts]:
            if name.startswith("-"):
                assert name in shown, (name, out)
        help_text = getattr(param, "help", None) or ""
        missing = help_words(help_text) - shown
        assert not missing, (param.name, missing, out)
    if command == "predict":
        assert "<stem>_regions.json" in "".join(out.split())  # markdown mode read '<stem>' as a tag and dropped it
