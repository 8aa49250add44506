"""One progress and cancel protocol for every front end.

The pipeline reports a percentage and a stage text through one callback and asks
one question, "cancelled?", between tiles. A QgsTask, a Processing feedback, the
worker process and the command line all adapt to these two callables.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from .errors import Cancelled

ProgressCallback = Callable[[float, str], None]
CancelCheck = Callable[[], bool]


@dataclass(frozen=True)
class Progress:
    """Maps stage-local progress (0..1) onto an overall 0..100 percentage: the part [start, end] of it."""

    callback: ProgressCallback | None = None
    cancel_check: CancelCheck | None = None
    start: float = 0.0
    end: float = 100.0

    def report(self, fraction: float, stage: str) -> None:
        """Report `fraction` (0..1) of this range done, at `stage`."""
        if self.callback is not None:
            fraction = min(max(fraction, 0.0), 1.0)
            self.callback(self.start + fraction * (self.end - self.start), stage)

    def is_cancelled(self) -> bool:
        return self.cancel_check is not None and bool(self.cancel_check())

    def check(self) -> None:
        """Raise Cancelled when the user asked to stop."""
        if self.is_cancelled():
            raise Cancelled()

    def sub(self, start: float, end: float) -> Progress:
        """A Progress for the part [start, end] (fractions) of this range."""
        span = self.end - self.start
        return replace(self, start=self.start + start * span, end=self.start + end * span)

    def labelled(self, prefix: str) -> Progress:
        """This range with every stage text after `prefix` (one raster of several: "Raster 2 of 3: ...")."""
        callback = self.callback
        if callback is None:
            return self
        return replace(self, callback=lambda percent, stage: callback(percent, prefix + stage))
