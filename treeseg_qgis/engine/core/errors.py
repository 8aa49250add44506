"""Errors a user can act on: their message is shown as it is, without a traceback."""

from collections.abc import Iterator
from contextlib import contextmanager


class TreesegError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""


class InputError(TreesegError):
    """The input raster, a band choice, an extent or a parameter is not usable."""


class ModelUnavailableError(TreesegError):
    """The model weights cannot be loaded (gated, offline, missing or not a DINOv3)."""


class OutputError(TreesegError):
    """An output cannot be written (folder not writable, disk full, file locked)."""


class Cancelled(TreesegError):
    """The run was cancelled by the user."""

    def __init__(self, message: str = "Cancelled by the user.") -> None:
        super().__init__(message)


@contextmanager
def cannot_write(what: str) -> Iterator[None]:
    """An OSError in the block (writing `what`, the file as a message names it) becomes the OutputError
    'Cannot write <what>: <reason>.'"""
    try:
        yield
    except OSError as error:
        raise OutputError(f"Cannot write {what}: {error.strerror or error}.") from error
