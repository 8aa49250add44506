"""The compatibility module (qgis_side/compat.py): each QGIS or Qt API that differs between QGIS 3.22, 3.44 LTR
and QGIS 4 (Qt6), used the way the plugin uses it, on whichever QGIS runs the suite (make test runs 3.22 and 3.44;
tests/test_qt6_real.py resolves the Qt6 side under real PyQt6)."""

from __future__ import annotations

import pytest

from treeseg_qgis.qgis_side import compat


def test_the_newer_qgis_name_wins_and_a_missing_one_is_an_error(qgis_app):
    from qgis.core import Qgis

    newer = hasattr(Qgis, "ProcessingSourceType")  # QGIS 3.36 and newer
    assert type(compat.RASTER_LAYERS).__name__ == ("ProcessingSourceType" if newer else "SourceType")
    with pytest.raises(AttributeError, match="Neither qgis.core.Qgis.NoSuchEnum"):
        compat.qgis_enum("Qgis.NoSuchEnum.Value", "QgsProcessing.NoSuchEnum")


def test_advanced_flag_marks_a_processing_parameter_advanced(qgis_app):
    from qgis.core import QgsProcessingParameterString

    parameter = QgsProcessingParameterString("NAME", "Name")
    parameter.setFlags(parameter.flags() | compat.ADVANCED)
    assert parameter.flags() & compat.ADVANCED


@pytest.mark.parametrize("number_type", ["INTEGER", "DOUBLE"])
def test_number_types_set_a_number_parameter_type(qgis_app, number_type):
    from qgis.core import QgsProcessingParameterNumber

    value = getattr(compat, number_type)
    assert QgsProcessingParameterNumber("N", "N", value, defaultValue=1).dataType() == value


@pytest.mark.parametrize("source_type", ["POLYGON_LAYERS", "POINT_LAYERS", "RASTER_LAYERS"])
def test_source_types_set_what_a_layer_parameter_accepts(qgis_app, source_type):
    from qgis.core import QgsProcessingParameterFeatureSource, QgsProcessingParameterMapLayer

    value = getattr(compat, source_type)
    parameter = (QgsProcessingParameterMapLayer("L", "L", types=[value]) if source_type == "RASTER_LAYERS"
                 else QgsProcessingParameterFeatureSource("L", "L", [value]))
    assert list(parameter.dataTypes()) == [value]


def test_polygon_geometry_is_the_type_of_a_polygon(qgis_app):
    from qgis.core import QgsGeometry

    assert QgsGeometry.fromWkt("POLYGON((0 0, 1 0, 1 1, 0 0))").type() == compat.POLYGON_GEOMETRY
    assert QgsGeometry.fromWkt("POINT(0 0)").type() != compat.POLYGON_GEOMETRY


def test_metres_convert_to_a_crs_map_units(qgis_app):
    from qgis.core import QgsCoordinateReferenceSystem, QgsUnitTypes

    utm, feet = QgsCoordinateReferenceSystem("EPSG:32617"), QgsCoordinateReferenceSystem("EPSG:2227")
    assert QgsUnitTypes.fromUnitToUnitFactor(compat.METRES, utm.mapUnits()) == 1.0
    assert QgsUnitTypes.fromUnitToUnitFactor(compat.METRES, feet.mapUnits()) == pytest.approx(3.2808, rel=1e-3)


def test_any_field_lets_a_field_parameter_take_any_field(qgis_app):
    from qgis.core import QgsProcessingParameterField

    assert QgsProcessingParameterField("F", "F", type=compat.ANY_FIELD).dataType() == compat.ANY_FIELD


def test_export_ok_is_what_a_successful_vector_export_returns(qgis_app, tmp_path):
    from qgis.core import QgsCoordinateTransformContext, QgsVectorFileWriter, QgsVectorLayer

    layer = QgsVectorLayer("Polygon?crs=EPSG:32617&field=is_tree:integer", "crowns", "memory")
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    error, message, _, _ = QgsVectorFileWriter.writeAsVectorFormatV3(
        layer, str(tmp_path / "crowns.gpkg"), QgsCoordinateTransformContext(), options)
    assert error == compat.EXPORT_OK, message
    error, _, _, _ = QgsVectorFileWriter.writeAsVectorFormatV3(
        layer, str(tmp_path / "missing" / "folder" / "crowns.gpkg"), QgsCoordinateTransformContext(), options)
    assert error != compat.EXPORT_OK


@pytest.mark.parametrize(("layer_filter", "kind"), [("RASTER_LAYER_FILTER", "raster"),
                                                    ("POLYGON_LAYER_FILTER", "polygon")])
def test_layer_filters_keep_only_that_kind_of_layer_in_a_layer_combo(qgis_app, qgis_new_project, layer_filter, kind):
    from qgis.core import QgsMapLayerProxyModel, QgsProject, QgsVectorLayer

    polygons = QgsVectorLayer("Polygon?crs=EPSG:32617", "polygon", "memory")
    points = QgsVectorLayer("Point?crs=EPSG:32617", "point", "memory")
    QgsProject.instance().addMapLayers([polygons, points])
    model = QgsMapLayerProxyModel()
    model.setFilters(getattr(compat, layer_filter))
    shown = [model.data(model.index(row, 0)) for row in range(model.rowCount())]
    assert shown == (["polygon"] if kind == "polygon" else [])


def test_mask_bounds_need_no_deprecated_rectangle_call(qgis_app, tmp_path):
    """A mask's bounds are the union of its polygons' boxes, on 3.22 and 3.40 alike (3.40 deprecates
    QgsRectangle.setMinimal); empty geometries are skipped and a mask without polygons is refused."""
    import warnings

    from osgeo import gdal, osr
    from qgis.core import (
        QgsFeature,
        QgsGeometry,
        QgsProcessingContext,
        QgsProcessingException,
        QgsProject,
        QgsRasterLayer,
        QgsVectorLayer,
    )

    from treeseg_qgis.qgis_side.raster_input import prepare_input

    path = str(tmp_path / "scene.tif")
    dataset = gdal.GetDriverByName("GTiff").Create(path, 100, 100, 3, gdal.GDT_Byte)
    dataset.SetGeoTransform((500000.0, 1.0, 0, 4000100.0, 0, -1.0))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32617)
    dataset.SetProjection(srs.ExportToWkt())
    dataset = None
    layer = QgsRasterLayer(path, "scene")
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())

    mask = QgsVectorLayer("Polygon?crs=EPSG:32617", "mask", "memory")
    features = []
    for wkt in ("POLYGON((500010 4000010, 500020 4000010, 500020 4000020, 500010 4000010))",
                "POLYGON((500050 4000060, 500070 4000060, 500070 4000080, 500050 4000060))", None):
        feature = QgsFeature()
        if wkt:
            feature.setGeometry(QgsGeometry.fromWkt(wkt))
        features.append(feature)
    mask.dataProvider().addFeatures(features)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        vrt = prepare_input(layer, None, mask, 0.0, context, tmp_path / "scratch")
    geotransform = gdal.Open(vrt).GetGeoTransform()
    assert (geotransform[0], geotransform[3]) == (500010.0, 4000080.0)
    assert gdal.Open(vrt).RasterXSize == 60 and gdal.Open(vrt).RasterYSize == 70

    empty = QgsVectorLayer("Polygon?crs=EPSG:32617", "empty", "memory")
    with pytest.raises(QgsProcessingException, match="has no polygons"):
        prepare_input(layer, None, empty, 0.0, context, tmp_path / "scratch")


def test_qaction_comes_from_where_this_qt_has_it_and_triggers(qgis_app):
    from qgis.PyQt import QtGui, QtWidgets

    expected = QtGui.QAction if hasattr(QtGui, "QAction") else QtWidgets.QAction  # Qt6: QtGui, Qt5: QtWidgets
    assert compat.QAction is expected
    triggered = []
    action = compat.QAction("Segment Trees Panel")
    action.triggered.connect(lambda: triggered.append(True))
    action.trigger()
    assert triggered == [True] and action.text() == "Segment Trees Panel"
    with pytest.raises(AttributeError, match="Neither QtGui nor QtWidgets has QNoSuchAction"):
        compat.qt_moved_to_gui("QNoSuchAction")


@pytest.mark.parametrize(("qgis_version", "offered"), [("3.22.16", True), ("3.44.16", True), ("4.0.0", True),
                                                       ("4.2.1", True), ("3.20.3", False), ("5.0.0", False)])
def test_the_plugin_manager_offers_the_plugin_from_qgis_3_22_to_4(monkeypatch, qgis_version, offered):
    """metadata.txt as the running QGIS's own plugin manager reads it (pyplugin_installer), with the fields the
    plugin repository's validator requires; supportsQt6 for QGIS 4.0's manager, qgisMaximumVersion for later."""
    import configparser

    from tests.conftest import REPO

    monkeypatch.syspath_prepend("/usr/share/qgis/python")
    from pyplugin_installer.version_compare import isCompatible

    parser = configparser.ConfigParser()
    parser.read(REPO / "metadata.txt", encoding="utf-8")
    general = parser["general"]
    assert isCompatible(qgis_version, general["qgisMinimumVersion"], general["qgisMaximumVersion"]) is offered
    assert general["supportsQt6"] == "True" and general["qgisMaximumVersion"] == "4.99"
    required = ("name", "description", "version", "qgisMinimumVersion", "author", "email", "about", "tracker",
                "repository")
    assert all(general.get(field, "").strip() for field in required)
