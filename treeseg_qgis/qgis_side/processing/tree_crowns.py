"""The Processing algorithm `treeseg:treecrowns`: a tree-mask raster split into crown polygons.

The watershed needs scikit-image, which only the engine environment has, so the
engine worker process does the work (its `crowns` command); no model is loaded.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsRasterLayer,
)

from ...params import CROWN_DEFAULTS
from ..compat import DOUBLE
from ..raster_input import raster_file
from ..results import style_loaded_outputs
from .engine_algorithm import (
    CROWN_COUNT,
    Declared,
    Destination,
    EngineAlgorithm,
    read_number,
    run_in_engine,
)

HELP_TEXT = """<p>Splits the trees of a tree mask into <b>individual crowns</b>: the distance to the
nearest non-tree pixel peaks in the middle of each crown; those peaks seed a watershed that divides
touching crowns.</p>
<h3>Inputs</h3>
<ul>
<li><b>Tree mask</b>: a raster with 1 = tree (any other value is not a tree), e.g. the tree mask of
<i>Segment trees</i> or <i>Teach trees by example</i>.</li>
<li><b>Clusters</b> (optional): a cluster raster on the same grid; each crown gets its most common
cluster id.</li>
<li><b>Minimum crown area</b>: smaller crowns are dropped. <b>Minimum distance between centres</b>
(advanced): crown centres closer than this merge. <b>Smoothing</b> evens out the crown centres
(larger: fewer, bigger crowns). <b>Largest crown diameter</b> bounds the window overlap, so any raster
size works.</li>
</ul>
<h3>Output</h3>
<p>A GeoPackage with one polygon per crown and the fields <i>crown_id</i>, <i>cluster</i>,
<i>area_m2</i>, <i>perimeter_m</i>, <i>diameter_m</i>, <i>centroid_x</i>, <i>centroid_y</i>, in the
CRS of the mask. Runs in the treeseg engine process (scikit-image); no model is needed.</p>"""


class TreeCrownsAlgorithm(EngineAlgorithm):
    """Split the trees of a tree-mask raster into crown polygons, through the engine worker process."""

    NAME = "treecrowns"
    DISPLAY_NAME = "Split trees into crowns"
    GROUP = "Segmentation"
    TAGS = ("trees", "tree", "crowns", "crown", "watershed", "instances", "individual trees", "polygons")
    HELP = HELP_TEXT

    CLUSTERS = "CLUSTERS"
    DESTINATIONS = (Destination("OUTPUT", "Tree crowns", "crowns"),)
    VALUES = (CROWN_COUNT,)

    def declare(self) -> list[Declared]:
        """The crown options fill the fields of a params.CrownOptions, not a run's; its defaults are theirs."""
        return [
            Declared(QgsProcessingParameterRasterLayer(self.INPUT, "Tree mask (1 = tree)")),
            Declared(QgsProcessingParameterRasterLayer(self.CLUSTERS, "Clusters (same grid)", optional=True)),
            Declared(QgsProcessingParameterNumber(
                "MIN_AREA", "Minimum crown area (m²)", DOUBLE, defaultValue=CROWN_DEFAULTS.min_area_m2, minValue=0.0),
                "min_area_m2", read_number),
            Declared(QgsProcessingParameterNumber(
                "MIN_DISTANCE", "Minimum distance between centres (m)", DOUBLE,
                defaultValue=CROWN_DEFAULTS.min_distance_m,
                minValue=0.0), "min_distance_m", read_number, advanced=True),
            Declared(QgsProcessingParameterNumber(
                "SMOOTHING", "Smoothing (m)", DOUBLE, defaultValue=CROWN_DEFAULTS.smoothing_m, minValue=0.0),
                "smoothing_m", read_number),
            Declared(QgsProcessingParameterNumber(
                "MAX_CROWN", "Largest crown diameter (m)", DOUBLE, defaultValue=CROWN_DEFAULTS.max_crown_m,
                minValue=0.1),
                "max_crown_m", read_number),
        ]

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        python, trees = self.engine_and_input(parameters, context)
        clusters = self.parameterAsRasterLayer(parameters, self.CLUSTERS, context)
        if clusters is not None:
            _check_same_grid(trees, clusters)
        gpkg = self.output_files(parameters, context)["crowns"]
        options = replace(CROWN_DEFAULTS, **self.declared_values(parameters, context))
        trees_path = raster_file(trees)
        clusters_path = raster_file(clusters) if clusters is not None else None
        record = run_in_engine(python, feedback, lambda client, watch: client.crowns(
            trees_path, clusters_path, gpkg, options, watch))
        feedback.pushInfo(f"{record.crowns} crowns.")
        style_loaded_outputs(context, record, None, suffix=f" — {Path(trees_path).stem}", beside=trees.id())
        return self.results(record)


def _check_same_grid(trees: QgsRasterLayer, clusters: QgsRasterLayer) -> None:
    if (trees.width(), trees.height()) != (clusters.width(), clusters.height()) or trees.extent() != clusters.extent():
        raise QgsProcessingException(
            f"The clusters '{clusters.name()}' ({clusters.width()} × {clusters.height()} px) and the tree mask "
            f"'{trees.name()}' ({trees.width()} × {trees.height()} px) must share one pixel grid: use the "
            "cluster raster of the same run, or leave Clusters empty.")
