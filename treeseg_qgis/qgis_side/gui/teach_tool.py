"""Click-to-teach on the map canvas: left click marks a tree, Shift+click or right click a non-tree; when several
classes are taught (`label` set), left click marks the chosen class and Shift+click or right click "other".

Each click is shown as a marker (yellow circle: the class; red cross: not a tree; a class's colour when several
are taught),
transformed from the canvas CRS into the CRS of the raster the engine reads and
turned into a pixel position (column, row from the top-left corner) with the
inverse of its GDAL geotransform (`raster_input.RasterGrid`, which Processing's teach uses for its points too).
"""

from __future__ import annotations

from dataclasses import dataclass

from qgis.core import QgsCoordinateTransform, QgsCsException, QgsPointXY, QgsProject
from qgis.gui import QgsMapCanvas, QgsMapMouseEvent, QgsMapTool, QgsVertexMarker
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor

from ..raster_input import RasterGrid

TREE_COLOUR = QColor(255, 221, 0)
"""Yellow: it stands out on the green fills of trees and of the taught layers, where green did not."""
NOT_TREE_COLOUR = QColor(230, 30, 30)
OTHER_CLASS = "other"
"""The class of a Shift+click or right click while several classes are taught."""
MARKER_SIZE = 14
MARKER_PEN_WIDTH = 3


@dataclass
class TeachExample:
    """One click: where it is in the grid's CRS and in pixels, what it says, and its marker."""

    point: QgsPointXY
    column: float
    row: float
    is_tree: bool
    marker: QgsVertexMarker
    label: str | None = None
    """Its class when several classes are taught; None: an example of the one class (`is_tree`) or not."""


class TeachMapTool(QgsMapTool):
    """Collects tree / not-tree example clicks on a raster grid; `examples_changed` after every change,
    `click_ignored` after a click off the grid."""

    examples_changed = pyqtSignal()
    click_ignored = pyqtSignal()

    def __init__(self, canvas: QgsMapCanvas) -> None:
        super().__init__(canvas)
        self.setCursor(Qt.CursorShape.CrossCursor)
        self.grid: RasterGrid | None = None
        self.examples: list[TeachExample] = []
        self.label: str | None = None
        """The class a left click marks while several classes are taught; None: one class against others."""
        self.colours: dict[str, QColor] = {}
        """The marker colour of each class taught at once."""
        canvas.destinationCrsChanged.connect(self._place_markers)

    def set_grid(self, grid: RasterGrid) -> None:
        """Teach on `grid` from now on; the examples of another grid are cleared."""
        if grid != self.grid:
            self.clear()
        self.grid = grid

    def canvasReleaseEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802 - Qt override
        """Left click: a tree (or the chosen class); Shift+left click or right click: not a tree (or "other")."""
        if event.button() == Qt.MouseButton.LeftButton:
            is_tree = not event.modifiers() & Qt.KeyboardModifier.ShiftModifier
        elif event.button() == Qt.MouseButton.RightButton:
            is_tree = False
        else:
            return
        label = None if self.label is None else self.label if is_tree else OTHER_CLASS
        if not self.add_example(event.mapPoint(), is_tree, label):
            self.click_ignored.emit()

    def add_example(self, map_point: QgsPointXY, is_tree: bool, label: str | None = None) -> bool:
        """Add an example at `map_point` (canvas CRS), of class `label` when several are taught; False, and
        nothing added, when it is off the grid."""
        if self.grid is None:
            return False
        try:
            point = self._to_grid().transform(map_point)
        except QgsCsException:
            return False
        column, row = self.grid.pixel(point)
        if not self.grid.contains(column, row):
            return False
        marker = QgsVertexMarker(self.canvas())
        marker.setIconType(QgsVertexMarker.IconType.ICON_CIRCLE if is_tree else QgsVertexMarker.IconType.ICON_X)
        marker.setColor(self.colours.get(label, NOT_TREE_COLOUR) if label else
                        TREE_COLOUR if is_tree else NOT_TREE_COLOUR)
        marker.setIconSize(MARKER_SIZE)
        marker.setPenWidth(MARKER_PEN_WIDTH)
        marker.setCenter(map_point)
        self.examples.append(TeachExample(point, column, row, is_tree, marker, label))
        self.examples_changed.emit()
        return True

    def pixel_examples(self) -> list[tuple[float, float, bool]]:
        """The examples of the one class and of others as the engine takes them: (column, row, is_tree)."""
        return [(example.column, example.row, example.is_tree) for example in self.examples if not example.label]

    def class_examples(self, classes: list[str]) -> list[tuple[float, float, str]]:
        """The examples of `classes` taught at once as the engine takes them, (column, row, class), in the order
        of `classes` (the engine numbers the classes in the order they first appear)."""
        labelled = [example for example in self.examples if example.label in classes]
        labelled.sort(key=lambda example: classes.index(example.label))
        return [(example.column, example.row, example.label) for example in labelled]

    def counts(self) -> tuple[int, int]:
        """(tree examples, not-tree examples), those of several classes aside."""
        trees = sum(example.is_tree for example in self.examples if not example.label)
        return trees, sum(not example.label for example in self.examples) - trees

    def class_counts(self) -> dict[str, int]:
        """The number of examples of each class taught at once."""
        counts: dict[str, int] = {}
        for example in self.examples:
            if example.label:
                counts[example.label] = counts.get(example.label, 0) + 1
        return counts

    def set_colours(self, colours: dict[str, QColor]) -> None:
        """The marker colour of each class taught at once; the markers already placed take it."""
        self.colours = colours
        for example in self.examples:
            if example.label in colours:
                example.marker.setColor(colours[example.label])

    def remove_class(self, label: str) -> None:
        """Remove the examples of class `label` and their markers."""
        for example in [example for example in self.examples if example.label == label]:
            self.canvas().scene().removeItem(example.marker)
            self.examples.remove(example)
        self.examples_changed.emit()

    def clear(self) -> None:
        """Remove every example and its marker."""
        for example in self.examples:
            self.canvas().scene().removeItem(example.marker)
        self.examples = []
        self.examples_changed.emit()

    def _to_grid(self) -> QgsCoordinateTransform:
        return QgsCoordinateTransform(self.canvas().mapSettings().destinationCrs(), self.grid.crs,
                                      QgsProject.instance())

    def _place_markers(self) -> None:
        """Keep the markers on their places when the canvas CRS changes."""
        if self.grid is None:
            return
        to_canvas = QgsCoordinateTransform(self.grid.crs, self.canvas().mapSettings().destinationCrs(),
                                           QgsProject.instance())
        for example in self.examples:
            try:
                example.marker.setCenter(to_canvas.transform(example.point))
                example.marker.show()
            except QgsCsException:
                example.marker.hide()
