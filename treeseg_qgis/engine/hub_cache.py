"""The Hugging Face cache on the engine's side: which catalogue models it holds, downloading and deleting them,
and the state of the feature cache of runs (the model manager's worker commands)."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..catalogue import HUB_URL, MODELS, CatalogueModel
from ..memory import disk_free_bytes, folder_bytes, format_size
from .core.errors import Cancelled, InputError, ModelUnavailableError, OutputError, TreesegError

WEIGHT_FILES = ["*.json", "*.safetensors"]
PROGRESS_INTERVAL_SECONDS = 0.25


def download(name: str, revision: str | None, token: str | None, is_cancelled: Callable[[], bool],
             progress: Callable[[float, str], None],
             started: Callable[[threading.Thread], None] = lambda thread: None) -> dict[str, Any]:
    """Fetch a catalogue model's weights into the Hugging Face cache, reporting progress; stops on cancel.

    The fetch runs on a thread handed to `started`: a cancelled download's threads may outlive the call."""
    from huggingface_hub import snapshot_download

    from .core.models import hub_offline

    model = catalogue_model(name)
    if hub_offline():
        raise ModelUnavailableError(offline_message(model))
    _check_disk_space(model)
    tally = DownloadTally(model.download_bytes, is_cancelled)
    outcome: dict[str, Any] = {}

    def fetch() -> None:
        try:
            outcome["path"] = snapshot_download(model.repo_id, revision=revision or "main", token=token or None,
                                                allow_patterns=WEIGHT_FILES, tqdm_class=tally.progress_bar_class())
        except BaseException as error:  # noqa: BLE001 - handed to the job's thread and reported there
            outcome["error"] = error

    fetching = threading.Thread(target=fetch, name="treeseg-download", daemon=True)
    fetching.start()
    started(fetching)
    reported = -1.0
    while fetching.is_alive():
        fetching.join(PROGRESS_INTERVAL_SECONDS)
        if is_cancelled():
            raise Cancelled(f"Download of {model.repo_id} cancelled; what was fetched stays in the cache "
                            "and the next download resumes it.")
        if tally.percent() != reported:
            reported = tally.percent()
            progress(reported, tally.stage(model.repo_id))
    if "error" in outcome:
        raise download_error(model, outcome["error"])
    progress(100.0, f"Downloaded {model.repo_id}")
    return {"name": model.name, "repo_id": model.repo_id, "path": outcome["path"]}


def catalogue_model(name: str) -> CatalogueModel:
    """The catalogue model called `name`, or InputError listing the names."""
    if name not in MODELS:
        raise InputError(f"Unknown model '{name}': the model manager knows {', '.join(MODELS)}.")
    return MODELS[name]


def hub_cache() -> Path:
    """The Hugging Face hub cache folder (HF_HUB_CACHE, HF_HOME/hub or ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_cache_folder(repo_id: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return hub_cache() / repo_folder_name(repo_id=repo_id, repo_type="model")


def cached_models() -> dict[str, Any]:
    """Every catalogue model: whether its weights are in the local cache and how much disk its files take.

    Reads the cache folder only (huggingface_hub's scan_cache_dir); never the network.
    """
    from huggingface_hub import scan_cache_dir

    cache = hub_cache()
    repos = {repo.repo_id: repo for repo in scan_cache_dir(cache).repos} if cache.is_dir() else {}
    models = []
    for model in MODELS.values():
        complete = [repo_id for repo_id in model.repo_ids if repo_id in repos and _has_weights(repos[repo_id])]
        models.append({
            "name": model.name,
            "repo_id": complete[0] if complete else model.repo_id,
            "cached": bool(complete),
            "size_on_disk": sum(folder_bytes(repo_cache_folder(repo_id)) for repo_id in model.repo_ids),
        })
    return {"cache_dir": str(cache), "disk_free_bytes": disk_free_bytes(cache), "models": models}


def feature_cache_state() -> dict[str, Any]:
    """Where the feature cache of runs is, how many bytes it holds and its cap."""
    from .core.cache import FeatureCache

    cache = FeatureCache()
    return {"path": str(cache.root), "size_bytes": cache.size_bytes(), "max_bytes": cache.max_bytes}


def clear_feature_cache() -> dict[str, Any]:
    """Remove every entry of the feature cache; the next run of each raster runs the model again."""
    from .core.cache import FeatureCache

    cache = FeatureCache()
    freed = cache.size_bytes()
    cache.clear()
    return {"name": "the feature cache", "freed_bytes": freed}


def delete_cached(name: str) -> dict[str, Any]:
    """Remove every revision (and any unfinished download) of a catalogue model from the cache."""
    model = catalogue_model(name)
    freed = 0
    for repo_id in model.repo_ids:
        folder = repo_cache_folder(repo_id)
        if folder.is_dir():
            size = folder_bytes(folder)
            try:
                shutil.rmtree(folder)
            except OSError as error:
                raise OutputError(f"Cannot remove {folder}: {error.strerror}.") from error
            freed += size
    return {"name": model.name, "freed_bytes": freed}


class DownloadTally:
    """Bytes fetched so far, fed by huggingface_hub's progress bars from its download threads.

    A bar raises Cancelled as soon as `is_cancelled()`, which stops plain HTTP downloads at the next chunk.
    """

    def __init__(self, expected_bytes: int, is_cancelled: Callable[[], bool]) -> None:
        self.expected_bytes = expected_bytes
        self.is_cancelled = is_cancelled
        self.done_bytes = 0

    def percent(self) -> float:
        """Below 100 until the download returns: the expected size is approximate."""
        return round(min(99.0, 100.0 * self.done_bytes / max(1, self.expected_bytes)), 1)

    def stage(self, repo_id: str) -> str:
        return f"Downloading {repo_id}: {format_size(self.done_bytes)} of about {format_size(self.expected_bytes)}"

    def record(self, done: float, total: float | None) -> None:
        self.done_bytes = max(self.done_bytes, int(done))
        self.expected_bytes = max(self.expected_bytes, int(total or 0))

    def progress_bar_class(self) -> type:
        """A silent tqdm class for snapshot_download's `tqdm_class` that reports its byte bars here."""
        from tqdm.auto import tqdm

        tally = self

        class ProgressBar(tqdm):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs.pop("name", None)
                self.counts_bytes = kwargs.get("unit") == "B"
                self.done = float(kwargs.get("initial") or 0)
                super().__init__(*args, **{**kwargs, "disable": True})

            def update(self, n: float | None = 1) -> bool | None:
                if tally.is_cancelled():
                    raise Cancelled()
                self.done += n or 0
                if self.counts_bytes:
                    tally.record(self.done, self.total)
                return super().update(n)

        return ProgressBar


def offline_message(model: CatalogueModel) -> str:
    return (f"Cannot download {model.repo_id}: the Hugging Face hub cannot be reached (HF_HUB_OFFLINE is set, "
            f"or there is no connection to {HUB_URL}). Connect this computer to the internet and try again, or "
            "download the model on a connected computer, copy its folder here and choose it with "
            "'Use a local folder…'.")


def download_error(model: CatalogueModel, error: BaseException) -> TreesegError:
    """What a failed download means for the user: gated access, no such model, offline, disk, or the error."""
    from .core.models import classify_hub_error, explain_load_failure

    if isinstance(error, TreesegError):
        return error
    kind = classify_hub_error(error)
    if kind in ("gated", "not_found"):
        return ModelUnavailableError(explain_load_failure(model.repo_id, error))
    if kind == "offline":
        return ModelUnavailableError(offline_message(model))
    if isinstance(error, OSError) and error.strerror:
        return OutputError(f"Cannot write {model.repo_id} into the Hugging Face cache {hub_cache()}: "
                           f"{error.strerror}.")
    return ModelUnavailableError(f"Downloading {model.repo_id} failed: {type(error).__name__}: {error}")


def _check_disk_space(model: CatalogueModel) -> None:
    free = disk_free_bytes(hub_cache())
    still_needed = model.download_bytes - folder_bytes(repo_cache_folder(model.repo_id))
    if free is not None and free < still_needed:
        raise OutputError(f"{model.name} needs about {format_size(still_needed)} of disk space in "
                          f"{hub_cache()}; only {format_size(free)} is free.")


def _has_weights(repo: Any) -> bool:
    """Whether a cached repository has a revision with config.json and safetensors weights."""
    for revision in repo.revisions:
        names = {file.file_name for file in revision.files}
        if "config.json" in names and any(name.endswith(".safetensors") for name in names):
            return True
    return False
