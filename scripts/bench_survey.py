"""Surveys: 8 rasters through `segment` 8 times, `segment-many` with 1 and 2 workers, printed as a Markdown table.

The rasters are the bundled NEON OSBS_029 crop turned and mirrored into 8 different 400 x 400 px GeoTIFFs.
The model is the ViT-S/16 DINOv3 architecture with random weights (this machine cannot reach the hub),
loaded through the product's loader. Every configuration gets its own empty feature cache, so each one
extracts every feature. Usage: .venv/bin/python scripts/bench_survey.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from osgeo import gdal

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "resources" / "sample" / "OSBS_029.tif"
COMMON = ["--model", "small", "--allow-untrained", "--device", "cpu", "--quiet"]


def make_rasters(folder: Path, count: int = 8) -> list[str]:
    """`count` variants of the sample (rotations and mirror images), georeferenced like it."""
    source = gdal.Open(str(SAMPLE))
    pixels = source.ReadAsArray()
    paths = []
    for index in range(count):
        variant = np.rot90(pixels, index % 4, axes=(1, 2))
        if index >= 4:
            variant = variant[:, :, ::-1]
        path = folder / f"tile_{index + 1}.tif"
        out = gdal.GetDriverByName("GTiff").Create(str(path), variant.shape[2], variant.shape[1], 3, gdal.GDT_Byte)
        out.SetGeoTransform(source.GetGeoTransform())
        out.SetProjection(source.GetProjection())
        out.WriteArray(np.ascontiguousarray(variant))
        out = None
        paths.append(str(path))
    return paths


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "treeseg_qgis", *command], cwd=REPO, check=False,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", help="keep the rasters and outputs in this folder")
    args = parser.parse_args()
    folder = Path(args.keep or tempfile.mkdtemp(prefix="treeseg-bench-survey-"))
    folder.mkdir(parents=True, exist_ok=True)
    rasters = make_rasters(folder)
    load = os.getloadavg()[0]
    rows = []
    started = time.perf_counter()
    for path in rasters:
        timed(["segment", path, "--out", str(folder / "single"), "--cache-dir", str(folder / "cache_single"),
               *COMMON])
    rows.append(("8 × `segment` (a process and a model load each, its own clustering)",
                 time.perf_counter() - started, load))
    for workers in (1, 2):
        load = os.getloadavg()[0]
        seconds = timed(["segment-many", *rasters, "--out", str(folder / f"many{workers}"), "--workers",
                         str(workers), "--cache-dir", str(folder / f"cache_many{workers}"), *COMMON])
        rows.append((f"`segment-many --workers {workers}` (fit + apply)", seconds, load))
    load = os.getloadavg()[0]
    seconds = timed(["segment-many", *rasters, "--out", str(folder / "apply"), "--cluster-model",
                     str(folder / "many1" / "survey.treeseg"), "--cache-dir", str(folder / "cache_apply"), *COMMON])
    rows.append(("`segment-many --workers 1 --cluster-model` (apply only)", seconds, load))
    print("| run | 8 rasters (s) | per raster (s) | load |")
    print("| --- | --- | --- | --- |")
    for name, seconds, load in rows:
        print(f"| {name} | {seconds:.1f} | {seconds / 8:.1f} | {load:.1f} |")


if __name__ == "__main__":
    main()
