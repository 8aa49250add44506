"""Examples a user points at (plain data, no torch: the QGIS side reads them too)."""

from __future__ import annotations

from dataclasses import dataclass

OTHER = "other"
CLASS_FIELD = "class"


@dataclass(frozen=True)
class Example:
    """A clicked location in pixel coordinates (column, row from the top-left corner).

    `is_tree`: an example of the one class taught (against something else); `label`: the class name when
    several classes are taught at once (then `is_tree` is not used)."""

    col: float
    row: float
    is_tree: bool = True
    label: str | None = None


def class_label(value: object) -> str | None:
    """A class field's value as a class name: trimmed text, None when empty."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None
