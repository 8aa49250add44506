"""`make bench`: end-to-end time vs the bare model forward, peak memory per raster size, stride cost,
and the polygonize step alone (one pass against strips).

Synthetic orthophoto-like rasters (textured crowns on soil): one 2000 × 2000 px
tiled GeoTIFF (4 MP) and VRT mosaics of it (36, 100, 400 MP). The model is the
real ViT-S/16 DINOv3 architecture with random weights (the compute is real),
saved with save_pretrained and loaded through the product's loader. Every
figure comes from its own process, after a warm-up forward. Results go to
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORK = REPO / "output" / "bench"
BLOCK = 2000
MOSAICS = {4: 1, 36: 3, 100: 5, 400: 10}
TILE = 512
POLYGONIZE_KINDS = ("one-pass", "strips")


def make_inputs() -> dict[int, Path]:
    """The 4 MP GeoTIFF and its VRT mosaics; the ViT-S/16 model folder."""
    from osgeo import gdal, osr

    gdal.UseExceptions()
    WORK.mkdir(parents=True, exist_ok=True)
    base = WORK / "ortho_4mp.tif"
    if not base.exists():
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:BLOCK, 0:BLOCK]
        crowns = np.zeros((BLOCK, BLOCK), bool)
        for cy, cx, r in zip(rng.integers(0, BLOCK, 900), rng.integers(0, BLOCK, 900), rng.integers(15, 45, 900)):
            y0, y1, x0, x1 = max(cy - r, 0), min(cy + r, BLOCK), max(cx - r, 0), min(cx + r, BLOCK)
            crowns[y0:y1, x0:x1] |= (yy[y0:y1, x0:x1] - cy) ** 2 + (xx[y0:y1, x0:x1] - cx) ** 2 < r * r
        image = np.where(crowns[..., None], (52, 105, 48), (176, 150, 118)).astype(np.float32)
        image *= 1 + 0.15 * rng.standard_normal((BLOCK, BLOCK, 1))
        image += rng.normal(0, 8, image.shape)
        data = np.clip(image, 0, 255).astype(np.uint8)
        dataset = gdal.GetDriverByName("GTiff").Create(str(base), BLOCK, BLOCK, 3, gdal.GDT_Byte,
                                                       ["TILED=YES", "COMPRESS=DEFLATE"])
        dataset.SetGeoTransform((400000.0, 0.1, 0.0, 3300000.0, 0.0, -0.1))
        srs = osr.SpatialReference()
        srs.ImportFromEPSG(32617)
        dataset.SetProjection(srs.ExportToWkt())
        for band in range(3):
            dataset.GetRasterBand(band + 1).WriteArray(data[..., band])
        dataset = None
    paths = {4: base}
    for megapixels, side in MOSAICS.items():
        if side > 1:
            paths[megapixels] = _mosaic(base, side, WORK / f"ortho_{megapixels}mp.vrt")
    vits_random_model()
    return paths


def vits_random_model() -> Path:
    """The ViT-S/16 DINOv3 architecture with random weights, saved once under output/bench."""
    model = WORK / "vits16-random"
    if not (model / "config.json").exists():
        import torch
        from transformers import DINOv3ViTConfig, DINOv3ViTModel

        torch.manual_seed(0)
        config = DINOv3ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                 intermediate_size=1536, patch_size=16, num_register_tokens=4)
        DINOv3ViTModel(config).save_pretrained(model)
    return model


def _mosaic(base: Path, side: int, path: Path) -> Path:
    size = BLOCK * side
    sources = "".join(
        f"<SimpleSource><SourceFilename relativeToVRT='1'>{base.name}</SourceFilename>"
        f"<SourceBand>{{band}}</SourceBand><SrcRect xOff='0' yOff='0' xSize='{BLOCK}' ySize='{BLOCK}'/>"
        f"<DstRect xOff='{col * BLOCK}' yOff='{row * BLOCK}' xSize='{BLOCK}' ySize='{BLOCK}'/></SimpleSource>"
        for row in range(side) for col in range(side)
    )
    bands = "".join(
        f"<VRTRasterBand dataType='Byte' band='{band}'>{sources.format(band=band)}</VRTRasterBand>"
        for band in (1, 2, 3)
    )
    path.write_text(
        f"<VRTDataset rasterXSize='{size}' rasterYSize='{size}'><SRS>EPSG:32617</SRS>"
        f"<GeoTransform>400000.0, 0.1, 0.0, 3300000.0, 0.0, -0.1</GeoTransform>{bands}</VRTDataset>"
    )
    return path


def measure(kind: str, raster: str, stride: int) -> dict:
    """One figure, in this process: `segment` end to end, or the bare forward over the same tiles in the
    same batches of tiles, or polygonize alone on a cluster raster."""
    if kind in POLYGONIZE_KINDS:
        return _polygonize_alone(kind, raster)
    from treeseg_qgis.engine.core.features import FeatureExtractor
    from treeseg_qgis.engine.core.models import load_backbone
    from treeseg_qgis.engine.core.tiling import TileGrid
    from treeseg_qgis.engine.gis.raster import GdalRasterSource
    from treeseg_qgis.engine.pipeline import segment
    from treeseg_qgis.params import SegmentationParams

    backbone = load_backbone(str(WORK / "vits16-random"), device="cpu")
    extractor = FeatureExtractor(backbone, stride, SegmentationParams.batch_size)
    warm = np.random.default_rng(1).random((TILE, TILE, 3), dtype=np.float32)
    extractor.extract(warm)
    with GdalRasterSource(raster) as source:
        grid = TileGrid(source.width, source.height, TILE, 64)
    started = time.perf_counter()
    if kind == "dock":
        return _through_the_dock_path(raster, stride, len(grid))
    if kind == "forward":
        tile = np.random.default_rng(2).random((grid.tile_height, grid.tile_width, 3), dtype=np.float32)
        for start in range(0, len(grid), extractor.tiles_per_batch):
            extractor.extract_tiles([tile] * min(extractor.tiles_per_batch, len(grid) - start))
        result = {"seconds": time.perf_counter() - started}
    else:
        params = SegmentationParams(input_path=raster, output_dir=str(WORK / f"out_{Path(raster).stem}_s{stride}"),
                                    model=str(WORK / "vits16-random"), stride=stride, device="cpu", clusters=6,
                                    use_cache=False)
        record = segment(params, load_model=lambda _: backbone)
        result = {"seconds": time.perf_counter() - started, "timings": record.timings}
    result.update(tiles=len(grid), peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  threads=__import__("torch").get_num_threads())
    return result


def _polygonize_alone(kind: str, clusters: str) -> dict:
    """`polygonize_clusters` on a cluster raster, in GDAL's one pass or in the product's strips."""
    from treeseg_qgis.engine.gis.polygons import STRIP_PIXELS, polygonize_clusters

    strip_pixels = STRIP_PIXELS if kind == "strips" else 2**62
    started = time.perf_counter()
    count = polygonize_clusters(clusters, str(WORK / f"polygons_{kind}.gpkg"), [0], "polygons",
                                strip_pixels=strip_pixels)
    return {"seconds": time.perf_counter() - started, "polygons": count, "tiles": 0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _through_the_dock_path(raster: str, stride: int, tiles: int) -> dict:
    """The same job as the dock's QgsTask runs it: from a QGIS process, through EngineClient and the worker.

    The dock keeps one worker with the model loaded between runs: a first job starts it and loads the
    model (a warm-up), and the second, identical job is timed.
    """
    from qgis.core import QgsApplication

    from treeseg_qgis.params import SegmentationParams
    from treeseg_qgis.qgis_side.engine_client import EngineClient

    application = QgsApplication([], False)
    application.initQgis()
    client = EngineClient(sys.executable)
    try:
        params = SegmentationParams(input_path=raster, output_dir=str(WORK / f"out_dock_{Path(raster).stem}"),
                                    model=str(WORK / "vits16-random"), stride=stride, device="cpu", clusters=6,
                                    use_cache=False)
        client.segment(params)
        started = time.perf_counter()
        record = client.segment(params)
        seconds = time.perf_counter() - started
    finally:
        client.close()
    return {"seconds": seconds, "timings": record.timings, "tiles": tiles,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "threads": 0}


def run_child(kind: str, raster: Path, stride: int) -> dict:
    load = os.getloadavg()[0]
    output = subprocess.run([sys.executable, __file__, "--child", kind, str(raster), str(stride)],
                            check=True, capture_output=True, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", QT_QPA_PLATFORM="offscreen"))
    result = json.loads(output.stdout.strip().splitlines()[-1])
    result["load"] = load
    print(f"  {kind:8s} {raster.name:18s} stride {stride:2d}: {result['seconds']:8.1f} s, "
          f"peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    return result


def median_ratio(pairs: list[list[dict]]) -> float:
    """The median over the (end to end, forward) pairs of their time ratio."""
    return statistics.median(end_to_end["seconds"] / forward["seconds"] for end_to_end, forward in pairs)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="4,36,100,400", help="raster sizes in megapixels (of 4,36,100,400)")
    parser.add_argument("--strides", default="16,8,4", help="strides compared on the 4 MP raster")
    parser.add_argument("--parts", default="ratio,memory,stride,dock,polygons",
                        help="which figures to measure now (the others are kept from earlier runs)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="(end to end, bare forward) pairs per raster for the ratio, run one after the other")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "RASTER", "STRIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, raster, stride = args.child
        print(json.dumps(measure(kind, raster, int(stride))))
        return
    sizes = [int(size) for size in args.sizes.split(",")]
    parts = set(args.parts.split(","))
    paths = make_inputs()
    results_file = WORK / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for part in ("ratio", "memory", "stride", "dock", "polygons"):
        results.setdefault(part, {})
    started = time.time()
    if "ratio" in parts:
        print("end to end vs bare forward, stride 16", flush=True)
        for size in (size for size in sizes if size in (4, 36)):
            results["ratio"][str(size)] = [
                [run_child("segment", paths[size], 16), run_child("forward", paths[size], 16)]
                for _ in range(args.repeat)]
    if "memory" in parts:
        print("peak memory per raster size, stride 16", flush=True)
        for size in sizes:
            results["memory"][str(size)] = run_child("segment", paths[size], 16)
    if "stride" in parts:
        print("stride cost on 4 MP", flush=True)
        for stride in (int(stride) for stride in args.strides.split(",")):
            results["stride"][str(stride)] = run_child("segment", paths[4], stride)
    if "dock" in parts:
        print("dock path (QGIS process → EngineClient → worker) vs command line, 4 MP", flush=True)
        results["dock"]["4"] = [run_child("dock", paths[4], 16), run_child("segment", paths[4], 16)]
    if "polygons" in parts:
        print("polygonize alone, on the cluster rasters of the memory runs", flush=True)
        for size in (size for size in sizes if size in (36, 400)):
            clusters = WORK / f"out_{paths[size].stem}_s16" / f"{paths[size].stem}_clusters.tif"
            results["polygons"][str(size)] = {kind: run_child(kind, clusters, 16) for kind in POLYGONIZE_KINDS}
    results.setdefault("commands", []).append(
        f"scripts/bench.py {' '.join(sys.argv[1:])} ({(time.time() - started) / 60:.0f} min)")
    results_file.write_text(json.dumps(results, indent=1))
    write_report(results)


def write_report(results: dict) -> None:
    import torch

    ratio = {int(size): runs for size, runs in sorted(results["ratio"].items(), key=lambda item: int(item[0]))}
    memory = {int(size): run for size, run in sorted(results["memory"].items(), key=lambda item: int(item[0]))}
    stride_runs = {int(stride): run for stride, run in sorted(results["stride"].items(),
                                                              key=lambda item: -int(item[0]))}

    lines = [
        "# Benchmarks",
        "",
        f"Date: {datetime.date.today().isoformat()}. Machine: {cpu_model()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, no GPU. "
        f"Command: `make bench`; runs that made these figures: {'; '.join(results['commands'])}. "
        "The load column is the 1-minute load average when the run started (2 = both cores busy "
        "elsewhere): figures taken under load are slower than on a quiet machine.",
        "",
        "Model: the ViT-S/16 DINOv3 architecture (hidden 384, 12 layers, 6 heads, 4 registers) with random "
        "weights, loaded through the product's loader. Tiles 512 px with 64 px overlap. Inputs: a synthetic "
        "2000 × 2000 px tiled GeoTIFF (crowns on soil) and VRT mosaics of it. Each figure is one process, "
        "after a warm-up forward.",
        "",
        "## End to end vs the bare model forward (stride 16)",
        "",
        "Each pair is an end-to-end run followed at once by the bare forward over the same tiles in the "
        "same batches (each its own process), so both see the same machine; the ratio that counts is the "
        "median over the pairs. On this shared 2-core machine the same process varies by up to 15 % from "
        "run to run.",
        "",
        "| raster | tiles | pair | `segment` end to end (s) | bare forward, same tiles (s) | ratio | load |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for size, pairs in ratio.items():
        for number, (end_to_end, forward) in enumerate(pairs, 1):
            lines.append(f"| {size} MP | {end_to_end['tiles']} | {number} | {end_to_end['seconds']:.1f} | "
                         f"{forward['seconds']:.1f} | {end_to_end['seconds'] / forward['seconds']:.2f} | "
                         f"{end_to_end.get('load', 0):.1f} |")
        lines.append(f"| {size} MP | | **median** | | | **{median_ratio(pairs):.2f}** | |")
    smallest = memory[min(memory)]["peak_rss_mb"] if memory else 1.0
    lines += ["", "## Peak resident memory (stride 16)", "", "| raster | tiles | peak RSS (MB) | × smallest | load |",
              "| --- | --- | --- | --- | --- |"]
    for size, run in memory.items():
        lines.append(f"| {size} MP | {run['tiles']} | {run['peak_rss_mb']:.0f} | {run['peak_rss_mb'] / smallest:.2f} | "
                     f"{run.get('load', 0):.1f} |")
    base = stride_runs[16]["seconds"] if 16 in stride_runs else None
    lines += ["", "## Stride cost (4 MP)", "", "| stride | forward passes per tile | time (s) | × stride 16 | load |",
              "| --- | --- | --- | --- | --- |"]
    for stride, run in stride_runs.items():
        factor = f"{run['seconds'] / base:.2f}" if base else "—"
        lines.append(f"| {stride} | {(16 // stride) ** 2} | {run['seconds']:.1f} | {factor} | "
                     f"{run.get('load', 0):.1f} |")
    if results["dock"]:
        dock, direct = results["dock"]["4"]
        lines += ["", "## The dock's path vs the command line (4 MP, stride 16)", "",
                  "The dock's QgsTask hands the job to the engine worker through EngineClient; measured from a "
                  "QGIS process with the worker already running and its model loaded (as the dock keeps it), "
                  "against `segment` run in the engine's process with the model loaded.", "",
                  "| path | time (s) | ratio | load |", "| --- | --- | --- | --- |",
                  f"| command line (`segment`) | {direct['seconds']:.1f} | 1.00 | {direct.get('load', 0):.1f} |",
                  f"| dock path (QGIS → EngineClient → worker) | {dock['seconds']:.1f} | "
                  f"{dock['seconds'] / direct['seconds']:.2f} | {dock.get('load', 0):.1f} |"]
    if results.get("polygons"):
        lines += ["", "## Polygonize alone (the cluster raster of the memory run)", "",
                  "GDAL 3.6's polygonize in one pass against the product's strips of "
                  "8 MP with the regions that cross a seam joined again (gis/seams.py); each its own process, "
                  "without torch, so the peak is the polygonize step's own.", "",
                  "| raster | pass | polygons | time (s) | peak RSS (MB) | load |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for size, runs in sorted(results["polygons"].items(), key=lambda item: int(item[0])):
            for kind, run in runs.items():
                lines.append(f"| {size} MP | {kind} | {run['polygons']} | {run['seconds']:.1f} | "
                             f"{run['peak_rss_mb']:.0f} | {run.get('load', 0):.1f} |")
    lines += ["", "## Where the time goes (end to end, seconds)", ""]
    stages = ["load_model", "read", "features", "project", "cluster", "assign", "write", "polygonize", "preview",
              "total"]
    lines += ["| run | " + " | ".join(stages) + " |", "| --- |" + " --- |" * len(stages)]
    runs = {f"{size} MP, stride 16": run for size, run in memory.items()}
    runs.update({f"4 MP, stride {stride}": run for stride, run in stride_runs.items() if stride != 16})
    for label, run in runs.items():
        timings = run["timings"]
        lines.append(f"| {label} | " + " | ".join(f"{timings.get(stage, 0):.1f}" for stage in stages) + " |")
    lines += ["", "`read` runs in a reader thread beside the forward pass, so it overlaps `features`.", ""]
    lines += _against_targets(ratio, memory, stride_runs)
    report = REPO / "docs" / "BENCHMARKS.md"
    report.write_text("\n".join(lines + _other_sections(report, lines)))
    print(report)


def _other_sections(report: Path, lines: list[str]) -> list[str]:
    """The sections of the existing report that this script does not write (engine set-up, precision, …),
    kept as they are."""
    own = {line for line in lines if line.startswith("## ")}
    text = report.read_text() if report.exists() else ""
    kept = [section for section in text.split("\n## ")[1:] if f"## {section.splitlines()[0]}" not in own]
    return [f"\n## {section.rstrip()}\n" for section in kept]


def _against_targets(ratio: dict, memory: dict, stride_runs: dict) -> list[str]:
    """The issue's targets, each with the figure above that decides it."""
    def verdict(value: float, limit: float) -> str:
        return f"**{'met' if value <= limit else 'NOT met'}** ({value:.2f})"

    lines = ["## Against the targets (issue #6)", ""]
    if 36 in ratio:
        lines.append(f"- End to end / bare forward ≤ 1.18 at 36 MP, stride 16 (median of {len(ratio[36])} pairs): "
                     f"{verdict(median_ratio(ratio[36]), 1.18)}.")
    if 4 in memory and 400 in memory:
        lines.append(f"- Peak RSS at 400 MP ≤ 1.15 × at 4 MP: "
                     f"{verdict(memory[400]['peak_rss_mb'] / memory[4]['peak_rss_mb'], 1.15)}.")
    if 16 in stride_runs and 8 in stride_runs:
        lines.append(f"- Stride 8 ≤ 4.3 × stride 16 (4 MP): "
                     f"{verdict(stride_runs[8]['seconds'] / stride_runs[16]['seconds'], 4.3)}.")
    return lines + [""]


if __name__ == "__main__":
    main()
