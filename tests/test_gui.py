"""The TreeSeg panel in the QGIS test application, driving the real engine worker with the tiny DINOv3.

Runs go through the plugin as QGIS loads it (classFactory, initGui), the panel's
own buttons, the task manager and the message bar.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from treeseg_qgis.qgis_side.engine_client import ENGINE_PYTHON_ENV

from .conftest import disc_scene, write_geotiff

RUN_TIMEOUT = 120.0
"""How long a wait may take on an idle machine before it counts as a hang (`load_scaled` stretches it)."""


def load_scaled(seconds: float) -> float:
    """`seconds` on an idle machine, stretched by the machine's load now (load average per core): a wait fails
    for a hang, not because a busy CI machine runs every test several times slower."""
    return seconds * max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))


def wait_until(condition: Callable[[], bool], timeout: float = RUN_TIMEOUT) -> None:
    """Process Qt events until `condition()` holds (the event itself, checked every 20 ms); fail only when it has
    not come within `timeout` seconds scaled by the load (`load_scaled`, measured at each check)."""
    from qgis.core import QgsApplication

    started = time.monotonic()
    while not condition():
        waited = time.monotonic() - started
        assert waited < load_scaled(timeout), (f"gave up after {waited:.0f} s ({timeout:.0f} s on an idle machine, "
                                               f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
        QgsApplication.processEvents()
        time.sleep(0.02)


@pytest.fixture
def clean_settings():
    """No remembered panel settings before or after the test."""
    from qgis.core import QgsSettings

    QgsSettings().remove("treeseg/dock")
    yield
    QgsSettings().remove("treeseg/dock")


@pytest.fixture
def plugin(qgis_iface, qgis_new_project, clean_settings, monkeypatch):
    """The plugin loaded as QGIS loads it, with this .venv's Python as the engine."""
    from treeseg_qgis import classFactory

    monkeypatch.setenv(ENGINE_PYTHON_ENV, sys.executable)
    main_window = qgis_iface.mainWindow()
    main_window.show()
    loaded = classFactory(qgis_iface)
    loaded.initGui()
    yield loaded
    loaded.unload()
    main_window.hide()


def add_raster(path: Path, name: str = "scene"):
    from qgis.core import QgsProject, QgsRasterLayer

    layer = QgsRasterLayer(str(path), name)
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    return layer


def set_up_run(panel, model_dir: Path, out: Path, stride: int = 16, clusters: int | None = 2) -> None:
    """Fill the panel as a user would for a quick run of the tiny model."""
    panel.model_override.setText(str(model_dir))
    panel.stride_combo.setCurrentIndex(panel.stride_combo.findData(stride))
    panel.auto_clusters.setChecked(clusters is None)
    if clusters is not None:
        panel.clusters_spin.setValue(clusters)
    panel.device_combo.setCurrentText("cpu")
    panel.output_widget.setFilePath(str(out))


def treeseg_groups() -> list:
    from qgis.core import QgsProject

    return [node for node in QgsProject.instance().layerTreeRoot().children() if " — " in node.name()]


@pytest.fixture
def long_scene(tmp_path) -> Path:
    """A scene big enough that a stride-4 run lasts seconds: time to cancel, remove or kill mid-run."""
    centres = [(200 + 300 * (i // 4), 200 + 300 * (i % 4)) for i in range(16)]
    image, _ = disc_scene(1280, 1280, centres, radius=90, seed=3)
    return write_geotiff(tmp_path / "long.tif", image)


def start_and_wait_for_extraction(dock, qgis_iface, long_scene: Path, model_dir: Path, out: Path):
    """Click Run on the long scene and return once the engine reports feature extraction."""
    panel = dock.run_panel
    raster = add_raster(long_scene, "long")
    qgis_iface.setActiveLayer(raster)
    panel.layer_combo.setLayer(raster)
    set_up_run(panel, model_dir, out, stride=4)
    dock.show()
    panel.run_button.click()
    assert panel.task is not None and panel.cancel_button.isEnabled()
    wait_until(lambda: panel.stage_label.text().startswith("Extracting") or panel.task is None)
    assert panel.task is not None, f"the run ended before it could be interrupted: {panel.stage_label.text()}"
    return raster


def test_the_panel_defaults_to_the_active_raster_and_builds_params(qgis_iface, qgis_new_project, clean_settings,
                                                                    scene_tif, tmp_path):
    from treeseg_qgis.params import AUTO, SegmentationParams
    from treeseg_qgis.qgis_side.engine_client import EngineClient
    from treeseg_qgis.qgis_side.gui.dock import TreesegDock

    path, _ = scene_tif
    add_raster(path, "other")
    raster = add_raster(path)
    qgis_iface.setActiveLayer(raster)
    dock = TreesegDock(qgis_iface, EngineClient(sys.executable))
    panel = dock.run_panel
    assert panel.layer_combo.currentLayer() is raster
    assert panel.model_combo.currentData() == "base" and panel.auto_clusters.isChecked()
    assert not panel.allow_untrained.isChecked() and "UNTRAINED" in panel.allow_untrained.toolTip()
    assert panel.output_widget.filePath().endswith("treeseg")
    assert panel.precision_combo.currentText() == "auto" and panel.advanced_group.isCollapsed()
    out = tmp_path / "out"
    set_up_run(panel, Path("unused"), out, stride=8, clusters=4)
    panel.model_override.clear()
    panel.model_combo.setCurrentIndex(panel.model_combo.findData("large-sat"))
    panel.allow_untrained.setChecked(True)

    params = panel.build_params()

    assert params == SegmentationParams(input_path=str(path), output_dir=str(out), output_stem="scene",
                                        model="large-sat", stride=8, clusters=4, device="cpu", allow_untrained=True)
    panel.cluster_model_widget.setFilePath(str(tmp_path / "survey.treeseg"))
    assert panel.build_params().cluster_model == str(tmp_path / "survey.treeseg")
    panel.cluster_model_widget.setFilePath("")
    out.mkdir()
    (out / "scene_UNTRAINED_trees.tif").write_bytes(b"")
    panel.auto_clusters.setChecked(True)
    again = panel.build_params()
    assert again.output_stem == "scene_2" and again.clusters == AUTO
    dock.deleteLater()


@pytest.mark.parametrize("everything", [False, True], ids=["defaults", "every-choice"])
def test_the_panel_builds_the_parameters_the_command_line_builds_for_the_same_choices(
        qgis_iface, qgis_new_project, clean_settings, scene_tif, tmp_path, everything):
    from dataclasses import replace

    from treeseg_qgis.engine.cli import build_parser, params_from_args
    from treeseg_qgis.qgis_side.engine_client import EngineClient
    from treeseg_qgis.qgis_side.gui.dock import TreesegDock

    path, _ = scene_tif
    out = tmp_path / "out"
    dock = TreesegDock(qgis_iface, EngineClient(sys.executable))
    panel = dock.run_panel
    panel.layer_combo.setLayer(add_raster(path))
    panel.output_widget.setFilePath(str(out))
    arguments = ["segment", str(path), "--out", str(out)]
    if everything:
        panel.model_combo.setCurrentIndex(panel.model_combo.findData("small"))
        panel.model_override.setText("someone/dinov3-finetuned")
        panel.stride_combo.setCurrentIndex(panel.stride_combo.findData(4))
        panel.auto_clusters.setChecked(False)
        panel.clusters_spin.setValue(7)
        panel.device_combo.setCurrentText("cpu")
        panel.precision_combo.setCurrentText("int8")
        panel.allow_untrained.setChecked(True)
        panel.crowns_check.setChecked(True)
        panel.crown_min_area.setValue(3.5)
        panel.features_check.setChecked(True)
        panel.height_check.setChecked(True)
        panel.min_height_spin.setValue(2.5)
        panel.height_model_override.setText("someone/chm")
        arguments += ["--model", "someone/dinov3-finetuned", "--stride", "4", "--clusters", "7", "--device", "cpu",
                      "--precision", "int8", "--allow-untrained", "--crowns", "--crown-min-area", "3.5",
                      "--feature-preview", "--canopy-height", "--min-tree-height", "2.5", "--height-model",
                      "someone/chm"]

    from_the_panel = panel.build_params()
    from_the_command_line = params_from_args(build_parser().parse_args(arguments))

    # the panel also names the outputs so that no earlier run is overwritten; the CLI has no such choice
    assert from_the_panel == replace(from_the_command_line, output_stem="scene")
    dock.deleteLater()


def test_the_panel_offers_exactly_the_values_the_parameters_allow(qgis_iface, qgis_new_project, clean_settings):
    from treeseg_qgis.params import DEVICES, K_MAX, K_MIN, MODEL_NAMES, PRECISIONS, STRIDES
    from treeseg_qgis.qgis_side.engine_client import EngineClient
    from treeseg_qgis.qgis_side.gui import run_estimates
    from treeseg_qgis.qgis_side.gui.dock import TreesegDock

    dock = TreesegDock(qgis_iface, EngineClient(sys.executable))
    panel = dock.run_panel

    def data(combo) -> list:
        return [combo.itemData(index) for index in range(combo.count())]

    def texts(combo) -> list:
        return [combo.itemText(index) for index in range(combo.count())]

    assert data(panel.model_combo) == list(MODEL_NAMES) and data(panel.stride_combo) == list(STRIDES)
    assert texts(panel.device_combo) == list(DEVICES) and texts(panel.precision_combo) == list(PRECISIONS)
    assert (panel.clusters_spin.minimum(), panel.clusters_spin.maximum()) == (K_MIN, K_MAX)
    assert run_estimates.parameters_label(86) == "86 M parameters"
    assert run_estimates.parameters_label(6716) == "6.7 B parameters"
    dock.deleteLater()


def test_a_value_no_run_can_use_is_shown_in_the_panel_and_nothing_starts(plugin, scene_tif, tmp_path):
    path, _ = scene_tif
    panel = plugin.dock.run_panel
    panel.layer_combo.setLayer(add_raster(path))
    set_up_run(panel, Path("unused"), tmp_path / "out")
    panel.output_widget.setFilePath("  ")
    panel.run_button.click()

    assert panel.task is None and panel.stage_label.text() == "Choose an output folder."
    assert "#b00020" in panel.stage_label.styleSheet()
    assert not (tmp_path / "out").exists()


def test_a_run_adds_a_styled_group_in_the_input_crs(plugin, qgis_iface, scene_tif, tiny_model_dir, tmp_path):
    from qgis.core import (
        Qgis,
        QgsExpression,
        QgsExpressionContext,
        QgsExpressionContextUtils,
        QgsPalettedRasterRenderer,
        QgsProject,
        QgsRuleBasedRenderer,
        QgsSettings,
    )
    from qgis.PyQt.QtCore import Qt

    path, _ = scene_tif
    raster = add_raster(path)
    qgis_iface.setActiveLayer(raster)
    dock = plugin.dock
    panel = dock.run_panel
    panel.layer_combo.setLayer(raster)
    out = tmp_path / "out"
    set_up_run(panel, tiny_model_dir, out)
    panel.allow_untrained.setChecked(True)
    plugin.action.trigger()
    assert dock.isVisible()

    panel.run_button.click()
    assert not panel.run_button.isEnabled()
    assert panel.stage_label.text() == "Waiting for the engine to start…"
    wait_until(lambda: panel.task is None)

    assert panel.stage_label.text().startswith("Done"), panel.stage_label.text()
    assert panel.progress_bar.value() == 100
    assert panel.engine_label.text().startswith("Engine: CPU (")
    (group,) = treeseg_groups()
    assert group.name() == f"scene — {tiny_model_dir.name}, stride 16"
    layers = [node.layer() for node in group.findLayers()]
    assert [layer.name() for layer in layers][0] == "Tree polygons"
    assert all(layer.crs() == raster.crs() for layer in layers)
    assert all(QgsProject.instance().mapLayer(layer.id()) is layer for layer in layers)
    polygons, trees, clusters = layers
    assert isinstance(clusters.renderer(), QgsPalettedRasterRenderer)
    labels = [item.label for item in clusters.renderer().classes()]
    assert len(labels) == 2 and any(label.endswith("— tree") for label in labels)
    assert {item.label: item.value for item in trees.renderer().classes()} == {"tree": 1, "not tree": 0}
    assert isinstance(polygons.renderer(), QgsRuleBasedRenderer)
    tree_rule, other_rule = polygons.renderer().rootRule().children()
    assert (tree_rule.label(), other_rule.label(), other_rule.isElse()) == ("tree", "not tree", True)
    context = QgsExpressionContext(QgsExpressionContextUtils.globalProjectLayerScopes(polygons))
    is_tree = []
    for feature in polygons.getFeatures():
        context.setFeature(feature)
        is_tree.append(bool(feature["is_tree"]))
        assert bool(QgsExpression(tree_rule.filterExpression()).evaluate(context)) == is_tree[-1]
    assert set(is_tree) == {True, False}
    assert tree_rule.symbol().color().green() > tree_rule.symbol().color().red()
    assert all(rule.symbol().symbolLayer(0).brushStyle() == Qt.BrushStyle.NoBrush for rule in (tree_rule, other_rule))
    assert clusters.opacity() < 1 and trees.opacity() < 1  # the orthophoto shows through
    successes = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Success)
    assert any("K=2" in message and "tree cover" in message and "on cpu" in message for message in successes)
    assert QgsSettings().value("treeseg/dock/model_override") == str(tiny_model_dir)
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".aux.xml")) == [
        "scene_clusters.tif", "scene_polygons.gpkg", "scene_preview.png", "scene_run.json", "scene_trees.tif"]


def test_untrained_weights_are_named_in_the_group_and_warned_about(plugin, qgis_iface, scene_tif, tmp_path,
                                                                   monkeypatch):
    """No cached weights for 'small': with untrained weights allowed the run goes on, marked as such."""
    from qgis.core import Qgis

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-cache"))
    path, _ = scene_tif
    raster = add_raster(path)
    dock = plugin.dock
    panel = dock.run_panel
    panel.layer_combo.setLayer(raster)
    set_up_run(panel, Path("unused"), tmp_path / "out")
    panel.model_override.clear()
    panel.model_combo.setCurrentIndex(panel.model_combo.findData("small"))
    panel.allow_untrained.setChecked(True)
    dock.show()
    panel.run_button.click()
    wait_until(lambda: panel.task is None)

    (group,) = treeseg_groups()
    assert group.name() == "scene — small, stride 16 — UNTRAINED"
    warnings = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
    assert any("UNTRAINED weights, pipeline check only" in message for message in warnings)
    assert panel.stage_label.text().startswith("Done: UNTRAINED weights")
    assert (tmp_path / "out" / "scene_UNTRAINED_clusters.tif").is_file()


def test_a_canvas_extent_runs_on_that_part_of_the_raster(plugin, qgis_iface, qgis_canvas, scene_tif,
                                                          tiny_model_dir, tmp_path):
    from osgeo import gdal
    from qgis.core import QgsRectangle

    path, _ = scene_tif
    raster = add_raster(path)
    dock = plugin.dock
    panel = dock.run_panel
    panel.layer_combo.setLayer(raster)
    set_up_run(panel, tiny_model_dir, tmp_path / "out")
    panel.extent_combo.setCurrentIndex(panel.extent_combo.findData("canvas"))
    qgis_canvas.setDestinationCrs(raster.crs())
    full = raster.extent()
    qgis_canvas.setExtent(QgsRectangle(full.xMinimum(), full.yMinimum(), full.center().x(), full.center().y()))
    requested = qgis_canvas.extent()
    dock.show()
    panel.run_button.click()
    scratch = panel.task.scratch_folder
    assert any(scratch.glob("*.vrt"))
    wait_until(lambda: panel.task is None)

    assert panel.stage_label.text().startswith("Done"), panel.stage_label.text()
    assert any(scratch.glob("*.vrt")), "kept: teaching reuses the run's input"
    plugin.unload()
    assert not scratch.exists()
    clusters = gdal.Open(str(tmp_path / "out" / "scene_clusters.tif"))
    x0, size, _, y0, _, _ = clusters.GetGeoTransform()
    assert clusters.RasterXSize < 400 and clusters.RasterYSize < 320
    assert requested.xMinimum() - size <= x0 and y0 <= requested.yMaximum() + size


def test_selected_polygons_limit_the_run_and_mask_the_rest(plugin, scene_tif, tiny_model_dir, tmp_path):
    from osgeo import gdal
    from qgis.core import QgsFeature, QgsGeometry, QgsPointXY, QgsProject, QgsVectorLayer

    path, _ = scene_tif
    raster = add_raster(path)
    full = raster.extent()
    stands = QgsVectorLayer(f"Polygon?crs={raster.crs().authid()}", "stands", "memory")
    triangle, elsewhere = QgsFeature(), QgsFeature()
    corner = QgsPointXY(full.xMinimum(), full.yMaximum())
    triangle.setGeometry(QgsGeometry.fromPolygonXY([[
        corner, QgsPointXY(full.center().x(), full.yMaximum()), QgsPointXY(full.xMinimum(), full.center().y())]]))
    elsewhere.setGeometry(QgsGeometry.fromRect(full.buffered(-1)))
    stands.dataProvider().addFeatures([triangle, elsewhere])
    QgsProject.instance().addMapLayer(stands)
    dock = plugin.dock
    panel = dock.run_panel
    panel.layer_combo.setLayer(raster)
    set_up_run(panel, tiny_model_dir, tmp_path / "out")
    panel.extent_combo.setCurrentIndex(panel.extent_combo.findData("selection"))
    panel.mask_combo.setLayer(stands)
    assert not panel.mask_combo.isHidden()
    panel.run_button.click()
    assert panel.task is None and "Select one or more polygons" in panel.stage_label.text()

    stands.selectByIds([next(stands.getFeatures()).id()])
    dock.show()
    panel.run_button.click()
    wait_until(lambda: panel.task is None)

    assert panel.stage_label.text().startswith("Done"), panel.stage_label.text()
    clusters = gdal.Open(str(tmp_path / "out" / "scene_clusters.tif")).ReadAsArray()
    assert clusters.shape == (160, 200)
    assert clusters[0, 0] != 255 and clusters[-1, -1] == 255


def test_the_precision_chosen_under_advanced_reaches_the_engine_and_is_remembered(plugin, qgis_iface, scene_tif,
                                                                                    tiny_model_dir, tmp_path):
    import json

    from treeseg_qgis.qgis_side.gui.dock import TreesegDock

    path, _ = scene_tif
    dock = plugin.dock
    panel = dock.run_panel
    panel.layer_combo.setLayer(add_raster(path))
    set_up_run(panel, tiny_model_dir, tmp_path / "out")
    panel.precision_combo.setCurrentText("bfloat16")
    dock.show()
    panel.run_button.click()
    assert panel.task.params.precision == "bfloat16"
    wait_until(lambda: panel.task is None)

    assert panel.stage_label.text().startswith("Done"), panel.stage_label.text()
    record = json.loads((tmp_path / "out" / "scene_run.json").read_text())
    assert record["model"]["precision"] == "bfloat16" and record["parameters"]["precision"] == "bfloat16"
    reopened = TreesegDock(qgis_iface, plugin.engine)
    assert reopened.run_panel.precision_combo.currentText() == "bfloat16"
    assert not reopened.run_panel.advanced_group.isCollapsed()  # a setting other than auto is not hidden
    reopened.shutdown()
    reopened.deleteLater()


def test_a_web_layer_is_refused_before_anything_starts(plugin, tmp_path):
    from qgis.core import QgsProject, QgsRasterLayer

    tiles = QgsRasterLayer("type=xyz&url=http://127.0.0.1:9/{z}/{x}/{y}.png&zmax=19&zmin=0", "tiles", "wms")
    assert tiles.isValid()
    QgsProject.instance().addMapLayer(tiles)
    dock = plugin.dock
    panel = dock.run_panel
    panel.layer_combo.setLayer(tiles)
    panel.output_widget.setFilePath(str(tmp_path / "out"))
    panel.run_button.click()

    assert panel.task is None and "export it to a GeoTIFF" in panel.stage_label.text()
    assert not (tmp_path / "out").exists()


def test_cancel_stops_the_run_keeps_the_worker_and_leaves_nothing(plugin, qgis_iface, long_scene, tiny_model_dir,
                                                                   tmp_path):
    from qgis.core import QgsProject

    out = tmp_path / "out"
    dock = plugin.dock
    panel = dock.run_panel
    start_and_wait_for_extraction(dock, qgis_iface, long_scene, tiny_model_dir, out)
    worker = plugin.engine._process
    layers_before = set(QgsProject.instance().mapLayers())

    panel.cancel_button.click()
    wait_until(lambda: panel.task is None)

    assert panel.stage_label.text() == "Cancelled."
    assert set(QgsProject.instance().mapLayers()) == layers_before and treeseg_groups() == []
    assert list(out.iterdir()) == []
    assert worker.poll() is None and plugin.engine._process is worker  # its model stays loaded
    assert panel.run_button.isEnabled() and panel.progress_bar.value() == 0


def test_a_killed_worker_is_a_message_and_qgis_lives_on(plugin, qgis_iface, long_scene, tiny_model_dir, tmp_path):
    from qgis.core import Qgis, QgsApplication

    dock = plugin.dock
    panel = dock.run_panel
    start_and_wait_for_extraction(dock, qgis_iface, long_scene, tiny_model_dir, tmp_path / "out")
    os.kill(plugin.engine._process.pid, signal.SIGKILL)
    wait_until(lambda: panel.task is None)

    critical = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Critical)
    assert any("stopped unexpectedly" in message and "SIGKILL" in message for message in critical)
    assert "stopped unexpectedly" in panel.stage_label.text()
    assert treeseg_groups() == [] and list((tmp_path / "out").iterdir()) == []
    QgsApplication.processEvents()
    assert panel.run_button.isEnabled()


def test_removing_the_input_layer_cancels_the_run(plugin, qgis_iface, long_scene, tiny_model_dir, tmp_path):
    from qgis.core import QgsProject

    dock = plugin.dock
    panel = dock.run_panel
    raster = start_and_wait_for_extraction(dock, qgis_iface, long_scene, tiny_model_dir, tmp_path / "out")
    QgsProject.instance().removeMapLayer(raster.id())
    wait_until(lambda: panel.task is None)

    assert panel.stage_label.text() == "Cancelled."
    assert treeseg_groups() == [] and list((tmp_path / "out").iterdir()) == []


def test_the_results_module_styles_a_run_record(qgis_new_project, scene_tif, tiny_model_dir, tmp_path):
    """qgis_results on its own (as Processing may use it): group name, order, hidden tree mask."""
    from treeseg_qgis.params import SegmentationParams
    from treeseg_qgis.qgis_side.engine_client import EngineClient
    from treeseg_qgis.qgis_side.results import add_result_layers

    path, _ = scene_tif
    engine = EngineClient(sys.executable)
    try:
        record = engine.segment(SegmentationParams(str(path), str(tmp_path), model=str(tiny_model_dir), device="cpu",
                                                   clusters=3))
    finally:
        engine.close()
    group = add_result_layers(record, "My orthophoto")

    assert group.name() == f"My orthophoto — {tiny_model_dir.name}, stride 16"
    nodes = group.findLayers()
    assert [node.name() for node in nodes][1:] == [
        f"Tree mask ({100 * record.trees.tree_cover:.1f} % cover)", "Clusters (K=3)"]
    assert [node.isVisible() for node in nodes] == [True, False, True]
    clusters = nodes[2].layer().renderer().classes()
    assert [item.value for item in clusters] == [0, 1, 2]
    tree_clusters = set(record.trees.clusters)
    assert {item.value for item in clusters if item.label.endswith("— tree")} == tree_clusters
    assert all(item.color.alpha() == 255 for item in clusters)
    assert all(item.color.green() > item.color.red() for item in clusters if item.value in tree_clusters)


def panel_with_catalogue_model(plugin, scene_tif, tmp_path: Path, model: str):
    """The panel set for a run of the scene with a catalogue model (none of them is in the test cache)."""
    path, _ = scene_tif
    dock = plugin.dock
    panel = dock.run_panel
    panel.layer_combo.setLayer(add_raster(path))
    set_up_run(panel, Path("unused"), tmp_path / "out")
    panel.model_override.clear()
    panel.model_combo.setCurrentIndex(panel.model_combo.findData(model))
    return dock


def test_the_panel_asks_before_a_run_expected_to_take_very_long(plugin, scene_tif, tmp_path, monkeypatch):
    from qgis.PyQt.QtWidgets import QMessageBox

    from treeseg_qgis import memory
    from treeseg_qgis.qgis_side.gui import run_estimates

    monkeypatch.setattr(run_estimates, "available_memory_bytes", lambda: 16 * 10**9)
    monkeypatch.setattr(memory, "LARGE_RUN_SECONDS", 0)
    questions: list[str] = []
    monkeypatch.setattr(QMessageBox, "question",
                        lambda parent, title, text, *buttons: questions.append(text) or QMessageBox.StandardButton.No)
    dock = panel_with_catalogue_model(plugin, scene_tif, tmp_path, "small")
    panel = dock.run_panel
    panel.run_button.click()

    assert len(questions) == 1, questions
    assert re.fullmatch(r"The raster is \d+ × \d+ px: 1 tile, expected to take about \d+ s\. Choose an extent or "
                        r"a mask, or a smaller model to make it shorter\.\n\nRun anyway\?", questions[0]), questions[0]
    assert panel.task is None and panel.stage_label.text().startswith("The raster is")
    assert not (tmp_path / "out").exists()


def test_the_panel_estimates_memory_and_asks_before_a_run_that_will_not_fit(plugin, scene_tif, tmp_path,
                                                                             monkeypatch):
    from qgis.PyQt.QtWidgets import QMessageBox

    from treeseg_qgis.qgis_side.gui import run_estimates

    monkeypatch.setattr(run_estimates, "available_memory_bytes", lambda: 16 * 10**9)
    questions: list[str] = []
    monkeypatch.setattr(QMessageBox, "question",
                        lambda parent, title, text, *buttons: questions.append(text) or QMessageBox.StandardButton.No)
    dock = panel_with_catalogue_model(plugin, scene_tif, tmp_path, "small")
    panel = dock.run_panel
    assert re.fullmatch(r"<b>small</b>, 29 M parameters: needs about \d\.\d GB of memory; 16 GB free on this "
                        r"computer\. The layer: 1 tile, about \d+ s on the CPU( with [a-z0-9', ]+ \(\d+ s\))?\.",
                        panel.memory_label.text())
    assert panel.estimates.memory_problem(panel.choice()) is None and panel.memory_label.styleSheet() == ""

    panel.model_combo.setCurrentIndex(panel.model_combo.findData("mega"))
    assert "#b00020" in panel.memory_label.styleSheet()
    panel.run_button.click()

    assert len(questions) == 1 and questions[0].startswith("mega needs about")
    assert questions[0].endswith("this machine has 16 GB free. Choose a smaller model or smaller tiles, or close "
                                 "other programs.\n\nRun anyway?")
    assert panel.task is None and panel.stage_label.text().startswith("mega needs about")
    assert not (tmp_path / "out").exists()


def test_a_run_from_the_panel_hands_the_token_to_the_engine(plugin, scene_tif, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_environment")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-cache"))
    dock = panel_with_catalogue_model(plugin, scene_tif, tmp_path, "small")
    panel = dock.run_panel
    panel.run_button.click()
    assert panel.task is not None and panel.task.hf_token == "hf_from_the_environment"
    wait_until(lambda: panel.task is None)
    assert "hf_from_the_environment" not in panel.stage_label.text()
