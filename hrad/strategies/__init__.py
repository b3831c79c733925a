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

from hrad.strategies.tiled import DownsampleConfig, DownsampleStrategy, SharedTileStrategy, TiledConfig

register_strategy("downsample", DownsampleConfig, DownsampleStrategy)
register_strategy("tiled", TiledConfig, SharedTileStrategy)
