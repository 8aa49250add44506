"""The int8 CPU forward: the backbone exported to ONNX, its weights quantised to int8 as ONNX Runtime's
dynamic quantisation does (activations quantised on the fly), kept as ONNX Runtime's graph optimisations leave
it (a session opens in a fifth of the time), run in an ONNX Runtime session; the export holds no copy of the
weights (core/onnx_export.py).

Chosen by measurement (docs/BENCHMARKS.md, issue #16): the only CPU variant at least 1.8× faster than
float32 with the features kept. The export is made once per weights, software versions and tile shape,
and kept in a folder beside the feature cache (`~/.cache/treeseg/onnx`): built aside
(`<key>.building-<pid>-<random>`) and renamed when complete, under a per-key lock, as the feature cache
does (core/cache.py); a cached model whose bytes no longer match its manifest is rebuilt. Untrained
weights are never cached (nothing identifies them): they are exported for this load only.

A network made `from_export` starts from the cached export alone (no torch, no transformers, no weights read):
the float network is loaded only if a tile shape's export has to be built.

Whole tiles of the tile size run the export of their shape. Tiles cropped to their valid pixels, and the one tile of a
raster smaller than a tile (core/tiling.py `runs_whole`), run one more export, `ANY_SHAPE`: the graph traced with its
height and width left free (DINOv3's RoPE positions are computed from the input's size), which serves every crop of
every tile size. Whole tiles keep their shape's export (their features bit-identical): at 512 × 512 the free graph was
not shown as fast (0 to 5 % slower in alternating pairs; the shape's graph folds the RoPE tables and shape
arithmetic). Its features at crop shapes agree with the float model as closely as a shape's own export's
(docs/BENCHMARKS.md, "int8 crops"). It is built the first time a run crops (once per machine and weights, as a tile
shape's export), so a raster's features never depend on what the export cache held before.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np

from .cache import building_folder, default_cache_root, finished_entries, folder_problem, key_digest, lock_key
from .errors import Cancelled
from .heap import release_free_memory

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

EXPORT_FORMAT = 3
"""2: the graph traced without weights, the weights quantised one at a time into a data file (onnx_export.py);
3: the model kept as ONNX Runtime's graph optimisations leave it (`_optimise`)."""
OPSET = 17
MODEL_FILE = "model-int8.onnx"
QUANTISED_FILE = "quantised.onnx"
"""The quantised model before `_optimise`, only while an export is built."""
MANIFEST = "manifest.json"
INPUT, OUTPUT = "pixel_values", "last_hidden_state"
CANCEL_POLL_SECONDS = 0.05
FAST_INT8_CAPABILITIES = ("AVX2", "AVX512")
ANY_SHAPE = None
"""The export key's shape of the export that runs crops of any shape (height and width free)."""
TRACED_CROP_SHAPE = (384, 256)
"""The example the any-shape graph is traced at: not square, so no size of it stands for both axes."""


@functools.lru_cache(maxsize=1)
def runtime_version() -> str | None:
    """ONNX Runtime's version when it and `onnx` (its quantiser needs it) import, else None."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        return None
    return str(onnxruntime.__version__)


def runtime_name() -> str:
    return f"ONNX Runtime {runtime_version()}"


@functools.lru_cache(maxsize=1)
def cpu_has_fast_int8() -> bool:
    """Whether this CPU has the int8 dot products ONNX Runtime's quantised kernels are fast with (AVX2,
    AVX-512 and its VNNI), as torch's own CPU dispatch sees it: on Linux read from the CPU's flags as torch
    reads them (AVX2 with FMA at least), unless ATEN_CPU_CAPABILITY overrides torch's choice."""
    if sys.platform.startswith("linux") and "ATEN_CPU_CAPABILITY" not in os.environ:
        try:
            flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        except (OSError, StopIteration):
            pass
        else:
            return {"avx2", "fma"} <= set(flags.split(":", 1)[-1].split())
    import torch

    return torch.backends.cpu.get_cpu_capability() in FAST_INT8_CAPABILITIES


@functools.lru_cache(maxsize=1)
def torch_version() -> str:
    """torch's version as its package says it (`2.13.0+cpu`), read without importing torch."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        import torch

        return str(torch.__version__)


def export_key(weights: dict, shape: tuple[int, int] | None) -> dict:
    """What names a cached export: the weights' identity (core/models.py weights_identity), the tile shape
    (`ANY_SHAPE`: the graph of free height and width, eager attention) and every piece of software that shapes
    the file."""
    key = {"format": EXPORT_FORMAT, "weights": weights, "shape": list(shape) if shape else "any", "opset": OPSET,
           "onnxruntime": runtime_version(), "torch": torch_version(), "quantisation": "dynamic int8"}
    return key if shape else {**key, "attention": "eager", "traced_at": list(TRACED_CROP_SHAPE)}


def export_is_cached(weights: dict, shape: tuple[int, int] | None, root: Path | None = None) -> bool:
    """Whether an export for these weights and tile shape (or `ANY_SHAPE`) is in the export cache (checked when
    it is opened)."""
    return ((root or default_export_root()) / key_digest(export_key(weights, shape)) / MANIFEST).is_file()


def default_export_root() -> Path:
    """`~/.cache/treeseg/onnx` (or under $XDG_CACHE_HOME), beside the feature cache."""
    return default_cache_root().parent / "onnx"


class OnnxInt8Network:
    """The backbone as an int8 ONNX Runtime session, answering like the transformers model
    (`last_hidden_state`). One image per run: the activations are quantised with one scale per tensor, so a
    batch would make an image's features depend on its batch mates."""

    def __init__(self, network: torch.nn.Module | None, weights: dict | None, root: Path | None = None,
                 load_network: Callable[[], torch.nn.Module] | None = None) -> None:
        self._network = network
        self._load_network = load_network
        self.config = getattr(network, "config", None)  # the transformers configuration, where it is loaded
        self._weights = weights
        self._root = root or default_export_root()
        self._sessions: dict[tuple[int, int] | None, object] = {}
        self._folders: dict[tuple[int, int] | None, Path] = {}  # each shape's export, once loaded
        self._scratch: tempfile.TemporaryDirectory | None = None
        self._is_cancelled: Callable[[], bool] = lambda: False
        self.exports = 0

    @classmethod
    def from_export(cls, weights: dict, load_network: Callable[[], torch.nn.Module],
                    root: Path | None = None) -> OnnxInt8Network:
        """The network of cached exports of `weights`; `load_network()` gives the float network where an export
        must be built (a tile shape not cached yet, or a damaged export)."""
        return cls(None, weights, root, load_network)

    @property
    def network(self) -> torch.nn.Module:
        """The float network, loaded now if it was not."""
        if self._network is None:
            self._network = self._load_network()
            self.config = self._network.config
        return self._network

    def stop_when(self, is_cancelled: Callable[[], bool]) -> None:
        """Stop a run as soon as `is_cancelled()`: between images and inside a session run (RunOptions.terminate);
        the forward then raises Cancelled."""
        self._is_cancelled = is_cancelled

    def __call__(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        """The transformers model's answer for a torch batch."""
        import torch

        return SimpleNamespace(last_hidden_state=torch.from_numpy(self.hidden_states(pixel_values.float().numpy())))

    def hidden_states(self, pixel_values: np.ndarray, cropped: bool = False) -> np.ndarray:
        """The last hidden state (B, tokens, D) of a float32 (B, 3, H, W) batch, one image per session run: whole
        tiles by their shape's export, `cropped` tiles by the any-shape export."""
        import onnxruntime
        from onnxruntime.capi.onnxruntime_pybind11_state import Fail, RuntimeException

        hidden = []
        for image in pixel_values:
            self._stop_if_cancelled()
            session = self._session(ANY_SHAPE if cropped else (int(image.shape[-2]), int(image.shape[-1])))
            options = onnxruntime.RunOptions()
            try:
                with _terminate_when(options, self._is_cancelled):
                    (tokens,) = session.run([OUTPUT], {INPUT: np.ascontiguousarray(image[None], np.float32)}, options)
            except (Fail, RuntimeException) as error:
                if options.terminate:
                    raise Cancelled() from None
                if "alloc" in str(error).lower():  # features.py halves the batch, then gives up clearly
                    raise RuntimeError(f"out of memory in ONNX Runtime: {error}") from error
                raise
            hidden.append(tokens)
        return np.concatenate(hidden)

    def _session(self, shape: tuple[int, int] | None):
        """The open session for `shape`; a closed one reopens from the folder it was loaded from, never
        rebuilt."""
        if shape not in self._sessions:
            known = self._folders.get(shape)
            reopen = known is not None and (known / MODEL_FILE).is_file()
            self._sessions[shape] = self._load(known, shape) if reopen else self._open(shape)
        return self._sessions[shape]

    def _open(self, shape: tuple[int, int] | None):
        """The session for one tile shape (or `ANY_SHAPE`): from the export cache, or exported and quantised
        now."""
        if self._weights is None:
            return self._load(self._build(self._scratch_folder(), shape), shape)
        key = export_key(self._weights, shape)
        try:
            digest, lock = lock_key(self._root, key, self._is_cancelled)
        except OSError as error:
            return self._for_this_run_only(shape, error)
        final = self._root / digest
        try:
            problem = export_problem(final) if final.exists() else "not built yet"
            if problem is None:
                with contextlib.suppress(OSError):
                    os.utime(final)
                log.info("Using the cached int8 ONNX model %s", final)
                return self._load(final, shape)
            if final.exists():
                log.warning("The cached int8 ONNX model %s was unusable (%s): exporting it again.", final, problem)
                shutil.rmtree(final, ignore_errors=True)
            try:
                building = building_folder(self._root, digest, key)
                try:
                    self._build(building, shape)
                    os.replace(building, final)
                finally:
                    shutil.rmtree(building, ignore_errors=True)
            except OSError as error:
                return self._for_this_run_only(shape, error)
            with contextlib.suppress(OSError):  # a clean-up: the export is built, never built again for it
                _remove_superseded(self._root, key, final)
            return self._load(final, shape)
        finally:
            lock.release(remove=True)

    def _for_this_run_only(self, shape: tuple[int, int] | None, error: OSError):
        """The session of an export in a scratch folder, where the export cache cannot keep it."""
        log.warning("The int8 model cannot be kept in %s (%s): exporting it for this run only.",
                    self._root, error.strerror)
        return self._load(self._build(self._scratch_folder(), shape), shape)

    def _build(self, folder: Path, shape: tuple[int, int] | None) -> Path:
        """Export the network's graph for one tile shape (`ANY_SHAPE`: height and width free, traced at
        `TRACED_CROP_SHAPE` with eager attention, whose scale the graph keeps constant), write it with its
        weights quantised to int8 (in bounded memory: core/onnx_export.py), write the manifest."""
        import torch

        from .onnx_export import LastHiddenState, weightless_copy, write_int8_model

        self._close_sessions()
        started = time.perf_counter()
        graph = folder / "graph.onnx"
        example = torch.zeros(1, 3, *(shape or TRACED_CROP_SHAPE))
        float_network = self.network
        shadow = weightless_copy(float_network, attention=None if shape else "eager")
        free = {} if shape else {"dynamic_axes": {INPUT: {2: "height", 3: "width"}, OUTPUT: {1: "tokens"}}}
        with torch.inference_mode(False), torch.no_grad(), _quiet():
            torch.onnx.export(LastHiddenState(shadow).eval(), (example,), str(graph), input_names=[INPUT],
                              output_names=[OUTPUT], dynamo=False, opset_version=OPSET, export_params=False,
                              do_constant_folding=False, **free)
        gc.collect()
        release_free_memory()  # the tracing's memory, before the weights are read
        self._stop_if_cancelled()
        network = LastHiddenState(float_network)
        write_int8_model(graph, {**dict(network.named_parameters()), **dict(network.named_buffers())},
                         folder / QUANTISED_FILE)
        graph.unlink()
        release_free_memory()
        self._stop_if_cancelled()
        _optimise(folder / QUANTISED_FILE, folder / MODEL_FILE)
        files = {path.name: _file_digest(path) for path in sorted(folder.iterdir()) if path.name != "key.json"}
        (folder / MANIFEST).write_text(json.dumps(files, indent=1))
        self.exports += 1
        log.info("Exported the model to ONNX and quantised it to int8 for %s tiles in %.1f s",
                 f"{shape[0]} × {shape[1]}" if shape else "cropped", time.perf_counter() - started)
        return folder

    def _stop_if_cancelled(self) -> None:
        """Between an export's steps: a cancelled run stops there (the caller removes the half-built export)
        rather than after the whole export, which takes minutes for the large models."""
        if self._is_cancelled():
            raise Cancelled()

    def _close_sessions(self) -> None:
        """Close the open sessions before an export is built (each reopens, when next used, from the folder it was
        loaded from: `_session`): building the any-shape export beside an open tile session peaked at 1.23× a
        cached run's memory, each export alone at 1.14× and 1.18× (docs/BENCHMARKS.md, "The export's peak
        memory")."""
        self._sessions.clear()
        gc.collect()
        release_free_memory()

    def _load(self, folder: Path, shape: tuple[int, int] | None):
        import onnxruntime

        self._folders[shape] = folder

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = cpu_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        return onnxruntime.InferenceSession(str(folder / MODEL_FILE), options, providers=["CPUExecutionProvider"])

    def _scratch_folder(self) -> Path:
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="treeseg-onnx-")
        folder = Path(self._scratch.name) / uuid.uuid4().hex[:8]
        folder.mkdir()
        return folder


def _optimise(quantised: Path, model: Path) -> None:
    """Write `quantised` as ONNX Runtime's graph optimisations leave it, to `model` (its tensors in `model`'s data
    file), and remove `quantised`. The optimisations a session otherwise made at each opening are then made once
    (ViT-S's sessions opened in 0.61 and 0.66 s, now 0.12 and 0.19 s: docs/BENCHMARKS.md); the extended level
    only, whose graph runs on any CPU (the layout optimisations that depend on this CPU are still made when a
    session opens). ONNX Runtime's failure to write it is an OSError, as the quantised model's would be
    (`SystemError : 28` its words for ENOSPC)."""
    import onnxruntime
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

    from .onnx_export import DATA_SUFFIX

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(model)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                     model.name + DATA_SUFFIX)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        onnxruntime.InferenceSession(str(quantised), options, providers=["CPUExecutionProvider"])
    except (Fail, InvalidArgument, RuntimeException) as error:
        system_error = re.search(r"SystemError : (\d+)", str(error))
        number = int(system_error.group(1)) if system_error else errno.EIO
        raise OSError(number, f"{os.strerror(number)} (writing {model.name}: {error})") from error
    quantised.unlink()
    quantised.with_name(quantised.name + DATA_SUFFIX).unlink()


def _remove_superseded(root: Path, key: dict, kept: Path) -> None:
    """Remove the exports in `root` that an earlier export format made of what `key` names (the same weights,
    tile shape and software): each is as large as the model's int8 weights, and nothing reads that format any
    more. Exports of other software versions stay: another engine beside this one may use them."""
    same = json.loads(json.dumps({**key, "format": None}, sort_keys=True, default=str))
    for folder in finished_entries(root):
        if folder == kept:
            continue
        try:
            other = json.loads((folder / "key.json").read_text())
            earlier = isinstance(other, dict) and int(other.get("format", EXPORT_FORMAT)) < EXPORT_FORMAT
        except (OSError, ValueError, TypeError):
            continue
        if earlier and {**other, "format": None} == same:
            log.info("Removing the int8 export %s of an earlier format, superseded by %s", folder, kept.name)
            shutil.rmtree(folder, ignore_errors=True)


def export_problem(folder: Path) -> str | None:
    """Why a cached export cannot be used (None when every file matches its manifest)."""
    def check() -> str | None:
        files = json.loads((folder / MANIFEST).read_text())
        if MODEL_FILE not in files:
            return f"{MANIFEST} does not list {MODEL_FILE}"
        for name, expected in files.items():
            if _file_digest(folder / name) != expected:
                return f"{name} differs from its manifest"
        return None

    return folder_problem(check, (OSError, ValueError, AttributeError))


def cpu_threads() -> int:
    """The session's threads: torch's count where torch runs here (core/devices.py sets it), else all cores."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def _terminate_when(options, is_cancelled: Callable[[], bool]) -> Iterator[None]:
    """Sets `options.terminate` from a watcher thread once `is_cancelled()`, so a session run stops mid-graph."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(CANCEL_POLL_SECONDS):
            if is_cancelled():
                options.terminate = True
                return

    watcher = threading.Thread(target=watch, name="treeseg-onnx-cancel", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Mutes the exporter's warnings and the quantiser's advice, logged straight on the root logger (both
    about their own internals, not the user's run); records of other loggers pass."""
    import warnings

    root = logging.getLogger()
    advice = logging.Filter("treeseg-never")  # a name no record has: drops every record made on the root
    root.addFilter(advice)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(advice)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return f"{path.stat().st_size}:{digest.hexdigest()}"
