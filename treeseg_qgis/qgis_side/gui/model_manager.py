"""The model manager: which DINOv3 models are on this computer, download and delete them, keep the
Hugging Face token, or pick a local model folder.

Everything that touches the Hugging Face cache or the hub runs in the engine worker
(commands models, download, delete) from a QgsTask, off the UI thread. The token
goes into the QGIS authentication database (auth.py) and reaches the engine only
inside the download job.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtWidgets import (
    QAbstractItemView,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ...catalogue import MODELS, CatalogueModel
from ...memory import estimate_peak_bytes, format_gigabytes, format_size
from ..auth import TokenStoreError, has_stored_token, hf_token, remove_token, store_token
from ..engine_client import EngineClient, JobWatch, missing_engine_message
from .layouts import button, fill, hbox, wrapped_label
from .task import EngineCallTask

COLUMNS = ("Model", "In cache", "Parameters", "Download", "Memory (CPU)", "Hugging Face id")
NAME_COLUMN, CACHE_COLUMN, MEMORY_COLUMN = 0, 1, 4
TOKENS_PAGE = "https://huggingface.co/settings/tokens"


def check_model_folder(folder: str) -> str | None:
    """Why `folder` is not a DINOv3 ViT in Hugging Face format (config.json + safetensors), or None."""
    path = Path(folder)
    config_file = path / "config.json"
    if not config_file.is_file():
        return f"{folder} has no config.json: choose the folder of a model saved in Hugging Face format."
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type", "")
    except (OSError, ValueError, AttributeError) as error:
        return f"{config_file} cannot be read: {error}"
    if model_type != "dinov3_vit":
        return f"{folder} holds a '{model_type or 'unknown'}' model, not a DINOv3 ViT (model_type 'dinov3_vit')."
    if not any(path.glob("*.safetensors")):
        return f"{folder} has no .safetensors weights (pickled .bin/.pth weights are not loaded)."
    return None


def parameters_text(millions: float) -> str:
    """E.g. '86 M', '6.7 B'."""
    return f"{millions / 1000:.1f} B" if millions >= 1000 else f"{millions:.0f} M"


def cache_text(entry: dict[str, Any]) -> str:
    """'yes (343 MB)', 'partial (12 MB)' or 'no' for one model of the engine's `models` record."""
    size = int(entry.get("size_on_disk") or 0)
    if entry.get("cached"):
        return f"yes ({format_size(size)})"
    return f"partial ({format_size(size)})" if size else "no"


class ModelManagerDialog(QDialog):
    """The catalogue with its cache state; Download / Delete, the token, and a local folder.

    `engine` is this window's own EngineClient (None without an engine environment), so a
    download never holds up a segmentation. `local_folder_chosen(folder)` carries a checked
    model folder for the panel's model override.
    """

    local_folder_chosen = pyqtSignal(str)

    def __init__(self, engine: EngineClient | None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("TreeSeg: DINOv3 models")
        self.engine = engine
        self.task: EngineCallTask | None = None
        self.cache_state: dict[str, dict[str, Any]] = {}
        self.feature_cache_bytes = 0
        self._build()
        self._show_token_state()
        self._update_buttons()

    def _build(self) -> None:
        self.table = QTableWidget(len(MODELS), len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.horizontalHeaderItem(MEMORY_COLUMN).setToolTip(
            "Approximate peak memory of a run on the CPU at stride 16 with 512-px tiles (about half on a GPU).")
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        for row, model in enumerate(MODELS.values()):
            memory = estimate_peak_bytes(model)
            cells = (model.name, "", parameters_text(model.params_millions), format_size(model.download_bytes),
                     f"~{format_gigabytes(memory)}", ", falling back to ".join(model.repo_ids))
            for column, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setToolTip(model.label if column == NAME_COLUMN else text)
                self.table.setItem(row, column, item)
        self.table.itemSelectionChanged.connect(self._selection_changed)

        self.licence_label = wrapped_label()
        self.licence_label.setTextFormat(Qt.TextFormat.RichText)
        self.licence_label.setOpenExternalLinks(True)

        self.download_button = button("Download", clicked=self.download_selected)
        self.delete_button = button("Delete", clicked=self.delete_selected)
        self.local_button = button("Use a local folder…", "A DINOv3 model folder in Hugging Face format (config.json "
                                   "and model.safetensors), used as the panel's model override.",
                                   self._choose_local_folder)
        self.refresh_button = button("Refresh", clicked=self.refresh)
        buttons = hbox(self.download_button, self.delete_button, self.local_button, 1, self.refresh_button)

        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.hide()
        self.cancel_button = button("Cancel", clicked=self.cancel)
        self.cancel_button.hide()
        progress_row = hbox((self.progress, 1), self.cancel_button)
        self.status_label = wrapped_label(missing_engine_message() if self.engine is None else "")
        self.cache_label = wrapped_label()
        self.feature_cache_label = wrapped_label()
        self.clear_cache_button = button("Clear feature cache", "Remove the features kept from earlier runs; the next "
                                         "run of each raster runs the model again.", self.clear_feature_cache)
        feature_cache_row = hbox((self.feature_cache_label, 1), self.clear_cache_button)
        self.in_use_label = wrapped_label(selectable=True)
        close_box = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        close_box.rejected.connect(self.close)

        self.token_edit = QLineEdit()
        self.token_edit.setEchoMode(QLineEdit.EchoMode.Password)
        self.token_edit.setPlaceholderText("Hugging Face read token (hf_…)")
        self.save_token_button = button("Save token", clicked=self._save_token)
        self.remove_token_button = button("Remove token", clicked=self._remove_token)
        token_row = hbox((self.token_edit, 1), self.save_token_button, self.remove_token_button)
        self.token_label = wrapped_label()
        self.token_label.setTextFormat(Qt.TextFormat.RichText)
        self.token_label.setOpenExternalLinks(True)

        fill(QVBoxLayout(self), self.table, self.licence_label, buttons, progress_row, self.status_label,
             self.cache_label, feature_cache_row, self.in_use_label, QLabel("<b>Hugging Face token</b>"), token_row,
             self.token_label, close_box)
        self.table.setMinimumHeight(self.table.verticalHeader().length() + 2 * self.table.frameWidth()
                                    + self.table.horizontalHeader().height())
        self.resize(1000, 640)
        self.table.selectRow(list(MODELS).index("base"))

    def selected_model(self) -> CatalogueModel | None:
        rows = self.table.selectionModel().selectedRows()
        return list(MODELS.values())[rows[0].row()] if rows else None

    def _selected_when_free(self) -> CatalogueModel | None:
        """The selected model when a job may start on it (an engine, no job running), else None."""
        return self.selected_model() if self.engine is not None and self.task is None else None

    def show_model_in_use(self, override: str) -> None:
        """Name the panel's model override (a local folder or an id), which runs instead of the catalogue model."""
        self.in_use_label.setText(f"The panel runs <b>{override}</b> (its model override) instead of the model "
                                  "chosen there." if override else "")
        self.in_use_label.setVisible(bool(override))

    def refresh(self) -> None:
        """Ask the engine which models are in the cache (unless a job is running)."""
        if self.engine is not None and self.task is None:
            self.cache_label.setText("Looking into the Hugging Face cache…")
            self._start_call("TreeSeg: models in the cache", EngineClient.models, self._listed)

    def download_selected(self) -> None:
        """Download the selected model with the saved token (else the engine's HF_TOKEN or hf login)."""
        if (model := self._selected_when_free()) is None:
            return
        engine, token = self.engine, hf_token()
        task = EngineCallTask(f"TreeSeg: downloading {model.name}", lambda job: engine.download_model(
            model.name, JobWatch(job.report, is_cancelled=job.isCanceled), token))
        task.stage_changed.connect(self.status_label.setText)
        task.progressChanged.connect(lambda percent: self.progress.setValue(round(percent)))
        self.progress.setValue(0)
        self.progress.show()
        self.cancel_button.show()
        self.status_label.setText(f"Downloading {model.repo_id}…")
        self._start(task, self._job_done)

    def delete_selected(self) -> None:
        """Remove the selected model from the cache, after asking."""
        if (model := self._selected_when_free()) is None:
            return
        if self._confirmed("Delete model", f"Remove {model.name} ({model.repo_id}) from the Hugging Face cache? "
                           "It can be downloaded again."):
            self._start_call(f"TreeSeg: deleting {model.name}", lambda engine: engine.delete_model(model.name),
                             self._job_done)

    def clear_feature_cache(self) -> None:
        """Empty the feature cache of runs, after asking."""
        if self.engine is None or self.task is not None:
            return
        if self._confirmed("Clear feature cache", "Remove the features kept from earlier runs? The next run of "
                           "each raster runs the model again; a run going on now may fail."):
            self._start_call("TreeSeg: clearing the feature cache", EngineClient.clear_feature_cache, self._job_done)

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def use_local_folder(self, folder: str) -> str | None:
        """Check `folder` and hand it on as the model override; the problem when it is not a model folder."""
        problem = check_model_folder(folder)
        if problem is None:
            self.local_folder_chosen.emit(folder)
            self.status_label.setText(f"{folder} is now the panel's model override.")
        else:
            self.status_label.setText(problem)
        return problem

    def shutdown(self) -> None:
        """Cancel a running job and stop this window's engine worker."""
        self.cancel()
        if self.engine is not None:
            self.engine.close()

    def hideEvent(self, event: Any) -> None:  # noqa: N802 - the Qt name
        """Closed while idle: stop the worker to free its memory (a download goes on in the background)."""
        if self.task is None and self.engine is not None:
            self.engine.close()
        super().hideEvent(event)

    def _confirmed(self, title: str, question: str) -> bool:
        """Whether the user answers Yes to `question`."""
        return QMessageBox.question(self, title, question) == QMessageBox.StandardButton.Yes

    def _start_call(self, description: str, call: Callable[[EngineClient], dict[str, Any]],
                    on_done: Callable[[dict[str, Any] | None, str], None]) -> None:
        """Run `call(engine)` on this window's engine in the background; no progress is shown."""
        engine = self.engine
        self._start(EngineCallTask(description, lambda task: call(engine)), on_done)

    def _start(self, task: EngineCallTask, on_done: Callable[[dict[str, Any] | None, str], None]) -> None:
        self.task = task
        task.completed.connect(on_done)
        self._update_buttons()
        QgsApplication.taskManager().addTask(task)

    def _listed(self, record: dict[str, Any] | None, error: str) -> None:
        self.task = None
        if record is not None:
            self.cache_state = {entry["name"]: entry for entry in record["models"]}
            for row, name in enumerate(MODELS):
                if name in self.cache_state:
                    self.table.item(row, CACHE_COLUMN).setText(cache_text(self.cache_state[name]))
            free = record.get("disk_free_bytes")
            self.cache_label.setText(f"Hugging Face cache: {record['cache_dir']}"
                                     + (f" ({format_gigabytes(free)} free)" if free is not None else ""))
            features = record["feature_cache"]
            self.feature_cache_label.setText(f"Feature cache of runs: {features['path']} "
                                             f"({format_size(features['size_bytes'])} of "
                                             f"{format_size(features['max_bytes'])})")
            self.feature_cache_bytes = int(features["size_bytes"])
        else:
            self.cache_label.setText(error)
        self._update_buttons()

    def _job_done(self, record: dict[str, Any] | None, error: str) -> None:
        self.task = None
        self.progress.hide()
        self.cancel_button.hide()
        if error:
            self.status_label.setText(error)
        elif record is not None and "freed_bytes" in record:
            self.status_label.setText(f"Removed {record['name']}: {format_size(record['freed_bytes'])} freed.")
        self.refresh()

    def _selection_changed(self) -> None:
        model = self.selected_model()
        if model is not None:
            self.licence_label.setText(
                f'{model.label}. The weights are gated: accept the licence on <a href="{model.page}">'
                f"{model.page}</a> with your Hugging Face account, then save a read token below.")
        self._update_buttons()

    def _update_buttons(self) -> None:
        model = self.selected_model()
        state = self.cache_state.get(model.name, {}) if model is not None else {}
        idle = self.engine is not None and self.task is None and model is not None
        self.download_button.setEnabled(idle and not state.get("cached", False))
        self.delete_button.setEnabled(idle and bool(state.get("size_on_disk")))
        self.refresh_button.setEnabled(self.engine is not None and self.task is None)
        self.clear_cache_button.setEnabled(self.engine is not None and self.task is None
                                           and self.feature_cache_bytes > 0)

    def _choose_local_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a DINOv3 model folder")
        if folder and self.use_local_folder(folder) is not None:
            QMessageBox.warning(self, "Not a model folder", self.status_label.text())

    def _save_token(self) -> None:
        try:
            store_token(self.token_edit.text())
        except TokenStoreError as error:
            self.token_label.setText(str(error))
            return
        self.token_edit.clear()
        self._show_token_state()

    def _remove_token(self) -> None:
        remove_token()
        self._show_token_state()

    def _show_token_state(self) -> None:
        saved = has_stored_token()
        self.remove_token_button.setEnabled(saved)
        self.token_label.setText(
            "A token is saved in the QGIS authentication database; downloads and Processing runs use it."
            if saved else
            f'No token saved. Create a read token on <a href="{TOKENS_PAGE}">{TOKENS_PAGE}</a> and save it here '
            "(kept encrypted in the QGIS authentication database); without one, the HF_TOKEN environment "
            "variable or an `hf auth login` is used.")
