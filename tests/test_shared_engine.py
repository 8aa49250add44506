"""One warm engine per QGIS session: Processing runs and the panel share one real worker that keeps its model,
their jobs take turns, a job cancelled while it waits never starts, a killed worker is replaced for the next
job, and a worker that speaks another protocol is one clear error."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from treeseg_qgis import protocol
from treeseg_qgis.params import SegmentationParams
from treeseg_qgis.qgis_side.engine_client import (
    ENGINE_PYTHON_ENV,
    WAITING_STAGE,
    EngineClient,
    EngineError,
    JobWatch,
    close_shared_engines,
    shared_engine,
)

from .conftest import disc_scene, write_geotiff
from .test_gui import wait_until
from .test_processing import provider, run, tiny_run  # noqa: F401 - provider: the fixture that registers treeseg

OLDER_WORKER = """\
import runpy

import treeseg_qgis.protocol

treeseg_qgis.protocol.PROTOCOL_VERSION = 1  # the engine of an older plugin
runpy.run_module("treeseg_qgis.engine.worker", run_name="__main__")
"""


@pytest.fixture(autouse=True)
def no_shared_engine_left():
    close_shared_engines()
    yield
    close_shared_engines()


@pytest.fixture
def second_tif(tmp_path) -> Path:
    image, _ = disc_scene(192, 256, [(90, 120)], radius=40, seed=1)
    return write_geotiff(tmp_path / "second.tif", image)


def panel_params(tiny_model_dir: Path, input_path: Path, out: Path) -> SegmentationParams:
    """What the panel sends for a small run."""
    return SegmentationParams(str(input_path), str(out), model=str(tiny_model_dir), device="cpu", tile_size=128,
                              overlap=32, clusters=2, use_cache=False)


def feature_state(results: dict) -> str:
    return json.loads(Path(results["RUN_RECORD"]).read_text())["feature_cache"]["state"]


def test_processing_runs_share_one_worker_that_loads_the_model_once(provider, tiny_model_dir,  # noqa: F811
                                                                    scene_tif, second_tif, tmp_path):
    first, _ = scene_tif
    results = run(tiny_run(tiny_model_dir, first, tmp_path / "first"))
    engine = shared_engine(sys.executable)
    worker = engine.pid
    again = run(tiny_run(tiny_model_dir, second_tif, tmp_path / "second"))

    assert results["K"] == 2 and again["K"] == 2
    assert feature_state(again) != "hit"  # the second raster ran the model, the one the first run loaded
    assert engine.pid == worker
    assert engine.probe()["model_loads"] == 1


def test_a_panel_run_and_a_processing_run_at_once_both_finish_one_after_the_other(
        provider, qgis_iface, qgis_new_project, tiny_model_dir, scene_tif, second_tif, tmp_path):  # noqa: F811
    from qgis.core import QgsApplication, QgsProcessingFeedback, QgsRasterLayer, QgsTask

    from treeseg_qgis.qgis_side.gui.task import SegmentationTask
    from treeseg_qgis.qgis_side.plugin import configured_engine

    engine = configured_engine()
    assert engine is shared_engine(sys.executable)  # the panel's engine is Processing's
    path, _ = scene_tif
    task = SegmentationTask(engine, panel_params(tiny_model_dir, path, tmp_path / "panel"),
                            QgsRasterLayer(str(path), "scene"), qgis_iface.messageBar())
    QgsApplication.taskManager().addTask(task)
    wait_until(lambda: task.progress() > 0)
    panel_done_when_processing_started: list[bool] = []
    texts: list[str] = []

    class Watch(QgsProcessingFeedback):
        def setProgress(self, progress: float) -> None:  # noqa: N802 - the Qt name
            if progress > 0 and not panel_done_when_processing_started:  # 0: the waiting notice
                panel_done_when_processing_started.append(task.record is not None)
            super().setProgress(progress)

        def setProgressText(self, text: str) -> None:  # noqa: N802 - the Qt name
            texts.append(text)
            super().setProgressText(text)

    results = run(tiny_run(tiny_model_dir, second_tif, tmp_path / "processing"), feedback=Watch())
    wait_until(lambda: task.status() in (QgsTask.TaskStatus.Complete, QgsTask.TaskStatus.Terminated))

    assert task.status() == QgsTask.TaskStatus.Complete and task.record.clusters.k == 2
    assert results["K"] == 2 and Path(results["OUTPUT_CLUSTERS"]).is_file()
    assert panel_done_when_processing_started == [True] and texts[0] == WAITING_STAGE
    assert engine.probe()["model_loads"] == 1


def test_a_waiting_job_cancelled_never_runs_and_the_running_one_goes_on(qgis_iface, qgis_new_project,
                                                                       tiny_model_dir, scene_tif, tmp_path):
    from qgis.core import QgsApplication, QgsRasterLayer, QgsTask

    from treeseg_qgis.qgis_side.gui.task import SegmentationTask

    engine = shared_engine(sys.executable)
    path, _ = scene_tif
    engine.probe()
    running_holds, queued_cancelled = threading.Event(), threading.Event()

    def hold_until_the_queued_job_is_cancelled(percent: float, stage: str) -> None:
        if not running_holds.is_set():
            running_holds.set()
            queued_cancelled.wait(120)

    outcome: list = []
    running = threading.Thread(target=lambda: outcome.append(engine.segment(
        panel_params(tiny_model_dir, path, tmp_path / "running"),
        JobWatch(on_progress=hold_until_the_queued_job_is_cancelled))))
    running.start()
    try:
        assert running_holds.wait(120)
        task = SegmentationTask(engine, panel_params(tiny_model_dir, path, tmp_path / "queued"),
                                QgsRasterLayer(str(path), "scene"), qgis_iface.messageBar())
        stages: list[str] = []
        task.stage_changed.connect(stages.append)
        QgsApplication.taskManager().addTask(task)
        wait_until(lambda: engine.jobs_waiting == 1 and stages == [WAITING_STAGE])  # the panel says it waits
        task.cancel()
        wait_until(lambda: task.status() == QgsTask.TaskStatus.Terminated)
        assert running.is_alive()  # the queued job gave up while the running one still ran
    finally:
        queued_cancelled.set()
        running.join(120)

    assert task.error.kind == protocol.ErrorKind.CANCELLED and "before it started" in str(task.error)
    assert not (tmp_path / "queued").exists()
    assert outcome and outcome[0].clusters.k == 2 and Path(outcome[0].outputs["clusters"]).is_file()
    assert engine.probe()["jobs_served"] == 2  # the first probe and the running job: the queued one never came


def test_after_the_worker_is_killed_the_next_processing_run_gets_a_new_one(provider, tiny_model_dir,  # noqa: F811
                                                                           scene_tif, tmp_path):
    path, _ = scene_tif
    run(tiny_run(tiny_model_dir, path, tmp_path / "first"))
    engine = shared_engine(sys.executable)
    killed = engine.pid
    os.kill(killed, signal.SIGKILL)
    wait_until(lambda: not engine.running, 30)

    results = run(tiny_run(tiny_model_dir, path, tmp_path / "second"))

    assert results["K"] == 2 and Path(results["OUTPUT_CLUSTERS"]).is_file()
    assert engine.pid not in (None, killed)


def older_engine_python(tmp_path: Path) -> Path:
    """An engine Python whose worker announces protocol 1, as an older plugin's does."""
    script = tmp_path / "older_worker.py"
    script.write_text(OLDER_WORKER)
    python = tmp_path / "older-engine-python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}"\n')
    python.chmod(0o755)
    return python


def test_an_engine_speaking_another_protocol_is_one_clear_error(tmp_path):
    engine = EngineClient(str(older_engine_python(tmp_path)))
    started = time.monotonic()
    with pytest.raises(EngineError) as caught:
        engine.probe()
    assert caught.value.kind == protocol.ErrorKind.PROTOCOL
    assert str(caught.value) == (f"The engine speaks protocol 1, this plugin {protocol.PROTOCOL_VERSION}: open "
                                 "Raster ▸ TreeSeg (DINOv3) ▸ Set up the engine… and Repair.")
    assert time.monotonic() - started < 60 and not engine.running


def test_processing_with_an_older_engine_says_repair(provider, scene_tif, tiny_model_dir, tmp_path,  # noqa: F811
                                                     monkeypatch):
    from qgis.core import QgsProcessingException

    monkeypatch.setenv(ENGINE_PYTHON_ENV, str(older_engine_python(tmp_path)))
    path, _ = scene_tif
    with pytest.raises(QgsProcessingException, match=r"The engine speaks protocol 1, this plugin \d+: .* Repair"):
        run(tiny_run(tiny_model_dir, path, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_the_first_message_names_the_version_an_engine_speaks():
    assert protocol.announced_version(protocol.decode(protocol.encode(protocol.hello(7)))) == protocol.PROTOCOL_VERSION
    assert protocol.announced_version({"type": "ready", "protocol": 1, "pid": 7}) == 1  # as version 1 said it
    assert protocol.announced_version(protocol.decode("Traceback (most recent call last):")) is None
    assert protocol.mismatch_message(None).startswith("The engine speaks no known protocol, this plugin ")
