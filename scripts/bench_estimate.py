"""The panel's time estimate against the measured time of a run, cold and warm (issue #28; docs/BENCHMARKS.md).

Cold: a new engine worker (as the panel's first run after QGIS starts: worker start, model load, the first int8
export into an empty export cache). Warm: the next run on the same worker (model loaded, export cached). Each
run goes through EngineClient, as the panel's task sends it, on a synthetic orthophoto of the asked size (a crop
or mosaic of scripts/bench.py's 4 MP GeoTIFF), with the ViT-S/16 architecture and random weights saved as a
model folder, stride 16, automatic K, no feature cache. The estimate is memory.estimate_run_time at speed 1
(before this machine has measured any run); the target is 0.67–1.5 × the measured time.

    .venv/bin/python scripts/bench_estimate.py --sizes 1        # about a minute
    .venv/bin/python scripts/bench_estimate.py --sizes 1,4,36   # the whole table (36 MP: minutes)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench import WORK, cpu_model, make_inputs, vits_random_model  # noqa: E402

from treeseg_qgis import memory  # noqa: E402
from treeseg_qgis.memory import estimate_run_time  # noqa: E402
from treeseg_qgis.params import SegmentationParams  # noqa: E402
from treeseg_qgis.qgis_side.engine_client import EngineClient  # noqa: E402

TARGET = (0.67, 1.5)


def raster_of(megapixels: int, inputs: dict[int, Path]) -> Path:
    """A raster of about `megapixels` MP: the bench inputs, or a crop of the 4 MP one."""
    if megapixels in inputs:
        return inputs[megapixels]
    from osgeo import gdal

    side = round((megapixels * 1e6) ** 0.5)
    crop = WORK / f"ortho_{megapixels}mp.vrt"
    gdal.Translate(str(crop), str(inputs[4]), format="VRT", srcWin=[0, 0, side, side])
    return crop


def timed_run(client: EngineClient, raster: Path, model: Path, out: Path) -> tuple[float, dict]:
    params = SegmentationParams(str(raster), str(out), model=str(model), device="cpu", use_cache=False)
    started = time.monotonic()
    record = client.segment(params)
    return time.monotonic() - started, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1", help="megapixels, comma-separated (default: 1)")
    args = parser.parse_args()
    inputs = make_inputs()
    model = vits_random_model()
    print(f"{time.strftime('%Y-%m-%d')}, {cpu_model()}, {os.cpu_count()} cores, 1-minute load "
          f"{os.getloadavg()[0]:.1f}")
    print("| raster | tiles | engine | estimate (s) | measured (s) | measured / estimate | within 0.67–1.5 | "
          "calibrated estimate (s) | measured / calibrated | engine's own times (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for megapixels in (int(size) for size in args.sizes.split(",")):
        raster = raster_of(megapixels, inputs)
        with tempfile.TemporaryDirectory(prefix="treeseg-bench-estimate-") as scratch:
            client = EngineClient(sys.executable, {"XDG_CACHE_HOME": str(Path(scratch) / "cache"),
                                                   "HF_HUB_OFFLINE": "1"})
            try:
                runs = [("cold", *timed_run(client, raster, model, Path(scratch) / "cold")),
                        ("warm", *timed_run(client, raster, model, Path(scratch) / "warm"))]
                precision = client.probe()["precision"]
            finally:
                client.close()
        speed = None  # the panel's calibration: the previous run's measured time over its estimate
        for engine, measured, record in runs:
            cold = engine == "cold"
            expected = estimate_run_time(str(model), record["input"]["width"], record["input"]["height"],
                                         precision=precision, engine_started=not cold, model_loaded=not cold,
                                         exported=not cold)
            ratio = measured / expected.total
            calibrated = "– | –"
            if speed is not None:
                calibrated = f"{speed * expected.total:.1f} | {measured / (speed * expected.total):.2f}"
            timings = ", ".join(f"{key} {float(value):.1f}" for key, value in record["timings"].items()
                                if key in ("load_model", "features", "cluster", "polygonize", "preview", "total"))
            print(f"| {megapixels} MP | {record['tiles']} | {engine} | {expected.total:.1f} | {measured:.1f} | "
                  f"{ratio:.2f} | {'yes' if TARGET[0] <= ratio <= TARGET[1] else 'no'} | {calibrated} | {timings} |")
            speed = memory.speed_factor([ratio])


if __name__ == "__main__":
    main()
