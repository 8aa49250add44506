"""The engine worker process: `python -m treeseg_qgis.engine.worker`, run in the engine's environment.

Protocol (one JSON object per line, both ways):

- in, on stdin: `{"command": "segment", "params": {...}, "hf_token": "..."}`,
  `{"command": "teach", "params": {...}, "examples": [[col, row, is_tree], ...],
  "threshold": 0.6 (or null: chosen from the examples), "class_name": "dead tree"}`,
  `{"command": "fit", "inputs": [...], "out_path": "survey.treeseg", "params": {...}}` (a survey cluster model),
  `{"command": "crowns", "trees_path": ..., "clusters_path": ..., "gpkg_path": ...,
  "options": {"min_area_m2": 2.0, ...}}`, `{"command": "probe"}`, and for the model manager
  `{"command": "models"}` (catalogue models in the local Hugging Face cache; never the network),
  `{"command": "download", "model": "base", "hf_token": "..."}`, `{"command": "delete", "model": "base"}` and
  `{"command": "clear_feature_cache"}`;
  the worker serves jobs until stdin closes, keeping the last model loaded so the next run skips loading it.
  `{"command": "cancel"}` may come while a job runs: it stops that job.
- out, on stdout: `{"type": "ready"}` once, then per job any number of
  `{"type": "progress", "percent": 42.0, "stage": "..."}` and
  `{"type": "log", "level": "warning", "message": "..."}`, and one final
  `{"type": "result", "record": {...}}` or
  `{"type": "error", "kind": "input|model|output|cancelled|internal", "message": "..."}`.

Cancel is cooperative: a reader thread takes `cancel` off stdin at once; the job stops at the
next batch of tiles or transformer layer of the model, removes its outputs, reports `cancelled`,
and the worker waits for the next job with its model still loaded (a download stops at once;
what it fetched stays in the cache and the next download resumes it). SIGTERM is the client's
fall-back when a cancel is not answered: the job stops the same way and the worker exits.
Anything a library prints goes to stderr, so stdout carries the protocol alone. The token is
never logged.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from ..catalogue import HUB_URL, MODELS, CatalogueModel
from ..memory import disk_free_bytes, format_size, host_memory
from .core.errors import Cancelled, InputError, ModelUnavailableError, OutputError, TreesegError

PROTOCOL_VERSION = 1
WEIGHT_FILES = ["*.json", "*.safetensors"]
PROGRESS_INTERVAL_SECONDS = 0.25


class _Channel:
    """Writes protocol messages on the real stdout, one JSON object per line."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def send(self, message: dict[str, Any]) -> None:
        self._stream.write(json.dumps(message) + "\n")
        self._stream.flush()


class _ProtocolLogHandler(logging.Handler):
    def __init__(self, channel: _Channel) -> None:
        super().__init__(logging.WARNING)
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        self._channel.send({"type": "log", "level": record.levelname.lower(), "message": record.getMessage()})


class Worker:
    """Serves jobs from stdin; keeps the last loaded model for the next job."""

    def __init__(self, channel: _Channel) -> None:
        self.channel = channel
        self.terminate_requested = False
        self.busy = False
        self.model_loads = 0
        self._cancel = threading.Event()
        self._backbone = None
        self._backbone_key: tuple | None = None
        self._download: threading.Thread | None = None

    @property
    def download_in_flight(self) -> bool:
        """A cancelled download's threads may still run; the worker then exits without waiting for them."""
        return self._download is not None and self._download.is_alive()

    def serve(self, jobs: TextIO) -> None:
        self.channel.send({"type": "ready", "protocol": PROTOCOL_VERSION, "pid": os.getpid()})
        waiting: queue.Queue = queue.Queue()
        threading.Thread(target=self._read_jobs, args=(jobs, waiting), name="treeseg-jobs", daemon=True).start()
        while (line := waiting.get()) is not None:
            self._cancel = threading.Event()
            self.busy = True
            self.handle(line)
            self.busy = False
            if self.terminate_requested:
                return

    def _read_jobs(self, jobs: TextIO, waiting: queue.Queue) -> None:
        """Reads stdin while a job runs: a cancel stops the current job at once, other lines wait their turn;
        None at the end."""
        for line in jobs:
            if not line.strip():
                continue
            if _is_cancel(line):
                self._cancel.set()
            else:
                waiting.put(line)
        waiting.put(None)

    def cancel_check(self) -> Callable[[], bool]:
        """Whether the current job should stop (its cancel message came, or SIGTERM); the check stays bound to
        that job, since a download's threads may outlive it."""
        cancel = self._cancel
        return lambda: cancel.is_set() or self.terminate_requested

    def handle(self, line: str) -> None:
        try:
            job = json.loads(line)
            command = job.get("command")
            if command == "segment":
                record = self.segment(job)
            elif command == "teach":
                record = self.teach(job)
            elif command == "fit":
                record = self.fit(job)
            elif command == "crowns":
                record = self.crowns(job)
            elif command == "probe":
                record = {**probe(), "model_loads": self.model_loads}
            elif command == "models":
                record = {**cached_models(), "feature_cache": feature_cache_state()}
            elif command == "clear_feature_cache":
                record = clear_feature_cache()
            elif command == "download":
                record = self.download(job)
            elif command == "delete":
                record = delete_cached(str(job["model"]))
            else:
                raise InputError(f"Unknown worker command {command!r}.")
            self.channel.send({"type": "result", "record": record})
        except Cancelled as error:
            self.channel.send({"type": "error", "kind": "cancelled", "message": str(error)})
        except TreesegError as error:
            self.channel.send({"type": "error", "kind": _kind(error), "message": str(error)})
        except (ValueError, KeyError, TypeError) as error:
            self.channel.send({"type": "error", "kind": "internal", "message": f"Bad job: {error}"})
        except Exception as error:  # noqa: BLE001 - every failure becomes a message, never a dead worker
            traceback.print_exc(file=sys.stderr)
            self.channel.send({"type": "error", "kind": "internal",
                               "message": f"{type(error).__name__}: {error}"})

    def segment(self, job: dict[str, Any]) -> dict[str, Any]:
        from .core.params import SegmentationParams
        from .core.progress import Progress
        from .pipeline import segment

        params = SegmentationParams.from_dict(job["params"])
        return segment(params, Progress(self._progress, self.cancel_check()), self._kept_model_loader(job))

    def teach(self, job: dict[str, Any]) -> dict[str, Any]:
        from .core.examples import Example
        from .core.params import SegmentationParams
        from .core.progress import Progress
        from .pipeline import teach

        params = SegmentationParams.from_dict(job["params"])
        examples = [Example(float(col), float(row), bool(is_tree)) for col, row, is_tree in job["examples"]]
        threshold = job.get("threshold")
        return teach(params, examples, None if threshold is None else float(threshold),
                     Progress(self._progress, self.cancel_check()), self._kept_model_loader(job),
                     class_name=str(job.get("class_name") or "tree"))

    def fit(self, job: dict[str, Any]) -> dict[str, Any]:
        """One survey cluster model from several rasters (survey.fit_survey), written to `out_path`."""
        from .core.params import SegmentationParams
        from .core.progress import Progress
        from .survey import fit_survey

        params = SegmentationParams.from_dict(job["params"])
        model = fit_survey([str(path) for path in job["inputs"]], params, str(job["out_path"]),
                           Progress(self._progress, self.cancel_check()), self._kept_model_loader(job))
        header = model.header()
        return {"cluster_model": str(job["out_path"]), "model": header["extractor"],
                **{key: header[key] for key in ("k", "automatic_k", "tree_clusters", "tree_rule", "inputs")}}

    def crowns(self, job: dict[str, Any]) -> dict[str, Any]:
        """Split a tree-mask raster into crown polygons (gis/crowns.py); the layer is named after the file."""
        from .gis.crowns import CrownOptions, write_crowns

        gpkg_path = str(job["gpkg_path"])
        try:
            Path(gpkg_path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"Cannot create the folder of {gpkg_path}: {error.strerror}.") from error
        count = write_crowns(
            str(job["trees_path"]), str(job.get("clusters_path") or job["trees_path"]), gpkg_path,
            Path(gpkg_path).stem, CrownOptions(**job.get("options", {})),
            progress=lambda fraction: self._progress(100.0 * fraction, "Splitting crowns"),
            is_cancelled=self.cancel_check(),
        )
        return {"crowns": count, "outputs": {"crowns": gpkg_path}}

    def download(self, job: dict[str, Any]) -> dict[str, Any]:
        """Fetch a catalogue model's weights into the Hugging Face cache, reporting progress; stops on cancel."""
        from huggingface_hub import snapshot_download

        from .core.models import hub_offline

        model = catalogue_model(str(job["model"]))
        if hub_offline():
            raise ModelUnavailableError(offline_message(model))
        _check_disk_space(model)
        cancelled = self.cancel_check()
        tally = DownloadTally(model.download_bytes, cancelled)
        outcome: dict[str, Any] = {}

        def fetch() -> None:
            try:
                outcome["path"] = snapshot_download(model.repo_id, revision=job.get("revision") or "main",
                                                    token=job.get("hf_token") or None, allow_patterns=WEIGHT_FILES,
                                                    tqdm_class=tally.progress_bar_class())
            except BaseException as error:  # noqa: BLE001 - handed to the job's thread and reported there
                outcome["error"] = error

        self._download = threading.Thread(target=fetch, name="treeseg-download", daemon=True)
        self._download.start()
        reported = -1.0
        while self._download.is_alive():
            self._download.join(PROGRESS_INTERVAL_SECONDS)
            if cancelled():
                raise Cancelled(f"Download of {model.repo_id} cancelled; what was fetched stays in the cache "
                                "and the next download resumes it.")
            if tally.percent() != reported:
                reported = tally.percent()
                self._progress(reported, tally.stage(model.repo_id))
        if "error" in outcome:
            raise download_error(model, outcome["error"])
        self._progress(100.0, f"Downloaded {model.repo_id}")
        return {"name": model.name, "repo_id": model.repo_id, "path": outcome["path"]}

    def _kept_model_loader(self, job: dict[str, Any]):
        """Loads the backbone a job asks for, keeping it for the next job; a cancel stops it between layers."""
        from .core.models import load_backbone

        token = job.get("hf_token") or None

        def load_kept_model(wanted):
            key = (wanted.model, wanted.model_revision, wanted.device, wanted.precision, wanted.allow_untrained)
            if self._backbone_key != key:
                self._backbone = None
                self._backbone = load_backbone(wanted.model, wanted.device, wanted.allow_untrained,
                                               token=token, revision=wanted.model_revision,
                                               precision=wanted.precision)
                self._backbone_key = key
                self.model_loads += 1
                self._stop_between_layers(self._backbone.model)
            return self._backbone

        return load_kept_model

    def _stop_between_layers(self, model: Any) -> None:
        """Raise Cancelled before each transformer layer once the current job is cancelled: a batch of a
        large model on the CPU takes seconds, one layer a fraction of that."""
        import torch

        def check(module: Any, inputs: Any) -> None:
            if self._cancel.is_set() or self.terminate_requested:
                raise Cancelled()

        for layers in (module for module in model.modules() if isinstance(module, torch.nn.ModuleList)):
            for layer in layers:
                layer.register_forward_pre_hook(check)

    def _progress(self, percent: float, stage: str) -> None:
        self.channel.send({"type": "progress", "percent": round(percent, 2), "stage": stage})


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


def catalogue_model(name: str) -> CatalogueModel:
    """The catalogue model called `name`, or InputError listing the names."""
    if name not in MODELS:
        raise InputError(f"Unknown model '{name}': the model manager knows {', '.join(MODELS)}.")
    return MODELS[name]


def hub_cache() -> Path:
    """The Hugging Face hub cache folder (HF_HUB_CACHE, HF_HOME/hub or ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_cache_folder(repo_id: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return hub_cache() / repo_folder_name(repo_id=repo_id, repo_type="model")


def cached_models() -> dict[str, Any]:
    """Every catalogue model: whether its weights are in the local cache and how much disk its files take.

    Reads the cache folder only (huggingface_hub's scan_cache_dir); never the network.
    """
    from huggingface_hub import scan_cache_dir

    cache = hub_cache()
    repos = {repo.repo_id: repo for repo in scan_cache_dir(cache).repos} if cache.is_dir() else {}
    models = []
    for model in MODELS.values():
        complete = [repo_id for repo_id in model.repo_ids if repo_id in repos and _has_weights(repos[repo_id])]
        models.append({
            "name": model.name,
            "repo_id": complete[0] if complete else model.repo_id,
            "cached": bool(complete),
            "size_on_disk": sum(_folder_bytes(repo_cache_folder(repo_id)) for repo_id in model.repo_ids),
        })
    return {"cache_dir": str(cache), "disk_free_bytes": disk_free_bytes(cache), "models": models}


def feature_cache_state() -> dict[str, Any]:
    """Where the feature cache of runs is, how many bytes it holds and its cap."""
    from .core.cache import FeatureCache

    cache = FeatureCache()
    return {"path": str(cache.root), "size_bytes": cache.size_bytes(), "max_bytes": cache.max_bytes}


def clear_feature_cache() -> dict[str, Any]:
    """Remove every entry of the feature cache; the next run of each raster runs the model again."""
    from .core.cache import FeatureCache

    cache = FeatureCache()
    freed = cache.size_bytes()
    cache.clear()
    return {"name": "the feature cache", "freed_bytes": freed}


def delete_cached(name: str) -> dict[str, Any]:
    """Remove every revision (and any unfinished download) of a catalogue model from the cache."""
    model = catalogue_model(name)
    freed = 0
    for repo_id in model.repo_ids:
        folder = repo_cache_folder(repo_id)
        if folder.is_dir():
            size = _folder_bytes(folder)
            try:
                shutil.rmtree(folder)
            except OSError as error:
                raise OutputError(f"Cannot remove {folder}: {error.strerror}.") from error
            freed += size
    return {"name": model.name, "freed_bytes": freed}


class DownloadTally:
    """Bytes fetched so far, fed by huggingface_hub's progress bars from its download threads.

    A bar raises Cancelled as soon as `is_cancelled()`, which stops plain HTTP downloads at the next chunk.
    """

    def __init__(self, expected_bytes: int, is_cancelled: Callable[[], bool]) -> None:
        self.expected_bytes = expected_bytes
        self.is_cancelled = is_cancelled
        self.done_bytes = 0

    def percent(self) -> float:
        """Below 100 until the download returns: the expected size is approximate."""
        return round(min(99.0, 100.0 * self.done_bytes / max(1, self.expected_bytes)), 1)

    def stage(self, repo_id: str) -> str:
        return f"Downloading {repo_id}: {format_size(self.done_bytes)} of about {format_size(self.expected_bytes)}"

    def record(self, done: float, total: float | None) -> None:
        self.done_bytes = max(self.done_bytes, int(done))
        self.expected_bytes = max(self.expected_bytes, int(total or 0))

    def progress_bar_class(self) -> type:
        """A silent tqdm class for snapshot_download's `tqdm_class` that reports its byte bars here."""
        from tqdm.auto import tqdm

        tally = self

        class ProgressBar(tqdm):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs.pop("name", None)
                self.counts_bytes = kwargs.get("unit") == "B"
                self.done = float(kwargs.get("initial") or 0)
                super().__init__(*args, **{**kwargs, "disable": True})

            def update(self, n: float | None = 1) -> bool | None:
                if tally.is_cancelled():
                    raise Cancelled()
                self.done += n or 0
                if self.counts_bytes:
                    tally.record(self.done, self.total)
                return super().update(n)

        return ProgressBar


def offline_message(model: CatalogueModel) -> str:
    return (f"Cannot download {model.repo_id}: the Hugging Face hub cannot be reached (HF_HUB_OFFLINE is set, "
            f"or there is no connection to {HUB_URL}). Connect this computer to the internet and try again, or "
            "download the model on a connected computer, copy its folder here and choose it with "
            "'Use a local folder…'.")


def download_error(model: CatalogueModel, error: BaseException) -> TreesegError:
    """What a failed download means for the user: gated access, no such model, offline, disk, or the error."""
    from .core.models import classify_hub_error, explain_load_failure

    if isinstance(error, TreesegError):
        return error
    kind = classify_hub_error(error)
    if kind in ("gated", "not_found"):
        return ModelUnavailableError(explain_load_failure(model.repo_id, error))
    if kind == "offline":
        return ModelUnavailableError(offline_message(model))
    if isinstance(error, OSError) and error.strerror:
        return OutputError(f"Cannot write {model.repo_id} into the Hugging Face cache {hub_cache()}: "
                           f"{error.strerror}.")
    return ModelUnavailableError(f"Downloading {model.repo_id} failed: {type(error).__name__}: {error}")


def _check_disk_space(model: CatalogueModel) -> None:
    free = disk_free_bytes(hub_cache())
    still_needed = model.download_bytes - _folder_bytes(repo_cache_folder(model.repo_id))
    if free is not None and free < still_needed:
        raise OutputError(f"{model.name} needs about {format_size(still_needed)} of disk space in "
                          f"{hub_cache()}; only {format_size(free)} is free.")


def _has_weights(repo: Any) -> bool:
    """Whether a cached repository has a revision with config.json and safetensors weights."""
    for revision in repo.revisions:
        names = {file.file_name for file in revision.files}
        if "config.json" in names and any(name.endswith(".safetensors") for name in names):
            return True
    return False


def _folder_bytes(folder: Path) -> int:
    """Bytes of the regular files under `folder` (cache snapshots are links into blobs: not counted twice)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root, name)
            if not path.is_symlink():
                total += path.stat().st_size
    return total


def _is_cancel(line: str) -> bool:
    try:
        message = json.loads(line)
    except ValueError:
        return False
    return isinstance(message, dict) and message.get("command") == "cancel"


def _kind(error: TreesegError) -> str:
    if isinstance(error, InputError):
        return "input"
    if isinstance(error, ModelUnavailableError):
        return "model"
    if isinstance(error, OutputError):
        return "output"
    return "internal"


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
