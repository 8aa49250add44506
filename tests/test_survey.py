"""Surveys: one cluster model fitted on several real GeoTIFFs with a real tiny DINOv3, applied to each
(`fit`, `segment --cluster-model`, `segment-many`, also on a Dask LocalCluster)."""

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest
from osgeo import gdal, ogr

from treeseg_qgis.engine.cli import EXIT_SOME_FAILED, main
from treeseg_qgis.engine.core.errors import InputError
from treeseg_qgis.engine.core.survey_model import FORMAT_VERSION
from treeseg_qgis.engine.pipeline import segment
from treeseg_qgis.engine.survey import fit_survey
from treeseg_qgis.params import SegmentationParams

from .conftest import REPO, disc_scene, write_geotiff
from .test_gui import load_scaled

gdal.UseExceptions()
SMALL_TILES = {"tile_size": 128, "overlap": 32}


def scene(path, seed, centres=((70, 80), (90, 300), (220, 180), (250, 340))):
    image, _ = disc_scene(320, 400, centres, radius=44, seed=seed)
    return write_geotiff(path, image)


def params_for(tiny_model_dir, input_path, out, cache, **options) -> SegmentationParams:
    return SegmentationParams(input_path=str(input_path), output_dir=str(out), model=str(tiny_model_dir),
                              device="cpu", cache_dir=str(cache), **SMALL_TILES, **options)


def labels(path) -> np.ndarray:
    dataset = gdal.Open(str(path))
    return dataset.GetRasterBand(1).ReadAsArray()


def polygon_sources(path) -> list[str]:
    dataset = ogr.Open(str(path))
    return sorted(feature["source"] for feature in dataset.GetLayer(0))


def polygon_shapes(path) -> list[tuple]:
    dataset = ogr.Open(str(path))
    return sorted((feature["cluster"], feature.GetGeometryRef().ExportToWkt()) for feature in dataset.GetLayer(0))


def polygon_count(path) -> int:
    dataset = ogr.Open(str(path))
    return dataset.GetLayer(0).GetFeatureCount()


@pytest.fixture
def survey(tmp_path, tiny_model_dir):
    """Two different scenes and the cluster model fitted on both."""
    first = scene(tmp_path / "north.tif", seed=1)
    second = scene(tmp_path / "south.tif", seed=2, centres=((60, 60), (200, 250)))
    model = tmp_path / "survey.treeseg"
    fit_survey([str(first), str(second)], params_for(tiny_model_dir, "", tmp_path, tmp_path / "cache"), model)
    return first, second, model


def test_the_same_content_under_two_names_gets_identical_labels_and_one_legend(survey, tmp_path, tiny_model_dir):
    first, second, model = survey
    copy = shutil.copy(first, tmp_path / "north_again.tif")
    cache = tmp_path / "cache"
    records = {path.stem: segment(params_for(tiny_model_dir, path, tmp_path / "out", cache,
                                             cluster_model=str(model)))
               for path in (first, copy, second)}
    assert np.array_equal(labels(records["north"].outputs["clusters"]),
                          labels(records["north_again"].outputs["clusters"]))
    legend = {(r.clusters.k, tuple(r.trees.clusters), r.cluster_model.projection)
              for r in records.values()}
    assert len(legend) == 1
    assert records["north"].clusters.k >= 2
    assert labels(records["south"].outputs["clusters"]).max() < records["north"].clusters.k
    # A re-run reuses the survey-projected features; a per-raster run never takes them for its own.
    again = segment(params_for(tiny_model_dir, first, tmp_path / "out", cache, cluster_model=str(model)))
    assert again.feature_cache.state == "hit"
    assert np.array_equal(labels(again.outputs["clusters"]), labels(records["north"].outputs["clusters"]))
    alone = segment(params_for(tiny_model_dir, first, tmp_path / "alone", cache))
    assert alone.feature_cache.state == "miss" and alone.cluster_model is None


def test_a_mismatching_or_damaged_cluster_model_is_refused_with_its_reason(survey, tmp_path, tiny_model_dir):
    first, _, model = survey
    cache = tmp_path / "cache"
    grey = write_geotiff(tmp_path / "grey.tif", np.full((1, 200, 200), 90, np.uint8))
    with pytest.raises(InputError, match=r"bands \[1, 1, 1\] \(the model: \[1, 2, 3\]\)"):
        segment(params_for(tiny_model_dir, grey, tmp_path / "out", cache, cluster_model=str(model)))
    with pytest.raises(InputError, match=r"stride 8 \(the model: 16\)"):
        segment(params_for(tiny_model_dir, first, tmp_path / "out", cache, cluster_model=str(model), stride=8))
    other_overlap = dataclasses.replace(params_for(tiny_model_dir, first, tmp_path / "out", cache,
                                                   cluster_model=str(model)), overlap=16)
    with pytest.raises(InputError, match=r"overlap 16 \(the model: 32\)"):  # e.g. a model fitted at another default
        segment(other_overlap)
    wide = write_geotiff(tmp_path / "wide.tif", (np.arange(3 * 200 * 200).reshape(3, 200, 200) % 3000)
                         .astype(np.uint16))
    with pytest.raises(InputError, match="value scaling .*percentile stretch.*Byte / 255"):
        segment(params_for(tiny_model_dir, wide, tmp_path / "out", cache, cluster_model=str(model)))
    damaged = tmp_path / "damaged.treeseg"
    damaged.write_bytes(model.read_bytes()[:200])
    with pytest.raises(InputError, match="damaged"):
        segment(params_for(tiny_model_dir, first, tmp_path / "out", cache, cluster_model=str(damaged)))
    newer = tmp_path / "newer.treeseg"
    with zipfile.ZipFile(model) as original, zipfile.ZipFile(newer, "w") as copy:
        for item in original.namelist():
            data = original.read(item)
            if item == "header.npy":
                data = data.replace(f'"version": {FORMAT_VERSION}'.encode(), b'"version": 9')
            copy.writestr(item, data)
    with pytest.raises(InputError, match="format version 9"):
        segment(params_for(tiny_model_dir, first, tmp_path / "out", cache, cluster_model=str(newer)))
    assert not list((tmp_path / "out").glob("*.tif"))


def test_a_raster_extracted_in_windows_segments_from_their_store_like_one_run(survey, tmp_path, tiny_model_dir):
    """The windows' parts joined (what the Dask runner does, here in one process) make the store of one run:
    the raster is segmented from it without loading a model, to the same bytes, the feature image too."""
    from treeseg_qgis.engine.dask_runner import WindowedRaster, WindowOutcome
    from treeseg_qgis.engine.pipeline import extract_window
    from treeseg_qgis.engine.survey_tasks import RasterJob, window_ranges

    first, _, model = survey
    params = params_for(tiny_model_dir, first, tmp_path / "one", tmp_path / "cache", cluster_model=str(model),
                        feature_preview=True, use_cache=False)
    one = segment(params)
    job = RasterJob(str(first), replace(params, output_dir=str(tmp_path / "windows")))
    windows = window_ranges(job, 3)  # 12 tiles, batches of 4
    assert [(w.start, w.stop) for w in windows] == [(0, 4), (4, 8), (8, 12)]
    raster = WindowedRaster(job, windows, tmp_path / "staged")
    for number, window in reversed(list(enumerate(windows))):
        raster.done[number] = WindowOutcome(extract_window(job.params, window, raster.folder), None)
    raster.complete_store()

    def no_model(_params):
        raise AssertionError("the model was loaded although the windows' store is complete")

    windowed = segment(job.params, load_model=no_model, features=str(raster.folder))
    for kind in ("clusters", "trees", "features"):
        assert Path(windowed.outputs[kind]).read_bytes() == Path(one.outputs[kind]).read_bytes()
    assert polygon_shapes(windowed.outputs["polygons"]) == polygon_shapes(one.outputs["polygons"])


def test_segment_many_on_two_dask_workers_matches_one_process_and_reports_a_corrupt_raster(
        tmp_path, tiny_model_dir, capsys):
    """On two workers the fit samples each raster as one task and each raster of 24 tiles is split into 3 windows
    of 8 tiles (whole batches of 4): the same cluster model and bytes as one process; the truncated raster
    opens, but its windows cannot be read: tried twice, reported."""
    good = [scene(tmp_path / "a.tif", seed=3), scene(tmp_path / "b.tif", seed=4, centres=((100, 100),))]
    corrupt = scene(tmp_path / "c.tif", seed=5)
    corrupt.write_bytes(corrupt.read_bytes()[:150_000])
    inputs = [str(path) for path in (good[0], corrupt, good[1])]
    common = ["--model", str(tiny_model_dir), "--device", "cpu", "--tile-size", "128", "--quiet"]
    for workers in (1, 2):
        status = main(["segment-many", *inputs, "--out", str(tmp_path / f"w{workers}"), "--workers", str(workers),
                       "--cache-dir", str(tmp_path / f"cache{workers}"), "--window-tiles", "6", *common])
        assert status == EXIT_SOME_FAILED
    assert "1 of 3 rasters failed" in capsys.readouterr().err
    assert model_contents(tmp_path / "w2" / "survey.treeseg") == model_contents(tmp_path / "w1" / "survey.treeseg")
    # No Dask scheduler, nanny or worker is left (multiprocessing's resource tracker lives as long as pytest).
    left = [cmdline(child) for child in psutil.Process().children(recursive=True)]
    assert not [line for line in left if "resource_tracker" not in line]
    for stem in ("a", "b"):
        one, two = (tmp_path / f"w{n}" / f"{stem}_clusters.tif" for n in (1, 2))
        assert one.read_bytes() == two.read_bytes()
        assert polygon_shapes(tmp_path / "w1" / f"{stem}_polygons.gpkg") == polygon_shapes(
            tmp_path / "w2" / f"{stem}_polygons.gpkg")
    for workers in (1, 2):
        folder = tmp_path / f"w{workers}"
        summary = json.loads((folder / "survey_summary.json").read_text())
        assert [row["status"] for row in summary["rasters"]] == ["ok", "failed", "ok"]
        failed = summary["rasters"][1]
        assert failed["attempts"] == 2 and "c.tif" in failed["error"]
        assert [row["windows"] for row in summary["rasters"]] == [3 * (workers - 1)] * 3
        rows = list(csv.DictReader((folder / "survey_summary.csv").open()))
        assert [row["status"] for row in rows] == ["ok", "failed", "ok"]
        assert 0 < float(rows[0]["tree_cover"]) < 1
        assert polygon_sources(folder / "survey_polygons.gpkg") == (
            ["a"] * polygon_count(folder / "a_polygons.gpkg") + ["b"] * polygon_count(folder / "b_polygons.gpkg"))
        assert not (folder / "c_clusters.tif").exists()
        assert not list(folder.glob(".*windows"))
    assert json.loads((tmp_path / "w2" / "survey_summary.json").read_text())["rasters"][1]["error"].startswith(
        "window 1 of 3 (tiles 1–8): Cannot read band 1 of")
    # The windows' features became the cache entry a one-process run of the same raster reads.
    again = main(["segment-many", str(good[0]), "--out", str(tmp_path / "again"), "--cluster-model",
                  str(tmp_path / "w2" / "survey.treeseg"), "--cache-dir", str(tmp_path / "cache2"), *common])
    assert again == 0
    record = json.loads((tmp_path / "again" / "a_run.json").read_text())
    assert record["feature_cache"]["state"] == "hit"
    assert (tmp_path / "again" / "a_clusters.tif").read_bytes() == (tmp_path / "w2" / "a_clusters.tif").read_bytes()


def test_ctrl_c_during_segment_many_on_dask_leaves_no_process_behind(survey, tmp_path, tiny_model_dir):
    first, second, model = survey
    command = [sys.executable, "-m", "treeseg_qgis", "segment-many", *[str(first), str(second)] * 8,
               "--out", str(tmp_path / "out"), "--cluster-model", str(model), "--workers", "2",
               "--model", str(tiny_model_dir), "--device", "cpu", "--no-cache", "--quiet",
               "--tile-size", "128", "--window-tiles", "8"]  # 3 windows a raster
    run = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    parent = psutil.Process(run.pid)
    deadline = time.monotonic() + load_scaled(180)
    workers: list[psutil.Process] = []
    while time.monotonic() < deadline and len(workers) < 2 and run.poll() is None:
        time.sleep(0.2)
        workers = [child for child in parent.children(recursive=True) if "resource_tracker" not in cmdline(child)]
    assert len(workers) >= 2, "the LocalCluster's worker processes never started"
    os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    _, stderr = run.communicate(timeout=load_scaled(120))
    assert run.returncode == 130, stderr
    _, alive = psutil.wait_procs(workers, timeout=load_scaled(30))
    assert not alive
    assert not (tmp_path / "out" / "survey_summary.json").exists()
    assert not list((tmp_path / "out").glob(".*windows"))


def model_contents(path) -> dict:
    """Every array of a cluster model file (the header as text): PCA, centroids, K, tree rule, value ranges."""
    with np.load(path) as data:
        return {name: bytes(data[name]).decode() if name == "header" else data[name].tolist() for name in data}


def cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # ended (or a zombie) meanwhile
        return ""


def test_segment_many_on_an_existing_dask_cluster_gives_the_same_labels(survey, tmp_path, tiny_model_dir):
    from distributed import LocalCluster

    from treeseg_qgis.engine.survey import segment_many, survey_cluster

    first, second, model = survey
    params = params_for(tiny_model_dir, "", tmp_path, tmp_path / "cache_here")
    here = segment_many([str(first), str(second)], params, tmp_path / "here", str(model))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        # A sample small enough to be drawn at random: the cluster's draw is the one of this process.
        sparse = replace(params, sample_size=300)
        fit_survey([str(first), str(second)], sparse, tmp_path / "here.treeseg")
        with survey_cluster(1, cluster.scheduler_address) as session:
            fit_survey([str(first), str(second)], sparse, tmp_path / "there.treeseg", cluster=session)
        assert model_contents(tmp_path / "there.treeseg") == model_contents(tmp_path / "here.treeseg")
        there = segment_many([str(first), str(second)], replace(params, cache_dir=str(tmp_path / "cache_there")),
                             tmp_path / "there", str(model), scheduler=cluster.scheduler_address)
    assert [row["status"] for row in there["rasters"]] == ["ok", "ok"] and there["legend"] == here["legend"]
    for stem in ("north", "south"):
        assert ((tmp_path / "here" / f"{stem}_clusters.tif").read_bytes()
                == (tmp_path / "there" / f"{stem}_clusters.tif").read_bytes())
