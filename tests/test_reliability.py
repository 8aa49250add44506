"""Messy rasters, faults and cancel through the public entry points (pipeline and CLI).

Each case: a clear message (TreesegError, exit 2 at the CLI), the input byte-for-byte
unchanged, and no half-written output left. docs/RELIABILITY.md lists them.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from osgeo import gdal, ogr

from treeseg_qgis.engine.core.errors import Cancelled, InputError, ModelUnavailableError, OutputError, TreesegError
from treeseg_qgis.engine.core.features import FeatureExtractor
from treeseg_qgis.engine.core.models import Backbone, load_backbone
from treeseg_qgis.engine.core.progress import Progress
from treeseg_qgis.engine.pipeline import segment
from treeseg_qgis.params import AUTO, SegmentationParams
from treeseg_qgis.run_record import RunRecord

from .conftest import REPO, disc_scene, write_geotiff

gdal.UseExceptions()


def digest(path) -> str | None:
    return hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.exists(path) else None


def run(tiny_model_dir, path, out, **options) -> RunRecord:
    defaults = dict(model=str(tiny_model_dir), device="cpu", clusters=2)
    defaults.update(options)
    before = digest(path)
    try:
        return segment(SegmentationParams(input_path=str(path), output_dir=str(out), **defaults))
    finally:
        assert digest(path) == before, "the input file was modified"


def assert_fails_cleanly(tiny_model_dir, path, out, error, match, **options):
    with pytest.raises(error, match=match):
        run(tiny_model_dir, path, out, **options)
    assert not out.exists() or list(out.iterdir()) == []


def labels(record) -> np.ndarray:
    dataset = gdal.Open(record.outputs["clusters"])
    return dataset.GetRasterBand(1).ReadAsArray()


def scene(rows=96, cols=96):
    image, _ = disc_scene(rows, cols, [(rows // 2, cols // 2)], radius=min(rows, cols) // 4)
    return image


@pytest.mark.parametrize("bands", [1, 2, 4])
def test_band_counts(tiny_model_dir, tmp_path, bands):
    image = scene()
    data = np.concatenate([image, image[:1]])[:bands] if bands > 3 else image[:bands]
    record = run(tiny_model_dir, write_geotiff(tmp_path / "in.tif", data), tmp_path / "out")
    assert record.input.bands == ([1, 2, 3] if bands > 3 else [1, 1, 1])


def test_rgba_alpha_is_the_mask(tiny_model_dir, tmp_path):
    image = scene()
    alpha = np.full(image.shape[1:], 255, np.uint8)
    alpha[:, :40] = 0
    path = write_geotiff(tmp_path / "rgba.tif", np.concatenate([image, alpha[None]]))
    dataset = gdal.Open(str(path), gdal.GA_Update)
    dataset.GetRasterBand(4).SetColorInterpretation(gdal.GCI_AlphaBand)
    dataset = None
    result = labels(run(tiny_model_dir, path, tmp_path / "out"))
    assert (result[:, :40] == 255).all() and (result[:, 48:] != 255).all()


def test_band_out_of_range(tiny_model_dir, tmp_path):
    path = write_geotiff(tmp_path / "in.tif", scene())
    assert_fails_cleanly(tiny_model_dir, path, tmp_path / "out", InputError, "Band 5 does not exist",
                         bands=(1, 2, 5))


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_16_bit_and_float(tiny_model_dir, tmp_path, dtype):
    data = (scene().astype(np.float32) * (257 if dtype == "uint16" else 1 / 255)).astype(dtype)
    record = run(tiny_model_dir, write_geotiff(tmp_path / "in.tif", data), tmp_path / "out")
    assert "percentile" in record.input.scaling


def test_float_nan_and_nodata_islands_stay_nodata(tiny_model_dir, tmp_path):
    data = scene().astype(np.float32)
    data[:, 10:20, 10:20] = np.nan
    data[:, 60:70, 60:70] = -9999
    result = labels(run(tiny_model_dir, write_geotiff(tmp_path / "in.tif", data, nodata=-9999), tmp_path / "out"))
    assert (result[10:20, 10:20] == 255).all() and (result[60:70, 60:70] == 255).all()
    assert (result[30:50, 30:50] != 255).all()


def test_constant_image_and_auto_k(tiny_model_dir, tmp_path):
    data = np.full((3, 64, 64), 120, np.uint8)
    record = run(tiny_model_dir, write_geotiff(tmp_path / "in.tif", data), tmp_path / "out", clusters=AUTO)
    assert record.clusters.k >= 1 and record.trees.tree_cover == 0.0


def test_all_nodata(tiny_model_dir, tmp_path):
    path = write_geotiff(tmp_path / "in.tif", np.zeros((3, 64, 64), np.uint8), nodata=0)
    assert_fails_cleanly(tiny_model_dir, path, tmp_path / "out", InputError, "no valid pixels")


@pytest.mark.parametrize("epsg", [4326, None])
def test_geographic_and_missing_crs(tiny_model_dir, tmp_path, epsg):
    geotransform = (-82.0, 1e-6, 0.0, 29.7, 0.0, -1e-6) if epsg else (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    path = write_geotiff(tmp_path / "in.tif", scene(), geotransform=geotransform, epsg=epsg)
    record = run(tiny_model_dir, path, tmp_path / "out")
    polygons = ogr.Open(record.outputs["polygons"])
    areas = [feature["area_m2"] for feature in polygons.GetLayer(0)]
    if epsg:
        expected = 96 * 96 * (1e-6 * 111_320 * np.cos(np.radians(29.7))) * (1e-6 * 110_860)
        assert sum(areas) == pytest.approx(expected, rel=0.01)
    else:
        assert all(area is None for area in areas)


def test_rotated_geotransform_is_kept(tiny_model_dir, tmp_path):
    geotransform = (404211.9, 0.0866, 0.05, 3285142.9, 0.05, -0.0866)
    path = write_geotiff(tmp_path / "in.tif", scene(), geotransform=geotransform)
    record = run(tiny_model_dir, path, tmp_path / "out")
    assert gdal.Open(record.outputs["clusters"]).GetGeoTransform() == pytest.approx(geotransform)


def test_a_raster_without_georeferencing_gets_outputs_on_the_grid_qgis_draws_it_on(tiny_model_dir, tmp_path):
    path = write_geotiff(tmp_path / "plain.tif", scene(), geotransform=None, epsg=None)
    assert gdal.Open(str(path)).GetGeoTransform(can_return_null=True) is None
    record = run(tiny_model_dir, path, tmp_path / "out")
    assert gdal.Open(record.outputs["clusters"]).GetGeoTransform() == (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


@pytest.mark.parametrize("shape", [(10, 12), (20, 3000)])
def test_tiny_and_thin_rasters(tiny_model_dir, tmp_path, shape):
    image, _ = disc_scene(*shape, [(shape[0] // 2, shape[1] // 2)], radius=4)
    record = run(tiny_model_dir, write_geotiff(tmp_path / "in.tif", image), tmp_path / "out")
    assert labels(record).shape == shape and (labels(record) != 255).all()


def test_corrupt_truncated_and_non_raster_files(tiny_model_dir, tmp_path):
    good = write_geotiff(tmp_path / "good.tif", scene(256, 256))
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="truncated|corrupt|Cannot open"):
        run(tiny_model_dir, truncated, tmp_path / "out")
    text = tmp_path / "notes.txt"
    text.write_text("not a raster")
    assert_fails_cleanly(tiny_model_dir, text, tmp_path / "out2", InputError, "Cannot open the raster")
    assert_fails_cleanly(tiny_model_dir, tmp_path / "missing.tif", tmp_path / "out3", InputError, "missing.tif")


def test_output_folder_that_cannot_be_created(tiny_model_dir, tmp_path):
    path = write_geotiff(tmp_path / "in.tif", scene())
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(OutputError, match="Cannot create the output folder"):
        run(tiny_model_dir, path, blocker / "out")


def test_existing_outputs_are_replaced(tiny_model_dir, tmp_path):
    path = write_geotiff(tmp_path / "in.tif", scene())
    first = run(tiny_model_dir, path, tmp_path / "out", clusters=2)
    second = run(tiny_model_dir, path, tmp_path / "out", clusters=3)
    assert first.outputs == second.outputs
    assert json.loads(open(second.outputs["record"]).read())["clusters"]["k"] == 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if "partial" in p.name) == []


def test_disk_full_while_writing_removes_partial_files(tiny_model_dir, tmp_path, monkeypatch):
    from treeseg_qgis.engine.gis import writers

    def disk_full(self, x, y, labels, trees):
        raise OutputError("No space left on device while writing the cluster raster.")

    monkeypatch.setattr(writers.LabelRasterWriter, "write", disk_full)
    path = write_geotiff(tmp_path / "in.tif", scene())
    assert_fails_cleanly(tiny_model_dir, path, tmp_path / "out", OutputError, "No space left")


def test_model_errors(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    path = write_geotiff(tmp_path / "in.tif", scene())
    assert_fails_cleanly(tiny_model_dir, path, tmp_path / "o1", ModelUnavailableError, "Unknown model 'huge'",
                         model="huge")
    assert_fails_cleanly(tiny_model_dir, path, tmp_path / "o2", ModelUnavailableError, "not in the local",
                         model="giant")
    (tmp_path / "notdino").mkdir()
    (tmp_path / "notdino" / "config.json").write_text('{"model_type": "bert"}')
    assert_fails_cleanly(tiny_model_dir, path, tmp_path / "o3", ModelUnavailableError, "not a DINOv3",
                         model=str(tmp_path / "notdino"))


def test_offline_with_a_cached_model_loads_from_the_cache(tiny_model_dir, tmp_path):
    snapshot = tmp_path / "hf" / "hub" / "models--someone--tiny-dinov3" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    path = write_geotiff(tmp_path / "in.tif", scene(128, 128))
    environment = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO),
                       XDG_CACHE_HOME=str(tmp_path / "xdg"))
    for out in ("out", "again"):  # the second run starts from the int8 export the first one cached: no torch
        result = subprocess.run([sys.executable, "-X", "importtime", "-m", "treeseg_qgis", "segment", str(path),
                                 "--out", str(tmp_path / out), "--model", "someone/tiny-dinov3", "--clusters", "2",
                                 "--tile-size", "128", "--precision", "int8", "--quiet"],
                                capture_output=True, text=True, env=environment, timeout=300)
        assert result.returncode == 0, result.stderr
        record = json.loads((tmp_path / out / "in_run.json").read_text())
        assert record["model"]["model_id"] == "someone/tiny-dinov3" and record["model"]["untrained"] is False
    imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert not imported & {"torch", "transformers"}


def test_k_larger_than_distinct_features_and_k_one(tiny_model_dir, tmp_path):
    data = np.zeros((3, 64, 64), np.uint8)
    data[:, :, 32:] = 200
    path = write_geotiff(tmp_path / "in.tif", data)
    assert run(tiny_model_dir, path, tmp_path / "a", clusters=40).clusters.k <= 40
    one = run(tiny_model_dir, path, tmp_path / "b", clusters=1)
    assert one.clusters.k == 1 and set(np.unique(labels(one))) == {0}


@pytest.mark.parametrize("stage", ["Loading model", "Extracting", "Clustering", "Assigning", "Polygonizing",
                                   "Writing preview"])
def test_cancel_at_every_stage_leaves_nothing(tiny_model_dir, tmp_path, stage):
    path = write_geotiff(tmp_path / "in.tif", scene(200, 200))
    seen = []
    params = SegmentationParams(input_path=str(path), output_dir=str(tmp_path / "out"), model=str(tiny_model_dir),
                                device="cpu", clusters=2, tile_size=128, overlap=32)
    with pytest.raises(Cancelled):
        segment(params, Progress(lambda percent, text: seen.append(text),
                                 lambda: any(text.startswith(stage) for text in seen)))
    assert list((tmp_path / "out").iterdir()) == []


class _OutOfMemoryOnDevice(torch.nn.Module):
    """Test double of the device step: out of memory for batches above `limit`, or always on `meta` (the
    stand-in for a GPU: a CPU build of torch can put tensors there, not run the model there)."""

    def __init__(self, model, limit):
        super().__init__()
        self.inner, self.limit, self.config = model, limit, model.config
        self.devices: list[str] = []

    def forward(self, pixel_values):
        self.devices.append(pixel_values.device.type)
        if pixel_values.device.type == "meta" or pixel_values.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(pixel_values=pixel_values)


def _half_precision_on_the_device(tiny_model_dir) -> Backbone:
    """The tiny model in float16 behind the out-of-memory double, reporting the `meta` device."""
    backbone = load_backbone(str(tiny_model_dir), device="cpu", precision="float32")
    model = _OutOfMemoryOnDevice(backbone.model.half(), limit=64)
    return Backbone(**{**backbone.__dict__, "model": model, "device": torch.device("meta"), "dtype": torch.float16,
                       "precision": "float16"})


def test_out_of_memory_halves_the_batch(tiny_model_dir):
    tile = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    backbone = load_backbone(str(tiny_model_dir), device="cpu", precision="float32")
    expected = FeatureExtractor(backbone, stride=4).extract(tile)
    backbone.model = _OutOfMemoryOnDevice(backbone.model, limit=2)
    halving = FeatureExtractor(backbone, stride=4, batch_size=8)
    assert np.allclose(halving.extract(tile), expected, atol=1e-4) and halving.batch_size == 2


def test_out_of_memory_at_one_image_goes_on_with_a_cpu_copy_and_leaves_the_shared_backbone_alone(
        tiny_model_dir, caplog):
    tile = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    reference = load_backbone(str(tiny_model_dir), device="cpu", precision="float32")
    reference.model = reference.model.half().float()
    expected = FeatureExtractor(reference, stride=16).extract(tile)
    shared = _half_precision_on_the_device(tiny_model_dir)
    fields = {name: value for name, value in shared.__dict__.items() if name != "model"}
    model = shared.model
    fallback = FeatureExtractor(shared, stride=16, batch_size=2)
    assert np.allclose(fallback.extract(tile), expected, atol=1e-4)
    assert model.devices == ["meta", "meta"]  # batches of 2, then of 1; then the CPU copy took over
    assert fallback.backbone.model is not model and fallback.backbone.model.devices[-1] == "cpu"
    assert "continuing on the CPU" in caplog.text
    assert fallback.describe()["device"] == "cpu" and fallback.describe()["precision"] == "float32"
    assert "out of memory on meta" in fallback.describe()["fell_back_to_cpu"]
    # the backbone someone else holds is as it was: same fields, same module, still float16
    assert shared.model is model and {n: v for n, v in shared.__dict__.items() if n != "model"} == fields
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    # the next extractor on that backbone asks its own device first
    model.devices.clear()
    again = FeatureExtractor(shared, stride=16, batch_size=1)
    assert "fell_back_to_cpu" not in again.describe() and again.describe()["device"] == "meta"
    again.extract(tile)
    assert model.devices == ["meta"] and again.backbone.model.devices[-1] == "cpu"


def test_a_run_that_fell_back_says_so_and_the_next_run_asks_the_device_again(tiny_model_dir, tmp_path):
    image, _ = disc_scene(96, 96, [(48, 48)], radius=20)
    path = write_geotiff(tmp_path / "in.tif", image)
    shared = _half_precision_on_the_device(tiny_model_dir)
    params = SegmentationParams(input_path=str(path), output_dir=str(tmp_path / "out"), model=str(tiny_model_dir),
                                device="cpu", clusters=2, use_cache=False)
    for _ in range(2):
        shared.model.devices.clear()
        record = segment(params, load_model=lambda wanted: shared)
        assert shared.model.devices and set(shared.model.devices) == {"meta"}
        assert "out of memory on meta" in record.model.fell_back_to_cpu
        saved = json.loads(next((tmp_path / "out").glob("*_run.json")).read_text())
        assert saved["model"]["fell_back_to_cpu"] == record.model.fell_back_to_cpu
        assert shared.device.type == "meta" and shared.precision == "float16"


def test_every_failure_is_a_treeseg_error_subclass():
    for error in (InputError, ModelUnavailableError, OutputError, Cancelled):
        assert issubclass(error, TreesegError)
