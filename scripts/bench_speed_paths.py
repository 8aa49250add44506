"""Speed paths of issue #31, measured small: (1) the int8 ONNX export's peak memory against a run whose export
is cached, for the tiny test model and the ViT-S/16 architecture (random weights, saved with save_pretrained
and loaded through the product's loader); (2) a 4 MP raster whose right half is nodata against the full raster
(`segment` end to end, alternating); (3) `segment` of the 4 MP raster with the int8 export cached, this tree
against an older one (`--before`, e.g. `git archive <commit> | tar -x -C DIR`), alternating: the wall time of the
whole command and the run record's stages; (4) a 2900 × 2000 px window of the 36 MP mosaic with tiles of 512 px
overlapping by 64 px (the default) against 32 px, alternating; (5) what cropping a tile to its valid pixels does to
their features (the real sample, nodata from column 200 on); (6) the fixed costs of `segment` with the default
settings (automatic K, preview and elbow plot) on the 1024² crop of the side-by-side benchmark, ViT-S/16 and ViT-B/16
random weights, this tree against an older one (`--before`), alternating: wall, CPU time, start and every stage;
(7) automatic K (`fit_clusters`) of this tree against an older one on clustering samples (the `samples.npz` of
feature-cache entries): the K, the centres, label agreement, wall and CPU time; (8) the int8 export that runs
crops of any shape against the float model and the export of each shape, its 512² forward against the 512²
export's (alternating) and its export time.
Each figure is its own process. Prints JSON lines; docs/BENCHMARKS.md holds the figures that were recorded.

    .venv/bin/python scripts/bench_speed_paths.py export [--models tiny,vits]
    .venv/bin/python scripts/bench_speed_paths.py empty [--repeat 2] [--precision float32]
    .venv/bin/python scripts/bench_speed_paths.py cached --before DIR [--repeat 3]
    .venv/bin/python scripts/bench_speed_paths.py overlap [--repeat 2]
    .venv/bin/python scripts/bench_speed_paths.py crop [--models tiny,vits]
    .venv/bin/python scripts/bench_speed_paths.py fixed --before DIR [--repeat 3] [--models small,base]
    .venv/bin/python scripts/bench_speed_paths.py kmeans --before DIR --samples CACHE_ENTRY/samples.npz ...
    .venv/bin/python scripts/bench_speed_paths.py int8crops [--repeat 12]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
WORK = REPO / "output" / "bench"


def tiny_model() -> Path:
    """The tiny DINOv3 of the tests (hidden 64, 2 layers), saved once under output/bench."""
    folder = WORK / "tiny-random"
    if not (folder / "config.json").exists():
        import torch
        from transformers import DINOv3ViTConfig, DINOv3ViTModel

        torch.manual_seed(0)
        config = DINOv3ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=128, patch_size=16, num_register_tokens=4)
        DINOv3ViTModel(config).save_pretrained(folder)
    return folder


def model_folder(name: str) -> Path:
    from bench import vits_random_model

    WORK.mkdir(parents=True, exist_ok=True)
    return tiny_model() if name == "tiny" else vits_random_model()


def child_export(model: str, cache: str) -> dict:
    """One 512 × 512 tile and one 512 × 128 crop (the any-shape export) through the int8 backbone with the export
    cache in `cache`: the process's peak."""
    os.environ["XDG_CACHE_HOME"] = cache
    import torch

    from treeseg_qgis.engine.core.features import FeatureExtractor
    from treeseg_qgis.engine.core.models import load_backbone

    torch.set_num_threads(2)
    backbone = load_backbone(model, device="cpu", precision="int8")
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    extractor, rng = FeatureExtractor(backbone, 16), np.random.default_rng(0)
    extractor.extract(rng.random((512, 512, 3), dtype=np.float32))
    extractor.extract_tiles([rng.random((512, 128, 3), dtype=np.float32)], cropped=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"exports": backbone.model.exports, "peak_mb": round(peak), "after_load_mb": round(loaded),
            "seconds": round(time.perf_counter() - started, 1)}


def run_child(*arguments: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "child", *arguments], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def export_memory(models: list[str]) -> None:
    for name in models:
        folder = model_folder(name)
        with tempfile.TemporaryDirectory(prefix="treeseg-bench-onnx-") as cache:
            first = run_child("export", str(folder), cache)
            cached = run_child("export", str(folder), cache)
        print(json.dumps({"model": name, "export": first, "cached": cached,
                          "ratio": round(first["peak_mb"] / cached["peak_mb"], 2), "load": os.getloadavg()[0]}))


def half_empty(base: Path) -> tuple[Path, Path]:
    """The 4 MP raster with nodata 0 (no zero pixel in it), and a copy whose right half is nodata."""
    from osgeo import gdal

    gdal.UseExceptions()
    full, half = WORK / "ortho_4mp_nodata.tif", WORK / "ortho_4mp_right_nodata.tif"
    if not half.exists():
        source = gdal.Open(str(base))
        data = np.maximum(source.ReadAsArray(), 1)
        right_nodata = data.copy()
        right_nodata[:, :, data.shape[2] // 2:] = 0
        for path, values in ((full, data), (half, right_nodata)):
            target = gdal.GetDriverByName("GTiff").Create(str(path), source.RasterXSize, source.RasterYSize, 3,
                                                          gdal.GDT_Byte, ["TILED=YES", "COMPRESS=DEFLATE"])
            target.SetGeoTransform(source.GetGeoTransform())
            target.SetProjection(source.GetProjection())
            for band in range(3):
                target.GetRasterBand(band + 1).SetNoDataValue(0)
                target.GetRasterBand(band + 1).WriteArray(values[band])
            target = None
    return full, half


def segment_once(raster: Path, model: Path, cache: str, tree: Path = REPO, precision: str = "auto") -> dict:
    """`python -m treeseg_qgis segment` of the treeseg in `tree`, timed from outside, and its record's stages."""
    out = Path(tempfile.mkdtemp(prefix="treeseg-bench-out-"))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "treeseg_qgis", "segment", str(raster), "--out", str(out), "--model",
                    str(model), "--no-cache", "--clusters", "4", "--quiet", "--precision", precision], cwd=tree,
                   check=True, capture_output=True,
                   env={**os.environ, "XDG_CACHE_HOME": cache, "PYTHONPATH": str(tree)})
    wall = time.perf_counter() - started
    record = json.loads(next(out.glob("*_run.json")).read_text())
    return {"wall_s": round(wall, 1), "total_s": record["timings"]["total"],
            "features_s": record["timings"]["features"], "timings": record["timings"],
            "model_run": record.get("model_run"),
            "precision": record["model"].get("precision"),
            "load": os.getloadavg()[0]}


def empty_tiles(repeat: int, precision: str) -> None:
    from bench import make_inputs

    full, half = half_empty(make_inputs()[4])
    model = model_folder("vits")
    cache = tempfile.mkdtemp(prefix="treeseg-bench-cache-")
    segment_once(half, model, cache, precision=precision)  # warm-up: the int8 exports (tile, crops) built, kept
    runs: dict[str, list[dict]] = {"full": [], "right half nodata": []}
    for _ in range(repeat):
        for name, raster in (("full", full), ("right half nodata", half)):
            runs[name].append(segment_once(raster, model, cache, precision=precision))
            print(json.dumps({"raster": name, **runs[name][-1]}), flush=True)
    for key in ("wall_s", "total_s", "features_s"):
        ratio = sum(r[key] for r in runs["right half nodata"]) / sum(r[key] for r in runs["full"])
        print(json.dumps({"ratio": key, "half_over_full": round(ratio, 2)}))


def cached_export(before: Path, repeat: int) -> None:
    """The 4 MP raster, ViT-S/16 random weights, auto precision (int8), the export cached: `before`'s tree and
    this one alternating in one export cache (both key it alike)."""
    from bench import make_inputs

    raster, model = make_inputs()[4], model_folder("vits")
    cache = tempfile.mkdtemp(prefix="treeseg-bench-cache-")
    trees = {"before": before.resolve(), "after": REPO}
    for tree in trees.values():
        segment_once(raster, model, cache, tree)  # warm-up: the export built once, the files in the page cache
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(repeat):
        for name, tree in trees.items():
            runs[name].append(segment_once(raster, model, cache, tree))
            print(json.dumps({"tree": name, **runs[name][-1]}), flush=True)
    for key in ("wall_s", "total_s"):
        ratio = sum(r[key] for r in runs["after"]) / sum(r[key] for r in runs["before"])
        print(json.dumps({"ratio": key, "after_over_before": round(ratio, 3)}))


def segment_defaults(raster: Path, model: Path, cache: str, tree: Path) -> dict:
    """`python -m treeseg_qgis segment RASTER --out DIR --model FOLDER --no-cache` of the treeseg in `tree` (every
    other setting its default): wall and CPU time of the process, its start (wall − the record's total) and stages."""
    out = Path(tempfile.mkdtemp(prefix="treeseg-bench-out-"))
    load = os.getloadavg()[0]
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "treeseg_qgis", "segment", str(raster), "--out", str(out),
                                "--model", str(model), "--no-cache", "--quiet"], cwd=tree,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "XDG_CACHE_HOME": cache, "PYTHONPATH": str(tree),
                                    "HF_HUB_OFFLINE": "1"})
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"segment failed in {tree}")
    record = json.loads(next(out.glob("*_run.json")).read_text())
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "start_s": round(wall - record["timings"]["total"], 2), "k": record["clusters"]["k"],
            "timings": record["timings"], "out": str(out), "load": load}


def fixed_costs(before: Path, repeat: int, models: list[str]) -> None:
    """The 1024² crop, default settings, the int8 export cached: `before`'s tree and this one alternating."""
    from bench_precision import model_folder as catalogue_model
    from bench_upstream import make_inputs as side_by_side_inputs

    raster = side_by_side_inputs("crop")[0]
    cache = tempfile.mkdtemp(prefix="treeseg-bench-cache-")
    trees = {"before": before.resolve(), "after": REPO}
    for name in models:
        model = catalogue_model(name)
        for tree in trees.values():
            segment_defaults(raster, model, cache, tree)  # warm-up: the export built once, the files in the page cache
        runs: dict[str, list[dict]] = {tree: [] for tree in trees}
        for index in range(repeat):
            for tree in trees if index % 2 == 0 else reversed(trees):
                runs[tree].append(segment_defaults(raster, model, cache, trees[tree]))
                print(json.dumps({"model": name, "tree": tree, **runs[tree][-1]}), flush=True)
        for key in ("wall_s", "cpu_s", "start_s"):
            ratio = sum(r[key] for r in runs["after"]) / sum(r[key] for r in runs["before"])
            print(json.dumps({"model": name, "ratio": key, "after_over_before": round(ratio, 3)}), flush=True)


def child_kmeans(tree: str, samples: str, centres: str) -> dict:
    """Automatic K of the treeseg in `tree` on `samples`; the centres and curve saved to `centres`."""
    sys.path.insert(0, tree)
    from treeseg_qgis.engine.core.clustering import fit_clusters

    with np.load(samples) as data:
        projected = data["samples"]
    started, cpu = time.perf_counter(), time.process_time()
    model = fit_clusters(projected, None)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    np.savez(centres, centres=model.centres, curve=[model.inertia_curve[k] for k in sorted(model.inertia_curve)])
    return {"wall_s": round(seconds, 2), "cpu_s": round(cpu, 2)}


def kmeans_agreement(before: Path, samples: list[Path]) -> None:
    """Each sample through both trees' `fit_clusters`, each in its own process: the same K, the largest centre
    difference, the share of the sample's rows given the same cluster, the curve's largest relative difference."""
    from treeseg_qgis.engine.core.clustering import ClusterModel

    trees = {"before": before.resolve(), "after": REPO}
    for path in samples:
        with np.load(path) as data:
            projected = data["samples"]
        fits, times = {}, {}
        for name, tree in trees.items():
            target = Path(tempfile.mkdtemp(prefix="treeseg-bench-kmeans-")) / "fit.npz"
            done = subprocess.run([sys.executable, __file__, "child-kmeans", str(tree), str(path), str(target)],
                                  capture_output=True, text=True, check=True)
            times[name] = json.loads(done.stdout.strip().splitlines()[-1])
            with np.load(target) as fit:
                fits[name] = (fit["centres"], fit["curve"])
        (old, old_curve), (new, new_curve) = fits["before"], fits["after"]
        same_k = old.shape == new.shape
        same_labels = ClusterModel(old).assign(projected) == ClusterModel(new).assign(projected) if same_k else None
        print(json.dumps({"samples": str(path), "rows": len(projected), "k": [len(old), len(new)],
                          "agreement": float(same_labels.mean()) if same_k else None,
                          "centre_difference": float(np.abs(old - new).max()) if same_k else None,
                          "curve_difference": float(np.abs(new_curve / old_curve - 1).max()) if same_k else None,
                          **{name: times[name] for name in trees}, "load": os.getloadavg()[0]}), flush=True)


def child_overlap(raster: str, model: str, overlap: int) -> dict:
    """One `segment` run of the product's pipeline (as the CLI runs it, which has no overlap option) with
    `overlap`: its record's timings and what the model ran."""
    import torch

    from treeseg_qgis.engine.pipeline import segment
    from treeseg_qgis.params import SegmentationParams

    torch.set_num_threads(2)
    out = tempfile.mkdtemp(prefix="treeseg-bench-out-")
    record = segment(SegmentationParams(input_path=raster, output_dir=out, model=model, overlap=overlap,
                                        use_cache=False, clusters=4))
    return {"overlap": overlap, "tiles": record.tiles, "model_run": record.to_dict()["model_run"],
            "features_s": record.timings["features"], "total_s": record.total_seconds,
            "precision": record.model.precision, "load": os.getloadavg()[0]}


def overlaps(repeat: int) -> None:
    from bench import make_inputs
    from osgeo import gdal

    gdal.UseExceptions()
    full = WORK / "ortho_2900x2000.vrt"  # 7 × 5 tiles at overlap 64, 6 × 5 at 32: 0.86, near large rasters' 0.87
    if not full.exists():
        gdal.Translate(str(full), str(make_inputs()[36]), format="VRT", srcWin=[0, 0, 2900, 2000])
    model = model_folder("vits")
    cache = tempfile.mkdtemp(prefix="treeseg-bench-cache-")
    runs: dict[int, list[dict]] = {64: [], 32: []}
    for index in range(2 * repeat + 1):  # a warm-up run first: the int8 export of the 512² tile, then kept
        overlap = (64, 32)[(index + 1) % 2]
        done = subprocess.run([sys.executable, __file__, "child-overlap", str(full), str(model), str(overlap), cache],
                              capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        run = json.loads(done.stdout.strip().splitlines()[-1])
        if index:
            runs[overlap].append(run)
            print(json.dumps(run), flush=True)
    for key in ("features_s", "total_s"):
        ratio = sum(r[key] for r in runs[32]) / sum(r[key] for r in runs[64])
        print(json.dumps({"ratio": key, "overlap_32_over_64": round(ratio, 2)}))


def crop_fidelity(models: list[str], edge: int = 200) -> None:
    """Cosines of the valid cells' features (float32) against the all-valid tile: with nodata from column `edge`
    on, whole (as before) and cropped by `TileGrid.model_window` (as now); and a crop without nodata."""
    import torch
    from osgeo import gdal

    from treeseg_qgis.engine.core.features import FeatureExtractor
    from treeseg_qgis.engine.core.tiling import TileGrid
    from treeseg_qgis.engine.pipeline import load_model_for
    from treeseg_qgis.params import SegmentationParams

    torch.set_num_threads(2)
    gdal.UseExceptions()
    rgb = gdal.Open(str(REPO / "resources" / "sample" / "OSBS_029.tif")).ReadAsArray()
    rgb = rgb.transpose(1, 2, 0).astype(np.float32) / 255
    valid = np.zeros(rgb.shape[:2], bool)
    valid[:, :edge] = True
    grid = TileGrid(rgb.shape[1], rgb.shape[0])
    window = grid.model_window(grid.tile(0, 0), valid)
    nodata = np.where(valid[..., None], rgb, 0)
    cells = np.s_[:, : edge // 16]
    for name in models:
        params = SegmentationParams(input_path="sample.tif", output_dir="out", model=str(model_folder(name)),
                                    device="cpu", precision="float32")
        extractor = FeatureExtractor(load_model_for(params), 16, batch_size=1)
        clean = extractor.extract(rgb)[cells]
        cosines = {"whole with nodata": extractor.extract(nodata)[cells],
                   "cropped with nodata": extractor.extract(nodata[:, : window.width])[cells],
                   "cropped without nodata": extractor.extract(rgb[:, : window.width])[cells]}
        for case, features in cosines.items():
            cosine = (features * clean).sum(-1)
            print(json.dumps({"model": name, "case": case, "crop_width": window.width,
                              "mean": round(float(cosine.mean()), 4), "least": round(float(cosine.min()), 4)}))


def int8_crops(repeat: int) -> None:
    """ViT-S/16 (random weights) on crops of the real sample, edge-padded to 512 px: float32, the int8 export of
    each shape and the int8 export of any shape; cosines of their L2-normalised features per cell, each export's
    time, and the 512² forward of the shape's export against the any-shape export's, alternating."""
    cache = tempfile.mkdtemp(prefix="treeseg-bench-cache-")
    os.environ["XDG_CACHE_HOME"] = cache
    import torch
    from osgeo import gdal

    from treeseg_qgis.engine.core.features import FeatureExtractor
    from treeseg_qgis.engine.core.models import load_backbone

    torch.set_num_threads(2)
    gdal.UseExceptions()
    rgb = gdal.Open(str(REPO / "resources" / "sample" / "OSBS_029.tif")).ReadAsArray()
    rgb = np.pad(rgb.transpose(1, 2, 0).astype(np.float32) / 255, ((0, 112), (0, 112), (0, 0)), mode="reflect")
    model = str(model_folder("vits"))
    reference = FeatureExtractor(load_backbone(model, device="cpu", precision="float32"), 16, batch_size=1)
    int8 = FeatureExtractor(load_backbone(model, device="cpu", precision="int8"), 16, batch_size=1)
    network = int8.backbone.model

    def timed(crop: np.ndarray, cropped: bool) -> tuple[np.ndarray, float, int]:
        exports, started = network.exports, time.perf_counter()
        features = int8.extract_tiles([crop], cropped)[0]
        return features, time.perf_counter() - started, network.exports - exports

    def cosine(a: np.ndarray, b: np.ndarray) -> list[float]:
        values = (a * b).sum(-1)
        return [round(float(values.mean()), 4), round(float(values.min()), 4)]

    for height, width in ((512, 512), (512, 128), (256, 384), (128, 512), (384, 256), (128, 128)):
        crop = rgb[:height, :width]
        exact = reference.extract(crop)
        shaped, shaped_s, shaped_exports = timed(crop, False)
        free, free_s, free_exports = timed(crop, True)
        print(json.dumps({"shape": [height, width], "shape_export_vs_float32 (mean, least)": cosine(shaped, exact),
                          "any_shape_vs_float32": cosine(free, exact),
                          "any_shape_vs_shape_export": cosine(free, shaped),
                          "first_call_s": {"shape_export": round(shaped_s, 1), "any_shape": round(free_s, 1)},
                          "exports": [shaped_exports, free_exports]}), flush=True)
    tile = rgb[:512, :512]
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for index in range(repeat):
        for cropped in ((False, True) if index % 2 == 0 else (True, False)):
            seconds[cropped].append(timed(tile, cropped)[1])
    ratios = np.array(seconds[True]) / np.array(seconds[False])
    print(json.dumps({"forward_512_s": {"shape_export": [round(v, 3) for v in seconds[False]],
                                        "any_shape": [round(v, 3) for v in seconds[True]]},
                      "any_shape_over_shape_export": {"sums": round(sum(seconds[True]) / sum(seconds[False]), 3),
                                                      "median": round(float(np.median(ratios)), 3)},
                      "load": os.getloadavg()[0]}))


def main() -> None:
    if sys.argv[1] == "child":
        print(json.dumps(child_export(sys.argv[3], sys.argv[4])))
        return
    if sys.argv[1] == "child-kmeans":
        print(json.dumps(child_kmeans(*sys.argv[2:5])))
        return
    if sys.argv[1] == "child-overlap":
        os.environ["XDG_CACHE_HOME"] = sys.argv[5]
        print(json.dumps(child_overlap(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=("export", "empty", "cached", "overlap", "crop", "fixed", "kmeans",
                                         "int8crops"))
    parser.add_argument("--models", help="export, crop: tiny,vits (the default); fixed: small,base (the default)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--before", type=Path, help="cached, fixed, kmeans: the older tree to compare with")
    parser.add_argument("--samples", type=Path, nargs="+", help="kmeans: clustering samples (samples.npz)")
    parser.add_argument("--precision", default="auto", help="empty: the segment runs' --precision")
    args = parser.parse_args()
    if args.part == "export":
        export_memory((args.models or "tiny,vits").split(","))
    elif args.part == "cached":
        if args.before is None:
            parser.error("cached needs --before DIR")
        cached_export(args.before, args.repeat)
    elif args.part == "empty":
        empty_tiles(args.repeat, args.precision)
    elif args.part == "fixed":
        if args.before is None:
            parser.error("fixed needs --before DIR")
        fixed_costs(args.before, args.repeat, (args.models or "small,base").split(","))
    elif args.part == "kmeans":
        if args.before is None or not args.samples:
            parser.error("kmeans needs --before DIR and --samples FILE ...")
        kmeans_agreement(args.before, args.samples)
    elif args.part == "crop":
        crop_fidelity((args.models or "tiny,vits").split(","))
    elif args.part == "int8crops":
        int8_crops(args.repeat)
    else:
        overlaps(args.repeat)


if __name__ == "__main__":
    main()
