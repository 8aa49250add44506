"""Click-to-teach through the pipeline: examples → scores → mask, re-thresholded from the cache."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal, ogr, osr

from treeseg_qgis.engine.core.errors import InputError
from treeseg_qgis.engine.core.examples import Example
from treeseg_qgis.engine.core.models import load_backbone
from treeseg_qgis.engine.pipeline import teach
from treeseg_qgis.params import SegmentationParams

from .conftest import REPO, SAMPLE_GEOTRANSFORM, UTM17N


def band(path) -> np.ndarray:
    dataset = gdal.Open(path)
    return dataset.GetRasterBand(1).ReadAsArray()


@pytest.fixture
def params(tiny_model_dir, scene_tif, tmp_path):
    path, _ = scene_tif
    return SegmentationParams(input_path=str(path), output_dir=str(tmp_path / "out"), model=str(tiny_model_dir),
                              device="cpu", cache_dir=str(tmp_path / "cache"), tile_size=128, overlap=32)


EXAMPLES = [Example(80, 70, True), Example(300, 90, True), Example(200, 20, False), Example(380, 300, False)]


def test_examples_teach_the_crowns(params, scene_tif):
    _, crowns = scene_tif
    record = teach(params, EXAMPLES, threshold=0.5)
    scores = band(record["outputs"]["similarity"])
    assert scores.min() >= 0.0 and scores.max() <= 1.0
    trees = band(record["outputs"]["taught_trees"]) == 1
    assert (trees & crowns).sum() / (trees | crowns).sum() > 0.75
    assert record["examples"] == {"trees": 2, "not_trees": 2}


def test_a_new_threshold_reuses_the_cached_features(params):
    teach(params, EXAMPLES, threshold=0.6)

    def must_not_load(wanted):
        raise AssertionError("the model was loaded although the features are cached")

    strict = teach(params, EXAMPLES, threshold=0.8, load_model=must_not_load)
    loose = teach(params, EXAMPLES, threshold=0.4, load_model=must_not_load)
    assert strict["feature_cache"] == "hit" and strict["tree_cover"] < loose["tree_cover"]


def test_examples_from_a_point_layer_in_another_crs(params, tmp_path):
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(4326)
    utm = osr.SpatialReference()
    utm.ImportFromEPSG(UTM17N)
    for ref in (srs, utm):
        ref.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    to_lonlat = osr.CoordinateTransformation(utm, srs)
    source = ogr.GetDriverByName("GPKG").CreateDataSource(str(tmp_path / "examples.gpkg"))
    layer = source.CreateLayer("examples", srs, ogr.wkbPoint)
    layer.CreateField(ogr.FieldDefn("is_tree", ogr.OFTInteger))
    x0, px, _, y0, _, py = SAMPLE_GEOTRANSFORM
    for example in EXAMPLES:
        lon, lat, _ = to_lonlat.TransformPoint(x0 + (example.col + 0.5) * px, y0 + (example.row + 0.5) * py)
        feature = ogr.Feature(layer.GetLayerDefn())
        feature.SetGeometry(ogr.CreateGeometryFromWkt(f"POINT ({lon} {lat})"))
        feature.SetField("is_tree", int(example.is_tree))
        layer.CreateFeature(feature)
    source = None
    from_points = teach(params, str(tmp_path / "examples.gpkg"), threshold=0.6)
    from_pixels = teach(params, EXAMPLES, threshold=0.6)
    assert from_points["tree_cover"] == pytest.approx(from_pixels["tree_cover"], abs=0.02)


def test_without_a_tree_example_it_says_so(params):
    with pytest.raises(InputError, match="at least one example of '.+' inside the raster: 2 examples given, 1 "
                       "inside the raster, 0 of them"):
        teach(params, [Example(10, 10, False), Example(5000, 5000, True)])


def test_one_example_of_the_other_kind_is_told_as_such(params):
    """The one point is 'not tree': the message says so instead of '1 given, 1 inside'."""
    with pytest.raises(InputError, match="1 example given, all inside the raster, 0 of them") as refused:
        teach(params, [Example(10, 10, False)])
    assert "\n" not in str(refused.value)


def test_examples_outside_the_raster_are_left_out_with_a_word(params):
    outside = [*EXAMPLES, Example(5000, 5000, True), Example(-40, 10, False)]
    record = teach(params, outside)
    assert record["examples"] == {"trees": 2, "not_trees": 2}
    assert "2 of 6 examples lie outside the raster and were left out" in record["threshold_note"]
    assert "outside" not in teach(params, EXAMPLES)["threshold_note"]


def test_threshold_out_of_range(params):
    with pytest.raises(InputError, match="between 0 and 1"):
        teach(params, EXAMPLES, threshold=1.5)


def test_one_example_needs_only_the_store(params, tiny_model_dir):
    backbone = load_backbone(str(tiny_model_dir), device="cpu")
    record = teach(params, EXAMPLES[:1], threshold=0.7, load_model=lambda wanted: backbone)
    assert record["examples"] == {"trees": 1, "not_trees": 0}


def test_the_default_threshold_is_one_half_on_calibrated_probabilities(params, scene_tif):
    _, crowns = scene_tif
    record = teach(params, EXAMPLES)
    assert record["threshold_source"] == "calibrated" and record["threshold"] == 0.5
    assert "on calibrated probabilities from the 2 + 2 examples" in record["threshold_note"]
    assert record["temperature"] > 0
    scores = band(record["outputs"]["similarity"])
    trees = band(record["outputs"]["taught_trees"]) == 1
    assert (trees == (scores >= 0.5)).all()
    assert (trees & crowns).sum() / (trees | crowns).sum() > 0.75
    overridden = teach(params, EXAMPLES, threshold=0.9)
    assert overridden["threshold_source"] == "user" and overridden["threshold"] == 0.9


def test_one_odd_click_cannot_swing_the_mask(params, scene_tif):
    """A 'not a tree' click on the edge of a crown (its features half tree) moves the mask little."""
    _, crowns = scene_tif
    clean = band(teach(params, EXAMPLES)["outputs"]["taught_trees"]) == 1
    odd = band(teach(params, [*EXAMPLES, Example(80, 112, False)])["outputs"]["taught_trees"]) == 1
    assert (clean != odd).mean() < 0.05
    assert (odd & crowns).sum() / (odd | crowns).sum() > 0.7


def test_class_examples_alone_are_told_apart_from_the_raster(params, scene_tif):
    _, crowns = scene_tif
    record = teach(params, EXAMPLES[:2])
    assert record["examples"] == {"trees": 2, "not_trees": 0}
    assert "told apart from the raster as a whole" in record["threshold_note"]
    assert "too few examples" in record["threshold_note"]
    trees = band(record["outputs"]["taught_trees"]) == 1
    assert (trees & crowns).sum() / (trees | crowns).sum() > 0.6


def test_any_class_is_named_in_the_outputs(params):
    record = teach(params, EXAMPLES, class_name="Dead tree")
    assert record["class"] == "Dead tree"
    assert record["outputs"]["taught_trees"].endswith("_taught_dead_tree.tif")
    assert record["outputs"]["similarity"].endswith("_dead_tree_similarity.tif")
    assert record["outputs"]["teach_record"].endswith("_dead_tree_teach.json")
    trees = teach(params, EXAMPLES)
    assert trees["outputs"]["taught_trees"].endswith("_taught_trees.tif")
    assert band(record["outputs"]["taught_trees"]).tolist() == band(trees["outputs"]["taught_trees"]).tolist()


def test_cli_teaches_a_named_class_and_prints_the_chosen_threshold(params, tmp_path):
    examples = tmp_path / "clicks.csv"
    examples.write_text("col,row,is_tree\n" + "".join(f"{e.col},{e.row},{int(e.is_tree)}\n" for e in EXAMPLES))
    result = subprocess.run([sys.executable, "-m", "treeseg_qgis", "teach", params.input_path, "--examples",
                             str(examples), "--out", params.output_dir, "--model", params.model, "--device", "cpu",
                             "--class-name", "dead tree"], capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 dead tree and 2 other examples, threshold" in result.stdout
    assert "on calibrated probabilities from the 2 + 2 examples" in result.stdout
    assert any(line.endswith("_taught_dead_tree.tif") for line in result.stdout.splitlines())


@pytest.fixture
def soap_061(tmp_path):
    """SOAP_061 on a local 0.1 m grid, and its boxes: (xmin, ymin, xmax, ymax, label)."""
    sample = REPO / "resources" / "sample"
    path = tmp_path / "SOAP_061.tif"
    gdal.Translate(str(path), str(sample / "SOAP_061.png"), format="GTiff", outputSRS="EPSG:32611",
                   outputBounds=[0, 40, 40, 0], bandList=[1, 2, 3])
    with open(sample / "SOAP_061_crowns_px.csv", newline="") as handle:
        boxes = [(float(r["xmin"]), float(r["ymin"]), float(r["xmax"]), float(r["ymax"]), r["label"])
                 for r in csv.DictReader(handle)]
    return path, boxes


def three_class_clicks(boxes) -> list[Example]:
    """Five clicks each at live and dead crown centres, and five on ground far from every box."""
    centre = {"Alive": "live tree", "Dead": "dead tree"}
    clicks = []
    for label, name in centre.items():
        clicks += [Example((b[0] + b[2]) / 2, (b[1] + b[3]) / 2, label=name) for b in boxes if b[4] == label][:5]
    inside = np.zeros((400, 400), bool)
    for xmin, ymin, xmax, ymax, _ in boxes:
        inside[int(ymin):int(ymax), int(xmin):int(xmax)] = True
    rows, cols = np.nonzero(~inside[::40, ::40])
    clicks += [Example(c * 40 + 20, r * 40 + 20, label="other") for r, c in zip(rows[::7][:5], cols[::7][:5])]
    return clicks


def test_three_classes_on_soap_061_write_a_class_raster_naming_them(tiny_model_dir, soap_061, tmp_path):
    path, boxes = soap_061
    params = SegmentationParams(input_path=str(path), output_dir=str(tmp_path / "out"), model=str(tiny_model_dir),
                                device="cpu", cache_dir=str(tmp_path / "cache"), tile_size=128, overlap=32)
    record = teach(params, three_class_clicks(boxes))
    assert record["classes"] == ["live tree", "dead tree", "other"]
    assert record["examples"] == {"live tree": 5, "dead tree": 5, "other": 5}
    dataset = gdal.Open(record["outputs"]["classes"])
    band_1 = dataset.GetRasterBand(1)
    assert band_1.DataType == gdal.GDT_Byte and band_1.GetColorTable() is not None
    assert band_1.GetCategoryNames()[:4] == ["unsure", "live tree", "dead tree", "other"]
    values = band_1.ReadAsArray()
    assert set(np.unique(values)) <= {0, 1, 2, 3} and len(set(np.unique(values)) - {0}) >= 2
    probabilities = gdal.Open(record["outputs"]["class_probabilities"])
    assert probabilities.RasterCount == 3
    assert [probabilities.GetRasterBand(i + 1).GetDescription() for i in range(3)] == record["classes"]
    stack = probabilities.ReadAsArray()
    assert np.allclose(stack.sum(0), 1.0, atol=1e-3)
    assert ((stack.max(0) < 0.5) == (values == 0)).mean() > 0.99
    assert sum(record["class_cover"].values()) == pytest.approx(1.0, abs=1e-3)
    polygons = ogr.Open(record["outputs"]["class_polygons"])
    names = {feature.GetField("class") for feature in polygons.GetLayer(0)}
    assert names and names <= set(record["classes"]) and record["polygons"] == polygons.GetLayer(0).GetFeatureCount()
    assert record["outputs"]["teach_record"].endswith("_classes_teach.json")


def test_points_with_a_class_field_through_the_cli(params, tmp_path):
    clicks = tmp_path / "clicks.csv"
    clicks.write_text("col,row,class\n80,70,crown\n300,90,crown\n200,20,ground\n380,300,ground\n10,10,\n")
    result = subprocess.run([sys.executable, "-m", "treeseg_qgis", "teach", params.input_path, "--examples",
                             str(clicks), "--out", params.output_dir, "--model", params.model, "--device", "cpu"],
                            capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 classes from 2 crown, 2 ground examples" in result.stdout
    outputs = result.stdout.strip().splitlines()[-4:]
    assert [Path(p).name for p in outputs] == ["scene_classes.tif", "scene_class_probabilities.tif",
                                               "scene_class_polygons.gpkg", "scene_classes_teach.json"]
    dataset = gdal.Open(outputs[0])
    band_1 = dataset.GetRasterBand(1)
    assert band_1.GetColorTable() is not None  # GDAL 3.6 reads the .aux.xml categories only after that
    assert band_1.GetCategoryNames()[:3] == ["unsure", "crown", "ground"]


def test_several_classes_need_two_of_them(params):
    with pytest.raises(InputError, match="at least two classes inside the raster"):
        teach(params, [Example(80, 70, label="crown"), Example(300, 90, label="crown"),
                       Example(5000, 10, label="ground")])
    assert not list(Path(params.output_dir).glob("*_classes*"))


@pytest.fixture
def survey_of_three(tmp_path, tiny_model_dir):
    """Three scenes of one survey and the cluster model fitted on them."""
    from treeseg_qgis.engine.survey import fit_survey

    from .conftest import disc_scene, write_geotiff

    paths = []
    for seed, centres in enumerate(([(70, 80), (90, 300), (220, 180)], [(60, 60), (200, 250)],
                                    [(100, 100), (240, 320), (60, 330)])):
        image, _ = disc_scene(320, 400, centres, radius=40, seed=seed)
        paths.append(write_geotiff(tmp_path / f"plot_{seed}.tif", image))
    model = tmp_path / "survey.treeseg"
    fit_survey([str(p) for p in paths], survey_params(tiny_model_dir, paths[0], tmp_path), model)
    return paths, model


def survey_params(tiny_model_dir, path, tmp_path, **options) -> SegmentationParams:
    return SegmentationParams(input_path=str(path), output_dir=str(tmp_path / "out"), model=str(tiny_model_dir),
                              device="cpu", cache_dir=str(tmp_path / "cache"), tile_size=128, overlap=32, **options)


CLASS_CLICKS = [Example(80, 70, label="crown"), Example(300, 90, label="crown"), Example(180, 220, label="crown"),
                Example(200, 10, label="ground"), Example(390, 310, label="ground"), Example(10, 300, label="ground")]


def class_legend(path) -> tuple[list[str], list[tuple]]:
    dataset = gdal.Open(str(path))
    band_1 = dataset.GetRasterBand(1)
    table = band_1.GetColorTable()
    return band_1.GetCategoryNames()[:4], [table.GetColorEntry(i) for i in range(4)]


def test_a_taught_classifier_applied_to_three_rasters_gives_one_legend(tiny_model_dir, survey_of_three, tmp_path):
    (first, *others), model = survey_of_three
    saved = tmp_path / "crowns.treeseg"
    taught = teach(survey_params(tiny_model_dir, first, tmp_path, cluster_model=str(model)), CLASS_CLICKS,
                   save_classifier=str(saved))
    assert taught["classifier"] == {"saved": str(saved)} and taught["outputs"]["classifier"] == str(saved)
    records = [teach(survey_params(tiny_model_dir, path, tmp_path, cluster_model=str(model)), None,
                     classifier=str(saved)) for path in others]
    legends = {json.dumps(class_legend(record["outputs"]["classes"])) for record in [taught, *records]}
    assert len(legends) == 1 and class_legend(taught["outputs"]["classes"])[0] == ["unsure", "crown", "ground", ""]
    assert all(record["classes"] == ["crown", "ground"] and record["classifier"] == {"applied": str(saved)}
               for record in records)
    again = teach(survey_params(tiny_model_dir, first, tmp_path / "again", cluster_model=str(model)), None,
                  classifier=str(saved))
    assert band(again["outputs"]["classes"]).tolist() == band(taught["outputs"]["classes"]).tolist()


def test_a_damaged_edited_or_misused_classifier_is_refused_in_one_line(tiny_model_dir, survey_of_three, tmp_path):
    (first, second, _), model = survey_of_three
    saved = tmp_path / "crowns.treeseg"
    params = survey_params(tiny_model_dir, first, tmp_path, cluster_model=str(model))
    teach(params, CLASS_CLICKS, save_classifier=str(saved))
    apply = survey_params(tiny_model_dir, second, tmp_path / "b", cluster_model=str(model))

    damaged = tmp_path / "damaged.treeseg"
    damaged.write_bytes(saved.read_bytes()[:200])
    edited = tmp_path / "edited.treeseg"
    with np.load(saved) as data:
        header = json.loads(bytes(data["header"]).decode())
        header["classes"].append("roof")  # a class without weights
        with open(edited, "wb") as handle:
            np.savez(handle, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
                     weights=data["weights"], offsets=data["offsets"])
    fifo = tmp_path / "fifo.treeseg"
    os.mkfifo(fifo)
    for path, reason in ((damaged, "is not a treeseg taught classifier, or it is damaged"),
                         (edited, "is damaged or was edited"), (fifo, "is not a regular file"),
                         (model, "is not a treeseg taught classifier")):
        with pytest.raises(InputError, match=reason) as refused:
            teach(apply, None, classifier=str(path))
        assert "\n" not in str(refused.value)
    with pytest.raises(InputError, match="give the survey cluster model"):
        teach(survey_params(tiny_model_dir, second, tmp_path / "c"), None, classifier=str(saved))
    with pytest.raises(InputError, match="one of this run's inputs"):
        teach(params, CLASS_CLICKS, save_classifier=str(model))
    assert not list((tmp_path / "b").glob("*")) or not list((tmp_path / "b" / "out").glob("*_classes*"))
    size = saved.stat().st_size
    with pytest.raises(InputError):
        teach(params, [Example(80, 70, label="crown")], save_classifier=str(saved))
    assert saved.stat().st_size == size  # a failed teach leaves the saved classifier as it was


def cli_options(tiny_model_dir, tmp_path) -> list[str]:
    return ["--model", str(tiny_model_dir), "--device", "cpu", "--tile-size", "128", "--cache-dir",
            str(tmp_path / "cache"), "--quiet"]


def every_file(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_segment_many_applies_a_taught_classifier_to_three_rasters_with_one_legend(
        tiny_model_dir, survey_of_three, tmp_path, capsys):
    from treeseg_qgis.engine.cli import main

    paths, model = survey_of_three
    saved = tmp_path / "crowns.treeseg"
    taught = teach(survey_params(tiny_model_dir, paths[0], tmp_path, cluster_model=str(model)), CLASS_CLICKS,
                   save_classifier=str(saved))
    out = tmp_path / "survey_out"
    assert main(["segment-many", *map(str, paths), "--out", str(out), "--cluster-model", str(model),
                 "--classifier", str(saved), *cli_options(tiny_model_dir, tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "taught classes crown, ground in every raster" in printed and printed.count("crown ") == 3
    summary = json.loads((out / "survey_summary.json").read_text())
    assert summary["classifier"] == {"path": str(saved), "classes": ["crown", "ground"],
                                     "values": {"crown": 1, "ground": 2}, "unsure_value": 0,
                                     "colours": {"crown": "#228b22", "ground": "#a0a0a0"}}
    class_rasters = [out / f"{path.stem}_classes.tif" for path in paths]
    assert [row["taught_outputs"]["classes"] for row in summary["rasters"]] == list(map(str, class_rasters))
    legends = {json.dumps(class_legend(path)) for path in [*class_rasters, Path(taught["outputs"]["classes"])]}
    assert len(legends) == 1 and class_legend(class_rasters[0])[0] == ["unsure", "crown", "ground", ""]
    for path in paths:  # every raster: its segmentation, its class outputs and their record, at final paths
        record = json.loads((out / f"{path.stem}_classes_teach.json").read_text())
        assert record["classifier"] == {"applied": str(saved)} and record["outputs"]["classes"] == str(
            out / f"{path.stem}_classes.tif")
        assert (out / f"{path.stem}_class_polygons.gpkg").is_file() and (out / f"{path.stem}_clusters.tif").is_file()
    assert band(str(class_rasters[0])).tolist() == band(taught["outputs"]["classes"]).tolist()
    with open(out / "survey_summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["crown_cover"]) for row in rows] == [row["class_cover"]["crown"] for row in summary["rasters"]]
    assert not list(out.glob(".treeseg-staging-*"))


def test_a_taught_classifier_on_two_dask_workers_writes_what_one_process_writes(
        tiny_model_dir, survey_of_three, tmp_path, capsys):
    """The rasters segmented on a Dask LocalCluster, then taught from the features the workers cached: the same
    class rasters, class polygons and legend as one process, and no worker process left behind."""
    import psutil

    from treeseg_qgis.engine.cli import main

    paths, model = survey_of_three
    saved = tmp_path / "crowns.treeseg"
    teach(survey_params(tiny_model_dir, paths[0], tmp_path, cluster_model=str(model)), CLASS_CLICKS,
          save_classifier=str(saved))
    for workers in (1, 2):
        assert main(["segment-many", *map(str, paths), "--out", str(tmp_path / f"w{workers}"), "--cluster-model",
                     str(model), "--classifier", str(saved), "--workers", str(workers),
                     *cli_options(tiny_model_dir, tmp_path), "--cache-dir", str(tmp_path / f"cache{workers}")]) == 0
        records = [json.loads((tmp_path / f"w{workers}" / f"{path.stem}_classes_teach.json").read_text())
                   for path in paths]
        assert [record["feature_cache"] for record in records] == ["hit"] * 3
    summaries = [json.loads((tmp_path / f"w{n}" / "survey_summary.json").read_text()) for n in (1, 2)]
    assert summaries[0]["classifier"] == summaries[1]["classifier"] and summaries[1]["classifier"]["classes"] == [
        "crown", "ground"]
    for path in paths:
        one, two = (tmp_path / f"w{n}" / f"{path.stem}_classes.tif" for n in (1, 2))
        assert band(str(one)).tolist() == band(str(two)).tolist() and class_legend(one) == class_legend(two)
        assert (tmp_path / "w2" / f"{path.stem}_class_polygons.gpkg").is_file()
    left = [" ".join(child.cmdline()) for child in psutil.Process().children(recursive=True)]
    assert not [line for line in left if "resource_tracker" not in line]


def test_segment_many_refuses_a_bad_or_misused_classifier_in_one_line_before_any_work(
        tiny_model_dir, survey_of_three, tmp_path, capsys):
    from treeseg_qgis.engine.cli import EXIT_USER_ERROR, main
    from treeseg_qgis.engine.survey import fit_survey

    paths, model = survey_of_three
    saved = tmp_path / "crowns.treeseg"
    teach(survey_params(tiny_model_dir, paths[0], tmp_path, cluster_model=str(model)), CLASS_CLICKS,
          save_classifier=str(saved))
    other_model = tmp_path / "other.treeseg"  # fitted on two of the rasters: another PCA
    fit_survey([str(p) for p in paths[1:]], survey_params(tiny_model_dir, paths[1], tmp_path), other_model)
    out = tmp_path / "survey_out"
    out.mkdir()
    (out / "plot_1_classes.tif").write_bytes(b"an earlier run's file")
    damaged = tmp_path / "damaged.treeseg"
    damaged.write_bytes(saved.read_bytes()[:300])
    fifo = tmp_path / "fifo.treeseg"
    os.mkfifo(fifo)
    over_an_output = out / "plot_2_classes_teach.json"  # the classifier where a raster's class record would go
    over_an_output.write_bytes(saved.read_bytes())
    before = every_file(tmp_path / "survey_out")
    inputs = [*map(str, paths), "--out", str(out)]
    for arguments, reason in (
            (["--cluster-model", str(model), "--classifier", str(damaged)], "is not a treeseg taught classifier, or"),
            (["--cluster-model", str(model), "--classifier", str(fifo)], "is not a regular file"),
            (["--cluster-model", str(model), "--classifier", str(model)], "is not a treeseg taught classifier"),
            (["--cluster-model", str(other_model), "--classifier", str(saved)], "another survey cluster model"),
            (["--classifier", str(saved)], "give the survey cluster model it was taught with"),
            (["--cluster-model", str(model), "--classifier", str(over_an_output)], "would overwrite the input")):
        assert main(["segment-many", *inputs, *arguments, *cli_options(tiny_model_dir, tmp_path)]) == EXIT_USER_ERROR
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and reason in lines[0] and "Traceback" not in lines[0], (arguments, lines)
        assert every_file(out) == before


def test_cli_teach_needs_examples_or_a_classifier(params):
    result = subprocess.run([sys.executable, "-m", "treeseg_qgis", "teach", params.input_path, "--out",
                             params.output_dir], capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "Give the examples (--examples) or a taught classifier" in result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(params.output_dir)
