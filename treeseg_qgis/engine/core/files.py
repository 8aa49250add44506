"""Files a user names (a raster, a cluster model, example points, a reference, a model folder): refused at once
when they are a pipe, socket or device, which opening would block on forever."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import InputError


def refuse_special_file(path: str | Path, what: str) -> None:
    """An InputError when `path` (the `what` a user named) is a FIFO, socket or device; a missing path or a
    GDAL virtual path passes (the reader's own message follows). `os.stat` never opens the file, so a FIFO
    does not block here."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise InputError(f"The {what} '{path}' is not a regular file (a pipe, socket or device): save it to a "
                         "file and choose that.")


def refuse_special_files_in(folder: str | Path, what: str) -> None:
    """`refuse_special_file` for a folder and every entry in it (a model folder whose config.json is a FIFO)."""
    refuse_special_file(folder, what)
    if Path(folder).is_dir():
        for entry in Path(folder).iterdir():
            refuse_special_file(entry, f"file of the {what}")
