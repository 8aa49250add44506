"""Time to a ready engine: the set-up plan of engine_env run end to end (venv, index probe, pins, install, check,
swap), with pip or with uv for the install step, from a cold (empty) or warm package cache.

    /usr/bin/python3 scripts/bench_engine_setup.py --tool pip --cache cold --cache-dir /tmp/b/pip --root /tmp/b/1
    /usr/bin/python3 scripts/bench_engine_setup.py --tool uv --uv /path/to/uv --cache warm --cache-dir /tmp/b/uv ...

--cache cold empties --cache-dir first; warm keeps what an earlier run left there. The torch index is the
dialog's default (PyTorch's CPU index) unless --torch-index says otherwise ('' for none); when the probe finds
it unreachable, the run goes on without it, as a user would choose in the dialog (then torch comes from where
the user's pip settings say: here a local file for pip; uv reads PIP_FIND_LINKS through --find-links).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess  # nosec B404
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from treeseg_qgis.qgis_side import engine_env  # noqa: E402


def uv_install(step: engine_env.Step, uv: str) -> tuple[str, ...]:
    """The pip step's command as `uv pip install`, with the same requirements, constraints and find-links."""
    python, arguments = step.command[0], list(step.command[4 + len(engine_env.PIP_NETWORK_OPTIONS):])
    find_links = [f"--find-links={link}" for link in os.environ.get("PIP_FIND_LINKS", "").split() if link]
    return (uv, "pip", "install", "--python", python, *find_links, *arguments)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", choices=("pip", "uv"), default="pip")
    parser.add_argument("--uv", default="uv", help="the uv program")
    parser.add_argument("--cache-dir", required=True, type=Path)
    parser.add_argument("--cache", choices=("cold", "warm"), default="warm")
    parser.add_argument("--root", required=True, type=Path, help="a new, empty engines folder")
    parser.add_argument("--torch-index", default=None, help="default: PyTorch's index of the build; '' for none")
    args = parser.parse_args()
    if args.cache == "cold":
        shutil.rmtree(args.cache_dir, ignore_errors=True)
    base_python = engine_env.find_base_python()
    plan = engine_env.install_plan(args.root, base_python, engine_env.CPU, args.torch_index)
    steps, index, notes = list(plan.steps), 0, []
    timings = {}
    started = time.monotonic()
    while index < len(steps):
        step = steps[index]
        command = uv_install(step, args.uv) if step.kind == engine_env.PIP and args.tool == "uv" else step.command
        env = engine_env.step_environment(step, os.environ)
        env.update(PIP_CACHE_DIR=str(args.cache_dir), UV_CACHE_DIR=str(args.cache_dir))
        step_started = time.monotonic()
        result = subprocess.run(command, capture_output=True, text=True, env=env)  # nosec B603
        timings[step.title.split(" (")[0]] = round(time.monotonic() - step_started, 1)
        if step.kind == engine_env.PROBE and result.returncode == engine_env.PROBE_EXTRA_UNREACHABLE:
            checks = engine_env.read_probe(result.stdout)
            notes.append("did not answer, went on without: " + ", ".join(c.url for c in checks if c.problem))
            torch_index, extra_indexes = engine_env.without_dead_extras(checks, step.command[-1])
            steps = engine_env.install_plan(args.root, base_python, engine_env.CPU, torch_index, None,
                                            extra_indexes).steps
        elif result.returncode != 0:
            sys.exit(f"{step.title} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        index += 1
    size = sum(path.stat().st_size for path in plan.target.rglob("*") if path.is_file() and not path.is_symlink())
    cached = sum(path.stat().st_size for path in args.cache_dir.rglob("*") if path.is_file())
    print(json.dumps({"tool": args.tool, "cache": args.cache, "notes": notes,
                      "seconds_to_ready": round(time.monotonic() - started, 1), "steps": timings,
                      "engine_mb": round(size / 1024**2),
                      "cache_mb": round(cached / 1024**2)}))


if __name__ == "__main__":
    main()
