"""Model manager: the catalogue, memory estimates, the worker's models/download/delete commands on a fake
Hugging Face cache, the token in the QGIS authentication database, and the dialog."""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from treeseg_qgis import catalogue, memory
from treeseg_qgis.catalogue import BACKBONES, HEIGHT_HEAD, MODELS, VIT_S, CatalogueModel, find_model
from treeseg_qgis.engine.core.errors import Cancelled
from treeseg_qgis.engine.hub_cache import DownloadTally
from treeseg_qgis.params import SegmentationParams
from treeseg_qgis.qgis_side.engine_client import EngineClient, EngineError, JobWatch

from .test_gui import load_scaled

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"
BASE_REPO = "facebook/dinov3-vitb16-pretrain-lvd1689m"
MASTER_PASSWORD = "treeseg-test-master-password"
SECRET = "hf_treesegTestToken0123456789"


def cache_repo(hf_home: Path, repo_id: str, source: Path, names: list[str] | None = None) -> Path:
    """Put the files of `source` into a Hugging Face cache as huggingface_hub lays it out: blobs, a snapshot
    of links to them, and refs/main."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / SNAPSHOT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for item in sorted(source.iterdir()):
        if names is not None and item.name not in names:
            continue
        data = item.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        (snapshot / item.name).symlink_to(Path("..", "..", "blobs", digest))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return repo


@pytest.fixture
def hf_home(tmp_path, tiny_model_dir) -> Path:
    """A cache with a complete `base` (the tiny DINOv3 under its id) and `large` with config.json only."""
    home = tmp_path / "hf"
    cache_repo(home, BASE_REPO, tiny_model_dir)
    cache_repo(home, BACKBONES["large"].repo_id, tiny_model_dir, names=["config.json"])
    return home


@pytest.fixture
def client(hf_home):
    engine = EngineClient(sys.executable, {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    yield engine
    engine.close()


# catalogue and memory


@pytest.mark.parametrize("module", ["catalogue.py", "memory.py"])
def test_catalogue_and_memory_use_the_standard_library_only(module):
    tree = ast.parse((REPO / "treeseg_qgis" / module).read_text())
    absolute = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    absolute |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module}
    assert absolute <= set(sys.stdlib_module_names) | {"__future__"}, absolute


def test_the_engine_panel_and_processing_share_the_catalogue():
    from treeseg_qgis.engine.core.models import CATALOGUE, SAT493M_MEAN

    assert list(CATALOGUE) == list(BACKBONES) == ["small", "small+", "base", "large", "giant", "mega",
                                                   "large-sat", "mega-sat"]
    assert CATALOGUE["mega-sat"].normalisation.mean == SAT493M_MEAN
    assert list(MODELS) == [*BACKBONES, "canopy-height"]
    assert HEIGHT_HEAD.repo_id == "facebook/dinov3-vitl16-chmv2-dpt-head"
    assert find_model("facebook/dinov3-vits16-pretrain-lvd1689m").name == "small"
    assert find_model("someone/else") is None
    assert BACKBONES["base"].page == f"https://huggingface.co/{BASE_REPO}"


def test_catalogue_sizes_match_the_architectures():
    """Parameter counts within 4 % of the real DINOv3 shapes; downloads are float32 weights."""
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    for model in BACKBONES.values():
        config = DINOv3ViTConfig(**model.architecture.hub_config(), num_register_tokens=4, patch_size=16)
        with torch.device("meta"):
            count = sum(parameter.numel() for parameter in DINOv3ViTModel(config).parameters())
        assert count / 1e6 == pytest.approx(model.params_millions, rel=0.04), model.name
        assert model.download_bytes == pytest.approx(4 * count, rel=0.01), model.name


def test_memory_estimate_is_calibrated_on_the_benchmark():
    vit_s = CatalogueModel("vits16", "ViT-S/16", ("facebook/dinov3-vits16-pretrain-lvd1689m",), 21.6,
                           86_400_000, VIT_S, catalogue.LVD_1689M)
    assert memory.tokens_per_tile(512) == 1029
    estimate = memory.estimate_peak_bytes(vit_s, stride=16, tile_size=512, batch_size=4, device="cpu")
    assert estimate / memory.MIB == pytest.approx(817, rel=0.02)


def test_memory_estimate_grows_with_model_batch_and_precision():
    mega_cpu = memory.estimate_peak_bytes("mega", 16, 512, 4, "cpu")
    mega_gpu = memory.estimate_peak_bytes("mega", 16, 512, 4, "cuda")
    assert 27e9 < mega_cpu < 29e9
    assert 13e9 < mega_gpu < 15e9
    assert memory.estimate_peak_bytes("base", 16, 512, 4) < memory.estimate_peak_bytes("large", 16, 512, 4)
    assert memory.estimate_peak_bytes("base", 16, 512, 4) < memory.estimate_peak_bytes("base", 4, 512, 4)
    assert memory.estimate_peak_bytes("base", 8, 512, 1) < memory.estimate_peak_bytes("base", 8, 512, 4)
    assert memory.estimate_peak_bytes("base", 16, 256, 4) < memory.estimate_peak_bytes("base", 16, 1024, 4)
    assert memory.estimate_peak_bytes("someone/else") is None


def test_memory_warning_says_what_is_needed_and_what_is_free():
    warning = memory.memory_warning("mega", 16, 512, 4, 16 * 10**9)
    assert warning.startswith("mega needs about 28 GB at stride 16 with 512-px tiles; this machine has 16 GB free")
    gpu = memory.memory_warning("mega", 16, 512, 4, 8 * 10**9, device="cuda")
    assert "needs about 14 GB" in gpu and "the GPU has 8.0 GB free" in gpu
    assert memory.memory_warning("mega", 16, 512, 4, 40 * 10**9) is None
    assert memory.memory_warning("base", 16, 512, 4, None) is None
    assert memory.memory_warning("/some/folder", 16, 512, 4, 10**6) is None


def test_host_memory_reads_meminfo(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384000 kB\nMemFree:          512000 kB\nMemAvailable:    8192000 kB\n")
    monkeypatch.setattr(memory, "MEMINFO", meminfo)
    assert memory.host_memory() == (16384000 * 1024, 8192000 * 1024)
    assert memory.available_memory_bytes() == 8192000 * 1024


def test_sizes_read_naturally():
    assert [memory.format_size(size) for size in (471_832, 115_000_000, 1_213_000_000, 26_866_000_000)] == [
        "0.5 MB", "115 MB", "1.2 GB", "27 GB"]


# the worker's commands


def test_models_reports_what_is_in_the_cache(client, tiny_model_dir):
    record = client.models()
    models = {entry["name"]: entry for entry in record["models"]}
    assert list(models) == list(MODELS)
    assert models["base"]["cached"] and models["base"]["repo_id"] == BASE_REPO
    weights = sum(item.stat().st_size for item in tiny_model_dir.iterdir())
    assert weights <= models["base"]["size_on_disk"] <= weights + len(SNAPSHOT)
    assert not models["large"]["cached"] and 0 < models["large"]["size_on_disk"] < weights
    assert not models["mega"]["cached"] and models["mega"]["size_on_disk"] == 0
    assert record["cache_dir"].endswith("hub") and record["disk_free_bytes"] > 0


def test_a_cached_model_loads_by_name_and_delete_removes_it(client, hf_home, scene_tif, tmp_path):
    path, _ = scene_tif
    record = client.segment(SegmentationParams(str(path), str(tmp_path / "out"), model="base", device="cpu",
                                               tile_size=128, overlap=32, clusters=2))
    assert record.model.untrained is False
    deleted = client.delete_model("base")
    assert deleted["freed_bytes"] > 0
    assert not (hf_home / "hub" / ("models--" + BASE_REPO.replace("/", "--"))).exists()
    models = {entry["name"]: entry for entry in client.models()["models"]}
    assert not models["base"]["cached"] and models["base"]["size_on_disk"] == 0
    assert models["large"]["size_on_disk"] > 0


def test_unknown_model_is_an_input_error(client):
    with pytest.raises(EngineError) as caught:
        client.delete_model("../../etc")
    assert caught.value.kind == "input" and "canopy-height" in str(caught.value)


def test_download_offline_fails_at_once_with_a_clear_message(client):
    client.models()
    started = time.monotonic()
    with pytest.raises(EngineError) as caught:
        client.download_model("large", hf_token=SECRET)
    assert time.monotonic() - started < 30
    assert caught.value.kind == "model"
    message = str(caught.value)
    assert "Cannot download facebook/dinov3-vitl16-pretrain-lvd1689m" in message and "HF_HUB_OFFLINE" in message
    assert SECRET not in message
    assert client.running


class GatedHub(BaseHTTPRequestHandler):
    """A hub that refuses every request as gated and remembers the Authorization headers."""

    authorizations: list[str] = []

    def refuse(self) -> None:
        GatedHub.authorizations.append(self.headers.get("Authorization", ""))
        body = json.dumps({"error": "Access to this model is restricted."}).encode()
        self.send_response(403)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to this model is restricted.")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = refuse

    def log_message(self, *args) -> None:
        pass


def test_download_refused_as_gated_names_the_model_page_and_sends_the_token(hf_home):
    server = ThreadingHTTPServer(("127.0.0.1", 0), GatedHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    engine = EngineClient(sys.executable, {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint,
                                           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
    GatedHub.authorizations.clear()
    try:
        with pytest.raises(EngineError) as caught:
            engine.download_model("giant", hf_token=SECRET)
    finally:
        engine.close()
        server.shutdown()
    message = str(caught.value)
    assert caught.value.kind == "model" and "gated" in message and "licence" in message
    assert "https://huggingface.co/facebook/dinov3-vith16plus-pretrain-lvd1689m" in message
    assert SECRET not in message
    assert f"Bearer {SECRET}" in GatedHub.authorizations


class FakeHub(BaseHTTPRequestHandler):
    """A hub serving the tiny model as one repository: repo info, tree, HEAD and GET of its files; the
    safetensors file in `chunk_delay`-spaced 4 KB chunks."""

    files: dict[str, bytes] = {}
    chunk_delay = 0.0

    def do_HEAD(self) -> None:  # noqa: N802 - the http.server name
        self.serve(body=False)

    def do_GET(self) -> None:  # noqa: N802 - the http.server name
        self.serve(body=True)

    def serve(self, body: bool) -> None:
        path = self.path.split("?")[0]
        if path.startswith("/api/models/") and "/revision/" in path:
            repo_id = path[len("/api/models/"):].split("/revision/")[0]
            return self.send_json({"id": repo_id, "sha": SNAPSHOT,
                                   "siblings": [{"rfilename": name} for name in self.files]}, body)
        if path.startswith("/api/models/") and "/tree/" in path:
            return self.send_json([{"type": "file", "path": name, "size": len(data),
                                    "oid": hashlib.sha1(data).hexdigest()} for name, data in self.files.items()], body)
        name = path.rsplit("/", 1)[-1]
        if "/resolve/" not in path or name not in self.files:
            self.send_error(404)
            return
        data = self.files[name]
        self.send_response(200)
        self.send_header("X-Repo-Commit", SNAPSHOT)
        self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            slow = name.endswith(".safetensors") and self.chunk_delay
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a download the test cancels
                for start in range(0, len(data), 4096 if slow else len(data)):
                    self.wfile.write(data[start:start + 4096] if slow else data)
                    time.sleep(self.chunk_delay if slow else 0)

    def send_json(self, value, body: bool) -> None:
        payload = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_hub(hf_home, tiny_model_dir):
    """An EngineClient whose worker talks to FakeHub instead of huggingface.co."""
    FakeHub.files = {item.name: item.read_bytes() for item in sorted(tiny_model_dir.iterdir())}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    engine = EngineClient(sys.executable, {
        "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", "HF_HUB_DISABLE_XET": "1"})
    yield engine
    engine.close()
    server.shutdown()


def test_download_reports_progress_and_cancel_stops_it_at_once(fake_hub, hf_home, monkeypatch):
    monkeypatch.setattr(FakeHub, "chunk_delay", 0.5)
    stages = []
    started = time.monotonic()
    with pytest.raises(EngineError) as caught:
        fake_hub.download_model("small+", JobWatch(on_progress=lambda percent, stage: stages.append((percent, stage)),
                                                   is_cancelled=lambda: bool(stages)))
    assert caught.value.kind == "cancelled" and "resumes" in str(caught.value)
    assert time.monotonic() - started < 30 and fake_hub.running  # the worker stays for the next job
    assert stages[0][1].startswith("Downloading facebook/dinov3-vits16plus-pretrain-lvd1689m: 0.0 MB of about 115 MB")
    models = {entry["name"]: entry for entry in fake_hub.models()["models"]}
    assert not models["small+"]["cached"]


def test_a_download_lands_in_the_cache(fake_hub, hf_home):
    stages = []
    record = fake_hub.download_model("small+",
                                     JobWatch(on_progress=lambda percent, stage: stages.append((percent, stage))))
    assert record["repo_id"] == "facebook/dinov3-vits16plus-pretrain-lvd1689m"
    assert {path.name for path in Path(record["path"]).iterdir()} == set(FakeHub.files)
    assert stages[-1] == (100.0, "Downloaded facebook/dinov3-vits16plus-pretrain-lvd1689m")
    models = {entry["name"]: entry for entry in fake_hub.models()["models"]}
    assert models["small+"]["cached"] and models["small"]["cached"]


def test_download_progress_counts_bytes_and_stops_when_cancelled():
    cancelled = []
    tally = DownloadTally(1000, lambda: bool(cancelled))
    bar_class = tally.progress_bar_class()
    files = bar_class(total=2, unit="it")
    data = bar_class(total=0, unit="B", unit_scale=True, name="huggingface_hub.snapshot_download")
    data.total = 800
    data.update(250)
    assert tally.percent() == 25.0 and "of about" in tally.stage(BASE_REPO)
    files.update(1)
    assert tally.percent() == 25.0
    data.update(750)
    assert tally.percent() == 99.0
    cancelled.append(True)
    with pytest.raises(Cancelled):
        data.update(1)


# the token in the QGIS authentication database


@pytest.fixture
def auth_database(qgis_app):
    """The test profile's authentication database, unlocked with a test master password; no token before
    or after."""
    from qgis.core import QgsApplication

    from treeseg_qgis.qgis_side.auth import remove_token

    manager = QgsApplication.authManager()
    assert manager.setMasterPassword(MASTER_PASSWORD, True)
    remove_token()
    yield manager
    remove_token()


def test_token_round_trip_through_the_authentication_database(auth_database):
    from qgis.core import QgsSettings

    from treeseg_qgis.qgis_side.auth import (
        TOKEN_CONFIG_SETTING,
        has_stored_token,
        remove_token,
        store_token,
        stored_token,
    )

    assert stored_token() is None and not has_stored_token()
    store_token(f"  {SECRET}\n")
    assert stored_token() == SECRET and has_stored_token()
    config_id = QgsSettings().value(TOKEN_CONFIG_SETTING, "", type=str)
    assert config_id in auth_database.configIds()
    store_token("hf_second")
    assert stored_token() == "hf_second"
    assert QgsSettings().value(TOKEN_CONFIG_SETTING, "", type=str) == config_id
    remove_token()
    assert stored_token() is None and config_id not in auth_database.configIds()
    assert QgsSettings().value(TOKEN_CONFIG_SETTING, "", type=str) == ""


def test_the_token_never_reaches_the_settings(auth_database):
    from qgis.core import QgsSettings

    from treeseg_qgis.qgis_side.auth import store_token

    store_token(SECRET)
    settings = QgsSettings()
    settings.sync()
    assert all(SECRET not in str(settings.value(key)) for key in settings.allKeys())
    assert SECRET not in Path(settings.fileName()).read_text(errors="replace")


def test_runs_prefer_the_saved_token_to_the_environment(auth_database, monkeypatch):
    from treeseg_qgis.qgis_side.auth import TokenStoreError, hf_token, remove_token, store_token

    monkeypatch.setenv("HF_TOKEN", "hf_from_environment")
    assert hf_token() == "hf_from_environment"
    store_token(SECRET)
    assert hf_token() == SECRET
    remove_token()
    assert hf_token() == "hf_from_environment"
    with pytest.raises(TokenStoreError):
        store_token("   ")


# the dialog


def wait_for(condition, qgis_app, seconds: float = 120.0) -> None:
    """Wait for the event itself; fail only after `seconds` scaled by the machine's load (a hang)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < load_scaled(seconds), "timed out"
        qgis_app.processEvents()
        time.sleep(0.05)


def test_the_dialog_marks_cached_models(qgis_app, client, auth_database, tiny_model_dir, tmp_path):
    from treeseg_qgis.qgis_side.gui.model_manager import CACHE_COLUMN, MEMORY_COLUMN, ModelManagerDialog

    dialog = ModelManagerDialog(client)
    assert dialog.table.rowCount() == len(MODELS)
    dialog.refresh()
    wait_for(lambda: dialog.task is None, qgis_app)
    names = list(MODELS)
    assert dialog.table.item(names.index("base"), CACHE_COLUMN).text().startswith("yes (")
    assert dialog.table.item(names.index("large"), CACHE_COLUMN).text().startswith("partial (")
    assert dialog.table.item(names.index("mega"), CACHE_COLUMN).text() == "no"
    assert dialog.table.item(names.index("mega"), MEMORY_COLUMN).text() == "~28 GB"
    dialog.table.selectRow(names.index("base"))
    assert not dialog.download_button.isEnabled() and dialog.delete_button.isEnabled()
    assert BASE_REPO in dialog.licence_label.text()
    dialog.table.selectRow(names.index("mega"))
    assert dialog.download_button.isEnabled() and not dialog.delete_button.isEnabled()

    chosen = []
    dialog.local_folder_chosen.connect(chosen.append)
    assert dialog.use_local_folder(str(tiny_model_dir)) is None and chosen == [str(tiny_model_dir)]
    assert "config.json" in dialog.use_local_folder(str(tmp_path)) and len(chosen) == 1

    dialog.token_edit.setText(SECRET)
    dialog.save_token_button.click()
    assert dialog.token_edit.text() == "" and dialog.remove_token_button.isEnabled()
    assert SECRET not in dialog.token_label.text()
    dialog.remove_token_button.click()
    assert not dialog.remove_token_button.isEnabled()
    dialog.deleteLater()


def test_the_dialog_shows_and_clears_the_feature_cache(qgis_app, tiny_model_dir, scene_tif, tmp_path, monkeypatch):
    from qgis.PyQt.QtWidgets import QMessageBox

    from treeseg_qgis.qgis_side.gui.model_manager import ModelManagerDialog

    cache = tmp_path / "xdg-cache"
    engine = EngineClient(sys.executable, {"XDG_CACHE_HOME": str(cache), "HF_HUB_OFFLINE": "1"})
    dialog = ModelManagerDialog(engine)
    try:
        path, _ = scene_tif
        engine.segment(SegmentationParams(str(path), str(tmp_path / "out"), model=str(tiny_model_dir), device="cpu",
                                          clusters=2))
        dialog.refresh()
        wait_for(lambda: dialog.task is None, qgis_app)
        features = cache / "treeseg" / "features"
        assert dialog.feature_cache_label.text().startswith(f"Feature cache of runs: {features} (")
        assert dialog.feature_cache_label.text().endswith(" of 2.1 GB)") and dialog.clear_cache_button.isEnabled()
        monkeypatch.setattr(QMessageBox, "question", lambda *args: QMessageBox.StandardButton.Yes)

        dialog.clear_cache_button.click()
        wait_for(lambda: dialog.task is None and not dialog.clear_cache_button.isEnabled(), qgis_app)

        assert not features.exists() and dialog.status_label.text().startswith("Removed the feature cache: ")
        assert dialog.feature_cache_label.text() == f"Feature cache of runs: {features} (0.0 MB of 2.1 GB)"
    finally:
        dialog.deleteLater()
        engine.close()


def test_check_model_folder(tiny_model_dir, tmp_path):
    from treeseg_qgis.qgis_side.gui.model_manager import check_model_folder

    assert check_model_folder(str(tiny_model_dir)) is None
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "vit"}))
    assert "'vit' model, not a DINOv3" in check_model_folder(str(other))
    (other / "config.json").write_text(json.dumps({"model_type": "dinov3_vit"}))
    assert "no .safetensors" in check_model_folder(str(other))


def test_the_models_menu_entry_opens_the_manager_and_feeds_the_panel(qgis_app, qgis_iface, qgis_new_project, hf_home,
                                                                     tiny_model_dir, monkeypatch):
    from qgis.PyQt.QtWidgets import QDialogButtonBox

    from treeseg_qgis import classFactory
    from treeseg_qgis.qgis_side.engine_client import ENGINE_PYTHON_ENV
    from treeseg_qgis.qgis_side.gui.model_manager import COLUMNS as manager_columns
    from treeseg_qgis.qgis_side.plugin import MENU

    monkeypatch.setenv(ENGINE_PYTHON_ENV, sys.executable)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    plugin = classFactory(qgis_iface)
    plugin.initGui()
    try:
        action = plugin.models_action
        qgis_iface.addPluginToRasterMenu.assert_any_call(MENU, action)
        action.trigger()
        dialog = plugin.model_manager
        assert dialog.isVisible()
        wait_for(lambda: dialog.task is None, qgis_app)
        assert dialog.cache_state["base"]["cached"]
        assert dialog.in_use_label.isHidden()
        small_ids = dialog.table.item(list(dialog.cache_state).index("small"), len(manager_columns) - 1).text()
        assert small_ids == ("facebook/dinov3-vits16plus-pretrain-lvd1689m, falling back to "
                             "facebook/dinov3-vits16-pretrain-lvd1689m")
        dialog.use_local_folder(str(tiny_model_dir))
        assert plugin.dock.run_panel.model_override.text() == str(tiny_model_dir)
        assert not dialog.in_use_label.isHidden() and str(tiny_model_dir) in dialog.in_use_label.text()
        close = dialog.findChild(QDialogButtonBox).button(QDialogButtonBox.StandardButton.Close)
        close.click()
        assert not dialog.isVisible()
    finally:
        plugin.unload()
    qgis_iface.removePluginRasterMenu.assert_any_call(MENU, action)
    assert plugin.model_manager is None and plugin.models_action is None


def test_probe_reports_the_memory_of_the_device(client):
    info = client.probe()
    assert info["device"] == "cpu"
    assert info["memory_total_bytes"] >= info["memory_available_bytes"] > 0
