"""A survey's value scaling: one stretch for all its 16-bit rasters, measured by `fit` over every input and
kept in the `.treeseg` file (real UInt16 GeoTIFFs written with GDAL, a real tiny DINOv3)."""

import io
import json
import zipfile
from dataclasses import replace

import numpy as np
import pytest
from osgeo import gdal

from treeseg_qgis.engine import survey as survey_module
from treeseg_qgis.engine.core.errors import InputError
from treeseg_qgis.engine.core.survey_model import FORMAT_VERSION, SurveyModel
from treeseg_qgis.engine.gis.raster import GdalRasterSource
from treeseg_qgis.engine.pipeline import segment
from treeseg_qgis.engine.survey import fit_survey, segment_many

from .conftest import disc_scene, write_geotiff
from .test_survey import labels, params_for

gdal.UseExceptions()
CENTRES = ((70, 80), (90, 300), (220, 180), (250, 340))
BRIGHT_COLUMNS = slice(388, 400)
"""The bright roof added to the second raster (3 % of it, enough to move its own 98th percentile): no tile
(128 px, 96 px apart) covering pixels left of x = 192 touches it, so they get the same tiles in both."""
UNTOUCHED_COLUMNS = slice(0, 192)


def sixteen_bit(image: np.ndarray) -> np.ndarray:
    """An 8-bit scene as a sensor's 16-bit values (another range than 0..255)."""
    return image.astype(np.uint16) * 40 + 1000


@pytest.fixture(scope="module")
def survey16(tmp_path_factory, tiny_model_dir):
    """A UInt16 scene, the same scene with a bright roof added on its right, and the model fitted on both."""
    folder = tmp_path_factory.mktemp("survey16")
    image = sixteen_bit(disc_scene(320, 400, CENTRES, radius=44, seed=1)[0])
    bright = image.copy()
    bright[:, :, BRIGHT_COLUMNS] = 60000
    plain = write_geotiff(folder / "plain.tif", image)
    roofed = write_geotiff(folder / "roofed.tif", bright)
    model = folder / "survey.treeseg"
    fit_survey([str(plain), str(roofed)], params_for(tiny_model_dir, "", folder, folder / "cache"), model)
    return plain, roofed, model, image, bright


def test_the_model_keeps_one_stretch_measured_over_every_raster(survey16):
    plain, roofed, model_path, image, bright = survey16
    model = SurveyModel.load(model_path)
    assert sorted(model.value_ranges) == [1, 2, 3]
    for number in (1, 2, 3):
        # Every pixel is sampled in rasters this small, each counting once: the percentiles of all of them.
        pooled = np.concatenate([image[number - 1].ravel(), bright[number - 1].ravel()]).astype(np.float64)
        assert model.value_ranges[number] == pytest.approx(tuple(np.percentile(pooled, [2, 98])))
    lo, hi = model.value_ranges[1]
    assert f"band 1: survey 2-98 % percentile stretch [{lo:.6g}, {hi:.6g}]" in model.scaling
    with zipfile.ZipFile(model_path) as archive:
        header = json.loads(bytes(np.load(io.BytesIO(archive.read("header.npy")))))
    assert header["version"] == FORMAT_VERSION and header["value_ranges"]["1"] == [lo, hi]


def test_the_same_ground_values_get_the_same_input_and_the_same_labels_in_every_raster(
        survey16, tmp_path, tiny_model_dir):
    plain, roofed, model_path, _, _ = survey16
    model = SurveyModel.load(model_path)
    window = (0, 0, UNTOUCHED_COLUMNS.stop, 320)
    with GdalRasterSource(str(plain)) as alone, GdalRasterSource(str(roofed)) as alone_roofed:
        assert alone.scaling != alone_roofed.scaling  # each raster's own stretch: the roof changes it
        assert not np.array_equal(alone.read(*window)[0], alone_roofed.read(*window)[0])
    with (GdalRasterSource(str(plain), value_ranges=model.value_ranges) as source,
          GdalRasterSource(str(roofed), value_ranges=model.value_ranges) as source_roofed):
        assert source.scaling == source_roofed.scaling == model.scaling
        np.testing.assert_array_equal(source.read(*window)[0], source_roofed.read(*window)[0])
    records = [segment(params_for(tiny_model_dir, path, tmp_path / "out", tmp_path / "cache",
                                  cluster_model=str(model_path))) for path in (plain, roofed)]
    assert {record.input.scaling for record in records} == {model.scaling}
    assert records[0].clusters.k >= 2 and records[0].clusters.k == records[1].clusters.k
    first, second = (labels(record.outputs["clusters"]) for record in records)
    np.testing.assert_array_equal(first[:, UNTOUCHED_COLUMNS], second[:, UNTOUCHED_COLUMNS])
    assert len(np.unique(first[:, UNTOUCHED_COLUMNS])) >= 2
    assert [record.cluster_model.warning for record in records] == [None, None]
    lo, hi = model.value_ranges[1]
    roofed_band = gdal.Open(str(roofed)).ReadAsArray()[0]
    outside = np.mean((roofed_band < lo) | (roofed_band > hi))
    assert records[1].cluster_model.clipped["band 1"] == pytest.approx(outside, abs=1e-4)


def test_a_raster_far_outside_the_surveys_values_is_clipped_and_reported(survey16, tmp_path, tiny_model_dir,
                                                                         caplog):
    _, _, model_path, image, _ = survey16
    darker = write_geotiff(tmp_path / "other_sensor.tif", image // 4)  # a sensor of another gain
    with caplog.at_level("WARNING", logger="treeseg"):
        record = segment(params_for(tiny_model_dir, darker, tmp_path / "out", tmp_path / "cache",
                                    cluster_model=str(model_path)))
    warning = record.cluster_model.warning
    assert warning and "may not belong to the survey" in warning and "band 1:" in warning
    assert record.cluster_model.clipped["band 1"] > 0.1
    assert warning in caplog.text
    assert record.input.scaling == SurveyModel.load(model_path).scaling


def test_segment_many_names_the_surveys_scaling_and_the_raster_that_does_not_belong(survey16, tmp_path,
                                                                                    tiny_model_dir):
    plain, _, model_path, image, _ = survey16
    darker = write_geotiff(tmp_path / "other_sensor.tif", image // 4)
    summary = segment_many([str(plain), str(darker)], params_for(tiny_model_dir, "", tmp_path, tmp_path / "cache"),
                           tmp_path / "out", str(model_path))
    assert summary["scaling"] == SurveyModel.load(model_path).scaling
    warnings = [row["scaling_warning"] for row in summary["rasters"]]
    assert warnings[0] is None and "may not belong to the survey" in warnings[1]


def test_without_a_cluster_model_a_raster_keeps_its_own_stretch(survey16, tmp_path, tiny_model_dir):
    plain = survey16[0]
    record = segment(params_for(tiny_model_dir, plain, tmp_path / "out", tmp_path / "cache"))
    with GdalRasterSource(str(plain)) as source:
        assert record.input.scaling == source.scaling
    assert "survey" not in record.input.scaling and record.cluster_model is None


def test_a_byte_survey_has_no_stretch_to_keep(tmp_path, tiny_model_dir):
    paths = [write_geotiff(tmp_path / f"{name}.tif", disc_scene(200, 240, ((60, 60),), radius=40, seed=seed)[0])
             for seed, name in enumerate(("east", "west"))]
    model_path = tmp_path / "survey.treeseg"
    model = fit_survey([str(path) for path in paths], params_for(tiny_model_dir, "", tmp_path, tmp_path / "cache"),
                       model_path)
    assert model.value_ranges == {}
    assert model.scaling == "band 1: Byte / 255; band 2: Byte / 255; band 3: Byte / 255"
    record = segment(params_for(tiny_model_dir, paths[0], tmp_path / "out", tmp_path / "cache",
                                cluster_model=str(model_path)))
    assert record.input.scaling == model.scaling
    assert record.cluster_model.clipped == {} and record.cluster_model.warning is None


def as_version_1(model_path, out_path):
    """The model rewritten as format version 1 wrote it (no value ranges)."""
    with zipfile.ZipFile(model_path) as original, zipfile.ZipFile(out_path, "w") as copy:
        for item in original.namelist():
            data = original.read(item)
            if item == "header.npy":
                header = json.loads(bytes(np.load(io.BytesIO(data))))
                header["version"] = 1
                del header["value_ranges"]
                header["scaling"] = header["scaling"].replace("survey ", "")
                buffer = io.BytesIO()
                np.save(buffer, np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))
                data = buffer.getvalue()
            copy.writestr(item, data)
    return out_path


def test_a_version_1_model_is_read_for_byte_rasters_and_refused_for_stretched_ones(survey16, tmp_path,
                                                                                  tiny_model_dir):
    old16 = as_version_1(survey16[2], tmp_path / "old16.treeseg")
    with pytest.raises(InputError, match="format version 1.*each raster stretched to its own value range"):
        SurveyModel.load(old16)
    byte = write_geotiff(tmp_path / "byte.tif", disc_scene(200, 240, ((60, 60),), radius=40, seed=3)[0])
    fitted = tmp_path / "byte.treeseg"
    fit_survey([str(byte)], params_for(tiny_model_dir, "", tmp_path, tmp_path / "cache"), fitted)
    old_byte = SurveyModel.load(as_version_1(fitted, tmp_path / "old_byte.treeseg"))
    assert old_byte.value_ranges == {} and old_byte.scaling == SurveyModel.load(fitted).scaling


def test_each_raster_counts_by_its_valid_area_when_only_a_bounded_sample_is_kept(tmp_path, tiny_model_dir,
                                                                                monkeypatch):
    monkeypatch.setattr(survey_module, "VALUE_SAMPLES", 4000)  # 2000 values kept per raster
    rng = np.random.default_rng(7)
    large = rng.integers(1000, 2000, (3, 300, 300)).astype(np.uint16)
    large[:, :, :200] = 0  # nodata: 30 000 valid pixels of 90 000
    small = rng.integers(5000, 6000, (3, 100, 100)).astype(np.uint16)
    paths = [write_geotiff(tmp_path / "large.tif", large, nodata=0),
             write_geotiff(tmp_path / "small.tif", small, nodata=0)]
    model = fit_survey([str(path) for path in paths], params_for(tiny_model_dir, "", tmp_path, tmp_path / "cache"),
                       tmp_path / "survey.treeseg")
    valid = np.concatenate([large[0][large[0] > 0], small[0].ravel()]).astype(np.float64)
    lo, hi = model.value_ranges[1]
    expected_lo, expected_hi = np.percentile(valid, [2, 98])  # 5921: the small raster is a quarter of the valid area
    assert lo == pytest.approx(expected_lo, abs=25) and hi == pytest.approx(expected_hi, abs=25)
    by_size = np.percentile(np.concatenate([np.repeat(large[0, :, 200:], 3), small[0].ravel()]), 98)
    assert abs(hi - by_size) > 75  # counting nodata as area: 5795


def test_the_windows_of_a_16_bit_raster_read_it_with_the_surveys_stretch(survey16, tmp_path, tiny_model_dir):
    """A 16-bit raster split into windows (in one process here, as the Dask runner splits it) is read with the
    survey's stretch in every window: the same bytes as one run with the model."""
    from treeseg_qgis.engine.dask_runner import WindowedRaster, WindowOutcome
    from treeseg_qgis.engine.pipeline import extract_window
    from treeseg_qgis.engine.survey_tasks import RasterJob, window_ranges

    _, roofed, model_path, _, _ = survey16
    params = params_for(tiny_model_dir, roofed, tmp_path / "one", tmp_path / "cache", cluster_model=str(model_path),
                        use_cache=False)
    one = segment(params)
    job = RasterJob(str(roofed), replace(params, output_dir=str(tmp_path / "windows")))
    windows = window_ranges(job, 2)
    raster = WindowedRaster(job, windows, tmp_path / "staged")
    for number, window in enumerate(windows):
        raster.done[number] = WindowOutcome(extract_window(job.params, window, raster.folder), None)
    raster.complete_store()
    windowed = segment(job.params, features=str(raster.folder))
    assert windowed.input.scaling == one.input.scaling == SurveyModel.load(model_path).scaling
    for kind in ("clusters", "trees"):
        with open(windowed.outputs[kind], "rb") as a, open(one.outputs[kind], "rb") as b:
            assert a.read() == b.read()
