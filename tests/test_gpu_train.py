"""benchmarks/gpu_train.py's plumbing on the CPU: its smoke setting, students and PatchCore rows
on synthetic images (the GPU run itself needs a lent GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_smoke_run_writes_students_and_patchcore_rows_at_paper_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import common, gpu_train

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    plotted: list[Path] = []  # matplotlib's layout costs more than the tiny run: record the call only
    monkeypatch.setattr(common, "plot_loss_curves", lambda rows, path: plotted.append(path))
    gpu_train.main(
        [
            "--smoke",
            "--source",
            "synthetic",
            "--only",
            "down56",
            "--varad-sides",
            "--n-test",
            "4",
            "--out",
            "smoke",
        ]
    )
    result = json.loads((tmp_path / "smoke.json").read_text())
    rows = {row["setup"]: row for row in result["rows"]}
    assert set(rows) == {"students/tiny-vit/down56", "patchcore/tiny-vit/down56"}
    for row in rows.values():
        assert "error" not in row and row["images"] == 4 and row["train_images"] == 4
        assert 0 <= row["image_auroc"] <= 1 and 0 <= row["aupro_30"] <= 1
    students = rows["students/tiny-vit/down56"]
    detector = students["config"]["detector"]
    # every token of the 4 training images kept (56 px / 14 = 4 x 4 tokens), one image per step
    assert detector["max_tokens"] == 4 * 16 and detector["batch_images"] == 1
    assert detector["precision"] == "auto" and detector["learning_rate"] == 1e-3
    assert len(students["loss_curve"]["train"]) == 2 == students["epochs"]
    assert "SMOKE" in result["notes"] and (tmp_path / "smoke.md").is_file()
    assert plotted[-1] == tmp_path / "smoke_loss.png"
