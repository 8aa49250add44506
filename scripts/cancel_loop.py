"""Stop runs at random moments and check that nothing is lost and nothing is left (issue 20's bar).

Each round re-runs a segmentation into a folder that holds a complete earlier run,
and stops it at a random moment in one of five ways: the command line with
SIGINT, SIGTERM or SIGHUP, and the engine worker (the panel's and Processing's
path) with a cancel or a SIGKILL. After each round the output folder must be
byte-identical to before (or, if the run finished first, hold the new complete
set), with no staging folder, no partial file and no unfinished cache entry.

    .venv/bin/python scripts/cancel_loop.py [--rounds 50] [--seed 20]
    .venv/bin/python scripts/cancel_loop.py --survey [--rounds 30] [--workers 2]

`--survey` re-runs `segment-many` on two rasters instead (command line only, SIGINT, SIGTERM or SIGHUP; with
`--workers 2` on a Dask LocalCluster): after each round the folder holds the earlier survey byte-identical, or
the new survey whole (its model, every raster's outputs, the summary and merged polygons, all of one K).

Prints one line per round and a summary; exit status 1 if any round failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["HF_HUB_OFFLINE"] = "1"

from tests.conftest import disc_scene, write_geotiff  # noqa: E402
from treeseg_qgis.params import SegmentationParams  # noqa: E402
from treeseg_qgis.qgis_side.engine_client import EngineClient, EngineError, JobWatch  # noqa: E402

WAYS = ("cli SIGINT", "cli SIGTERM", "cli SIGHUP", "worker cancel", "worker SIGKILL")
EXIT_STATUS = {"cli SIGINT": 130, "cli SIGTERM": 143, "cli SIGHUP": 129}


def snapshot(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def leftovers(out: Path, cache: Path, killed: bool) -> list[str]:
    """Stray files; after a SIGKILL an unfinished cache entry stays until the next run removes it."""
    found = [p.name for p in out.iterdir() if p.name.startswith(".treeseg-staging") or ".partial" in p.name
             or p.name.endswith(("-journal", "-wal", "-shm"))]
    return found + [p.name for p in cache.glob("*") if ".building" in p.name and not killed]


def consistent(out: Path) -> bool:
    """The folder holds one complete set: the run record's outputs all exist."""
    record = json.loads((out / "in_run.json").read_text())
    return all(Path(path).is_file() for path in record["outputs"].values())


def consistent_survey(out: Path) -> bool:
    """The folder holds one complete survey: every output the summary names exists, and the model, the summary
    and every raster's run record have one K and one PCA."""
    summary = json.loads((out / "survey_summary.json").read_text())
    with np.load(summary["cluster_model"]) as data:
        header = json.loads(bytes(data["header"]).decode())
    records = [json.loads(Path(row["outputs"]["record"]).read_text()) for row in summary["rasters"]]
    return (all(Path(path).is_file() for row in summary["rasters"] for path in row["outputs"].values())
            and Path(summary["outputs"]["polygons"]).is_file()
            and {header["k"], summary["legend"]["k"], *(record["clusters"]["k"] for record in records)} == {header["k"]}
            and {record["cluster_model"]["projection"] for record in records} == {header["projection_id"]})


def survey_rounds(args: argparse.Namespace, rng: random.Random, work: Path, model: Path) -> int:
    """`segment-many` stopped at random moments by SIGINT, SIGTERM or SIGHUP; the number of failed rounds."""
    rasters = [write_geotiff(work / f"{name}.tif", disc_scene(256, 320, centres, radius=50, seed=seed)[0])
               for name, centres, seed in (("north", [(80, 80), (170, 230)], 1), ("south", [(120, 150)], 2))]
    out, cache = work / "survey", work / "survey-cache"
    cli = [sys.executable, "-m", "treeseg_qgis", "segment-many", *map(str, rasters), "--out", str(out), "--model",
           str(model), "--device", "cpu", "--tile-size", "128", "--cache-dir", str(cache), "--quiet",
           "--workers", str(args.workers)]
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    started = time.monotonic()
    subprocess.run([*cli, "--clusters", "2"], env=environment, check=True, capture_output=True)
    seconds = time.monotonic() - started
    print(f"full survey: {seconds:.1f} s on {args.workers} worker(s); {work}")
    outcomes: dict[tuple[str, str], int] = {}
    failures = 0
    for index in range(args.rounds):
        way = WAYS[index % 3]
        clusters = rng.choice([2, 3, 4])
        before = snapshot(out)
        delay = rng.uniform(0.3, seconds)
        process = subprocess.Popen([*cli, "--clusters", str(clusters), *([] if rng.random() < 0.5 else ["--no-cache"])],
                                   env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        time.sleep(delay)
        os.killpg(process.pid, getattr(signal, way.split()[1]))  # a terminal signals the whole process group
        _, stderr = process.communicate(timeout=600)
        finished = process.returncode == 0
        left = leftovers(out, cache, False) + [p.name for p in out.glob(".*treeseg-windows")]
        lines = len(stderr.strip().splitlines())
        if finished:
            kept, outcome = consistent_survey(out), "finished"
            ok = kept
        else:
            kept, outcome = snapshot(out) == before, "stopped"
            ok = kept and process.returncode == EXIT_STATUS[way] and lines == 1
        ok = ok and not left
        outcomes[(way, outcome)] = outcomes.get((way, outcome), 0) + 1
        failures += not ok
        print(f"{index + 1:3d} segment-many {way:12s} after {delay:5.2f} s  {outcome:8s} exit "
              f"{process.returncode:<4d} outputs {'kept' if kept else 'CHANGED'}, {lines} stderr line(s) "
              f"{'ok' if ok else 'FAILED'}{'  left: ' + ', '.join(left) if left else ''}"
              f"{'' if ok or finished else '  last: ' + stderr.strip().splitlines()[-1][-200:]}", flush=True)
    print("summary:", ", ".join(f"{way} {outcome}: {count}" for (way, outcome), count in sorted(outcomes.items())))
    print(f"{args.rounds - failures}/{args.rounds} surveys kept the earlier survey byte-identical (or replaced it "
          "with a complete one of one K) and left nothing behind")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--survey", action="store_true", help="stop segment-many runs instead of segment runs")
    parser.add_argument("--workers", type=int, default=1, help="segment-many's --workers (with --survey)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="treeseg-cancel-loop-"))
    model = work / "model"
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    DINOv3ViTModel(DINOv3ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=128, patch_size=16, num_register_tokens=4)).save_pretrained(model)
    if args.survey:
        return 1 if survey_rounds(args, rng, work, model) else 0
    image, _ = disc_scene(384, 384, [(100, 100), (250, 260)], radius=60)
    raster = write_geotiff(work / "in.tif", image)
    out, cache = work / "out", work / "cache"
    base = SegmentationParams(input_path=str(raster), output_dir=str(out), model=str(model), device="cpu",
                              tile_size=128, overlap=32, crowns=True, feature_preview=True, cache_dir=str(cache))
    cli = [sys.executable, "-m", "treeseg_qgis", "segment", str(raster), "--out", str(out), "--model", str(model),
           "--device", "cpu", "--tile-size", "128", "--crowns", "--feature-preview", "--cache-dir", str(cache),
           "--quiet"]
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    client = EngineClient(sys.executable, {"HF_HUB_OFFLINE": "1"})
    started = time.monotonic()
    subprocess.run([*cli, "--clusters", "2"], env=environment, check=True, capture_output=True)
    cli_seconds = time.monotonic() - started
    client.segment(replace(base, clusters=3, use_cache=False))  # starts the worker, loads the model
    started = time.monotonic()
    client.segment(replace(base, clusters=3, use_cache=False))
    worker_seconds = time.monotonic() - started
    print(f"full run: command line {cli_seconds:.1f} s, worker {worker_seconds:.1f} s; {work}")
    outcomes: dict[tuple[str, str], int] = {}
    failures = 0
    for index in range(args.rounds):
        way = WAYS[index % len(WAYS)]
        clusters = rng.choice([2, 3, 4])
        use_cache = rng.random() < 0.5
        before = snapshot(out)
        if way.startswith("cli"):
            delay = rng.uniform(0.3, cli_seconds)
            process = subprocess.Popen([*cli, "--clusters", str(clusters), *([] if use_cache else ["--no-cache"])],
                                       env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(delay)
            process.send_signal(getattr(signal, way.split()[1]))
            _, stderr = process.communicate(timeout=600)
            finished = process.returncode == 0
            ok = finished or (process.returncode == EXIT_STATUS[way] and len(stderr.strip().splitlines()) == 1)
            detail = f"exit {process.returncode}"
        else:
            delay = rng.uniform(0.05, worker_seconds)
            stop = threading.Event()
            if way == "worker SIGKILL":
                threading.Timer(delay, lambda: client._process and client._process.kill()).start()
            else:
                threading.Timer(delay, stop.set).start()
            try:
                client.segment(replace(base, clusters=clusters, use_cache=use_cache),
                               JobWatch(is_cancelled=stop.is_set))
                finished, ok, detail = True, True, "finished"
            except EngineError as error:
                finished = False
                ok = error.kind == ("crash" if way == "worker SIGKILL" else "cancelled")
                detail = f"{error.kind}"
            time.sleep(0.2)
        after = snapshot(out)
        left = leftovers(out, cache, way == "worker SIGKILL")
        if finished:
            ok = ok and consistent(out)
            outcome = "finished"
        else:
            ok = ok and after == before
            outcome = "stopped"
        ok = ok and not left
        outcomes[(way, outcome)] = outcomes.get((way, outcome), 0) + 1
        failures += not ok
        print(f"{index + 1:3d} {way:15s} after {delay:5.2f} s  {outcome:8s} {detail:10s} "
              f"{'ok' if ok else 'FAILED'}{'  left: ' + ', '.join(left) if left else ''}", flush=True)
    client.close()
    print("summary:", ", ".join(f"{way} {outcome}: {count}" for (way, outcome), count in sorted(outcomes.items())))
    print(f"{args.rounds - failures}/{args.rounds} rounds kept the previous outputs byte-identical (or replaced "
          "them with a complete set) and left nothing behind")
    return 1 if failures else 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
