"""Files written whole or not at all: under a temporary name beside the file (`partial_path`), flushed to disk,
then renamed over it in one step (os.replace). A failure or a stop removes the temporary file (and a GDAL
.aux.xml beside it) and leaves the file as it was; outputs.temporary_files knows the temporary name, so what a
killed worker left is found and removed too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError


def partial_path(path: str | Path) -> str:
    """The temporary name a file is written under before it is complete (`x.partial.tif` for `x.tif`)."""
    stem, extension = os.path.splitext(str(path))
    return f"{stem}.partial{extension}"


@contextmanager
def atomic_file(path: str | Path, what: str | None = None) -> Iterator[str]:
    """The temporary name to write `path` under in the block; when the block ends, the file is flushed to disk
    and renamed to `path`. On any failure (a stop too) the temporary file is removed; with `what` (the file as
    a message names it), an OSError becomes the OutputError 'Cannot write <what>: <reason>.'"""
    partial = partial_path(path)
    try:
        yield partial
        _flush_to_disk(partial)
        os.replace(partial, path)
    except BaseException as error:
        for leftover in (partial, partial + ".aux.xml"):
            if os.path.exists(leftover):
                os.remove(leftover)
        if what is not None and isinstance(error, OSError):
            raise OutputError(f"Cannot write {what}: {error.strerror or error}.") from error
        raise


def write_atomically(path: str | Path, data: str | bytes, what: str | None = None) -> None:
    """Write `data` (text as UTF-8) to `path` with `atomic_file`."""
    with atomic_file(path, what) as partial, open(partial, "wb") as file:
        file.write(data.encode() if isinstance(data, str) else data)


def _flush_to_disk(path: str) -> None:
    """Make the file's contents durable before it is renamed into place (no empty file after a power cut)."""
    descriptor = os.open(path, os.O_RDWR)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
