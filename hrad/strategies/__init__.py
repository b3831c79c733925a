"""High-resolution strategies: every strategy name users can type is registered here."""

from hrad.strategies.base import (
    STRATEGIES,
    AnomalyResult,
    Strategy,
    StrategyConfig,
    build_strategy,
    register_strategy,
    strategy_config,
)

__all__ = ["STRATEGIES", "AnomalyResult", "Strategy", "StrategyConfig", "build_strategy", "register_strategy", "strategy_config"]

from hrad.strategies.ensemble import TiledEnsemble, TiledEnsembleConfig  # noqa: E402
from hrad.strategies.hiad import HiAD, HiADConfig  # noqa: E402
from hrad.strategies.mrf import MRFConfig, MRFStrategy  # noqa: E402
from hrad.strategies.tiled import DownsampleConfig, DownsampleStrategy, SharedTileStrategy, TiledConfig  # noqa: E402

register_strategy("downsample", DownsampleConfig, DownsampleStrategy)
register_strategy("tiled", TiledConfig, SharedTileStrategy)
register_strategy("tiled-ensemble", TiledEnsembleConfig, TiledEnsemble)
register_strategy("hiad", HiADConfig, HiAD)
register_strategy("mrf", MRFConfig, MRFStrategy)
