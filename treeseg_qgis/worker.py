"""The engine worker process: `python -m treeseg_qgis.worker`, run in the engine's environment.

Protocol (one JSON object per line, both ways):

- in, on stdin: `{"command": "segment", "params": {...}, "hf_token": "..."}`,
  `{"command": "teach", "params": {...}, "examples": [[col, row, is_tree], ...],
  "threshold": 0.6}`, `{"command": "crowns", "trees_path": ..., "clusters_path": ..., "gpkg_path": ...,
  "options": {"min_area_m2": 2.0, ...}}` or `{"command": "probe"}`; the worker serves jobs until
  stdin closes, keeping the last model loaded so the next run skips loading it.
- out, on stdout: `{"type": "ready"}` once, then per job any number of
  `{"type": "progress", "percent": 42.0, "stage": "..."}` and
  `{"type": "log", "level": "warning", "message": "..."}`, and one final
  `{"type": "result", "record": {...}}` or
  `{"type": "error", "kind": "input|model|output|cancelled|internal", "message": "..."}`.

Cancel is SIGTERM: the current job stops at the next tile, removes its outputs,
reports `cancelled` and the worker exits. Anything a library prints goes to
stderr, so stdout carries the protocol alone. The token is never logged.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, TextIO

from .core.errors import Cancelled, InputError, ModelUnavailableError, OutputError, TreesegError

PROTOCOL_VERSION = 1


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
        self._backbone = None
        self._backbone_key: tuple | None = None

    def serve(self, jobs: TextIO) -> None:
        self.channel.send({"type": "ready", "protocol": PROTOCOL_VERSION, "pid": os.getpid()})
        for line in jobs:
            if not line.strip():
                continue
            self.busy = True
            self.handle(line)
            self.busy = False
            if self.terminate_requested:
                return

    def handle(self, line: str) -> None:
        try:
            job = json.loads(line)
            command = job.get("command")
            if command == "segment":
                record = self.segment(job)
            elif command == "teach":
                record = self.teach(job)
            elif command == "crowns":
                record = self.crowns(job)
            elif command == "probe":
                record = probe()
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
        return segment(params, Progress(self._progress, lambda: self.terminate_requested),
                       self._kept_model_loader(job))

    def teach(self, job: dict[str, Any]) -> dict[str, Any]:
        from .core.examples import Example
        from .core.params import SegmentationParams
        from .core.progress import Progress
        from .pipeline import teach

        params = SegmentationParams.from_dict(job["params"])
        examples = [Example(float(col), float(row), bool(is_tree)) for col, row, is_tree in job["examples"]]
        return teach(params, examples, float(job.get("threshold", 0.6)),
                     Progress(self._progress, lambda: self.terminate_requested), self._kept_model_loader(job))

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
            is_cancelled=lambda: self.terminate_requested,
        )
        return {"crowns": count, "outputs": {"crowns": gpkg_path}}

    def _kept_model_loader(self, job: dict[str, Any]):
        """Loads the backbone a job asks for, keeping it for the next job."""
        from .core.models import load_backbone

        token = job.get("hf_token") or None

        def load_kept_model(wanted):
            key = (wanted.model, wanted.model_revision, wanted.device, wanted.allow_untrained)
            if self._backbone_key != key:
                self._backbone = None
                self._backbone = load_backbone(wanted.model, wanted.device, wanted.allow_untrained,
                                               token=token, revision=wanted.model_revision)
                self._backbone_key = key
            return self._backbone

        return load_kept_model

    def _progress(self, percent: float, stage: str) -> None:
        self.channel.send({"type": "progress", "percent": round(percent, 2), "stage": stage})


def probe() -> dict[str, Any]:
    """What the engine has: versions and the device `auto` would pick."""
    import torch
    import transformers

    from . import __version__
    from .core.devices import describe_device, resolve_device

    device, dtype = resolve_device("auto")
    return {
        "treeseg": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "device_description": describe_device(device),
        "dtype": str(dtype).replace("torch.", ""),
        "cuda_available": torch.cuda.is_available(),
    }


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
    worker.serve(sys.stdin)


if __name__ == "__main__":
    main()
