"""One progress and cancel protocol for every front end.

The pipeline reports a percentage and a stage text through one callback and asks
one question, "cancelled?", between tiles. A QgsTask, a Processing feedback, the
worker process and the command line all adapt to these two callables.
"""

from __future__ import annotations

from typing import Callable

from .errors import Cancelled

ProgressCallback = Callable[[float, str], None]
CancelCheck = Callable[[], bool]


class Progress:
    """Maps stage-local progress (0..1) onto an overall 0..100 percentage."""

    def __init__(
        self,
        callback: ProgressCallback | None = None,
        is_cancelled: CancelCheck | None = None,
        start: float = 0.0,
        end: float = 100.0,
    ) -> None:
        self._callback = callback
        self._is_cancelled = is_cancelled
        self._start = start
        self._end = end

    def report(self, fraction: float, stage: str) -> None:
        """Report `fraction` (0..1) of this range done, at `stage`."""
        if self._callback is not None:
            fraction = min(max(fraction, 0.0), 1.0)
            self._callback(self._start + fraction * (self._end - self._start), stage)

    def is_cancelled(self) -> bool:
        return self._is_cancelled is not None and bool(self._is_cancelled())

    def check(self) -> None:
        """Raise Cancelled when the user asked to stop."""
        if self.is_cancelled():
            raise Cancelled()

    def sub(self, start: float, end: float) -> Progress:
        """A Progress for the part [start, end] (fractions) of this range."""
        span = self._end - self._start
        return Progress(
            self._callback,
            self._is_cancelled,
            self._start + start * span,
            self._start + end * span,
        )

    def labelled(self, prefix: str) -> Progress:
        """This range with every stage text after `prefix` (one raster of several: "Raster 2 of 3: ...")."""
        callback = self._callback
        if callback is None:
            return self
        return Progress(lambda percent, stage: callback(percent, prefix + stage), self._is_cancelled,
                        self._start, self._end)
