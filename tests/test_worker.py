"""The engine worker process driven by EngineClient, as the QGIS task and Processing drive it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from treeseg_qgis.params import SegmentationParams
from treeseg_qgis.qgis_side.engine_client import EngineClient, EngineError, JobWatch


@pytest.fixture
def client(tmp_path):
    engine = EngineClient(sys.executable, {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    yield engine
    engine.close()


def job(tiny_model_dir, input_path, out, **options) -> SegmentationParams:
    params = {"input_path": str(input_path), "output_dir": str(out), "model": str(tiny_model_dir),
              "device": "cpu", "tile_size": 128, "overlap": 32}
    params.update(options)
    return SegmentationParams(**params)


def test_segment_reports_progress_and_keeps_the_worker_alive(client, tiny_model_dir, scene_tif, tmp_path):
    path, _ = scene_tif
    progress = []
    record = client.segment(job(tiny_model_dir, path, tmp_path / "a", clusters=2),
                            JobWatch(on_progress=lambda percent, stage: progress.append((percent, stage))))
    assert record.clusters.k == 2
    assert os.path.isfile(record.outputs["clusters"])
    assert progress[-1][0] == 100.0 and any(stage.startswith("Extracting") for _, stage in progress)
    first_pid = client._process.pid
    again = client.segment(job(tiny_model_dir, path, tmp_path / "b", clusters=3))
    assert again.clusters.k == 3 and client._process.pid == first_pid


def test_probe_reports_the_device(client):
    info = client.probe()
    assert info["device"] == "cpu" and info["torch"]


def test_input_and_model_errors_come_back_as_kinds(client, tiny_model_dir, scene_tif, tmp_path):
    with pytest.raises(EngineError) as caught:
        client.segment(job(tiny_model_dir, tmp_path / "missing.tif", tmp_path / "out"))
    assert caught.value.kind == "input" and "missing.tif" in str(caught.value)
    path, _ = scene_tif
    with pytest.raises(EngineError) as caught:
        client.segment(job("large", path, tmp_path / "out"))
    assert caught.value.kind == "model" and "huggingface.co/facebook/dinov3-vitl16" in str(caught.value)
    assert client.running


def test_cancel_stops_the_job_and_the_next_run_does_not_reload_the_model(client, tiny_model_dir, scene_tif,
                                                                          tmp_path):
    path, _ = scene_tif
    client.segment(job(tiny_model_dir, path, tmp_path / "first", clusters=2))
    worker = client._process.pid
    stages = []
    with pytest.raises(EngineError) as caught:
        client.segment(job(tiny_model_dir, path, tmp_path / "out", use_cache=False),
                       JobWatch(on_progress=lambda percent, stage: stages.append(stage),
                                is_cancelled=lambda: any(stage.startswith("Extracting") for stage in stages)))
    assert caught.value.kind == "cancelled"
    assert list((tmp_path / "out").iterdir()) == []
    assert client.running and client._process.pid == worker

    record = client.segment(job(tiny_model_dir, path, tmp_path / "again", clusters=2, use_cache=False))

    assert record.clusters.k == 2 and record.feature_cache.state != "hit"
    assert client._process.pid == worker
    assert client.probe()["model_loads"] == 1  # the model loaded by the first run served all three


def clusters_of(record: dict):
    from osgeo import gdal

    dataset = gdal.Open(record.outputs["clusters"])
    return dataset.GetRasterBand(1).ReadAsArray()


@pytest.fixture
def incomplete_model_dir(tiny_model_dir, tmp_path):
    """The tiny model's weights under a configuration with one layer more: its tensors are missing."""
    folder = tmp_path / "incomplete-model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("failing", ["missing folder", "untrained weights refused", "catalogue model not cached"])
def test_after_a_failed_model_load_the_warm_worker_runs_the_earlier_model_as_a_fresh_one(
        client, tiny_model_dir, incomplete_model_dir, scene_tif, tmp_path, failing):
    path, _ = scene_tif
    failing_model = {"missing folder": str(tmp_path / "no-such-model"),
                     "untrained weights refused": str(incomplete_model_dir),
                     "catalogue model not cached": "large"}[failing]
    client.segment(job(tiny_model_dir, path, tmp_path / "first", clusters=2, use_cache=False))
    worker = client._process.pid

    with pytest.raises(EngineError) as caught:
        client.segment(job(failing_model, path, tmp_path / "failed", clusters=2, use_cache=False))
    assert caught.value.kind == "model"
    again = client.segment(job(tiny_model_dir, path, tmp_path / "again", clusters=2, use_cache=False))

    assert client._process.pid == worker
    fresh = EngineClient(sys.executable, {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    try:
        expected = fresh.segment(job(tiny_model_dir, path, tmp_path / "fresh", clusters=2, use_cache=False))
    finally:
        fresh.close()
    assert again.clusters.k == expected.clusters.k == 2
    assert (clusters_of(again) == clusters_of(expected)).all()


def torch_is_loaded(pid: int) -> bool:
    """Whether torch's library is mapped into the process, as it is once torch was imported."""
    with open(f"/proc/{pid}/maps") as maps:
        return "libtorch" in maps.read()


@pytest.mark.parametrize("failing", ["cancelled", "model load failed"])
def test_a_worker_started_from_the_cached_int8_export_keeps_its_session_and_after_a_failed_job_runs_as_a_fresh_one(
        tiny_model_dir, scene_tif, tmp_path, failing):
    """With the int8 export cached, the worker runs without torch; it keeps the ONNX Runtime session for the next
    job, and after a job that failed its results are a fresh worker's."""
    path, _ = scene_tif
    environment = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}

    def int8_job(out: str, model=tiny_model_dir) -> SegmentationParams:
        return job(model, path, tmp_path / out, precision="int8", clusters=2, use_cache=False)

    engines = [EngineClient(sys.executable, environment) for _ in range(3)]
    building, warm, fresh = engines
    try:
        building.segment(int8_job("built"))  # exports the model into this test's export cache
        first = warm.segment(int8_job("first"))
        worker = warm._process.pid
        assert not torch_is_loaded(worker) and not first.model.untrained
        if failing == "cancelled":
            stages = []
            with pytest.raises(EngineError) as caught:
                warm.segment(int8_job("cancelled"),
                             JobWatch(on_progress=lambda percent, stage: stages.append(stage),
                                      is_cancelled=lambda: any(stage.startswith("Extracting") for stage in stages)))
            assert caught.value.kind == "cancelled"
            assert not torch_is_loaded(worker)
        else:
            with pytest.raises(EngineError) as caught:
                warm.segment(int8_job("failed", model=tmp_path / "no-such-model"))
            assert caught.value.kind == "model"
        again = warm.segment(int8_job("again"))
        expected = fresh.segment(int8_job("fresh"))
        assert not torch_is_loaded(fresh._process.pid)
        assert warm._process.pid == worker
        assert (clusters_of(again) == clusters_of(expected)).all() and (clusters_of(again) == clusters_of(first)).all()
        assert again.model == expected.model
        assert warm.probe()["model_loads"] == (1 if failing == "cancelled" else 2)  # the session kept across jobs
    finally:
        for engine in engines:
            engine.close()


def test_after_a_cancelled_first_load_of_another_model_the_warm_worker_runs_both(client, tiny_model_dir,
                                                                                 scene_tif, tmp_path):
    """A job cancelled while its model runs for the first time leaves that model usable, and the other one."""
    path, _ = scene_tif
    other_model = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other_model)
    client.segment(job(tiny_model_dir, path, tmp_path / "first", clusters=2))
    stages = []
    with pytest.raises(EngineError) as caught:
        client.segment(job(other_model, path, tmp_path / "cancelled", use_cache=False),
                       JobWatch(on_progress=lambda percent, stage: stages.append(stage),
                                is_cancelled=lambda: any(stage.startswith("Extracting") for stage in stages)))
    assert caught.value.kind == "cancelled"

    other = client.segment(job(other_model, path, tmp_path / "other", clusters=2, use_cache=False))
    first_again = client.segment(job(tiny_model_dir, path, tmp_path / "again", clusters=2, use_cache=False))

    assert other.clusters.k == first_again.clusters.k == 2
    assert os.path.isfile(first_again.outputs["clusters"])


def test_a_worker_that_does_not_answer_a_cancel_is_terminated(client, tiny_model_dir, scene_tif, tmp_path,
                                                              monkeypatch):
    from treeseg_qgis.qgis_side import engine_client

    monkeypatch.setattr(engine_client, "COOPERATIVE_CANCEL_SECONDS", 0.0)
    path, _ = scene_tif
    stages = []
    with pytest.raises(EngineError) as caught:
        client.segment(job(tiny_model_dir, path, tmp_path / "out"),
                       JobWatch(on_progress=lambda percent, stage: stages.append(stage),
                                is_cancelled=lambda: any(stage.startswith("Extracting") for stage in stages)))
    assert caught.value.kind == "cancelled"
    assert not client.running
    assert list((tmp_path / "out").iterdir()) == []


def test_a_killed_worker_is_a_message_and_the_next_job_works(client, tiny_model_dir, scene_tif, tmp_path):
    path, _ = scene_tif

    def kill_worker(percent, stage):
        if stage.startswith("Extracting") and client.running:
            os.kill(client._process.pid, signal.SIGKILL)

    with pytest.raises(EngineError) as caught:
        client.segment(job(tiny_model_dir, path, tmp_path / "out"), JobWatch(on_progress=kill_worker))
    assert caught.value.kind == "crash" and "SIGKILL" in str(caught.value)
    assert not any((tmp_path / "out").iterdir())
    record = client.segment(job(tiny_model_dir, path, tmp_path / "out", clusters=2))
    assert record.clusters.k == 2


def test_one_job_at_a_time(client, tiny_model_dir, scene_tif, tmp_path):
    path, _ = scene_tif
    nested = []

    def start_another(percent, stage):
        if not nested:
            with pytest.raises(EngineError) as caught:
                client.probe()
            nested.append(caught.value.kind)

    client.segment(job(tiny_model_dir, path, tmp_path / "out", clusters=2), JobWatch(on_progress=start_another))
    assert nested == ["busy"]


def test_the_end_of_a_stopped_worker_never_ends_the_next_workers_job(client):
    client.probe()
    stopped = client._process
    reap = stopped.wait

    def reaped_late(*args, **kwargs):
        time.sleep(0.5)
        return reap(*args, **kwargs)

    stopped.wait = reaped_late
    os.kill(stopped.pid, signal.SIGKILL)
    while stopped.poll() is None:
        time.sleep(0.01)
    outcome: list = []
    second_job = threading.Thread(target=lambda: outcome.append(client.probe()), daemon=True)
    second_job.start()
    second_job.join(timeout=60)
    assert outcome and outcome[0]["device"] == "cpu"


@pytest.mark.parametrize("params, named", [
    ({"input_path": "in.tif", "output_dir": "out", "clusters": 0}, "not 0"),
    ({"input_path": "in.tif", "output_dir": "out", "stride": 12}, "stride 12"),
    ({"input_path": "in.tif", "output_dir": "out", "colour": "red"}, "colour"),
])
def test_the_worker_refuses_invalid_parameters_as_an_input_error_naming_the_value(params, named):
    """A job from another sender (not validated by this EngineClient) is validated again in the worker."""
    jobs = json.dumps({"command": "segment", "params": params}) + "\n"
    finished = subprocess.run([sys.executable, "-m", "treeseg_qgis.engine.worker"], input=jobs, capture_output=True,
                              text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    messages = [json.loads(line) for line in finished.stdout.splitlines()]
    assert messages[0]["type"] == "hello"
    (error,) = [message for message in messages if message["type"] == "error"]
    assert error["kind"] == "input" and named in error["message"] and "Bad job" not in error["message"]


def test_the_client_refuses_invalid_parameters_before_sending_them(client, tmp_path):
    with pytest.raises(EngineError) as refused:
        client.segment(SegmentationParams("in.tif", str(tmp_path), clusters=0))
    assert refused.value.kind == "input" and "clusters" in str(refused.value)
    assert not client.running
