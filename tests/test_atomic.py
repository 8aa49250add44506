"""Files written whole or not at all (engine/core/atomic.py): a failure or a stop leaves the file as it was."""

import pytest

from treeseg_qgis.engine.core.atomic import atomic_file, partial_path, write_atomically
from treeseg_qgis.engine.core.errors import Cancelled, OutputError


def test_a_complete_write_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "record.json"
    target.write_text("old")
    write_atomically(target, "new — ü")
    assert target.read_text(encoding="utf-8") == "new — ü"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["record.json"]


def test_a_stop_while_writing_keeps_the_old_file_and_removes_the_partial_one(tmp_path):
    target = tmp_path / "clusters.tif"
    target.write_bytes(b"old")
    with pytest.raises(Cancelled), atomic_file(target, "the clusters") as partial:
        with open(partial, "wb") as file:
            file.write(b"half")
        with open(partial + ".aux.xml", "w") as sidecar:
            sidecar.write("<PAMDataset/>")
        raise Cancelled()
    assert target.read_bytes() == b"old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["clusters.tif"]


def test_a_folder_that_cannot_take_the_file_is_one_output_error_naming_it(tmp_path):
    target = tmp_path / "missing" / "report.html"
    with pytest.raises(OutputError, match=r"^Cannot write the report .*: No such file or directory\.$"):
        write_atomically(target, "<html/>", f"the report {target}")
    assert partial_path(target).endswith("report.partial.html")
