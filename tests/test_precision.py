"""The forward's precision: float32 the reference and auto on the CPU, bfloat16 and int8 when asked for,
what ran in the run record, and the precision in the feature cache key."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from treeseg_qgis.engine.core import devices
from treeseg_qgis.engine.core.errors import InputError
from treeseg_qgis.engine.core.features import FeatureExtractor
from treeseg_qgis.engine.core.models import load_backbone
from treeseg_qgis.engine.pipeline import segment
from treeseg_qgis.params import ParameterError, SegmentationParams

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tile():
    return np.random.default_rng(3).random((64, 96, 3)).astype(np.float32)


def features(model_dir, precision: str, tile: np.ndarray) -> tuple[np.ndarray, dict]:
    backbone = load_backbone(str(model_dir), device="cpu", precision=precision)
    return FeatureExtractor(backbone, stride=16).extract(tile), backbone.describe()


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_cpu_precisions_run_and_stay_close_to_float32(tiny_model_dir, tile, precision):
    reference, described = features(tiny_model_dir, "float32", tile)
    assert described["precision"] == "float32"
    other, described = features(tiny_model_dir, precision, tile)
    assert described["precision"] == precision
    cosine = np.sum(reference * other, axis=-1)
    assert not np.array_equal(reference, other)  # the other precision really ran
    assert cosine.mean() > 0.99


def test_int8_quantises_the_linear_layers(tiny_model_dir):
    backbone = load_backbone(str(tiny_model_dir), device="cpu", precision="int8")
    kinds = {type(module).__name__ for module in backbone.model.modules()}
    assert "Linear" in kinds and not any(isinstance(module, torch.nn.Linear) and type(module) is torch.nn.Linear
                                         for module in backbone.model.modules())
    assert any("quantized" in type(module).__module__ for module in backbone.model.modules())


def test_auto_is_the_float32_reference_on_the_cpu(tiny_model_dir):
    assert devices.resolve_precision(CPU, "auto") == "float32"
    assert load_backbone(str(tiny_model_dir), device="cpu").describe()["precision"] == "float32"


def test_unknown_precision_and_int8_on_a_gpu_are_refused():
    with pytest.raises(ParameterError, match="precision 'fp8'"):
        SegmentationParams(input_path="a.tif", output_dir="out", precision="fp8").validate()
    with pytest.raises(InputError, match="int8 is a CPU precision"):
        devices.resolve_precision(torch.device("cuda"), "int8")


def test_the_run_record_says_what_ran_and_the_cache_keeps_precisions_apart(tiny_model_dir, scene_tif, tmp_path):
    path, _ = scene_tif

    def run(precision: str, out: str) -> dict:
        return segment(SegmentationParams(input_path=str(path), output_dir=str(tmp_path / out),
                                          model=str(tiny_model_dir), device="cpu", precision=precision,
                                          clusters=2, cache_dir=str(tmp_path / "cache"), tile_size=128,
                                          overlap=32))

    first = run("int8", "a")
    assert first["model"]["precision"] == "int8" and first["feature_cache"]["state"] == "miss"
    assert run("float32", "b")["feature_cache"]["state"] == "miss"
    again = run("int8", "c")
    assert again["feature_cache"]["state"] == "hit" and again["model"]["precision"] == "int8"


def test_cli_precision_flag_reaches_the_record(tiny_model_dir, scene_tif, tmp_path):
    path, _ = scene_tif
    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, "-m", "treeseg_qgis", "segment", str(path), "--out", str(out),
                           "--model", str(tiny_model_dir), "--device", "cpu", "--precision", "bfloat16",
                           "--clusters", "2", "--tile-size", "128", "--no-cache"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "in bfloat16" in done.stdout
    record = json.loads(next(out.glob("*.json")).read_text())
    assert record["model"]["precision"] == "bfloat16"
