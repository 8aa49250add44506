"""Files written whole or not at all (atomic.py, the one helper both sides use): a failure or a stop leaves the
file as it was and nothing beside it; a target that is not a regular file is refused in one line."""

import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from treeseg_qgis.atomic import atomic_file, partial_path, write_atomically
from treeseg_qgis.engine.core.errors import Cancelled, OutputError, cannot_write
from treeseg_qgis.outputs import COMMIT_JOURNAL, OutputTransaction

from .conftest import REPO, write_geotiff


def test_a_complete_write_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "record.json"
    target.write_text("old")
    write_atomically(target, "new — ü")
    assert target.read_text(encoding="utf-8") == "new — ü"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["record.json"]


def test_a_stop_while_writing_keeps_the_old_file_and_removes_the_partial_one(tmp_path):
    target = tmp_path / "clusters.tif"
    target.write_bytes(b"old")
    with pytest.raises(Cancelled), atomic_file(target) as partial:
        with open(partial, "wb") as file:
            file.write(b"half")
        with open(partial + ".aux.xml", "w") as sidecar:
            sidecar.write("<PAMDataset/>")
        raise Cancelled()
    assert target.read_bytes() == b"old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["clusters.tif"]


def test_a_failed_write_keeps_the_earlier_file_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("earlier")
    with pytest.raises(TypeError):
        write_atomically(target, {"not": "text or bytes"})
    assert target.read_text() == "earlier"
    assert not os.path.exists(partial_path(target))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["summary.json"]


def test_a_folder_that_cannot_take_the_file_is_one_output_error_naming_it(tmp_path):
    target = tmp_path / "missing" / "report.html"
    with pytest.raises(OutputError, match=r"^Cannot write the report .*: No such file or directory\.$"), \
            cannot_write(f"the report {target}"):
        write_atomically(target, "<html/>")
    assert partial_path(target).endswith("report.partial.html")


@pytest.mark.parametrize("special", ["pipe", "folder"])
def test_a_pipe_or_folder_as_the_target_is_refused_before_anything_is_written(tmp_path, special):
    target = tmp_path / "record.json"
    os.mkfifo(target) if special == "pipe" else target.mkdir()
    with pytest.raises(OSError, match="not a regular file"):
        write_atomically(target, "{}")
    assert stat.S_ISFIFO(target.stat().st_mode) if special == "pipe" else target.is_dir()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["record.json"]


def test_the_command_line_refuses_a_pipe_as_a_report_in_one_line(tmp_path):
    mask = np.zeros((40, 40), np.uint8)
    mask[5:15, 5:15] = 1
    prediction = write_geotiff(tmp_path / "trees.tif", mask[None])
    (tmp_path / "boxes.csv").write_text("xmin,ymin,xmax,ymax,label\n5,5,15,15,Tree\n")
    (tmp_path / "out").mkdir()
    pipe = tmp_path / "out" / "trees_evaluation.csv"
    os.mkfifo(pipe)
    result = subprocess.run([sys.executable, "-m", "treeseg_qgis", "evaluate", str(prediction), "--reference",
                             str(tmp_path / "boxes.csv"), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip() == f"treeseg: error: The output {pipe} exists and is not a regular file (a " \
                                    "folder, pipe or device): choose another output folder or name."
    assert stat.S_ISFIFO(pipe.stat().st_mode) and sorted(os.listdir(tmp_path / "out")) == [pipe.name]


def test_a_commit_whose_journal_cannot_be_written_moves_nothing_and_leaves_no_temporary_file(tmp_path):
    """outputs.py (the QGIS side's module too) writes the transaction's journal with the helper: a journal that
    cannot be written (here its name is taken by a folder) stops the commit before any file moves."""
    final = tmp_path / "scene_trees.tif"
    final.write_bytes(b"earlier")
    transaction = OutputTransaction([final])
    staged = transaction.staged(final)
    staged.write_bytes(b"new")
    (staged.parent / COMMIT_JOURNAL).mkdir()
    with pytest.raises(OSError, match="not a regular file"):
        transaction.commit([final], [])
    assert sorted(os.listdir(staged.parent)) == sorted([COMMIT_JOURNAL, final.name, "owner.lock"])
    transaction.abort()
    assert final.read_bytes() == b"earlier" and sorted(os.listdir(tmp_path)) == [final.name]
