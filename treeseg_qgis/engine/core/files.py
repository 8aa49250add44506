"""Files a user names (a raster, a cluster model, example points, a reference, a model folder): refused at once
when they are a pipe, socket or device, which opening would block on forever; treeseg's own npz files (cluster
models, taught classifiers) read with every failure as one line."""

from __future__ import annotations

import io
import json
import stat
import zipfile
from pathlib import Path

import numpy as np

from ...atomic import file_mode, write_atomically
from .errors import InputError, cannot_write


def refuse_special_file(path: str | Path, what: str) -> None:
    """An InputError when `path` (the `what` a user named) is a FIFO, socket or device; a missing path or a
    GDAL virtual path passes (the reader's own message follows); the file is never opened, so a FIFO does not
    block here."""
    mode = file_mode(path)
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise InputError(f"The {what} '{path}' is not a regular file (a pipe, socket or device): save it to a "
                         "file and choose that.")


def refuse_special_files_in(folder: str | Path, what: str) -> None:
    """`refuse_special_file` for a folder and every entry in it (a model folder whose config.json is a FIFO)."""
    refuse_special_file(folder, what)
    if Path(folder).is_dir():
        for entry in Path(folder).iterdir():
            refuse_special_file(entry, f"file of the {what}")


def write_header_and_arrays(path: str | Path, what: str, header: dict, arrays: dict[str, np.ndarray]) -> Path:
    """Write a treeseg npz file (the `what` a message names): the JSON `header` and the named arrays, whole or
    not at all; `read_header_and_arrays` reads it."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)
    with cannot_write(f"the {what} {path}"):
        write_atomically(path, buffer.getvalue())
    return Path(path)


def read_header_and_arrays(path: str | Path, what: str, file_format: str, names: tuple[str, ...],
                           again: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The JSON header and the arrays `names` of a treeseg npz file (a cluster model or a taught classifier,
    the `what`, of `file_format`); a pipe, a missing file, a folder, a damaged file or another format is one
    InputError (`again`: how to make the file again)."""
    refuse_special_file(path, what)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in ("header", *names)}
        header = json.loads(bytes(arrays.pop("header")).decode())
    except FileNotFoundError:
        raise InputError(f"The {what} {path} does not exist.") from None
    except IsADirectoryError:
        raise InputError(f"The {what} {path} is a folder: choose the .treeseg file.") from None
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError, EOFError, zipfile.BadZipFile,
            UnicodeDecodeError) as error:
        raise InputError(f"{path} is not a treeseg {what}, or it is damaged ({error}): {again}.") from None
    if not isinstance(header, dict) or header.get("format") != file_format:
        raise InputError(f"{path} is not a treeseg {what}.")
    return header, arrays
