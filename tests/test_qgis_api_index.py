"""The QGIS API check (scripts/qgis_api_index.py): every QGIS class, method, enum and signal the plugin names
resolves in the QGIS that runs the suite (3.22 and 3.44 in make test), and an index built from QGIS's bindings
text (.sip.in, as QGIS 4's python/PyQt6 holds it) finds each kind of name the plugin could get wrong."""

from __future__ import annotations

import gzip
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("qgis_api_index", REPO / "scripts" / "qgis_api_index.py")
api = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(api)

# Bindings text in the .sip.in form (written for this test): enums scoped and unscoped, a flags typedef, a
# nested class, a signal, one member deprecated by annotation and one by its docstring, private members.
DEMO_SIP = """
class QgsDemoTask : QObject
{
%Docstring(signature="appended")
A demonstration task.
%End

%TypeHeaderCode
#include "qgsdemotask.h"
%End
  public:

    enum class Status /BaseType=IntEnum/
    {
      Queued,
      Running,
      Complete
    };

    enum Flag /BaseType=IntFlag/
    {
      CanCancel,
      Hidden = 1 << 1,
    };
    typedef QFlags<QgsDemoTask::Flag> Flags;

    QgsDemoTask( const QString &description = QString() );
    virtual bool run() = 0;
    void setProgress( double progress );
    void oldProgress( double progress ) /Deprecated="Since 4.0. Use setProgress()."/;
    double legacyValue() const;
%Docstring
A legacy value.

.. deprecated:: 3.40
   Use setProgress() instead.
%End
    static const QString VERSION_NAME;

    class Options
    {
      public:
        int retries;
    };

  signals:
    void progressChanged( double progress );

  protected:
    virtual void finishedInternal( bool ok );

  private:
    QgsDemoTask( const QgsDemoTask &rh );
    void secretMethod();
};

class QgsDemoSubTask : QgsDemoTask
{
  public:
    void subStep();
};
"""


@pytest.fixture
def demo_index(tmp_path) -> dict:
    folder = tmp_path / "python" / "PyQt6" / "core" / "auto_generated"
    folder.mkdir(parents=True)
    (folder / "qgsdemotask.sip.in").write_text(DEMO_SIP, encoding="utf-8")
    return api.build(api.folder_sip_files(tmp_path), {"repository": "qgis/QGIS", "tag": "demo-4_0", "commit": ""})


def names_in(tmp_path: Path, source: str) -> dict:
    path = tmp_path / "plugin_snippet.py"
    path.write_text(source, encoding="utf-8")
    return api.plugin_names([path])


def test_the_index_holds_members_signals_enums_and_deprecations_but_nothing_private(demo_index):
    task = demo_index["classes"]["QgsDemoTask"]
    assert task["bases"] == ["QObject"]
    assert {"run", "setProgress", "oldProgress", "legacyValue", "VERSION_NAME", "Options", "Flags", "Status", "Flag",
            "finishedInternal"} <= set(task["members"])
    assert "secretMethod" not in task["members"] and task["signals"] == ["progressChanged"]
    assert task["enums"] == {"Status": ["Queued", "Running", "Complete"], "Flag": ["CanCancel", "Hidden"]}
    assert task["deprecated"] == ["legacyValue", "oldProgress"]
    assert demo_index["classes"]["QgsDemoTask.Options"]["members"] == ["retries"]
    assert demo_index["classes"]["QgsDemoSubTask"]["bases"] == ["QgsDemoTask"]


def test_names_the_index_has_pass_and_deprecated_ones_are_reported(tmp_path, demo_index):
    names = names_in(tmp_path, (
        "from qgis.core import QgsDemoSubTask, QgsDemoTask\n"
        "STATUS = QgsDemoTask.Status.Complete\n"
        "class Job(QgsDemoSubTask):\n"
        "    def finishedInternal(self, ok):\n"
        "        self.setProgress(100)\n"
        "        self.progressChanged.emit(100)\n"
        "        self.oldProgress(1)\n"
        "        return super().subStep()\n"))
    assert ("QgsDemoSubTask", "setProgress") in names and ("QgsDemoSubTask", "finishedInternal") in names
    assert api.missing(names, demo_index) == []
    assert [line.split(": ", 1)[1] for line in api.deprecated(names, demo_index)] == [
        "QgsDemoSubTask.oldProgress is deprecated in QGIS demo-4_0"]


@pytest.mark.parametrize(("source", "expected"), [
    ("from qgis.core import QgsDemoTask\nclass Job(QgsDemoTask):\n    def step(self):\n"
     "        self.setProgression(1)\n", "QgsDemoTask.setProgression is not there"),
    ("from qgis.core import QgsDemoTask\nclass Job(QgsDemoTask):\n    def finishedLater(self, ok):\n"
     "        pass\n", "QgsDemoTask.finishedLater is not there"),
    ("from qgis.core import QgsDemoTask\nFLAG = QgsDemoTask.CanCancel\n", "QgsDemoTask.CanCancel is an unscoped enum"),
    ("from qgis.core import QgsDemoTask\nSTATUS = QgsDemoTask.Status.Paused\n", "QgsDemoTask.Status.Paused is not in"),
    ("from qgis.core import QgsGoneTask\n", "QgsGoneTask is not in QGIS demo-4_0"),
])
def test_each_kind_of_name_the_index_lacks_is_reported(tmp_path, demo_index, source, expected):
    lines = api.missing(names_in(tmp_path, source), demo_index)
    assert len(lines) == 1 and expected in lines[0] and lines[0].startswith(f"{tmp_path / 'plugin_snippet.py'}:")


def test_every_qgis_name_the_plugin_uses_is_in_the_running_qgis(qgis_app):
    names = api.plugin_names()
    assert len(names) > 100 and ("QgsProcessingAlgorithm", "processAlgorithm") in names
    assert api.missing_live(names) == []


def test_a_method_the_running_qgis_lacks_fails_the_live_check(qgis_app, tmp_path):
    copy = tmp_path / "qgis_side"
    shutil.copytree(REPO / "treeseg_qgis" / "qgis_side", copy, ignore=shutil.ignore_patterns("__pycache__"))
    algorithm = copy / "processing" / "engine_algorithm.py"
    text = algorithm.read_text(encoding="utf-8")
    assert "self.parameterAsRasterLayer(" in text
    algorithm.write_text(text.replace("self.parameterAsRasterLayer(", "self.parameterAsRasterLayers(", 1),
                         encoding="utf-8")
    lines = api.missing_live(api.plugin_names([copy]))
    assert len(lines) == 1 and "QgsProcessingAlgorithm.parameterAsRasterLayers is not in this QGIS" in lines[0]


def test_the_index_is_built_from_a_git_tag_and_records_it(tmp_path):
    work = tmp_path / "qgis"
    folder = work / "python" / "PyQt6" / "gui" / "auto_generated"
    folder.mkdir(parents=True)
    (folder / "qgsdemotask.sip.in").write_text(DEMO_SIP, encoding="utf-8")
    git = ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(work)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "sip"], check=True)
    subprocess.run([*git, "tag", "final-4_0_0"], check=True)
    (folder / "qgsdemotask.sip.in").write_text("class QgsLaterOnly\n{\n};\n", encoding="utf-8")  # not at the tag
    out = tmp_path / "index.json.gz"
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "qgis_api_index.py"), "build", "--git",
                          str(work / ".git"), "--tag", "final-4_0_0", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    index = api.read_index(out)
    commit = subprocess.run([*git, "rev-parse", "final-4_0_0"], capture_output=True, text=True).stdout.strip()
    assert index["source"] == {"repository": "qgis/QGIS", "tag": "final-4_0_0", "commit": commit, "sip_files": "1"}
    assert "QgsDemoTask" in index["classes"] and "QgsLaterOnly" not in index["classes"]
    assert list(tmp_path.glob("*.partial")) == []


def test_a_damaged_index_or_an_empty_source_is_refused_in_one_line(tmp_path):
    damaged = tmp_path / "damaged.json.gz"
    damaged.write_bytes(gzip.compress(b'{"classes": [1, 2]')[:-5])
    script = [sys.executable, str(REPO / "scripts" / "qgis_api_index.py")]
    run = subprocess.run([*script, "check", str(damaged)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "is not a QGIS API index" in run.stderr
    (tmp_path / "empty").mkdir()
    run = subprocess.run([*script, "build", "--folder", str(tmp_path / "empty"), "--tag", "x", "--out",
                          str(tmp_path / "out.json.gz")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "no .sip.in files found" in run.stderr
    assert not (tmp_path / "out.json.gz").exists()


# ---- the committed QGIS 4.x index (tests/data/qgis4_api.json.gz, built from tests/data/qgis4_bindings) ----

QGIS4_INDEX = REPO / "tests" / "data" / "qgis4_api.json.gz"
QGIS4_BINDINGS = REPO / "tests" / "data" / "qgis4_bindings"


def test_the_committed_qgis4_index_is_what_its_bindings_digest_builds_and_records_where_each_file_came_from():
    index = api.read_index(QGIS4_INDEX)
    source, listed = api.read_provenance(QGIS4_BINDINGS)
    assert index == api.build(api.folder_sip_files(QGIS4_BINDINGS), source, listed)
    assert index["source"]["repository"] == "qgis/QGIS" and index["source"]["tag"].startswith("4.x")
    assert all(len(commit) == 40 for commit in index["source"]["read"].values())
    assert all(len(entry["commit"]) == 40 for entry in listed.values())
    assert not index["classes"]["QgsProcessingAlgorithm"].get("listed")
    assert index["classes"]["QgsProject"]["listed"].endswith("@9d8f89bb2fb6132ad2568bc7ba6e6014ea11d676")


def test_every_qgis_name_the_plugin_uses_is_in_the_qgis4_index_and_what_it_cannot_judge_is_reported():
    index = api.read_index(QGIS4_INDEX)
    names = api.plugin_names()
    assert api.missing(names, index) == []
    assert api.deprecated(names, index) == []  # none of the names read from 4.x is deprecated there
    # A real QGIS 4 difference, reported rather than failed: 4.0 made this method non-virtual (it calls
    # supportedOutputRasterLayerFormatAndExtensions instead), so the provider's override only restricts 3.x
    # dialogs to GeoTIFF (the algorithms write GeoTIFF on every version: engine_algorithm.file_destination).
    assert [line.split(": ", 1)[1].split(" is ")[0] for line in api.nonvirtual_overrides(names, index)] == [
        "QgsProcessingProvider.supportedOutputRasterLayerExtensions"]
    notes = api.unchecked(names, index)
    print("\n".join(notes))  # what the index only lists: shown with pytest -s
    assert any("Qgis.MessageLevel.Critical is unchecked" in line for line in notes)


def test_a_method_qgis4_lacks_and_a_deprecated_one_are_reported_against_the_committed_index(tmp_path):
    copy = tmp_path / "qgis_side"
    shutil.copytree(REPO / "treeseg_qgis" / "qgis_side", copy, ignore=shutil.ignore_patterns("__pycache__"))
    algorithm = copy / "processing" / "engine_algorithm.py"
    text = algorithm.read_text(encoding="utf-8")
    assert "self.parameterAsRasterLayer(" in text
    algorithm.write_text(text.replace("self.parameterAsRasterLayer(", "self.parameterAsRasterLayers(", 1),
                         encoding="utf-8")
    (copy / "processing" / "old_api.py").write_text(
        "from qgis.core import QgsProcessingAlgorithm\n\n\nclass Old(QgsProcessingAlgorithm):\n"
        "    def fields(self, parameters, context):\n        return self.parameterAsFields(parameters, 'F', context)\n",
        encoding="utf-8")
    index = api.read_index(QGIS4_INDEX)
    names = api.plugin_names([copy])
    lines = api.missing(names, index)
    assert len(lines) == 1 and "QgsProcessingAlgorithm.parameterAsRasterLayers is not there in QGIS 4.x" in lines[0]
    assert [line.split(": ", 1)[1] for line in api.deprecated(names, index)] == [
        f"QgsProcessingAlgorithm.parameterAsFields is deprecated in QGIS {index['source']['tag']}"]


def test_a_damaged_provenance_file_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "bindings"
    shutil.copytree(QGIS4_BINDINGS, folder)
    (folder / "PROVENANCE.json").write_text('{"repository": "qgis/QGIS", "tag": "x"', encoding="utf-8")
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "qgis_api_index.py"), "build", "--folder",
                          str(folder), "--out", str(tmp_path / "out.json.gz")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "is not a provenance file" in run.stderr
    assert not (tmp_path / "out.json.gz").exists()
