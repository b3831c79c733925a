"""Optional experiment tracking with MLflow (``pip install 'hrad[track]'``).

``hrad fit --track`` and ``hrad evaluate --track`` (or any run with ``MLFLOW_TRACKING_URI``
set) record one MLflow run each: the model config as parameters (``detector.coreset_ratio``,
...), the training loss per epoch as stepped metrics (``loss.<stage>``), the evaluation
metrics, and as artifacts the model directory (fit) or the report folder (evaluate). The
server is ``MLFLOW_TRACKING_URI``; without it runs go to ``./mlruns`` (MLflow's local file
store, which MLflow 3 keeps in maintenance mode: hrad opts in with ``MLFLOW_ALLOW_FILE_STORE``
for ``file:`` URIs only). The experiment is ``MLFLOW_EXPERIMENT_NAME`` or ``hrad``.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from hrad.errors import ConfigError

DEFAULT_EXPERIMENT = "hrad"


def tracking_requested(flag: bool) -> bool:
    """Track when asked with ``--track`` or when ``MLFLOW_TRACKING_URI`` is set."""
    return bool(flag or os.environ.get("MLFLOW_TRACKING_URI"))


def _mlflow() -> ModuleType:
    try:
        import mlflow
    except ImportError:
        raise ConfigError("tracking needs MLflow: pip install 'hrad[track]' (or unset MLFLOW_TRACKING_URI)") from None
    return mlflow


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"section.field": "value"}`` (MLflow parameters are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:6000]
    return flat


class TrackedRun:
    """One active MLflow run; every method logs immediately."""

    def __init__(self, mlflow: ModuleType, run: Any) -> None:
        self._mlflow = mlflow
        self.run_id: str = run.info.run_id

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._mlflow.log_params(flatten(config))

    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        numeric = {
            key: float(value)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
        }
        if numeric:
            self._mlflow.log_metrics(numeric)

    def log_history(self, history: Mapping[str, list[float]]) -> None:
        """Loss per epoch as stepped metrics ``loss.<stage>`` (step = epoch, from 1)."""
        for stage, values in history.items():
            for epoch, value in enumerate(values, start=1):
                if math.isfinite(value):
                    self._mlflow.log_metric(f"loss.{stage}", float(value), step=epoch)

    def log_artifacts(self, path: Path, artifact_path: str) -> None:
        if Path(path).is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        elif Path(path).is_file():
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._mlflow.set_tags({key: str(value) for key, value in tags.items()})


@contextlib.contextmanager
def tracked_run(command: str, run_name: str | None = None) -> Iterator[TrackedRun]:
    """An MLflow run for the block (ended as FAILED if the block raises)."""
    mlflow = _mlflow()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"file:{Path('mlruns').resolve()}"
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT)
        run = mlflow.start_run(run_name=run_name)
    except Exception as error:  # noqa: BLE001 - MLflow raises many types for a bad URI or server
        raise ConfigError(f"MLflow tracking at {uri}: cannot start a run ({' '.join(str(error).split())[:200]})") from None
    tracked = TrackedRun(mlflow, run)
    tracked.set_tags({"hrad.command": command})
    status = "FAILED"
    try:
        yield tracked
        status = "FINISHED"
    finally:
        mlflow.end_run(status=status)


__all__ = ["TrackedRun", "flatten", "tracked_run", "tracking_requested"]
