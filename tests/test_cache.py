"""The feature cache: a re-run with other clustering settings skips the model and agrees with a fresh run."""

import os
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal

from treeseg_qgis.engine.core.cache import FeatureCache
from treeseg_qgis.engine.core.models import load_backbone
from treeseg_qgis.engine.pipeline import segment
from treeseg_qgis.params import AUTO, SegmentationParams

from .conftest import disc_scene, write_geotiff


def labels(record) -> np.ndarray:
    dataset = gdal.Open(record.outputs["clusters"])
    return dataset.GetRasterBand(1).ReadAsArray()


@pytest.fixture
def params(tiny_model_dir, scene_tif, tmp_path):
    path, _ = scene_tif

    def build(**options):
        values = dict(input_path=str(path), output_dir=str(tmp_path / "out"), model=str(tiny_model_dir),
                      device="cpu", cache_dir=str(tmp_path / "cache"), tile_size=128, overlap=32)
        values.update(options)
        return SegmentationParams(**values)

    return build


def test_rerun_with_other_k_skips_the_model_and_matches_a_fresh_run(params, tiny_model_dir):
    loads = []

    def counting_loader(wanted):
        loads.append(wanted.model)
        return load_backbone(wanted.model, device="cpu")

    first = segment(params(clusters=2), load_model=counting_loader)
    assert first.feature_cache.state == "miss" and loads == [str(tiny_model_dir)]
    again = segment(params(clusters=3, output_dir=params().output_dir + "2"), load_model=counting_loader)
    assert again.feature_cache.state == "hit" and len(loads) == 1
    assert first.feature_cache.folder == again.feature_cache.folder  # the entry, not its building folder
    assert Path(first.feature_cache.folder).is_dir() and ".building" not in first.feature_cache.folder
    assert "features" not in again.timings and again.model.model_id == str(tiny_model_dir)
    fresh = segment(params(clusters=3, use_cache=False, output_dir=params().output_dir + "3"))
    assert fresh.feature_cache.state == "off"
    assert np.mean(labels(again) == labels(fresh)) > 0.99


def test_a_changed_input_file_is_a_miss(params, scene_tif):
    path, _ = scene_tif
    assert segment(params(clusters=2)).feature_cache.state == "miss"
    image, _ = disc_scene(320, 400, [(100, 100)], radius=40, seed=9)
    write_geotiff(path, image)
    os.utime(path, ns=(1, 10**18))
    assert segment(params(clusters=2)).feature_cache.state == "miss"


def test_untrained_features_are_not_reused(scene_tif, tmp_path):
    path, _ = scene_tif
    options = dict(input_path=str(path), output_dir=str(tmp_path / "out"), model="small", device="cpu",
                   allow_untrained=True, clusters=2, cache_dir=str(tmp_path / "cache"))
    assert segment(SegmentationParams(**options)).feature_cache.state == "miss"
    assert segment(SegmentationParams(**options)).feature_cache.state == "miss"


def test_least_recently_used_entries_go_past_the_cap(tmp_path):
    cache = FeatureCache(tmp_path / "cache", max_megabytes=1)
    stores = []
    for index in range(3):
        entry = cache.open({"entry": index})
        (entry.store.folder / "tile_0_0.npz").write_bytes(b"x" * 400_000)
        entry.store.save_samples(np.zeros((4, 2)), np.zeros(4), {"stride": 16, "cell_size": 16})
        entry.publish()
        entry.close()
        os.utime(entry.final, (index + 1, index + 1))
        stores.append(entry.final)
    removed = cache.evict(keep=stores[0])
    assert removed == [stores[1]] and stores[0].exists() and stores[2].exists()
    cache.clear()
    assert cache.size_bytes() == 0


def test_auto_k_writes_the_elbow_plot(params):
    record = segment(params(clusters=AUTO, k_min=2, k_max=5))
    elbow = record.outputs["elbow"]
    assert os.path.getsize(elbow) > 1000 and record.clusters.automatic
    fixed = segment(params(clusters=2, output_dir=params().output_dir + "_fixed"))
    assert "elbow" not in fixed.outputs
