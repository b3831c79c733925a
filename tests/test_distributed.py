"""Distributed prediction and job runners over one small local Ray (2 CPUs) per module.

Ray workers are separate processes without pytest's test registry: the module's Ray gets the
tests folder on its workers' PYTHONPATH and a worker setup hook that registers ``test-gaussian``.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import GaussianTestConfig, GaussianTestDetector, textured_image, with_spot
from typer.testing import CliRunner

import hrad
from hrad.config import load_config
from hrad.data.images import read_image
from hrad.detectors.base import detector_class
from hrad.distributed import predict_many_ray
from hrad.errors import ConfigError, InputError
from hrad.model import AnomalyModel
from hrad.outputs import map_scale, read_map_png16
from hrad.progress import progress_of
from hrad.runners import (
    ProcessPoolRunner,
    RayExecutor,
    SerialRunner,
    active_runner,
    job_runner,
    use_runner,
    worker_job,
)
from hrad.strategies.spill import ChunkRef, FeatureSpill, FitJob, run_fit_job

TESTS = Path(__file__).resolve().parent
CRASH_NAME = "kill-worker"


def register_test_detector() -> None:
    """Worker setup hook: the session's ``test-gaussian`` detector (conftest is no package module)."""
    from hrad.detectors.base import DETECTORS, register_detector

    if "test-gaussian" not in DETECTORS:
        register_detector("test-gaussian", GaussianTestConfig, GaussianTestDetector)


def die_on_marked_images() -> None:
    """Worker setup for one test: the worker process exits hard while reading a marked image."""
    import hrad.data.images as image_io

    original = image_io.read_pixels  # what the worker reads images with

    def read_or_die(path: str | os.PathLike[str]) -> np.ndarray:
        if CRASH_NAME in Path(path).name:
            os._exit(1)
        return original(path)

    image_io.read_pixels = read_or_die  # type: ignore[assignment]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[object]:
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    python_path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    start = time.perf_counter()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level=logging.WARNING,
        runtime_env={
            "env_vars": {"PYTHONPATH": python_path},
            "worker_process_setup_hook": "test_distributed.register_test_detector",
        },
    )
    print(f"ray.init took {time.perf_counter() - start:.1f}s")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    config = load_config(
        None,
        {
            "backbone": {"name": "tiny-cnn"},
            "detector": {"name": "test-gaussian"},
            "strategy": {"name": "downsample", "image_size": 64},
            "device": "cpu",
        },
    )
    model = AnomalyModel(config).fit([textured_image(rng, 80, 100) for _ in range(6)])
    return model.save(tmp_path_factory.mktemp("distributed") / "model")


def write_png(path: Path, image: np.ndarray) -> Path:
    cv2.imwrite(str(path), cv2.cvtColor(np.round(image * 255).astype(np.uint8), cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(5)
    paths = [write_png(folder / f"part{index}.png", textured_image(rng, 80, 100)) for index in range(3)]
    spotted, _ = with_spot(textured_image(rng, 80, 100), 30, 40, 10)
    paths.append(write_png(folder / "spotted.png", spotted))
    return paths


def test_predict_many_ray_matches_serial_and_reports_bad_images(
    ray_cluster: object, model_path: Path, image_folder: list[Path], tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    crash = write_png(tmp_path / f"{CRASH_NAME}.png", read_image(image_folder[0]))
    inputs = [image_folder[0], corrupt, image_folder[1], crash, image_folder[2], image_folder[3]]
    out = tmp_path / "out"

    rows = predict_many_ray(model_path, inputs, out, workers=2, setup=die_on_marked_images)

    assert [row.path for row in rows] == [str(path) for path in inputs]
    serial = hrad.load(model_path, device="cpu")
    for path, row in zip(inputs, rows, strict=True):
        if path in (corrupt, crash):
            continue
        expected = serial.predict(path)
        assert row.error is None and row.score == pytest.approx(expected.score, rel=1e-5)
        assert row.is_anomalous == expected.is_anomalous and row.threshold == expected.image_threshold
        assert row.map_path == str((out / f"{path.stem}_map.png").resolve())
        scale = map_scale(serial.thresholds)  # the model's fixed scale, also stored in the PNG
        assert scale is not None
        stored = read_map_png16(row.map_path)
        step = (scale.vmax - scale.vmin) / 65535
        np.testing.assert_allclose(stored, np.clip(expected.anomaly_map, scale.vmin, scale.vmax), atol=step)
        assert (out / f"{path.stem}_mask.png").is_file()
    scores = [row.score or 0.0 for row in rows]
    assert scores[5] > max(scores[i] for i in (0, 2, 4))  # the spotted image
    assert rows[1].score is None and "corrupt.png: not a readable image" in str(rows[1].error) and rows[1].status == "failed"
    assert rows[3].score is None and "worker process died" in str(rows[3].error)
    with (out / "scores.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [line["path"] for line in table] == [str(path) for path in inputs]
    assert float(table[0]["score"]) == rows[0].score and table[1]["score"] == "" and table[1]["error"]


def test_cli_predict_distributed_writes_scores_and_fails_on_bad_images(
    ray_cluster: object, model_path: Path, image_folder: list[Path], tmp_path: Path
) -> None:
    from hrad.cli.main import app

    folder = tmp_path / "in"
    folder.mkdir()
    for path in image_folder[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["predict-distributed", "--model", str(model_path), str(folder), "--out", str(out), "--workers", "1"]
    )
    assert result.exit_code == 3 and "1 of 3 images failed" in result.output, result.output
    with (out / "scores.csv").open() as handle:
        table = {Path(line["path"]).name: line for line in csv.DictReader(handle)}
    assert list(table) == ["broken.png", *(path.name for path in image_folder[:2])]
    assert "broken.png" in table["broken.png"]["error"] and table["broken.png"]["score"] == ""
    for path in image_folder[:2]:
        line = table[path.name]
        assert line["error"] == "" and float(line["score"]) > 0 and (out / f"{path.stem}_map.png").is_file()
        assert (out / "thumbs" / f"{path.stem}.jpg").is_file()  # the actors write the summary page's thumbnails
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "3 images:" in page and "1 failed." in page


def test_gpu_workers_on_a_cluster_without_gpus_are_a_config_error(
    ray_cluster: object, model_path: Path, image_folder: list[Path], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="GPU"):
        predict_many_ray(model_path, image_folder, tmp_path, num_gpus_per_worker=1)


def hiad_jobs(spill: FeatureSpill) -> list[FitJob]:
    """Three detectors of a pool, each on its own patches of spilled feature chunks (file paths only)."""
    generator = torch.Generator().manual_seed(0)
    chunks = [spill.write(torch.randn(6, 8, 4, 4, generator=generator) + index) for index in range(3)]
    config = GaussianTestConfig()
    return [
        FitJob(GaussianTestDetector, config, (ChunkRef(chunks[0], (0, 1)), ChunkRef(chunks[2], (5,))), "cpu"),
        FitJob(GaussianTestDetector, config, (ChunkRef(chunks[1]),), "cpu"),
        FitJob(GaussianTestDetector, config, tuple(ChunkRef(path, (2, 3, 4)) for path in chunks), "cpu"),
    ]


def test_ray_executor_fits_the_same_detectors_as_serial(ray_cluster: object, tmp_path: Path) -> None:
    with FeatureSpill(str(tmp_path)) as spill:
        jobs = hiad_jobs(spill)
        serial = SerialRunner().map(run_fit_job, jobs)
        seen: list[tuple[int, int]] = []
        with RayExecutor() as executor:
            distributed = executor.map(run_fit_job, jobs, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    for expected, state in zip(serial, distributed, strict=True):
        assert state.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(state[key], expected[key], rtol=0, atol=0)
    # the detectors really differ (a runner returning one state for all jobs would fail above)
    assert not torch.equal(serial[0]["mean"], serial[1]["mean"])


def test_ray_executor_reraises_the_jobs_own_error(ray_cluster: object, image_folder: list[Path], tmp_path: Path) -> None:
    executor = RayExecutor()
    images = executor.map(read_image, [str(image_folder[0])])
    np.testing.assert_array_equal(images[0], read_image(image_folder[0]))
    missing = tmp_path / "missing.png"
    with pytest.raises(InputError, match="missing.png: file not found"):
        executor.map(read_image, [str(image_folder[1]), str(missing)])


def register_marker_detector() -> None:
    """Setup named as ``module:function``: registers a detector only the executor's workers know."""
    from hrad.detectors.base import DETECTORS, register_detector

    if "test-setup-marker" not in DETECTORS:
        register_detector("test-setup-marker", GaussianTestConfig, GaussianTestDetector)


def test_ray_executor_runs_setup_in_its_workers(ray_cluster: object) -> None:
    with pytest.raises(ConfigError, match="test-setup-marker"):
        RayExecutor().map(detector_class, ["test-setup-marker"])
    executor = RayExecutor(setup="test_distributed:register_marker_detector")
    assert executor.map(detector_class, ["test-setup-marker", "test-gaussian"]) == [GaussianTestDetector] * 2


def test_ray_executor_jobs_log_records_reach_this_process_marked_with_their_job(ray_cluster: object) -> None:
    """What a Ray task logs (a detector's epochs, warnings) reaches the driver's loggers at the
    driver's levels, marked with its job, as from a local process pool (test_runners.py)."""
    from test_runners import LOGGER, Records, log_steps

    logger = logging.getLogger("hrad.detectors")
    handler, level = Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        assert RayExecutor().map(log_steps, ["a", "b"]) == ["A", "B"]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    seen = sorted(((record.name, progress_of(record), record.getMessage()) for record in handler.records), key=repr)
    expected = [
        (LOGGER, step, f"job {index}/2: {text}")
        for index, name in [(1, "a"), (2, "b")]
        for step, text in [
            ((1, 2, f"{name} epochs"), f"{name} epochs: 1/2"),
            ((2, 2, f"{name} epochs"), f"{name} epochs: 2/2"),
            (None, f"an ordinary line of {name}"),
            (None, f"a warning of {name}"),
        ]
    ]
    assert seen == sorted(expected, key=repr)
    assert {worker_job(record).label for record in handler.records} == {"job 1/2", "job 2/2"}  # type: ignore[union-attr]


def test_active_runner_overrides_local_workers() -> None:
    assert isinstance(job_runner(1), SerialRunner)
    pool = job_runner(3, threads_per_worker=2)
    assert isinstance(pool, ProcessPoolRunner) and (pool.workers, pool.threads_per_worker) == (3, 2)
    chosen = SerialRunner()
    with use_runner(chosen):
        assert active_runner() is chosen and job_runner(4) is chosen
    assert active_runner() is None and isinstance(job_runner(1), SerialRunner)


def test_serial_runner_keeps_job_order_and_reports_progress() -> None:
    seen: list[tuple[int, int]] = []
    assert SerialRunner().map(abs, [-3, 1, -2], progress=lambda d, t: seen.append((d, t))) == [3, 1, 2]
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_bad_settings_are_config_errors(model_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 1 worker"):
        predict_many_ray(model_path, [], tmp_path, workers=0)
    with pytest.raises(ConfigError, match="gpus >= 0"):
        RayExecutor(gpus_per_job=-1)


def test_process_pool_stops_its_running_jobs_when_interrupted() -> None:
    """Ctrl-C or SIGTERM that reaches the parent alone (``kill PID``) stops the pool at once:
    leaving the executor's block used to wait for every running job (minutes of training)."""
    import time

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        ProcessPoolRunner(2, threads_per_worker=1).map(time.sleep, [0.1, 120.0], progress=interrupt)
    assert time.monotonic() - start < 60
