"""Stop signals for the command line: SIGINT, SIGTERM and SIGHUP end a run cleanly.

`python -m treeseg_qgis` (__main__.py) handles them from its first line, before the slow imports
(`handle_stop_signals`), ignores them once the command is done (`ignore_stop_signals`) and then ends the process
without the interpreter's teardown (`exit_now`); `cli.main` handles them for the command itself
(`stop_signals_handled`, the handlers restored after it). A handled signal is recorded and raises `Interrupted` at
once, except inside `deferred()` sections (GDAL calls with Python progress callbacks, moving outputs into place,
cleaning up: the pipeline marks them), where it is only recorded: the run then stops at its next cancellation check
(`stop_requested`, the CLI's Progress) or when the section ends.
Where no handler is installed (the engine worker, which stops on cancel messages and its own SIGTERM handler,
and Dask workers) `deferred()` sections change nothing.
Exit status 128 + the signal number: 130 (SIGINT), 143 (SIGTERM), 129 (SIGHUP).
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(BaseException):
    """A stop signal arrived; like KeyboardInterrupt, `except Exception` does not catch it by accident."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class _State:
    received: int | None = None
    deferring = 0


def handle_stop_signals() -> None:
    """Handle SIGINT, SIGTERM and SIGHUP from now on (main thread only)."""
    _State.received = None
    for signum in STOP_SIGNALS:
        signal.signal(signum, _handle)


def ignore_stop_signals() -> None:
    """Ignore stop signals from now on: the work is done and the process is about to exit."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def exit_now(status: int | None) -> NoReturn:
    """End a finished command as Python's exit does (other threads joined, the standard streams flushed, the exit
    handlers run: logging, temporary folders), but without the interpreter's teardown of every module and object,
    which took 0.6 to 1.7 s after a `segment` run (docs/BENCHMARKS.md) and does nothing a finished command needs."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    code = 0 if status is None else status
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: as Python's own exit, a failure unless one was already said
            code = code or 120
    atexit._run_exitfuncs()
    os._exit(code)


@contextmanager
def stop_signals_handled() -> Iterator[None]:
    """Handle SIGINT, SIGTERM and SIGHUP (main thread only) until the block ends, then restore the handlers."""
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    handle_stop_signals()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _State.received = None


def received() -> int | None:
    """The first stop signal received since `stop_signals_handled()` began, or None."""
    return _State.received


def stop_requested() -> bool:
    return _State.received is not None


@contextmanager
def deferred(reraise: bool = True) -> Iterator[None]:
    """A section a signal must not break into; `Interrupted` is raised when it ends (if `reraise`)."""
    _State.deferring += 1
    try:
        yield
    finally:
        _State.deferring -= 1
    if reraise and _State.received is not None and not _State.deferring:
        raise Interrupted(_State.received)


def _handle(signum: int, frame: object) -> None:
    if _State.received is None:
        _State.received = signum
    if not _State.deferring:
        raise Interrupted(_State.received)
