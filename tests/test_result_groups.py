"""Where results land and what a re-run does, in real QGIS with records of the real engine worker: one rule for
the panel, Processing and teaching — a result group goes at the top of the layer tree (a lone output beside its
input), never inside another result, shown; the newest result of an input shows and the older ones switch off;
a repeat with the same settings replaces the older group, other settings are named in the group."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

from treeseg_qgis.params import SegmentationParams
from treeseg_qgis.qgis_side.engine_client import EngineClient

from .conftest import disc_scene, write_geotiff
from .test_gui import add_raster, clean_settings, plugin, set_up_run, wait_until  # noqa: F401 - fixtures
from .test_processing import error_recorder, provider, tiny_run  # noqa: F401 - provider: registers treeseg

EXAMPLES = [(80.0, 70.0, True), (300.0, 90.0, True), (20.0, 20.0, False), (150.0, 10.0, False)]


@pytest.fixture
def engine():
    client = EngineClient(sys.executable)
    yield client
    client.close()


@pytest.fixture
def project(qgis_new_project):
    """The project, emptied afterwards; new layers go to the top of its tree again (a test may point the
    insertion point at a group it then removes)."""
    from qgis.core import QgsLayerTreeRegistryBridge, QgsProject

    yield QgsProject.instance()
    root = QgsProject.instance().layerTreeRoot()
    QgsProject.instance().layerTreeRegistryBridge().setLayerInsertionPoint(
        QgsLayerTreeRegistryBridge.InsertionPoint(root, 0))
    QgsProject.instance().removeAllMapLayers()
    root.removeAllChildren()


def result_groups(root) -> list:
    from treeseg_qgis.qgis_side.results import RESULT_INPUT

    return [group for group in root.findGroups(True) if group.customProperty(RESULT_INPUT)]


def test_reruns_replace_the_same_settings_name_other_settings_and_show_only_the_newest(
        project, engine, tiny_model_dir, scene_tif, tmp_path):
    from qgis.core import QgsLayerTreeModel
    from qgis.PyQt.QtCore import Qt

    from treeseg_qgis.qgis_side.results import add_result_layers, add_teach_layers

    path, _ = scene_tif
    params = SegmentationParams(str(path), str(tmp_path / "first"), model=str(tiny_model_dir), device="cpu",
                                clusters=2)
    first = engine.segment(params)
    repeat = engine.segment(replace(params, output_dir=str(tmp_path / "repeat")))
    other = engine.segment(replace(params, output_dir=str(tmp_path / "other"), clusters=3))
    root = project.layerTreeRoot()
    view_model = QgsLayerTreeModel(root)  # as the Layers panel: built before the results arrive
    base = f"scene — {tiny_model_dir.name}, stride 16"

    add_result_layers(first, "scene", project)
    add_result_layers(repeat, "scene", project)

    (group,) = result_groups(root)
    assert group.name() == base and root.children() == [group]
    assert len(project.mapLayers()) == 3
    assert {layer.source().split("|")[0] for layer in project.mapLayers().values()} == {
        repeat.outputs[kind] for kind in ("clusters", "trees", "polygons")}

    newest = add_result_layers(other, "scene", project)

    assert [child.name() for child in root.children()] == [f"{base}, K=3", base]
    assert root.children()[0] is newest
    assert newest.itemVisibilityChecked() and not root.children()[1].itemVisibilityChecked()

    taught = [engine.teach(replace(params, output_stem=f"teach{index}"), EXAMPLES, None) for index in range(2)]
    add_teach_layers(taught[0], "scene", project)
    add_teach_layers(taught[1], "scene", project)

    teach_groups = [child for child in root.children() if child.name() == "scene — taught by example"]
    assert len(teach_groups) == 1 and root.children()[0] is teach_groups[0]
    assert [node.layer().source() for node in teach_groups[0].findLayers()] == [
        taught[1].outputs[kind] for kind in ("taught_trees", "similarity")]
    assert [child.itemVisibilityChecked() for child in root.children()] == [True, False, False]
    assert len(project.mapLayers()) == 3 + 3 + 2
    similarity = teach_groups[0].findLayers()[1]
    for model in (view_model, QgsLayerTreeModel(root)):  # a view open all along, and one opened now
        legend = model.layerLegendNodes(similarity)
        assert legend[0].data(Qt.ItemDataRole.DisplayRole) == "Score (1: like the examples)"  # not 'Band 1 (Gray)'


def test_a_rerun_without_the_extra_outputs_is_named_with_the_words_of_their_options(
        project, engine, tiny_model_dir, scene_tif, tmp_path):
    """The group name says 'no feature image' and 'no tree crowns', as the panel's options and Processing's
    outputs call them (not the fields' names, 'feature preview' and 'crowns')."""
    from treeseg_qgis.qgis_side.processing.segment_trees import SegmentTreesAlgorithm
    from treeseg_qgis.qgis_side.results import add_result_layers

    path, _ = scene_tif
    params = SegmentationParams(str(path), str(tmp_path / "extras"), model=str(tiny_model_dir), device="cpu",
                                clusters=2, crowns=True, feature_preview=True)
    add_result_layers(engine.segment(params), "scene", project)
    plain = add_result_layers(engine.segment(replace(params, output_dir=str(tmp_path / "plain"), crowns=False,
                                                     feature_preview=False)), "scene", project)

    options = {destination.kind: destination.description.lower()
               for destination in SegmentTreesAlgorithm.DESTINATIONS}
    assert plain.name() == (f"scene — {tiny_model_dir.name}, stride 16, no {options['crowns']}, "
                            f"no {options['features']}")


def test_processing_results_go_to_the_top_never_into_the_selected_result_group(
        provider, project, tiny_model_dir, scene_tif, tmp_path, request):  # noqa: F811
    """A run and a crown split while a result group nested in a user's group is the insertion point (as the
    desktop sets it for the group selected in Layers): the run's group goes to the top, shown; a repeat of it
    replaces it; the crowns go beside their tree mask, in that run's group."""
    import processing
    from qgis.core import Qgis, QgsLayerTreeRegistryBridge

    if Qgis.QGIS_VERSION_INT >= 34400:
        # 3.44's Processing adds the results through the main window's layer tree view; on 3.22 a bare view
        # beside this test's project crashes pytest-qgis's window, and 3.22's Processing does not use one.
        request.getfixturevalue("layer_tree_view")

    from treeseg_qgis.qgis_side.results import add_result_layers

    path, _ = scene_tif
    image, _ = disc_scene(192, 256, [(90, 120)], radius=40, seed=1)
    second = write_geotiff(tmp_path / "second.tif", image)
    root = project.layerTreeRoot()
    engine = EngineClient(sys.executable)
    try:
        record = engine.segment(SegmentationParams(str(path), str(tmp_path / "panel"), model=str(tiny_model_dir),
                                                   device="cpu", clusters=2))
    finally:
        engine.close()
    site = root.addGroup("Site")
    panel_group = add_result_layers(record, "scene", project)
    site.insertChildNode(0, panel_group.clone())
    root.removeChildNode(panel_group)
    site.setItemVisibilityChecked(False)
    (nested,) = site.children()
    bridge = project.layerTreeRegistryBridge()
    bridge.setLayerInsertionPoint(QgsLayerTreeRegistryBridge.InsertionPoint(nested, 0))

    feedback = error_recorder()
    for out in ("row1", "row2"):  # the second row repeats the first
        processing.runAndLoadResults("treeseg:segmenttrees", tiny_run(tiny_model_dir, second, tmp_path / out),
                                     feedback=feedback)

    runs = [group for group in result_groups(root) if group.name().startswith("second")]
    assert len(runs) == 1 and root.children()[0] is runs[0] and runs[0].itemVisibilityChecked()
    assert len(runs[0].findLayers()) == 3 and len(nested.findLayers()) == 3
    assert all(Path(node.layer().source().split("|")[0]).parent == tmp_path / "row2" for node in runs[0].findLayers())

    bridge.setLayerInsertionPoint(QgsLayerTreeRegistryBridge.InsertionPoint(runs[0], 0))
    trees = next(node for node in nested.findLayers() if node.name().startswith("Tree mask"))
    processing.runAndLoadResults("treeseg:treecrowns", {"INPUT": trees.layerId(), "OUTPUT": "TEMPORARY_OUTPUT"},
                                 feedback=feedback)

    names = [child.name() for child in nested.children()]
    crowns = next(index for index, name in enumerate(names) if name.startswith("Tree crowns"))
    assert names[crowns + 1] == trees.name() and names[crowns].endswith(f" — {Path(record.outputs['trees']).stem}")
    assert len(runs[0].findLayers()) == 3
    assert site.itemVisibilityChecked() and nested.itemVisibilityChecked()
    assert feedback.errors == []


def test_the_panel_does_not_follow_a_result_raster_and_offers_the_orthophoto(
        plugin, qgis_iface, scene_tif, tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    from qgis.core import QgsProject
    from qgis.PyQt.QtWidgets import QMessageBox

    path, _ = scene_tif
    raster = add_raster(path)
    qgis_iface.setActiveLayer(raster)
    panel = plugin.dock.run_panel
    set_up_run(panel, tiny_model_dir, tmp_path / "out")
    plugin.action.trigger()
    panel.run_button.click()
    wait_until(lambda: panel.task is None)
    clusters = next(layer for layer in QgsProject.instance().mapLayers().values()
                    if layer.name().startswith("Clusters"))

    qgis_iface.setActiveLayer(clusters)
    assert panel.layer_combo.currentLayer() is raster

    questions: list[str] = []
    monkeypatch.setattr(QMessageBox, "question", lambda parent, title, text, *buttons: questions.append(text)
                        or QMessageBox.StandardButton.Yes)
    panel.layer_combo.setLayer(clusters)
    panel.run_button.click()

    assert questions == [f"'{clusters.name()}' is a TreeSeg result of 'scene', not an orthophoto. Run on 'scene' "
                         "instead?"]
    assert panel.layer_combo.currentLayer() is raster and panel.task is not None
    wait_until(lambda: panel.task is None)
    assert panel.stage_label.text().startswith("Done"), panel.stage_label.text()
