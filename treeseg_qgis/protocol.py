"""The engine worker protocol, shared by `qgis_side/engine_client.py` and `engine/worker.py`.

One JSON object per line, both ways. Standard library only (both sides import it).

- The worker starts by announcing itself: `{"type": "hello", "protocol": PROTOCOL_VERSION, "pid": ...}`;
  the client checks the version before sending any job.
- In, on stdin: one job per line, `{"command": <a Command>, ...its fields}`; `{"command": "cancel"}`
  may come while a job runs and stops that job.
- Out, on stdout, per job: any number of `progress` and `log` messages, then one `result` (with the
  job's record) or one `error` (with an ErrorKind and a message).
"""

from __future__ import annotations

import json
from typing import Any

PROTOCOL_VERSION = 2
"""Raised whenever a message or a field changes meaning; version 1 announced itself as `ready`."""


class Command:
    """The `command` of a job line."""

    SEGMENT = "segment"
    TEACH = "teach"
    CROWNS = "crowns"
    FIT = "fit"
    PROBE = "probe"
    MODELS = "models"
    DOWNLOAD = "download"
    DELETE = "delete"
    CLEAR_FEATURE_CACHE = "clear_feature_cache"
    CANCEL = "cancel"


class Message:
    """The `type` of a line the worker writes."""

    HELLO = "hello"
    PROGRESS = "progress"
    LOG = "log"
    RESULT = "result"
    ERROR = "error"


class ErrorKind:
    """The `kind` of an error: the worker's, and the client's own (crash, busy, protocol)."""

    INPUT = "input"
    MODEL = "model"
    OUTPUT = "output"
    CANCELLED = "cancelled"
    INTERNAL = "internal"
    CRASH = "crash"
    BUSY = "busy"
    PROTOCOL = "protocol"


# Field names.
COMMAND = "command"
TYPE = "type"
PROTOCOL = "protocol"
PID = "pid"
PARAMS = "params"
HF_TOKEN = "hf_token"  # nosec B105 - the name of the field, not a secret
EXAMPLES = "examples"
THRESHOLD = "threshold"
CLASS_NAME = "class_name"
CLASSIFIER = "classifier"
TREES_PATH = "trees_path"
CLUSTERS_PATH = "clusters_path"
GPKG_PATH = "gpkg_path"
OPTIONS = "options"
INPUTS = "inputs"
OUT_PATH = "out_path"
MODEL = "model"
REVISION = "revision"
PERCENT = "percent"
STAGE = "stage"
LEVEL = "level"
MESSAGE = "message"
RECORD = "record"
KIND = "kind"


def encode(message: dict[str, Any]) -> str:
    """One message as one line (newline included)."""
    return json.dumps(message) + "\n"


def decode(line: str) -> dict[str, Any] | None:
    """The message on `line`, or None when the line is not a JSON object (a stray print)."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def hello(pid: int) -> dict[str, Any]:
    return {TYPE: Message.HELLO, PROTOCOL: PROTOCOL_VERSION, PID: pid}


def progress(percent: float, stage: str) -> dict[str, Any]:
    return {TYPE: Message.PROGRESS, PERCENT: round(percent, 2), STAGE: stage}


def log(level: str, message: str) -> dict[str, Any]:
    return {TYPE: Message.LOG, LEVEL: level, MESSAGE: message}


def result(record: dict[str, Any]) -> dict[str, Any]:
    return {TYPE: Message.RESULT, RECORD: record}


def error(kind: str, message: str) -> dict[str, Any]:
    return {TYPE: Message.ERROR, KIND: kind, MESSAGE: message}


def cancel() -> dict[str, Any]:
    return {COMMAND: Command.CANCEL}


LEGACY_READY = "ready"
"""How a version-1 worker announced itself."""


def announced_version(first_message: dict[str, Any] | None) -> int | None:
    """The protocol version a worker's first message announces (a version-1 `ready` included), or None."""
    if first_message is None or first_message.get(TYPE) not in (Message.HELLO, LEGACY_READY):
        return None
    version = first_message.get(PROTOCOL)
    return version if isinstance(version, int) else None


def mismatch_message(engine_version: int | None) -> str:
    """What to do when the engine speaks another protocol than this plugin."""
    spoken = f"protocol {engine_version}" if engine_version is not None else "no known protocol"
    return (f"The engine speaks {spoken}, this plugin {PROTOCOL_VERSION}: open Raster ▸ TreeSeg (DINOv3) ▸ "
            "Set up the engine… and Repair.")
