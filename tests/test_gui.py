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


def wait_until(condition: Callable[[], bool], timeout: float = RUN_TIMEOUT) -> None:
    """Process Qt events until `condition()` holds; fail after `timeout` seconds."""
    from qgis.core import QgsApplication

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up after {timeout:.0f} s"
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


def set_up_run(dock, model_dir: Path, out: Path, stride: int = 16, clusters: int | None = 2) -> None:
    """Fill the panel as a user would for a quick run of the tiny model."""
    dock.model_override.setText(str(model_dir))
    dock.stride_combo.setCurrentIndex(dock.stride_combo.findData(stride))
    dock.auto_clusters.setChecked(clusters is None)
    if clusters is not None:
        dock.clusters_spin.setValue(clusters)
    dock.device_combo.setCurrentText("cpu")
    dock.output_widget.setFilePath(str(out))


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
    raster = add_raster(long_scene, "long")
    qgis_iface.setActiveLayer(raster)
    dock.layer_combo.setLayer(raster)
    set_up_run(dock, model_dir, out, stride=4)
    dock.show()
    dock.run_button.click()
    assert dock.task is not None and dock.cancel_button.isEnabled()
    wait_until(lambda: dock.stage_label.text().startswith("Extracting") or dock.task is None)
    assert dock.task is not None, f"the run ended before it could be interrupted: {dock.stage_label.text()}"
    return raster


def test_the_panel_defaults_to_the_active_raster_and_builds_params(qgis_iface, qgis_new_project, clean_settings,
                                                                    scene_tif, tmp_path):
    from treeseg_qgis.engine.core.params import SegmentationParams
    from treeseg_qgis.qgis_side.engine_client import EngineClient
    from treeseg_qgis.qgis_side.gui.dock import TreesegDock

    path, _ = scene_tif
    add_raster(path, "other")
    raster = add_raster(path)
    qgis_iface.setActiveLayer(raster)
    dock = TreesegDock(qgis_iface, EngineClient(sys.executable))
    assert dock.layer_combo.currentLayer() is raster
    assert dock.model_combo.currentData() == "base" and dock.auto_clusters.isChecked()
    assert not dock.allow_untrained.isChecked() and "UNTRAINED" in dock.allow_untrained.toolTip()
    assert dock.output_widget.filePath().endswith("treeseg")
    out = tmp_path / "out"
    set_up_run(dock, Path("unused"), out, stride=8, clusters=4)
    dock.model_override.clear()
    dock.model_combo.setCurrentIndex(dock.model_combo.findData("large-sat"))
    dock.allow_untrained.setChecked(True)

    params = dock.build_params()

    assert params == {
        "input_path": str(path), "output_dir": str(out), "output_stem": "scene", "model": "large-sat",
        "stride": 8, "clusters": 4, "device": "cpu", "allow_untrained": True, "crowns": False,
        "crown_min_area_m2": 2.0, "feature_preview": False, "canopy_height": False, "min_tree_height_m": None,
        "height_model": SegmentationParams.height_model, "cluster_model": None,
    }
    SegmentationParams.from_dict(params).validate()
    dock.cluster_model_widget.setFilePath(str(tmp_path / "survey.treeseg"))
    assert dock.build_params()["cluster_model"] == str(tmp_path / "survey.treeseg")
    dock.cluster_model_widget.setFilePath("")
    out.mkdir()
    (out / "scene_UNTRAINED_trees.tif").write_bytes(b"")
    dock.auto_clusters.setChecked(True)
    assert dock.build_params()["output_stem"] == "scene_2" and dock.build_params()["clusters"] is None
    dock.deleteLater()


def test_the_model_choices_match_the_engine():
    from treeseg_qgis.engine.core.devices import DEVICE_CHOICES
    from treeseg_qgis.engine.core.features import STRIDES
    from treeseg_qgis.engine.core.models import CATALOGUE, DEFAULT_MODEL
    from treeseg_qgis.qgis_side.gui import dock

    assert list(dock.BACKBONES) == list(CATALOGUE)
    assert dock.DEFAULT_MODEL == DEFAULT_MODEL and set(dock.DEVICES) == set(DEVICE_CHOICES)
    assert set(dock.STRIDES) <= set(STRIDES)
    assert dock.parameters_label(86) == "86 M parameters" and dock.parameters_label(6716) == "6.7 B parameters"


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
    dock.layer_combo.setLayer(raster)
    out = tmp_path / "out"
    set_up_run(dock, tiny_model_dir, out)
    dock.allow_untrained.setChecked(True)
    plugin.action.trigger()
    assert dock.isVisible()

    dock.run_button.click()
    assert not dock.run_button.isEnabled()
    assert dock.stage_label.text() == "Waiting for the engine to start…"
    wait_until(lambda: dock.task is None)

    assert dock.stage_label.text().startswith("Done"), dock.stage_label.text()
    assert dock.progress_bar.value() == 100
    assert dock.engine_label.text().startswith("Engine: CPU (")
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
    dock.layer_combo.setLayer(raster)
    set_up_run(dock, Path("unused"), tmp_path / "out")
    dock.model_override.clear()
    dock.model_combo.setCurrentIndex(dock.model_combo.findData("small"))
    dock.allow_untrained.setChecked(True)
    dock.show()
    dock.run_button.click()
    wait_until(lambda: dock.task is None)

    (group,) = treeseg_groups()
    assert group.name() == "scene — small, stride 16 — UNTRAINED"
    warnings = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
    assert any("UNTRAINED weights, pipeline check only" in message for message in warnings)
    assert dock.stage_label.text().startswith("Done: UNTRAINED weights")
    assert (tmp_path / "out" / "scene_UNTRAINED_clusters.tif").is_file()


def test_a_canvas_extent_runs_on_that_part_of_the_raster(plugin, qgis_iface, qgis_canvas, scene_tif,
                                                          tiny_model_dir, tmp_path):
    from osgeo import gdal
    from qgis.core import QgsRectangle

    path, _ = scene_tif
    raster = add_raster(path)
    dock = plugin.dock
    dock.layer_combo.setLayer(raster)
    set_up_run(dock, tiny_model_dir, tmp_path / "out")
    dock.extent_combo.setCurrentIndex(dock.extent_combo.findData("canvas"))
    qgis_canvas.setDestinationCrs(raster.crs())
    full = raster.extent()
    qgis_canvas.setExtent(QgsRectangle(full.xMinimum(), full.yMinimum(), full.center().x(), full.center().y()))
    requested = qgis_canvas.extent()
    dock.show()
    dock.run_button.click()
    scratch = dock.task.scratch_folder
    assert any(scratch.glob("*.vrt"))
    wait_until(lambda: dock.task is None)

    assert dock.stage_label.text().startswith("Done"), dock.stage_label.text()
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
    dock.layer_combo.setLayer(raster)
    set_up_run(dock, tiny_model_dir, tmp_path / "out")
    dock.extent_combo.setCurrentIndex(dock.extent_combo.findData("selection"))
    dock.mask_combo.setLayer(stands)
    assert not dock.mask_combo.isHidden()
    dock.run_button.click()
    assert dock.task is None and "Select one or more polygons" in dock.stage_label.text()

    stands.selectByIds([next(stands.getFeatures()).id()])
    dock.show()
    dock.run_button.click()
    wait_until(lambda: dock.task is None)

    assert dock.stage_label.text().startswith("Done"), dock.stage_label.text()
    clusters = gdal.Open(str(tmp_path / "out" / "scene_clusters.tif")).ReadAsArray()
    assert clusters.shape == (160, 200)
    assert clusters[0, 0] != 255 and clusters[-1, -1] == 255


def test_a_web_layer_is_refused_before_anything_starts(plugin, tmp_path):
    from qgis.core import QgsProject, QgsRasterLayer

    tiles = QgsRasterLayer("type=xyz&url=http://127.0.0.1:9/{z}/{x}/{y}.png&zmax=19&zmin=0", "tiles", "wms")
    assert tiles.isValid()
    QgsProject.instance().addMapLayer(tiles)
    dock = plugin.dock
    dock.layer_combo.setLayer(tiles)
    dock.output_widget.setFilePath(str(tmp_path / "out"))
    dock.run_button.click()

    assert dock.task is None and "export it to a GeoTIFF" in dock.stage_label.text()
    assert not (tmp_path / "out").exists()


def test_cancel_stops_the_run_keeps_the_worker_and_leaves_nothing(plugin, qgis_iface, long_scene, tiny_model_dir,
                                                                   tmp_path):
    from qgis.core import QgsProject

    out = tmp_path / "out"
    dock = plugin.dock
    start_and_wait_for_extraction(dock, qgis_iface, long_scene, tiny_model_dir, out)
    worker = plugin.engine._process
    layers_before = set(QgsProject.instance().mapLayers())

    dock.cancel_button.click()
    wait_until(lambda: dock.task is None)

    assert dock.stage_label.text() == "Cancelled."
    assert set(QgsProject.instance().mapLayers()) == layers_before and treeseg_groups() == []
    assert list(out.iterdir()) == []
    assert worker.poll() is None and plugin.engine._process is worker  # its model stays loaded
    assert dock.run_button.isEnabled() and dock.progress_bar.value() == 0


def test_a_killed_worker_is_a_message_and_qgis_lives_on(plugin, qgis_iface, long_scene, tiny_model_dir, tmp_path):
    from qgis.core import Qgis, QgsApplication

    dock = plugin.dock
    start_and_wait_for_extraction(dock, qgis_iface, long_scene, tiny_model_dir, tmp_path / "out")
    os.kill(plugin.engine._process.pid, signal.SIGKILL)
    wait_until(lambda: dock.task is None)

    critical = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Critical)
    assert any("stopped unexpectedly" in message and "SIGKILL" in message for message in critical)
    assert "stopped unexpectedly" in dock.stage_label.text()
    assert treeseg_groups() == [] and list((tmp_path / "out").iterdir()) == []
    QgsApplication.processEvents()
    assert dock.run_button.isEnabled()


def test_removing_the_input_layer_cancels_the_run(plugin, qgis_iface, long_scene, tiny_model_dir, tmp_path):
    from qgis.core import QgsProject

    dock = plugin.dock
    raster = start_and_wait_for_extraction(dock, qgis_iface, long_scene, tiny_model_dir, tmp_path / "out")
    QgsProject.instance().removeMapLayer(raster.id())
    wait_until(lambda: dock.task is None)

    assert dock.stage_label.text() == "Cancelled."
    assert treeseg_groups() == [] and list((tmp_path / "out").iterdir()) == []


def test_the_results_module_styles_a_run_record(qgis_new_project, scene_tif, tiny_model_dir, tmp_path):
    """qgis_results on its own (as Processing may use it): group name, order, hidden tree mask."""
    from treeseg_qgis.qgis_side.engine_client import EngineClient
    from treeseg_qgis.qgis_side.results import add_result_layers

    path, _ = scene_tif
    engine = EngineClient(sys.executable)
    try:
        record = engine.segment({"input_path": str(path), "output_dir": str(tmp_path), "model": str(tiny_model_dir),
                                 "device": "cpu", "clusters": 3, "stride": 16})
    finally:
        engine.close()
    group = add_result_layers(record, "My orthophoto")

    assert group.name() == f"My orthophoto — {tiny_model_dir.name}, stride 16"
    nodes = group.findLayers()
    assert [node.name() for node in nodes][1:] == [
        f"Tree mask ({100 * record['trees']['tree_cover']:.1f} % cover)", "Clusters (K=3)"]
    assert [node.isVisible() for node in nodes] == [True, False, True]
    clusters = nodes[2].layer().renderer().classes()
    assert [item.value for item in clusters] == [0, 1, 2]
    tree_clusters = set(record["trees"]["clusters"])
    assert {item.value for item in clusters if item.label.endswith("— tree")} == tree_clusters
    assert all(item.color.alpha() == 255 for item in clusters)
    assert all(item.color.green() > item.color.red() for item in clusters if item.value in tree_clusters)


def panel_with_catalogue_model(plugin, scene_tif, tmp_path: Path, model: str):
    """The panel set for a run of the scene with a catalogue model (none of them is in the test cache)."""
    path, _ = scene_tif
    dock = plugin.dock
    dock.layer_combo.setLayer(add_raster(path))
    set_up_run(dock, Path("unused"), tmp_path / "out")
    dock.model_override.clear()
    dock.model_combo.setCurrentIndex(dock.model_combo.findData(model))
    return dock


def test_the_panel_asks_before_a_run_expected_to_take_very_long(plugin, scene_tif, tmp_path, monkeypatch):
    from qgis.PyQt.QtWidgets import QMessageBox

    from treeseg_qgis import memory
    from treeseg_qgis.qgis_side.gui import dock as dock_module

    monkeypatch.setattr(dock_module, "available_memory_bytes", lambda: 16 * 10**9)
    monkeypatch.setattr(memory, "LARGE_RUN_SECONDS", 0)
    questions: list[str] = []
    monkeypatch.setattr(QMessageBox, "question",
                        lambda parent, title, text, *buttons: questions.append(text) or QMessageBox.StandardButton.No)
    dock = panel_with_catalogue_model(plugin, scene_tif, tmp_path, "small")
    dock.run_button.click()

    assert len(questions) == 1, questions
    assert re.fullmatch(r"The raster is \d+ × \d+ px: 1 tiles, expected to take about \d+ s\. Choose an extent or "
                        r"a mask, or a smaller model to make it shorter\.\n\nRun anyway\?", questions[0]), questions[0]
    assert dock.task is None and dock.stage_label.text().startswith("The raster is")
    assert not (tmp_path / "out").exists()


def test_the_panel_estimates_memory_and_asks_before_a_run_that_will_not_fit(plugin, scene_tif, tmp_path,
                                                                             monkeypatch):
    from qgis.PyQt.QtWidgets import QMessageBox

    from treeseg_qgis.qgis_side.gui import dock as dock_module

    monkeypatch.setattr(dock_module, "available_memory_bytes", lambda: 16 * 10**9)
    questions: list[str] = []
    monkeypatch.setattr(QMessageBox, "question",
                        lambda parent, title, text, *buttons: questions.append(text) or QMessageBox.StandardButton.No)
    dock = panel_with_catalogue_model(plugin, scene_tif, tmp_path, "small")
    assert re.fullmatch(r"<b>small</b>, 29 M parameters: needs about \d\.\d GB of memory; 16 GB free on this "
                        r"computer\. The layer: 1 tiles, about \d+ s on the CPU\.", dock.memory_label.text())
    assert dock.memory_problem() is None and dock.memory_label.styleSheet() == ""

    dock.model_combo.setCurrentIndex(dock.model_combo.findData("mega"))
    assert "#b00020" in dock.memory_label.styleSheet()
    dock.run_button.click()

    assert len(questions) == 1 and questions[0].startswith("mega needs about")
    assert questions[0].endswith("this machine has 16 GB free. Choose a smaller model or smaller tiles, or close "
                                 "other programs.\n\nRun anyway?")
    assert dock.task is None and dock.stage_label.text().startswith("mega needs about")
    assert not (tmp_path / "out").exists()


def test_a_run_from_the_panel_hands_the_token_to_the_engine(plugin, scene_tif, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_environment")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-cache"))
    dock = panel_with_catalogue_model(plugin, scene_tif, tmp_path, "small")
    dock.run_button.click()
    assert dock.task is not None and dock.task.hf_token == "hf_from_the_environment"
    wait_until(lambda: dock.task is None)
    assert "hf_from_the_environment" not in dock.stage_label.text()
