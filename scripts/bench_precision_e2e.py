"""`make bench` part: one 36 MP run end to end with `--precision auto` (int8 in ONNX Runtime on a CPU with
AVX2 or AVX-512) against float32, in the same session, variants alternating.

The raster is the real NEON sample OSBS_029 (400 × 400 px) mirrored out to 6000 × 6000 px (36 MP), written
with GDAL; the model is the ViT-S/16 DINOv3 architecture with random weights (scripts/bench_precision.py).
Each run is the command line in its own process at stride 16, K = 6, without the feature cache
(scripts/bench_density.py `run`): wall time, peak RSS and the run record's timings. The int8 export is
made first by a run on a 512 × 512 crop, timed on its own, so the 36 MP int8 runs use the cached export
as every run after the first does. Fidelity: the share of pixels in the same cluster in the two 36 MP
cluster rasters (each int8 cluster matched to the float32 cluster it overlaps most).

    .venv/bin/python scripts/bench_precision_e2e.py [--repeats 1] [--side 6000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
WORK = REPO / "output" / "bench" / "precision-e2e"
VARIANTS = ("auto", "float32")


def mosaic(side: int) -> Path:
    """The NEON sample mirrored out to side × side px, tiled and compressed, with its georeferencing."""
    from osgeo import gdal

    gdal.UseExceptions()
    path = WORK / f"osbs_{side}.tif"
    if path.exists():
        return path
    WORK.mkdir(parents=True, exist_ok=True)
    sample = gdal.Open(str(REPO / "resources" / "sample" / "OSBS_029.tif"))
    image = sample.ReadAsArray()
    dataset = gdal.GetDriverByName("GTiff").Create(str(path), side, side, 3, gdal.GDT_Byte,
                                                   ["TILED=YES", "COMPRESS=DEFLATE"])
    dataset.SetGeoTransform(sample.GetGeoTransform())
    dataset.SetProjection(sample.GetProjection())
    for band in range(3):
        dataset.GetRasterBand(band + 1).WriteArray(np.pad(image[band], ((0, side - image.shape[1]),
                                                                        (0, side - image.shape[2])), mode="symmetric"))
    dataset = None
    return path


def clusters_of(name: str) -> np.ndarray:
    from osgeo import gdal

    (path,) = (WORK / f"out-{name}").glob("*_clusters.tif")
    dataset = gdal.Open(str(path))
    return dataset.GetRasterBand(1).ReadAsArray()


def same_cluster(reference: np.ndarray, other: np.ndarray) -> float:
    """The share of pixels whose cluster matches, each cluster of `other` matched to the reference cluster
    it overlaps most."""
    pairs = np.zeros((int(reference.max()) + 1, int(other.max()) + 1), np.int64)
    np.add.at(pairs, (reference.ravel(), other.ravel()), 1)
    return float(pairs.max(axis=0).sum() / reference.size)


def main() -> None:
    from bench_density import run
    from bench_precision import cpu_description, model_folder
    from osgeo import gdal

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant, alternating")
    parser.add_argument("--side", type=int, default=6000, help="raster width and height in pixels")
    args = parser.parse_args()
    model, raster = model_folder("small"), mosaic(args.side)
    crop = WORK / "crop_512.tif"
    gdal.Translate(str(crop), str(raster), srcWin=[0, 0, 512, 512])
    shutil.rmtree(WORK / "out-export", ignore_errors=True)
    started = time.perf_counter()
    export = run(model, crop, "export", "auto", WORK)
    print(f"int8 export + a 512² run: {time.perf_counter() - started:.1f} s ({export['precision']})", flush=True)
    results: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    for repeat in range(args.repeats):
        for variant in VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]:
            shutil.rmtree(WORK / f"out-{variant}-{repeat}", ignore_errors=True)  # one run's outputs per folder
            result = run(model, raster, f"{variant}-{repeat}", variant, WORK)
            results[variant].append(result)
            print(f"{variant}: {result['seconds']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB, "
                  f"precision {result['precision']}, load {result['load']:.1f}, timings {result['timings']}",
                  flush=True)
    ratios = [fp32["seconds"] / auto["seconds"] for auto, fp32 in zip(results["auto"], results["float32"])]
    agreement = same_cluster(clusters_of("float32-0"), clusters_of("auto-0"))
    summary = {"cpu": cpu_description(), "threads": os.cpu_count(), "side": args.side, "export": export,
               "speedup": statistics.median(ratios), "same_cluster": agreement, "results": results}
    print(f"speed-up of auto over float32 end to end: {summary['speedup']:.2f}× (median of {len(ratios)}); "
          f"same cluster: {100 * agreement:.2f} % of the pixels")
    (WORK / "results.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
