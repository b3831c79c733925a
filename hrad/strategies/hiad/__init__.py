"""HiAD: dual-branch high-resolution anomaly detection with a detector pool (``--strategy hiad``)."""

from hrad.strategies.hiad.config import HiADConfig
from hrad.strategies.hiad.strategy import HiAD

__all__ = ["HiAD", "HiADConfig"]
