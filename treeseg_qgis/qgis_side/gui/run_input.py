"""The run panel's input: which raster a run reads (the active one until the user picks one) and which part of it.
A canvas extent or a polygon selection becomes a small GDAL VRT in the raster's CRS, made on the main thread
before the task starts."""

from __future__ import annotations

from pathlib import Path

from qgis.core import (
    QgsCoordinateTransform,
    QgsFeatureRequest,
    QgsMapLayer,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis.gui import QgisInterface, QgsMapLayerComboBox
from qgis.PyQt.QtWidgets import QComboBox

from ..raster_input import prepare_input
from ..results import result_input_name
from .run_params import InputProblem

WHOLE_LAYER, CANVAS_EXTENT, SELECTED_POLYGONS = "layer", "canvas", "selection"
EXTENTS = {
    WHOLE_LAYER: "Whole layer",
    CANVAS_EXTENT: "Current map canvas extent",
    SELECTED_POLYGONS: "Selected polygons of a layer",
}


class RunInput:
    """The raster in `layer_combo`, the part of it in `extent_combo` (data: a key of EXTENTS) and, for selected
    polygons, their layer in `mask_combo`. `layer_combo` follows the active raster of QGIS until the user picks
    a layer in it (from the next active layer on); `shutdown()` stops that."""

    def __init__(self, iface: QgisInterface, layer_combo: QgsMapLayerComboBox, extent_combo: QComboBox,
                 mask_combo: QgsMapLayerComboBox) -> None:
        self.iface = iface
        self.layer_combo = layer_combo
        self.extent_combo = extent_combo
        self.mask_combo = mask_combo
        self._layer_picked = False
        layer_combo.activated.connect(self._pick)
        iface.currentLayerChanged.connect(self.follow_active_layer)

    def follow_active_layer(self, layer: QgsMapLayer | None) -> None:
        """Show `layer` (the active layer of QGIS) when it is a raster, not a TreeSeg result, and no layer was
        picked in the panel."""
        if (not self._layer_picked and isinstance(layer, QgsRasterLayer)
                and result_input_name(layer, QgsProject.instance()) is None):
            self.layer_combo.setLayer(layer)

    def _pick(self) -> None:
        """The user chose a layer in the panel: it stays until they choose another."""
        self._layer_picked = True

    def shutdown(self) -> None:
        """Stop following the active layer (the plugin is unloading)."""
        self.iface.currentLayerChanged.disconnect(self.follow_active_layer)

    @property
    def whole_layer(self) -> bool:
        """The run covers all of the raster."""
        return self.extent_combo.currentData() == WHOLE_LAYER

    def whole_layer_size(self) -> tuple[int, int] | None:
        """(width, height) in pixels of the chosen raster when the run covers all of it; None otherwise."""
        layer = self.layer_combo.currentLayer()
        if not isinstance(layer, QgsRasterLayer) or not self.whole_layer:
            return None
        return layer.width(), layer.height()

    def vrt(self, scratch: Path) -> str | None:
        """A VRT in `scratch` for a canvas extent or a polygon selection, in the raster's CRS; None for the
        whole layer. Raises InputProblem when the extent or selection cannot be used."""
        layer = self.layer_combo.currentLayer()
        if self.whole_layer or not isinstance(layer, QgsRasterLayer):
            return None
        extent = mask = None
        if self.extent_combo.currentData() == CANVAS_EXTENT:
            canvas = self.iface.mapCanvas()
            transform = QgsCoordinateTransform(canvas.mapSettings().destinationCrs(), layer.crs(),
                                               QgsProject.instance())
            extent = transform.transformBoundingBox(canvas.extent())
        else:
            polygons = self.mask_combo.currentLayer()
            if not isinstance(polygons, QgsVectorLayer) or not polygons.selectedFeatureCount():
                raise InputProblem("Select one or more polygons in the polygon layer first.")
            mask = polygons.materialize(QgsFeatureRequest().setFilterFids(polygons.selectedFeatureIds()))
        context = QgsProcessingContext()
        context.setProject(QgsProject.instance())
        try:
            return prepare_input(layer, extent, mask, 0.0, context, scratch)
        except QgsProcessingException as error:
            raise InputProblem(str(error)) from error
