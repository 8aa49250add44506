"""`make bench` part: the product at stride 16 on a 2299 × 2472 px (5.7 MP) RGB raster, ViT-S and ViT-B.

The size of the NEON image the upstream research code was timed on (issue #16: at equal feature-grid
density we took 0.43× its time with ViT-S and 0.49× with ViT-B, at 0.19× / 0.30× its memory), so the
ratio can be tracked. The raster is the real NEON sample OSBS_029 mirrored out to that size, written
with GDAL; the models are the DINOv3 architectures with random weights (scripts/bench_precision.py).
Each run is the command line in its own process, without the feature cache: wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
WORK = REPO / "output" / "bench" / "density"
WIDTH, HEIGHT = 2299, 2472


def make_raster() -> Path:
    """The NEON sample mirrored out to 2299 × 2472 px, with its georeferencing."""
    path = WORK / "osbs_5.7mp.tif"
    if not path.exists():
        write_mirrored_sample(path, WIDTH, HEIGHT)
    return path


def write_mirrored_sample(path: Path, width: int, height: int) -> np.ndarray:
    """The NEON sample OSBS_029 mirrored out to `width` × `height` px as a GeoTIFF at `path`, with its
    georeferencing; its pixels (bands first)."""
    from osgeo import gdal

    gdal.UseExceptions()
    path.parent.mkdir(parents=True, exist_ok=True)
    sample = gdal.Open(str(REPO / "resources" / "sample" / "OSBS_029.tif"))
    image = sample.ReadAsArray()
    mosaic = np.pad(image, ((0, 0), (0, height - image.shape[1]), (0, width - image.shape[2])), mode="symmetric")
    dataset = gdal.GetDriverByName("GTiff").Create(str(path), width, height, 3, gdal.GDT_Byte,
                                                   ["TILED=YES", "COMPRESS=DEFLATE"])
    dataset.SetGeoTransform(sample.GetGeoTransform())
    dataset.SetProjection(sample.GetProjection())
    for band in range(3):
        dataset.GetRasterBand(band + 1).WriteArray(mosaic[band])
    dataset = None
    return mosaic


def run(model_dir: Path, raster: Path, name: str, precision: str = "auto", work: Path = WORK) -> dict:
    """One CLI run at stride 16 in its own process: wall seconds and peak RSS of that process."""
    out = work / f"out-{name}"
    command = [sys.executable, "-c",
               "import resource, runpy, sys; sys.argv = ['treeseg_qgis'] + sys.argv[1:]\n"
               "try:\n    runpy.run_module('treeseg_qgis', run_name='__main__')\n"
               "finally:\n    print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
               "file=sys.stderr)",
               "segment", str(raster), "--out", str(out), "--model", str(model_dir), "--device", "cpu",
               "--stride", "16", "--clusters", "6", "--no-cache", "--precision", precision]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{name}: the run failed:\n{done.stderr[-2000:]}")
    peak = next(int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_KB"))
    record = json.loads(next(out.glob("*_run.json")).read_text())
    return {"model": name, "seconds": seconds, "peak_rss_mb": peak / 1024, "timings": record["timings"],
            "precision": record["model"].get("precision"), "load": os.getloadavg()[0]}


def main() -> None:
    from bench_precision import model_folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="small,base")
    args = parser.parse_args()
    raster = make_raster()
    results = [run(model_folder(name), raster, name) for name in args.models.split(",")]
    for result in results:
        print(f"{result['model']}: {result['seconds']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB, "
              f"precision {result['precision']}, load {result['load']:.1f}, timings {result['timings']}")
    (WORK / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
