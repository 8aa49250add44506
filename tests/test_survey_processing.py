"""The survey algorithms in real QGIS Processing, driving the real engine worker with the tiny DINOv3:
fit one cluster model on two rasters, apply it to each, refuse a run that does not match it; a taught classifier
applied to three rasters (one legend), a bad one refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from osgeo import gdal

from .conftest import REPO, disc_scene, write_geotiff
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


def test_a_taught_classifier_applied_to_three_rasters_in_processing_gives_one_legend(
        provider, tiny_model_dir, tmp_path):  # noqa: F811
    import processing
    from qgis.core import QgsProcessingException, QgsProcessingFeedback

    class Warned(QgsProcessingFeedback):
        def __init__(self):
            super().__init__()
            self.warnings: list[str] = []

        def pushWarning(self, warning):  # noqa: N802 - QGIS's name
            self.warnings.append(warning)
            super().pushWarning(warning)

    scenes = [disc_scene(256, 320, centres, 40, seed=seed)[0].astype(np.uint16) * 40  # 16-bit: survey-scaled
              for seed, centres in enumerate(([(80, 80), (170, 230)], [(120, 150)], [(60, 60), (190, 260)]))]
    rasters = [write_geotiff(tmp_path / f"plot_{seed}.tif", scene) for seed, scene in enumerate(scenes)]
    model = tmp_path / "survey.treeseg"
    processing.run("treeseg:fitclustermodel", {"INPUTS": list(map(str, rasters)), "MODEL_ID": str(tiny_model_dir),
                                               "DEVICE": "cpu", "OUTPUT": str(model)})
    clicks = tmp_path / "clicks.csv"
    clicks.write_text("col,row,class\n80,80,crown\n230,170,crown\n10,240,ground\n300,10,ground\n")
    saved = tmp_path / "crowns.treeseg"
    taught = subprocess.run(  # torch stays out of the QGIS process: teach on the command line
        [sys.executable, "-m", "treeseg_qgis", "teach", str(rasters[0]), "--examples", str(clicks), "--out",
         str(tmp_path / "taught"), "--cluster-model", str(model), "--save-classifier", str(saved), "--model",
         str(tiny_model_dir), "--device", "cpu"], capture_output=True, text=True, cwd=REPO, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert taught.returncode == 0, taught.stderr

    def apply(raster, out, classifier=saved, feedback=None):
        return processing.run("treeseg:applyclassifier", {
            "INPUT": str(raster), "CLUSTER_MODEL": str(model), "CLASSIFIER": str(classifier),
            "MODEL_ID": str(tiny_model_dir), "DEVICE": "cpu", "OUTPUT_CLASSES": str(out / "classes.tif"),
            "OUTPUT_CLASS_PROBABILITIES": str(out / "probabilities.tif"),
            "OUTPUT_CLASS_POLYGONS": str(out / "polygons.gpkg")}, feedback=feedback)

    results = [apply(raster, tmp_path / f"out_{index}") for index, raster in enumerate(rasters)]
    legends = set()
    for result in results:
        dataset = gdal.Open(result["OUTPUT_CLASSES"])  # kept open while its band is read
        band = dataset.GetRasterBand(1)
        table = band.GetColorTable()
        legends.add(json.dumps([band.GetCategoryNames()[:3], [table.GetColorEntry(i) for i in range(3)]]))
        record = json.loads(open(result["TEACH_RECORD"]).read())
        assert record["classes"] == ["crown", "ground"] and record["classifier"] == {"applied": str(saved)}
    assert len(legends) == 1 and '"unsure", "crown", "ground"' in legends.pop()

    brighter = write_geotiff(tmp_path / "brighter.tif", np.minimum(scenes[0].astype(np.uint32) * 4, 65535
                                                                   ).astype(np.uint16))
    warned = Warned()
    apply(brighter, tmp_path / "out_brighter", feedback=warned)
    assert any("outside the survey's value range" in warning for warning in warned.warnings), warned.warnings

    damaged = tmp_path / "damaged.treeseg"
    damaged.write_bytes(saved.read_bytes()[:300])
    fifo = tmp_path / "fifo.treeseg"
    os.mkfifo(fifo)
    for classifier, reason in ((damaged, "is not a treeseg taught classifier, or it is damaged"),
                               (fifo, "is not a regular file"), (model, "is not a treeseg taught classifier")):
        with pytest.raises(QgsProcessingException, match=reason) as refused:
            apply(rasters[1], tmp_path / "refused", classifier)
        assert "\n" not in str(refused.value) and "Traceback" not in str(refused.value)
    assert not (tmp_path / "refused").exists() or not list((tmp_path / "refused").iterdir())
    again = apply(rasters[1], tmp_path / "again")  # the engine after the refused jobs: as a fresh one
    assert labels(again["OUTPUT_CLASSES"]).tolist() == labels(results[1]["OUTPUT_CLASSES"]).tolist()
    before = rasters[1].read_bytes()
    with pytest.raises(QgsProcessingException, match="would overwrite the input"):
        processing.run("treeseg:applyclassifier", {
            "INPUT": str(rasters[1]), "CLUSTER_MODEL": str(model), "CLASSIFIER": str(saved),
            "MODEL_ID": str(tiny_model_dir), "DEVICE": "cpu", "OUTPUT_CLASSES": str(rasters[1]),
            "OUTPUT_CLASS_PROBABILITIES": str(tmp_path / "p.tif"), "OUTPUT_CLASS_POLYGONS": str(tmp_path / "p.gpkg")})
    assert rasters[1].read_bytes() == before and not (tmp_path / "p.tif").exists()
