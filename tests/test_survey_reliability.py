"""Surveys held to the single-raster standard, as a careless user would try them: outputs never over inputs,
a survey's files appear together or not at all, damaged or edited cluster models and pipes are one line, a
model fitted on other weights is refused, untrained and empty rasters are said so (issue #26)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from osgeo import gdal, ogr
from safetensors.torch import load_file, save_file

from treeseg_qgis.engine.cli import EXIT_SOME_FAILED, EXIT_USER_ERROR, main
from treeseg_qgis.engine.core.errors import InputError
from treeseg_qgis.engine.pipeline import segment
from treeseg_qgis.engine.survey import fit_survey

from .conftest import REPO, write_geotiff
from .test_survey import params_for, scene

gdal.UseExceptions()
TINY = ["--device", "cpu", "--tile-size", "128"]


def md5s(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) by its md5."""
    return {str(path.relative_to(folder)): hashlib.md5(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.fixture
def rasters(tmp_path):
    return scene(tmp_path / "a.tif", seed=1), scene(tmp_path / "b.tif", seed=2, centres=((60, 60), (200, 250)))


@pytest.fixture
def fitted(rasters, tmp_path, tiny_model_dir):
    model = tmp_path / "fitted.treeseg"
    fit_survey([str(path) for path in rasters], params_for(tiny_model_dir, "", tmp_path, tmp_path / "cache"), model)
    return model


def test_fit_refuses_an_output_over_an_input_a_glob_and_a_missing_folder_before_any_work(
        rasters, tmp_path, tiny_model_dir, capsys):
    first, second = rasters
    flight = tmp_path / "flight"
    flight.mkdir()
    for path in rasters:
        shutil.copy(path, flight / path.name)
    before = md5s(tmp_path)
    common = ["--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache"), *TINY]
    cases = {
        "over its input": (["fit", str(first), "--out", str(first)], "must end in .treeseg"),
        # `fit --out flight/*.tif` as the shell expands it: the first raster after --out, the rest inputs.
        "a glob after --out": (["fit", *common, "--out", *sorted(map(str, flight.glob("*.tif")))],
                               "must end in .treeseg"),
        "a missing folder": (["fit", str(first), "--out", str(tmp_path / "missing" / "s.treeseg")], "does not exist"),
        "a folder": (["fit", str(first), "--out", str(flight)], "must end in .treeseg"),
    }
    for name, (argv, message) in cases.items():
        argv = argv if "--model" in argv else [*argv, *common]
        assert main(argv) == EXIT_USER_ERROR, name
        lines = error_lines(capsys)
        assert len(lines) == 1 and message in lines[0], (name, lines)
    assert md5s(tmp_path) == before and not (tmp_path / "cache").exists()  # nothing read, nothing written


def test_fit_refuses_a_vrt_source_as_its_output(rasters, tmp_path, tiny_model_dir, capsys):
    """A .treeseg name that a VRT reads (absurd, but a careless user's): refused, the source unchanged."""
    first, _ = rasters
    source = tmp_path / "source.treeseg"
    shutil.copy(first, source)
    gdal.Translate(str(tmp_path / "v.vrt"), str(source), format="VRT")
    before = md5s(tmp_path)
    assert main(["fit", str(tmp_path / "v.vrt"), "--out", str(source), "--model", str(tiny_model_dir), *TINY]) == 2
    assert "would overwrite the input" in error_lines(capsys)[0]
    assert md5s(tmp_path) == before


def test_segment_many_and_evaluate_refuse_an_output_over_an_input_before_any_work(
        rasters, tmp_path, tiny_model_dir, capsys):
    first, second = rasters
    out = tmp_path / "out"
    out.mkdir()
    # A VRT whose source would be overwritten by the other raster's clusters.
    shutil.copy(first, out / "b_clusters.tif")
    gdal.Translate(str(tmp_path / "v.vrt"), str(out / "b_clusters.tif"), format="VRT")
    boxes = out / "a_evaluation.csv"
    boxes.write_text("xmin,ymin,xmax,ymax\n1,1,20,20\n")
    before = md5s(tmp_path)
    assert main(["segment-many", str(second), str(tmp_path / "v.vrt"), "--out", str(out), "--model",
                 str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache"), *TINY]) == EXIT_USER_ERROR
    lines = error_lines(capsys)
    assert len(lines) == 1 and "would overwrite the input" in lines[0] and "b_clusters.tif" in lines[0]
    assert main(["evaluate", str(first), "--reference", str(boxes), "--out", str(out)]) == EXIT_USER_ERROR
    lines = error_lines(capsys)
    assert len(lines) == 1 and "would overwrite the input" in lines[0]
    assert md5s(tmp_path) == before and not (tmp_path / "cache").exists()


def test_a_raster_named_survey_keeps_its_own_polygons(rasters, tmp_path, tiny_model_dir):
    first, second = rasters
    named = shutil.copy(first, tmp_path / "survey.tif")
    out = tmp_path / "out"
    assert main(["segment-many", str(named), str(second), "--out", str(out), "--model", str(tiny_model_dir),
                 "--cache-dir", str(tmp_path / "cache"), "--quiet", *TINY]) == 0
    summary = json.loads((out / "survey_summary.json").read_text())
    assert [row["stem"] for row in summary["rasters"]] == ["survey_2", "b"]
    assert summary["rasters"][0]["outputs"]["polygons"] == str(out / "survey_2_polygons.gpkg")
    own = ogr.Open(str(out / "survey_2_polygons.gpkg"))  # kept open while its layer is read
    assert own.GetLayer(0).GetLayerDefn().GetFieldIndex("source") < 0 and own.GetLayer(0).GetFeatureCount() > 0
    merged = ogr.Open(str(out / "survey_polygons.gpkg"))
    assert {feature["source"] for feature in merged.GetLayer(0)} == {"survey_2", "b"}
    record = json.loads((out / "survey_2_run.json").read_text())
    assert record["outputs"]["clusters"] == str(out / "survey_2_clusters.tif")  # final paths, not the staging's
    assert record["cluster_model"]["path"] == str(out / "survey.treeseg")
    assert not list(out.glob(".treeseg-staging-*"))


def test_an_interrupted_rerun_keeps_the_earlier_survey_byte_identical(rasters, tmp_path, tiny_model_dir):
    """K=7, then K=3 stopped by SIGINT once "Raster 2 of 2" prints: every file of the K=7 survey (model,
    rasters, summary, merged polygons) byte-identical, nothing of the stopped run left."""
    out = tmp_path / "out"
    common = [*map(str, rasters), "--out", str(out), "--model", str(tiny_model_dir), "--no-cache", *TINY]
    assert main(["segment-many", *common, "--clusters", "7", "--quiet"]) == 0
    before = md5s(out)
    assert "survey.treeseg" in before and "a_clusters.tif" in before and "survey_summary.json" in before
    run = subprocess.Popen([sys.executable, "-m", "treeseg_qgis", "segment-many", *common, "--clusters", "3"],
                           cwd=REPO, start_new_session=True, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                           text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seen = []
    for line in run.stderr:  # waits for the line itself, however slow the machine
        seen.append(line)
        if "Raster 2 of 2" in line:
            os.killpg(run.pid, signal.SIGINT)
            break
    rest = run.stderr.read()
    assert run.wait() == 130, "".join(seen) + rest
    assert "Raster 2 of 2" in seen[-1]
    assert md5s(out) == before
    assert not list(out.glob(".treeseg-staging-*"))


STOPS_ON_THE_CLUSTER = [("Measuring valid area", signal.SIGINT), ("Sampled 1 of 2", signal.SIGTERM),
                        ("Cluster model written", signal.SIGINT)]


def test_a_survey_stopped_on_a_dask_cluster_says_only_its_one_line(rasters, tmp_path, tiny_model_dir):
    """`--workers 2` stopped (the whole process group signalled, as a terminal does) once the cluster has
    started, while it samples, and as it starts on the rasters: the worker processes and the scheduler say
    nothing, the command says its one line last, and the earlier survey stays byte-identical."""
    out = tmp_path / "out"
    common = [*map(str, rasters), "--out", str(out), "--model", str(tiny_model_dir), "--no-cache", *TINY]
    assert main(["segment-many", *common, "--clusters", "7", "--quiet"]) == 0
    before = md5s(out)
    progress_line = re.compile(r"^ *\d+\.\d %  ")
    for moment, stop in STOPS_ON_THE_CLUSTER:
        run = subprocess.Popen([sys.executable, "-m", "treeseg_qgis", "segment-many", *common, "--clusters", "3",
                                "--workers", "2"], cwd=REPO, start_new_session=True, stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        seen = []
        for line in run.stderr:  # waits for the line itself, however slow the machine
            seen.append(line)
            if moment in line:
                os.killpg(run.pid, stop)
                break
        after = run.stderr.read().splitlines()
        assert run.wait() == 128 + stop, "".join(seen) + "\n".join(after)
        assert moment in seen[-1] and all(progress_line.match(line) for line in seen), "".join(seen)
        assert after == [f"treeseg: stopped by {stop.name}; the earlier outputs are unchanged and nothing of this "
                         "run was kept."], "\n".join(after)
        assert md5s(out) == before, moment
        assert not list(out.glob(".treeseg-staging-*")) and not list(out.glob(".*treeseg-windows"))


def rewritten(model: Path, target: Path, header=None, **arrays) -> Path:
    """A copy of the cluster model with its header replaced by `header(old)` and arrays replaced."""
    with np.load(model) as data:
        contents = {name: data[name] for name in data}
    if header is not None:
        edited = header(json.loads(bytes(contents["header"]).decode()))
        contents["header"] = np.frombuffer(json.dumps(edited).encode(), dtype=np.uint8)
    contents.update({name: change(contents[name]) for name, change in arrays.items()})
    buffer = io.BytesIO()
    np.savez(buffer, **contents)
    target.write_bytes(buffer.getvalue())
    return target


EDITS = {
    "header a list": ({"header": lambda h: [h]}, "not a treeseg cluster model"),
    "header a string": ({"header": lambda h: "survey"}, "not a treeseg cluster model"),
    "settings a string": ({"header": lambda h: {**h, "settings": "stride 16"}}, "'settings' should be an object"),
    "inertia key abc": ({"header": lambda h: {**h, "inertia_curve": {"abc": 1.0}}}, "'inertia_curve'"),
    "k text": ({"header": lambda h: {**h, "k": "3"}}, "'k' should be a whole number"),
    "tree cluster beyond K": ({"header": lambda h: {**h, "tree_clusters": [99]}}, "'tree_clusters'"),
    "centres one row": ({"centres": lambda c: c[:1]}, "'centres' should be of shape"),
    "centres wider": ({"centres": lambda c: np.hstack([c, c])}, "'centres' should be of shape"),
    "centres 3-D": ({"centres": lambda c: c[None]}, "'centres' should be of shape"),
    "centres NaN": ({"centres": lambda c: np.full_like(c, np.nan)}, "not finite"),
    "centres integers": ({"centres": lambda c: c.astype(np.int64)}, "floating-point"),
    "PCA mean infinite": ({"pca_mean": lambda m: m * np.inf}, "not finite"),
    "components for other features": ({"pca_components": lambda c: c[:, :5]}, "'pca_components' should be"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_damaged_or_edited_cluster_model_is_one_line(edit, fitted, rasters, tmp_path, tiny_model_dir, capsys):
    changes, message = EDITS[edit]
    edited = rewritten(fitted, tmp_path / "edited.treeseg", **changes)
    before = md5s(tmp_path)
    status = main(["segment", str(rasters[0]), "--out", str(tmp_path / "out"), "--cluster-model", str(edited),
                   "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache"), *TINY])
    lines = error_lines(capsys)
    assert status == EXIT_USER_ERROR and len(lines) == 1 and message in lines[0], lines
    assert md5s(tmp_path) == before and not (tmp_path / "out").exists()


def test_pipes_and_devices_named_as_files_are_refused_at_once(fitted, rasters, tmp_path, tiny_model_dir, capsys):
    """A FIFO as the cluster model, the examples, the reference, a model folder's config.json; /dev/zero as the
    cluster model: one line each, no hang (os.stat, never open)."""
    pipe, csv_pipe = tmp_path / "pipe.treeseg", tmp_path / "pipe.csv"
    os.mkfifo(pipe)
    os.mkfifo(csv_pipe)
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    common = ["--cache-dir", str(tmp_path / "cache"), *TINY]
    first = str(rasters[0])
    cases = [
        ["segment", first, "--out", str(tmp_path / "o"), "--cluster-model", str(pipe), "--model",
         str(tiny_model_dir), *common],
        ["segment", first, "--out", str(tmp_path / "o"), "--cluster-model", "/dev/zero", "--model",
         str(tiny_model_dir), *common],
        ["segment-many", first, "--out", str(tmp_path / "o"), "--cluster-model", str(pipe), "--model",
         str(tiny_model_dir), *common],
        ["teach", first, "--examples", str(csv_pipe), "--out", str(tmp_path / "o"),
         "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"],
        ["evaluate", first, "--reference", str(csv_pipe), "--out", str(tmp_path / "o")],
        ["segment", first, "--out", str(tmp_path / "o"), "--model", str(folder), "--no-cache", *TINY],
    ]
    for argv in cases:
        assert main(argv) == EXIT_USER_ERROR, argv
        lines = error_lines(capsys)
        assert len(lines) == 1 and "not a regular file" in lines[0], (argv, lines)


def test_a_config_value_of_the_wrong_type_is_one_line(rasters, tmp_path, tiny_model_dir, capsys):
    for name, value in (("layer_norm_eps", "x"), ("apply_layernorm", 1), ("intermediate_size", 1.5)):
        folder = tmp_path / name
        shutil.copytree(tiny_model_dir, folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, name: value}))
        assert main(["segment", str(rasters[0]), "--out", str(tmp_path / "o"), "--model", str(folder),
                     "--no-cache", "--quiet", *TINY]) == EXIT_USER_ERROR
        lines = error_lines(capsys)
        assert len(lines) == 1 and f"{name} must be" in lines[0], lines


def other_weights(tiny_model_dir: Path, folder: Path, seed: int) -> Path:
    """The tiny model's files with every tensor drawn again (same shapes, other values)."""
    shutil.copytree(tiny_model_dir, folder)
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(tensor.shape, generator=generator).to(tensor.dtype)
               for name, tensor in load_file(str(folder / "model.safetensors")).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_a_cluster_model_applied_with_other_weights_is_refused_naming_both(
        rasters, tmp_path, tiny_model_dir, monkeypatch):
    """Fitted with `models/tiny` in one folder, applied from another whose `models/tiny` holds other weights:
    refused naming both identities; a copy of the same weights elsewhere is accepted."""
    here, there, copy = (tmp_path / name for name in ("here", "there", "copy"))
    shutil.copytree(tiny_model_dir, here / "models" / "tiny")
    other_weights(tiny_model_dir, there / "models" / "tiny", seed=5)
    shutil.copytree(tiny_model_dir, copy / "models" / "tiny")
    monkeypatch.chdir(here)
    model = here / "survey.treeseg"
    fit_survey([str(path) for path in rasters], params_for("models/tiny", "", here, tmp_path / "cache"), model)
    fitted_id = json.loads(bytes(np.load(model)["header"]).decode())["weights"]
    assert isinstance(fitted_id, str) and len(fitted_id) == 16
    monkeypatch.chdir(there)
    with pytest.raises(InputError, match="fitted with other weights") as refused:
        segment(params_for("models/tiny", rasters[0], there / "out", tmp_path / "cache", cluster_model=str(model)))
    assert fitted_id in str(refused.value) and str(refused.value).count("models/tiny") == 2
    assert not (there / "out").exists() or not list((there / "out").iterdir())
    monkeypatch.chdir(copy)
    record = segment(params_for("models/tiny", rasters[0], copy / "out", tmp_path / "cache",
                                cluster_model=str(model)))
    assert record.cluster_model.path == str(model)


def test_an_older_cluster_model_without_the_weights_identity_is_read_with_a_warning(
        fitted, rasters, tmp_path, tiny_model_dir, caplog):
    older = rewritten(fitted, tmp_path / "older.treeseg",
                      header=lambda h: {key: value for key, value in {**h, "version": 2}.items() if key != "weights"})
    record = segment(params_for(tiny_model_dir, rasters[0], tmp_path / "out", tmp_path / "cache",
                                cluster_model=str(older)))
    assert record.clusters.k >= 2
    assert "does not record its weights' identity" in caplog.text


def untrained_folder(tiny_model_dir: Path, folder: Path) -> Path:
    """The tiny model lacking one layer's tensors: loaded only with untrained weights allowed, then marked so."""
    shutil.copytree(tiny_model_dir, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({name: tensor for name, tensor in tensors.items() if "layer.1." not in name},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_segment_many_names_untrained_outputs_and_refuses_an_empty_raster(rasters, tmp_path, tiny_model_dir,
                                                                          capsys):
    empty = write_geotiff(tmp_path / "empty.tif", np.zeros((3, 200, 200), np.uint8), nodata=0)
    folder = untrained_folder(tiny_model_dir, tmp_path / "partial")
    out = tmp_path / "out"
    status = main(["segment-many", *map(str, rasters), str(empty), "--out", str(out), "--model", str(folder),
                   "--allow-untrained", "--cache-dir", str(tmp_path / "cache"), "--quiet", *TINY])
    assert status == EXIT_SOME_FAILED
    printed = capsys.readouterr()
    assert "UNTRAINED WEIGHTS" in printed.err and "empty.tif: FAILED: The raster has no valid pixels" in printed.out
    names = sorted(path.name for path in out.iterdir())
    assert {"survey_UNTRAINED.treeseg", "survey_UNTRAINED_summary.json", "survey_UNTRAINED_summary.csv",
            "survey_UNTRAINED_polygons.gpkg", "a_UNTRAINED_clusters.tif", "b_UNTRAINED_polygons.gpkg"} <= set(names)
    assert not [name for name in names if "UNTRAINED" not in name]
    summary = json.loads((out / "survey_UNTRAINED_summary.json").read_text())
    assert summary["untrained"] and summary["warning"].startswith("UNTRAINED WEIGHTS")
    assert [row["status"] for row in summary["rasters"]] == ["ok", "ok", "failed"]
    assert summary["rasters"][2]["error"].startswith("The raster has no valid pixels to segment")
    # The same raster through `segment --cluster-model` is refused alike.
    assert main(["segment", str(empty), "--out", str(tmp_path / "one"), "--cluster-model",
                 str(out / "survey_UNTRAINED.treeseg"), "--model", str(folder), "--allow-untrained",
                 "--cache-dir", str(tmp_path / "cache"), *TINY]) == EXIT_USER_ERROR
    assert "no valid pixels" in capsys.readouterr().err
    # A trained survey in the same folder replaces the untrained set whole.
    assert main(["segment-many", *map(str, rasters), "--out", str(out), "--model", str(tiny_model_dir),
                 "--cache-dir", str(tmp_path / "cache"), "--quiet", *TINY]) == 0
    assert not [path.name for path in out.iterdir() if "UNTRAINED" in path.name]


def test_a_survey_whose_commit_cannot_finish_keeps_the_earlier_set(rasters, tmp_path, tiny_model_dir,
                                                                   monkeypatch, capsys):
    """The summary cannot be written (simulated full disk) after every raster was segmented: the earlier survey
    stays byte-identical."""
    from treeseg_qgis.engine import survey

    out = tmp_path / "out"
    common = ["segment-many", *map(str, rasters), "--out", str(out), "--model", str(tiny_model_dir),
              "--cache-dir", str(tmp_path / "cache"), "--quiet", *TINY]
    assert main(common) == 0
    before = md5s(out)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", "survey_summary.csv")

    monkeypatch.setattr(survey, "_csv", disk_full)
    assert main([*common, "--clusters", "3"]) == EXIT_USER_ERROR
    assert "No space left on device" in capsys.readouterr().err
    assert md5s(out) == before


def test_the_header_checks_name_the_field(fitted):
    from treeseg_qgis.engine.core.survey_model import FORMAT_VERSION, header_problem

    with zipfile.ZipFile(fitted) as archive:
        assert "centres.npy" in archive.namelist()
    header = json.loads(bytes(np.load(fitted)["header"]).decode())
    assert header_problem(header, FORMAT_VERSION) is None
    assert "'cluster_exg' should be" in header_problem({**header, "cluster_exg": [1.0]}, FORMAT_VERSION)
    assert "'weights' should be text" in header_problem({**header, "weights": 5}, FORMAT_VERSION)
