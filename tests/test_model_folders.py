"""Broken model folders give one clear line, and weights that do not cover the model are untrained (issue 20)."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from treeseg_qgis.engine.cli import main

from .conftest import disc_scene, write_geotiff


def config(folder, **changes):
    values = json.loads((folder / "config.json").read_text())
    values.update(changes)
    (folder / "config.json").write_text(json.dumps(values))


def weights(folder, keep):
    tensors = load_file(str(folder / "model.safetensors"))
    kept = {key: value for key, value in tensors.items() if keep(key)}
    save_file(kept, str(folder / "model.safetensors"), metadata={"format": "pt"})


DAMAGE = {
    "truncated weights": (lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:5000]), "cannot be loaded"),
    "garbage weights": (lambda d: (d / "model.safetensors").write_bytes(os.urandom(3000)), "cannot be loaded"),
    "only unrelated tensors": (lambda d: save_file({"foo": torch.zeros(3)}, str(d / "model.safetensors")),
                               "do not cover the model: 41 tensors are missing"),
    "fewer layers than its config": (lambda d: weights(d, lambda key: "layer.1." not in key),
                                     "do not cover the model: 17 tensors are missing"),
    "hidden size not a multiple of the heads": (lambda d: config(d, hidden_size=63), "not a multiple"),
    "patch size 7": (lambda d: config(d, patch_size=7), "16-pixel patch grid"),
    "out_indices past the layers": (lambda d: config(d, out_indices=[1, 5]), "more than its 2 layers"),
    "negative register tokens": (lambda d: config(d, num_register_tokens=-2), "num_register_tokens must be"),
    "config.json a list": (lambda d: (d / "config.json").write_text("[1, 2]"), "a JSON object is expected"),
    "config.json invalid": (lambda d: (d / "config.json").write_text("{bad"), "config.json cannot be read"),
    "preprocessor std 0": (lambda d: (d / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5] * 3, "image_std": [0, 0, 0]})), "image_std above 0"),
}


@pytest.fixture
def raster(tmp_path):
    image, _ = disc_scene(96, 96, [(48, 48)], radius=20)
    return write_geotiff(tmp_path / "in.tif", image)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_broken_model_folder_is_one_clear_line_and_leaves_nothing(damage, tiny_model_dir, raster, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    edit, message = DAMAGE[damage]
    edit(folder)
    status = main(["segment", str(raster), "--out", str(tmp_path / "out"), "--model", str(folder), "--device", "cpu",
                   "--clusters", "2", "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and error[-1].startswith("treeseg: error: ") and message in error[-1], error
    assert "Traceback" not in "\n".join(error)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


def test_weights_that_miss_tensors_run_only_when_allowed_and_are_marked_untrained(tiny_model_dir, raster, tmp_path,
                                                                                 capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    weights(folder, lambda key: "layer.1." not in key)
    status = main(["segment", str(raster), "--out", str(tmp_path / "out"), "--model", str(folder), "--device", "cpu",
                   "--clusters", "2", "--allow-untrained", "--no-cache", "--quiet"])
    assert status == 0, capsys.readouterr().err
    (record_file,) = (tmp_path / "out").glob("*_run.json")
    record = json.loads(record_file.read_text())
    assert "UNTRAINED" in record_file.name and record["model"]["untrained"] is True
    assert record["model"]["weights"] != "pretrained" and "UNTRAINED WEIGHTS" in record["warning"]
