"""The TreeSeg panel's extras, driving the real engine worker with tiny models: more outputs (crowns, feature
image, canopy height), the elbow plot of automatic K, and click-to-teach with its map tool and threshold slider.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from . import test_canopy, test_gui
from .conftest import SAMPLE_GEOTRANSFORM, disc_scene, write_geotiff
from .test_gui import add_raster, set_up_run, treeseg_groups, wait_until

plugin, clean_settings = test_gui.plugin, test_gui.clean_settings
tiny_height_dir = test_canopy.tiny_height_dir

TREE_PIXEL = (60, 50)
SOIL_PIXEL = (240, 10)


@pytest.fixture
def small_scene(tmp_path) -> Path:
    """A 256 × 192 px orthophoto-like GeoTIFF with three crowns; one is centred on TREE_PIXEL."""
    image, _ = disc_scene(192, 256, [(50, 60), (60, 190), (140, 120)], radius=36, seed=1)
    return write_geotiff(tmp_path / "scene.tif", image)


@pytest.fixture
def canvas(qgis_iface):
    """The map canvas, on screen (in the shown main window) so that it has its real size."""
    from qgis.core import QgsApplication

    window = qgis_iface.mainWindow()
    window.show()
    window.resize(800, 600)
    QgsApplication.processEvents()
    yield qgis_iface.mapCanvas()
    window.hide()


def map_point(column: float, row: float):
    """The map coordinates (the scene's UTM CRS) of a position in pixels."""
    from qgis.core import QgsPointXY

    x0, width, _, y0, _, height = SAMPLE_GEOTRANSFORM
    return QgsPointXY(x0 + column * width, y0 + row * height)


def run_from_panel(dock, raster, model_dir: Path, out: Path, clusters: int | None = 2) -> dict:
    """Click Run with the tiny model and wait; the run record."""
    panel = dock.run_panel
    panel.layer_combo.setLayer(raster)
    set_up_run(panel, model_dir, out, clusters=clusters)
    dock.show()
    panel.run_button.click()
    wait_until(lambda: panel.task is None)
    assert panel.stage_label.text().startswith("Done"), panel.stage_label.text()
    (record_path,) = out.glob("*_run.json")
    return json.loads(record_path.read_text())


def teach_groups() -> list:
    return [group for group in treeseg_groups() if "taught by example" in group.name()]


def test_more_outputs_are_run_added_styled_and_remembered(plugin, qgis_iface, small_scene, tiny_model_dir,
                                                         tiny_height_dir, tmp_path):
    from qgis.core import QgsMultiBandColorRenderer, QgsSingleBandPseudoColorRenderer
    from qgis.PyQt.QtCore import Qt

    from treeseg_qgis.qgis_side.gui.dock import TreesegDock

    raster = add_raster(small_scene)
    dock = plugin.dock
    panel = dock.run_panel
    assert panel.extras_group.isCollapsed() and not panel.crown_min_area.isEnabled()
    panel.crowns_check.setChecked(True)
    panel.crown_min_area.setValue(1.5)
    panel.features_check.setChecked(True)
    panel.height_check.setChecked(True)
    panel.min_height_spin.setValue(0.0)
    panel.height_model_override.setText(str(tiny_height_dir))
    assert panel.crown_min_area.isEnabled() and panel.min_height_spin.text() == "any height"
    panel.layer_combo.setLayer(raster)
    set_up_run(panel, tiny_model_dir, tmp_path / "out", clusters=None)
    params = panel.build_params()
    extras = {key: getattr(params, key) for key in (
        "crowns", "crown_min_area_m2", "feature_preview", "canopy_height", "min_tree_height_m", "height_model")}
    assert extras == {"crowns": True, "crown_min_area_m2": 1.5, "feature_preview": True, "canopy_height": True,
                      "min_tree_height_m": None, "height_model": str(tiny_height_dir)}

    record = run_from_panel(dock, raster, tiny_model_dir, tmp_path / "out", clusters=None)

    assert record["clusters"]["automatic"] and record["crowns"] >= 1
    (group,) = treeseg_groups()
    nodes = group.findLayers()
    assert [node.name() for node in nodes] == [
        f"Tree crowns ({record['crowns']})", "Tree polygons", f"Tree mask ({100 * record['trees']['tree_cover']:.1f} "
        f"% cover)", f"Clusters (K={record['clusters']['k']})", "Feature image (PCA RGB)", "Canopy height (m)"]
    assert [node.isVisible() for node in nodes] == [True, True, False, True, False, False]
    crowns, features, height = nodes[0].layer(), nodes[4].layer(), nodes[5].layer()
    assert crowns.featureCount() == record["crowns"] and crowns.crs() == raster.crs()
    outline = crowns.renderer().symbol().symbolLayer(0)
    assert outline.brushStyle() == Qt.BrushStyle.NoBrush
    assert outline.strokeColor().red() > 200 and outline.strokeColor().blue() < 50
    assert isinstance(features.renderer(), QgsMultiBandColorRenderer) and features.bandCount() == 3
    assert isinstance(height.renderer(), QgsSingleBandPseudoColorRenderer)
    shader = height.renderer().shader().rasterShaderFunction()
    ramp = shader.colorRampItemList()
    assert ramp[0].value == 0 and all(item.label.endswith(" m") for item in ramp)
    assert shader.legendSettings().suffix() == " m"
    assert ramp[-1].color.green() < ramp[0].color.green() and ramp[-1].color.green() > ramp[-1].color.red()
    assert panel.elbow_image.isVisible() and not panel.elbow_image.pixmap().isNull()
    assert f"K = {record['clusters']['k']}" in panel.elbow_caption.text()
    assert Path(panel.elbow_image.toolTip()) == Path(record["outputs"]["elbow"])

    remembered_dock = TreesegDock(qgis_iface, plugin.engine)
    remembered = remembered_dock.run_panel
    assert remembered.crowns_check.isChecked() and remembered.crown_min_area.value() == 1.5
    assert remembered.features_check.isChecked() and remembered.height_check.isChecked()
    assert remembered.height_model_override.text() == str(tiny_height_dir)
    assert not remembered.extras_group.isCollapsed() and not remembered.elbow_image.isVisible()
    remembered_dock.shutdown()
    remembered_dock.deleteLater()


def test_the_teach_tool_turns_clicks_into_pixels_of_the_raster(canvas, qgis_new_project, small_scene):
    from qgis.core import QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsProject
    from qgis.gui import QgsMapMouseEvent, QgsVertexMarker
    from qgis.PyQt.QtCore import QEvent, QPoint, Qt

    from treeseg_qgis.qgis_side.gui.teach_tool import TeachMapTool
    from treeseg_qgis.qgis_side.raster_input import RasterGrid

    raster = add_raster(small_scene)
    grid = RasterGrid.of_file(str(small_scene))
    assert grid.geotransform == SAMPLE_GEOTRANSFORM and (grid.width, grid.height) == (256, 192)
    wgs84 = QgsCoordinateReferenceSystem("EPSG:4326")
    to_canvas = QgsCoordinateTransform(raster.crs(), wgs84, QgsProject.instance())
    canvas.setDestinationCrs(wgs84)
    canvas.setExtent(to_canvas.transformBoundingBox(raster.extent()))
    tool = TeachMapTool(canvas)
    tool.set_grid(grid)

    assert tool.add_example(to_canvas.transform(map_point(100.5, 20.25)), True)
    column, row, is_tree = tool.pixel_examples()[0]
    assert column == pytest.approx(100.5, abs=1e-3) and row == pytest.approx(20.25, abs=1e-3) and is_tree
    assert not tool.add_example(to_canvas.transform(map_point(-3, 20)), True)
    assert not tool.add_example(to_canvas.transform(map_point(30, 195)), True)

    def click(column: float, row: float, button, modifiers=Qt.KeyboardModifier.NoModifier) -> None:
        device = canvas.getCoordinateTransform().transform(to_canvas.transform(map_point(column, row)))
        tool.canvasReleaseEvent(QgsMapMouseEvent(canvas, QEvent.Type.MouseButtonRelease,
                                                 QPoint(round(device.x()), round(device.y())), button, button,
                                                 modifiers))

    ignored = []
    tool.click_ignored.connect(lambda: ignored.append(True))
    click(-20, 20, Qt.MouseButton.LeftButton)
    assert ignored == [True] and len(tool.pixel_examples()) == 1
    click(*TREE_PIXEL, Qt.MouseButton.LeftButton)
    click(*SOIL_PIXEL, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.ShiftModifier)
    click(200, 150, Qt.MouseButton.RightButton)
    click(10, 10, Qt.MouseButton.MiddleButton)

    examples = tool.pixel_examples()[1:]
    origin = to_canvas.transform(map_point(0, 0))
    screen_columns = canvas.mapUnitsPerPixel() / abs(to_canvas.transform(map_point(1, 0)).x() - origin.x())
    screen_rows = canvas.mapUnitsPerPixel() / abs(to_canvas.transform(map_point(0, 1)).y() - origin.y())
    assert screen_columns < 1 and screen_rows < 1
    expected = [(*TREE_PIXEL, True), (*SOIL_PIXEL, False), (200, 150, False)]
    assert [example[2] for example in examples] == [True, False, False] and tool.counts() == (2, 2)
    for (column, row, _), (want_column, want_row, _) in zip(examples, expected):
        assert abs(column - want_column) <= screen_columns and abs(row - want_row) <= screen_rows
    markers = [item for item in canvas.scene().items() if isinstance(item, QgsVertexMarker)]
    assert len(markers) == 4
    assert {marker.color().name() for marker in markers} == {"#ffdd00", "#e61e1e"}  # yellow: seen on green fills

    tool.clear()
    assert tool.pixel_examples() == [] and not any(
        isinstance(item, QgsVertexMarker) for item in canvas.scene().items())
    tool.deleteLater()


def canvas_on_raster(qgis_iface, path):
    """The map canvas showing the raster at `path`, in its CRS; returns the canvas and the layer."""
    canvas = qgis_iface.mapCanvas()
    raster = add_raster(path)
    canvas.setDestinationCrs(raster.crs())
    canvas.setExtent(raster.extent())
    return canvas, raster


def test_teach_after_a_run_and_the_slider_replaces_its_layers_from_the_cache(plugin, qgis_iface, small_scene,
                                                                             tiny_model_dir, tmp_path):
    from qgis.core import QgsApplication, QgsProject

    canvas, raster = canvas_on_raster(qgis_iface, small_scene)
    dock = plugin.dock
    panel = dock.run_panel
    teach = dock.teach_panel
    assert not teach.teach_button.isEnabled() and not teach.apply_teach_button.isEnabled()
    out = tmp_path / "out"
    run_from_panel(dock, raster, tiny_model_dir, out)
    assert not panel.elbow_image.isVisible()

    teach.teach_button.click()
    assert canvas.mapTool() is teach.teach_tool and teach.teach_button.isChecked()
    teach.teach_tool.add_example(map_point(*TREE_PIXEL), True)
    teach.teach_tool.add_example(map_point(*SOIL_PIXEL), False)
    assert teach.examples_label.text() == "Examples: 1 tree, 1 not tree."
    teach.auto_threshold.setChecked(False)  # the slider's own threshold
    teach.threshold_slider.setValue(60)
    teach.apply_teach_button.click()
    assert teach.teach_task is not None and not panel.run_button.isEnabled()
    wait_until(lambda: teach.teach_task is None)

    assert "features from cache — model not run" in teach.teach_status.text(), teach.teach_status.text()
    (group,) = teach_groups()
    first = [node.layer() for node in group.findLayers()]
    assert [layer.name().split(" (")[0] for layer in first] == ["Taught trees", "Tree similarity"]
    assert "score ≥ 0.60" in first[0].name() and all(layer.crs() == raster.crs() for layer in first)
    first_files = [Path(layer.source()) for layer in first]
    first_ids = [layer.id() for layer in first]
    assert all(path.is_file() for path in first_files)
    first_cover = float(first[0].name().split(", ")[1].split(" %")[0])

    teach_runs = []

    def count_task(task_id: int) -> None:
        teach_runs.append(task_id)

    QgsApplication.taskManager().taskAdded.connect(count_task)
    for value in (70, 75, 80):
        teach.threshold_slider.setValue(value)
    assert teach.threshold_label.text() == "0.80"
    wait_until(lambda: teach_runs and teach.teach_task is None)
    QgsApplication.taskManager().taskAdded.disconnect(count_task)

    assert len(teach_runs) == 1
    (group,) = teach_groups()
    second = [node.layer() for node in group.findLayers()]
    assert len(second) == 2 and "score ≥ 0.80" in second[0].name()
    assert not any(QgsProject.instance().mapLayer(layer_id) for layer_id in first_ids)
    assert len(QgsProject.instance().mapLayersByName(second[1].name())) == 1
    assert not any(path.exists() for path in first_files)
    (record_path,) = out.glob("*_teach.json")
    record = json.loads(record_path.read_text())
    assert record["feature_cache"] == "hit" and record["threshold"] == 0.8
    assert record["examples"] == {"trees": 1, "not_trees": 1}
    assert 100 * record["tree_cover"] <= first_cover

    panel.run_button.click()
    wait_until(lambda: panel.task is None)
    assert "features from cache — model not run" in panel.stage_label.text(), panel.stage_label.text()
    assert teach.teach_tool.counts() == (1, 1) and teach.apply_teach_button.isEnabled()

    teach.clear_examples_button.click()
    assert teach.examples_label.text() == "No examples yet." and not teach.apply_teach_button.isEnabled()


def test_the_panel_shows_the_threshold_chosen_from_the_clicks_for_any_class(plugin, qgis_iface, small_scene,
                                                                            tiny_model_dir, tmp_path):
    canvas, raster = canvas_on_raster(qgis_iface, small_scene)
    dock = plugin.dock
    teach = dock.teach_panel
    out = tmp_path / "out"
    run_from_panel(dock, raster, tiny_model_dir, out)
    teach.class_edit.setText("dead tree")
    teach.auto_threshold.setChecked(True)
    teach.teach_button.click()
    for (column, row), is_tree in zip(((60, 50), (190, 60), (240, 10), (10, 180)), (True, True, False, False)):
        teach.teach_tool.add_example(map_point(column, row), is_tree)
    assert teach.examples_label.text() == "Examples: 2 dead trees, 2 not dead trees."
    teach.apply_teach_button.click()
    wait_until(lambda: teach.teach_task is None)

    (record_path,) = out.glob("*_dead_tree_teach.json")
    record = json.loads(record_path.read_text())
    assert record["threshold_source"] == "calibrated" and record["class"] == "dead tree"
    assert "calibrated probabilities from the 2 + 2 examples" in teach.teach_status.text(), teach.teach_status.text()
    assert teach.threshold_label.text() == f"{record['threshold']:.2f}" and teach.auto_threshold.isChecked()
    assert teach.threshold_slider.value() == round(100 * record["threshold"])
    (group,) = teach_groups()
    names = [node.layer().name() for node in group.findLayers()]
    assert names[0].startswith("Taught: dead tree (score ≥") and names[1] == "Dead tree similarity (0–1)"

    teach.threshold_slider.setValue(90)
    assert not teach.auto_threshold.isChecked()
    wait_until(lambda: teach.teach_task is None and "set by the user" in teach.teach_status.text())


def test_the_class_list_teaches_several_classes_with_their_colours_and_counts(plugin, qgis_iface, small_scene,
                                                                             tiny_model_dir, tmp_path):
    from osgeo import gdal
    from qgis.gui import QgsMapMouseEvent, QgsVertexMarker
    from qgis.PyQt.QtCore import QEvent, QPoint, Qt

    canvas, raster = canvas_on_raster(qgis_iface, small_scene)
    dock = plugin.dock
    teach = dock.teach_panel
    out = tmp_path / "out"
    run_from_panel(dock, raster, tiny_model_dir, out)
    assert not teach.class_list.isVisibleTo(teach)
    teach.teach_button.click()
    for name in ("live tree", "dead tree"):
        teach.class_edit.setText(name)
        teach.add_class_button.click()
    assert teach.class_list.isVisibleTo(teach) and teach.class_list.currentRow() == 1  # the class just added

    def click(column: float, row: float, button=Qt.MouseButton.LeftButton) -> None:
        device = canvas.getCoordinateTransform().transform(map_point(column, row))
        teach.teach_tool.canvasReleaseEvent(QgsMapMouseEvent(
            canvas, QEvent.Type.MouseButtonRelease, QPoint(round(device.x()), round(device.y())), button, button,
            Qt.KeyboardModifier.NoModifier))

    click(190, 60)  # dead tree, the selected class
    teach.class_list.setCurrentRow(0)
    click(*TREE_PIXEL)
    click(70, 60)
    click(*SOIL_PIXEL, Qt.MouseButton.RightButton)  # 'other' joins the list
    click(10, 180, Qt.MouseButton.RightButton)
    rows = [teach.class_list.item(row).text() for row in range(teach.class_list.count())]
    assert rows == ["live tree: 2 examples", "dead tree: 1 example", "other: 2 examples"]
    swatches = [teach.class_list.item(row).icon().pixmap(4, 4).toImage().pixelColor(1, 1).name()
                for row in range(teach.class_list.count())]
    assert swatches == ["#228b22", "#a0a0a0", "#8b5a2b"]
    markers = [item for item in canvas.scene().items() if isinstance(item, QgsVertexMarker)]
    assert sorted(marker.color().name() for marker in markers) == sorted(
        ["#a0a0a0", "#228b22", "#228b22", "#8b5a2b", "#8b5a2b"])
    assert teach.apply_teach_button.isEnabled() and not teach.threshold_slider.isEnabled()
    teach.apply_teach_button.click()
    wait_until(lambda: teach.teach_task is None)

    assert "2 live tree, 1 dead tree, 2 other examples" in teach.teach_status.text(), teach.teach_status.text()
    (group,) = teach_groups()
    (layer,) = [node.layer() for node in group.findLayers()]
    assert layer.name() == "Taught classes (live tree, dead tree, other)"
    (classes_path,) = out.glob("*_classes.tif")
    dataset = gdal.Open(str(classes_path))
    band = dataset.GetRasterBand(1)
    table = band.GetColorTable()
    assert band.GetCategoryNames()[:4] == ["unsure", "live tree", "dead tree", "other"]
    assert ["#{:02x}{:02x}{:02x}".format(*table.GetColorEntry(value)[:3]) for value in (1, 2, 3)] == swatches
    legend = [(item.value, item.label) for item in layer.renderer().classes()]
    assert legend == [(0, "unsure"), (1, "live tree"), (2, "dead tree"), (3, "other")]

    teach.class_list.setCurrentRow(1)
    teach.remove_class_button.click()  # dead tree and its example go: two classes with examples remain
    rows = [teach.class_list.item(row).text() for row in range(teach.class_list.count())]
    assert rows == ["live tree: 2 examples", "other: 2 examples"] and len(teach.teach_tool.examples) == 4
    teach.class_list.setCurrentRow(1)
    teach.remove_class_button.click()
    assert not teach.apply_teach_button.isEnabled()  # one class with examples: nothing to teach at once
