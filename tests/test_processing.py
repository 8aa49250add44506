"""The Processing algorithm treeseg:segmenttrees in real QGIS, driving the real engine worker process.

The runs of one test share a worker (the repository's .venv Python; each test starts its own) with the
tiny DINOv3 of conftest, so the runs are kept few and small.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal, osr

from treeseg_qgis.qgis_side.engine_client import ENGINE_PYTHON_ENV, close_shared_engines

from .conftest import REPO, SAMPLE_GEOTRANSFORM, UTM17N, disc_scene, wgs84_memory_layer, write_geotiff

gdal.UseExceptions()

ALGORITHM = "treeseg:segmenttrees"
MODEL_FILE = Path(__file__).parent / "data" / "segment_and_extract_trees.model3"
QGIS_PROCESS = Path("/usr/bin/qgis_process.bin")
PIXEL = SAMPLE_GEOTRANSFORM[1]


@pytest.fixture
def provider(qgis_processing, monkeypatch):
    """The treeseg provider registered as the plugin's initProcessing does, with this .venv as the engine; the
    shared worker stops afterwards, so each test's worker sees that test's environment."""
    from qgis.core import QgsApplication

    from treeseg_qgis.qgis_side.processing.provider import TreesegProvider

    monkeypatch.setenv(ENGINE_PYTHON_ENV, sys.executable)
    registry = QgsApplication.processingRegistry()
    if registry.providerById("treeseg") is not None:  # left by a test that loaded the whole plugin
        yield registry.providerById("treeseg")
        close_shared_engines()
        return
    treeseg = TreesegProvider()
    assert registry.addProvider(treeseg)
    yield treeseg
    registry.removeProvider(treeseg)
    close_shared_engines()


def run(parameters: dict, feedback=None) -> dict:
    import processing

    return processing.run(ALGORITHM, parameters, feedback=feedback)


def tiny_run(tiny_model_dir: Path, input_path, out: Path, **parameters) -> dict:
    """Parameters for a small, fast run writing into `out`."""
    values = {
        "INPUT": str(input_path), "MODEL_ID": str(tiny_model_dir), "CLUSTERS": 2, "DEVICE": "cpu",
        "OUTPUT_CLUSTERS": str(out / "clusters.tif"), "OUTPUT_TREES": str(out / "trees.tif"),
        "OUTPUT_POLYGONS": str(out / "polygons.gpkg"),
    }
    values.update(parameters)
    return values


def raster(path) -> tuple[np.ndarray, tuple, str]:
    dataset = gdal.Open(str(path))
    return dataset.ReadAsArray(), dataset.GetGeoTransform(), dataset.GetProjection()


def polygons(path) -> tuple[list[int], str]:
    """The is_tree value of every polygon, and the layer's CRS as WKT."""
    dataset = gdal.OpenEx(str(path), gdal.OF_VECTOR)
    layer = dataset.GetLayer(0)
    return [feature.GetField("is_tree") for feature in layer], layer.GetSpatialRef().ExportToWkt()


def same_crs(wkt: str, epsg: int) -> bool:
    expected = osr.SpatialReference()
    expected.ImportFromEPSG(epsg)
    return bool(osr.SpatialReference(wkt).IsSame(expected))


def files_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def test_writes_the_three_outputs_at_the_given_paths_and_returns_the_numbers(provider, tiny_model_dir, scene_tif,
                                                                              tmp_path):
    path, _ = scene_tif
    out = tmp_path / "out"
    results = run(tiny_run(tiny_model_dir, path, out, OUTPUT_TREES="TEMPORARY_OUTPUT",
                           OUTPUT_POLYGONS=str(out / "polygons.shp")))

    assert results["OUTPUT_CLUSTERS"] == str(out / "clusters.tif")
    assert results["OUTPUT_POLYGONS"] == str(out / "polygons.gpkg")
    assert results["OUTPUT_TREES"].endswith(".tif") and os.path.isfile(results["OUTPUT_TREES"])
    assert files_in(out) == ["clusters.tif", "clusters.tif.aux.xml", "clusters_preview.png", "clusters_run.json",
                             "polygons.gpkg"]
    assert results["K"] == 2 and 0 < results["TREE_COVER"] < 1
    assert results["MODEL_USED"] == str(tiny_model_dir) and results["UNTRAINED"] is False
    assert json.loads(Path(results["RUN_RECORD"]).read_text())["clusters"]["k"] == 2
    for output in ("OUTPUT_CLUSTERS", "OUTPUT_TREES"):
        values, geotransform, wkt = raster(results[output])
        assert values.shape == (320, 400) and geotransform == pytest.approx(SAMPLE_GEOTRANSFORM)
        assert same_crs(wkt, UTM17N)
    is_tree, wkt = polygons(results["OUTPUT_POLYGONS"])
    assert set(is_tree) == {0, 1} and same_crs(wkt, UTM17N)


def test_extent_crops_to_whole_pixels_of_the_raster(provider, tiny_model_dir, scene_tif, tmp_path):
    path, _ = scene_tif
    x0, y0 = SAMPLE_GEOTRANSFORM[0], SAMPLE_GEOTRANSFORM[3]
    left, right, top, bottom = x0 + 40 * PIXEL, x0 + 240 * PIXEL, y0 - 60 * PIXEL, y0 - 220 * PIXEL
    results = run(tiny_run(tiny_model_dir, path, tmp_path,
                           EXTENT=f"{left},{right},{bottom},{top} [EPSG:{UTM17N}]"))

    values, geotransform, wkt = raster(results["OUTPUT_CLUSTERS"])
    assert values.shape == (160, 200)
    assert geotransform == pytest.approx((left, PIXEL, 0, top, 0, -PIXEL))
    assert same_crs(wkt, UTM17N) and (values < 255).all()


def test_mask_limits_to_the_polygon_and_resolution_resamples(provider, tiny_model_dir, scene_tif, tmp_path):
    from qgis.core import QgsGeometry, QgsPointXY

    path, _ = scene_tif
    x0, y0 = SAMPLE_GEOTRANSFORM[0], SAMPLE_GEOTRANSFORM[3]
    centre_x, centre_y, half = x0 + 20.0, y0 - 16.0, 12.0
    diamond = QgsGeometry.fromPolygonXY([[QgsPointXY(centre_x - half, centre_y), QgsPointXY(centre_x, centre_y + half),
                                          QgsPointXY(centre_x + half, centre_y), QgsPointXY(centre_x, centre_y - half),
                                          QgsPointXY(centre_x - half, centre_y)]])
    mask = wgs84_memory_layer("Polygon", "mask", [diamond])

    results = run(tiny_run(tiny_model_dir, path, tmp_path, MASK=mask, RESOLUTION=0.2))

    for output in ("OUTPUT_CLUSTERS", "OUTPUT_TREES"):
        values, geotransform, wkt = raster(results[output])
        assert geotransform[1] == pytest.approx(0.2) and geotransform[5] == pytest.approx(-0.2)
        assert values.shape == pytest.approx((120, 120), abs=2)
        assert geotransform[0] == pytest.approx(centre_x - half, abs=0.2)
        assert geotransform[3] == pytest.approx(centre_y + half, abs=0.2)
        assert same_crs(wkt, UTM17N)
        rows, cols = values.shape
        corners = values[[0, 0, -1, -1], [0, -1, 0, -1]]
        assert (corners == 255).all() and values[rows // 2, cols // 2] != 255
        inside = (values != 255).mean()
        assert inside == pytest.approx(0.5, abs=0.05)


def test_an_extent_outside_the_raster_is_a_clear_error(provider, scene_tif, tmp_path):
    from qgis.core import QgsProcessingException

    path, _ = scene_tif
    with pytest.raises(QgsProcessingException, match="extent does not overlap"):
        run(tiny_run(Path("unused"), path, tmp_path, EXTENT=f"0,10,0,10 [EPSG:{UTM17N}]"))
    assert files_in(tmp_path) == ["scene.tif"]


def test_an_invalid_value_fails_before_any_engine_starts(provider, scene_tif, tmp_path, monkeypatch):
    from qgis.core import QgsProcessingException

    started = tmp_path / "engine_started"
    engine = tmp_path / "engine_python"
    engine.write_text(f"#!/bin/sh\ntouch {started}\nexit 1\n")
    engine.chmod(0o755)
    monkeypatch.setenv(ENGINE_PYTHON_ENV, str(engine))
    path, _ = scene_tif
    with pytest.raises(QgsProcessingException, match=r"automatic cluster range 9\.\.3"):
        run(tiny_run(Path("unused"), path, tmp_path / "out", K_MIN=9, K_MAX=3))
    assert not started.exists() and not (tmp_path / "out").exists()


def test_the_command_line_and_processing_send_the_same_parameters(provider, tiny_model_dir, scene_tif, tmp_path):
    """One run spelled both ways: the engine's record of the Processing run and the CLI's object agree."""
    from treeseg_qgis.engine.cli import build_parser, params_from_args
    from treeseg_qgis.params import SegmentationParams

    path, _ = scene_tif
    out = tmp_path / "out"
    result = run(tiny_run(tiny_model_dir, path, out, STRIDE="8", CLUSTERS=3, K_MIN=2, K_MAX=5, BANDS=[3, 2, 1],
                          PRECISION="float32", TREE_CLUSTERS="1, 0", CROWN_MIN_AREA=1.5, ALLOW_UNTRAINED=True))
    sent = SegmentationParams.from_json(json.loads(Path(result["RUN_RECORD"]).read_text())["parameters"]).to_json()
    typed = params_from_args(build_parser().parse_args([
        "segment", str(path), "--out", str(out), "--model", str(tiny_model_dir), "--stride", "8", "--clusters", "3",
        "--k-range", "2-5", "--bands", "3,2,1", "--device", "cpu", "--precision", "float32", "--tree-clusters",
        "1,0", "--crown-min-area", "1.5", "--allow-untrained"])).to_json()
    where = ("output_stem", "outputs")  # Processing names each output file; the CLI names them after the input
    assert {k: v for k, v in sent.items() if k not in where} == {k: v for k, v in typed.items() if k not in where}
    assert sent["clusters"] == 3 and sent["tree_clusters"] == (0, 1) and sent["outputs"]["clusters"] == str(
        out / "clusters.tif")


def test_a_web_layer_asks_for_a_geotiff_export(provider, tmp_path):
    from qgis.core import QgsProcessingException, QgsProject, QgsRasterLayer

    tiles = QgsRasterLayer("type=xyz&url=http://127.0.0.1:9/{z}/{x}/{y}.png&zmax=19&zmin=0", "tiles", "wms")
    assert tiles.isValid()
    QgsProject.instance().addMapLayer(tiles)
    try:
        with pytest.raises(QgsProcessingException, match="export it to a GeoTIFF"):
            run(tiny_run(Path("unused"), tiles.id(), tmp_path))
    finally:
        QgsProject.instance().removeMapLayer(tiles)


def test_a_missing_engine_is_explained_and_the_algorithm_still_listed(provider, scene_tif, tmp_path, monkeypatch):
    from qgis.core import QgsApplication, QgsProcessingException

    from treeseg_qgis.qgis_side import engine_client

    nowhere = tmp_path / "nowhere"
    monkeypatch.setenv(ENGINE_PYTHON_ENV, str(nowhere / "python"))
    monkeypatch.setattr(engine_client, "PLUGIN_DIR", nowhere / "treeseg_qgis")
    monkeypatch.setattr(engine_client, "ENGINE_POINTER_FILE", nowhere / "engine_python.txt")
    monkeypatch.setattr(engine_client, "ENGINE_PYTHON_SETTING", "treeseg_tests/no_such_setting")
    assert QgsApplication.processingRegistry().algorithmById(ALGORITHM) is not None
    path, _ = scene_tif
    with pytest.raises(QgsProcessingException) as caught:
        run(tiny_run(Path("unused"), path, tmp_path / "out"))
    assert str(caught.value) == engine_client.missing_engine_message()
    assert files_in(tmp_path / "out") == []


def test_an_unavailable_model_names_its_page_and_leaves_nothing(provider, scene_tif, tmp_path, monkeypatch):
    from qgis.core import QgsProcessingException

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-cache"))
    path, _ = scene_tif
    out = tmp_path / "out"
    with pytest.raises(QgsProcessingException, match="huggingface.co/facebook/dinov3-vitl16-pretrain-lvd1689m"):
        run(tiny_run(Path("unused"), path, out, MODEL="large", MODEL_ID=""))
    assert files_in(out) == []


def test_cancel_stops_the_engine_and_leaves_nothing(provider, tiny_model_dir, scene_tif, tmp_path):
    from qgis.core import QgsProcessingException, QgsProcessingFeedback

    class CancelOnceStarted(QgsProcessingFeedback):
        def setProgress(self, progress: float) -> None:
            super().setProgress(progress)
            if progress > 5:
                self.cancel()

    path, _ = scene_tif
    out = tmp_path / "out"
    feedback = CancelOnceStarted()
    with pytest.raises(QgsProcessingException, match="Cancelled"):
        run(tiny_run(tiny_model_dir, path, out, CLUSTERS=0), feedback=feedback)
    assert feedback.isCanceled() and files_in(out) == []


def test_the_committed_model_chains_segmentation_and_extraction(provider, tiny_model_dir, scene_tif, tmp_path):
    import processing
    from qgis.core import QgsProcessingModelAlgorithm

    model = QgsProcessingModelAlgorithm()
    assert model.fromFile(str(MODEL_FILE))
    assert [child.algorithmId() for child in model.childAlgorithms().values()].count(ALGORITHM) == 1
    path, _ = scene_tif
    results = processing.run(model, {
        "orthophoto": str(path), "model": str(tiny_model_dir), "clusters": 2,
        "keep_trees:Tree polygons": str(tmp_path / "trees.gpkg"),
    })

    is_tree, _ = polygons(results["keep_trees:Tree polygons"])
    assert len(is_tree) > 0 and set(is_tree) == {1}


def test_batch_runs_one_algorithm_instance_row_by_row(provider, tiny_model_dir, scene_tif, tmp_path):
    """As the batch dialog does: the same algorithm, one fresh context per row, layers loaded on completion."""
    from processing.tools import dataobjects
    from qgis.core import QgsApplication, QgsProcessingFeedback, QgsProcessingOutputLayerDefinition, QgsProject

    first, _ = scene_tif
    image, _ = disc_scene(192, 256, [(90, 120)], radius=40, seed=1)
    second = write_geotiff(tmp_path / "second.tif", image)
    algorithm = QgsApplication.processingRegistry().createAlgorithmById(ALGORITHM)
    feedback = QgsProcessingFeedback()
    rows = [tiny_run(tiny_model_dir, first, tmp_path / "first"), tiny_run(tiny_model_dir, second, tmp_path / "second")]
    rows[1]["OUTPUT_TREES"] = QgsProcessingOutputLayerDefinition(str(tmp_path / "second" / "trees.tif"),
                                                                 QgsProject.instance())
    loaded = {}
    for row in rows:
        context = dataobjects.createContext(feedback)
        results, ok = algorithm.run(algorithm.preprocessParameters(row), context, feedback)
        assert ok
        loaded.update({path: details.name for path, details in context.layersToLoadOnCompletion().items()})

    for folder, shape in (("first", (320, 400)), ("second", (192, 256))):
        for name in ("clusters.tif", "trees.tif"):
            assert raster(tmp_path / folder / name)[0].shape == shape
        assert (tmp_path / folder / "polygons.gpkg").is_file()
    assert list(loaded) == [str(tmp_path / "second" / "trees.tif")]
    assert re.fullmatch(r"Tree mask \(\d+\.\d % cover\)", loaded[str(tmp_path / "second" / "trees.tif")])


def test_the_provider_imports_no_engine_packages():
    """The provider must load in QGIS's own Python, where torch may be missing."""
    check = ("import sys; import treeseg_qgis.qgis_side.processing.provider; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'sklearn'}), "
             "sorted(m for m in sys.modules if m.startswith('treeseg_qgis.engine.core')))")
    output = subprocess.run(["/usr/bin/python3", "-c", check], cwd=REPO, capture_output=True, text=True,
                            check=True, env=dict(os.environ, QT_QPA_PLATFORM="offscreen"))
    assert output.stdout.split("\n")[0] == "[] []"


def test_the_icon_is_found_in_the_checkout_and_in_the_packaged_plugin(tmp_path, monkeypatch):
    from treeseg_qgis.qgis_side.processing import provider

    assert provider.icon_path() == REPO / "resources" / "icon.svg"
    packaged = tmp_path / "treeseg_qgis"
    (packaged / "resources").mkdir(parents=True)
    shutil.copy(REPO / "resources" / "icon.svg", packaged / "resources" / "icon.svg")
    monkeypatch.setattr(provider, "PACKAGE_DIR", packaged)
    assert provider.icon_path() == packaged / "resources" / "icon.svg"


def qgis_process_environment(tmp_path: Path) -> dict[str, str]:
    """The environment of a qgis_process call with the plugin installed in a throw-away profile (under a temporary
    HOME), this .venv as its engine."""
    home = tmp_path / "home"
    profile = home / ".local/share/QGIS/QGIS3/profiles/default"
    plugin = profile / "python/plugins/treeseg_qgis"
    shutil.copytree(REPO / "treeseg_qgis", plugin, ignore=shutil.ignore_patterns("__pycache__", "engine_python.txt"))
    shutil.copytree(REPO / "resources", plugin / "resources", ignore=shutil.ignore_patterns("sample"))
    shutil.copy(REPO / "metadata.txt", plugin / "metadata.txt")
    (plugin / "engine_python.txt").write_text(sys.executable)
    (profile / "QGIS").mkdir(parents=True)
    (profile / "QGIS/QGIS3.ini").write_text("[PythonPlugins]\ntreeseg_qgis=true\n")
    # pytest-qgis points QGIS_CUSTOM_CONFIG_PATH at its own settings: drop it so the profile under HOME is used.
    environment = {key: value for key, value in os.environ.items()
                   if key != ENGINE_PYTHON_ENV and not key.startswith("QGIS_")}
    environment.update(HOME=str(home), QT_QPA_PLATFORM="offscreen", HF_HUB_OFFLINE="1")
    return environment


def qgis_process(arguments: list[str], environment: dict[str, str], cwd: Path | None = None) -> dict:
    """The results of `qgis_process --json run ALGORITHM -- arguments`, asserting it succeeded."""
    completed = subprocess.run([str(QGIS_PROCESS), "--json", "run", *arguments], capture_output=True, text=True,
                               env=environment, timeout=300, cwd=cwd)
    assert completed.returncode == 0, completed.stderr[-2000:] + completed.stdout[-2000:]
    return json.loads(completed.stdout[completed.stdout.index("{"):])["results"]


@pytest.mark.skipif(not QGIS_PROCESS.exists(), reason="qgis_process (/usr/bin/qgis_process.bin) is not installed")
def test_qgis_process_runs_the_algorithm_from_an_installed_plugin(tiny_model_dir, scene_tif, tmp_path):
    environment = qgis_process_environment(tmp_path)
    path, _ = scene_tif
    x0, y0 = SAMPLE_GEOTRANSFORM[0], SAMPLE_GEOTRANSFORM[3]
    extent = f"{x0},{x0 + 256 * PIXEL},{y0 - 192 * PIXEL},{y0} [EPSG:{UTM17N}]"
    out = tmp_path / "out"

    results = qgis_process(
        [ALGORITHM, "--", f"INPUT={path}", f"MODEL_ID={tiny_model_dir}",
         "CLUSTERS=2", "DEVICE=cpu", "BANDS=1", "BANDS=2", "BANDS=3", f"EXTENT={extent}",
         f"OUTPUT_CLUSTERS={out / 'clusters.tif'}",
         f"OUTPUT_TREES={out / 'trees.tif'}", f"OUTPUT_POLYGONS={out / 'polygons.gpkg'}"], environment)

    assert results["K"] == 2 and results["OUTPUT_POLYGONS"] == str(out / "polygons.gpkg")
    assert files_in(out) == ["clusters.tif", "clusters.tif.aux.xml", "clusters_preview.png", "clusters_run.json",
                             "polygons.gpkg", "trees.tif", "trees.tif.aux.xml"]
    assert raster(out / "trees.tif")[0].shape == (192, 256)


@pytest.mark.skipif(not QGIS_PROCESS.exists(), reason="qgis_process (/usr/bin/qgis_process.bin) is not installed")
def test_qgis_process_resolves_relative_paths_against_the_callers_folder(tiny_model_dir, tmp_path):
    """As scripts call native algorithms: the input, the model folder and every output relative to the folder
    qgis_process runs in, never the engine worker's."""
    environment = qgis_process_environment(tmp_path)
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    image, _ = disc_scene(128, 160, [(60, 70)], radius=40)
    write_geotiff(work / "in.tif", image)
    shutil.copytree(tiny_model_dir, work / "models" / "tiny")

    results = qgis_process(
        [ALGORITHM, "--", "INPUT=in.tif", "MODEL_ID=models/tiny", "CLUSTERS=2", "DEVICE=cpu",
         "OUTPUT_CLUSTERS=c.tif", "OUTPUT_TREES=t.tif", "OUTPUT_POLYGONS=p.gpkg",
         "OUTPUT_CROWNS=crowns/crowns.gpkg"], environment, cwd=work)
    crowns = qgis_process(["treeseg:treecrowns", "--", "INPUT=t.tif", "CLUSTERS=c.tif", "OUTPUT=split.gpkg"],
                          environment, cwd=work)

    assert results["OUTPUT_CLUSTERS"] == str(work / "c.tif") and results["K"] == 2
    assert crowns["OUTPUT"] == str(work / "split.gpkg")
    assert {"c.tif", "t.tif", "p.gpkg", "c_run.json", "split.gpkg"} <= set(files_in(work))
    assert (work / "crowns" / "crowns.gpkg").is_file()
    assert json.loads((work / "c_run.json").read_text())["input"]["path"] == str(work / "in.tif")
    plugins = tmp_path / "home/.local/share/QGIS/QGIS3/profiles/default/python/plugins"
    assert sorted(path.name for path in plugins.iterdir()) == ["treeseg_qgis"]


def error_recorder():
    """A Processing feedback that keeps the errors reported to it (what the dialog shows in red)."""
    from qgis.core import QgsProcessingFeedback

    class Recorder(QgsProcessingFeedback):
        def __init__(self) -> None:
            super().__init__()
            self.errors: list[str] = []

        def reportError(self, error: str, fatalError: bool = False) -> None:  # noqa: N802, N803 - QGIS override
            self.errors.append(error)
            super().reportError(error, fatalError)

    return Recorder()


def test_temporary_outputs_load_styled_in_one_group_without_a_false_error(provider, tiny_model_dir, scene_tif,
                                                                         layer_tree_view):
    """As the toolbox dialog runs it (runAndLoadResults → handleAlgorithmResults): every output read once, so
    each temporary path is written and loaded, none reported as 'not correctly generated'; the post-processor
    gives them the panel's names, styles and group."""
    import processing
    from qgis.core import QgsPalettedRasterRenderer, QgsProject, QgsRuleBasedRenderer
    from qgis.PyQt.QtCore import Qt

    from treeseg_qgis.qgis_side.results import OVERLAY_OPACITY

    path, _ = scene_tif
    feedback = error_recorder()
    temporary = {name: "TEMPORARY_OUTPUT" for name in ("OUTPUT_CLUSTERS", "OUTPUT_TREES", "OUTPUT_POLYGONS",
                                                        "OUTPUT_CROWNS")}
    results = processing.runAndLoadResults(ALGORITHM, tiny_run(tiny_model_dir, path, Path("unused"), **temporary),
                                           feedback=feedback)

    assert feedback.errors == []
    root = QgsProject.instance().layerTreeRoot()
    group = root.findGroup(f"scene — {tiny_model_dir.name}, stride 16")
    try:
        assert group is not None and root.children().index(group) == 0
        nodes = group.findLayers()
        assert [node.layer().source().split("|")[0] for node in nodes] == [
            results[name] for name in ("OUTPUT_CROWNS", "OUTPUT_POLYGONS", "OUTPUT_TREES", "OUTPUT_CLUSTERS")]
        assert all(Path(results[name]).is_file() for name in temporary)
        crowns, polygons, trees, clusters = (node.layer() for node in nodes)
        assert [node.name() for node in nodes] == [
            f"Tree crowns ({results['CROWNS']})", "Tree polygons",
            f"Tree mask ({100 * results['TREE_COVER']:.1f} % cover)", "Clusters (K=2)"]
        assert [node.itemVisibilityChecked() for node in nodes] == [True, True, False, True]
        assert isinstance(clusters.renderer(), QgsPalettedRasterRenderer)
        assert [item.value for item in clusters.renderer().classes()] == [0, 1]
        assert clusters.opacity() == OVERLAY_OPACITY and trees.opacity() == OVERLAY_OPACITY
        rules = polygons.renderer().rootRule().children()
        assert isinstance(polygons.renderer(), QgsRuleBasedRenderer)
        assert [rule.label() for rule in rules] == ["tree", "not tree"]
        outlines_only = [rule.symbol() for rule in rules] + [crowns.renderer().symbol()]
        assert all(symbol.symbolLayer(0).brushStyle() == Qt.BrushStyle.NoBrush for symbol in outlines_only)
        assert len(QgsProject.instance().mapLayers()) == 4
    finally:
        QgsProject.instance().removeAllMapLayers()
        root.removeAllChildren()


def test_a_blank_optional_output_is_not_queued_for_loading_and_reports_no_error(provider, tiny_model_dir,
                                                                                 scene_tif, tmp_path,
                                                                                 layer_tree_view):
    """As a batch row sends an optional output left blank: an empty output definition bound to the project. Nothing
    is queued under '' and the run ends without "The following layers were not correctly generated"."""
    import processing
    from qgis.core import QgsProcessingContext, QgsProcessingOutputLayerDefinition, QgsProject

    path, _ = scene_tif
    feedback = error_recorder()
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    blank = QgsProcessingOutputLayerDefinition("", QgsProject.instance())
    try:
        results = processing.runAndLoadResults(
            ALGORITHM, tiny_run(tiny_model_dir, path, tmp_path / "out", OUTPUT_CROWNS=blank), feedback=feedback,
            context=context)

        assert "" not in context.layersToLoadOnCompletion()
        assert feedback.errors == []
        assert "OUTPUT_CROWNS" not in results and not list((tmp_path / "out").glob("*crowns*"))
        assert Path(results["OUTPUT_CLUSTERS"]).is_file()
    finally:
        QgsProject.instance().removeAllMapLayers()
        QgsProject.instance().layerTreeRoot().removeAllChildren()


def test_the_output_group_orders_layers_the_desktop_already_put_into_it(qgis_new_project):
    """The desktop adds each loaded layer at the current group, which after the first output is ours: the
    group still ends in the panel's order, whatever order the outputs load in."""
    from qgis.core import QgsProject, QgsVectorLayer

    from treeseg_qgis.params import SegmentationParams
    from treeseg_qgis.qgis_side.results import RUN_OUTPUT_ORDER, OutputGroup
    from treeseg_qgis.run_record import (
        ClusterFacts,
        FeatureCacheUse,
        InputFacts,
        ModelFacts,
        ModelRun,
        RunRecord,
        TreeFacts,
    )

    record = RunRecord("0.1.0", None, InputFacts("scene.tif", 64, 64, [1, 2, 3], "none"), "dinov3",
                       ModelFacts("base", False, "pretrained", "cpu"), "base", 16,
                       ClusterFacts(2, False, {}, [0.0, 0.3], [2048, 2048]), TreeFacts([1], "ExG", 2048, 4096, 0.5),
                       2, 1, ModelRun(1, 4096), SegmentationParams("scene.tif", "out"), {}, {}, {}, None, None,
                       FeatureCacheUse("off", None))
    project = QgsProject.instance()
    root = project.layerTreeRoot()
    group = OutputGroup("scene — base, stride 16", RUN_OUTPUT_ORDER, record, "scene")
    layers = {kind: QgsVectorLayer("Polygon?crs=EPSG:32617", kind, "memory") for kind in RUN_OUTPUT_ORDER}
    try:
        for kind in ("clusters", "crowns", "height", "trees", "polygons", "features"):
            layer = layers[kind]
            project.addMapLayer(layer, False)
            (group.node or root).insertLayer(0, layer)  # where the desktop's insertion point puts it
            group.take(layer, kind, project)

        assert root.children()[0] is group.node
        assert [node.name() for node in group.node.findLayers()] == list(RUN_OUTPUT_ORDER)
        assert [node.itemVisibilityChecked() for node in group.node.findLayers()] == [
            True, True, False, True, False, False]
        assert len(project.mapLayers()) == len(RUN_OUTPUT_ORDER)
    finally:
        project.removeAllMapLayers()
        root.removeAllChildren()
