"""Examples a user points at (plain data, no torch: the QGIS side reads them too)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """A clicked location in pixel coordinates (column, row from the top-left corner)."""

    col: float
    row: float
    is_tree: bool
