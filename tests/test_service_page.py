"""``hrad serve``'s page at ``GET /``: served by default, off with ``page=False``, self-contained,
and reading only fields the API really returns."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from export_helpers import make_model
from fastapi.testclient import TestClient

from hrad.service import HealthResponse, MapPayload, PredictResponse, RegionModel, ThresholdsModel, create_app
from hrad.service_page import PAGE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    images = [rng.uniform(0.4, 0.6, (40, 48, 3)).astype(np.float32) for _ in range(4)]
    return make_model({"name": "downsample", "image_size": 32}, "test-gaussian").fit(images[:3], images[3:]).save(tmp_path_factory.mktemp("page") / "model")


def test_the_page_is_served_at_the_root_and_can_be_turned_off(model_dir: Path) -> None:
    response = TestClient(create_app(model_dir)).get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert response.text == PAGE and "<script>" in response.text
    off = TestClient(create_app(model_dir, page=False)).get("/")
    assert off.status_code == 404 and "error" in off.json()
    assert "/" not in TestClient(create_app(model_dir)).get("/openapi.json").json()["paths"]  # not part of the API


def test_the_page_loads_nothing_from_elsewhere_and_inserts_no_markup() -> None:
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", PAGE) and "@import" not in PAGE
    assert "innerHTML" not in PAGE and "outerHTML" not in PAGE and "insertAdjacentHTML" not in PAGE and "eval(" not in PAGE
    # relative URLs, so the page works behind a reverse proxy's path prefix too
    assert 'fetch("health")' in PAGE and 'fetch("predict?"' in PAGE


def test_the_script_reads_only_fields_the_responses_have() -> None:
    def used(variable: str) -> set[str]:
        return set(re.findall(rf"\b{variable}\.([a-z_]+)", PAGE))

    assert used("body") - {"error"} <= set(PredictResponse.model_fields)  # error: ErrorResponse's field
    assert used("health") <= set(HealthResponse.model_fields)
    assert used("region") <= set(RegionModel.model_fields)
    assert {"media_type", "base64"} <= set(MapPayload.model_fields) and "body.map.base64" in PAGE
    assert {"image", "pixel"} == set(ThresholdsModel.model_fields) and "health.thresholds.pixel" in PAGE
    assert used("body") >= {"score", "is_anomalous", "image_threshold", "regions", "region_count", "warnings", "map"}


def test_a_non_json_answer_and_a_model_without_thresholds_are_shown_as_such() -> None:
    assert "response.json()" not in PAGE and "JSON.parse(text)" in PAGE  # a proxy's HTML 502 is shown, not a SyntaxError
    assert 'if (body.is_anomalous !== null) box.classList.add' in PAGE  # no threshold: neither flagged nor passed colours
