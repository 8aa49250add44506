"""Everything that differs between the QGIS versions the plugin supports (3.22 to 3.44 LTR, and QGIS 4 on Qt6),
in one place.

Enum values that moved into `Qgis.*` in newer QGIS (3.40 and 3.44 keep 3.22's names as deprecated aliases): the
newer name first, 3.22's otherwise. Qt classes that moved from QtWidgets (Qt5) to QtGui (Qt6, QGIS 4), such as
QAction: from whichever module this Qt has them. tests/test_compat.py tests each.
"""

from __future__ import annotations

from typing import Any

import qgis.core
from qgis.PyQt import QtGui, QtWidgets


def qgis_enum(current: str, legacy: str) -> Any:
    """The value at the dotted path `current` under qgis.core, or at `legacy` where it does not exist."""
    for path in (current, legacy):
        value: Any = qgis.core
        try:
            for part in path.split("."):
                value = getattr(value, part)
        except AttributeError:
            continue
        return value
    raise AttributeError(f"Neither qgis.core.{current} nor qgis.core.{legacy} exists.")


def qt_moved_to_gui(name: str) -> Any:
    """The Qt class `name` from QtGui (Qt6, where QAction, QActionGroup and QShortcut live), else QtWidgets (Qt5)."""
    for module in (QtGui, QtWidgets):
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"Neither QtGui nor QtWidgets has {name}.")


QAction = qt_moved_to_gui("QAction")
ADVANCED = qgis_enum("Qgis.ProcessingParameterFlag.Advanced", "QgsProcessingParameterDefinition.Flag.FlagAdvanced")
INTEGER = qgis_enum("Qgis.ProcessingNumberParameterType.Integer", "QgsProcessingParameterNumber.Type.Integer")
DOUBLE = qgis_enum("Qgis.ProcessingNumberParameterType.Double", "QgsProcessingParameterNumber.Type.Double")
POLYGON_LAYERS = qgis_enum("Qgis.ProcessingSourceType.VectorPolygon", "QgsProcessing.SourceType.TypeVectorPolygon")
POLYGON_GEOMETRY = qgis_enum("Qgis.GeometryType.Polygon", "QgsWkbTypes.GeometryType.PolygonGeometry")
METRES = qgis_enum("Qgis.DistanceUnit.Meters", "QgsUnitTypes.DistanceUnit.DistanceMeters")
POINT_LAYERS = qgis_enum("Qgis.ProcessingSourceType.VectorPoint", "QgsProcessing.SourceType.TypeVectorPoint")
RASTER_LAYERS = qgis_enum("Qgis.ProcessingSourceType.Raster", "QgsProcessing.SourceType.TypeRaster")
ANY_FIELD = qgis_enum("Qgis.ProcessingFieldParameterDataType.Any", "QgsProcessingParameterField.DataType.Any")
EXPORT_OK = qgis_enum("QgsVectorFileWriter.WriterError.NoError", "QgsVectorFileWriter.NoError")
RASTER_LAYER_FILTER = qgis_enum("Qgis.LayerFilter.RasterLayer", "QgsMapLayerProxyModel.Filter.RasterLayer")
POLYGON_LAYER_FILTER = qgis_enum("Qgis.LayerFilter.PolygonLayer", "QgsMapLayerProxyModel.Filter.PolygonLayer")
