"""The survey algorithms in real QGIS Processing, driving the real engine worker with the tiny DINOv3:
fit one cluster model on two rasters, apply it to each, refuse a run that does not match it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from osgeo import gdal

from .conftest import disc_scene, write_geotiff
from .test_processing import provider  # noqa: F401 (the fixture)

gdal.UseExceptions()


def labels(path) -> np.ndarray:
    dataset = gdal.Open(str(path))
    return dataset.GetRasterBand(1).ReadAsArray()


def test_fit_on_two_rasters_then_apply_gives_one_legend(provider, tiny_model_dir, tmp_path):  # noqa: F811
    import processing
    from qgis.core import QgsProcessingException

    first = write_geotiff(tmp_path / "east.tif", disc_scene(256, 320, [(80, 80), (170, 230)], 40, seed=6)[0])
    second = write_geotiff(tmp_path / "west.tif", disc_scene(256, 320, [(120, 150)], 50, seed=7)[0])
    copy = shutil.copy(first, tmp_path / "east_copy.tif")
    fitted = processing.run("treeseg:fitclustermodel", {
        "INPUTS": [str(first), str(second)], "MODEL_ID": str(tiny_model_dir), "DEVICE": "cpu",
        "OUTPUT": str(tmp_path / "survey")})
    model = tmp_path / "survey.treeseg"
    assert fitted["OUTPUT"] == str(model) and model.is_file() and fitted["K"] >= 2

    def apply(raster, out, **extra):
        return processing.run("treeseg:applyclustermodel", {
            "INPUT": str(raster), "CLUSTER_MODEL": str(model), "MODEL_ID": str(tiny_model_dir), "DEVICE": "cpu",
            "OUTPUT_CLUSTERS": str(out / "clusters.tif"), "OUTPUT_TREES": str(out / "trees.tif"),
            "OUTPUT_POLYGONS": str(out / "polygons.gpkg"), **extra})

    results = [apply(raster, tmp_path / name) for raster, name in ((first, "a"), (copy, "b"), (second, "c"))]
    assert {result["K"] for result in results} == {fitted["K"]}
    assert np.array_equal(labels(results[0]["OUTPUT_CLUSTERS"]), labels(results[1]["OUTPUT_CLUSTERS"]))
    with pytest.raises(QgsProcessingException, match=r"stride 8 \(the model: 16\)"):
        apply(first, tmp_path / "d", STRIDE="8")


def test_a_fit_on_three_rasters_names_each_raster_and_moves_the_bar_through_them(
        provider, tiny_model_dir, tmp_path):  # noqa: F811
    import processing
    from qgis.core import QgsProcessingFeedback

    class Recorded(QgsProcessingFeedback):
        """The stage texts and percentages a Processing dialog shows."""

        def __init__(self):
            super().__init__()
            self.stages: list[tuple[float, str]] = []

        def setProgressText(self, text):
            self.stages.append((self.progress(), text))
            super().setProgressText(text)

    rasters = [write_geotiff(tmp_path / f"plot_{seed}.tif",
                             disc_scene(256, 320, [(80 + 10 * seed, 90), (170, 230)], 40, seed=seed)[0])
               for seed in (1, 2, 3)]
    feedback = Recorded()
    processing.run("treeseg:fitclustermodel", {
        "INPUTS": [str(raster) for raster in rasters], "MODEL_ID": str(tiny_model_dir), "DEVICE": "cpu",
        "OUTPUT": str(tmp_path / "survey.treeseg")}, feedback=feedback)
    extracting = [(percent, text) for percent, text in feedback.stages if "Extracting features" in text]
    assert [text.split(":")[0] for _, text in extracting] == ["Raster 1 of 3", "Raster 2 of 3", "Raster 3 of 3"]
    sampled = [percent for percent, text in feedback.stages if text.startswith("Raster") and "sampled" in text]
    assert len(sampled) == 3 and sampled == sorted(sampled) and sampled[0] < sampled[-1]
    assert feedback.progress() == 100
