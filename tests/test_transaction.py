"""Outputs as one transaction: a failed, cancelled or signalled run leaves the previous run's files
byte-identical and nothing of its own; no output may overwrite an input or share a path (issue 20)."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from osgeo import gdal

from treeseg_qgis.engine.core.errors import Cancelled, OutputError
from treeseg_qgis.engine.core.progress import Progress
from treeseg_qgis.engine.pipeline import segment
from treeseg_qgis.outputs import STAGING_PREFIX, OutputTransaction, recover_outputs
from treeseg_qgis.params import OutputFiles, SegmentationParams

from .conftest import REPO, disc_scene, write_geotiff

gdal.UseExceptions()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) and its hash."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def previous_run(tiny_model_dir, tmp_path):
    """A complete earlier run (with crowns) in tmp_path/out, and a builder of parameters for a re-run."""
    image, _ = disc_scene(200, 200, [(100, 100)], radius=40)
    path = write_geotiff(tmp_path / "in.tif", image)

    def params(**options):
        values = dict(input_path=str(path), output_dir=str(tmp_path / "out"), model=str(tiny_model_dir),
                      device="cpu", clusters=2, tile_size=128, overlap=32, crowns=True,
                      cache_dir=str(tmp_path / "cache"))
        values.update(options)
        return SegmentationParams(**values)

    segment(params())
    return params, tmp_path / "out"


@pytest.mark.parametrize("stage", ["Extracting", "Clustering", "Assigning", "Polygonizing", "Splitting crowns",
                                   "Writing preview"])
def test_a_cancelled_rerun_leaves_the_previous_outputs_byte_identical(previous_run, stage):
    params, out = previous_run
    before = snapshot(out)
    seen = []
    with pytest.raises(Cancelled):
        segment(params(clusters=3, use_cache=False),
                Progress(lambda percent, text: seen.append(text), lambda: any(t.startswith(stage) for t in seen)))
    assert snapshot(out) == before


def test_a_rerun_failing_after_the_rasters_were_written_keeps_the_previous_set(previous_run, monkeypatch):
    from treeseg_qgis.engine import pipeline

    def disk_full(*args, **kwargs):
        raise OutputError("No space left on device while writing the preview.")

    monkeypatch.setattr(pipeline, "write_preview", disk_full)
    params, out = previous_run
    before = snapshot(out)
    with pytest.raises(OutputError, match="No space left"):
        segment(params(clusters=3))
    assert snapshot(out) == before


def test_a_completed_rerun_replaces_the_whole_set(previous_run):
    params, out = previous_run
    record = segment(params(clusters=3, crowns=False))
    assert not (out / "in_crowns.gpkg").exists(), "an earlier run's crowns would not match the new trees"
    assert all(Path(path).is_file() for path in record.outputs.values())
    left = sorted(p.name for p in out.iterdir() if not p.name.endswith(".aux.xml"))
    assert left == sorted(Path(p).name for p in record.outputs.values())
    assert json.loads((out / "in_run.json").read_text())["clusters"]["k"] == 3


def test_an_output_on_the_input_or_two_outputs_on_one_path_are_refused_before_any_work(previous_run, tmp_path):
    params, out = previous_run
    source = Path(params().input_path)
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    loads = []
    with pytest.raises(OutputError, match="would overwrite the input"):
        segment(params(outputs=OutputFiles(clusters=str(source))), load_model=lambda p: loads.append(p))
    with pytest.raises(OutputError, match="Two outputs are set to the same file"):
        segment(params(outputs=OutputFiles(clusters=str(tmp_path / "x.tif"), trees=str(tmp_path / "x.tif"))),
                load_model=lambda p: loads.append(p))
    vrt = tmp_path / "mosaic.vrt"
    gdal.BuildVRT(str(vrt), [str(source)]).FlushCache()
    with pytest.raises(OutputError, match="would overwrite the input"):
        segment(params(input_path=str(vrt), outputs=OutputFiles(trees=str(source))),
                load_model=lambda p: loads.append(p))
    assert loads == [] and hashlib.sha256(source.read_bytes()).hexdigest() == before


def test_a_killed_runs_staging_folder_is_removed_and_a_begun_commit_finished(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_run.json").write_text("old")
    killed = subprocess.run([sys.executable, "-c", (
        "import os, sys; from pathlib import Path; from treeseg_qgis.outputs import OutputTransaction\n"
        "t = OutputTransaction([Path(sys.argv[1]) / 'a_run.json'])\n"
        "t.staged(Path(sys.argv[1]) / 'a_run.json').write_text('half')\n"
        "os.kill(os.getpid(), 9)"), str(out)], cwd=REPO, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert len(list(out.glob(f"{STAGING_PREFIX}*"))) == 1
    recover_outputs(out)
    assert sorted(p.name for p in out.iterdir()) == ["a_run.json"] and (out / "a_run.json").read_text() == "old"

    live = OutputTransaction([out / "a_run.json", out / "a_trees.tif"])
    live.staged(out / "a_run.json").write_text("new")
    recover_outputs(out)
    assert live.staged(out / "a_run.json").exists(), "a live run's staging folder must stay"
    live.commit([out / "a_run.json"], [out / "a_trees.tif"])
    assert sorted(p.name for p in out.iterdir()) == ["a_run.json"] and (out / "a_run.json").read_text() == "new"


def wait_until_handled(pid: int, signum: int, timeout: float = 60.0) -> None:
    """Wait until the process has a handler for `signum` (Linux: SigCgt in /proc): a signal that comes while
    the interpreter itself is still starting meets the default action in any program, so the random moments
    start from there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
        if caught >> (signum - 1) & 1:
            return
        time.sleep(0.02)


def run_cli(args: list[str], environment: dict, signum: int | None, delay: float) -> subprocess.CompletedProcess:
    process = subprocess.Popen([sys.executable, "-m", "treeseg_qgis", "segment", *args], env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if signum is not None:
        wait_until_handled(process.pid, signum)
        time.sleep(delay)
        process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_cli_stopped_by_sigint_sigterm_or_sighup_at_random_moments_keeps_the_previous_outputs(
        tiny_model_dir, tmp_path):
    """A short loop here; scripts/cancel_loop.py runs 50 (CLI signals and the worker's cancel)."""
    image, _ = disc_scene(256, 256, [(128, 128)], radius=50)
    path = write_geotiff(tmp_path / "in.tif", image)
    out, cache = tmp_path / "out", tmp_path / "cache"
    environment = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    common = [str(path), "--out", str(out), "--model", str(tiny_model_dir), "--device", "cpu", "--crowns",
              "--tile-size", "128", "--cache-dir", str(cache), "--quiet"]
    assert run_cli([*common, "--clusters", "2"], environment, None, 0).returncode == 0
    expected = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
    rng = random.Random(20)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGTERM):
        before = snapshot(out)
        result = run_cli([*common, "--clusters", "3", "--no-cache"], environment, signum, rng.uniform(2.0, 9.0))
        if result.returncode == 0:
            record = json.loads((out / "in_run.json").read_text())
            assert record["clusters"]["k"] == 3 and all(Path(p).is_file() for p in record["outputs"].values())
        else:
            assert result.returncode == expected[signum], result.stderr
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
            assert snapshot(out) == before
        assert not list(out.glob(f"{STAGING_PREFIX}*")) and not list(cache.glob("*.building*"))



def test_processing_refuses_an_output_on_the_input_and_a_shared_output_path(qgis_processing, scene_tif, tmp_path,
                                                                            monkeypatch):
    import processing
    from qgis.core import QgsApplication, QgsProcessingException

    from treeseg_qgis.qgis_side.engine_client import ENGINE_PYTHON_ENV
    from treeseg_qgis.qgis_side.processing.provider import TreesegProvider

    monkeypatch.setenv(ENGINE_PYTHON_ENV, sys.executable)
    registry = QgsApplication.processingRegistry()
    provider = None
    if registry.providerById("treeseg") is None:
        provider = TreesegProvider()
        registry.addProvider(provider)
    path, _ = scene_tif
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    base = {"INPUT": str(path), "MODEL_ID": "unused", "CLUSTERS": 2, "DEVICE": "cpu",
            "OUTPUT_CLUSTERS": str(tmp_path / "c.tif"), "OUTPUT_TREES": str(tmp_path / "t.tif"),
            "OUTPUT_POLYGONS": str(tmp_path / "p.gpkg")}
    try:
        with pytest.raises(QgsProcessingException, match="would overwrite the input"):
            processing.run("treeseg:segmenttrees", {**base, "OUTPUT_CLUSTERS": str(path)})
        with pytest.raises(QgsProcessingException, match="Two outputs are set to the same file"):
            processing.run("treeseg:segmenttrees", {**base, "OUTPUT_TREES": str(tmp_path / "c.tif")})
    finally:
        if provider is not None:
            registry.removeProvider(provider)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.tif"]


@pytest.mark.parametrize("stop", ["cancel", "SIGKILL"])
def test_a_worker_cancelled_or_killed_while_polygonizing_leaves_the_previous_outputs(previous_run, stop):
    from treeseg_qgis.qgis_side.engine_client import EngineClient, EngineError, JobWatch

    params, out = previous_run
    before = snapshot(out)
    client = EngineClient(sys.executable, {"HF_HUB_OFFLINE": "1"})
    polygonizing = []

    def on_progress(percent: float, stage: str) -> None:
        if stage.startswith("Polygonizing") and not polygonizing:
            polygonizing.append(stage)
            if stop == "SIGKILL":
                client._process.kill()

    try:
        with pytest.raises(EngineError) as stopped:
            client.segment(params(clusters=3, use_cache=False),
                           JobWatch(on_progress, is_cancelled=lambda: stop == "cancel" and bool(polygonizing)))
    finally:
        client.close()
    assert stopped.value.kind == ("crash" if stop == "SIGKILL" else "cancelled") and polygonizing
    assert snapshot(out) == before
