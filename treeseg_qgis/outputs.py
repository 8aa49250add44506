"""The files one run writes: their names, the checks on their paths and the transaction that
puts them in place. Standard library only: the QGIS side uses it too."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from .atomic import file_mode, partial_path, write_atomically
from .locks import FileLock, lock_is_held

UNTRAINED_TAG = "UNTRAINED"
STAGING_PREFIX = ".treeseg-staging-"
LOCK_NAME = "owner.lock"
COMMIT_JOURNAL = "commit.json"
DEFAULT_CLASS = "tree"
CLASS_COLOURS = ((34, 139, 34), (160, 160, 160), (139, 90, 43), (70, 130, 180), (255, 215, 0), (128, 0, 128),
                 (210, 105, 30), (0, 206, 209), (220, 20, 60), (154, 205, 50))
"""The colour (RGB) of each taught class in a class raster, by its value 1, 2, … (cycled): the panel's class list
shows the same."""
UNREFERENCED_GEOTRANSFORM = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
"""The grid of a raster without a geotransform, as QGIS draws it (pixels 1 × -1 from the origin; GDAL's own default
has the rows going up): its example points are read on it and its outputs are written on it, over the input."""
MODEL_SUFFIX = ".treeseg"
"""A saved model's file: a survey cluster model or a taught classifier."""
SUFFIXES = {
    "clusters": "_clusters.tif",
    "trees": "_trees.tif",
    "polygons": "_polygons.gpkg",
    "crowns": "_crowns.gpkg",
    "features": "_features.tif",
    "height": "_height.tif",
    "preview": "_preview.png",
    "elbow": "_elbow.png",
    "record": "_run.json",
    "similarity": "_similarity.tif",
    "taught_trees": "_taught_trees.tif",
    "teach_record": "_teach.json",
    "classes": "_classes.tif",
    "class_probabilities": "_class_probabilities.tif",
    "class_polygons": "_class_polygons.gpkg",
}
OUTPUT_KINDS = tuple(SUFFIXES)
SEGMENT_KINDS = OUTPUT_KINDS[:9]
TEACH_KINDS = OUTPUT_KINDS[9:]


def raster_geotransform(dataset: Any) -> tuple[float, ...]:
    """A GDAL dataset's geotransform as QGIS draws the raster: UNREFERENCED_GEOTRANSFORM when it has none (the
    engine writes outputs on it and the QGIS side maps points on it, so both sides agree)."""
    return tuple(dataset.GetGeoTransform(can_return_null=True) or UNREFERENCED_GEOTRANSFORM)


class NamedRun(Protocol):
    """What naming a run's outputs reads of its parameters (a params.SegmentationParams; params.py imports this
    module, not the other way round)."""

    input_path: str
    output_dir: str
    method: str
    output_stem: str | None
    outputs: Any


@dataclass(frozen=True)
class OutputPaths:
    """The files one run writes: named after one stem in the output folder, unless given."""

    clusters: Path
    trees: Path
    polygons: Path
    crowns: Path
    features: Path
    height: Path
    preview: Path
    elbow: Path
    record: Path
    similarity: Path
    taught_trees: Path
    teach_record: Path
    classes: Path
    class_probabilities: Path
    class_polygons: Path

    @classmethod
    def for_params(cls, params: NamedRun, untrained: bool) -> OutputPaths:
        """Paths of a run; the paths set in `params.outputs` win over the default names."""
        stem = params.output_stem or Path(params.input_path).stem
        if params.method != "dinov3" and not params.output_stem:
            stem = f"{stem}_{params.method}"
        if untrained:
            stem = f"{stem}_{UNTRAINED_TAG}"
        folder = Path(params.output_dir)
        return cls(**{kind: Path(getattr(params.outputs, kind) or folder / f"{stem}{SUFFIXES[kind]}")
                      for kind in OUTPUT_KINDS})

    def staged(self, transaction: OutputTransaction) -> OutputPaths:
        """The same files in the transaction's staging folders."""
        return OutputPaths(**{kind: transaction.staged(getattr(self, kind)) for kind in OUTPUT_KINDS})

    def stale(self, params: NamedRun, kinds: tuple[str, ...], produced: list[Path]) -> list[Path]:
        """Default-named files of `kinds` that this run does not make (an earlier run's, removed at commit)."""
        return [getattr(self, kind) for kind in kinds
                if not getattr(params.outputs, kind) and getattr(self, kind) not in produced]

    def all(self) -> list[Path]:
        return [getattr(self, kind) for kind in OUTPUT_KINDS]

    def as_dict(self) -> dict[str, str]:
        return {kind: str(getattr(self, kind)) for kind in OUTPUT_KINDS}


def temporary_files(path: Path) -> list[Path]:
    """The temporary files written before `path` is renamed into place (atomic.py)."""
    partial = Path(partial_path(path))
    return [partial, partial.with_name(partial.name + ".aux.xml")]


def remove_files(paths: list[Path]) -> None:
    """Delete finished outputs (with their .aux.xml) and their temporary files."""
    for path in paths:
        for leftover in [path, path.with_name(path.name + ".aux.xml"), *temporary_files(path)]:
            leftover.unlink(missing_ok=True)


def output_folders(params: NamedRun) -> set[Path]:
    """Every folder a run with these parameters writes into."""
    return {path.parent for untrained in (False, True) for path in OutputPaths.for_params(params, untrained).all()}


def check_output_paths(inputs: list[str], outputs: list[str]) -> None:
    """Refuse an output that would overwrite an input, one whose path holds something other than a file (a folder,
    a pipe, a device: a run's commit would replace it), and two outputs on one path (OutputPathError).

    The command line, the panel and Processing call it before any work.
    """
    def identity(path: str) -> str:
        return os.path.normcase(os.path.realpath(path))

    input_ids = {identity(path): path for path in inputs if path and not path.startswith("/vsi")}
    seen: dict[str, str] = {}
    for path in outputs:
        if not path:
            continue
        key = identity(path)
        if key in input_ids:
            raise OutputPathError(f"The output {path} would overwrite the input {input_ids[key]}: "
                                  "choose another output file or folder.")
        mode = file_mode(path)
        if mode is not None and not stat.S_ISREG(mode):
            raise OutputPathError(f"The output {path} exists and is not a regular file (a folder, pipe or device): "
                                  "choose another output folder or name.")
        if key in seen:
            raise OutputPathError(f"Two outputs are set to the same file {path}: give each output its own path.")
        seen[key] = path


def check_run_paths(params: NamedRun, kinds: tuple[str, ...] = SEGMENT_KINDS,
                    inputs: tuple[str, ...] = ()) -> None:
    """`check_output_paths` for a run's parameters, with or without the untrained tag; `inputs` are
    files read besides `input_path` (a VRT's sources, a layer's file)."""
    for untrained in (False, True):
        paths = OutputPaths.for_params(params, untrained).as_dict()
        check_output_paths([params.input_path, *inputs], [paths[kind] for kind in kinds])


def check_output_file(path: str, suffix: str, what: str) -> None:
    """A single file a command writes (`fit`'s cluster model): it must end in `suffix`, not be a folder or a
    pipe, and its folder must exist and be writable (OutputPathError, before any work). With the suffix
    enforced, a shell glob after `--out` (`--out flight/*.tif`) cannot name a raster as the output."""
    if not path.lower().endswith(suffix):
        raise OutputPathError(f"The {what} {path} must end in {suffix}: name the file to write, e.g. "
                              f"survey{suffix}.")
    target = Path(path)
    if target.is_dir():
        raise OutputPathError(f"The {what} {path} is a folder: name the file to write, e.g. "
                              f"{target / ('survey' + suffix)}.")
    if target.exists() and not target.is_file():
        raise OutputPathError(f"The {what} {path} exists and is not a regular file (a pipe or device): "
                              "choose another file.")
    folder = target.parent
    if not folder.is_dir():
        raise OutputPathError(f"The folder of the {what}, {folder}, does not exist: create it or choose another.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"The folder of the {what}, {folder}, is not writable: choose another folder.")


def check_output_folder(folder: str | Path) -> None:
    """An output folder: created if missing, and writable (OutputPathError, before any work)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputPathError(f"Cannot create the output folder {folder}: {error.strerror}. Choose a folder you "
                              "can write to.") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"The output folder {folder} is not writable: choose another folder.")


class OutputPathError(ValueError):
    """An output path that would overwrite an input or another output."""


class OutputTransaction:
    """The files of one run become visible together, or not at all.

    Each output is written into a hidden staging folder beside its final path
    (`.treeseg-staging-<pid>-<random>`, locked while the run lives). `commit`
    moves the staged files into place (replacing the previous run's files of the
    same names and removing `stale` ones the new run does not make); `abort`
    removes the staging folders. A process killed mid-run leaves only its staging
    folder, which `recover_outputs` removes (or, if the commit had begun, finishes).
    """

    def __init__(self, finals: list[Path]) -> None:
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._staging: dict[Path, Path] = {}
        self._locks: list[FileLock] = []
        try:
            for folder in dict.fromkeys(path.parent for path in finals):
                recover_outputs(folder)
                staging = folder / f"{STAGING_PREFIX}{self.token}"
                staging.mkdir()
                self._staging[folder] = staging
                lock = FileLock(staging / LOCK_NAME)
                lock.acquire()
                self._locks.append(lock)
        except BaseException:
            self.abort()
            raise

    def staged(self, final: Path) -> Path:
        """Where the run writes the file that becomes `final`."""
        return self._staging[final.parent] / final.name

    def commit(self, produced: list[Path], stale: list[Path]) -> None:
        """Move the `produced` finals' staged files (with sidecars) into place; delete `stale` finals."""
        moves = [(str(self.staged(path).with_name(name)), str(path.with_name(name)))
                 for path in produced for name in (path.name, path.name + ".aux.xml")
                 if self.staged(path).with_name(name).exists()]
        moves += [(None, str(path.with_name(name))) for path in stale for name in (path.name, path.name + ".aux.xml")]
        moves += [(None, str(path.with_name(path.name + ".aux.xml"))) for path in produced
                  if not self.staged(path).with_name(path.name + ".aux.xml").exists()]
        write_atomically(next(iter(self._staging.values())) / COMMIT_JOURNAL, json.dumps(moves))
        _apply(moves)
        self.abort()

    def abort(self) -> None:
        """Remove the staging folders (nothing of this run is left)."""
        for lock in self._locks:
            lock.release()
        self._locks = []
        for staging in self._staging.values():
            shutil.rmtree(staging, ignore_errors=True)
        self._staging = {}


def recover_outputs(folder: Path) -> None:
    """Clean up after runs that died in `folder`: remove their staging folders, finishing a begun commit."""
    if not folder.is_dir():
        return
    for staging in folder.glob(f"{STAGING_PREFIX}*"):
        if lock_is_held(staging / LOCK_NAME):
            continue
        for journal in staging.glob(COMMIT_JOURNAL):
            try:
                moves = json.loads(journal.read_text())
            except (OSError, ValueError):
                continue
            _apply([(source, target) for source, target in moves])
        shutil.rmtree(staging, ignore_errors=True)


def _apply(moves: list[tuple[str | None, str]]) -> None:
    """Rename each staged source onto its target; a None source deletes the target. Repeatable."""
    for source, target in moves:
        if source is None:
            Path(target).unlink(missing_ok=True)
        elif os.path.exists(source):
            if target.endswith(".gpkg"):
                for suffix in ("-journal", "-wal", "-shm"):
                    Path(target + suffix).unlink(missing_ok=True)
            os.replace(source, target)


def class_slug(class_name: str) -> str:
    """A class name as a file-name part: 'Dead tree' → 'dead_tree'."""
    slug = re.sub(r"[^0-9a-z]+", "_", class_name.strip().lower()).strip("_")
    return slug or DEFAULT_CLASS


def taught_class_paths(params: NamedRun, untrained: bool, class_name: str) -> OutputPaths:
    """A teach run's paths; for a class other than trees `<stem>_<class>_similarity.tif`,
    `<stem>_taught_<class>.tif` and `<stem>_<class>_teach.json` (paths set in `params.outputs` still win)."""
    paths = OutputPaths.for_params(params, untrained)
    slug = class_slug(class_name)
    if slug == DEFAULT_CLASS:
        return paths
    suffixes = {"similarity": f"_{slug}_similarity.tif", "taught_trees": f"_taught_{slug}.tif",
                "teach_record": f"_{slug}_teach.json"}
    renamed = {kind: path.with_name(path.name[: -len(SUFFIXES[kind])] + suffix)
               for kind, suffix in suffixes.items()
               if not getattr(params.outputs, kind) and (path := getattr(paths, kind)).name.endswith(SUFFIXES[kind])}
    return replace(paths, **renamed)
