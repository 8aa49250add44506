"""Processing's real batch dialog for treeseg:segmenttrees: its columns are as wide as their widgets need, not
widened by long headers (QGIS heads each column with the parameter's description)."""

from __future__ import annotations

import pytest

from .test_processing import provider  # noqa: F401 - the fixture that registers the treeseg provider


@pytest.fixture
def batch_dialog(provider, qgis_iface):  # noqa: F811
    """segmenttrees's batch dialog as the toolbox opens it ("Execute as Batch Process…"), shown."""
    from processing.gui.BatchAlgorithmDialog import BatchAlgorithmDialog
    from qgis.core import QgsApplication

    dialog = BatchAlgorithmDialog(provider.algorithm("segmenttrees").create(), parent=qgis_iface.mainWindow())
    dialog.show()
    QgsApplication.processEvents()
    yield dialog
    dialog.close()


def widened_by_header(table) -> dict[str, tuple[int, int]]:
    """The visible columns (but the last, which stretches) whose header needs more width than QGIS's minimum
    column and their cells: header text → (what the header needs, what the cells need)."""
    header = table.horizontalHeader()
    wide = {}
    for column in range(table.columnCount() - 1):
        needed = max(header.minimumSectionSize(), table.sizeHintForColumn(column))
        if not table.isColumnHidden(column) and header.sectionSizeHint(column) > needed:
            wide[table.horizontalHeaderItem(column).text()] = (header.sectionSizeHint(column), needed)
    return wide


def test_no_header_widens_a_column_of_the_batch_dialog(batch_dialog):
    from qgis.core import QgsApplication

    panel = batch_dialog.mainWidget()
    table = panel.tblParameters
    header = table.horizontalHeader()
    essentials_width = header.length()
    assert widened_by_header(table) == {}
    assert all(header.sectionSize(column) <= max(header.minimumSectionSize(), table.sizeHintForColumn(column))
               for column in range(table.columnCount() - 1) if not table.isColumnHidden(column))
    panel.btnAdvanced.setChecked(True)
    QgsApplication.processEvents()
    assert header.length() > essentials_width
    assert widened_by_header(table) == {}
    print(f"\nbatch dialog columns: {essentials_width} px, with the advanced ones {header.length()} px")
