"""`python -m treeseg_qgis segment`: exit codes and messages, run as a user runs it."""

import os
import subprocess
import sys
from pathlib import Path

from treeseg_qgis.engine.cli import build_parser, params_from_args, teach_params_from_args
from treeseg_qgis.params import Role, settings_with

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, tmp_path: Path, python_options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *python_options, "-m", "treeseg_qgis", *args], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)


def test_segment_succeeds_and_lists_the_outputs(tiny_model_dir, scene_tif, tmp_path):
    """A run without crowns imports nothing of scikit-image, and one with a set K nothing of matplotlib (fixed
    costs of every start otherwise: the preview is drawn with Pillow, only automatic K's elbow plot needs it)."""
    path, _ = scene_tif
    result = cli("segment", str(path), "--out", "out", "--model", str(tiny_model_dir), "--clusters", "2",
                 "--device", "cpu", tmp_path=tmp_path, python_options=("-X", "importtime"))
    assert result.returncode == 0, result.stderr
    assert "K=2" in result.stdout
    for suffix in ("_clusters.tif", "_trees.tif", "_polygons.gpkg", "_preview.png", "_run.json"):
        assert (tmp_path / "out" / f"scene{suffix}").is_file()
    imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "sklearn" in imported and not imported & {"skimage", "matplotlib"}


def test_a_finished_run_leaves_as_pythons_exit_does(tiny_model_dir, scene_tif, tmp_path):
    """The command ends without the interpreter's teardown (interrupts.exit_now), yet as a normal exit: every
    line it printed reaches the pipes, the untrained int8 export's scratch folder is gone and the exit status is
    the command's."""
    import shutil

    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"  # weights that do not cover the model: untrained, exported to a scratch folder
    shutil.copytree(tiny_model_dir, partial)
    tensors = load_file(partial / "model.safetensors")
    save_file({name: value for name, value in tensors.items() if "mlp" not in name}, partial / "model.safetensors",
              metadata={"format": "pt"})
    path, _ = scene_tif
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO),
               TMPDIR=str(scratch), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    result = subprocess.run([sys.executable, "-m", "treeseg_qgis", "segment", str(path), "--out", "out", "--model",
                             str(partial), "--clusters", "2", "--device", "cpu", "--precision", "int8",
                             "--allow-untrained", "--tile-size", "128"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "UNTRAINED" in result.stdout and result.stdout.rstrip().endswith("scene_UNTRAINED_run.json")
    assert "int8" in result.stdout and list(scratch.glob("treeseg-*")) == []
    missing = subprocess.run([sys.executable, "-m", "treeseg_qgis", "segment", "missing.tif", "--out", "elsewhere"],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert missing.returncode == 2 and missing.stderr.startswith("treeseg: error:")


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("treeseg: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    return errors[0]


def test_missing_input_exits_2_with_one_line(tmp_path):
    line = one_line_error(cli("segment", "missing.tif", "--out", "out", tmp_path=tmp_path))
    assert "missing.tif" in line


def test_unavailable_weights_exit_2_naming_the_model_page(scene_tif, tmp_path):
    path, _ = scene_tif
    line = one_line_error(cli("segment", str(path), "--out", "out", "--model", "large-sat", tmp_path=tmp_path))
    assert "https://huggingface.co/facebook/dinov3-vitl16-pretrain-sat493m" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_band_exits_2(scene_tif, tiny_model_dir, tmp_path):
    path, _ = scene_tif
    line = one_line_error(cli("segment", str(path), "--out", "out", "--bands", "1,2,7",
                              "--model", str(tiny_model_dir), tmp_path=tmp_path))
    assert "7" in line


def test_bad_cluster_count_exits_2(scene_tif, tmp_path):
    path, _ = scene_tif
    one_line_error(cli("segment", str(path), "--out", "out", "--clusters", "many", tmp_path=tmp_path))
    assert "between 1 and 250, not 251" in one_line_error(
        cli("segment", str(path), "--out", "out", "--clusters", "251", tmp_path=tmp_path))


def test_a_stride_the_method_cannot_use_exits_2_naming_the_allowed_ones(scene_tif, tmp_path):
    path, _ = scene_tif
    line = one_line_error(cli("segment", str(path), "--out", "out", "--stride", "2", tmp_path=tmp_path))
    assert "stride 2" in line and "16, 8, 4" in line
    assert not (tmp_path / "out").exists()


def test_teach_reads_the_feature_options_as_segment_does():
    features = ["--model", "base", "--model-revision", "v1", "--stride", "8", "--bands", "3,2,1", "--device", "cpu",
                "--precision", "float32", "--tile-size", "256", "--cluster-model", "survey.treeseg",
                "--allow-untrained", "--cache-dir", "cache"]
    parser = build_parser()
    segmented = params_from_args(parser.parse_args(["segment", "in.tif", "--out", "out", *features]))
    taught = teach_params_from_args(parser.parse_args(["teach", "in.tif", "--examples", "e.csv", "--out", "out",
                                                       *features]))
    for role in (Role.FEATURES, Role.MODEL, Role.SURVEY, Role.RESOURCES):
        assert settings_with(role, taught) == settings_with(role, segmented), role
    assert taught.cluster_model == segmented.cluster_model == "survey.treeseg"


def test_teach_after_segment_reads_the_features_segment_cached(tiny_model_dir, scene_tif, tmp_path):
    path, _ = scene_tif
    features = ("--model", str(tiny_model_dir), "--device", "cpu", "--precision", "float32", "--tile-size", "256",
                "--cache-dir", "cache")
    assert cli("segment", str(path), "--out", "out", "--clusters", "2", *features, tmp_path=tmp_path).returncode == 0
    (tmp_path / "examples.csv").write_text("col,row,is_tree\n80,70,1\n300,90,1\n200,10,0\n390,300,0\n")
    taught = cli("teach", str(path), "--examples", "examples.csv", "--out", "taught", *features, tmp_path=tmp_path)
    assert taught.returncode == 0, taught.stderr
    assert "(features: hit)" in taught.stdout
