"""Drives the engine worker process from QGIS (a QgsTask, a Processing algorithm).

Standard library only: torch never loads inside QGIS. The worker runs in the
engine's own Python environment (see `find_engine_python`); a job goes in as one
JSON line, progress and the result come back as JSON lines (treeseg_qgis/worker.py).
Cancel asks the worker to stop the job (a cancel message): it stops within about a
second and stays, model loaded, for the next job; only when it does not answer is it
terminated (SIGTERM, then killed). A crash or an out-of-memory kill becomes an
EngineError with the worker's last messages, and QGIS lives on.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess  # nosec B404
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..outputs import output_folders, recover_outputs, temporary_files
from .engine_env import private_engine_python

PLUGIN_DIR = Path(__file__).resolve().parents[1]
ENGINE_PYTHON_ENV = "TREESEG_ENGINE_PYTHON"
ENGINE_POINTER_FILE = PLUGIN_DIR / "engine_python.txt"
COOPERATIVE_CANCEL_SECONDS = 5.0
"""How long a cancelled job may take to stop before the worker is terminated."""
CANCEL_GRACE_SECONDS = 20.0
"""How long a terminated worker may take to exit before it is killed."""
STDERR_DRAIN_SECONDS = 2.0


class EngineError(Exception):
    """The engine could not do the job; `kind` is input, model, output, cancelled, internal or crash."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def qgis_profile_dir() -> str | None:
    """The QGIS profile folder when running inside QGIS (qgis.core loaded), else None; never imports qgis."""
    qgis_core = sys.modules.get("qgis.core")
    return qgis_core.QgsApplication.qgisSettingsDirPath() if qgis_core is not None else None


def find_engine_python(configured: str | None = None) -> str | None:
    """The engine's Python: the configured one, $TREESEG_ENGINE_PYTHON, the private environment the
    set-up dialog made in the QGIS profile (only a ready one), the one `make deploy` recorded, or the
    repository's .venv during development; None when there is none."""
    profile = qgis_profile_dir()
    candidates = [
        configured,
        os.environ.get(ENGINE_PYTHON_ENV),
        private_engine_python(profile) if profile else None,
        ENGINE_POINTER_FILE.read_text().strip() if ENGINE_POINTER_FILE.is_file() else None,
        str(PLUGIN_DIR.parent / ".venv" / "bin" / "python"),
        str(PLUGIN_DIR.parent / ".venv" / "Scripts" / "python.exe"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def missing_engine_message() -> str:
    """What to do when find_engine_python finds nothing."""
    return (
        "The treeseg engine (a Python environment with torch and transformers) was not found. "
        "Set it up with Raster ▸ TreeSeg (DINOv3) ▸ Set up the engine…, or point the "
        f"{ENGINE_PYTHON_ENV} environment variable at the Python of an environment that has the "
        "packages of requirements.txt."
    )


ProgressHandler = Callable[[float, str], None]
LogHandler = Callable[[str, str], None]
CancelCheck = Callable[[], bool]


class EngineClient:
    """One worker process, started on demand and kept alive between jobs."""

    def __init__(self, python: str, extra_env: dict[str, str] | None = None) -> None:
        self.python = python
        self.extra_env = dict(extra_env or {})
        self._process: subprocess.Popen | None = None
        self._messages: queue.Queue = queue.Queue()
        self._stderr_tail: deque[str] = deque(maxlen=30)
        self._stderr_reader: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def segment(
        self,
        params: dict[str, Any],
        on_progress: ProgressHandler | None = None,
        on_log: LogHandler | None = None,
        is_cancelled: CancelCheck | None = None,
        hf_token: str | None = None,
    ) -> dict[str, Any]:
        """Run one segmentation job; returns its run record or raises EngineError."""
        job = {"command": "segment", "params": params}
        if hf_token:
            job["hf_token"] = hf_token
        return self._run_writing(job, lambda: _recover_outputs_of(params), on_progress, on_log, is_cancelled)

    def teach(
        self,
        params: dict[str, Any],
        examples: list[tuple[float, float, bool]],
        threshold: float | None,
        on_progress: ProgressHandler | None = None,
        is_cancelled: CancelCheck | None = None,
        hf_token: str | None = None,
        class_name: str = "tree",
    ) -> dict[str, Any]:
        """Click-to-teach: scores from example pixels (col, row, is_tree: an example of `class_name`); the
        threshold is chosen from the examples when None. The teach record or EngineError."""
        job = {"command": "teach", "params": params, "examples": [list(example) for example in examples],
               "threshold": threshold, "class_name": class_name}
        if hf_token:
            job["hf_token"] = hf_token
        return self._run_writing(job, lambda: _recover_outputs_of(params), on_progress, None, is_cancelled)

    def fit(
        self,
        inputs: list[str],
        out_path: str,
        params: dict[str, Any],
        on_progress: ProgressHandler | None = None,
        is_cancelled: CancelCheck | None = None,
        hf_token: str | None = None,
    ) -> dict[str, Any]:
        """Fit one survey cluster model on `inputs` and write it to `out_path` (.treeseg, written atomically);
        `{"cluster_model", "model", "k", "automatic_k", "tree_clusters", "tree_rule", "inputs"}` or EngineError."""
        job = {"command": "fit", "inputs": list(inputs), "out_path": out_path, "params": params}
        if hf_token:
            job["hf_token"] = hf_token
        return self._run(job, on_progress, None, is_cancelled)

    def crowns(
        self,
        trees_path: str,
        clusters_path: str | None,
        gpkg_path: str,
        options: dict[str, float] | None = None,
        on_progress: ProgressHandler | None = None,
        is_cancelled: CancelCheck | None = None,
    ) -> dict[str, Any]:
        """Crown polygons of a tree mask (options: min_area_m2, min_distance_m, smoothing_m, max_crown_m);
        `{"crowns": count, "outputs": {"crowns": gpkg_path}}` or EngineError."""
        job = {"command": "crowns", "trees_path": trees_path, "clusters_path": clusters_path or trees_path,
               "gpkg_path": gpkg_path, "options": dict(options or {})}

        def remove_partial_gpkg() -> None:
            for leftover in temporary_files(Path(gpkg_path)):
                leftover.unlink(missing_ok=True)

        return self._run_writing(job, remove_partial_gpkg, on_progress, None, is_cancelled)

    def _run_writing(self, job: dict, clean_up: Callable[[], None], on_progress: ProgressHandler | None,
                     on_log: LogHandler | None, is_cancelled: CancelCheck | None) -> dict[str, Any]:
        """Run a job that writes files; when it was cancelled or the worker died, `clean_up` its leftovers."""
        try:
            return self._run(job, on_progress, on_log, is_cancelled)
        except EngineError as error:
            if error.kind in ("cancelled", "crash"):
                clean_up()
            raise

    def probe(self) -> dict[str, Any]:
        """Versions and the device the engine would use."""
        return self._run({"command": "probe"}, None, None, None)

    def models(self) -> dict[str, Any]:
        """Which catalogue models are in the local Hugging Face cache: `{"cache_dir", "disk_free_bytes",
        "models": [{"name", "repo_id", "cached", "size_on_disk"}, ...], "feature_cache": {"path", "size_bytes",
        "max_bytes"}}`; reads the disk only."""
        return self._run({"command": "models"}, None, None, None)

    def download_model(
        self,
        name: str,
        on_progress: ProgressHandler | None = None,
        is_cancelled: CancelCheck | None = None,
        hf_token: str | None = None,
    ) -> dict[str, Any]:
        """Download a catalogue model into the Hugging Face cache; `{"name", "repo_id", "path"}` or EngineError
        (kind model: gated, unknown or offline; cancelled: stopped, the fetched part is kept for a resume)."""
        job = {"command": "download", "model": name}
        if hf_token:
            job["hf_token"] = hf_token
        return self._run(job, on_progress, None, is_cancelled)

    def delete_model(self, name: str) -> dict[str, Any]:
        """Remove a catalogue model from the Hugging Face cache; `{"name", "freed_bytes"}`."""
        return self._run({"command": "delete", "model": name}, None, None, None)

    def clear_feature_cache(self) -> dict[str, Any]:
        """Empty the feature cache of runs; `{"name", "freed_bytes"}`."""
        return self._run({"command": "clear_feature_cache"}, None, None, None)

    def close(self) -> None:
        """Stop the worker (it finishes nothing half-way: it is idle or gets cancelled)."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            try:
                process.stdin.close()
            except OSError:
                pass
            _stop(process, grace=5.0)

    def _run(self, job: dict, on_progress: ProgressHandler | None, on_log: LogHandler | None,
             is_cancelled: CancelCheck | None) -> dict[str, Any]:
        if not self._lock.acquire(blocking=False):
            raise EngineError("busy", "The engine is already running a job; wait for it or cancel it.")
        try:
            process = self._ensure_started()
            try:
                process.stdin.write(json.dumps(job) + "\n")
                process.stdin.flush()
            except OSError:
                raise self._crash_error() from None
            return self._wait_for_result(process, on_progress, on_log, is_cancelled)
        finally:
            self._lock.release()

    def _wait_for_result(self, process: subprocess.Popen, on_progress: ProgressHandler | None,
                         on_log: LogHandler | None, is_cancelled: CancelCheck | None) -> dict[str, Any]:
        cancel_sent_at: float | None = None
        terminated = False
        while True:
            if is_cancelled is not None and cancel_sent_at is None and is_cancelled():
                cancel_sent_at = time.monotonic()
                _send_cancel(process)
            if cancel_sent_at is not None:
                waited = time.monotonic() - cancel_sent_at
                if not terminated and waited > COOPERATIVE_CANCEL_SECONDS:
                    terminated = True
                    _signal_stop(process)
                if waited > COOPERATIVE_CANCEL_SECONDS + CANCEL_GRACE_SECONDS:
                    process.kill()
            try:
                message = self._messages.get(timeout=0.1)
            except queue.Empty:
                continue
            if message is None:
                if cancel_sent_at is not None:
                    self._process = None
                    raise EngineError("cancelled", "Cancelled by the user.")
                raise self._crash_error()
            kind = message.get("type")
            if kind == "progress" and on_progress is not None:
                on_progress(float(message["percent"]), str(message["stage"]))
            elif kind == "log" and on_log is not None:
                on_log(str(message.get("level", "info")), str(message.get("message", "")))
            elif kind == "result":
                return message["record"]
            elif kind == "error":
                if message.get("kind") == "cancelled" and terminated:
                    _stop(process, grace=CANCEL_GRACE_SECONDS)
                    self._process = None
                raise EngineError(str(message.get("kind", "internal")), str(message.get("message", "")))

    def _ensure_started(self) -> subprocess.Popen:
        if self.running:
            return self._process
        self._messages = queue.Queue()
        self._stderr_tail.clear()
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.extra_env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGIN_DIR.parent), env.get("PYTHONPATH")]))
        env.pop("PYTHONHOME", None)
        # A fixed argv (the engine's Python and our own worker module), never a shell.
        process = subprocess.Popen(  # nosec B603
            [self.python, "-m", f"{PLUGIN_DIR.name}.engine.worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, encoding="utf-8", env=env, cwd=str(PLUGIN_DIR.parent),
            start_new_session=(os.name != "nt"),
        )
        threading.Thread(target=self._read_stdout, args=(process, self._messages), daemon=True).start()
        self._stderr_reader = threading.Thread(target=self._read_stderr, args=(process,), daemon=True)
        self._stderr_reader.start()
        self._process = process
        return process

    def _read_stdout(self, process: subprocess.Popen, messages: queue.Queue) -> None:
        """Hands the worker's messages to its own queue, then None when it has exited. The queue is this
        worker's: a worker stopped by a cancel must not end the next worker's job with its None."""
        with process.stdout:
            for line in process.stdout:
                try:
                    message = json.loads(line)
                except ValueError:
                    self._stderr_tail.append(line.rstrip())
                    continue
                if message.get("type") != "ready":
                    messages.put(message)
        process.wait()
        messages.put(None)

    def _read_stderr(self, process: subprocess.Popen) -> None:
        with process.stderr:
            for line in process.stderr:
                self._stderr_tail.append(line.rstrip())

    def _crash_error(self) -> EngineError:
        process = self._process
        self._process = None
        code = process.wait() if process is not None else None
        reason = _describe_exit(code)
        if self._stderr_reader is not None:
            self._stderr_reader.join(STDERR_DRAIN_SECONDS)  # its last lines say why the worker stopped
        tail = "\n".join(list(self._stderr_tail)[-8:])
        if "ModuleNotFoundError" in tail or "ImportError" in tail:
            advice = ("The engine's environment lacks a package: repair it with Raster ▸ TreeSeg (DINOv3) ▸ "
                      "Set up the engine…")
        elif "out of memory" in reason:
            advice = "Run again with a smaller model or tile size."
        else:
            advice = "QGIS is not affected; run again."
        return EngineError(
            "crash",
            f"The treeseg engine stopped unexpectedly ({reason}). {advice}"
            + (f"\nLast engine messages:\n{tail}" if tail else ""),
        )


def _recover_outputs_of(params: dict[str, Any]) -> None:
    """Remove what a cancelled or killed job left in its output folders (its staging folder)."""
    for folder in output_folders(params):
        recover_outputs(folder)


def _send_cancel(process: subprocess.Popen) -> None:
    """Ask the worker to stop its job; a worker that has already exited is noticed by the reader."""
    try:
        process.stdin.write(json.dumps({"command": "cancel"}) + "\n")
        process.stdin.flush()
    except (OSError, ValueError):  # a broken pipe, or stdin closed by close()
        pass


def _signal_stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    if os.name == "nt":
        process.terminate()
    else:
        process.send_signal(signal.SIGTERM)


def _stop(process: subprocess.Popen, grace: float) -> None:
    _signal_stop(process)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = ", probably out of memory" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exit code {code}"

