"""Detectors: every detector name users can type is registered here."""

from hrad.detectors.base import (
    DETECTORS,
    Detector,
    DetectorConfig,
    DetectorOutput,
    build_detector,
    detector_config,
    register_detector,
)

__all__ = ["DETECTORS", "Detector", "DetectorConfig", "DetectorOutput", "build_detector", "detector_config", "register_detector"]
