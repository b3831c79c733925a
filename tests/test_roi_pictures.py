"""Pictures of a prediction show the region of interest: outside it the plain image at half
brightness (not inspected), its outline white; exact pixels on small images, then through
``hrad predict`` on an artifact and on its ONNX export, and in ``hrad evaluate``'s cases."""

from __future__ import annotations

import base64
from pathlib import Path

import cv2
import numpy as np
import pytest
from cli_helpers import run as run_cli
from cli_helpers import write
from conftest import textured_image, with_spot
from export_helpers import make_model
from roi_helpers import DETECTOR, HEIGHT, TILED, WIDTH, left_half_mask, textured_images

import hrad
from hrad.data.images import INSPECTED_OUTLINE, overlay_image, read_pixels
from hrad.export import export_onnx
from hrad.export_runtime import open_predictor
from hrad.outputs import overlay_scale
from hrad.prediction import Prediction

WHITE = np.array(INSPECTED_OUTLINE, np.uint8)


def check_marked(marked: np.ndarray, plain: np.ndarray, picture: np.ndarray, inside: np.ndarray, outline: np.ndarray) -> None:
    """``marked`` is ``plain`` inside the region, the picture halved outside it, white on the outline."""
    np.testing.assert_array_equal(marked[~inside], picture[~inside] >> 1)
    assert (marked[outline] == WHITE).all()
    interior = inside & ~outline
    np.testing.assert_array_equal(marked[interior], plain[interior])
    differs = (marked != plain).any(axis=2)
    assert not (differs & interior).any() and differs[~inside].any()


def test_the_overlay_dims_outside_the_region_and_outlines_it() -> None:
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
    anomaly_map = rng.random((16, 20)).astype(np.float32)
    plain = overlay_image(picture, anomaly_map, vmin=0.0, vmax=1.0)
    inside = np.zeros((16, 20), bool)
    inside[3:11, 4:15] = True  # rows 3..10, columns 4..14
    outline = inside.copy()
    outline[4:10, 5:14] = False  # the rectangle's one-pixel rim
    check_marked(overlay_image(picture, anomaly_map, vmin=0.0, vmax=1.0, inspected=inside), plain, picture, inside, outline)

    # along the image's own edge there is no outline: only where inside meets outside
    inside = np.zeros((16, 20), bool)
    inside[3:11, :10] = True
    outline = np.zeros((16, 20), bool)
    outline[3, :10] = outline[10, :10] = outline[3:11, 9] = True
    check_marked(overlay_image(picture, anomaly_map, vmin=0.0, vmax=1.0, inspected=inside), plain, picture, inside, outline)

    # a hole in the region (a fixture not inspected) is outlined too; a gray image works alike
    gray = picture[..., 0]
    inside = np.ones((16, 20), bool)
    inside[6:9, 8:12] = False
    outline = np.zeros((16, 20), bool)
    outline[5:10, 7:13] = True
    outline &= inside
    rgb = np.repeat(gray[..., None], 3, axis=2)
    plain = overlay_image(gray, anomaly_map, vmin=0.0, vmax=1.0)
    check_marked(overlay_image(gray, anomaly_map, vmin=0.0, vmax=1.0, inspected=inside), plain, rgb, inside, outline)

    # a region covering everything, or none given, draws exactly the plain overlay
    np.testing.assert_array_equal(overlay_image(gray, anomaly_map, vmin=0.0, vmax=1.0, inspected=np.ones((16, 20), bool)), plain)


def test_a_region_of_another_size_is_stretched_to_the_picture() -> None:
    picture = np.full((8, 12, 3), 200, np.uint8)
    anomaly_map = np.zeros((8, 12), np.float32)
    small = np.zeros((4, 6), bool)
    small[:, :3] = True  # the left half, at half the size
    marked = overlay_image(picture, anomaly_map, vmin=0.0, vmax=1.0, inspected=small)
    assert (marked[:, 6:] == 100).all() and (marked[:, 5] == WHITE).all() and not (marked[:, :5] == WHITE).all(axis=2).any()


images = pytest.fixture(scope="module", name="images")(textured_images)
roi_mask = pytest.fixture(scope="module", name="roi_mask")(left_half_mask)


def left_half() -> tuple[np.ndarray, np.ndarray]:
    """The region of :func:`roi_mask` and its outline: the inside column next to the outside
    (the image's top, bottom and left edges are no outline)."""
    inside = np.zeros((HEIGHT, WIDTH), bool)
    inside[:, : WIDTH // 2] = True
    outline = np.zeros((HEIGHT, WIDTH), bool)
    outline[:, WIDTH // 2 - 1] = True
    return inside, outline


def test_hrad_predict_draws_the_region_for_the_model_and_its_export(
    images: list[np.ndarray], roi_mask: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``hrad predict``'s overlays, on the artifact and on its ONNX export (the torch-free
    runtime), are the plain overlay of the same prediction except outside the region (halved
    image) and on its outline (white), and so is ``hrad serve``'s; a model without a region draws
    the plain overlay."""
    from fastapi.testclient import TestClient

    from hrad.service import create_app

    model = make_model(TILED, DETECTOR).fit(images, roi=roi_mask)
    model.save(tmp_path / "model")
    export_onnx(model, tmp_path / "model.onnx")
    plain_model = make_model(TILED, DETECTOR).fit(images)
    plain_model.save(tmp_path / "plain")
    parts = tmp_path / "parts"
    write(parts / "normal.png", images[0])
    write(parts / "outside.png", with_spot(textured_image(np.random.default_rng(11), HEIGHT, WIDTH), 40, 100, 12)[0])
    inside, outline = left_half()
    scale = overlay_scale(model.thresholds)
    assert scale is not None
    for served, predictor in ((tmp_path / "model", hrad.load(tmp_path / "model")), (tmp_path / "model.onnx", open_predictor(tmp_path / "model.onnx"))):
        out = tmp_path / f"out_{served.name}"
        assert run_cli(["predict", "--model", str(served), str(parts), "--out", str(out)], monkeypatch) == 0
        for name in ("normal", "outside"):
            picture = read_pixels(parts / f"{name}.png")
            prediction = predictor.predict(parts / f"{name}.png")
            assert prediction.inspected is not None and (prediction.inspected == inside).all()
            plain = overlay_image(picture, prediction.anomaly_map, prediction.pixel_threshold, vmin=scale.vmin, vmax=scale.vmax)
            marked = cv2.imread(str(out / f"{name}_overlay.png"))[..., ::-1]
            check_marked(marked, plain, picture, inside, outline)
        # hrad serve's overlay is the same picture (one drawing for every writer)
        served_overlay = TestClient(create_app(served)).post(
            "/predict?map=overlay", files={"image": ("outside.png", (parts / "outside.png").read_bytes())}
        ).json()["map"]
        picture = cv2.imdecode(np.frombuffer(base64.b64decode(served_overlay["base64"]), np.uint8), cv2.IMREAD_COLOR)
        np.testing.assert_array_equal(picture, cv2.imread(str(out / "outside_overlay.png")))

    out = tmp_path / "out_plain"
    assert run_cli(["predict", "--model", str(tmp_path / "plain"), str(parts), "--out", str(out)], monkeypatch) == 0
    prediction = plain_model.predict(parts / "outside.png")
    assert prediction.inspected is None
    plain_scale = overlay_scale(plain_model.thresholds)
    assert plain_scale is not None
    expected = overlay_image(
        read_pixels(parts / "outside.png"), prediction.anomaly_map, prediction.pixel_threshold, vmin=plain_scale.vmin, vmax=plain_scale.vmax
    )
    np.testing.assert_array_equal(cv2.imread(str(out / "outside_overlay.png"))[..., ::-1], expected)


def test_hrad_evaluate_cases_carry_the_region(
    images: list[np.ndarray], roi_mask: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report's case pictures get the region (thumbnailed with the case) and draw it: their
    overlay differs from the same case's without one."""
    from hrad.data.datasets import load_dataset
    from hrad.evaluation import evaluate
    from hrad.reports import figures
    from hrad.reports.html import case_figure

    root = tmp_path / "part"
    write(root / "train" / "good" / "000.png", images[0])
    write(root / "test" / "good" / "000.png", images[1])
    model = make_model(TILED, DETECTOR).fit(images, roi=roi_mask)
    seen: list[figures.Case] = []

    def grid(groups: dict[str, list[figures.Case]], path: Path, **options: object) -> Path:
        seen.extend(case for members in groups.values() for case in members)
        return figures.case_grid(groups, path, **options)  # type: ignore[arg-type]

    monkeypatch.setattr("hrad.evaluation.case_grid", grid)
    evaluate(model, load_dataset(root).test, tmp_path / "report")
    [case] = seen
    assert case.inspected is not None and (case.inspected == left_half()[0]).all()
    plain = Prediction(np.zeros(1, np.float32), 0.0, None, None)  # a Prediction without a region
    assert plain.inspected is None
    without = figures.Case(case.name, case.label, case.score, case.image, case.anomaly_map, case.mask)
    assert case_figure(case, (0.0, 1.0), None) != case_figure(without, (0.0, 1.0), None)
