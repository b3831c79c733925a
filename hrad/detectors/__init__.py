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
from hrad.detectors.destseg import DeSTSeg, DeSTSegConfig
from hrad.detectors.fastflow import FastFlow, FastFlowConfig
from hrad.detectors.padim import PaDiM, PaDiMConfig
from hrad.detectors.patchcore import PatchCore, PatchCoreConfig
from hrad.detectors.rdpp import RDPlusPlus, RDPlusPlusConfig
from hrad.detectors.realnet import RealNet, RealNetConfig
from hrad.detectors.students import Students, StudentsConfig
from hrad.detectors.varad import VarAD, VarADConfig
from hrad.detectors.vitad import ViTAD, ViTADConfig

register_detector("patchcore", PatchCoreConfig, PatchCore)
register_detector("padim", PaDiMConfig, PaDiM)
register_detector("students", StudentsConfig, Students)
register_detector("varad", VarADConfig, VarAD)
register_detector("fastflow", FastFlowConfig, FastFlow)
register_detector("vitad", ViTADConfig, ViTAD)
register_detector("rdpp", RDPlusPlusConfig, RDPlusPlus)
register_detector("destseg", DeSTSegConfig, DeSTSeg)
register_detector("realnet", RealNetConfig, RealNet)

__all__ = ["DETECTORS", "Detector", "DetectorConfig", "DetectorOutput", "build_detector", "detector_config", "register_detector"]
