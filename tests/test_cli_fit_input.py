"""hrad fit on a user's own folder of good images: settings and files a first day gets wrong."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run, write
from conftest import textured_image

#: a seconds-long fit: tiny backbone, the Gaussian test detector
TINY = ["--backbone", "tiny-cnn", "--detector", "test-gaussian"]


def good_folder(folder: Path, count: int = 5, height: int = 64, width: int = 96) -> Path:
    rng = np.random.default_rng(3)
    for index in range(count):
        write(folder / f"{index:03d}.png", textured_image(rng, height, width))
    return folder


def errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("hrad: error:")]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (["--strategy", "tiled", "--tile", "1024"], "the 96x64 image padded to a 1024x1024 tile is 1024x1024 = 1048576 pixels"),
        (["--strategy", "downsample", "--image-size", "1024"], "the 96x64 image resized to image_size is 1024x1024 = 1048576 pixels"),
        (["--strategy", "tiled", "--image-size", "2048", "--tile", "64"], "the 96x64 image resized to image_size is 2048x1365"),
        (["--strategy", "mrf", "--set", "strategy.pixel_budget=1000000"], "the 96x64 image at scale 0.5 of strategy.pixel_budget 1000000 is "),
    ],
)
def test_a_tile_or_image_size_far_over_the_images_is_refused_in_one_line(
    setting: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--tile 100000 (or --image-size 100000) over 1500x1000 capsules asked for 120 GB and died in
    a traceback; the working image is held to the pixel budget (here lowered to keep it cheap)."""
    folder = good_folder(tmp_path / "good")
    model = tmp_path / "m"
    code = run(["--max-pixels", "200000", "fit", "--data", str(folder), "--out", str(model), *TINY, *setting], monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert errors(err) == [f"hrad: error: {message}" + errors(err)[0].split(message, 1)[1]]
    assert "over the pixel budget of 200000" in err and not model.exists()


def test_a_training_image_far_smaller_than_the_others_is_refused_as_predict_refuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A thumbnail among the good images (60x40 among 1500x1000 capsules) was learned without a
    word when the split put it in training, and refused only when it was held out."""
    folder = good_folder(tmp_path / "good")
    write(folder / "001_thumb.png", textured_image(np.random.default_rng(4), 6, 9))
    model = tmp_path / "m"
    assert run(["fit", "--data", str(folder), "--out", str(model), *TINY], monkeypatch) == 2
    err = capsys.readouterr().err
    assert errors(err) == [
        f"hrad: error: {folder / '001_thumb.png'}: image is 9x6, its short side is under 1/8 of the 96x64 images the model "
        f"was fitted on (set by {folder / '000.png'}, the first training image); resize it to that scale"
    ]
    assert "Traceback" not in err and not model.exists()


def test_a_thumbnail_that_is_the_first_training_image_is_refused_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 1x1 image sorted first set the fitted size: every full image was larger, so none was
    refused, and the model was fitted (and said fitted_size 1x1) without a word."""
    folder = good_folder(tmp_path / "good")
    write(folder / "0.png", np.zeros((1, 1, 3)))
    model = tmp_path / "m"
    assert run(["fit", "--data", str(folder), "--out", str(model), *TINY], monkeypatch) == 2
    err = capsys.readouterr().err
    assert errors(err) == [
        f"hrad: error: {folder / '0.png'}: image is 1x1, the first training image (it sets the size the model is fitted on), "
        f"its short side under 1/8 of {folder / '000.png'}'s 96x64; resize it to the others' scale or leave it out"
    ]
    assert "Traceback" not in err and not model.exists()


def test_fit_ends_with_its_thresholds_how_many_images_set_them_and_what_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Five good images hold out one, whose score is the image threshold; the fit said only
    'model written to m', the thresholds and their roughness were left for hrad info to tell."""
    folder = good_folder(tmp_path / "good")
    model = tmp_path / "m"
    assert run(["fit", "--data", str(folder), "--out", str(model), *TINY], monkeypatch) == 0
    lines = capsys.readouterr().err.splitlines()
    thresholds = json.loads((model / "hrad.json").read_text())["thresholds"]
    assert lines[-3:] == [
        f"thresholds from 1 held-out normal image at 3 sigmas: image {thresholds['image']:.6g}, pixel "
        f"{thresholds['pixel']:.6g} (rough: a mean and std of 1 score; fit on more good images, or run hrad calibrate on 10 or more)",
        f"model written to {model}",
        f"next: hrad predict --model {model} IMAGES --out FOLDER (hrad info {model}: what the model is)",
    ]
    big = good_folder(tmp_path / "big", count=50, height=32, width=32)  # 10 held out: no roughness said
    spaced = tmp_path / "line 2 modèle"  # the next command is quoted: pasted as printed, it names the model
    assert run(["fit", "--data", str(big), "--out", str(spaced), *TINY], monkeypatch) == 0
    lines = capsys.readouterr().err.splitlines()
    said = [line for line in lines if line.startswith("thresholds from 10 held-out normal images at 3 sigmas: ")]
    assert len(said) == 1 and "rough" not in said[0]
    assert shlex.split(lines[-1].removeprefix("next: ").split(" (")[0]) == ["hrad", "predict", "--model", str(spaced), "IMAGES", "--out", "FOLDER"]


def test_images_in_subfolders_of_a_plain_folder_are_said_to_be_unused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """good/ with a camera's day folders under it: the fit learned from the top-level images only,
    without a word. A symbolic link loop (up -> ..) and a hidden folder are not walked."""
    folder = good_folder(tmp_path / "good")
    rng = np.random.default_rng(5)
    for name in ("line1/day1/a.png", "line1/day2/b.jpg", "line2/c.png"):
        write(folder / name, textured_image(rng, 64, 96))
    write(folder / ".thumbs" / "d.png", textured_image(rng, 64, 96))
    (folder / "up").symlink_to("..")
    assert run(["fit", "--data", str(folder), "--out", str(tmp_path / "m"), *TINY], monkeypatch) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hrad: warning:")]
    assert warnings == [
        f"hrad: warning: {folder}: 3 images in its subfolders (line1, line2) not used: a folder of good images is the "
        "images directly in it (5 here); move them there to train on them"
    ]


@pytest.mark.parametrize("bad", ["empty", "text", "over the budget"])
def test_a_bad_file_among_the_good_images_is_refused_before_the_fit_starts(
    bad: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty file, a text file named .png or a header over the pixel budget sorted last among
    300 good images stopped the fit after the 299 others were embedded (minutes to hours); their
    headers are read first now (a truncated file's pixels still only when it is read)."""
    folder = good_folder(tmp_path / "good")
    path = folder / "zz.png"
    if bad == "empty":
        path.write_bytes(b"")
    elif bad == "text":
        path.write_text("a note, not an image\n")
    else:
        write(path, textured_image(np.random.default_rng(6), 100, 100))
    code = run(["--max-pixels", "9000", "fit", "--data", str(folder), "--out", str(tmp_path / "m"), *TINY], monkeypatch)
    err = capsys.readouterr().err
    reason = {"empty": "empty file", "text": "not a readable image", "over the budget": "image is 100x100 = 10000 pixels, over the pixel budget of 9000"}[bad]
    assert code == 2 and errors(err)[0].startswith(f"hrad: error: {path}: {reason}")
    assert "fitting" not in err and "embedding" not in err and "Traceback" not in err


def test_a_fit_into_a_model_says_it_replaces_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The same --out twice (yesterday's model, a typo'd name) replaced the model without a word."""
    folder = good_folder(tmp_path / "good")
    model = tmp_path / "m"
    args = ["fit", "--data", str(folder), "--out", str(model), *TINY]
    assert run(args, monkeypatch) == 0
    assert "holds a model" not in capsys.readouterr().err
    assert run(args, monkeypatch) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[1] == f"{model} holds a model already: this fit replaces it when it ends"


@pytest.mark.parametrize(
    ("config", "options", "message"),
    [
        (
            "strategy: {name: tiled, tile: 64, strid: 64}\n", [],
            "invalid config at strategy.strid: Extra inputs are not permitted (strategy 'tiled' has no option 'strid': "
            "did you mean stride? hrad options strategy tiled lists its options)",
        ),
        (
            "backbon: {name: tiny-cnn}\n", [],
            "invalid config at backbon: Extra inputs are not permitted (a model config has no section or field 'backbon': "
            "did you mean backbone? its sections and fields: backbone, detector, strategy, postprocess, threshold, bit_depth, device, seed)",
        ),
        (
            None, ["--tile", "64"],  # no --strategy: the default, downsample, has no tile
            "invalid config at strategy.tile: Extra inputs are not permitted (strategy 'downsample' has no option 'tile'; "
            "tile is an option of tiled, tiled-ensemble: choose one with --strategy or strategy.name)",
        ),
        (
            None, ["--set", "strategy.tiel=64"],  # misspelt too: the strategies that have the likely option
            "invalid config at strategy.tiel: Extra inputs are not permitted (strategy 'downsample' has no option 'tiel'; "
            "did you mean tile? tile is an option of tiled, tiled-ensemble: choose one with --strategy or strategy.name)",
        ),
        (
            None, ["--set", "detector.n_features=8"],  # --detector given (TINY): that choice stands, padim is not offered
            "invalid config at detector.n_features: Extra inputs are not permitted (detector 'test-gaussian' has no option "
            "'n_features'; hrad options detector test-gaussian lists its options)",
        ),
        (
            None, ["--strategy", "hiad", "--image-size", "512"],  # no resize in HiAD: patch_size is no likely meaning
            "invalid config at strategy.image_size: Extra inputs are not permitted (strategy 'hiad' has no option "
            "'image_size'; hrad options strategy hiad lists its options)",
        ),
        (
            None, ["--set", "threshold.sigma=4"],
            "invalid config at threshold.sigma: Extra inputs are not permitted (threshold has no option 'sigma': did you "
            "mean sigmas? hrad options threshold lists them)",
        ),
    ],
)
def test_an_unknown_option_says_which_section_it_is_not_in_and_the_likely_one(
    config: str | None, options: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """'invalid config at strategy.strid: Extra inputs are not permitted' named neither the strategy
    nor what was meant; --tile without --strategy read the same against the default strategy."""
    folder = good_folder(tmp_path / "good", count=2)
    args = ["fit", "--data", str(folder), "--out", str(tmp_path / "m"), *TINY, *options]
    prefix = ""
    if config is not None:
        (tmp_path / "model.yaml").write_text(config)
        args += ["--config", str(tmp_path / "model.yaml")]
        prefix = f"{tmp_path / 'model.yaml'}: "
    assert run(args, monkeypatch) == 2
    assert errors(capsys.readouterr().err) == [f"hrad: error: {prefix}{message}"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfestrategy: tiled\n", "not a YAML or JSON text file (byte 0 is not UTF-8)"),  # UTF-16, a binary file
        (b"strategy:\n  name: tiled\n  tile: 64\n# caf\xe9\n", "not a YAML or JSON text file (byte 40 is not UTF-8)"),  # Latin-1
        # PyYAML's first line only, its context: "not valid YAML (while parsing a block mapping)", no problem, no line
        (b"strategy:\n  name: tiled\n tile: 64\n", "not valid YAML at line 3, column 2 (expected <block end>, but found '<block mapping start>')"),
        (b"backbone: [\n", "not valid YAML at line 2, column 1 (expected the node content, but found '<stream end>')"),
    ],
)
def test_a_config_file_that_is_not_utf8_text_or_not_yaml_is_one_line(
    content: bytes, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config saved as UTF-16 (Windows Notepad) or Latin-1 was a UnicodeDecodeError traceback; bad YAML says what and where."""
    config = tmp_path / "config.yaml"
    config.write_bytes(content)
    model = tmp_path / "m"
    assert run(["fit", "--data", str(good_folder(tmp_path / "good")), "--out", str(model), "--config", str(config), *TINY], monkeypatch) == 2
    assert errors(capsys.readouterr().err) == [f"hrad: error: {config}: {message}"] and not model.exists()


@pytest.mark.parametrize(
    "content",
    ["", "# every line commented out\n# strategy: {name: tiled}\n", "---\n", "strategy:\n#  name: tiled\n#  tile: 64\n"],
)
def test_an_empty_or_comments_only_config_file_is_the_defaults(
    content: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--config empty.yaml (or one with every line, or a section's every line, commented out) was
    'expected a mapping with backbone/detector/strategy sections': YAML reads it as nothing, which a
    user means as no settings; the flags still apply on top."""
    from hrad.config import load_config

    config = tmp_path / "model.yaml"
    config.write_text(content)
    assert load_config(config) == load_config(None)
    assert load_config(config, {"strategy": {"name": "tiled", "tile": 64}}) == load_config(None, {"strategy": {"name": "tiled", "tile": 64}})
    model = tmp_path / "m"
    assert run(["fit", "--data", str(good_folder(tmp_path / "good")), "--out", str(model), "--config", str(config), *TINY], monkeypatch) == 0
    assert errors(capsys.readouterr().err) == []
    saved = json.loads((model / "hrad.json").read_text())["config"]
    assert saved["strategy"] == load_config(None).strategy.model_dump(mode="json")


def test_a_folder_given_as_the_config_file_is_named_as_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """--config good/ said 'config file not found' of a folder that is there."""
    folder = good_folder(tmp_path / "good")
    assert run(["fit", "--data", str(folder), "--out", str(tmp_path / "m"), "--config", str(folder), *TINY], monkeypatch) == 2
    assert errors(capsys.readouterr().err) == [f"hrad: error: {folder}: a folder, not a config file (give the YAML or JSON file)"]


@pytest.mark.parametrize(
    ("config", "options", "message"),
    [
        ("strategy: {name: tilled}\n", [], "{file}: unknown strategy 'tilled'; known: downsample, hiad, mrf, tiled, tiled-ensemble (did you mean tiled?)"),
        ("backbone: {name: lite0}\n", ["--detector", "test-gaussian"], "{file}: unknown backbone 'lite0'; known: dinov2-vitb14"),
        ("strategy: {name: tilled}\n", ["--strategy", "tiledd"], "unknown strategy 'tiledd'; known: "),  # the flag's, not the file's
        (None, ["--backbone", "tinycnn"], "unknown backbone 'tinycnn'; known: "),
        (None, ["--detector", "patchcor"], "unknown detector 'patchcor'; known: "),
    ],
)
def test_an_unknown_name_is_refused_before_the_fit_naming_the_config_file_it_came_from(
    config: str | None, options: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """'unknown strategy 'tilled'' did not name the YAML it was in; an unknown backbone was found
    when the model was built, after 'fitting ...' and the images' headers."""
    folder = good_folder(tmp_path / "good", count=2)
    args = ["fit", "--data", str(folder), "--out", str(tmp_path / "m"), *options]
    if config is not None:
        (tmp_path / "model.yaml").write_text(config)
        args += ["--config", str(tmp_path / "model.yaml")]
    assert run(args, monkeypatch) == 2
    err = capsys.readouterr().err
    assert errors(err)[0].startswith("hrad: error: " + message.format(file=tmp_path / "model.yaml")) and "fitting" not in err
    meant = {"tilled": "tiled", "tiledd": "tiled", "lite0": "efficientnet-lite0", "tinycnn": "tiny-cnn", "patchcor": "patchcore"}
    given = message.split("'")[1]
    assert errors(err)[0].endswith(f"(did you mean {meant[given]}?)")  # a near miss: what was meant is said


def test_a_weights_file_for_a_seeded_backbone_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """tiny-cnn ignored --weights and fitted on its seeded random weights without a word."""
    folder = good_folder(tmp_path / "good", count=2)
    weights = tmp_path / "mine.pt"
    weights.write_bytes(b"weights")
    assert run(["fit", "--data", str(folder), "--out", str(tmp_path / "m"), *TINY, "--weights", str(weights)], monkeypatch) == 2
    assert errors(capsys.readouterr().err) == [
        f"hrad: error: {weights}: backbone 'tiny-cnn' takes no weights file (seeded random weights, for tests); leave --weights "
        "out or give a pretrained backbone (hrad list)"
    ]


def test_a_bad_region_of_interest_is_refused_before_the_fit_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An all-black --roi mask was read inside the fit, after 'fitting ...' and the backbone's
    loading (seconds to a minute for DINOv2 or Wide ResNet-50)."""
    folder = good_folder(tmp_path / "good", count=2)
    mask = tmp_path / "roi.png"
    write(mask, np.zeros((64, 96, 3)))
    assert run(["fit", "--data", str(folder), "--out", str(tmp_path / "m"), *TINY, "--roi", str(mask)], monkeypatch) == 2
    err = capsys.readouterr().err
    assert errors(err) == [f"hrad: error: {mask}: the region of interest is empty (no non-zero pixel), so nothing would be inspected"]
    assert "fitting" not in err


def test_a_symbolic_link_loop_among_the_images_is_called_a_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """a.png -> b.png -> a.png was 'broken symbolic link (its target b.png does not exist)', though b.png is there."""
    folder = good_folder(tmp_path / "good", count=2)
    (folder / "a.png").symlink_to("b.png")
    (folder / "b.png").symlink_to("a.png")
    assert run(["fit", "--data", str(folder), "--out", str(tmp_path / "m"), *TINY], monkeypatch) == 2
    assert errors(capsys.readouterr().err) == [f"hrad: error: {folder / 'a.png'}: symbolic link loop (it points to b.png, which leads back to it)"]


def test_one_image_is_one_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """'fitting ... on 1 images of good', '(1 training images, ...)'."""
    folder = good_folder(tmp_path / "good", count=1)
    assert run(["fit", "--data", str(folder), "--out", str(tmp_path / "m"), *TINY], monkeypatch) == 0
    err = capsys.readouterr().err
    assert f"fitting test-gaussian / downsample on 1 image of {folder}\n" in err and "(1 training image, threshold" in err


def test_images_at_the_budget_keep_their_zero_padding_under_a_tile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tile_edge zeros pads less than a tile past the image (virtually, for a file's pixels): an
    image at the pixel budget is not refused for it; only a tile larger than the image is checked."""
    folder = good_folder(tmp_path / "good")  # 96x64 = 6144 pixels, the budget below
    args = ["--max-pixels", "6144", "fit", "--data", str(folder), "--out", str(tmp_path / "m"), *TINY,
            "--strategy", "tiled", "--tile", "64", "--stride", "48", "--set", "strategy.tile_edge=zeros"]  # fmt: skip
    assert run(args, monkeypatch) == 0


@pytest.mark.parametrize("failure", ["no data", "truncated image", "interrupted"])
def test_a_failed_fit_leaves_no_folder_it_made(
    failure: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """hrad fit --out a/b/c/model that failed after --out was checked (a data folder not there, a
    training image found truncated when read, Ctrl-C) left the a/b/c it made to check --out; it
    removes them again, but never a folder that was there (``kept``) or that holds anything."""
    folder = good_folder(tmp_path / "good")
    kept = tmp_path / "kept"
    kept.mkdir()
    out = kept / "a" / "b" / "c" / "model"
    data = tmp_path / "missing" if failure == "no data" else folder
    if failure == "truncated image":
        png = (folder / "004.png").read_bytes()
        (folder / "004.png").write_bytes(png[: len(png) // 2])
    if failure == "interrupted":
        from hrad.model import AnomalyModel

        def interrupted(*args: object, **kwargs: object) -> None:
            (kept / "a" / "note.txt").write_text("written meanwhile\n")  # a/ now holds something else
            raise KeyboardInterrupt

        monkeypatch.setattr(AnomalyModel, "fit", interrupted)
    code = run(["fit", "--data", str(data), "--out", str(out), *TINY], monkeypatch)
    err = capsys.readouterr().err
    assert code == (130 if failure == "interrupted" else 2) and "Traceback" not in err
    left = sorted(str(path.relative_to(kept)) for path in kept.rglob("*"))
    assert left == (["a", "a/note.txt"] if failure == "interrupted" else [])


def test_only_the_folders_the_check_made_are_removed_and_only_while_empty(tmp_path: Path) -> None:
    """x/../there/model: x is made (and removed), there was there and stays though empty; a
    folder made that holds a file afterwards stays, and so do the folders above it."""
    from hrad.artifact import check_artifact_target, remove_created

    (tmp_path / "there").mkdir()
    created = check_artifact_target(tmp_path / "x" / ".." / "there" / "model")
    assert created == [tmp_path / "x"]
    remove_created(created)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["there"]
    created = check_artifact_target(tmp_path / "a" / "b" / "c" / "model")
    assert created == [tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"]
    (tmp_path / "a" / "b" / "kept.txt").write_text("")
    remove_created(created)
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == ["a", "a/b", "a/b/kept.txt", "there"]


@pytest.mark.parametrize("link", ["loop", "dangling", "dangling category"])
def test_a_data_folder_that_is_a_broken_link_is_called_what_it_is(
    link: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--data a link loop or a link to a missing folder said 'dataset folder not found', though the
    name is there; it now names the loop or the missing target, as for a link among the images."""
    (tmp_path / "one").symlink_to("two")
    (tmp_path / "two").symlink_to("one")
    (tmp_path / "old").symlink_to("moved/good")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "bottle").symlink_to("../moved/bottle")
    data, category, message = {
        "loop": ("one", [], "one: symbolic link loop (it points to two, which leads back to it)"),
        "dangling": ("old", [], "old: broken symbolic link (its target moved/good does not exist)"),
        "dangling category": ("root", ["--category", "bottle"], "root/bottle: broken symbolic link (its target ../moved/bottle does not exist)"),
    }[link]
    code = run(["fit", "--data", str(tmp_path / data), *category, "--out", str(tmp_path / "m"), *TINY], monkeypatch)
    assert code == 2
    assert errors(capsys.readouterr().err) == [f"hrad: error: {tmp_path}/{message}"]


@pytest.mark.parametrize("kind", ["png", "tiff"])
def test_a_truncated_image_is_one_line_without_the_decoder_s_own(kind: str, tmp_path: Path) -> None:
    """A truncated TIFF printed tifffile's log line (``<tifffile.TiffPages @32728> invalid offset
    to first page 32728``) beside hrad's one-line error (a PNG once libpng's). In a process of its
    own: the test's log capture would otherwise take the library's record before stderr."""
    import os
    import subprocess
    import sys

    import cv2

    folder = good_folder(tmp_path / "good", count=3)
    image = (textured_image(np.random.default_rng(7), 64, 96) * 255).astype(np.uint8)
    whole = tmp_path / f"whole.{kind}"
    cv2.imwrite(str(whole), image)  # OpenCV's TIFF has its header (IFD) at the end: the cut takes it
    data = whole.read_bytes()
    bad = folder / f"zz{whole.suffix}"
    bad.write_bytes(data[: len(data) // 2])
    environment = {key: value for key, value in os.environ.items() if key != "HRAD_LOG_FILE"}
    done = subprocess.run(
        [sys.executable, "-m", "hrad", "fit", "--data", str(folder), "--out", str(tmp_path / "m"), "--backbone", "tiny-cnn",
         "--detector", "patchcore", "--strategy", "downsample", "--image-size", "64"],  # fmt: skip
        capture_output=True, text=True, env=environment, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    reason = "truncated or corrupt image" if kind == "png" else "not a readable image (broken TIFF header"
    assert [line for line in done.stderr.splitlines() if "zz" in line or "tifffile" in line or "libpng" in line] == [
        line for line in done.stderr.splitlines() if line.startswith(f"hrad: error: {bad}: {reason}")
    ] != []


@pytest.mark.parametrize(
    ("setting", "scales"),
    [
        (["--strategy", "downsample", "--image-size", "48"], "this one by x0.38 across, x0.5 down, the first by x0.5 across, x0.75 down"),
        (["--strategy", "tiled", "--tile", "32", "--image-size", "48"], "this one by x0.38, the first by x0.5"),
        (["--strategy", "tiled", "--tile", "32"], None),  # native resolution: each image tiled at its own size, as it should
    ],
)
def test_a_folder_of_mixed_sizes_is_one_warning_where_the_strategy_scales_them_unlike(
    setting: list[str], scales: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 128x96 image among 96x64 ones said nothing: downsample resized each to one square (the
    detector learned features at several scales and stretches), and hrad info showed the first's size."""
    folder = good_folder(tmp_path / "good")
    write(folder / "001b.png", textured_image(np.random.default_rng(4), 96, 128))
    assert run(["fit", "--data", str(folder), "--out", str(tmp_path / "m"), *TINY, *setting], monkeypatch) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hrad: warning:")]
    if scales is None:
        assert warnings == []
        return
    strategy = setting[1]
    assert warnings == [
        f"hrad: warning: {folder / '001b.png'}: a 128x96 training image among 96x64 ones (the first, {folder / '000.png'}; "
        f"1 of 6 scaled unlike it, this the first): the {strategy} strategy resizes every image to its working size, {scales}: "
        "the model learns features of several scales and a defect's apparent size depends on its image's; "
        "fit on images of one size (crop or resize them alike)"
    ]


@pytest.mark.parametrize("low_branch", [True, False])
def test_hiad_s_low_branch_scaling_mixed_sizes_unlike_is_the_same_warning(
    low_branch: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """HiAD's high branch works at each image's own resolution, but its low branch resizes the
    whole image to low_res_size: a 128x96 image among 96x64 ones reached the low branch's detector
    at another scale, and the fit said nothing (HiAD's input_scale was the high branch's 1)."""
    folder = good_folder(tmp_path / "good")
    write(folder / "001b.png", textured_image(np.random.default_rng(4), 96, 128))
    hiad = ["--strategy", "hiad", "--set", "strategy.patch_size=32", "--set", "strategy.low_res_size=48", "--set", "strategy.assignment=a2o"]
    hiad += ["--set", f"strategy.low_branch={str(low_branch).lower()}"]
    assert run(["fit", "--data", str(folder), "--out", str(tmp_path / "m"), *TINY, *hiad], monkeypatch) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hrad: warning:")]
    assert warnings == (
        [
            f"hrad: warning: {folder / '001b.png'}: a 128x96 training image among 96x64 ones (the first, {folder / '000.png'}; "
            "1 of 6 scaled unlike it, this the first): the hiad strategy's low branch resizes every image to a long side of 48 "
            "(low_res_size), this one by x0.38 across, x0.33 down, the first by x0.5: the model learns features of several "
            "scales and a defect's apparent size depends on its image's; fit on images of one size (crop or resize them alike)"
        ]
        if low_branch
        else []
    )


@pytest.mark.parametrize("first_gray", [False, True])
def test_a_folder_mixing_gray_and_colour_images_is_one_warning_naming_the_first_odd_one(
    first_gray: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Gray files among colour ones (or colour among gray: two cameras, a converted subset) were
    read as colour, their one channel in all three, without a word."""
    import cv2

    folder = good_folder(tmp_path / "good")
    rng = np.random.default_rng(5)
    for name in ["002b.png", "004b.png"] if not first_gray else [path.name for path in folder.iterdir()]:
        cv2.imwrite(str(folder / name), (textured_image(rng, 64, 96)[..., 0] * 255).astype(np.uint8))  # one channel
    if first_gray:
        write(folder / "002b.png", textured_image(rng, 64, 96) * [1.0, 0.8, 0.6])
        write(folder / "004b.png", textured_image(rng, 64, 96) * [0.6, 0.8, 1.0])
    assert run(["fit", "--data", str(folder), "--out", str(tmp_path / "m"), *TINY], monkeypatch) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hrad: warning:")]
    kind, other = ("gray", "colour") if first_gray else ("colour", "gray")
    assert warnings == [
        f"hrad: warning: {folder / '002b.png'}: a {other} training image among {kind} ones (2 of 7 are not {kind}, this the "
        f"first; {folder / '000.png'} is {kind}): the model reads a gray image as colour, its one channel in all three, so the "
        "backbone sees the gray ones without colour and the model learns two kinds of normal image; two cameras, or a "
        "converted subset? Fit on images of one kind (convert them alike)"
    ]


def test_a_folder_of_gray_images_alone_says_nothing_of_colour(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import cv2

    folder = tmp_path / "good"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for index in range(5):
        cv2.imwrite(str(folder / f"{index:03d}.png"), (textured_image(rng, 64, 96)[..., 0] * 255).astype(np.uint8))
    assert run(["fit", "--data", str(folder), "--out", str(tmp_path / "m"), *TINY], monkeypatch) == 0
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("hrad: warning:")] == []
