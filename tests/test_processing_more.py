"""The other Processing algorithms (teach, treecrowns, evaluate) and segmenttrees' optional outputs, in real QGIS.

Algorithms that need the engine start a fresh worker (the repository's .venv
Python) per run with the tiny DINOv3 of conftest, on small rasters; evaluate runs
in this process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal, ogr, osr

from treeseg_qgis.params import CrownOptions
from treeseg_qgis.protocol import ErrorKind
from treeseg_qgis.qgis_side.engine_client import EngineClient, EngineError, JobWatch
from treeseg_qgis.run_record import CrownsRecord

from .conftest import SAMPLE_GEOTRANSFORM, UTM17N, disc_scene, wgs84_memory_layer, write_geotiff
from .test_canopy import tiny_height_dir  # noqa: F401 - a tiny canopy-height model saved to disk
from .test_processing import provider  # noqa: F401 - the fixture that registers the treeseg provider

gdal.UseExceptions()

PIXEL = SAMPLE_GEOTRANSFORM[1]
X0, Y0 = SAMPLE_GEOTRANSFORM[0], SAMPLE_GEOTRANSFORM[3]
CROWN_CENTRES = [(64, 48), (64, 144)]  # (row, col)
CROWN_RADIUS = 30


def run(algorithm: str, parameters: dict) -> dict:
    import processing

    return processing.run(f"treeseg:{algorithm}", parameters)


def to_map(row: float, col: float) -> tuple[float, float]:
    """The centre of pixel (row, col) of SAMPLE_GEOTRANSFORM in UTM 17N."""
    return X0 + (col + 0.5) * PIXEL, Y0 - (row + 0.5) * PIXEL


@pytest.fixture
def small_scene(tmp_path) -> tuple[Path, np.ndarray]:
    """A 128 × 192 px orthophoto with two crowns, and their mask."""
    image, crowns = disc_scene(128, 192, CROWN_CENTRES, radius=CROWN_RADIUS, seed=3)
    return write_geotiff(tmp_path / "small.tif", image), crowns


@pytest.fixture
def disc_mask(small_scene, tmp_path) -> Path:
    """The true crowns of small_scene as a tree-mask GeoTIFF (1 = tree)."""
    _, crowns = small_scene
    return write_geotiff(tmp_path / "mask.tif", crowns[None].astype(np.uint8))


def read_raster(path) -> np.ndarray:
    return gdal.Open(str(path)).ReadAsArray()


def vector_rows(path) -> tuple[list[str], list[dict]]:
    """Field names and attribute rows of the first layer of a vector file."""
    dataset = gdal.OpenEx(str(path), gdal.OF_VECTOR)
    layer = dataset.GetLayer(0)
    definition = layer.GetLayerDefn()
    names = [definition.GetFieldDefn(index).GetName() for index in range(definition.GetFieldCount())]
    return names, [feature.items() for feature in layer]


def write_boxes(path: Path, boxes: list[tuple[float, float, float, float]], layers: int = 1) -> Path:
    """Polygons of map-coordinate boxes (xmin, ymin, xmax, ymax) in UTM 17N as a GeoPackage."""
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(UTM17N)
    source = ogr.GetDriverByName("GPKG").CreateDataSource(str(path))
    for index in range(layers):
        layer = source.CreateLayer(f"boxes{index}", srs, ogr.wkbPolygon)
        for xmin, ymin, xmax, ymax in boxes:
            feature = ogr.Feature(layer.GetLayerDefn())
            feature.SetGeometry(ogr.CreateGeometryFromWkt(
                f"POLYGON(({xmin} {ymin},{xmax} {ymin},{xmax} {ymax},{xmin} {ymax},{xmin} {ymin}))"))
            layer.CreateFeature(feature)
    source = None
    return path


def crown_boxes(margin_px: int = 4) -> list[tuple[float, float, float, float]]:
    """A box around each crown of small_scene, in map coordinates."""
    reach = (CROWN_RADIUS + margin_px) * PIXEL
    boxes = []
    for row, col in CROWN_CENTRES:
        x, y = to_map(row, col)
        boxes.append((x - reach, y - reach, x + reach, y + reach))
    return boxes


def test_segmenttrees_writes_crowns_and_features_with_chosen_tree_clusters(provider, tiny_model_dir,  # noqa: F811
                                                                            small_scene, tmp_path):
    path, _ = small_scene
    out = tmp_path / "out"
    results = run("segmenttrees", {
        "INPUT": str(path), "MODEL_ID": str(tiny_model_dir), "CLUSTERS": 2, "DEVICE": "cpu", "TREE_CLUSTERS": "1",
        "OUTPUT_CLUSTERS": str(out / "clusters.tif"), "OUTPUT_TREES": str(out / "trees.tif"),
        "OUTPUT_POLYGONS": str(out / "polygons.gpkg"), "OUTPUT_CROWNS": str(out / "crowns.gpkg"),
        "OUTPUT_FEATURES": str(out / "features.tif"), "PRECISION": "int8",
    })

    clusters, trees = read_raster(results["OUTPUT_CLUSTERS"]), read_raster(results["OUTPUT_TREES"])
    assert np.array_equal(trees == 1, clusters == 1)
    assert results["OUTPUT_CROWNS"] == str(out / "crowns.gpkg")
    names, crowns = vector_rows(results["OUTPUT_CROWNS"])
    assert {"crown_id", "area_m2"} <= set(names)
    assert results["CROWNS"] == len({crown["crown_id"] for crown in crowns})
    assert all(crown["area_m2"] >= 2.0 for crown in crowns)
    features = gdal.Open(results["OUTPUT_FEATURES"])
    assert (features.RasterCount, features.RasterYSize, features.RasterXSize) == (3, 128 // 16, 192 // 16)
    assert features.GetGeoTransform()[1] == pytest.approx(16 * PIXEL)
    assert "OUTPUT_HEIGHT" not in results
    assert json.loads((out / "clusters_run.json").read_text())["model"]["precision"].startswith("int8 (ONNX Runtime")


def test_a_minimum_tree_height_computes_the_height_into_the_temporary_folder(provider, tiny_height_dir,  # noqa: F811
                                                                             small_scene, tmp_path):
    import json

    from qgis.core import QgsProcessingUtils

    path, _ = small_scene
    out = tmp_path / "out"
    results = run("segmenttrees", {
        "INPUT": str(path), "METHOD": "rgb-kmeans", "CLUSTERS": 2, "DEVICE": "cpu", "MIN_TREE_HEIGHT": 0.5,
        "HEIGHT_MODEL": str(tiny_height_dir), "OUTPUT_CLUSTERS": str(out / "clusters.tif"),
        "OUTPUT_TREES": str(out / "trees.tif"), "OUTPUT_POLYGONS": str(out / "polygons.gpkg"),
    })

    record = json.loads(Path(results["RUN_RECORD"]).read_text())
    assert record["method"] == "rgb-kmeans" and record["parameters"]["min_tree_height_m"] == 0.5
    assert record["model"]["height_model"]["model_id"] == str(tiny_height_dir)
    assert "canopy height ≥ 0.5 m" in record["trees"]["rule"]
    assert results["OUTPUT_HEIGHT"].startswith(QgsProcessingUtils.tempFolder())
    assert read_raster(results["OUTPUT_HEIGHT"]).shape == (128, 192)
    assert not any("height" in file.name for file in out.iterdir())


def test_segmenttrees_rejects_tree_clusters_that_are_not_ids(provider, small_scene, tmp_path):  # noqa: F811
    from qgis.core import QgsProcessingException

    path, _ = small_scene
    outputs = {"OUTPUT_CLUSTERS": str(tmp_path / "c.tif"), "OUTPUT_TREES": str(tmp_path / "t.tif"),
               "OUTPUT_POLYGONS": str(tmp_path / "p.gpkg")}
    with pytest.raises(QgsProcessingException, match="must be cluster ids separated by commas"):
        run("segmenttrees", {"INPUT": str(path), "TREE_CLUSTERS": "trees", **outputs})
    with pytest.raises(QgsProcessingException, match="cluster ids from 0 to 249"):
        run("segmenttrees", {"INPUT": str(path), "TREE_CLUSTERS": "0, 250", **outputs})


def test_teach_scores_from_points_in_another_crs_and_reuses_the_features(provider, tiny_model_dir,  # noqa: F811
                                                                         small_scene, tmp_path):
    from qgis.core import QgsGeometry, QgsPointXY

    path, _ = small_scene
    examples = [(*CROWN_CENTRES[0], 1), (*CROWN_CENTRES[1], 1), (120, 96, 0)]  # (row, col, is_tree)
    points = wgs84_memory_layer("Point", "examples",
                                [QgsGeometry.fromPointXY(QgsPointXY(*to_map(row, col))) for row, col, _ in examples],
                                [{"is_tree": is_tree} for _, _, is_tree in examples])
    parameters = {"INPUT": str(path), "EXAMPLES": points, "MODEL_ID": str(tiny_model_dir), "DEVICE": "cpu",
                  "THRESHOLD": 0.6, "OUTPUT_SIMILARITY": str(tmp_path / "a" / "similarity.tif"),
                  "OUTPUT_TREES": str(tmp_path / "a" / "trees.tif")}

    first = run("teach", parameters)
    second = run("teach", {**parameters, "THRESHOLD": 0.4, "OUTPUT_SIMILARITY": str(tmp_path / "b" / "s.tif"),
                           "OUTPUT_TREES": str(tmp_path / "b" / "t.tif")})

    scores = read_raster(first["OUTPUT_SIMILARITY"])
    assert scores.shape == (128, 192) and 0.0 <= scores.min() and scores.max() <= 1.0
    assert all(scores[row, col] > 0.5 for row, col, is_tree in examples if is_tree)
    assert scores[120, 96] < 0.5
    assert np.array_equal(read_raster(first["OUTPUT_TREES"]) == 1, scores >= 0.6)
    assert Path(first["TEACH_RECORD"]) == tmp_path / "a" / "similarity_teach.json"
    assert first["FEATURE_CACHE"] == "miss" and second["FEATURE_CACHE"] == "hit"
    assert second["TREE_COVER"] >= first["TREE_COVER"] > 0
    assert first["THRESHOLD_USED"] == 0.6

    unset = run("teach", {**parameters, "THRESHOLD": None, "CLASS_NAME": "dead tree",
                          "OUTPUT_SIMILARITY": str(tmp_path / "c" / "s.tif"),
                          "OUTPUT_TREES": str(tmp_path / "c" / "t.tif")})
    record = json.loads(Path(unset["TEACH_RECORD"]).read_text())
    assert record["class"] == "dead tree" and "too few examples" in record["threshold_note"]  # 2 + 1 examples
    assert unset["THRESHOLD_USED"] == 0.5
    assert np.array_equal(read_raster(unset["OUTPUT_TREES"]) == 1, read_raster(unset["OUTPUT_SIMILARITY"]) >= 0.5)


def test_teachclasses_writes_named_classes_probabilities_and_polygons(provider, tiny_model_dir,  # noqa: F811
                                                                      small_scene, tmp_path):
    from qgis.core import QgsGeometry, QgsPointXY

    path, _ = small_scene
    examples = [(*CROWN_CENTRES[0], "crown"), (*CROWN_CENTRES[1], "crown"), (120, 96, "ground"), (5, 5, "ground"),
                (64, 96, "")]  # (row, col, class); the empty one is skipped
    points = wgs84_memory_layer("Point", "examples",
                                [QgsGeometry.fromPointXY(QgsPointXY(*to_map(row, col))) for row, col, _ in examples],
                                [{"class": name} for _, _, name in examples])
    results = run("teachclasses", {"INPUT": str(path), "EXAMPLES": points, "MODEL_ID": str(tiny_model_dir),
                                   "DEVICE": "cpu", "OUTPUT_CLASSES": str(tmp_path / "out" / "classes.tif"),
                                   "OUTPUT_CLASS_PROBABILITIES": str(tmp_path / "out" / "p.tif"),
                                   "OUTPUT_CLASS_POLYGONS": str(tmp_path / "out" / "classes.gpkg")})

    dataset = gdal.Open(results["OUTPUT_CLASSES"])
    band = dataset.GetRasterBand(1)
    assert band.GetColorTable() is not None and band.GetCategoryNames()[:3] == ["unsure", "crown", "ground"]
    classes = band.ReadAsArray()
    assert all(classes[row, col] == 1 for row, col, name in examples if name == "crown")
    assert gdal.Open(results["OUTPUT_CLASS_PROBABILITIES"]).RasterCount == 2
    names, rows = vector_rows(results["OUTPUT_CLASS_POLYGONS"])
    assert "class" in names and {row["class"] for row in rows} <= {"crown", "ground"}
    record = json.loads(Path(results["TEACH_RECORD"]).read_text())
    assert record["examples"] == {"crown": 2, "ground": 2} and results["FEATURE_CACHE"] == "miss"


def test_the_worker_splits_a_mask_into_crowns(disc_mask, tmp_path):
    client = EngineClient(sys.executable)
    progress = []
    try:
        with pytest.raises(EngineError, match="min_distance_m must be a finite number") as refused:
            client.crowns(str(disc_mask), None, str(tmp_path / "refused" / "discs.gpkg"),
                          CrownOptions(min_distance_m=float("nan")))
        assert refused.value.kind == ErrorKind.INPUT and not (tmp_path / "refused").exists()
        record = client.crowns(str(disc_mask), None, str(tmp_path / "out" / "discs.gpkg"),
                               CrownOptions(min_area_m2=1.0),
                               JobWatch(on_progress=lambda percent, stage: progress.append(percent)))
    finally:
        client.close()

    assert record == CrownsRecord(2, {"crowns": str(tmp_path / "out" / "discs.gpkg")})
    assert progress[-1] == 100.0
    dataset = gdal.OpenEx(str(tmp_path / "out" / "discs.gpkg"), gdal.OF_VECTOR)
    layer = dataset.GetLayer(0)
    assert layer.GetName() == "discs" and layer.GetFeatureCount() == 2


def test_treecrowns_writes_one_polygon_per_disc(provider, disc_mask, tmp_path):  # noqa: F811
    results = run("treecrowns", {"INPUT": str(disc_mask), "OUTPUT": str(tmp_path / "crowns")})

    assert results["OUTPUT"] == str(tmp_path / "crowns.gpkg") and results["CROWNS"] == 2
    names, crowns = vector_rows(results["OUTPUT"])
    assert {"crown_id", "cluster", "area_m2", "diameter_m"} <= set(names)
    disc_area = np.pi * (CROWN_RADIUS * PIXEL) ** 2
    assert sorted(crown["crown_id"] for crown in crowns) == [1, 2]
    assert all(crown["area_m2"] == pytest.approx(disc_area, rel=0.1) for crown in crowns)


def test_evaluate_against_a_geopackage_of_boxes(provider, small_scene, disc_mask, tmp_path):  # noqa: F811
    image, _ = small_scene
    boxes = write_boxes(tmp_path / "boxes.gpkg", crown_boxes())

    results = run("evaluate", {"PREDICTION": str(disc_mask), "REFERENCE": str(boxes), "IMAGE": str(image),
                               "OUTPUT_FOLDER": str(tmp_path / "report")})

    assert results["PIXEL_PRECISION"] == 1.0 and 0.5 < results["PIXEL_RECALL"] < 1.0
    assert results["BOX_RECALL"] == 1.0 and results["IN_BOX_PRECISION"] == 1.0
    assert results["CROWN_RECALL"] == 1.0 and results["CROWN_F1"] == 1.0
    assert "MIOU" not in results and "PIXEL_ACCURACY" not in results
    assert Path(results["OUTPUT_HTML"]) == tmp_path / "report" / "mask_evaluation.html"
    assert "<img" in Path(results["OUTPUT_HTML"]).read_text()
    assert Path(results["OUTPUT_CSV"]).read_text().startswith("measure,value")


def test_teach_refuses_example_points_without_a_crs(provider, tiny_model_dir, small_scene, tmp_path):  # noqa: F811
    from qgis.core import (
        QgsCoordinateReferenceSystem,
        QgsFeature,
        QgsGeometry,
        QgsPointXY,
        QgsProcessingException,
        QgsVectorLayer,
    )

    path, _ = small_scene
    points = QgsVectorLayer("Point?field=is_tree:integer", "examples", "memory")
    points.setCrs(QgsCoordinateReferenceSystem())
    assert not points.crs().isValid()
    for row, col, is_tree in [(*CROWN_CENTRES[0], 1), (120, 96, 0)]:
        feature = QgsFeature(points.fields())
        feature.setGeometry(QgsGeometry.fromPointXY(QgsPointXY(*to_map(row, col))))
        feature["is_tree"] = is_tree
        points.dataProvider().addFeatures([feature])
    with pytest.raises(QgsProcessingException, match=r"The example points have no CRS, and the raster has one "
                                                     r"\(EPSG:32617\)"):
        run("teach", {"INPUT": str(path), "EXAMPLES": points, "MODEL_ID": str(tiny_model_dir), "DEVICE": "cpu",
                      "THRESHOLD": 0.6, "OUTPUT_SIMILARITY": str(tmp_path / "a" / "similarity.tif"),
                      "OUTPUT_TREES": str(tmp_path / "a" / "trees.tif")})
    assert not (tmp_path / "a").exists() or list((tmp_path / "a").iterdir()) == []


def test_teach_on_a_rotated_raster_puts_the_points_on_the_pixels_the_dock_would_use(
        provider, tiny_model_dir, tmp_path):  # noqa: F811
    """Processing's teach and the dock's clicks share one point-to-pixel mapping (the file's geotransform):
    points in another CRS on a rotated raster come back at the pixels they were put on, and teach runs there."""
    from qgis.core import QgsGeometry, QgsPointXY, QgsProcessingContext, QgsProcessingFeedback, QgsRasterLayer

    from treeseg_qgis.qgis_side.processing.teach_trees import pixel_examples
    from treeseg_qgis.qgis_side.raster_input import RasterGrid

    x0, y0, size, shear = 404211.9, 3285142.9, 0.1, 0.03
    rotated = (x0, size, shear, y0, shear, -size)
    image, _ = disc_scene(128, 192, CROWN_CENTRES, radius=CROWN_RADIUS, seed=3)
    path = write_geotiff(tmp_path / "rotated.tif", image, geotransform=rotated)
    put = [(48.5, 64.5, 1), (144.5, 64.5, 1), (96.5, 120.5, 0)]  # (col, row, is_tree): the crowns, the soil
    utm = [QgsPointXY(x0 + col * size + row * shear, y0 + col * shear - row * size) for col, row, _ in put]
    points = wgs84_memory_layer("Point", "examples", [QgsGeometry.fromPointXY(point) for point in utm],
                                [{"is_tree": is_tree} for _, _, is_tree in put])

    examples = pixel_examples(QgsRasterLayer(str(path), "rotated"), points, "is_tree", QgsProcessingContext(),
                              QgsProcessingFeedback())

    assert [kind for _, _, kind in examples] == [bool(kind) for _, _, kind in put]
    got = [value for col, row, _ in examples for value in (col, row)]
    assert got == pytest.approx([value for col, row, _ in put for value in (col, row)], abs=1e-3)
    grid = RasterGrid.of_file(str(path))
    assert [value for point in utm for value in grid.pixel(point)] == pytest.approx(got, abs=1e-3)

    result = run("teach", {"INPUT": str(path), "EXAMPLES": points, "MODEL_ID": str(tiny_model_dir),
                           "DEVICE": "cpu", "THRESHOLD": 0.5, "OUTPUT_SIMILARITY": str(tmp_path / "s.tif"),
                           "OUTPUT_TREES": str(tmp_path / "t.tif")})
    scores = read_raster(result["OUTPUT_SIMILARITY"])
    assert all((scores[int(row), int(col)] > 0.5) == bool(kind) for col, row, kind in put)
    assert gdal.Open(result["OUTPUT_TREES"]).GetGeoTransform() == pytest.approx(rotated)


def test_example_points_on_a_raster_without_georeferencing_land_where_qgis_draws_its_pixels(tmp_path):
    """QGIS draws a raster without a geotransform with pixels of 1 × -1 (rows downwards from y = 0); points
    digitised on it come back at those pixels, not mirrored off the raster by GDAL's default geotransform."""
    from qgis.core import (
        QgsFeature,
        QgsGeometry,
        QgsPointXY,
        QgsProcessingContext,
        QgsProcessingFeedback,
        QgsRasterLayer,
        QgsVectorLayer,
    )

    from treeseg_qgis.qgis_side.processing.teach_trees import pixel_examples

    path = str(tmp_path / "plain.tif")
    created = gdal.GetDriverByName("GTiff").Create(path, 60, 40, 3, gdal.GDT_Byte)
    created.FlushCache()
    del created  # closes the file
    layer = QgsRasterLayer(path, "plain")
    assert layer.extent().yMaximum() == 0 and layer.extent().yMinimum() == -40  # as QGIS draws it
    points = QgsVectorLayer("Point?field=is_tree:integer", "examples", "memory")
    put = [(12.5, 7.5, 1), (50.5, 30.5, 0)]  # (col, row, is_tree)
    for col, row, is_tree in put:
        feature = QgsFeature(points.fields())
        feature.setGeometry(QgsGeometry.fromPointXY(QgsPointXY(col, -row)))
        feature["is_tree"] = is_tree
        points.dataProvider().addFeatures([feature])

    examples = pixel_examples(layer, points, "is_tree", QgsProcessingContext(), QgsProcessingFeedback())

    assert examples == [(pytest.approx(col), pytest.approx(row), bool(is_tree)) for col, row, is_tree in put]


def test_evaluate_against_a_reference_without_trees_leaves_out_recall_and_warns(provider, disc_mask,  # noqa: F811
                                                                                tmp_path):
    import processing
    from qgis.core import QgsProcessingFeedback

    class Recording(QgsProcessingFeedback):
        def __init__(self):
            super().__init__()
            self.errors = []

        def reportError(self, error, fatalError=False):  # noqa: N802, N803 (Qt's names)
            self.errors.append(error)

    boxes = write_boxes(tmp_path / "boxes.gpkg", [])
    feedback = Recording()
    results = processing.run("treeseg:evaluate", {"PREDICTION": str(disc_mask), "REFERENCE": str(boxes),
                                                  "OUTPUT_FOLDER": str(tmp_path / "report")}, feedback=feedback)

    assert "PIXEL_RECALL" not in results and "BOX_RECALL" not in results and "CROWN_RECALL" not in results
    assert results["PIXEL_PRECISION"] == 0.0
    assert any(error.startswith("The reference has no trees") for error in feedback.errors), feedback.errors


def test_evaluate_exports_a_memory_reference_in_another_crs(provider, disc_mask, tmp_path):  # noqa: F811
    from qgis.core import QgsGeometry, QgsRectangle

    reference = wgs84_memory_layer("Polygon", "reference crowns",
                                   [QgsGeometry.fromRect(QgsRectangle(*box)) for box in crown_boxes()])

    results = run("evaluate", {"PREDICTION": str(disc_mask), "REFERENCE": reference,
                               "OUTPUT_FOLDER": str(tmp_path / "report")})

    assert results["BOX_RECALL"] == 1.0 and results["PIXEL_PRECISION"] == pytest.approx(1.0, abs=0.01)
    assert Path(results["OUTPUT_HTML"]).is_file()


def test_evaluate_a_cluster_raster_against_classes(provider, small_scene, disc_mask, tmp_path):  # noqa: F811
    _, crowns = small_scene
    classes = write_geotiff(tmp_path / "classes.tif", np.where(crowns, 1, 2)[None].astype(np.uint8))
    clusters = write_geotiff(tmp_path / "clusters.tif", np.where(crowns, 0, 1)[None].astype(np.uint8))

    results = run("evaluate", {"PREDICTION": str(disc_mask), "REFERENCE": str(classes), "CLUSTERS": str(clusters),
                               "OUTPUT_FOLDER": str(tmp_path / "report")})

    assert results["PIXEL_IOU"] == 1.0 and results["MIOU"] == 1.0 and results["PIXEL_ACCURACY"] == 1.0
    assert "CROWN_F1" not in results and "BOX_RECALL" not in results


def test_only_plain_single_layer_files_are_read_directly(qgis_processing, tmp_path):
    from qgis.core import QgsVectorLayer

    from treeseg_qgis.qgis_side.processing.evaluate_segmentation import single_layer_file

    one = write_boxes(tmp_path / "one.gpkg", crown_boxes())
    two = write_boxes(tmp_path / "two.gpkg", crown_boxes(), layers=2)
    filtered = QgsVectorLayer(str(one), "filtered", "ogr")
    filtered.setSubsetString("fid = 1")

    assert single_layer_file(QgsVectorLayer(str(one), "one", "ogr")) == str(one)
    assert single_layer_file(QgsVectorLayer(f"{two}|layername=boxes1", "two", "ogr")) is None
    assert single_layer_file(filtered) is None
    assert single_layer_file(QgsVectorLayer("Polygon?crs=EPSG:4326", "memory", "memory")) is None


def test_the_provider_lists_the_algorithms_in_their_groups(provider):  # noqa: F811
    groups = {algorithm.id(): algorithm.group() for algorithm in provider.algorithms()}
    assert groups == {"treeseg:segmenttrees": "Segmentation", "treeseg:teach": "Segmentation",
                      "treeseg:teachclasses": "Segmentation", "treeseg:treecrowns": "Segmentation",
                      "treeseg:evaluate": "Quality", "treeseg:fitclustermodel": "Surveys",
                      "treeseg:applyclustermodel": "Surveys", "treeseg:applyclassifier": "Surveys"}


def test_help_wraps_as_paragraphs_and_the_batch_dialog_starts_with_the_essentials(provider):  # noqa: F811
    from qgis.core import QgsProcessingDestinationParameter, QgsProcessingParameterDefinition

    for algorithm in provider.algorithms():
        assert "\n" not in algorithm.shortHelpString() and "<p>" in algorithm.shortHelpString()
    for name in ("segmenttrees", "teach", "teachclasses", "treecrowns", "fitclustermodel", "applyclustermodel",
                 "applyclassifier"):
        descriptions = [parameter.description() for parameter in provider.algorithm(name).parameterDefinitions()]
        assert max(map(len, descriptions)) <= 36, descriptions
    segment = provider.algorithm("segmenttrees")
    essentials = [parameter.name() for parameter in segment.parameterDefinitions()
                  if not parameter.flags() & QgsProcessingParameterDefinition.Flag.FlagAdvanced]
    assert essentials == ["INPUT", "BANDS", "EXTENT", "MASK", "RESOLUTION", "MODEL", "STRIDE", "CLUSTERS",
                          "ALLOW_UNTRAINED", "OUTPUT_CLUSTERS", "OUTPUT_TREES", "OUTPUT_POLYGONS"]
    advanced = {parameter.name() for parameter in segment.parameterDefinitions()} - set(essentials)
    assert {"MODEL_ID", "DEVICE", "METHOD", "TREE_CLUSTERS", "OUTPUT_CROWNS", "OUTPUT_FEATURES",
            "OUTPUT_HEIGHT"} <= advanced
    assert all(isinstance(segment.parameterDefinition(name), QgsProcessingDestinationParameter)
               for name in essentials[-3:])


SCRIPTING_INTERFACE = {  # algorithm id: (group id, parameter names in order, output name:type)
    "treeseg:segmenttrees": (
        "segmentation",
        "INPUT BANDS EXTENT MASK RESOLUTION MODEL MODEL_ID STRIDE CLUSTERS DEVICE PRECISION ALLOW_UNTRAINED METHOD "
        "K_MIN K_MAX TREE_CLUSTERS CROWN_MIN_AREA MIN_TREE_HEIGHT HEIGHT_MODEL OUTPUT_CLUSTERS OUTPUT_TREES "
        "OUTPUT_POLYGONS OUTPUT_CROWNS OUTPUT_FEATURES OUTPUT_HEIGHT",
        "OUTPUT_CLUSTERS:outputRaster OUTPUT_TREES:outputRaster OUTPUT_POLYGONS:outputVector "
        "OUTPUT_CROWNS:outputVector OUTPUT_FEATURES:outputRaster OUTPUT_HEIGHT:outputRaster K:outputNumber "
        "TREE_COVER:outputNumber CROWNS:outputNumber MODEL_USED:outputString UNTRAINED:outputBoolean "
        "RUN_RECORD:outputFile"),
    "treeseg:applyclustermodel": (
        "surveys",
        "INPUT CLUSTER_MODEL BANDS EXTENT MASK RESOLUTION MODEL MODEL_ID STRIDE DEVICE PRECISION ALLOW_UNTRAINED "
        "METHOD CROWN_MIN_AREA MIN_TREE_HEIGHT HEIGHT_MODEL OUTPUT_CLUSTERS OUTPUT_TREES OUTPUT_POLYGONS "
        "OUTPUT_CROWNS OUTPUT_FEATURES OUTPUT_HEIGHT",
        "OUTPUT_CLUSTERS:outputRaster OUTPUT_TREES:outputRaster OUTPUT_POLYGONS:outputVector "
        "OUTPUT_CROWNS:outputVector OUTPUT_FEATURES:outputRaster OUTPUT_HEIGHT:outputRaster K:outputNumber "
        "TREE_COVER:outputNumber CROWNS:outputNumber MODEL_USED:outputString UNTRAINED:outputBoolean "
        "RUN_RECORD:outputFile"),
    "treeseg:applyclassifier": (
        "surveys",
        "INPUT CLUSTER_MODEL CLASSIFIER MODEL MODEL_ID STRIDE DEVICE PRECISION ALLOW_UNTRAINED OUTPUT_CLASSES "
        "OUTPUT_CLASS_PROBABILITIES OUTPUT_CLASS_POLYGONS",
        "OUTPUT_CLASSES:outputRaster OUTPUT_CLASS_PROBABILITIES:outputRaster OUTPUT_CLASS_POLYGONS:outputVector "
        "FEATURE_CACHE:outputString TEACH_RECORD:outputFile"),
    "treeseg:fitclustermodel": (
        "surveys",
        "INPUTS MODEL MODEL_ID STRIDE CLUSTERS DEVICE PRECISION ALLOW_UNTRAINED OUTPUT",
        "OUTPUT:outputFile K:outputNumber"),
    "treeseg:teach": (
        "segmentation",
        "INPUT EXAMPLES IS_TREE_FIELD CLASS_NAME THRESHOLD MODEL MODEL_ID STRIDE DEVICE PRECISION ALLOW_UNTRAINED "
        "OUTPUT_SIMILARITY OUTPUT_TREES",
        "OUTPUT_SIMILARITY:outputRaster OUTPUT_TREES:outputRaster TREE_COVER:outputNumber "
        "THRESHOLD_USED:outputNumber FEATURE_CACHE:outputString TEACH_RECORD:outputFile"),
    "treeseg:teachclasses": (
        "segmentation",
        "INPUT EXAMPLES CLASS_FIELD MODEL MODEL_ID STRIDE DEVICE PRECISION ALLOW_UNTRAINED OUTPUT_CLASSES "
        "OUTPUT_CLASS_PROBABILITIES OUTPUT_CLASS_POLYGONS",
        "OUTPUT_CLASSES:outputRaster OUTPUT_CLASS_PROBABILITIES:outputRaster OUTPUT_CLASS_POLYGONS:outputVector "
        "FEATURE_CACHE:outputString TEACH_RECORD:outputFile"),
    "treeseg:treecrowns": (
        "segmentation",
        "INPUT CLUSTERS MIN_AREA MIN_DISTANCE SMOOTHING MAX_CROWN OUTPUT",
        "OUTPUT:outputVector CROWNS:outputNumber"),
    "treeseg:evaluate": (
        "quality",
        "PREDICTION REFERENCE IMAGE CLUSTERS TREE_CLASS OUTPUT_FOLDER",
        "OUTPUT_FOLDER:outputFolder OUTPUT_HTML:outputHtml OUTPUT_CSV:outputFile PIXEL_PRECISION:outputNumber "
        "PIXEL_RECALL:outputNumber PIXEL_F1:outputNumber PIXEL_IOU:outputNumber CROWN_PRECISION:outputNumber "
        "CROWN_RECALL:outputNumber CROWN_F1:outputNumber BOX_RECALL:outputNumber IN_BOX_PRECISION:outputNumber "
        "TREE_COVER:outputNumber CENTROID_BOX_RECALL:outputNumber MIOU:outputNumber PIXEL_ACCURACY:outputNumber"),
}


def test_the_names_models_and_scripts_use_stay_as_they_are(provider):  # noqa: F811
    """Group ids, parameter names and output names and types: what saved models and qgis_process calls name.
    None may go, be renamed or change places; a new parameter or output may join (it has a default)."""
    interface = {algorithm.id(): (
        algorithm.groupId(),
        [parameter.name() for parameter in algorithm.parameterDefinitions()],
        [f"{output.name()}:{output.type()}" for output in algorithm.outputDefinitions()],
    ) for algorithm in provider.algorithms()}
    assert sorted(interface) == sorted(SCRIPTING_INTERFACE)
    for algorithm_id, (group, parameters, outputs) in SCRIPTING_INTERFACE.items():
        now_group, now_parameters, now_outputs = interface[algorithm_id]
        assert now_group == group, algorithm_id
        assert in_order(parameters.split(), now_parameters), (algorithm_id, now_parameters)
        assert in_order(outputs.split(), now_outputs), (algorithm_id, now_outputs)


def in_order(pinned: list[str], now: list[str]) -> bool:
    """Every pinned name is still there, in the same order (others may stand between them)."""
    remaining = iter(now)
    return all(name in remaining for name in pinned)


@pytest.mark.parametrize("method", ["dinov3", "rgb-kmeans"])
def test_a_stride_left_empty_is_the_command_lines_default_for_the_method(
        provider, tiny_model_dir, scene_tif, tmp_path, method):  # noqa: F811 - provider: the fixture
    """The same method gives the same run from Processing and the CLI: 16 for DINOv3, per pixel for a colour
    baseline."""
    from treeseg_qgis.engine.cli import build_parser, params_from_args

    path, _ = scene_tif
    out = tmp_path / "out"
    results = run("segmenttrees", {
        "INPUT": str(path), "MODEL_ID": str(tiny_model_dir), "METHOD": method, "CLUSTERS": 2, "DEVICE": "cpu",
        "OUTPUT_CLUSTERS": str(out / "c.tif"), "OUTPUT_TREES": str(out / "t.tif"),
        "OUTPUT_POLYGONS": str(out / "p.gpkg")})
    command_line = params_from_args(build_parser().parse_args(["segment", str(path), "--out", str(out),
                                                               "--method", method]))

    assert json.loads(Path(results["RUN_RECORD"]).read_text())["stride"] == command_line.stride
    assert command_line.stride == (16 if method == "dinov3" else 1)
