"""`make bench` part: the product side by side with the upstream research code at equal feature-grid density.

Upstream is luccahuguet/tree-seg-unsuper at a pinned commit in its own virtual environment
(scripts/setup_upstream.sh puts both under output/bench/upstream). Both sides get the DINOv3 ViT-S/16 or
ViT-B/16 architecture with random weights: ours a `save_pretrained` folder (scripts/bench_precision.py),
upstream its own random-weights strategy, which it falls back to when the hub cannot be reached
(HF_HUB_OFFLINE=1); its algorithm is untouched. The inputs are the real NEON sample OSBS_029 mirrored out
to 1024 x 1024 px (upstream's own full-image size: below its 2048 px tiling threshold it resizes to 1024²)
and to 2299 x 2472 px (5.7 MP, the image of issue #16/#31; upstream cuts it into 2048 px tiles and
resizes each to 1024², then clusters its features upsampled 2×, the same cells as ours at stride 16).
Ours runs `python -m treeseg_qgis segment` at stride 16, precision auto, automatic K, no feature cache, its
int8 export made beforehand by a warm-up run; upstream runs `tree-seg segment` (its CLI) with its defaults
and its result cache off. Every run is its own process, with OMP_NUM_THREADS and torch's threads at the
same count; runs alternate ours/upstream; wall time and peak RSS (ru_maxrss of the child) per run,
medians, the 1-minute load at each run and both feature grids.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
UPSTREAM = Path(os.environ.get("UPSTREAM_DIR", REPO / "output" / "bench" / "upstream"))
WORK = REPO / "output" / "bench" / "side_by_side"
SIZES = {"crop": (1024, 1024), "5.7mp": (2299, 2472)}
UPSTREAM_MODELS = {"small": "small", "base": "base"}
CHILD = ("import runpy, sys, torch\n"
         "torch.set_num_threads(int(sys.argv.pop(1)))\n"
         "module = sys.argv.pop(1); sys.argv[0] = module\n"
         "exec(sys.argv.pop(1))\n"
         "try:\n    runpy.run_module(module, run_name='__main__')\n"
         "finally:\n    print('THREADS', torch.get_num_threads(), file=sys.stderr)\n")
# The harness's only shim for upstream, run in its process before its CLI; its algorithm is untouched.
# 1. The CPU torch wheel has no CUDA torchvision build beside it, and PyPI's torchvision registers fake
#    kernels for its C++ ops (nms, roi_align), which cannot load without CUDA torch; upstream uses only
#    torchvision.transforms, so that registration module is left out.
# 2. At this commit upstream passes the version "n/a" into the elbow plot's file name, which makes the
#    "/" a folder that does not exist and fails every automatic-K run; the plot is written as "n-a".
UPSTREAM_SHIM = """
import sys, types
sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
import tree_seg.core.segmentation as segmentation
plot_elbow = segmentation.plot_elbow_analysis
segmentation.plot_elbow_analysis = lambda *args, **kw: plot_elbow(*("n-a" if a == "n/a" else a for a in args), **kw)
"""


def make_inputs(name: str) -> tuple[Path, Path]:
    """OSBS_029 mirrored out to the named size: a GeoTIFF for ours, the same pixels as PNG for upstream."""
    from bench_density import write_mirrored_sample
    from PIL import Image

    width, height = SIZES[name]
    tif, png = WORK / f"osbs_{name}.tif", WORK / f"osbs_{name}.png"
    if tif.exists() and png.exists():
        return tif, png
    mosaic = write_mirrored_sample(tif, width, height)
    Image.fromarray(np.ascontiguousarray(mosaic.transpose(1, 2, 0))).save(png)
    return tif, png


def child(python: Path, module: str, args: list[str], cwd: Path, env: dict, threads: int, shim: str = "") -> dict:
    """One run in its own process: wall seconds, the child's peak RSS, its output and the load before it."""
    load = os.getloadavg()[0]
    log = WORK / "child.log"
    with open(log, "w") as stdout, open(log.with_suffix(".err"), "w") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen([str(python), "-c", CHILD, str(threads), module, shim, *args], cwd=cwd,
                                   stdout=stdout, stderr=stderr, text=True,
                                   env={**os.environ, **env, "OMP_NUM_THREADS": str(threads),
                                        "HF_HUB_OFFLINE": "1"})
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    done = subprocess.CompletedProcess(process.args, process.returncode, log.read_text(),
                                       log.with_suffix(".err").read_text())
    if done.returncode != 0:
        raise SystemExit(f"{module} failed ({done.returncode}):\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}")
    peak = usage.ru_maxrss
    threads_seen = re.search(r"^THREADS (\d+)$", done.stderr, re.M)
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_mb": peak / 1024,
            "load": load, "stdout": done.stdout + done.stderr,
            "threads": int(threads_seen.group(1)) if threads_seen else None}


def run_ours(model_dir: Path, tif: Path, tag: str, threads: int) -> dict:
    out = WORK / f"ours-{tag}"
    result = child(REPO / ".venv" / "bin" / "python", "treeseg_qgis",
                   ["segment", str(tif), "--out", str(out), "--model", str(model_dir), "--device", "cpu",
                    "--stride", "16", "--precision", "auto", "--no-cache"],
                   REPO, {"XDG_CACHE_HOME": str(WORK / "xdg-cache")}, threads)
    record = json.loads(next(out.glob("*_run.json")).read_text())
    result.update(grid=ours_grid(record), precision=record["model"].get("precision"),
                  timings=record.get("timings", {}))
    return result


def ours_grid(record: dict) -> str:
    """The feature cells covering the raster (rows × columns): one per stride step, the last one partial."""
    rows, cols = (math.ceil(record["input"][side] / record["stride"]) for side in ("height", "width"))
    return f"{rows}×{cols}"


def run_upstream(model: str, png: Path, tag: str, threads: int) -> dict:
    out = WORK / f"upstream-{tag}"
    result = child(UPSTREAM / "venv" / "bin" / "python", "tree_seg.cli.main",
                   ["segment", str(png), UPSTREAM_MODELS[model], "--output-dir", str(out), "--no-cache",
                    "--no-save-metadata"],
                   UPSTREAM / "src", {"PYTHONPATH": str(UPSTREAM / "src"), "MPLBACKEND": "Agg"}, threads, UPSTREAM_SHIM)
    grids = re.findall(r"Upsampling features (\d+)x(\d+) -> (\d+)x(\d+)", result["stdout"])
    if "loading with random weights" not in result["stdout"].lower():
        raise SystemExit("upstream did not say it ran with random weights")
    result.update(grid="{}×{} (k-means on {}×{})".format(*grids[-1]) if grids else "?",
                  precision="float32, random weights")
    return result


def upstream_ready() -> bool:
    return (UPSTREAM / "venv" / "bin" / "python").exists() and (UPSTREAM / "src" / "dinov3" / "dinov3").is_dir()


def main() -> None:
    from bench import cpu_model
    from bench_precision import model_folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="small,base")
    parser.add_argument("--sizes", default="crop,5.7mp")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-warmup", action="store_true",
                        help="leave out ours' warm-up run (only when this model's int8 export is already cached)")
    parser.add_argument("--report", action="store_true", help="only print the table of the saved results")
    args = parser.parse_args()
    if args.report:
        print_table([json.loads(path.read_text()) for path in sorted(WORK.glob("results-*.json"))])
        return
    if not upstream_ready():
        print(f"bench_upstream: skipped, no upstream checkout and venv under {UPSTREAM} "
              "(make bench-upstream-setup, or scripts/setup_upstream.sh)")
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    upstream_commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=UPSTREAM / "src",
                                     capture_output=True, text=True).stdout.strip()
    print(f"ours {commit}, upstream {upstream_commit}, {cpu_model()}, {args.threads} threads", flush=True)
    rows = []
    for model in args.models.split(","):
        folder = model_folder(model)
        if not args.no_warmup:
            warm = run_ours(folder, make_inputs("crop")[0], f"{model}-warmup", args.threads)
            print(f"{model}: warm-up of ours {warm['seconds']:.1f} s (its int8 export is cached from here on)",
                  flush=True)
        for size in args.sizes.split(","):
            tif, png = make_inputs(size)
            runs = {"ours": [], "upstream": []}
            for repeat in range(args.repeats):
                for side in ("ours", "upstream") if repeat % 2 == 0 else ("upstream", "ours"):
                    tag = f"{model}-{size}-{repeat}"
                    result = (run_ours(folder, tif, tag, args.threads) if side == "ours"
                              else run_upstream(model, png, tag, args.threads))
                    result.pop("stdout")
                    runs[side].append(result)
                    print(f"  {side:8} {result['seconds']:6.1f} s  cpu {result['cpu_seconds']:6.1f} s  "
                          f"{result['peak_rss_mb']:6.0f} MB  "
                          f"grid {result['grid']}  load {result['load']:.1f}  threads {result['threads']}  "
                          f"{result['precision']}", flush=True)
            rows.append({"model": model, "size": size, "pixels": SIZES[size], "runs": runs})
            (WORK / f"results-{model}-{size}.json").write_text(json.dumps(
                {"ours": commit, "upstream": upstream_commit, "threads": args.threads, **rows[-1]}, indent=1))
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    """Medians per model and image: wall time and peak RSS of each side, ours / upstream, both grids."""
    print("\n| model | image | grid ours / upstream | runs | ours s | upstream s | time ours/upstream | ours MB | "
          "upstream MB | memory ours/upstream | CPU s ours/upstream | ours: load model s, features s | load |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|")
    for row in rows:
        ours, theirs = row["runs"]["ours"], row["runs"]["upstream"]
        time_ours = statistics.median(r["seconds"] for r in ours)
        time_theirs = statistics.median(r["seconds"] for r in theirs)
        mem_ours = statistics.median(r["peak_rss_mb"] for r in ours)
        mem_theirs = statistics.median(r["peak_rss_mb"] for r in theirs)
        load_model = statistics.median(r["timings"].get("load_model", 0) for r in ours)
        features = statistics.median(r["timings"].get("features", 0) for r in ours)
        loads = [r["load"] for r in ours + theirs]
        cpu = "–"
        if all("cpu_seconds" in r for r in ours + theirs):
            cpu_ours = statistics.median(r["cpu_seconds"] for r in ours)
            cpu_theirs = statistics.median(r["cpu_seconds"] for r in theirs)
            cpu = f"{cpu_ours:.0f} / {cpu_theirs:.0f} = {cpu_ours / cpu_theirs:.2f}×"
        width, height = row["pixels"]
        print(f"| {row['model']} | {width}×{height} | {ours[0]['grid']} / {theirs[0]['grid']} | "
              f"{len(ours)}+{len(theirs)} | "
              f"{time_ours:.1f} | {time_theirs:.1f} | **{time_ours / time_theirs:.2f}×** | {mem_ours:.0f} | "
              f"{mem_theirs:.0f} | {mem_ours / mem_theirs:.2f}× | {cpu} | {load_model:.1f}, {features:.1f} | "
              f"{min(loads):.1f}–{max(loads):.1f} |")

if __name__ == "__main__":
    main()
