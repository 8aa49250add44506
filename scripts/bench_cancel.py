"""Cancel to idle: how long a cancelled run takes to stop, and what the next run pays.

The engine worker runs the real ViT-S/16 DINOv3 architecture with random weights
(scripts/bench.py's model and 4 MP raster), driven by EngineClient as the panel
drives it. Each repetition starts a run with the feature cache off, asks for a
cancel at a random moment during feature extraction, and times the moment of the
request to the cancelled error (the panel is then idle). The next run's time on
a 512 × 512 crop is compared with the same run on a freshly started worker (what
every run after a cancel paid when cancel killed the worker).

    .venv/bin/python scripts/bench_cancel.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench import WORK, make_inputs  # noqa: E402

from treeseg_qgis.params import SegmentationParams  # noqa: E402
from treeseg_qgis.qgis_side.engine_client import EngineClient, EngineError, JobWatch  # noqa: E402

CROP = 512


def crop(raster: Path) -> Path:
    """A 512 × 512 px corner of the raster: a quick run that still loads and runs the model."""
    from osgeo import gdal

    gdal.UseExceptions()
    path = WORK / "ortho_crop.tif"
    if not path.exists():
        gdal.Translate(str(path), str(raster), srcWin=[0, 0, CROP, CROP])
    return path


def params(raster: Path, out: str, model: Path) -> SegmentationParams:
    return SegmentationParams(input_path=str(raster), output_dir=str(WORK / out), model=str(model), device="cpu",
                              clusters=3, use_cache=False)


def cancelled_run(client: EngineClient, raster: Path, model: Path, rng: random.Random) -> float:
    """Seconds from the cancel request to the cancelled error, the request at a random moment in extraction."""
    extracting_since: list[float] = []
    delay = rng.uniform(0.5, 3.0)

    def on_progress(percent: float, stage: str) -> None:
        if stage.startswith("Extracting") and not extracting_since:
            extracting_since.append(time.monotonic())

    def is_cancelled() -> bool:
        return bool(extracting_since) and time.monotonic() >= extracting_since[0] + delay

    try:
        client.segment(params(raster, "cancelled", model), JobWatch(on_progress, is_cancelled=is_cancelled))
    except EngineError as error:
        if error.kind != "cancelled":
            raise
        return time.monotonic() - (extracting_since[0] + delay)
    raise RuntimeError("The run finished before the cancel: use a larger raster.")


def timed_run(client: EngineClient, raster: Path, model: Path) -> float:
    started = time.monotonic()
    client.segment(params(raster, "crop", model))
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rasters = make_inputs()
    model, small = WORK / "vits16-random", crop(rasters[4])
    rng = random.Random(0)
    client = EngineClient(sys.executable, {"HF_HUB_OFFLINE": "1"})
    try:
        timed_run(client, small, model)
        stops, next_runs = [], []
        for _ in range(args.repeats):
            stops.append(cancelled_run(client, rasters[4], model, rng))
            next_runs.append(timed_run(client, small, model))
        loads = client.probe()["model_loads"]
        still_running = client.running
    finally:
        client.close()
    fresh_runs = []
    for _ in range(min(3, args.repeats)):
        fresh = EngineClient(sys.executable, {"HF_HUB_OFFLINE": "1"})
        try:
            fresh_runs.append(timed_run(fresh, small, model))
        finally:
            fresh.close()
    print(f"cancel to idle, s: median {statistics.median(stops):.2f}, max {max(stops):.2f} "
          f"({', '.join(f'{value:.2f}' for value in stops)})")
    print(f"worker still running after the cancels: {still_running}; model loads in {1 + 2 * args.repeats} jobs: "
          f"{loads}")
    print(f"next run on the kept worker, s: median {statistics.median(next_runs):.2f}; on a fresh worker: "
          f"median {statistics.median(fresh_runs):.2f}")


if __name__ == "__main__":
    main()
