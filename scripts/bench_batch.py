"""`make bench` (batch part): the per-raster overhead of a Processing batch with the warm engine against a fresh
worker per raster (issue #16).

Ten 384 × 384 px crops of resources/sample/OSBS_029.tif (400 × 400 px, so no 512-px crop fits), written with
GDAL, go through the Processing algorithm treeseg:segmenttrees in one standalone QGIS process, as the batch
dialog runs them. Warm: one shared engine worker for the ten (closed before the batch, so its first raster
starts it and loads the model). Fresh: the shared worker closed before every raster (the behaviour before
the warm engine: a worker start and a model load per raster). The model is the ViT-S/16 DINOv3 architecture
with random weights (`allow_untrained`; the compute is real, the result is not a segmentation). Each batch
gets its own empty feature cache, so every raster runs the model. Batches alternate warm, fresh, warm, ….

Overhead of a raster = its wall time through processing.run minus its segmentation compute from its run
record (`timings.total - timings.load_model`): what remains is the worker start, the model load and
Processing's own work. The section "Processing batch: warm engine" of docs/BENCHMARKS.md is rewritten.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from bench import cpu_model  # noqa: E402

SAMPLE = REPO / "resources" / "sample" / "OSBS_029.tif"
WORK = REPO / "output" / "bench" / "batch"
CROP = 384
RASTERS = 10
HEADING = "## Processing batch: warm engine (issue #16)"
TARGET_SECONDS = 1.0


def crops() -> list[Path]:
    """Ten crops of the sample at different offsets, written with GDAL."""
    from osgeo import gdal

    gdal.UseExceptions()
    WORK.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(RASTERS):
        path = WORK / f"osbs_crop_{index}.tif"
        gdal.Translate(str(path), str(SAMPLE), srcWin=[index, RASTERS - index, CROP, CROP])  # every one its own
        paths.append(path)
    return paths


def run_batch(rasters: list[Path], model: Path, fresh: bool, out: Path) -> list[dict]:
    """Each raster through treeseg:segmenttrees; its wall time and its run record's timings."""
    import processing

    from treeseg_qgis.qgis_side.engine_client import close_shared_engines

    close_shared_engines()
    out.mkdir(parents=True)
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="treeseg-bench-cache-", dir=out)
    rows = []
    for index, raster in enumerate(rasters):
        if fresh:
            close_shared_engines()
        folder = out / f"{index}"
        started = time.perf_counter()
        results = processing.run("treeseg:segmenttrees", {
            "INPUT": str(raster), "MODEL_ID": str(model), "ALLOW_UNTRAINED": True, "DEVICE": "cpu", "CLUSTERS": 4,
            "OUTPUT_CLUSTERS": str(folder / "clusters.tif"), "OUTPUT_TREES": str(folder / "trees.tif"),
            "OUTPUT_POLYGONS": str(folder / "polygons.gpkg"),
        })
        wall = time.perf_counter() - started
        timings = json.loads(Path(results["RUN_RECORD"]).read_text())["timings"]
        compute = timings["total"] - timings["load_model"]
        rows.append({"wall": wall, "load_model": timings["load_model"], "compute": compute,
                     "overhead": wall - compute})
    close_shared_engines()
    return rows


def start_qgis():
    """A standalone QgsApplication with Processing and the treeseg provider, this Python as the engine."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["TREESEG_ENGINE_PYTHON"] = sys.executable
    from qgis.core import QgsApplication

    app = QgsApplication([], False)
    app.initQgis()
    sys.path.append("/usr/share/qgis/python/plugins")
    from processing.core.Processing import Processing

    Processing.initialize()
    from treeseg_qgis.qgis_side.processing.provider import TreesegProvider

    provider = TreesegProvider()
    QgsApplication.processingRegistry().addProvider(provider)
    return app, provider


def summary(batches: dict[str, list[list[dict]]]) -> dict[str, dict[str, float]]:
    """Per mode, medians over the batches of: the first raster's overhead, the per-raster overhead after the
    first (median of rasters 2..10), the wall time per raster after the first."""
    result = {}
    for mode, runs in batches.items():
        result[mode] = {
            "first_overhead": statistics.median(rows[0]["overhead"] for rows in runs),
            "overhead_after_first": statistics.median(statistics.median(row["overhead"] for row in rows[1:])
                                                      for rows in runs),
            "wall_after_first": statistics.median(statistics.median(row["wall"] for row in rows[1:]) for rows in runs),
            "compute_after_first": statistics.median(statistics.median(row["compute"] for row in rows[1:])
                                                     for rows in runs),
            "load_after_first": statistics.median(statistics.median(row["load_model"] for row in rows[1:])
                                                  for rows in runs),
        }
    return result


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=False).stdout.strip() or "unknown"


def report(figures: dict[str, dict[str, float]], rounds: int, loads: tuple[float, float], seconds: float,
           code: str) -> list[str]:
    """The section of docs/BENCHMARKS.md: `loads` at the start and the end, `code` the commit that ran."""
    import torch

    warm, fresh = figures["warm"], figures["fresh"]
    verdict = "met" if warm["overhead_after_first"] <= TARGET_SECONDS else "NOT met"
    return [
        HEADING, "",
        f"Date: {datetime.date.today()}. Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"no GPU; 1-minute load {loads[0]:.1f} at the start, {loads[1]:.1f} at the end (other work on the machine "
        f"slows the compute, not the overhead). Command: `.venv/bin/python scripts/bench_batch.py --rounds {rounds}` "
        f"(part of `make bench`; {seconds / 60:.0f} min), code of commit {code}.",
        "",
        f"{RASTERS} crops of {CROP} × {CROP} px of resources/sample/OSBS_029.tif through `treeseg:segmenttrees` "
        "(processing.run) in one standalone QGIS process; model: the ViT-S/16 DINOv3 architecture with random "
        "weights (`ALLOW_UNTRAINED`), stride 16, CPU. Warm: the session's shared engine worker; fresh: the worker "
        "closed before every raster (the old behaviour). Overhead = wall time of the run minus its segmentation "
        "compute from the run record (`total - load_model`): worker start, model load and Processing's own work. "
        f"Medians over {rounds} batches of each, alternating warm and fresh; per batch the median of rasters 2 to "
        f"{RASTERS}.",
        "",
        "| engine | overhead, first raster (s) | overhead per raster after the first (s) | model load after the "
        "first (s) | compute per raster (s) | wall per raster after the first (s) |",
        "| --- | --- | --- | --- | --- | --- |",
        *(f"| {mode} | {row['first_overhead']:.2f} | {row['overhead_after_first']:.2f} | "
          f"{row['load_after_first']:.2f} | {row['compute_after_first']:.2f} | {row['wall_after_first']:.2f} |"
          for mode, row in figures.items()),
        "",
        f"- Per-raster overhead after the first ≤ {TARGET_SECONDS:.0f} s with the warm engine: **{verdict}** "
        f"({warm['overhead_after_first']:.2f} s; with a fresh worker per raster: "
        f"{fresh['overhead_after_first']:.2f} s).",
        f"- Wall time per raster after the first, fresh / warm: "
        f"{fresh['wall_after_first'] / warm['wall_after_first']:.2f}.",
        "",
    ]


def write_section(lines: list[str]) -> Path:
    """Replace this script's section of docs/BENCHMARKS.md (or append it), leaving the others as they are."""
    path = REPO / "docs" / "BENCHMARKS.md"
    sections = [section.rstrip("\n") for section in path.read_text().split("\n## ")]
    own = "\n".join(lines).rstrip("\n")[3:]
    kept = [section for section in sections[1:] if not f"## {section}".startswith(HEADING)]
    path.write_text("\n\n## ".join([sections[0], *kept, own]) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="batches of each kind, alternating warm and fresh")
    args = parser.parse_args()
    from bench import vits_random_model

    began, code = time.perf_counter(), commit()
    load = os.getloadavg()[0]
    app, _ = start_qgis()
    model, rasters = vits_random_model(), crops()
    out = Path(tempfile.mkdtemp(prefix="runs-", dir=WORK))
    batches: dict[str, list[list[dict]]] = {"warm": [], "fresh": []}
    for round_index in range(args.rounds):
        for mode in ("warm", "fresh"):
            rows = run_batch(rasters, model, mode == "fresh", out / f"{mode}{round_index}")
            batches[mode].append(rows)
            print(mode, round_index, json.dumps([{key: round(value, 2) for key, value in row.items()}
                                                 for row in rows]), flush=True)
    figures = summary(batches)
    print(json.dumps(figures, indent=1))
    print(write_section(report(figures, args.rounds, (load, os.getloadavg()[0]), time.perf_counter() - began, code)))
    (WORK / "bench_batch.json").write_text(json.dumps({"batches": batches, "summary": figures}, indent=1))
    shutil.rmtree(out)
    app.exitQgis()


if __name__ == "__main__":
    main()
