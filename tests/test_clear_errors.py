"""One clear line (exit 2) instead of a traceback, through the command line (issue 20, cases 9 and 12)."""

import os
import stat
import zipfile

import pytest

from treeseg_qgis.engine.cli import main

from .conftest import disc_scene, write_geotiff


@pytest.fixture
def image():
    return disc_scene(96, 96, [(48, 48)], radius=20)[0]


def segment(*args: str) -> int:
    return main(["segment", *args, "--method", "rgb-kmeans", "--clusters", "2", "--no-cache", "--quiet"])


@pytest.mark.parametrize("name", ["-dash.tif", "a$(touch x).tif", "quote'\"name.tif", "space name.tif"])
def test_punctuation_in_the_input_name_gives_valid_layer_names(image, tmp_path, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_geotiff(tmp_path / name, image)
    assert segment(f"./{name}", "--out", "out", "--crowns") == 0
    assert not (tmp_path / "x").exists()
    stem = name.removesuffix(".tif")
    assert (tmp_path / "out" / f"{stem}_rgb-kmeans_polygons.gpkg").is_file()
    assert (tmp_path / "out" / f"{stem}_rgb-kmeans_crowns.gpkg").is_file()


def test_a_vsizip_input_runs_with_the_cache(image, tmp_path):
    write_geotiff(tmp_path / "in.tif", image)
    with zipfile.ZipFile(tmp_path / "in.zip", "w") as archive:
        archive.write(tmp_path / "in.tif", "in.tif")
    status = main(["segment", f"/vsizip/{tmp_path}/in.zip/in.tif", "--out", str(tmp_path / "out"), "--method",
                   "rgb-kmeans", "--clusters", "2", "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert status == 0 and (tmp_path / "out" / "in_rgb-kmeans_clusters.tif").is_file()


@pytest.mark.parametrize("option, value, message", [("--crown-min-area", "nan", "crown_min_area_m2 must be a finite"),
                                                    ("--crown-min-area", "-1", "crown_min_area_m2 must be a finite"),
                                                    ("--min-tree-height", "inf", "min_tree_height_m must be")])
def test_a_non_finite_number_is_one_line(image, tmp_path, capsys, option, value, message):
    write_geotiff(tmp_path / "in.tif", image)
    assert segment(str(tmp_path / "in.tif"), "--out", str(tmp_path / "out"), "--crowns", option, value) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"treeseg: error: {message}")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_a_fifo_input_is_refused_at_once(tmp_path, capsys):
    os.mkfifo(tmp_path / "pipe.tif")
    assert segment(str(tmp_path / "pipe.tif"), "--out", str(tmp_path / "out")) == 2
    assert "not a regular file" in capsys.readouterr().err


@pytest.mark.parametrize("special", ["pipe", "folder"])
def test_an_output_path_holding_a_pipe_or_folder_is_refused_before_any_work(image, tmp_path, capsys, special):
    """A run's commit would replace whatever stands at an output path: a pipe or a folder there is refused in
    one line, before any work, and left as it was; nothing else is written."""
    write_geotiff(tmp_path / "in.tif", image)
    out = tmp_path / "out"
    out.mkdir()
    target = out / "in_rgb-kmeans_run.json"
    os.mkfifo(target) if special == "pipe" else target.mkdir()
    assert segment(str(tmp_path / "in.tif"), "--out", str(out)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"The output {target} exists and is not a regular file" in lines[0], lines
    assert (stat.S_ISFIFO(target.stat().st_mode) if special == "pipe" else target.is_dir())
    assert os.listdir(out) == [target.name]


def test_a_usage_mistake_is_two_lines(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["segment", "in.tif", "--stride", "five", "--out", "x"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(lines) == 2 and lines[0].startswith("treeseg: error: argument --stride")


def test_out_of_memory_is_one_line_and_leaves_nothing(image, tmp_path, capsys, monkeypatch):
    from treeseg_qgis.engine import pipeline

    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(pipeline, "segment_raster", out_of_memory)
    write_geotiff(tmp_path / "in.tif", image)
    assert segment(str(tmp_path / "in.tif"), "--out", str(tmp_path / "out")) == 2
    assert capsys.readouterr().err.strip().startswith("treeseg: error: out of memory")
    assert list((tmp_path / "out").iterdir()) == []


def test_cuda_asked_for_without_cuda_fails_even_when_features_are_cached(tiny_model_dir, image, tmp_path, capsys):
    write_geotiff(tmp_path / "in.tif", image)
    common = [str(tmp_path / "in.tif"), "--out", str(tmp_path / "out"), "--model", str(tiny_model_dir), "--clusters",
              "2", "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(["segment", *common, "--device", "cpu"]) == 0
    assert main(["segment", *common, "--device", "cuda"]) == 2
    assert "CUDA was asked for" in capsys.readouterr().err


def test_hub_429_and_500_are_not_called_offline():
    import requests
    from huggingface_hub.errors import HfHubHTTPError

    from treeseg_qgis.engine.core.models import explain_load_failure

    for status in (429, 500):
        response = requests.Response()
        response.status_code = status
        failure = OSError("could not load")
        failure.__cause__ = HfHubHTTPError(f"{status} error", response=response)
        message = explain_load_failure("facebook/dinov3-vits16-pretrain-lvd1689m", failure)
        assert "try again in a few minutes" in message and "offline" not in message


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (needs the right to mount; skipped without it)."""
    import subprocess

    folder = tmp_path / "small"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("free_kb", [5, 40, 120, 250, 700])
def test_a_nearly_full_output_disk_is_one_line_and_keeps_the_earlier_outputs(small_disk, tmp_path, capsys, free_kb):
    import shutil

    image, _ = disc_scene(400, 400, [(200, 200)], radius=80)
    write_geotiff(tmp_path / "in.tif", image)
    out = small_disk / "out"
    out.mkdir()
    (out / "in_rgb-kmeans_run.json").write_text("an earlier run")
    (small_disk / "filler").write_bytes(b"x" * (shutil.disk_usage(small_disk).free - free_kb * 1024))
    assert segment(str(tmp_path / "in.tif"), "--out", str(out), "--crowns") == 2
    error = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("Warning 1:")]
    assert len(error) == 1 and error[0].startswith("treeseg: error: ") and ": ." not in error[0], error
    assert [p.name for p in out.iterdir()] == ["in_rgb-kmeans_run.json"]
    assert (out / "in_rgb-kmeans_run.json").read_text() == "an earlier run"


@pytest.mark.parametrize("case", ["no CRS", "no .prj", "infinite coordinates"])
def test_teach_points_without_a_crs_or_with_invalid_coordinates_are_one_line(image, tmp_path, capsys, case):
    from osgeo import ogr, osr

    from .conftest import SAMPLE_GEOTRANSFORM as GT

    write_geotiff(tmp_path / "in.tif", image)
    srs = None
    if case == "infinite coordinates":
        srs = osr.SpatialReference()
        srs.ImportFromEPSG(32617)
    file = tmp_path / ("points.shp" if case == "no .prj" else "points.gpkg")
    points = ogr.GetDriverByName("ESRI Shapefile" if case == "no .prj" else "GPKG").CreateDataSource(str(file))
    layer = points.CreateLayer("points", srs, ogr.wkbPoint)
    layer.CreateField(ogr.FieldDefn("is_tree", ogr.OFTInteger))
    for x, y, is_tree in [(GT[0] + 4.8, GT[3] - 4.8, 1), (GT[0] + 0.5, GT[3] - 0.5, 0)]:
        feature = ogr.Feature(layer.GetLayerDefn())
        feature.SetField("is_tree", is_tree)
        point = ogr.Geometry(ogr.wkbPoint)
        point.AddPoint_2D(float("inf") if case == "infinite coordinates" and is_tree else x, y)
        feature.SetGeometry(point)
        layer.CreateFeature(feature)
    points = None
    status = main(["teach", str(tmp_path / "in.tif"), "--examples", str(file), "--out",
                   str(tmp_path / "out"), "--model", "small", "--allow-untrained", "--no-cache"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert status == 2 and len(errors) == 1 and errors[0].startswith("treeseg: error: "), errors
    if case != "infinite coordinates":
        assert f"The example points in {file} have no CRS, and the raster has one (EPSG:32617)" in errors[0]
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_a_run_prints_its_estimate_before_any_work_and_warns_when_very_long(tiny_model_dir, image, tmp_path, capsys,
                                                                            caplog, monkeypatch):
    from treeseg_qgis import memory

    write_geotiff(tmp_path / "in.tif", image)
    monkeypatch.setattr(memory, "LARGE_RUN_SECONDS", 0)
    assert main(["segment", str(tmp_path / "in.tif"), "--out", str(tmp_path / "out"), "--model", str(tiny_model_dir),
                 "--allow-untrained", "--clusters", "2", "--no-cache"]) == 0
    lines = capsys.readouterr().err.splitlines()
    estimate = next(index for index, line in enumerate(lines) if "Estimate: 1 tile, about" in line)
    assert lines[estimate].endswith("on the CPU, about 0.7 GB of memory"), lines[estimate]
    assert estimate < next(index for index, line in enumerate(lines) if "Loading model" in line)
    assert "The raster is 96 × 96 px: 1 tile, expected to take about" in caplog.text


def test_progress_moves_at_least_every_few_seconds_through_many_tiles(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from treeseg_qgis.engine import cli

    write_geotiff(tmp_path / "in.tif", disc_scene(704, 704, [(300, 300)], radius=40)[0])
    monkeypatch.setattr(cli, "PROGRESS_EVERY_S", 0.0)
    assert main(["segment", str(tmp_path / "in.tif"), "--out", str(tmp_path / "out"), "--model", str(tiny_model_dir),
                 "--allow-untrained", "--clusters", "2", "--no-cache", "--tile-size", "128"]) == 0
    extracting = [line for line in capsys.readouterr().err.splitlines() if "Extracting features: tile" in line]
    assert len(extracting) == 25, extracting  # 100 tiles in batches of 4: a line per batch, not per 10 %


def test_the_estimate_counts_tiles_as_the_grid_and_warns_for_a_sparse_giant():
    from treeseg_qgis import memory
    from treeseg_qgis.engine.core.tiling import TileGrid

    for width, height, tile in [(1, 1, 512), (96, 96, 512), (2000, 2000, 512), (3000, 20, 512), (449, 450, 512),
                                (1000, 1000, 256), (100_000, 100_000, 512)]:
        assert memory.tile_count(width, height, tile) == len(TileGrid(width, height, tile, memory.RUN_OVERLAP))
    warning = memory.size_warning("small", 100_000, 100_000)
    assert warning is not None and "50176 tiles, expected to take about" in warning and " h. " in warning
    assert memory.size_warning("small", 2000, 2000) is None
    assert "time unknown" in memory.run_estimate("small", 100_000, 100_000, device="cuda")
    assert memory.size_warning("small", 100_000, 100_000, device="cuda") is not None


def test_torchs_allocator_failing_is_the_out_of_memory_line(image, tmp_path, capsys, monkeypatch):
    from treeseg_qgis.engine import pipeline

    def allocator_fails(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 3870720 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(pipeline, "segment_raster", allocator_fails)
    write_geotiff(tmp_path / "in.tif", image)
    assert segment(str(tmp_path / "in.tif"), "--out", str(tmp_path / "out")) == 2
    assert capsys.readouterr().err.strip().startswith("treeseg: error: out of memory")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("limit_mb", [1000, 1500])
def test_an_address_space_limit_too_low_is_one_line_not_a_hang(image, tmp_path, limit_mb):
    """At 900-1100 MB OpenBLAS spun forever in blas_memory_alloc; at 1500 MB the model's forward failed."""
    import resource
    import subprocess
    import sys

    from .conftest import REPO

    def limit_address_space():
        resource.setrlimit(resource.RLIMIT_AS, (limit_mb * 10**6, resource.RLIM_INFINITY))

    write_geotiff(tmp_path / "in.tif", image)
    result = subprocess.run([sys.executable, "-m", "treeseg_qgis", "segment", str(tmp_path / "in.tif"), "--out",
                             str(tmp_path / "out"), "--model", "small", "--allow-untrained", "--no-cache", "--quiet"],
                            capture_output=True, text=True, cwd=REPO, timeout=90, preexec_fn=limit_address_space,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"treeseg: error: The address-space limit of this process (ulimit -v) is {limit_mb} MB; "
                               "the run reserves about")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
