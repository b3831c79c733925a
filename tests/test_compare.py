"""Bootstrap intervals of the image AUROC and ``hrad compare`` over ``hrad evaluate`` reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run
from sklearn.metrics import roc_auc_score

from hrad.comparison import (
    EVALUATION_SCORES,
    compare,
    comparison_markdown,
    read_evaluation,
    same_images,
    write_evaluation_scores,
)
from hrad.errors import InputError
from hrad.metrics import bootstrap_auroc, percentile_interval
from hrad.metrics.image import auroc_pairs


def test_the_pair_matrix_mean_is_the_auroc_with_ties() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(50) < 0.4
    scores = rng.integers(0, 6, 50).astype(float)  # many ties
    assert auroc_pairs(scores, labels).mean() == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_bootstrap_draws_take_exactly_the_values_a_resample_can_have() -> None:
    # defective scores 1 and 3 around one good image at 2: a resample draws the defective pair as
    # (1, 1), (1, 3) or (3, 3): AUROC 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4
    draws = bootstrap_auroc([np.array([1.0, 3.0, 2.0])], np.array([1, 1, 0]), resamples=4000)[:, 0]
    values, counts = np.unique(draws, return_counts=True)
    assert values.tolist() == [0.0, 0.5, 1.0]
    assert counts / counts.sum() == pytest.approx([0.25, 0.5, 0.25], abs=0.03)


def test_paired_draws_make_equal_rankings_differ_by_exactly_zero() -> None:
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(30), np.zeros(20)]
    scores = rng.normal(size=50) + labels
    draws = bootstrap_auroc([scores, 3 * scores + 7], labels, resamples=500)  # same ranking: same AUROC in every resample
    assert np.array_equal(draws[:, 0], draws[:, 1])
    low, high = percentile_interval(draws[:, 0])
    assert low < roc_auc_score(labels, scores) < high
    assert np.array_equal(draws, bootstrap_auroc([scores, 3 * scores + 7], labels, resamples=500))  # seeded
    with pytest.raises(InputError, match="good and defective"):
        bootstrap_auroc([scores[:30]], labels[:30])


def _report(folder: Path, labels: np.ndarray, scores: np.ndarray, names: list[str] | None = None, **metrics: float) -> Path:
    folder.mkdir(parents=True)
    images = names or [f"test/{'bad' if label else 'good'}/{index:03d}.png" for index, label in enumerate(labels)]
    rows = [{"image": image, "defect_type": "x", "label": int(label), "score": float(score)} for image, label, score in zip(images, labels, scores, strict=True)]
    write_evaluation_scores(folder / EVALUATION_SCORES, rows)
    (folder / "metrics.json").write_text(json.dumps({"image_auroc": roc_auc_score(labels, scores), **metrics}))
    return folder


def test_a_clear_difference_is_supported_and_a_tiny_one_is_not(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    labels = np.r_[np.ones(60), np.zeros(40)].astype(int)
    weak = rng.normal(size=100) + 0.3 * labels
    strong = rng.normal(size=100) + 3.0 * labels
    nudged = weak + rng.normal(scale=0.01, size=100)
    result = compare([read_evaluation(_report(tmp_path / name, labels, scores, aupro_30=0.5)) for name, scores in
                      (("weak", weak), ("strong", strong), ("nudged", nudged))])
    assert result["shared_images"] == 100 and (result["defective"], result["good"]) == (60, 40)
    strong_row, nudged_row = result["differences"]
    assert strong_row["supported"] and strong_row["ci95"][0] > 0
    assert not nudged_row["supported"] and nudged_row["ci95"][0] < 0 < nudged_row["ci95"][1]
    assert strong_row["image_auroc_difference"] == pytest.approx(roc_auc_score(labels, strong) - roc_auc_score(labels, weak))
    assert result["models"][0]["aupro_30"] == 0.5


def test_only_shared_images_are_compared_and_labels_must_agree(tmp_path: Path) -> None:
    labels = np.array([1, 1, 0, 0, 1, 0])
    names = [f"img{index}.png" for index in range(6)]
    first = read_evaluation(_report(tmp_path / "a", labels, np.arange(6.0), names))
    second = read_evaluation(_report(tmp_path / "b", labels[:4], np.arange(4.0), names[:4]))
    assert compare([first, second], resamples=200)["shared_images"] == 4
    relabelled = read_evaluation(_report(tmp_path / "c", 1 - labels, np.arange(6.0), names))
    with pytest.raises(InputError, match="labelled otherwise"):
        compare([first, relabelled])
    elsewhere = read_evaluation(_report(tmp_path / "d", labels, np.arange(6.0), [f"other{index}.png" for index in range(6)]))
    with pytest.raises(InputError, match="share no test image"):
        compare([first, elsewhere])


def test_one_test_set_named_from_another_folder_is_matched_by_its_paths_end(tmp_path: Path) -> None:
    """hrad evaluate --data data/capsules and --data /srv/data/capsules (or run elsewhere) name the
    same images with other leading folders: those reports shared no image; other test sets still
    share none, and an ending two images have is no match."""
    labels = np.array([1, 1, 0, 0])
    ends = ["test/bad/000.png", "test/bad/001.png", "test/good/000.png", "test/good/001.png"]
    here = read_evaluation(_report(tmp_path / "here", labels, np.array([4.0, 3.0, 2.0, 1.0]), [f"data/capsules/{end}" for end in ends]))
    there = read_evaluation(_report(tmp_path / "there", labels, np.array([1.0, 2.0, 3.0, 4.0]), [f"/srv/data/capsules/{end}" for end in ends]))
    result = compare([here, there], resamples=200)
    assert result["shared_images"] == 4 and result["matched_by_path_ending"] == 4
    assert [model["image_auroc_shared"] for model in result["models"]] == [1.0, 0.0]
    assert "4 of them matched by the end of their path" in comparison_markdown(result)
    inside = read_evaluation(_report(tmp_path / "inside", labels, np.arange(4.0), [f"../capsules/{end}" for end in ends]))
    assert compare([there, inside], resamples=200)["shared_images"] == 4
    other = read_evaluation(_report(tmp_path / "other", labels, np.arange(4.0), [f"data/bottle/{end}" for end in ends]))
    with pytest.raises(InputError, match="share no test image"):
        compare([here, other])
    assert same_images(["a/test/x.png", "b/test/x.png"], ["test/x.png"]) == ({}, 0)  # which one: neither
    assert same_images(["test/x.png"], ["c/test/x.png", "d/test/x.png"]) == ({}, 0)  # two claim one: neither


def test_scores_round_trip_paths_with_commas(tmp_path: Path) -> None:
    labels = np.array([1, 0])
    evaluation = read_evaluation(_report(tmp_path / "r", labels, np.array([0.5, 0.25]), ["a,b.png", 'c"d.png']))
    assert evaluation.scores == {"a,b.png": 0.5, 'c"d.png': 0.25} and evaluation.labels == {"a,b.png": 1, 'c"d.png': 0}


def test_cli_prints_the_comparison_and_writes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(3)
    labels = np.r_[np.ones(20), np.zeros(20)].astype(int)
    one = _report(tmp_path / "one", labels, rng.normal(size=40))
    two = _report(tmp_path / "two", labels, rng.normal(size=40) + 4 * labels)
    assert run(["compare", str(one), str(two), "--out", str(tmp_path / "cmp"), "--names", "base,better"], monkeypatch) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("# hrad compare") and "**better**" in printed.out and ": supported." in printed.out
    assert "comparison written to" in printed.err
    assert (tmp_path / "cmp" / "comparison.md").read_text() == printed.out.rstrip("\n") + "\n"
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["models"][1]["name"] == "better"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda folder: None, "not a folder"),
        (lambda folder: folder.mkdir(), "metrics.json: missing"),
        (lambda folder: (folder.mkdir(), (folder / "metrics.json").write_text("{}")), "scores.csv: missing"),
        (lambda folder: (folder.mkdir(), (folder / "metrics.json").write_text("[1]")), "not the metrics"),
        (lambda folder: (folder.mkdir(), (folder / "metrics.json").write_text("{}"), (folder / "scores.csv").write_text("a,b\n")), "not the scores.csv"),
        (
            lambda folder: (folder.mkdir(), (folder / "metrics.json").write_text("{}"), (folder / "scores.csv").write_text("image,defect_type,label,score\nx,y,2,0.1\n")),
            "line 2: label must be 0 or 1",
        ),
    ],
)
def test_cli_refuses_what_is_not_a_report_in_one_line(
    setup: object, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _report(tmp_path / "good", np.array([1, 0]), np.array([1.0, 0.0]))
    bad = tmp_path / "bad"
    setup(bad)  # type: ignore[operator]
    assert run(["compare", str(good), str(bad)], monkeypatch) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("names", ["a,a", "a,"])
def test_names_must_be_given_one_per_report(names: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    reports = [str(_report(tmp_path / folder, np.array([1, 0]), np.array([1.0, 0.0]))) for folder in ("x", "y")]
    assert run(["compare", *reports, "--names", names], monkeypatch) == 2
    assert "every report needs a name of its own" in capsys.readouterr().err
