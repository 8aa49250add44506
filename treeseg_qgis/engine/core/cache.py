"""The feature cache: extracted features kept on disk, so a re-run skips the model.

An entry is keyed by everything that changes the features: every file the input
raster reads (a VRT's sources too) and every weight file, each by size, times and
a sampled hash; bands and scaling, method, model and revision, precision, stride,
tiling, PCA size, sampling and seed. Entries live in one folder the user can see
and clear (default `~/.cache/treeseg/features`, or $XDG_CACHE_HOME); past its
size cap the least recently used entries go first.

An entry is built aside (`<key>.building-<pid>-<random>`) and renamed when
complete, under a per-key lock: a second run on the same key waits and then
reads it. A corrupt or incomplete entry is discarded with a warning and rebuilt;
a cache folder that cannot be written, or lacks the space, raises CacheUnavailable
(the run goes on without the cache).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ...locks import FileLock, lock_is_held
from ...memory import folder_bytes
from .errors import Cancelled
from .store import SAMPLES, SUMMARY, FeatureStore

DEFAULT_CACHE_MEGABYTES = 2048
SAMPLED_CHUNKS = 16
CHUNK_BYTES = 65536
SPARE_BYTES = 64 * 1024 * 1024
WAIT_SECONDS = 0.25
BUILDING = ".building-"
"""What names an entry being built aside: `<digest>.building-<pid>-<random>`."""

log = logging.getLogger("treeseg")


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "treeseg" / "features"


class CacheUnavailable(Exception):
    """The cache folder cannot take this run's features (read-only, full, not creatable)."""


class CacheEntry:
    """One key's entry while a run uses it: `state` is 'hit' (read the store) or 'miss' (fill it)."""

    def __init__(self, final: Path, building: Path | None, lock: FileLock) -> None:
        self.final, self.building, self._lock = final, building, lock
        self.state = "hit" if building is None else "miss"
        self.store = FeatureStore(final if building is None else building, home=final)

    def publish(self) -> None:
        """Make a filled entry visible to later runs (a rename); an unfinished one is dropped by `close`."""
        if self.building is None or not self.store.complete:
            return
        try:
            os.replace(self.building, self.final)
            self.building = None
        except OSError as error:
            log.warning("The features could not be kept in the cache (%s); the next run extracts them again.",
                        error.strerror)

    def close(self) -> None:
        """Remove an unpublished entry and give the key's lock up."""
        if self.building is not None:
            shutil.rmtree(self.building, ignore_errors=True)
        self._lock.release(remove=True)


class FeatureCache:
    """A folder of FeatureStores, one per key, with a size cap."""

    def __init__(self, root: str | Path | None = None, max_megabytes: int = DEFAULT_CACHE_MEGABYTES) -> None:
        self.root = Path(root) if root else default_cache_root()
        self.max_bytes = max_megabytes * 1024 * 1024

    def open(self, key: dict, needed_bytes: int = 0, is_cancelled: Callable[[], bool] | None = None,
             on_wait: Callable[[], None] | None = None) -> CacheEntry:
        """The entry for `key`, its lock held (waiting while another run holds it).

        Raises CacheUnavailable when the folder cannot be written or has less than
        `needed_bytes` free for a new entry, Cancelled when cancelled while waiting.
        """
        try:
            digest, lock = lock_key(self.root, key, is_cancelled, on_wait)
        except OSError as error:
            raise CacheUnavailable(f"{self.root}: {error.strerror}") from error
        final = self.root / digest
        try:
            if final.is_dir():
                problem = entry_problem(final)
                if problem is None and not FeatureStore(final).extractor().get("untrained"):
                    os.utime(final)
                    return CacheEntry(final, None, lock)
                if problem is not None:
                    log.warning("The cached features in %s were unusable (%s): discarded, extracting again.",
                                final, problem)
                shutil.rmtree(final, ignore_errors=True)
            free = shutil.disk_usage(self.root).free
            if free < needed_bytes + SPARE_BYTES:
                raise OSError(errno.ENOSPC, f"not enough free space: {free // 2**20} MB free, about "
                                            f"{needed_bytes // 2**20 + SPARE_BYTES // 2**20} MB needed")
            return CacheEntry(final, building_folder(self.root, digest, key), lock)
        except OSError as error:
            lock.release(remove=True)
            raise CacheUnavailable(f"{self.root}: {error.strerror}") from error
        except BaseException:
            lock.release(remove=True)
            raise

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove dead runs' leftovers, then least recently used entries until the cache fits its cap;
        returns the entries that went. Entries in use (locked) stay."""
        self.remove_dead_builds()
        entries = sorted(finished_entries(self.root), key=lambda e: e.stat().st_mtime)
        sizes = {entry: folder_bytes(entry) for entry in entries}
        total = sum(sizes.values())
        removed = []
        for entry in entries:
            if total <= self.max_bytes:
                break
            if keep is not None and entry.resolve() == keep.resolve():
                continue
            if lock_is_held(self.root / f"{entry.name}.lock"):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            total -= sizes[entry]
            removed.append(entry)
        return removed

    def remove_dead_builds(self) -> None:
        remove_dead_builds(self.root)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def size_bytes(self) -> int:
        return folder_bytes(self.root)


def lock_key(root: Path, key: dict, is_cancelled: Callable[[], bool] | None = None,
             on_wait: Callable[[], None] | None = None) -> tuple[str, FileLock]:
    """The digest that names `key`'s entry in `root` and the key's lock, held: `root` made, dead runs'
    leftovers removed, waiting while another run holds the lock (Cancelled when cancelled meanwhile).
    OSError where `root` cannot be written."""
    digest = key_digest(key)
    root.mkdir(parents=True, exist_ok=True)
    remove_dead_builds(root)
    lock = FileLock(root / f"{digest}.lock")
    while not lock.acquire():
        if is_cancelled is not None and is_cancelled():
            raise Cancelled()
        if on_wait is not None:
            on_wait()
        time.sleep(WAIT_SECONDS)
    return digest, lock


def key_digest(key: dict) -> str:
    """The name of `key`'s entry in its cache folder."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def building_folder(root: Path, digest: str, key: dict) -> Path:
    """A new folder in `root` to build the key's entry aside in (`remove_dead_builds` knows its name), the key
    written in it."""
    building = root / f"{digest}{BUILDING}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    building.mkdir()
    (building / "key.json").write_text(json.dumps(key, indent=1, sort_keys=True, default=str))
    return building


def finished_entries(root: Path) -> list[Path]:
    """The entries of `root` (folders named by their key's digest), without the builds in progress and the
    locks."""
    return [entry for entry in root.iterdir() if entry.is_dir() and "." not in entry.name]


def remove_dead_builds(root: Path) -> None:
    """Remove the `<key>.building-*` folders in `root` that killed runs left unfinished (their key's lock
    is no longer held)."""
    for leftover in root.glob(f"*{BUILDING}*"):
        if not lock_is_held(root / (leftover.name.split(".")[0] + ".lock")):
            shutil.rmtree(leftover, ignore_errors=True)


def folder_problem(check: Callable[[], str | None], unreadable: tuple[type[Exception], ...]) -> str | None:
    """What `check()` found wrong with a cached folder, or why it could not read it, in one line: a missing file
    by its name, an `unreadable` error by its kind and message."""
    try:
        return check()
    except FileNotFoundError as error:
        return f"{Path(error.filename or '?').name} is missing"
    except unreadable as error:
        return f"{type(error).__name__}: {error}"


def entry_problem(folder: Path) -> str | None:
    """Why a cache entry cannot be used (None when it is complete and whole)."""
    def check() -> str | None:
        summary = json.loads((folder / SUMMARY).read_text())
        extractor, tiles = summary["extractor"], summary["tiles"]
        if int(extractor["stride"]) < 1 or int(extractor["cell_size"]) < 1:
            return "features.json has no stride or cell size"
        for name, size in tiles.items():
            if (folder / name).stat().st_size != size:
                return f"{name} has the wrong size"
        with np.load(folder / SAMPLES) as data:
            if len(data["samples"]) != len(data["exg"]):
                return f"{SAMPLES} is incomplete"
        return None

    return folder_problem(check, (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile))


def file_identity(path: str | Path) -> dict:
    """What identifies a file's content without reading all of it: size, times and a sampled hash."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    digest = hashlib.sha256()
    with open(real, "rb") as stream:
        for index in range(SAMPLED_CHUNKS):
            stream.seek(stat.st_size * index // SAMPLED_CHUNKS)
            digest.update(stream.read(CHUNK_BYTES))
        stream.seek(max(0, stat.st_size - CHUNK_BYTES))
        digest.update(stream.read(CHUNK_BYTES))
    return {"path": real, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns,
            "sample": digest.hexdigest()[:16]}
