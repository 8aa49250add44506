"""The whole pipeline on real GeoTIFFs with a real tiny DINOv3: georeferencing, fields, trees, tiles."""

import json
import math

import numpy as np
import pytest
from osgeo import gdal, ogr

from treeseg_qgis.engine.core.errors import Cancelled
from treeseg_qgis.engine.core.progress import Progress
from treeseg_qgis.engine.pipeline import segment
from treeseg_qgis.params import SegmentationParams
from treeseg_qgis.run_record import RunRecord

from .conftest import disc_scene, write_geotiff

gdal.UseExceptions()


def read_band(path) -> np.ndarray:
    dataset = gdal.Open(str(path))
    return dataset.GetRasterBand(1).ReadAsArray()


def run(tiny_model_dir, input_path, out, **options) -> RunRecord:
    params = SegmentationParams(input_path=str(input_path), output_dir=str(out),
                                model=str(tiny_model_dir), device="cpu", **options)
    return segment(params)


def test_outputs_keep_the_input_georeferencing_and_carry_the_fields(tiny_model_dir, scene_tif, tmp_path):
    path, _ = scene_tif
    record = run(tiny_model_dir, path, tmp_path / "out", clusters=2)
    source = gdal.Open(str(path))
    for key in ("clusters", "trees"):
        output = gdal.Open(record.outputs[key])
        assert output.GetGeoTransform() == source.GetGeoTransform()
        assert output.GetSpatialRef().IsSame(source.GetSpatialRef())
        assert (output.RasterXSize, output.RasterYSize) == (source.RasterXSize, source.RasterYSize)
        assert output.GetRasterBand(1).GetNoDataValue() == 255
        assert output.GetMetadataItem("TREESEG_WEIGHTS") == "pretrained"
    assert gdal.Open(record.outputs["clusters"]).GetRasterBand(1).GetColorTable() is not None
    polygons = ogr.Open(record.outputs["polygons"])
    layer = polygons.GetLayer(0)
    names = [layer.GetLayerDefn().GetFieldDefn(i).GetName() for i in range(layer.GetLayerDefn().GetFieldCount())]
    assert {"cluster", "is_tree", "area_m2"} <= set(names)
    assert layer.GetSpatialRef().IsSame(source.GetSpatialRef())
    total = sum(feature["area_m2"] for feature in layer)
    assert total == pytest.approx(320 * 400 * 0.01, rel=1e-6)
    saved = json.loads((tmp_path / "out" / "scene_run.json").read_text())
    assert saved["model"]["untrained"] is False and saved["clusters"]["k"] == 2
    assert saved["model"]["model_id"] == str(tiny_model_dir)


def test_tree_mask_matches_known_crowns(tiny_model_dir, scene_tif, tmp_path):
    # Crowns are 48 px discs. Labels come from 16 px patch features interpolated to
    # pixels, so crown edges may be off by a few pixels: a ±3 px band on a 48 px
    # disc gives IoU (45/51)² ≈ 0.78. We require 0.75.
    path, crowns = scene_tif
    record = run(tiny_model_dir, path, tmp_path / "out", tile_size=128, overlap=32)
    trees = read_band(record.outputs["trees"]) == 1
    iou = (trees & crowns).sum() / (trees | crowns).sum()
    assert iou >= 0.75, f"IoU {iou:.3f}, tree clusters {record['trees']}"
    assert record.trees.tree_cover == pytest.approx(crowns.mean(), abs=0.05)


def test_labels_are_smooth_not_16_px_blocks(tiny_model_dir, scene_tif, tmp_path):
    path, _ = scene_tif
    record = run(tiny_model_dir, path, tmp_path / "out", clusters=2)
    labels = read_band(record.outputs["clusters"])
    changes = np.flatnonzero((labels[:, 1:] != labels[:, :-1]).any(0)) + 1
    on_patch_lines = np.mean(changes % 16 == 0)
    assert len(changes) > 50 and on_patch_lines < 0.25


def test_same_content_in_far_apart_tiles_gets_the_same_cluster(tiny_model_dir, tmp_path):
    image, _ = disc_scene(448, 448, [(60, 60), (150, 170)], radius=40, seed=3)
    other, _ = disc_scene(448, 448, [(300, 100), (120, 330)], radius=30, seed=4)
    big = np.concatenate([np.concatenate([image, other], 2), np.concatenate([other, image], 2)], 1)
    path = write_geotiff(tmp_path / "repeat.tif", big)
    record = run(tiny_model_dir, path, tmp_path / "out", clusters=3, tile_size=256, overlap=32)
    labels = read_band(record.outputs["clusters"])
    first, second = labels[32:416, 32:416], labels[480:864, 480:864]
    assert np.mean(first == second) > 0.97


def test_no_seam_at_tile_borders(tiny_model_dir, tmp_path):
    image, _ = disc_scene(400, 480, [(80, 90), (200, 250), (320, 400), (330, 120), (90, 380)], radius=45, seed=5)
    path = write_geotiff(tmp_path / "seams.tif", image)
    record = run(tiny_model_dir, path, tmp_path / "out", clusters=4, tile_size=128, overlap=32)
    labels = read_band(record.outputs["clusters"])
    column_changes = (labels[:, 1:] != labels[:, :-1]).mean(0)
    borders = np.arange(96, 480, 96)
    assert column_changes[borders - 1].mean() <= 2 * column_changes.mean() + 0.01


def test_nodata_stays_nodata_and_untrained_runs_are_marked(tiny_model_dir, tmp_path):
    image, _ = disc_scene(160, 160, [(80, 80)], radius=40)
    image[:, :, :32] = 0
    path = write_geotiff(tmp_path / "holes.tif", image, nodata=0)
    params = SegmentationParams(input_path=str(path), output_dir=str(tmp_path / "out"),
                                model="small", device="cpu", allow_untrained=True, clusters=2)
    record = segment(params)
    labels = read_band(record.outputs["clusters"])
    assert (labels[:, :32] == 255).all() and (labels[:, 40:] != 255).all()
    assert record.model.untrained is True and "UNTRAINED" in record.warning
    for name, output in record.outputs.items():
        assert "_UNTRAINED_" in output, name
    assert gdal.Open(record.outputs["trees"]).GetMetadataItem("TREESEG_WEIGHTS") == "untrained"
    polygons = ogr.Open(record.outputs["polygons"])
    assert "UNTRAINED" in polygons.GetLayer(0).GetMetadataItem("DESCRIPTION")


def test_cancel_leaves_no_output(tiny_model_dir, scene_tif, tmp_path):
    path, _ = scene_tif
    params = SegmentationParams(input_path=str(path), output_dir=str(tmp_path / "out"),
                                model=str(tiny_model_dir), device="cpu", tile_size=128, overlap=32)
    stages = []

    def cancel_while_assigning() -> bool:
        return bool(stages) and stages[-1].startswith("Assigning")

    with pytest.raises(Cancelled):
        segment(params, Progress(lambda percent, stage: stages.append(stage), cancel_while_assigning))
    assert list((tmp_path / "out").iterdir()) == []


def test_progress_is_monotonic_and_reaches_100(tiny_model_dir, scene_tif, tmp_path):
    path, _ = scene_tif
    seen = []
    params = SegmentationParams(input_path=str(path), output_dir=str(tmp_path / "out"),
                                model=str(tiny_model_dir), device="cpu", clusters=2, tile_size=128, overlap=32)
    segment(params, Progress(lambda percent, stage: seen.append(percent)))
    assert seen == sorted(seen) and seen[-1] == 100.0


@pytest.mark.parametrize("method", ["rgb-kmeans", "exg-otsu"])
def test_colour_baselines_run_through_the_same_pipeline(method, scene_tif, tmp_path):
    path, crowns = scene_tif
    params = SegmentationParams(input_path=str(path), output_dir=str(tmp_path / "out"), method=method, stride=4)
    record = segment(params)
    assert record.method == method and record.model.model_id == f"baseline:{method}"
    assert record.outputs["trees"].endswith(f"scene_{method}_trees.tif")
    trees = read_band(record.outputs["trees"]) == 1
    assert (trees & crowns).sum() / (trees | crowns).sum() > 0.8
    if method == "exg-otsu":
        assert record.clusters.k == 2 and record.trees.clusters == [0]


@pytest.mark.parametrize("stride", [16, 8])
def test_feature_preview_is_an_rgb_geotiff_on_the_feature_grid(tiny_model_dir, scene_tif, tmp_path, stride):
    path, _ = scene_tif
    record = run(tiny_model_dir, path, tmp_path / "out", clusters=2, stride=stride, feature_preview=True)
    image = gdal.Open(record.outputs["features"])
    x0, px, _, y0, _, py = image.GetGeoTransform()
    cells = (math.ceil((400 - 8) / stride), math.ceil((320 - 8) / stride))  # cells centred inside the raster
    assert image.RasterCount == 3 and (image.RasterXSize, image.RasterYSize) == cells
    assert (px, py) == pytest.approx((0.1 * stride, -0.1 * stride))
    assert x0 == pytest.approx(404211.9 + 0.1 * (8 - stride / 2))
    pixels = image.ReadAsArray()
    assert pixels.std(axis=(1, 2)).min() > 5
