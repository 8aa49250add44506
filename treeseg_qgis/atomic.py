"""Files written whole or not at all: under a temporary name beside the file (`partial_path`), flushed to disk,
then renamed over it in one step (os.replace). A failure or a stop removes the temporary file (and a GDAL
.aux.xml beside it) and leaves the file as it was; outputs.temporary_files knows the temporary name, so what a
killed worker left is found and removed too. A target that is not a regular file (a folder, pipe, socket or
device) is refused before anything is written. Failures are OSErrors (the engine turns them into its one-line
OutputError, engine/core/errors.py `cannot_write`). Standard library only: both sides import it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def partial_path(path: str | Path) -> str:
    """The temporary name a file is written under before it is complete (`x.partial.tif` for `x.tif`)."""
    stem, extension = os.path.splitext(str(path))
    return f"{stem}.partial{extension}"


@contextmanager
def atomic_file(path: str | Path) -> Iterator[str]:
    """The temporary name to write `path` under in the block; when the block ends, the file is flushed to disk
    and renamed to `path`. On any failure (a stop too) the temporary file is removed and `path` is unchanged."""
    _refuse_special_target(path)
    partial = partial_path(path)
    try:
        yield partial
        _flush_to_disk(partial)
        os.replace(partial, path)
    except BaseException:
        for leftover in (partial, partial + ".aux.xml"):
            if os.path.exists(leftover):
                os.remove(leftover)
        raise


def write_atomically(path: str | Path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `path` with `atomic_file`."""
    with atomic_file(path) as partial, open(partial, "wb") as file:
        file.write(data.encode() if isinstance(data, str) else data)


def file_mode(path: str | Path) -> int | None:
    """The `st_mode` of `path`, or None when it cannot be had (missing, a GDAL virtual path, a NUL in the name).
    `os.stat` never opens the file, so a FIFO does not block here."""
    try:
        return os.stat(path).st_mode
    except (OSError, ValueError):
        return None


def _refuse_special_target(path: str | Path) -> None:
    """An OSError when `path` exists and is not a regular file: renaming over it would replace a folder, pipe
    or device with a file."""
    mode = file_mode(path)
    if mode is not None and not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, "it is not a regular file (a folder, pipe, socket or device); choose another "
                                    "file", str(path))


def _flush_to_disk(path: str) -> None:
    """Make the file's contents durable before it is renamed into place (no empty file after a power cut)."""
    descriptor = os.open(path, os.O_RDWR)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
