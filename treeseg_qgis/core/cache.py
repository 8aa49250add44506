"""The feature cache: extracted features kept on disk, so a re-run skips the model.

An entry is keyed by everything that changes the features (the input file and
its modification time, bands and scaling, method, model and revision, stride,
tiling, PCA size, sampling and seed). Entries live in one folder the user can
see and clear (default `~/.cache/treeseg/features`, or $XDG_CACHE_HOME); when
the folder grows past its size cap the least recently used entries go first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from .store import FeatureStore

DEFAULT_CACHE_MEGABYTES = 2048


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "treeseg" / "features"


class FeatureCache:
    """A folder of FeatureStores, one per key, with a size cap."""

    def __init__(self, root: str | Path | None = None, max_megabytes: int = DEFAULT_CACHE_MEGABYTES) -> None:
        self.root = Path(root) if root else default_cache_root()
        self.max_bytes = max_megabytes * 1024 * 1024

    def store_for(self, key: dict) -> FeatureStore:
        """The store for `key`. An entry left incomplete by an interrupted run, or made with
        untrained weights (the real ones may be available now), starts again empty."""
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
        folder = self.root / digest
        store = FeatureStore(folder)
        if not store.complete or store.extractor().get("untrained"):
            shutil.rmtree(folder, ignore_errors=True)
            store = FeatureStore(folder)
            (folder / "key.json").write_text(json.dumps(key, indent=1, sort_keys=True, default=str))
        os.utime(folder)
        return store

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove least recently used entries until the cache fits its cap; returns what went."""
        entries = sorted((entry for entry in self.root.glob("*") if entry.is_dir()), key=lambda e: e.stat().st_mtime)
        sizes = {entry: _folder_size(entry) for entry in entries}
        total = sum(sizes.values())
        removed = []
        for entry in entries:
            if total <= self.max_bytes:
                break
            if keep is not None and entry.resolve() == keep.resolve():
                continue
            shutil.rmtree(entry, ignore_errors=True)
            total -= sizes[entry]
            removed.append(entry)
        return removed

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def size_bytes(self) -> int:
        return _folder_size(self.root) if self.root.exists() else 0


def _folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def file_identity(path: str) -> dict:
    """What identifies the content of an input file without reading it."""
    stat = os.stat(path)
    return {"path": os.path.realpath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
