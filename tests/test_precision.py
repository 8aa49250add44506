"""The forward's precision: float32 the reference, int8 in ONNX Runtime (auto on this CPU), bfloat16 when
asked for; what ran in the run record and in the feature cache key; the int8 export cache; cancel."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from treeseg_qgis.engine.core import devices
from treeseg_qgis.engine.core.errors import Cancelled, InputError
from treeseg_qgis.engine.core.features import FeatureExtractor
from treeseg_qgis.engine.core.models import load_backbone
from treeseg_qgis.engine.core.onnx_int8 import OnnxInt8Network, default_export_root, export_problem
from treeseg_qgis.engine.pipeline import segment
from treeseg_qgis.params import ParameterError, SegmentationParams
from treeseg_qgis.run_record import RunRecord

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
    assert described["precision"] == devices.describe_precision(precision)
    cosine = np.sum(reference * other, axis=-1)
    assert not np.array_equal(reference, other)  # the other precision really ran
    assert cosine.mean() > 0.99


def test_int8_runs_in_onnx_runtime_with_int8_weights(tiny_model_dir, tile):
    import onnx

    backbone = load_backbone(str(tiny_model_dir), device="cpu", precision="int8")
    assert isinstance(backbone.model, OnnxInt8Network)
    assert backbone.describe()["precision"] == f"int8 (ONNX Runtime {onnxruntime.__version__})"
    FeatureExtractor(backbone, stride=16).extract(tile)
    exported = [path for path in default_export_root().glob("*/model-int8.onnx")]
    assert exported
    for path in exported:  # as ONNX Runtime's graph optimisations leave it: the int8 products fused
        graph = onnx.load(str(path)).graph
        int8_weights = {tensor.name for tensor in graph.initializer if tensor.data_type == onnx.TensorProto.INT8}
        operators = {node.op_type for node in graph.node}
        assert {"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"} <= operators
        assert sum(node.input[1] in int8_weights for node in graph.node if "MatMul" in node.op_type) >= 4
        float_products = [node for node in graph.node if node.op_type in ("MatMul", "FusedMatMul", "Gemm")]
        weights = {tensor.name for tensor in graph.initializer}
        assert float_products and not {node.input[1] for node in float_products} & weights


def test_auto_picks_int8_in_onnx_runtime_on_this_cpu(tiny_model_dir):
    assert torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")  # this machine: AVX-512 with VNNI
    assert devices.resolve_precision(CPU, "auto") == "int8"
    backbone = load_backbone(str(tiny_model_dir), device="cpu")
    assert backbone.precision == "int8" and isinstance(backbone.model, OnnxInt8Network)
    assert load_backbone(str(tiny_model_dir), device="cpu", precision="float32").describe()["precision"] == "float32"


def test_without_onnx_runtime_auto_is_float32_and_int8_is_refused():
    script = ("import sys; sys.modules['onnxruntime'] = None\n"
              "import torch\n"
              "from treeseg_qgis.engine.core import devices\n"
              "print(devices.resolve_precision(torch.device('cpu'), 'auto'))\n"
              "devices.resolve_precision(torch.device('cpu'), 'int8')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "float32"
    assert "InputError: int8 on the CPU runs in ONNX Runtime, which this engine lacks" in done.stderr


def test_unknown_precision_and_int8_on_a_gpu_are_refused():
    with pytest.raises(ParameterError, match="precision 'fp8'"):
        SegmentationParams(input_path="a.tif", output_dir="out", precision="fp8").validate()
    with pytest.raises(InputError, match="int8 is a CPU precision"):
        devices.resolve_precision(torch.device("cuda"), "int8")


def test_the_run_record_says_what_ran_and_the_cache_keeps_precisions_apart(tiny_model_dir, scene_tif, tmp_path):
    path, _ = scene_tif

    def run(precision: str, out: str) -> RunRecord:
        return segment(SegmentationParams(input_path=str(path), output_dir=str(tmp_path / out),
                                          model=str(tiny_model_dir), device="cpu", precision=precision,
                                          clusters=2, cache_dir=str(tmp_path / "cache"), tile_size=128,
                                          overlap=32))

    int8 = f"int8 (ONNX Runtime {onnxruntime.__version__})"
    first = run("int8", "a")
    assert first.model.precision == int8 and first.feature_cache.state == "miss"
    assert run("float32", "b").feature_cache.state == "miss"
    again = run("int8", "c")
    assert again.feature_cache.state == "hit" and again.model.precision == int8
    # the key names the runtime: no entry of the former torch int8 ("int8" alone) is ever read
    keys = [json.loads(path.read_text())["precision"] for path in (tmp_path / "cache").glob("*/key.json")]
    assert sorted(keys) == sorted(["float32", int8])


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


def imported_modules(stderr: str) -> set[str]:
    """The modules `python -X importtime` listed on stderr."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_cli_int8_reuses_its_export_without_torch_and_rebuilds_a_corrupt_one(tiny_model_dir, scene_tif, tmp_path,
                                                                               device):
    """The second run starts from the cached export alone: neither torch nor transformers is imported (this
    machine has no GPU driver, so `auto` is the CPU without asking torch), and its labels are the first run's."""
    path, _ = scene_tif
    environment = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    exports = tmp_path / "xdg" / "treeseg" / "onnx"

    def run(out: str) -> tuple[subprocess.CompletedProcess, dict]:
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "treeseg_qgis", "segment", str(path),
                               "--out", str(tmp_path / out), "--model", str(tiny_model_dir), "--device", device,
                               "--precision", "int8" if device == "cpu" else "auto",
                               "--clusters", "2", "--tile-size", "128", "--no-cache"],
                              cwd=REPO, capture_output=True, text=True, timeout=300, env=environment)
        assert done.returncode == 0, done.stderr
        return done, json.loads(next((tmp_path / out).glob("*_run.json")).read_text())

    done, record = run("first")
    assert f"in int8 (ONNX Runtime {onnxruntime.__version__})" in done.stdout
    assert record["model"]["precision"] == f"int8 (ONNX Runtime {onnxruntime.__version__})"
    assert {"torch", "transformers"} <= imported_modules(done.stderr)  # the export was built
    models = exports_by_shape(exports)  # the tile's shape, and the crops' (the scene's last tiles hold padding)
    model = models[str([128, 128])]
    built = {path: path.stat().st_mtime_ns for path in models.values()}

    done, second = run("second")
    assert {path: path.stat().st_mtime_ns for path in exports.glob("*/model-int8.onnx")} == built  # no export
    assert not imported_modules(done.stderr) & {"torch", "transformers"}
    assert "Traceback" not in done.stderr
    assert {key: second["model"][key] for key in record["model"]} == record["model"]  # same facts, not untrained
    assert not second["model"]["untrained"] and second["warning"] is None
    assert (read_labels(second["outputs"]["clusters"]) == read_labels(record["outputs"]["clusters"])).all()

    damage_quantised_weights(model)
    done, record = run("third")
    assert "was unusable (model-int8.onnx.data differs from its manifest): exporting it again" in done.stderr
    assert record["model"]["precision"].startswith("int8 (ONNX Runtime")
    assert model.stat().st_mtime_ns != built[model] and export_problem(model.parent) is None
    assert "Traceback" not in done.stderr
    assert len([line for line in done.stderr.splitlines() if "unusable" in line]) == 1


def damage_quantised_weights(model: Path) -> None:
    """Zeros 64 bytes in the middle of an int8 model's weights file."""
    weights = model.with_name("model-int8.onnx.data")
    with open(weights, "r+b") as stream:
        stream.seek(weights.stat().st_size // 2)
        stream.write(b"\0" * 64)


def exports_by_shape(exports: Path) -> dict[str, Path]:
    """The cached int8 models by the shape their key names ("any", or "[height, width]")."""
    return {str(json.loads((model.parent / "key.json").read_text())["shape"]): model
            for model in exports.glob("*/model-int8.onnx")}


def test_cli_int8_crops_from_the_cached_any_shape_export_without_torch(tiny_model_dir, tmp_path, monkeypatch):
    """A raster with nodata: the first run exports the tile shape and the any-shape export its crops run; the
    next run starts without torch, exports nothing and gives the same labels; a damaged any-shape export is
    rebuilt after one warning line, and that run's labels are the last one's."""
    from .test_speed_paths import TILE, half_empty_raster

    path = half_empty_raster(tmp_path / "half.tif", alpha=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    exports = tmp_path / "xdg" / "treeseg" / "onnx"

    def run(out: str) -> tuple[subprocess.CompletedProcess, dict]:
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "treeseg_qgis", "segment", str(path),
                               "--out", str(tmp_path / out), "--model", str(tiny_model_dir), "--device", "cpu",
                               "--precision", "int8", "--clusters", "2", "--tile-size", str(TILE), "--no-cache"],
                              cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ))
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        return done, json.loads(next((tmp_path / out).glob("*_run.json")).read_text())

    _, first = run("first")
    assert first["model_run"]["pixels"] < first["model_run"]["tiles"] * TILE * TILE
    shapes = exports_by_shape(exports)
    assert sorted(shapes) == sorted(["any", str([TILE, TILE])])
    any_shape = shapes["any"]
    built = {model: model.stat().st_mtime_ns for model in shapes.values()}

    done, cropped = run("cropped")
    assert not imported_modules(done.stderr) & {"torch", "transformers"}
    assert {model: model.stat().st_mtime_ns for model in exports.glob("*/model-int8.onnx")} == built  # no export
    assert cropped["model_run"] == first["model_run"]
    assert (read_labels(cropped["outputs"]["clusters"]) == read_labels(first["outputs"]["clusters"])).all()

    damage_quantised_weights(any_shape)
    done, rebuilt = run("rebuilt")
    assert len([line for line in done.stderr.splitlines() if "unusable" in line]) == 1
    assert "was unusable (model-int8.onnx.data differs from its manifest): exporting it again" in done.stderr
    assert export_problem(any_shape.parent) is None and any_shape.stat().st_mtime_ns != built[any_shape]
    assert rebuilt["model_run"] == cropped["model_run"]
    assert (read_labels(rebuilt["outputs"]["clusters"]) == read_labels(cropped["outputs"]["clusters"])).all()


def read_labels(path: str) -> np.ndarray:
    from osgeo import gdal

    dataset = gdal.Open(path)
    return dataset.GetRasterBand(1).ReadAsArray()


def test_int8_clusters_agree_with_float32_on_the_real_sample(tiny_model_dir, tmp_path):
    import re

    from osgeo import gdal

    pinned = re.search(r"^torch==(\S+)", (REPO / "requirements.txt").read_text(encoding="utf-8"), re.MULTILINE)[1]
    if torch.__version__.split("+")[0] != pinned:  # the QGIS 3.44 root runs Debian's CPU torch 2.6 (88 % there)
        pytest.skip(f"the int8 agreement holds for the pinned torch {pinned}, not torch {torch.__version__}")

    def clusters(precision: str) -> np.ndarray:
        record = segment(SegmentationParams(input_path=str(REPO / "resources" / "sample" / "OSBS_029.tif"),
                                            output_dir=str(tmp_path / precision), model=str(tiny_model_dir),
                                            device="cpu", precision=precision, clusters=4, use_cache=False,
                                            tile_size=256, overlap=32))
        dataset = gdal.Open(record.outputs["clusters"])
        return dataset.GetRasterBand(1).ReadAsArray()

    reference, int8 = clusters("float32"), clusters("int8")
    # the same clusters may carry other ids: match each int8 id to the float32 id it overlaps most
    pairs = np.zeros((int(reference.max()) + 1, int(int8.max()) + 1), np.int64)  # numpy 2: no uint8 wrap
    np.add.at(pairs, (reference.ravel(), int8.ravel()), 1)
    used = np.flatnonzero(pairs.sum(axis=0))
    assert len(set(pairs[:, used].argmax(axis=0))) == len(used)  # one to one
    agreement = pairs.max(axis=0).sum() / reference.size
    print(f"int8 and float32 put {100 * agreement:.2f} % of the pixels in the same cluster")
    assert agreement >= 0.98


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory) -> Path:
    """A 16-layer DINOv3 of width 256: one 1024² image takes seconds in int8 even on a quiet machine (the
    8-layer width-128 one took 0.6 s), so a cancel can land inside it."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    folder = tmp_path_factory.mktemp("deep-dinov3")
    torch.manual_seed(0)
    config = DINOv3ViTConfig(hidden_size=256, num_hidden_layers=16, num_attention_heads=4, intermediate_size=512,
                             patch_size=16, num_register_tokens=4)
    DINOv3ViTModel(config).save_pretrained(folder)
    return folder


def test_the_worker_runs_int8_and_a_cancel_stops_it_inside_an_image(deep_model_dir, tmp_path):
    from treeseg_qgis.qgis_side.engine_client import EngineClient, EngineError, JobWatch

    from .conftest import disc_scene, write_geotiff

    image, _ = disc_scene(1024, 1024, [(300, 300), (700, 650)], radius=150)
    raster = write_geotiff(tmp_path / "scene.tif", image)
    client = EngineClient(sys.executable, {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    try:
        def job(out: str) -> SegmentationParams:
            return SegmentationParams(str(raster), str(tmp_path / out), model=str(deep_model_dir), device="cpu",
                                      precision="int8", tile_size=1024, clusters=2, use_cache=False)

        client.segment(job("export"))  # exports and caches the int8 model, then runs one 1024² image
        record = client.segment(job("first"))
        assert record.model.precision == f"int8 (ONNX Runtime {onnxruntime.__version__})"
        forward = record.timings["features"]
        assert forward > 0.5, f"one image took {forward:.2f} s: too quick to cancel inside it"

        asked: list[float] = []

        def cancelled() -> bool:
            if not asked and stages:
                asked.append(time.perf_counter())
            return bool(asked)

        stages: list[str] = []
        with pytest.raises(EngineError) as caught:
            client.segment(job("cancelled"), JobWatch(on_progress=lambda percent, stage: stages.append(stage),
                                                      is_cancelled=cancelled))
        stopped = time.perf_counter() - asked[0]
        assert caught.value.kind == "cancelled" and client.running  # the worker stopped the job itself
        assert stopped < forward / 2, f"the cancel took {stopped:.2f} s, one image {forward:.2f} s"
        print(f"int8 in the worker: one image {forward:.2f} s, cancel to stop {stopped:.2f} s")
    finally:
        client.close()


def test_int8_from_partial_weights_stays_untrained_and_is_never_cached(tiny_model_dir, scene_tif, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, partial)
    tensors = load_file(partial / "model.safetensors")
    dropped = next(name for name in tensors if "mlp" in name)
    save_file({name: value for name, value in tensors.items() if name != dropped}, partial / "model.safetensors",
              metadata={"format": "pt"})
    exports_before = sorted(default_export_root().glob("*"))
    path, _ = scene_tif
    for run in ("out", "again"):  # the second run finds no cached export to start from: still untrained
        record = segment(SegmentationParams(input_path=str(path), output_dir=str(tmp_path / run), model=str(partial),
                                            device="cpu", precision="int8", allow_untrained=True, clusters=2,
                                            tile_size=128, overlap=32, use_cache=False))
        assert record.model.untrained and record.model.weights.startswith("untrained")
        assert record.model.precision.startswith("int8 (ONNX Runtime")
        assert record.warning.startswith("UNTRAINED WEIGHTS")
        assert sorted(default_export_root().glob("*")) == exports_before  # exported for that run only


def test_two_engines_exporting_the_same_model_at_once_export_it_once(tiny_model_dir, tmp_path):
    script = ("import sys, torch\n"
              "from treeseg_qgis.engine.core.models import load_backbone\n"
              "backbone = load_backbone(sys.argv[1], device='cpu', precision='int8')\n"
              "backbone.model(pixel_values=torch.rand(1, 3, 96, 160))\n"
              "print('exports', backbone.model.exports)\n")
    environment = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    engines = [subprocess.Popen([sys.executable, "-c", script, str(tiny_model_dir)], cwd=REPO, env=environment,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [engine.communicate(timeout=300) for engine in engines]
    assert [engine.returncode for engine in engines] == [0, 0], outputs
    assert sorted(out.split()[-1] for out, _ in outputs) == ["0", "1"]
    exports = tmp_path / "xdg" / "treeseg" / "onnx"
    (folder,) = (path for path in exports.iterdir() if path.is_dir())
    assert export_problem(folder) is None and not list(exports.glob("*.building-*"))


def former_int8_export(network: torch.nn.Module, shape: tuple[int, int], folder: Path) -> Path:
    """The int8 model as the export made it before issue #31: the traced network with its parameters, quantised
    by ONNX Runtime's quantize_dynamic (which held several copies of the weights at once)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from treeseg_qgis.engine.core.onnx_export import LastHiddenState
    from treeseg_qgis.engine.core.onnx_int8 import INPUT, OPSET, OUTPUT

    with torch.no_grad():
        torch.onnx.export(LastHiddenState(network).eval(), (torch.zeros(1, 3, *shape),), str(folder / "f.onnx"),
                          input_names=[INPUT], output_names=[OUTPUT], dynamo=False, opset_version=OPSET)
    quantize_dynamic(str(folder / "f.onnx"), str(folder / "q.onnx"), weight_type=QuantType.QInt8)
    return folder / "q.onnx"


def test_the_bounded_export_gives_the_features_of_onnx_runtimes_quantiser(tiny_model_dir, tmp_path):
    """The export traces a weightless copy and quantises one weight at a time; its int8 model answers as the
    one quantize_dynamic made from the whole float model (measured: identical, here and for ViT-S at 512²)."""
    backbone = load_backbone(str(tiny_model_dir), device="cpu", precision="float32")
    images = torch.from_numpy(np.random.default_rng(5).standard_normal((2, 3, 96, 160)).astype(np.float32))
    reference = onnxruntime.InferenceSession(str(former_int8_export(backbone.model, (96, 160), tmp_path)),
                                             providers=["CPUExecutionProvider"])
    expected = np.concatenate([reference.run(None, {"pixel_values": image[None].numpy()})[0] for image in images])
    network = OnnxInt8Network(backbone.model, {"test": "weights"}, tmp_path / "onnx")
    tokens = network(pixel_values=images).last_hidden_state.numpy()
    assert network.exports == 1
    np.testing.assert_allclose(tokens, expected, rtol=0, atol=1e-5)
    (folder,) = (path for path in (tmp_path / "onnx").iterdir() if path.is_dir())
    assert sorted(path.name for path in folder.iterdir()) == ["key.json", "manifest.json", "model-int8.onnx",
                                                              "model-int8.onnx.data"]


def test_an_export_of_an_earlier_format_is_removed_when_its_successor_is_built(tiny_model_dir, tmp_path):
    """The export cache keeps no dead weight: building an export removes the one an earlier export format made of
    the same weights, shape and software, and leaves the exports of another shape, other software and other
    weights, and a folder whose key cannot be read."""
    from treeseg_qgis.engine.core.onnx_int8 import EXPORT_FORMAT, export_key

    backbone = load_backbone(str(tiny_model_dir), device="cpu", precision="float32")
    root, weights = tmp_path / "onnx", {"test": "weights"}
    key = json.loads(json.dumps(export_key(weights, (64, 96))))
    others = {"earlier format": {**key, "format": EXPORT_FORMAT - 1},
              "earlier format, other shape": {**key, "format": EXPORT_FORMAT - 1, "shape": [128, 128]},
              "earlier format, other runtime": {**key, "format": EXPORT_FORMAT - 1, "onnxruntime": "1.0.0"},
              "earlier format, other weights": {**key, "format": EXPORT_FORMAT - 1, "weights": {"other": 1}},
              "damaged key": "{not json"}
    for name, other in others.items():
        (root / name).mkdir(parents=True)
        (root / name / "key.json").write_text(other if isinstance(other, str) else json.dumps(other))
    network = OnnxInt8Network(backbone.model, weights, root)
    network(pixel_values=torch.rand(1, 3, 64, 96))
    assert network.exports == 1
    left = {path.name for path in root.iterdir() if path.is_dir()}
    assert left == set(others) - {"earlier format"} | {path.parent.name for path in root.glob("*/manifest.json")}


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError, "optimised", Cancelled],
                         ids=["interrupted", "disk-full", "optimised-model-unwritable", "cancelled"])
def test_a_failed_export_leaves_no_half_model_and_the_next_one_is_fresh(tiny_model_dir, tmp_path, monkeypatch,
                                                                         failure):
    """Ctrl-C, or a write error, in the middle of writing the quantised weights, ONNX Runtime unable to write
    the optimised model, or the run cancelled while the weights are written (it stops before the optimisation):
    nothing half-written stays in the export cache (a write error exports for that run only), and the next export
    is whole and answers as one made in an empty cache."""
    import errno

    from treeseg_qgis.engine.core import onnx_export

    backbone = load_backbone(str(tiny_model_dir), device="cpu", precision="float32")
    image = torch.rand(1, 3, 64, 96)
    written, open_session = onnx_export._DataFile.tensor, onnxruntime.InferenceSession
    calls = []

    def fails_once(self, name, array):
        calls.append(name)
        if len(calls) == 3 and failure is not Cancelled:
            raise KeyboardInterrupt() if failure is KeyboardInterrupt else OSError(errno.ENOSPC, "No space left")
        return written(self, name, array)

    def cannot_write_once(path, options, **kwargs):
        if options.optimized_model_filepath and not calls:  # a folder that is not there: ONNX Runtime's own error
            calls.append(path)
            options.optimized_model_filepath = str(tmp_path / "missing" / "model.onnx")
        return open_session(path, options, **kwargs)

    if failure == "optimised":
        monkeypatch.setattr(onnxruntime, "InferenceSession", cannot_write_once)
    else:
        monkeypatch.setattr(onnx_export._DataFile, "tensor", fails_once)
    root = tmp_path / "onnx"
    network = OnnxInt8Network(backbone.model, {"test": "weights"}, root)
    network.stop_when(lambda: failure is Cancelled and len(calls) >= 3)
    if failure in (KeyboardInterrupt, Cancelled):
        with pytest.raises(failure):
            network(pixel_values=image)
    else:
        network(pixel_values=image)  # the cache could not be written: exported again for this run only
        assert network.exports == 1
    assert sorted(path.name for path in root.iterdir()) == []  # no half model, no building folder, no lock
    monkeypatch.undo()

    # after Ctrl-C the same (warm) network exports again; after the write error its session for that run stays
    # with it, so the next engine's network is the one that exports into the cache
    network.stop_when(lambda: False)
    again = network if failure in (KeyboardInterrupt, Cancelled) else OnnxInt8Network(backbone.model,
                                                                                       {"test": "weights"}, root)
    exported = again.exports
    tokens = again(pixel_values=image).last_hidden_state
    (folder,) = (path for path in root.iterdir() if path.is_dir())
    assert again.exports == exported + 1 and export_problem(folder) is None
    fresh = OnnxInt8Network(backbone.model, {"test": "weights"}, tmp_path / "fresh")
    assert torch.equal(tokens, fresh(pixel_values=image).last_hidden_state)


@pytest.mark.parametrize("weights", [{"test": "weights"}, None], ids=["cached", "untrained-scratch"])
def test_an_export_is_built_with_no_session_open_and_a_closed_session_reopens_without_a_rebuild(
        tiny_model_dir, tmp_path, monkeypatch, weights):
    """The any-shape export is built while no session is open (the tile session beside it raised the first run's
    peak memory); tiles and crops then alternate on the two exports with no third export, cached or (for
    untrained weights) in this run's scratch folder, and give the features a fresh network gives."""
    import gc

    from treeseg_qgis.engine.core import onnx_export

    backbone = load_backbone(str(tiny_model_dir), device="cpu", precision="float32")
    written = onnx_export.write_int8_model
    open_while_building = []

    def counting(*args, **kwargs):
        open_while_building.append(sum(type(item) is onnxruntime.InferenceSession for item in gc.get_objects()))
        return written(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "write_int8_model", counting)
    network = OnnxInt8Network(backbone.model, weights, tmp_path / "onnx")
    rng = np.random.default_rng(7)
    whole, crop = rng.standard_normal((1, 3, 64, 64), np.float32), rng.standard_normal((1, 3, 32, 48), np.float32)
    answers = [network.hidden_states(whole), network.hidden_states(crop, cropped=True),
               network.hidden_states(whole), network.hidden_states(crop, cropped=True)]
    assert network.exports == 2 and open_while_building == [0, 0]
    np.testing.assert_array_equal(answers[0], answers[2])
    np.testing.assert_array_equal(answers[1], answers[3])
    fresh = OnnxInt8Network(backbone.model, weights, tmp_path / "fresh")
    np.testing.assert_array_equal(answers[1], fresh.hidden_states(crop, cropped=True))


def test_a_raster_smaller_than_a_tile_starts_from_its_any_shape_export_and_a_larger_tile_builds_its_own(
        tiny_model_dir, scene_tif, tmp_path):
    """A raster inside one tile runs only the any-shape export: its second run starts from it without torch. A
    run with smaller tiles then starts from it too, builds its tile shape's export (loading the float network
    then), and labels as a run in an empty export cache does."""
    path, _ = scene_tif
    exports = tmp_path / "xdg" / "treeseg" / "onnx"

    def run(out: str, tile: int, cache: str = "xdg") -> tuple[subprocess.CompletedProcess, dict]:
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "treeseg_qgis", "segment", str(path),
                               "--out", str(tmp_path / out), "--model", str(tiny_model_dir), "--device", "cpu",
                               "--precision", "int8", "--clusters", "2", "--tile-size", str(tile), "--no-cache"],
                              cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / cache)})
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        return done, json.loads(next((tmp_path / out).glob("*_run.json")).read_text())

    _, first = run("first", 512)
    assert sorted(exports_by_shape(exports)) == ["any"]
    done, second = run("second", 512)
    assert not imported_modules(done.stderr) & {"torch", "transformers"}
    assert second["model"] == first["model"]
    assert (read_labels(second["outputs"]["clusters"]) == read_labels(first["outputs"]["clusters"])).all()

    done, smaller = run("smaller", 128)
    assert "torch" in imported_modules(done.stderr)  # the float network, for the 128² export
    assert sorted(exports_by_shape(exports)) == sorted(["any", str([128, 128])])
    _, fresh = run("fresh", 128, cache="empty")
    assert smaller["model"] == fresh["model"] and not smaller["model"]["untrained"]
    assert (read_labels(smaller["outputs"]["clusters"]) == read_labels(fresh["outputs"]["clusters"])).all()
