"""hrad: high-resolution industrial anomaly detection."""

from hrad.version import ARTIFACT_FORMAT, __version__

__all__ = ["ARTIFACT_FORMAT", "__version__"]
