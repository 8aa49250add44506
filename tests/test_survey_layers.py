"""Survey layers in real QGIS: runs that applied one cluster model (Processing dialog, batch rows, the panel's
results) go into one survey group with a sub-group per raster, and their cluster layers share one legend and
one style; a run without a model keeps its own group and the file's labels."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
from osgeo import gdal

from treeseg_qgis.params import SegmentationParams
from treeseg_qgis.qgis_side.engine_client import EngineClient

from .conftest import disc_scene, write_geotiff
from .test_processing import provider  # noqa: F401 (the fixture)

gdal.UseExceptions()

APPLY = "treeseg:applyclustermodel"
OUTPUTS = ("OUTPUT_CLUSTERS", "OUTPUT_TREES", "OUTPUT_POLYGONS")


def survey_rasters(folder):
    """Two different scenes of one survey."""
    return (write_geotiff(folder / "east.tif", disc_scene(256, 320, [(80, 80), (170, 230)], 40, seed=6)[0]),
            write_geotiff(folder / "west.tif", disc_scene(256, 320, [(120, 150)], 50, seed=7)[0]))


def model_header(path) -> dict:
    with np.load(path) as data:
        return json.loads(bytes(data["header"]).decode())


def legend(layer) -> list[tuple[int, str, str]]:
    """Value, label and colour (with alpha) of each class of a paletted layer."""
    return [(item.value, item.label, item.color.name(item.color.NameFormat.HexArgb))
            for item in layer.renderer().classes()]


def cluster_layers(group) -> list:
    return [node.layer() for node in group.findLayers() if node.name().startswith("Clusters")]


def expected_labels(header: dict) -> list[str]:
    return [f"Cluster {cluster}{' — tree' if cluster in header['tree_clusters'] else ''} (ExG {exg:.2f})"
            for cluster, exg in enumerate(header["cluster_exg"])]


def test_processing_runs_with_one_cluster_model_share_one_survey_group_and_legend(
        provider, qgis_new_project, tiny_model_dir, tmp_path, layer_tree_view):  # noqa: F811
    """The dialog (runAndLoadResults) for one raster, a batch row (run, then the results handled) for the
    other: one 'Survey · survey.treeseg' group holding both runs; a plain Segment trees run stays apart."""
    import processing
    from processing.gui.Postprocessing import handleAlgorithmResults
    from processing.tools import dataobjects
    from qgis.core import QgsApplication, QgsProcessingFeedback, QgsProcessingOutputLayerDefinition, QgsProject

    east, west = survey_rasters(tmp_path)
    model = tmp_path / "survey.treeseg"
    processing.run("treeseg:fitclustermodel", {"INPUTS": [str(east), str(west)], "MODEL_ID": str(tiny_model_dir),
                                               "DEVICE": "cpu", "OUTPUT": str(model)})
    header = model_header(model)

    def apply(raster) -> dict:
        return {"INPUT": str(raster), "CLUSTER_MODEL": str(model), "MODEL_ID": str(tiny_model_dir), "DEVICE": "cpu",
                **{name: "TEMPORARY_OUTPUT" for name in OUTPUTS}}

    root = QgsProject.instance().layerTreeRoot()
    try:
        processing.runAndLoadResults(APPLY, apply(east))
        feedback = QgsProcessingFeedback()
        algorithm = QgsApplication.processingRegistry().createAlgorithmById(APPLY)
        context = dataobjects.createContext(feedback)
        row = {**apply(west), **{name: QgsProcessingOutputLayerDefinition("TEMPORARY_OUTPUT", QgsProject.instance())
                                 for name in OUTPUTS}}  # as the batch dialog's "load layers" box sets them
        _, ok = algorithm.run(algorithm.preprocessParameters(row), context, feedback)
        assert ok
        handleAlgorithmResults(algorithm, context, feedback)
        processing.runAndLoadResults("treeseg:segmenttrees", {
            "INPUT": str(east), "MODEL_ID": str(tiny_model_dir), "CLUSTERS": 2, "DEVICE": "cpu",
            **{name: "TEMPORARY_OUTPUT" for name in OUTPUTS}})

        plain, survey = root.children()
        assert survey.name() == "Survey · survey.treeseg"
        assert [run.name() for run in survey.children()] == [
            f"{name} — {tiny_model_dir.name}, stride 16" for name in ("west", "east")]
        assert all(len(run.findLayers()) == 3 for run in survey.children())
        first, second = (cluster_layers(run)[0] for run in survey.children())
        assert legend(first) == legend(second)
        assert [label for _, label, _ in legend(first)] == expected_labels(header)
        trees = [node.layer() for node in survey.findLayers() if node.name().startswith("Tree mask")]
        assert len(trees) == 2 and legend(trees[0]) == legend(trees[1])

        assert plain.name() == f"east — {tiny_model_dir.name}, stride 16"
        assert all(re.fullmatch(r"Cluster \d( — tree)?", label) for _, label, _ in legend(cluster_layers(plain)[0]))
    finally:
        QgsProject.instance().removeAllMapLayers()
        root.removeAllChildren()


def test_panel_results_of_a_survey_share_a_group_and_restyle_together(qgis_new_project, tiny_model_dir, tmp_path):
    """The panel's results (add_result_layers, as its task's finished() calls it): one survey group; a restyle
    of one cluster layer reaches the others and the survey's later rasters."""
    from qgis.core import QgsPalettedRasterRenderer, QgsProject
    from qgis.PyQt.QtGui import QColor

    from treeseg_qgis.qgis_side.results import SURVEY_STYLE, add_result_layers

    east, west = survey_rasters(tmp_path)
    model = tmp_path / "site.treeseg"
    engine = EngineClient(sys.executable)
    try:
        engine.fit([str(east), str(west)], str(model),
                   SegmentationParams(str(east), str(tmp_path), model=str(tiny_model_dir), device="cpu"))
        records = [engine.segment(SegmentationParams(str(raster), str(tmp_path / raster.stem), device="cpu",
                                                     model=str(tiny_model_dir), cluster_model=str(model)))
                   for raster in (east, west)]
    finally:
        engine.close()
    root = QgsProject.instance().layerTreeRoot()
    try:
        runs = [add_result_layers(record, name) for record, name in zip(records, ("east", "west"))]
        (survey,) = root.children()
        assert survey.name() == "Survey · site.treeseg" and survey.children() == runs[::-1]
        first, second = (cluster_layers(run)[0] for run in runs)
        assert legend(first) == legend(second)
        assert [label for _, label, _ in legend(first)] == expected_labels(model_header(model))

        classes = first.renderer().classes()
        classes[0].color = QColor(255, 0, 255)
        first.setRenderer(QgsPalettedRasterRenderer(first.dataProvider(), 1, classes))
        assert legend(second) == legend(first) and legend(second)[0][2] == "#ffff00ff"
        later = add_result_layers(records[1], "west again")
        assert root.children() == [survey] and survey.children()[0] is later
        assert legend(cluster_layers(later)[0]) == legend(first)
        assert "#ff00ff" in survey.customProperty(SURVEY_STYLE)

        project_file = tmp_path / "survey.qgz"
        assert QgsProject.instance().write(str(project_file))
        QgsProject.instance().clear()
        assert QgsProject.instance().read(str(project_file))
        root = QgsProject.instance().layerTreeRoot()
        (survey,) = root.children()
        runs = survey.children()[1:]
        first, second = (cluster_layers(run)[0] for run in runs)
        add_result_layers(records[0], "east again")  # a later raster of the survey in the reopened project
        first.setOpacity(0.8)
        assert second.opacity() == 0.8 and cluster_layers(survey.children()[0])[0].opacity() == 0.8

        root.addGroup("elsewhere").insertChildNode(0, runs[1].clone())
        survey.removeChildNode(runs[1])
        moved = cluster_layers(root.findGroup("elsewhere"))[0]
        moved.setOpacity(0.9)
        assert first.opacity() != 0.9
    finally:
        QgsProject.instance().removeAllMapLayers()
        root.removeAllChildren()


def taught_survey(folder, tiny_model_dir):
    """Two rasters of a survey, its cluster model and a classifier taught on its features (on the command line:
    torch stays out of the QGIS process)."""
    import os
    import subprocess

    from .conftest import REPO

    east, west = survey_rasters(folder)
    model, saved, clicks = folder / "survey.treeseg", folder / "crowns.treeseg", folder / "clicks.csv"
    clicks.write_text("col,row,class\n80,80,crown\n230,170,crown\n10,240,ground\n300,10,ground\n")
    common = ["--model", str(tiny_model_dir), "--device", "cpu"]
    for command in (["fit", str(east), str(west), "--out", str(model)],
                    ["teach", str(east), "--examples", str(clicks), "--out", str(folder / "taught"),
                     "--cluster-model", str(model), "--save-classifier", str(saved)]):
        done = subprocess.run([sys.executable, "-m", "treeseg_qgis", *command, *common], capture_output=True,
                              text=True, cwd=REPO, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr
    return east, west, model, saved


def test_a_survey_taught_in_the_panel_puts_its_class_layers_in_the_survey_group(
        qgis_new_project, tiny_model_dir, tmp_path):
    """The panel's results (add_result_layers, add_teach_layers): a run and the classes taught on the survey's
    features go into the survey group; the teach record names the cluster model."""
    from qgis.core import QgsProject

    from treeseg_qgis.qgis_side.results import add_result_layers, add_teach_layers

    east, _, model, saved = taught_survey(tmp_path, tiny_model_dir)
    params = SegmentationParams(str(east), str(tmp_path / "east"), device="cpu", model=str(tiny_model_dir),
                                cluster_model=str(model))
    engine = EngineClient(sys.executable)
    try:
        run = engine.segment(params)
        classes = engine.teach(params, [], None, classifier=str(saved))
    finally:
        engine.close()
    assert classes.cluster_model is not None and classes.cluster_model.path == str(model)
    root = QgsProject.instance().layerTreeRoot()
    try:
        run_group = add_result_layers(run, "east")
        layers = add_teach_layers(classes, "east")
        (survey,) = root.children()
        assert survey.name() == "Survey · survey.treeseg"
        assert root.findLayer(layers[0].id()).parent().parent() == survey and run_group.parent() == survey
        assert [label for _, label, _ in legend(layers[0])] == ["unsure", "crown", "ground"]
    finally:
        QgsProject.instance().removeAllMapLayers()
        root.removeAllChildren()


def test_apply_a_taught_classifier_in_processing_loads_named_styled_layers_into_the_survey_group(
        provider, qgis_new_project, tiny_model_dir, tmp_path, layer_tree_view):  # noqa: F811
    """Apply a taught classifier on two rasters of a survey (the dialog, runAndLoadResults): one survey group
    with a group per raster holding the class polygons, the classes (one legend) and the probabilities (hidden)."""
    import processing
    from qgis.core import QgsProject

    east, west, model, saved = taught_survey(tmp_path, tiny_model_dir)
    root = QgsProject.instance().layerTreeRoot()
    try:
        for raster in (east, west):
            processing.runAndLoadResults("treeseg:applyclassifier", {
                "INPUT": str(raster), "CLUSTER_MODEL": str(model), "CLASSIFIER": str(saved),
                "MODEL_ID": str(tiny_model_dir), "DEVICE": "cpu", "OUTPUT_CLASSES": "TEMPORARY_OUTPUT",
                "OUTPUT_CLASS_PROBABILITIES": "TEMPORARY_OUTPUT", "OUTPUT_CLASS_POLYGONS": "TEMPORARY_OUTPUT"})
        (survey,) = root.children()
        assert survey.name() == "Survey · survey.treeseg" and len(survey.children()) == 2
        for applied in survey.children():
            assert [node.name() for node in applied.children()] == [
                f"Class polygons ({applied.children()[0].layer().featureCount()})",
                "Taught classes (crown, ground)", "Class probabilities (0–1, a band per class)"]
            assert [node.isVisible() for node in applied.children()] == [True, True, False]
        class_layers = [node.layer() for node in survey.findLayers() if node.name().startswith("Taught classes")]
        assert legend(class_layers[0]) == legend(class_layers[1])
        assert [label for _, label, _ in legend(class_layers[0])] == ["unsure", "crown", "ground"]
    finally:
        QgsProject.instance().removeAllMapLayers()
        root.removeAllChildren()
