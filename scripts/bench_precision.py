"""`make bench` part: which CPU forward is faster than float32, and how faithful its features are.

For ViT-S/16 and ViT-B/16 (the DINOv3 architectures with random weights: the
hub cannot be reached here; saved with save_pretrained and loaded through the
product's loader), at stride 16, on 512² tiles cut from the real NEON sample
resources/sample/OSBS_029.tif (400², mirrored to 800²), through the product's
FeatureExtractor. Variants: float32 (the reference), bfloat16 autocast, bfloat16
weights, torch's int8 dynamic quantisation of the Linear layers (batched), torch.compile,
ONNX Runtime fp32, and ONNX Runtime int8 dynamic quantisation (the product's int8,
engine/core/onnx_int8.py; its export and quantisation are the first call's preparation).

Timing: round after round, each variant runs right after a float32 run; the
speed-up is the median of those paired ratios (the machine is shared, its load
changes from minute to minute), the time the median seconds per tile. The first
call (warm-up; for torch.compile the compilation) is timed on its own.

Fidelity against float32: mean cosine similarity of the patch features, and
the share of grid cells that land in the same cluster (the product's PCA +
k-means fitted on the float32 features, the variant's features assigned to
those clusters).

Random weights: layerscale is 1.0 (transformers' default) so that every block
contributes to the features; with the tiny layerscale of the untrained demo
model the blocks would barely change the features and every variant would look
faithful. Fidelity on trained weights may differ.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORK = REPO / "output" / "bench" / "precision"
SAMPLE = REPO / "resources" / "sample" / "OSBS_029.tif"
TILE = 512
CLUSTERS = 6
VARIANTS = ("float32", "bfloat16-autocast", "bfloat16-weights", "int8-dynamic", "torch-compile",
            "onnxruntime", "onnxruntime-int8")
BAR = {"speedup": 1.8, "cosine": 0.995, "same_cluster": 0.98}


def sample_tiles(count: int) -> list[np.ndarray]:
    """512² RGB tiles (0..1) cut from the NEON sample, mirrored to 800² so that a 512² tile fits."""
    from osgeo import gdal

    gdal.UseExceptions()
    dataset = gdal.Open(str(SAMPLE))
    image = np.stack([dataset.GetRasterBand(band + 1).ReadAsArray() for band in range(3)], -1)
    mirrored = np.pad(image, ((0, 400), (0, 400), (0, 0)), mode="symmetric").astype(np.float32) / 255
    offsets = [(0, 0), (288, 288), (0, 288), (288, 0), (144, 144), (144, 0), (0, 144), (288, 144)]
    return [np.ascontiguousarray(mirrored[y:y + TILE, x:x + TILE]) for y, x in offsets[:count]]


def model_folder(name: str) -> Path:
    """A random-weight model of the catalogue architecture `name`, saved once with save_pretrained."""
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from treeseg_qgis.engine.core.models import CATALOGUE

    folder = WORK / f"{name}-random"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        config = DINOv3ViTConfig(**CATALOGUE[name].architecture.hub_config(), patch_size=16, num_register_tokens=4,
                                 layerscale_value=1.0)
        DINOv3ViTModel(config).save_pretrained(folder)
    return folder


class OnnxModel:
    """An ONNX Runtime session that answers like the transformers model (last_hidden_state only)."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, pixel_values):
        import torch

        (hidden,) = self.session.run(["last_hidden_state"], {"pixel_values": pixel_values.numpy()})
        return SimpleNamespace(last_hidden_state=torch.from_numpy(hidden))


def export_onnx(model, folder: Path, batch: int) -> Path:
    """The float32 model as ONNX (dynamic batch), exported once per model folder."""
    import torch

    path = folder / "model.onnx"
    if not path.exists():
        class LastHidden(torch.nn.Module):
            def __init__(self, inner) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, pixel_values):
                return self.inner(pixel_values=pixel_values).last_hidden_state

        example = torch.zeros(batch, 3, TILE, TILE)
        torch.onnx.export(LastHidden(model).eval(), (example,), str(path), input_names=["pixel_values"],
                          output_names=["last_hidden_state"], dynamo=False, opset_version=17,
                          dynamic_axes={"pixel_values": {0: "batch"}, "last_hidden_state": {0: "batch"}})
    return path


def build_variant(variant: str, folder: Path, batch: int, threads: int):
    """(Backbone, seconds to prepare it) for one variant; the model comes through the product's loader,
    float32, bfloat16 autocast and int8 exactly as the product runs them (`precision`)."""
    import torch

    from treeseg_qgis.engine.core.models import load_backbone

    started = time.perf_counter()
    product = {"bfloat16-autocast": "bfloat16", "onnxruntime-int8": "int8"}
    backbone = load_backbone(str(folder), device="cpu", precision=product.get(variant, "float32"))
    if variant == "bfloat16-weights":
        backbone.model = backbone.model.to(torch.bfloat16)
        backbone.dtype = torch.bfloat16
    elif variant == "int8-dynamic":
        with warnings.catch_warnings():  # torch announces the move of this API to torchao; it works in 2.13
            warnings.simplefilter("ignore")
            backbone.model = torch.ao.quantization.quantize_dynamic(backbone.model, {torch.nn.Linear},
                                                                    dtype=torch.qint8)
    elif variant == "torch-compile":
        backbone.model = torch.compile(backbone.model)
    elif variant == "onnxruntime":
        backbone.model = OnnxModel(export_onnx(backbone.model, folder, batch), threads)
    if variant == "onnxruntime-int8":  # the product's int8: exported and quantised on the first forward
        backbone.model(pixel_values=torch.zeros(1, 3, TILE, TILE))
    return backbone, time.perf_counter() - started


def available(variant: str) -> str | None:
    """Why a variant cannot run here, or None."""
    from treeseg_qgis.engine.core.onnx_int8 import runtime_version

    if variant.startswith("onnxruntime") and runtime_version() is None:
        return "not installed (onnxruntime, onnx)"
    return None


def fidelity(reference: np.ndarray, features: np.ndarray) -> dict:
    """Mean cosine of the unit feature vectors, the same after removing the float32 mean feature (random
    weights make the features of all cells point much the same way, which flatters the plain cosine),
    and the share of cells in the same k-means cluster."""
    from treeseg_qgis.engine.core.clustering import Projection, fit_clusters

    flat_reference = reference.reshape(-1, reference.shape[-1])
    flat = features.reshape(-1, features.shape[-1]).astype(np.float32)
    cosine = float(np.mean(np.sum(flat_reference * flat, axis=1)))
    centre = flat_reference.mean(0)
    centred_reference, centred = flat_reference - centre, flat - centre
    centred_cosine = float(np.mean(np.sum(centred_reference * centred, axis=1) / np.maximum(
        np.linalg.norm(centred_reference, axis=1) * np.linalg.norm(centred, axis=1), 1e-12)))
    projection = Projection(flat_reference, 32, 0)
    clusters = fit_clusters(projection.project(flat_reference), CLUSTERS, seed=0)
    same = clusters.assign(projection.project(flat_reference)) == clusters.assign(projection.project(flat))
    return {"cosine": cosine, "centred_cosine": centred_cosine, "same_cluster": float(same.mean())}


def measure_model(name: str, variants: list[str], tiles: list[np.ndarray], rounds: int, threads: int) -> dict:
    """Time per tile (median over rounds, each paired with float32) and fidelity of each variant of one model."""
    from treeseg_qgis.engine.core.features import FeatureExtractor

    folder = model_folder(name)
    extractors, results = {}, {}
    for variant in variants:
        reason = available(variant)
        if reason:
            results[variant] = {"skipped": reason}
            continue
        print(f"[{name}] preparing {variant}", flush=True)
        try:
            backbone, prepare = build_variant(variant, folder, len(tiles), threads)
            extractor = FeatureExtractor(backbone, stride=16, batch_size=len(tiles))
            started = time.perf_counter()
            features = np.stack(extractor.extract_tiles(tiles))
            first = time.perf_counter() - started
        except Exception as error:  # a variant that fails to build is a result, not the end of the bench
            results[variant] = {"skipped": f"failed: {type(error).__name__}: {str(error)[:200]}"}
            print(f"[{name}] {variant} failed: {error}", flush=True)
            continue
        extractors[variant] = extractor
        results[variant] = {"prepare_s": prepare, "first_call_s": first, "features": features, "times": [],
                            "ratios": []}
    results["float32"]["times"] = []
    for round_number in range(rounds):
        for variant in extractors:
            if variant == "float32":
                continue
            pair = {}
            for timed in ("float32", variant):
                started = time.perf_counter()
                extractors[timed].extract_tiles(tiles)
                pair[timed] = (time.perf_counter() - started) / len(tiles)
                results[timed]["times"].append(pair[timed])
            results[variant]["ratios"].append(pair["float32"] / pair[variant])
        print(f"[{name}] round {round_number + 1}/{rounds}: "
              + ", ".join(f"{v} {results[v]['times'][-1]:.3f}s" for v in extractors), flush=True)
    reference = results["float32"]["features"]
    flat = reference.reshape(-1, reference.shape[-1])
    mean_direction = flat.mean(0) / np.linalg.norm(flat.mean(0))
    results["float32"]["spread"] = float(np.mean(flat @ mean_direction))
    for variant in extractors:
        entry = results[variant]
        entry["s_per_tile"] = statistics.median(entry["times"])
        entry["speedup"] = statistics.median(entry.pop("ratios")) if variant != "float32" else 1.0
        entry.update(fidelity(reference, entry.pop("features")))
        entry["meets_bar"] = (entry["speedup"] >= BAR["speedup"] and entry["cosine"] >= BAR["cosine"]
                              and entry["same_cluster"] >= BAR["same_cluster"])
    return results


def cpu_description() -> str:
    """The CPU model and the vector extensions that matter for bf16/int8."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
              if flag in flags]
    return f"{name} ({', '.join(wanted)})"


def table(results: dict, cpu: str, threads: int, tiles: int, rounds: int) -> str:
    """The markdown precision table."""
    lines = [f"CPU: {cpu}, {threads} torch threads; {tiles} tiles of 512² per call, stride 16, median of "
             f"{rounds} rounds, each variant paired with a float32 run.", "",
             "| model | variant | s / tile | speed-up vs fp32 | cosine vs fp32 | centred cosine | same cluster "
             "| first call s | meets bar |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for model, variants in results.items():
        for variant, entry in variants.items():
            if "skipped" in entry:
                lines.append(f"| {model} | {variant} | – | – | – | – | – | – | {entry['skipped']} |")
                continue
            lines.append(f"| {model} | {variant} | {entry['s_per_tile']:.3f} | {entry['speedup']:.2f}× | "
                         f"{entry['cosine']:.4f} | {entry['centred_cosine']:.4f} | "
                         f"{100 * entry['same_cluster']:.1f} % | {entry['first_call_s']:.1f} | "
                         f"{'yes' if entry['meets_bar'] else 'no'} |")
    lines.append("")
    for model, variants in results.items():
        lines.append(f"{model}: the float32 features point on average {variants['float32']['spread']:.3f} "
                     "(cosine) along their mean direction.")
    return "\n".join(lines)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="small,base")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--tiles", type=int, default=4, help="512² tiles per call (at most 8)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="ViT-S only, 2 tiles")
    args = parser.parse_args()
    models, tile_count, rounds = args.models.split(","), min(args.tiles, 8), args.rounds
    if args.quick:
        models, tile_count = ["small"], 2
    threads = torch.get_num_threads()
    tiles = sample_tiles(tile_count)
    variants = ["float32"] + [v for v in args.variants.split(",") if v != "float32"]
    results = {name: measure_model(name, variants, tiles, rounds, threads) for name in models}
    cpu = cpu_description()
    report = table(results, cpu, threads, tile_count, rounds)
    print(report)
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "results.json").write_text(json.dumps({"cpu": cpu, "threads": threads, "tiles": tile_count,
                                                   "rounds": rounds, "torch": torch.__version__,
                                                   "results": results}, indent=1))
    (WORK / "table.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
