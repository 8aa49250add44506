"""The Processing provider `treeseg`: loads even where the engine environment is missing."""

from __future__ import annotations

from pathlib import Path

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .evaluate_segmentation import EvaluateSegmentationAlgorithm
from .segment_trees import SegmentTreesAlgorithm
from .survey_algorithms import ApplyClassifierAlgorithm, ApplyClusterModelAlgorithm, FitClusterModelAlgorithm
from .teach_trees import TeachClassesAlgorithm, TeachTreesAlgorithm
from .tree_crowns import TreeCrownsAlgorithm

PACKAGE_DIR = Path(__file__).resolve().parents[2]


def icon_path() -> Path:
    """resources/icon.svg inside the installed plugin, or beside the package in a source checkout."""
    for root in (PACKAGE_DIR, PACKAGE_DIR.parent):
        candidate = root / "resources" / "icon.svg"
        if candidate.is_file():
            return candidate
    return PACKAGE_DIR / "resources" / "icon.svg"


class TreesegProvider(QgsProcessingProvider):
    """TreeSeg (DINOv3): tree segmentation, crowns and evaluation; models run in the engine worker process."""

    def id(self) -> str:
        return "treeseg"

    def name(self) -> str:
        return "TreeSeg (DINOv3)"

    def longName(self) -> str:
        return "TreeSeg (DINOv3): label-free tree segmentation of orthophotos"

    def icon(self) -> QIcon:
        return QIcon(str(icon_path()))

    def svgIconPath(self) -> str:
        return str(icon_path())

    def loadAlgorithms(self) -> None:
        for algorithm in (SegmentTreesAlgorithm(), TeachTreesAlgorithm(), TeachClassesAlgorithm(),
                          TreeCrownsAlgorithm(), EvaluateSegmentationAlgorithm(), FitClusterModelAlgorithm(),
                          ApplyClusterModelAlgorithm(), ApplyClassifierAlgorithm()):
            self.addAlgorithm(algorithm)

    def supportsNonFileBasedOutput(self) -> bool:
        return False

    def supportedOutputRasterLayerExtensions(self) -> list[str]:
        return ["tif"]

    def supportedOutputVectorLayerExtensions(self) -> list[str]:
        return ["gpkg"]
