"""Individual crowns: the split on known discs, the windowed GeoPackage writer and the pipeline option."""

import math

import numpy as np
import pytest
from osgeo import ogr

from treeseg_qgis.engine.core.crowns import CrownOptions, split_crowns
from treeseg_qgis.engine.gis import crowns as crown_writer
from treeseg_qgis.engine.pipeline import segment
from treeseg_qgis.params import SegmentationParams

from .conftest import write_geotiff

CENTRES = [(100, 100), (100, 160), (200, 200), (60, 250), (230, 60)]
RADIUS = 30


def discs(shape=(300, 300), centres=CENTRES, radius=RADIUS) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    mask = np.zeros(shape, bool)
    for cy, cx in centres:
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    return mask


def pixel_options(min_radius_m: float) -> CrownOptions:
    """Options for 1 m pixels: crowns of at least 50 pixels, centres at least 10 pixels apart."""
    return CrownOptions(min_area_m2=50, min_distance_m=10, smoothing_m=1.0, min_radius_m=min_radius_m)


def test_touching_discs_are_split_into_one_crown_each():
    labels, centres = split_crowns(discs(), pixel_options(min_radius_m=3), pixel_m=1.0)
    sizes = np.bincount(labels.ravel())[1:]
    assert len(centres) == len(CENTRES) and (sizes > 0).sum() == len(CENTRES)
    assert sizes == pytest.approx([math.pi * RADIUS**2] * len(CENTRES), rel=0.1)
    for cy, cx in CENTRES:
        assert labels[cy, cx] > 0


def test_small_specks_are_not_crowns():
    mask = discs()
    mask[5:8, 5:8] = True
    labels, _ = split_crowns(mask, pixel_options(min_radius_m=1), pixel_m=1.0)
    assert labels[6, 6] == 0


def write_masks(tmp_path, mask):
    trees = write_geotiff(tmp_path / "trees.tif", mask.astype(np.uint8)[None])
    clusters = write_geotiff(tmp_path / "clusters.tif", np.where(mask, 0, 1).astype(np.uint8)[None])
    return trees, clusters


@pytest.mark.parametrize("block", [1024, 96])
def test_crown_polygons_carry_metric_fields_and_no_crown_is_written_twice(tmp_path, monkeypatch, block):
    monkeypatch.setattr(crown_writer, "BLOCK", block)
    trees, clusters = write_masks(tmp_path, discs())
    count = crown_writer.write_crowns(str(trees), str(clusters), str(tmp_path / "crowns.gpkg"), "crowns",
                                      crown_writer.CrownOptions(min_area_m2=0.5, min_distance_m=1.0,
                                                                smoothing_m=0.1, max_crown_m=8.0))
    assert count == len(CENTRES)
    source = ogr.Open(str(tmp_path / "crowns.gpkg"))
    features = list(source.GetLayer(0))
    assert sorted({feature["crown_id"] for feature in features}) == list(range(1, len(CENTRES) + 1))
    for feature in features:
        assert feature["cluster"] == 0
        assert feature["area_m2"] == pytest.approx(math.pi * (RADIUS * 0.1) ** 2, rel=0.15)
        assert feature["diameter_m"] == pytest.approx(2 * RADIUS * 0.1, rel=0.1)
        assert feature["perimeter_m"] > 0 and feature["centroid_x"] > 404211


def test_cancelled_crowns_leave_no_file(tmp_path):
    trees, clusters = write_masks(tmp_path, discs())
    with pytest.raises(Exception, match="Cancelled"):
        crown_writer.write_crowns(str(trees), str(clusters), str(tmp_path / "crowns.gpkg"), "crowns",
                                  is_cancelled=lambda: True)
    assert not list(tmp_path.glob("crowns*.gpkg"))


def test_pipeline_writes_crowns_on_request(tiny_model_dir, scene_tif, tmp_path):
    path, _ = scene_tif
    record = segment(SegmentationParams(input_path=str(path), output_dir=str(tmp_path / "out"),
                                        model=str(tiny_model_dir), device="cpu", clusters=2, crowns=True,
                                        crown_min_area_m2=1.0))
    assert record.crowns >= 4
    source = ogr.Open(record.outputs["crowns"])
    assert source.GetLayer(0).GetFeatureCount() >= record.crowns
