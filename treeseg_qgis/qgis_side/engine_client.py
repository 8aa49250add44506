"""Drives the engine worker process from QGIS (a QgsTask, a Processing algorithm).

Standard library only: torch never loads inside QGIS. The worker runs in the
engine's own Python environment (see `find_engine_python`) and speaks treeseg_qgis/protocol.py:
it announces its protocol version when it starts (another version is one clear error), then a
job goes in as one JSON line, progress and the result come back as JSON lines.
One QGIS session shares one EngineClient per engine Python (`shared_engine`): the panel and
Processing runs (batch, modeler) use the same worker, which keeps the last model loaded.
Jobs from several threads run one at a time in arrival order; a job cancelled while it waits
never starts. Cancel asks the worker to stop the running job (a cancel message): it stops
within about a second and stays, model loaded, for the next job; only when it does not answer
is it terminated (SIGTERM, then killed). A crash or an out-of-memory kill becomes an
EngineError with the worker's last messages, QGIS lives on, and the next job starts a new worker.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess  # nosec B404
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .. import protocol
from ..outputs import output_folders, recover_outputs, temporary_files
from ..params import CrownOptions, ParameterError, SegmentationParams
from ..protocol import Command, ErrorKind, Message
from ..run_record import CrownsRecord, FitRecord, RecordError, RunRecord, TaughtRecord, taught_record
from .engine_env import private_engine_python

PLUGIN_DIR = Path(__file__).resolve().parents[1]
ENGINE_PYTHON_ENV = "TREESEG_ENGINE_PYTHON"
ENGINE_PYTHON_SETTING = "treeseg/engine_python"
"""The QGIS setting of the engine Python the user chose: read and written only here (`chosen_engine_python`,
`choose_engine_python`)."""
ENGINE_POINTER_FILE = PLUGIN_DIR / "engine_python.txt"
COOPERATIVE_CANCEL_SECONDS = 5.0
"""How long a cancelled job may take to stop before the worker is terminated."""
CANCEL_GRACE_SECONDS = 20.0
"""How long a terminated worker may take to exit before it is killed."""
STDERR_DRAIN_SECONDS = 2.0
HELLO_SECONDS = 120.0
"""How long a starting worker may take to announce itself."""
WAIT_STEP_SECONDS = 0.1
RecordT = TypeVar("RecordT")
WAITING_STAGE = "Waiting for the engine: another run is using it"


class EngineError(Exception):
    """The engine could not do the job; `kind` is a protocol.ErrorKind (input, model, output, cancelled,
    internal, crash, busy, protocol)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def qgis_profile_dir() -> str | None:
    """The QGIS profile folder when running inside QGIS (qgis.core loaded), else None; never imports qgis."""
    qgis_core = sys.modules.get("qgis.core")
    return qgis_core.QgsApplication.qgisSettingsDirPath() if qgis_core is not None else None


def chosen_engine_python() -> str:
    """The engine Python chosen in the QGIS settings ('' for none, and outside QGIS); never imports qgis."""
    qgis_core = sys.modules.get("qgis.core")
    return qgis_core.QgsSettings().value(ENGINE_PYTHON_SETTING, "", type=str) if qgis_core is not None else ""


def choose_engine_python(python: str | None) -> None:
    """Keep `python` as the chosen engine in the QGIS settings; None forgets the choice. Inside QGIS only."""
    settings = sys.modules["qgis.core"].QgsSettings()
    if python is None:
        settings.remove(ENGINE_PYTHON_SETTING)
    else:
        settings.setValue(ENGINE_PYTHON_SETTING, python)


def configured_engine_python() -> str | None:
    """The engine's Python: the one chosen in the QGIS settings, else as `find_engine_python` looks."""
    return find_engine_python(chosen_engine_python() or None)


def configured_engine_origin() -> tuple[str, str] | None:
    """`configured_engine_python` and where it comes from, in words; None when there is none."""
    return find_engine_python_and_origin(chosen_engine_python() or None)


def find_engine_python(configured: str | None = None) -> str | None:
    """The engine's Python: the configured one, $TREESEG_ENGINE_PYTHON, the private environment the
    set-up dialog made in the QGIS profile (only a ready one), the one `make deploy` recorded, or the
    repository's .venv during development; None when there is none."""
    found = find_engine_python_and_origin(configured)
    return found[0] if found else None


def find_engine_python_and_origin(configured: str | None = None) -> tuple[str, str] | None:
    """`find_engine_python`'s choice and where it comes from, in words (what the set-up dialog shows)."""
    profile = qgis_profile_dir()
    candidates = [
        (configured, "chosen in Set up the engine…"),
        (os.environ.get(ENGINE_PYTHON_ENV), f"from the {ENGINE_PYTHON_ENV} environment variable"),
        (private_engine_python(profile) if profile else None, "made by Set up the engine…"),
        (ENGINE_POINTER_FILE.read_text().strip() if ENGINE_POINTER_FILE.is_file() else None,
         f"recorded by make deploy in {ENGINE_POINTER_FILE.name}"),
        (str(PLUGIN_DIR.parent / ".venv" / "bin" / "python"), "the development checkout's .venv"),
        (str(PLUGIN_DIR.parent / ".venv" / "Scripts" / "python.exe"), "the development checkout's .venv"),
    ]
    for candidate, origin in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate, origin
    return None


def missing_engine_message() -> str:
    """What to do when find_engine_python finds nothing."""
    return (
        "The treeseg engine (a Python environment with torch and transformers) was not found. "
        "Set it up with Raster ▸ TreeSeg (DINOv3) ▸ Set up the engine…, or point the "
        f"{ENGINE_PYTHON_ENV} environment variable at the Python of an environment that has the "
        "packages of requirements.txt."
    )


@dataclass(frozen=True)
class JobWatch:
    """How a caller follows one job: `on_progress(percent, stage)`, `on_log(level, message)` for the engine's log
    lines, and `is_cancelled()`, polled while the job waits, starts and runs; each may be left out."""

    on_progress: Callable[[float, str], None] | None = None
    on_log: Callable[[str, str], None] | None = None
    is_cancelled: Callable[[], bool] | None = None

    def progress(self, percent: float, stage: str) -> None:
        if self.on_progress is not None:
            self.on_progress(percent, stage)

    def log(self, level: str, message: str) -> None:
        if self.on_log is not None:
            self.on_log(level, message)

    def cancelled(self) -> bool:
        return self.is_cancelled is not None and self.is_cancelled()


UNWATCHED = JobWatch()


class EngineClient:
    """One worker process, started on demand and kept alive between jobs; jobs from any thread take turns."""

    def __init__(self, python: str, extra_env: dict[str, str] | None = None) -> None:
        self.python = python
        self.extra_env = dict(extra_env or {})
        self._process: subprocess.Popen | None = None
        self._messages: queue.Queue = queue.Queue()
        self._stderr_tail: deque[str] = deque(maxlen=30)
        self._stderr_reader: threading.Thread | None = None
        self._turns = threading.Condition()
        self._waiting: deque[object] = deque()
        self._running_thread: int | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The running worker's process id, or None."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    @property
    def jobs_waiting(self) -> int:
        """How many jobs wait for their turn behind the running one."""
        with self._turns:
            return max(0, len(self._waiting) - 1)

    def segment(self, params: SegmentationParams, watch: JobWatch = UNWATCHED, hf_token: str | None = None,
                ) -> RunRecord:
        """Run one segmentation job; returns its run record or raises EngineError (an invalid value: "input",
        before anything is sent; a record that is not one: "protocol")."""
        job = _job(Command.SEGMENT, hf_token, {protocol.PARAMS: _validated_json(params)})
        return _typed(RunRecord.from_dict, self._run(job, watch, lambda: _recover_outputs_of(params)))

    def teach(
        self,
        params: SegmentationParams,
        examples: list[tuple[float, float, bool | str]],
        threshold: float | None,
        watch: JobWatch = UNWATCHED,
        hf_token: str | None = None,
        class_name: str = "tree",
        classifier: str | None = None,
    ) -> TaughtRecord:
        """Click-to-teach: scores from example pixels (col, row, is_tree: an example of `class_name`); the
        threshold is chosen from the examples when None. With `classifier` (a taught classifier file, the
        params' cluster model set) it is applied instead of examples. The teach record or EngineError."""
        job = _job(Command.TEACH, hf_token, {protocol.PARAMS: _validated_json(params),
                                              protocol.EXAMPLES: [list(example) for example in examples],
                                              protocol.THRESHOLD: threshold, protocol.CLASS_NAME: class_name,
                                              protocol.CLASSIFIER: classifier})
        return _typed(taught_record, self._run(job, watch, lambda: _recover_outputs_of(params)))

    def fit(self, inputs: list[str], out_path: str, params: SegmentationParams, watch: JobWatch = UNWATCHED,
            hf_token: str | None = None) -> FitRecord:
        """Fit one survey cluster model on `inputs` and write it to `out_path` (.treeseg, written atomically);
        its FitRecord or EngineError."""
        job = _job(Command.FIT, hf_token, {protocol.INPUTS: list(inputs), protocol.OUT_PATH: out_path,
                                            protocol.PARAMS: _validated_json(params)})
        return _typed(FitRecord.from_dict, self._run(job, watch))

    def crowns(
        self,
        trees_path: str,
        clusters_path: str | None,
        gpkg_path: str,
        options: CrownOptions | None = None,
        watch: JobWatch = UNWATCHED,
    ) -> CrownsRecord:
        """Crown polygons of a tree mask (validated `options`, the defaults when None); the count and the file
        (CrownsRecord) or EngineError."""
        job = {protocol.COMMAND: Command.CROWNS, protocol.TREES_PATH: trees_path,
               protocol.CLUSTERS_PATH: clusters_path or trees_path, protocol.GPKG_PATH: gpkg_path,
               protocol.OPTIONS: _validated_json(options or CrownOptions())}

        def remove_partial_gpkg() -> None:
            for leftover in temporary_files(Path(gpkg_path)):
                leftover.unlink(missing_ok=True)

        return _typed(CrownsRecord.from_dict, self._run(job, watch, remove_partial_gpkg))

    def probe(self) -> dict[str, Any]:
        """Versions and the device the engine would use."""
        return self._run({protocol.COMMAND: Command.PROBE})

    def models(self) -> dict[str, Any]:
        """Which catalogue models are in the local Hugging Face cache: `{"cache_dir", "disk_free_bytes",
        "models": [{"name", "repo_id", "cached", "size_on_disk"}, ...], "feature_cache": {"path", "size_bytes",
        "max_bytes"}}`; reads the disk only."""
        return self._run({protocol.COMMAND: Command.MODELS})

    def download_model(self, name: str, watch: JobWatch = UNWATCHED, hf_token: str | None = None) -> dict[str, Any]:
        """Download a catalogue model into the Hugging Face cache; `{"name", "repo_id", "path"}` or EngineError
        (kind model: gated, unknown or offline; cancelled: stopped, the fetched part is kept for a resume)."""
        return self._run(_job(Command.DOWNLOAD, hf_token, {protocol.MODEL: name}), watch)

    def delete_model(self, name: str) -> dict[str, Any]:
        """Remove a catalogue model from the Hugging Face cache; `{"name", "freed_bytes"}`."""
        return self._run({protocol.COMMAND: Command.DELETE, protocol.MODEL: name})

    def clear_feature_cache(self) -> dict[str, Any]:
        """Empty the feature cache of runs; `{"name", "freed_bytes"}`."""
        return self._run({protocol.COMMAND: Command.CLEAR_FEATURE_CACHE})

    def close(self) -> None:
        """Stop the worker (a running job ends as a crash); the next job starts a new one."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            try:
                process.stdin.close()
            except OSError:
                pass
            _stop(process, grace=5.0)

    def _run(self, job: dict, watch: JobWatch = UNWATCHED, clean_up: Callable[[], None] | None = None,
             ) -> dict[str, Any]:
        """Wait for this job's turn, then run it on the worker (started, or restarted after a crash). A job that
        writes files has a `clean_up` for its leftovers, called when it was cancelled or the worker died (a job
        cancelled while waiting its turn left none)."""
        turn = self._wait_for_turn(watch)
        try:
            process = self._ensure_started(watch)
            try:
                process.stdin.write(protocol.encode(job))
                process.stdin.flush()
            except OSError:
                raise self._crash_error() from None
            return self._wait_for_result(process, watch)
        except EngineError as error:
            if clean_up is not None and error.kind in (ErrorKind.CANCELLED, ErrorKind.CRASH):
                clean_up()
            raise
        finally:
            self._end_turn(turn)

    def _wait_for_turn(self, watch: JobWatch) -> object:
        """Queue behind the jobs that came first (saying so once); a job cancelled while it waits leaves the
        queue unstarted."""
        if self._running_thread == threading.get_ident():
            raise EngineError(ErrorKind.BUSY, "A job cannot start another on the same engine while it runs.")
        turn = object()
        with self._turns:
            self._waiting.append(turn)
            behind = self._waiting[0] is not turn
        if behind:
            watch.progress(0.0, WAITING_STAGE)
        with self._turns:
            while self._waiting[0] is not turn:
                if watch.cancelled():
                    self._waiting.remove(turn)
                    self._turns.notify_all()
                    raise EngineError(ErrorKind.CANCELLED, "Cancelled before it started (it was waiting for "
                                                           "another job on the engine).")
                self._turns.wait(WAIT_STEP_SECONDS)
            self._running_thread = threading.get_ident()
        return turn

    def _end_turn(self, turn: object) -> None:
        with self._turns:
            self._running_thread = None
            self._waiting.remove(turn)
            self._turns.notify_all()

    def _wait_for_result(self, process: subprocess.Popen, watch: JobWatch) -> dict[str, Any]:
        cancel_sent_at: float | None = None
        terminated = False
        while True:
            if cancel_sent_at is None and watch.cancelled():
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
                message = self._messages.get(timeout=WAIT_STEP_SECONDS)
            except queue.Empty:
                continue
            if message is None:
                if cancel_sent_at is not None:
                    self._process = None
                    raise EngineError(ErrorKind.CANCELLED, "Cancelled by the user.")
                raise self._crash_error()
            kind = message.get(protocol.TYPE)
            if kind == Message.PROGRESS:
                watch.progress(float(message[protocol.PERCENT]), str(message[protocol.STAGE]))
            elif kind == Message.LOG:
                watch.log(str(message.get(protocol.LEVEL, "info")), str(message.get(protocol.MESSAGE, "")))
            elif kind == Message.RESULT:
                return message[protocol.RECORD]
            elif kind == Message.ERROR:
                if message.get(protocol.KIND) == ErrorKind.CANCELLED and terminated:
                    _stop(process, grace=CANCEL_GRACE_SECONDS)
                    self._process = None
                raise EngineError(str(message.get(protocol.KIND, ErrorKind.INTERNAL)),
                                  str(message.get(protocol.MESSAGE, "")))

    def _ensure_started(self, watch: JobWatch) -> subprocess.Popen:
        """The running worker, or a new one that has announced the protocol version this plugin speaks."""
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
        self._check_hello(process, watch)
        return process

    def _check_hello(self, process: subprocess.Popen, watch: JobWatch) -> None:
        """Wait for the worker's hello; another protocol version stops it with one clear error."""
        deadline = time.monotonic() + HELLO_SECONDS
        while True:
            if watch.cancelled():
                self.close()
                raise EngineError(ErrorKind.CANCELLED, "Cancelled by the user.")
            try:
                first = self._messages.get(timeout=WAIT_STEP_SECONDS)
                break
            except queue.Empty:
                if time.monotonic() > deadline:
                    self.close()
                    raise EngineError(ErrorKind.CRASH, f"The treeseg engine did not start within "
                                                       f"{HELLO_SECONDS:.0f} s. QGIS is not affected; run again."
                                      ) from None
        if first is None:
            raise self._crash_error()
        version = protocol.announced_version(first)
        if version != protocol.PROTOCOL_VERSION:
            self.close()
            raise EngineError(ErrorKind.PROTOCOL, protocol.mismatch_message(version))

    def _read_stdout(self, process: subprocess.Popen, messages: queue.Queue) -> None:
        """Hands the worker's messages to its own queue, then None when it has exited. The queue is this
        worker's: a worker stopped by a cancel must not end the next worker's job with its None."""
        with process.stdout:
            for line in process.stdout:
                message = protocol.decode(line)
                if message is None:
                    self._stderr_tail.append(line.rstrip())
                else:
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
            ErrorKind.CRASH,
            f"The treeseg engine stopped unexpectedly ({reason}). {advice}"
            + (f"\nLast engine messages:\n{tail}" if tail else ""),
        )


_shared_engines: dict[str, EngineClient] = {}
_shared_engines_lock = threading.Lock()


def shared_engine(python: str) -> EngineClient:
    """The EngineClient this QGIS session shares for the engine `python` (the panel, Processing runs): one
    worker that keeps the last model loaded, running their jobs one at a time."""
    with _shared_engines_lock:
        if python not in _shared_engines:
            _shared_engines[python] = EngineClient(python)
        return _shared_engines[python]


def close_shared_engines() -> None:
    """Stop the shared workers (the plugin unloads); a later job starts a new one."""
    with _shared_engines_lock:
        engines = list(_shared_engines.values())
        _shared_engines.clear()
    for engine in engines:
        engine.close()


def _job(command: str, hf_token: str | None, fields: dict[str, Any]) -> dict[str, Any]:
    """A job message: the command, its fields and the Hugging Face token when there is one."""
    job = {protocol.COMMAND: command, **fields}
    if hf_token:
        job[protocol.HF_TOKEN] = hf_token
    return job


def _validated_json(params: SegmentationParams | CrownOptions) -> dict[str, Any]:
    """The job's parameters (or crown options) as JSON, validated here so a refused value never reaches the
    worker."""
    try:
        params.validate()
    except ParameterError as error:
        raise EngineError(ErrorKind.INPUT, str(error)) from None
    return params.to_json()


def _typed(read: Callable[[Any], RecordT], record: dict[str, Any]) -> RecordT:
    """The job's record as its type; one that is not (a damaged or another version's engine): EngineError."""
    try:
        return read(record)
    except RecordError as error:
        raise EngineError(ErrorKind.PROTOCOL, str(error)) from None


def _recover_outputs_of(params: SegmentationParams) -> None:
    """Remove what a cancelled or killed job left in its output folders (its staging folder)."""
    for folder in output_folders(params):
        recover_outputs(folder)


def _send_cancel(process: subprocess.Popen) -> None:
    """Ask the worker to stop its job; a worker that has already exited is noticed by the reader."""
    try:
        process.stdin.write(protocol.encode(protocol.cancel()))
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

