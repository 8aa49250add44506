"""The int8 CPU forward: the backbone exported to ONNX, its weights quantised to int8 as ONNX Runtime's
dynamic quantisation does (activations quantised on the fly), run in an ONNX Runtime session; the export
holds no copy of the weights (core/onnx_export.py).

Chosen by measurement (docs/BENCHMARKS.md, issue #16): the only CPU variant at least 1.8× faster than
float32 with the features kept. The export is made once per weights, software versions and tile shape,
and kept in a folder beside the feature cache (`~/.cache/treeseg/onnx`): built aside
(`<key>.building-<pid>-<random>`) and renamed when complete, under a per-key lock, as the feature cache
does (core/cache.py); a cached model whose bytes no longer match its manifest is rebuilt. Untrained
weights are never cached (nothing identifies them): they are exported for this load only.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import torch

from .cache import building_folder, default_cache_root, lock_key
from .errors import Cancelled
from .heap import release_free_memory

log = logging.getLogger(__name__)

EXPORT_FORMAT = 2
"""2: the graph traced without weights, the weights quantised one at a time into a data file (onnx_export.py)."""
OPSET = 17
MODEL_FILE = "model-int8.onnx"
MANIFEST = "manifest.json"
INPUT, OUTPUT = "pixel_values", "last_hidden_state"
CANCEL_POLL_SECONDS = 0.05
FAST_INT8_CAPABILITIES = ("AVX2", "AVX512")


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


def cpu_has_fast_int8() -> bool:
    """Whether this CPU has the int8 dot products ONNX Runtime's quantised kernels are fast with (AVX2,
    AVX-512 and its VNNI), as torch's own CPU dispatch sees it."""
    return torch.backends.cpu.get_cpu_capability() in FAST_INT8_CAPABILITIES


def default_export_root() -> Path:
    """`~/.cache/treeseg/onnx` (or under $XDG_CACHE_HOME), beside the feature cache."""
    return default_cache_root().parent / "onnx"


class OnnxInt8Network:
    """The backbone as an int8 ONNX Runtime session, answering like the transformers model
    (`last_hidden_state`). One image per run: the activations are quantised with one scale per tensor, so a
    batch would make an image's features depend on its batch mates."""

    def __init__(self, network: torch.nn.Module, weights: dict | None, root: Path | None = None) -> None:
        self._network = network
        self.config = network.config  # the transformers configuration, as on the model it stands for
        self._weights = weights
        self._root = root or default_export_root()
        self._sessions: dict[tuple[int, int], object] = {}
        self._scratch: tempfile.TemporaryDirectory | None = None
        self._is_cancelled: Callable[[], bool] = lambda: False
        self.exports = 0

    def stop_when(self, is_cancelled: Callable[[], bool]) -> None:
        """Stop a run as soon as `is_cancelled()`: between images and inside a session run (RunOptions.terminate);
        the forward then raises Cancelled."""
        self._is_cancelled = is_cancelled

    def __call__(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        import onnxruntime
        from onnxruntime.capi.onnxruntime_pybind11_state import Fail, RuntimeException

        hidden = []
        for image in pixel_values:
            if self._is_cancelled():
                raise Cancelled()
            session = self._session((int(image.shape[-2]), int(image.shape[-1])))
            options = onnxruntime.RunOptions()
            try:
                with _terminate_when(options, self._is_cancelled):
                    (tokens,) = session.run([OUTPUT], {INPUT: image[None].float().numpy()}, options)
            except (Fail, RuntimeException) as error:
                if options.terminate:
                    raise Cancelled() from None
                if "alloc" in str(error).lower():  # features.py halves the batch, then gives up clearly
                    raise RuntimeError(f"out of memory in ONNX Runtime: {error}") from error
                raise
            hidden.append(torch.from_numpy(tokens))
        return SimpleNamespace(last_hidden_state=torch.cat(hidden))

    def _session(self, shape: tuple[int, int]):
        if shape not in self._sessions:
            self._sessions[shape] = self._open(shape)
        return self._sessions[shape]

    def _open(self, shape: tuple[int, int]):
        """The session for one tile shape: from the export cache, or exported and quantised now."""
        if self._weights is None:
            return self._load(self._build(self._scratch_folder(), shape))
        key = {"format": EXPORT_FORMAT, "weights": self._weights, "shape": list(shape), "opset": OPSET,
               "onnxruntime": runtime_version(), "torch": torch.__version__, "quantisation": "dynamic int8"}
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
                return self._load(final)
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
            return self._load(final)
        finally:
            lock.release(remove=True)

    def _for_this_run_only(self, shape: tuple[int, int], error: OSError):
        """The session of an export in a scratch folder, where the export cache cannot keep it."""
        log.warning("The int8 model cannot be kept in %s (%s): exporting it for this run only.",
                    self._root, error.strerror)
        return self._load(self._build(self._scratch_folder(), shape))

    def _build(self, folder: Path, shape: tuple[int, int]) -> Path:
        """Export the network's graph for one tile shape, write it with its weights quantised to int8 (in
        bounded memory: core/onnx_export.py), write the manifest."""
        from .onnx_export import weightless_copy, write_int8_model

        started = time.perf_counter()
        graph = folder / "graph.onnx"
        example = torch.zeros(1, 3, *shape)
        with torch.inference_mode(False), torch.no_grad(), _quiet():
            torch.onnx.export(_LastHiddenState(weightless_copy(self._network)).eval(), (example,), str(graph),
                              input_names=[INPUT], output_names=[OUTPUT], dynamo=False, opset_version=OPSET,
                              export_params=False, do_constant_folding=False)
        gc.collect()
        release_free_memory()  # the tracing's memory, before the weights are read
        network = _LastHiddenState(self._network)
        write_int8_model(graph, {**dict(network.named_parameters()), **dict(network.named_buffers())},
                         folder / MODEL_FILE)
        graph.unlink()
        release_free_memory()
        files = {path.name: _file_digest(path) for path in sorted(folder.iterdir()) if path.name != "key.json"}
        (folder / MANIFEST).write_text(json.dumps(files, indent=1))
        self.exports += 1
        log.info("Exported the model to ONNX and quantised it to int8 for %d × %d tiles in %.1f s",
                 shape[0], shape[1], time.perf_counter() - started)
        return folder

    def _load(self, folder: Path):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        return onnxruntime.InferenceSession(str(folder / MODEL_FILE), options, providers=["CPUExecutionProvider"])

    def _scratch_folder(self) -> Path:
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="treeseg-onnx-")
        folder = Path(self._scratch.name) / uuid.uuid4().hex[:8]
        folder.mkdir()
        return folder


def export_problem(folder: Path) -> str | None:
    """Why a cached export cannot be used (None when every file matches its manifest)."""
    try:
        files = json.loads((folder / MANIFEST).read_text())
        if MODEL_FILE not in files:
            return f"{MANIFEST} does not list {MODEL_FILE}"
        for name, expected in files.items():
            if _file_digest(folder / name) != expected:
                return f"{name} differs from its manifest"
    except FileNotFoundError as error:
        return f"{Path(error.filename or '?').name} is missing"
    except (OSError, ValueError, AttributeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


class _LastHiddenState(torch.nn.Module):
    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.network(pixel_values=pixel_values).last_hidden_state


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
