"""hrad: high-resolution industrial anomaly detection.

>>> import hrad
>>> model = hrad.load("model/")          # written by `hrad fit`
>>> prediction = model.predict("part.png")
>>> prediction.anomaly_map.shape, prediction.score
"""

from hrad.version import ARTIFACT_FORMAT, __version__


def load(path, device=None):  # type: ignore[no-untyped-def]
    """Load a model artifact (see :func:`hrad.model.load`)."""
    from hrad.model import load as _load

    return _load(path, device=device)


__all__ = ["ARTIFACT_FORMAT", "__version__", "load"]
