"""A saved model loaded for prediction, whichever form it was saved in: an artifact directory or an
export. One place for the ``--device`` / ``--runtime`` refusals, so ``hrad predict``, ``hrad
evaluate`` and ``hrad serve`` accept and refuse the same models alike."""

from __future__ import annotations

from pathlib import Path

from hrad.errors import ConfigError
from hrad.prediction import Predictor

#: what hrad predict / evaluate / serve accept as an exported model instead of an artifact directory
EXPORTED_SUFFIXES = (".onnx", ".xml")


def load_predictor(model: Path, device: str | None, runtime: str | None, ort_spinning: bool = False) -> Predictor:
    """An artifact directory -> its :class:`~hrad.model.AnomalyModel`; an exported ``.onnx`` /
    ``.xml`` -> :func:`hrad.export_runtime.open_predictor` (no torch; ``ort_spinning``: its
    onnxruntime threads busy-wait between ops). Both are a :class:`~hrad.prediction.Predictor`."""
    if model.suffix in EXPORTED_SUFFIXES:
        from hrad.export_runtime import open_predictor

        if device not in (None, "cpu"):
            raise ConfigError(f"--device {device}: an exported model runs on the CPU (its runtime's CPU provider)")
        return open_predictor(model, runtime=runtime, spinning=ort_spinning)
    if runtime is not None:
        raise ConfigError(f"--runtime {runtime}: only for an exported model (.onnx / .xml written by hrad export), not {model}")
    if ort_spinning:
        raise ConfigError(f"--ort-spinning: only for an exported model run by onnxruntime (.onnx written by hrad export), not {model}")
    from hrad.model import load

    return load(model, device=device)
