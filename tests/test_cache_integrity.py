"""A cache that cannot lie (issue 20): the key covers a VRT's sources, the weight files and in-place
rewrites; a corrupt entry is discarded and rebuilt; concurrent runs share one entry; an unusable
cache folder turns the cache off for the run with a warning; nothing unfinished is left."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from osgeo import gdal

from treeseg_qgis.engine.core.errors import Cancelled, ModelUnavailableError
from treeseg_qgis.engine.core.progress import Progress
from treeseg_qgis.engine.pipeline import segment
from treeseg_qgis.params import SegmentationParams
from treeseg_qgis.run_record import RunRecord

from .conftest import REPO, disc_scene, write_geotiff

gdal.UseExceptions()


@pytest.fixture
def run(tiny_model_dir, tmp_path):
    image, _ = disc_scene(160, 160, [(80, 80)], radius=40)
    path = write_geotiff(tmp_path / "in.tif", image)

    def segment_with(**options) -> RunRecord:
        values = dict(input_path=str(path), output_dir=str(tmp_path / "out"), model=str(tiny_model_dir),
                      device="cpu", clusters=2, tile_size=128, overlap=32, cache_dir=str(tmp_path / "cache"))
        values.update(options)
        return segment(SegmentationParams(**values))

    return segment_with, path, tmp_path / "cache"


def state(record) -> str:
    return record.feature_cache.state


def entries(cache: Path) -> list[str]:
    return sorted(path.name for path in cache.iterdir()) if cache.exists() else []


def test_swapped_weights_in_the_same_folder_are_a_miss(run, tmp_path):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    folder = tmp_path / "model"

    def save(hidden: int) -> None:
        torch.manual_seed(hidden)
        DINOv3ViTModel(DINOv3ViTConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=128, patch_size=16, num_register_tokens=4)
                       ).save_pretrained(folder)

    segment_with, _, _ = run
    save(64)
    assert state(segment_with(model=str(folder))) == "miss"
    assert state(segment_with(model=str(folder))) == "hit"
    save(32)
    swapped = segment_with(model=str(folder))
    assert state(swapped) == "miss" and swapped.model.details["feature_dim"] == 32


def test_a_vrt_whose_source_changed_is_a_miss(run, tmp_path):
    segment_with, path, _ = run
    vrt = tmp_path / "mosaic.vrt"
    gdal.BuildVRT(str(vrt), [str(path)]).FlushCache()
    first = segment_with(input_path=str(vrt))
    assert state(first) == "miss" and first.trees.tree_cover > 0.05
    write_geotiff(path, np.full((3, 160, 160), 128, np.uint8))
    grey = segment_with(input_path=str(vrt))
    assert state(grey) == "miss" and grey.trees.tree_cover == 0.0


def test_a_same_size_rewrite_with_its_time_restored_is_a_miss(run):
    segment_with, path, _ = run
    assert state(segment_with()) == "miss"
    times = os.stat(path)
    image, _ = disc_scene(160, 160, [(40, 40)], radius=30, seed=5)
    size = path.stat().st_size
    write_geotiff(path, image)
    assert path.stat().st_size == size
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert state(segment_with()) == "miss"


@pytest.mark.parametrize("damage", ["truncated tile", "deleted tile", "invalid summary", "incomplete summary",
                                    "truncated samples"])
def test_a_corrupt_entry_is_discarded_with_a_warning_and_rebuilt(run, damage, caplog):
    segment_with, _, cache = run
    assert state(segment_with()) == "miss"
    (entry,) = [path for path in cache.iterdir() if path.is_dir()]
    tile = sorted(entry.glob("tile_*.npz"))[0]
    if damage == "truncated tile":
        tile.write_bytes(tile.read_bytes()[:100])
    elif damage == "deleted tile":
        tile.unlink()
    elif damage == "invalid summary":
        (entry / "features.json").write_text("{not json")
    elif damage == "incomplete summary":
        (entry / "features.json").write_text(json.dumps({"extractor": {"stride": 16}}))
    else:
        (entry / "samples.npz").write_bytes((entry / "samples.npz").read_bytes()[:50])
    rebuilt = segment_with()
    assert state(rebuilt) == "miss" and "discarded, extracting again" in caplog.text
    assert state(segment_with()) == "hit"


def test_an_unusable_cache_folder_turns_the_cache_off_with_a_warning(run, tmp_path, monkeypatch, caplog):
    from treeseg_qgis.engine.core import cache as cache_module

    segment_with, _, _ = run
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    record = segment_with(cache_dir=str(blocker / "cache"))
    assert state(record) == "off" and "feature cache is off for this run" in caplog.text
    caplog.clear()
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: SimpleNamespace(free=1024))
    full = segment_with(cache_dir=str(tmp_path / "full"))
    assert state(full) == "off" and "not enough free space" in caplog.text and entries(tmp_path / "full") == []


def test_a_cancelled_or_failed_run_leaves_no_unfinished_entry(run, tiny_model_dir, tmp_path):
    segment_with, path, cache = run
    seen = []
    with pytest.raises(Cancelled):
        segment(SegmentationParams(input_path=str(path), output_dir=str(tmp_path / "out"), model=str(tiny_model_dir),
                                   device="cpu", clusters=2, tile_size=128, overlap=32, cache_dir=str(cache)),
                Progress(lambda percent, text: seen.append(text), lambda: any("Extracting" in t for t in seen)))
    assert entries(cache) == []
    (tmp_path / "notdino").mkdir()
    (tmp_path / "notdino" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelUnavailableError):
        segment_with(model=str(tmp_path / "notdino"))
    assert entries(cache) == []


def test_two_runs_on_one_new_raster_at_once_share_one_entry(tiny_model_dir, tmp_path):
    image, _ = disc_scene(256, 256, [(128, 128)], radius=50)
    path = write_geotiff(tmp_path / "in.tif", image)
    environment = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    runs = [subprocess.Popen([sys.executable, "-m", "treeseg_qgis", "segment", str(path), "--out",
                              str(tmp_path / f"out{index}"), "--model", str(tiny_model_dir), "--device", "cpu",
                              "--clusters", "2", "--tile-size", "128", "--cache-dir", str(tmp_path / "cache"),
                              "--quiet"], env=environment, stderr=subprocess.PIPE, text=True)
            for index in range(2)]
    for process in runs:
        assert process.wait(timeout=300) == 0, process.stderr.read()
    states = sorted(json.loads((tmp_path / f"out{index}" / "in_run.json").read_text())["feature_cache"]["state"]
                    for index in range(2))
    assert states == ["hit", "miss"]
    assert [name for name in entries(tmp_path / "cache") if ".building" in name] == []
