"""Processing's real batch dialog for treeseg:segmenttrees: its columns are as wide as their widgets need, not
widened by long headers (QGIS heads each column with the parameter's description); its first row offers the
orthophoto, not a result raster."""

from __future__ import annotations

import sys

import pytest

from treeseg_qgis.params import SegmentationParams
from treeseg_qgis.qgis_side.engine_client import EngineClient

from .test_gui import add_raster
from .test_processing import provider  # noqa: F401 - the fixture that registers the treeseg provider
from .test_result_groups import project  # noqa: F401 - the project, emptied afterwards


def open_batch_dialog(provider, iface):  # noqa: F811
    """segmenttrees's batch dialog as the toolbox opens it ("Execute as Batch Process…": a new instance of the
    algorithm), shown."""
    from processing.gui.BatchAlgorithmDialog import BatchAlgorithmDialog
    from qgis.core import QgsApplication

    dialog = BatchAlgorithmDialog(provider.algorithm("segmenttrees").create(), parent=iface.mainWindow())
    dialog.show()
    QgsApplication.processEvents()
    return dialog


@pytest.fixture
def batch_dialog(provider, qgis_iface):  # noqa: F811
    dialog = open_batch_dialog(provider, qgis_iface)
    yield dialog
    dialog.close()


def widened_by_header(table) -> dict[str, tuple[int, int]]:
    """The visible columns (but the last, which stretches) whose header needs more width than QGIS's minimum
    column and their cells: header text → (what the header needs, what the cells need)."""
    header = table.horizontalHeader()
    wide = {}
    for column in range(table.columnCount() - 1):
        needed = max(header.minimumSectionSize(), table.sizeHintForColumn(column))
        if not table.isColumnHidden(column) and header.sectionSizeHint(column) > needed:
            wide[table.horizontalHeaderItem(column).text()] = (header.sectionSizeHint(column), needed)
    return wide


def test_no_header_widens_a_column_of_the_batch_dialog(batch_dialog):
    from qgis.core import QgsApplication

    panel = batch_dialog.mainWidget()
    table = panel.tblParameters
    header = table.horizontalHeader()
    essentials_width = header.length()
    assert widened_by_header(table) == {}
    assert all(header.sectionSize(column) <= max(header.minimumSectionSize(), table.sizeHintForColumn(column))
               for column in range(table.columnCount() - 1) if not table.isColumnHidden(column))
    panel.btnAdvanced.setChecked(True)
    QgsApplication.processEvents()
    assert header.length() > essentials_width
    assert widened_by_header(table) == {}
    print(f"\nbatch dialog columns: {essentials_width} px, with the advanced ones {header.length()} px")


def test_the_first_row_offers_the_orthophoto_not_a_result_raster(
        provider, project, qgis_iface, tiny_model_dir, scene_tif, tmp_path):  # noqa: F811
    """A run's results on top of Layers, above two orthophotos ('Clusters (K=2)' also comes first by name, which
    QGIS's combo box takes when the selected layer is no raster): a selected result offers its own orthophoto,
    a selected orthophoto itself, another layer the topmost orthophoto."""
    from qgis.core import QgsVectorLayer

    from treeseg_qgis.qgis_side.results import add_result_layers

    path, _ = scene_tif
    scene = add_raster(path)
    other = add_raster(path, "the other orthophoto")
    plots = QgsVectorLayer("Polygon?crs=EPSG:32617", "plots", "memory")
    project.addMapLayer(plots)
    engine = EngineClient(sys.executable)
    try:
        record = engine.segment(SegmentationParams(str(path), str(tmp_path / "out"), model=str(tiny_model_dir),
                                                   device="cpu", clusters=2))
    finally:
        engine.close()
    group = add_result_layers(record, scene.name(), project)
    results = {node.layer().name(): node.layer() for node in group.findLayers()}
    clusters = next(layer for name, layer in results.items() if name.startswith("Clusters"))

    def first_row_input(selected) -> str:
        qgis_iface.setActiveLayer(selected)
        dialog = open_batch_dialog(provider, qgis_iface)
        try:
            return dialog.mainWidget().valueForParameter(0, "INPUT")
        finally:
            dialog.close()

    assert first_row_input(clusters) == scene.id()
    assert first_row_input(results["Tree polygons"]) == scene.id()
    assert first_row_input(plots) == other.id()
    assert first_row_input(scene) == scene.id()
