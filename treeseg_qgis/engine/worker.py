"""The engine worker process: `python -m treeseg_qgis.engine.worker`, run in the engine's environment.

It speaks the protocol of `treeseg_qgis/protocol.py` (one JSON object per line, both ways): it announces
itself with `hello` (its protocol version), then serves jobs from stdin until stdin closes, keeping the
last model loaded so the next run skips loading it. Jobs: segment, teach, fit (a survey cluster model),
crowns, probe, and for the model manager models, download, delete and clear_feature_cache
(engine/hub_cache.py does those). Per job it writes progress and log messages, then one result or one
error (its kind: input, model, output, cancelled, internal).

Cancel is cooperative: a reader thread takes `cancel` off stdin at once; the job stops at the
next batch of tiles or transformer layer of the model, removes its outputs, reports `cancelled`,
and the worker waits for the next job with its model still loaded (a download stops at once;
what it fetched stays in the cache and the next download resumes it). SIGTERM is the client's
fall-back when a cancel is not answered: the job stops the same way and the worker exits.
Anything a library prints goes to stderr, so stdout carries the protocol alone. The token is
never logged.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from .. import protocol
from ..memory import host_memory
from ..params import CrownOptions, ParameterError, Role, SegmentationParams, settings_with
from ..protocol import Command, ErrorKind
from . import hub_cache
from .core.errors import Cancelled, InputError, ModelUnavailableError, OutputError, TreesegError


class _Channel:
    """Writes protocol messages on the real stdout, one JSON object per line."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def send(self, message: dict[str, Any]) -> None:
        self._stream.write(protocol.encode(message))
        self._stream.flush()


class _ProtocolLogHandler(logging.Handler):
    def __init__(self, channel: _Channel) -> None:
        super().__init__(logging.WARNING)
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        self._channel.send(protocol.log(record.levelname.lower(), record.getMessage()))


class Worker:
    """Serves jobs from stdin; keeps the last loaded model for the next job."""

    def __init__(self, channel: _Channel) -> None:
        self.channel = channel
        self.terminate_requested = False
        self.busy = False
        self.model_loads = 0
        self.jobs_served = 0
        self._cancel = threading.Event()
        self._backbone = None
        self._backbone_key: tuple | None = None
        self._download: threading.Thread | None = None
        self._commands: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            Command.SEGMENT: self.segment,
            Command.TEACH: self.teach,
            Command.FIT: self.fit,
            Command.CROWNS: self.crowns,
            Command.PROBE: lambda job: {**probe(), "model_loads": self.model_loads, "jobs_served": self.jobs_served},
            Command.MODELS: lambda job: {**hub_cache.cached_models(),
                                         "feature_cache": hub_cache.feature_cache_state()},
            Command.CLEAR_FEATURE_CACHE: lambda job: hub_cache.clear_feature_cache(),
            Command.DOWNLOAD: self.download,
            Command.DELETE: lambda job: hub_cache.delete_cached(str(job[protocol.MODEL])),
        }

    @property
    def download_in_flight(self) -> bool:
        """A cancelled download's threads may still run; the worker then exits without waiting for them."""
        return self._download is not None and self._download.is_alive()

    def serve(self, jobs: TextIO) -> None:
        self.channel.send(protocol.hello(os.getpid()))
        waiting: queue.Queue = queue.Queue()
        threading.Thread(target=self._read_jobs, args=(jobs, waiting), name="treeseg-jobs", daemon=True).start()
        while (job := waiting.get()) is not None:
            self._cancel = threading.Event()
            self.busy = True
            self.handle(job)
            self.jobs_served += 1
            self.busy = False
            if self.terminate_requested:
                return

    def _read_jobs(self, jobs: TextIO, waiting: queue.Queue) -> None:
        """Reads stdin while a job runs: a cancel stops the current job at once, other jobs wait their turn
        (a line that is not a JSON object as an empty job, answered as an unknown command); None at the end."""
        for line in jobs:
            if not line.strip():
                continue
            job = protocol.decode(line)
            if job is not None and job.get(protocol.COMMAND) == Command.CANCEL:
                self._cancel.set()
            else:
                waiting.put(job if job is not None else {})
        waiting.put(None)

    def cancel_check(self) -> Callable[[], bool]:
        """Whether the current job should stop (its cancel message came, or SIGTERM); the check stays bound to
        that job, since a download's threads may outlive it."""
        cancel = self._cancel
        return lambda: cancel.is_set() or self.terminate_requested

    def handle(self, job: dict[str, Any]) -> None:
        """Run one job and answer with its result or error: every failure becomes a message."""
        try:
            command = self._commands.get(job.get(protocol.COMMAND))
            if command is None:
                raise InputError(f"Unknown worker command {job.get(protocol.COMMAND)!r}.")
            self.channel.send(protocol.result(command(job)))
        except Cancelled as error:
            self.channel.send(protocol.error(ErrorKind.CANCELLED, str(error)))
        except TreesegError as error:
            self.channel.send(protocol.error(_kind(error), str(error)))
        except (ValueError, KeyError, TypeError) as error:
            self.channel.send(protocol.error(ErrorKind.INTERNAL, f"Bad job: {error}"))
        except Exception as error:  # noqa: BLE001 - every failure becomes a message, never a dead worker
            traceback.print_exc(file=sys.stderr)
            self.channel.send(protocol.error(ErrorKind.INTERNAL, f"{type(error).__name__}: {error}"))

    def segment(self, job: dict[str, Any]) -> dict[str, Any]:
        from .core.progress import Progress
        from .pipeline import segment

        params = job_params(job)
        return segment(params, Progress(self._progress, self.cancel_check()), self._kept_model_loader(job)).to_dict()

    def teach(self, job: dict[str, Any]) -> dict[str, Any]:
        from .core.examples import Example
        from .core.progress import Progress
        from .pipeline import teach

        params = job_params(job)
        examples = [Example(float(col), float(row), label=kind) if isinstance(kind, str)
                    else Example(float(col), float(row), bool(kind)) for col, row, kind in job[protocol.EXAMPLES]]
        threshold = job.get(protocol.THRESHOLD)
        return teach(params, examples, None if threshold is None else float(threshold),
                     Progress(self._progress, self.cancel_check()), self._kept_model_loader(job),
                     class_name=str(job.get(protocol.CLASS_NAME) or "tree"),
                     classifier=job.get(protocol.CLASSIFIER))

    def fit(self, job: dict[str, Any]) -> dict[str, Any]:
        """One survey cluster model from several rasters (survey.fit_survey), written to `out_path`."""
        from .core.progress import Progress
        from .survey import fit_survey

        params = job_params(job)
        model = fit_survey([str(path) for path in job[protocol.INPUTS]], params, str(job[protocol.OUT_PATH]),
                           Progress(self._progress, self.cancel_check()), self._kept_model_loader(job))
        header = model.header()
        return {"cluster_model": str(job[protocol.OUT_PATH]), "model": header["extractor"],
                **{key: header[key] for key in ("k", "automatic_k", "tree_clusters", "tree_rule", "inputs")}}

    def crowns(self, job: dict[str, Any]) -> dict[str, Any]:
        """Split a tree-mask raster into crown polygons (gis/crowns.py); the layer is named after the file."""
        from .gis.crowns import write_crowns

        try:
            options = CrownOptions.from_json(job.get(protocol.OPTIONS) or {})
        except ParameterError as error:
            raise InputError(str(error)) from None
        gpkg_path = str(job[protocol.GPKG_PATH])
        try:
            Path(gpkg_path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"Cannot create the folder of {gpkg_path}: {error.strerror}.") from error
        trees_path = str(job[protocol.TREES_PATH])
        count = write_crowns(
            trees_path, str(job.get(protocol.CLUSTERS_PATH) or trees_path), gpkg_path,
            Path(gpkg_path).stem, options,
            progress=lambda fraction: self._progress(100.0 * fraction, "Splitting crowns"),
            is_cancelled=self.cancel_check(),
        )
        return {"crowns": count, "outputs": {"crowns": gpkg_path}}

    def download(self, job: dict[str, Any]) -> dict[str, Any]:
        """Fetch a catalogue model into the Hugging Face cache (engine/hub_cache.py); stops on cancel."""

        def keep(thread: threading.Thread) -> None:
            self._download = thread

        return hub_cache.download(str(job[protocol.MODEL]), job.get(protocol.REVISION), job.get(protocol.HF_TOKEN),
                                  self.cancel_check(), self._progress, keep)

    def _kept_model_loader(self, job: dict[str, Any]):
        """Loads the backbone a job asks for, keeping it for the next job; a cancel stops it between layers."""
        from .core.models import load_backbone

        token = job.get(protocol.HF_TOKEN) or None

        def load_kept_model(wanted):
            key = tuple(settings_with(Role.MODEL, wanted).items())  # params.Role.MODEL: which model loads
            if self._backbone_key != key:
                # Forget the kept model first: a load that raises leaves the worker as a fresh one, never a
                # key without its model.
                self._backbone, self._backbone_key = None, None
                backbone = load_backbone(wanted.model, wanted.device, wanted.allow_untrained,
                                         token=token, revision=wanted.model_revision, precision=wanted.precision,
                                         tile_shape=(wanted.tile_size, wanted.tile_size))
                self._stop_between_layers(backbone.model)
                self._backbone, self._backbone_key = backbone, key
                self.model_loads += 1
            return self._backbone

        return load_kept_model

    def _stop_between_layers(self, model: Any) -> None:
        """Raise Cancelled before each transformer layer once the current job is cancelled: a batch of a
        large model on the CPU takes seconds, one layer a fraction of that. The int8 ONNX Runtime session
        has no layers to hook: it stops itself (RunOptions.terminate, core/onnx_int8.py)."""
        from .core.onnx_int8 import OnnxInt8Network

        if isinstance(model, OnnxInt8Network):
            model.stop_when(lambda: self._cancel.is_set() or self.terminate_requested)
            return
        import torch

        def check(module: Any, inputs: Any) -> None:
            if self._cancel.is_set() or self.terminate_requested:
                raise Cancelled()

        for layers in (module for module in model.modules() if isinstance(module, torch.nn.ModuleList)):
            for layer in layers:
                layer.register_forward_pre_hook(check)

    def _progress(self, percent: float, stage: str) -> None:
        self.channel.send(protocol.progress(percent, stage))


def probe() -> dict[str, Any]:
    """What the engine has: versions, the device `auto` would pick and that device's memory."""
    import torch
    import transformers

    from .. import __version__
    from .core.devices import describe_device, resolve_device, resolve_precision

    device, dtype = resolve_device("auto")
    if device.type == "cuda":
        available, total = torch.cuda.mem_get_info(device)
    else:
        total, available = host_memory() or (None, None)
    return {
        "treeseg": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "device_description": describe_device(device),
        "dtype": str(dtype).replace("torch.", ""),
        "precision": resolve_precision(device),
        "cuda_available": torch.cuda.is_available(),
        "memory_total_bytes": total,
        "memory_available_bytes": available,
    }


def job_params(job: dict[str, Any]) -> SegmentationParams:
    """The job's parameters, rebuilt from JSON and validated again; a refused value is an input error."""
    try:
        params = SegmentationParams.from_json(job[protocol.PARAMS])
        params.validate()
    except ParameterError as error:
        raise InputError(str(error)) from None
    return params


def _kind(error: TreesegError) -> str:
    if isinstance(error, InputError):
        return ErrorKind.INPUT
    if isinstance(error, ModelUnavailableError):
        return ErrorKind.MODEL
    if isinstance(error, OutputError):
        return ErrorKind.OUTPUT
    return ErrorKind.INTERNAL


def main() -> None:
    protocol_stream = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    channel = _Channel(protocol_stream)
    worker = Worker(channel)

    def request_stop(signum: int, frame: object) -> None:
        worker.terminate_requested = True
        if not worker.busy:
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, request_stop)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="treeseg worker: %(message)s")
    logging.getLogger("treeseg").addHandler(_ProtocolLogHandler(channel))
    logging.getLogger("treeseg_qgis").addHandler(_ProtocolLogHandler(channel))
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    try:
        worker.serve(sys.stdin)
    finally:
        if worker.download_in_flight:
            os._exit(0)


if __name__ == "__main__":
    main()
