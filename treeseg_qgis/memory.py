"""How much memory a run needs, how much this machine has, and a warning when it will not fit; how long a run
takes (estimate_run_time: engine start, model load, first int8 export, the model's forward, clustering, outputs;
calibrated on docs/BENCHMARKS.md and scaled by this machine's measured speed, speed_factor).

Standard library only: the panel and the model manager use it inside QGIS.

The estimate of a run's peak: the weights (4 bytes a parameter in float32 on the
CPU, 2 in bfloat16/float16 on a GPU), the activations of the widest layer for one
batch of images (tiles and their shifted copies; layers run one after the other in
inference mode, and SDPA attention never holds the tokens × tokens matrix), the
tiles of this batch and the next (read ahead) and their features, and on the CPU
the process's fixed overhead (Python, torch, transformers, GDAL's block cache, the
feature store). The overhead is calibrated on docs/BENCHMARKS.md: ViT-S/16,
stride 16, 512-px tiles, batches of 4 tiles on the CPU peaked at 817 MiB on the
4 MP raster; larger rasters add a little (see the memory table there).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .catalogue import LVD_1689M, PATCH, Architecture, CatalogueModel, find_model

EXTRA_TOKENS = 5
"""The class token and the 4 register tokens of every DINOv3 ViT."""
MIB = 2**20
CPU_FIXED_OVERHEAD_BYTES = 626 * MIB
"""Process overhead on the CPU besides the model; calibrated as described above."""
GPU_WORKSPACE_BYTES = 512 * MIB
"""Allocator slack and library workspaces on a GPU (not calibrated on a GPU yet)."""
GPU_DEVICES = ("cuda", "mps")
RUN_STRIDE = PATCH
"""The feature stride of a run unless another is asked for (the default of SegmentationParams.stride)."""
RUN_TILE_SIZE = 512
"""The tile size of a run from the panel (the default of SegmentationParams.tile_size)."""
RUN_BATCH_SIZE = 4
"""The images per forward batch of a run from the panel (the default of SegmentationParams.batch_size)."""
RUN_OVERLAP = 64
"""The tile overlap of a run from the panel (the default of SegmentationParams.overlap)."""
FEATURE_SECONDS_PER_TILE = {"int8": 54.6 / 196, "float32": 137.6 / 196}
"""Seconds of the model's forward per 512-px tile of ViT-S/16 at stride 16 on 2 CPU cores, by precision (bfloat16
is counted as float32): docs/BENCHMARKS.md, end to end at 36 MP on a quiet machine (int8: the estimate benchmark's
warm 36 MP run; float32: the CPU forward precision section)."""
CALIBRATION_PARAMETERS = 21.6e6
"""Weights of the ViT-S/16 of that calibration."""
CALIBRATION_CORES = 2
ENGINE_START_SECONDS = 6.0
"""A new engine worker: its interpreter and the torch import (about 6 s on 2 cores, ../shared/ENVIRONMENT.md)."""
MODEL_LOAD_SECONDS = (1.0, 0.1)
"""Loading the weights: seconds, plus seconds per million weights (ViT-S/16: 2.0 to 2.4 s from a warm disk, 7.3 s
from a cold one; docs/BENCHMARKS.md, the estimate benchmark)."""
INT8_EXPORT_SECONDS = (2.5, 0.09)
"""The first int8 ONNX export and quantisation of a model (then cached per weights and tile shape): seconds, plus
seconds per million weights (ViT-B: 10.5 s, docs/BENCHMARKS.md, CPU forward precision)."""
CLUSTER_SECONDS = {"fixed": 0.3, "automatic": 1.0}
"""PCA and k-means on the sample: one K, or every K of the default range for the elbow (automatic: 0.2 to 0.9 s
from 1 to 36 MP, docs/BENCHMARKS.md, the estimate benchmark)."""
OUTPUT_SECONDS_PER_MEGAPIXEL = {"threaded": 0.15, "one_thread": 0.32}
"""Projecting, assigning, writing and polygonizing per million pixels on the calibration's cores: 0.47 s/MP at 36
and at 400 MP (docs/BENCHMARKS.md, where the time goes), of which projecting and assigning (numpy, on every core)
0.15 and GDAL's writing and polygonizing (one thread, so no faster on more cores) 0.32 at 400 MP."""
PREVIEW_SECONDS = 1.1
"""The preview and the elbow plot (0.8 to 1.3 s in the estimate benchmark)."""
SPEED_FACTOR_RANGE = (0.25, 4.0)
"""How far a measured run may move the estimate (a run slowed by another program is not this machine's speed)."""
LARGE_RUN_SECONDS = 3600
"""A run expected to take longer than this asks before it starts (the panel) and says so (the command line)."""
ADDRESS_SPACE_BASE_BYTES = 568 * MIB
ADDRESS_SPACE_PER_CORE_BYTES = 100 * MIB
"""Address space a CPU run reserves beyond its memory estimate: on 2 cores 668 MiB were measured (VmPeak 1537 MiB
against an estimate of 869 MiB for ViT-S+), plus 100 MiB of margin (a colour run hung at a 1300 MB limit and ran
at 1500 MB); the share per core (a thread's stack, its malloc arena and BLAS buffer) is modelled, not measured on
more cores."""
LARGE_RUN_TILES = 10_000
"""Where the time cannot be told (a GPU), a run of more tiles than this asks before it starts."""
MEMINFO = Path("/proc/meminfo")


def bytes_per_value(device: str) -> int:
    """4 on the CPU (float32), 2 on a GPU (bfloat16 or float16)."""
    return 2 if device in GPU_DEVICES else 4


def tokens_per_tile(tile_size: int) -> int:
    """Tokens one tile gives the transformer: (tile / 16)² patches plus the class and register tokens."""
    return (tile_size // PATCH) ** 2 + EXTRA_TOKENS


def model_entry(model: str) -> CatalogueModel | None:
    """The catalogue model of a name or Hugging Face id or, for a local folder in Hugging Face format, one
    sized from its config.json; None when neither."""
    entry = find_model(model)
    if entry is not None:
        return entry
    try:
        if not stat.S_ISREG(os.stat(Path(model) / "config.json").st_mode):
            return None  # a pipe or device: reading it would block (the engine refuses it in one line)
        config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
        shape = Architecture.from_hub_config(config)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return CatalogueModel(Path(model).name, "local folder", (model,), _parameters_millions(shape), 0, shape, LVD_1689M)


def _parameters_millions(shape: Architecture) -> float:
    """Weights of a ViT/16 of this shape, in millions: attention, MLP (gated or not), norms and patch embedding."""
    hidden, inner = shape.hidden_size, shape.intermediate_size
    mlp = (3 if shape.gated_mlp else 2) * hidden * inner
    per_layer = 4 * hidden * hidden + mlp + 10 * hidden
    return (shape.num_hidden_layers * per_layer + 3 * PATCH * PATCH * hidden) / 1e6


def estimate_peak_bytes(model: CatalogueModel | str, stride: int = RUN_STRIDE, tile_size: int = RUN_TILE_SIZE,
                        batch_size: int = RUN_BATCH_SIZE, device: str = "cpu") -> int | None:
    """Peak memory of a run on `device` (cpu, cuda, mps) in bytes; None for a model that is neither in the
    catalogue nor a local folder with a readable config.json.

    For the CPU that is the whole process; for a GPU the GPU's own memory.
    """
    entry = model_entry(model) if isinstance(model, str) else model
    if entry is None:
        return None
    value = bytes_per_value(device)
    copies = (PATCH // stride) ** 2
    images = max(1, batch_size)
    tokens = tokens_per_tile(tile_size)
    hidden = entry.architecture.hidden_size
    weights = round(entry.params_millions * 1e6) * value
    activations = images * tokens * _widest_layer_values(entry.architecture) * value
    batch_pixels = images * 3 * tile_size**2 * value
    if device in GPU_DEVICES:
        return weights + activations + batch_pixels + GPU_WORKSPACE_BYTES
    tiles = max(1, batch_size // copies)
    tile_pixels = 2 * tiles * 3 * tile_size**2 * 4
    features = 2 * tiles * copies * tokens * hidden * 4
    return weights + activations + batch_pixels + tile_pixels + features + CPU_FIXED_OVERHEAD_BYTES


def _widest_layer_values(shape: Architecture) -> int:
    """Values per token alive at once in the widest part of one transformer layer."""
    hidden, inner = shape.hidden_size, shape.intermediate_size
    attention = 8 * hidden
    mlp = 2 * hidden + (3 if shape.gated_mlp else 2) * inner
    return max(attention, mlp)


def host_memory() -> tuple[int, int] | None:
    """(total, available) bytes of this machine's memory, or None when it cannot be read."""
    if MEMINFO.is_file():
        return _meminfo()
    if sys.platform == "win32":
        return _windows_memory()
    return None


def _meminfo() -> tuple[int, int] | None:
    fields = {}
    for line in MEMINFO.read_text().splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[name] = int(parts[0]) * 1024
    if "MemTotal" not in fields or "MemAvailable" not in fields:
        return None
    return fields["MemTotal"], fields["MemAvailable"]


def _windows_memory() -> tuple[int, int] | None:
    import ctypes

    class MemoryStatus(ctypes.Structure):
        _fields_ = [("length", ctypes.c_ulong), ("memory_load", ctypes.c_ulong),
                    ("total_physical", ctypes.c_ulonglong), ("available_physical", ctypes.c_ulonglong),
                    ("total_page_file", ctypes.c_ulonglong), ("available_page_file", ctypes.c_ulonglong),
                    ("total_virtual", ctypes.c_ulonglong), ("available_virtual", ctypes.c_ulonglong),
                    ("available_extended_virtual", ctypes.c_ulonglong)]

    status = MemoryStatus()
    status.length = ctypes.sizeof(MemoryStatus)
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
        return None
    return status.total_physical, status.available_physical


def available_memory_bytes() -> int | None:
    """Memory this machine has free now (Linux MemAvailable, Windows available physical), or None."""
    memory = host_memory()
    return memory[1] if memory else None


def tile_count(width: int, height: int, tile_size: int = RUN_TILE_SIZE, overlap: int = RUN_OVERLAP) -> int:
    """Tiles a width × height raster gives (the count of core.tiling.TileGrid; a test keeps them equal)."""

    def along(size: int) -> int:
        tile = min(tile_size, max(PATCH, -(-size // PATCH) * PATCH))
        return 1 if size <= tile else 1 + -(-(size - tile) // (tile_size - overlap))

    return along(width) * along(height)


@dataclass(frozen=True)
class RunTime:
    """The expected seconds of a run on the CPU, by part."""

    engine_start: float
    """Starting the engine worker (0 once it runs)."""
    model_load: float
    """Loading the model (0 on an engine that holds it)."""
    export: float
    """The first int8 export of the model (0 once it is cached)."""
    features: float
    clustering: float
    outputs: float
    """Projection, labels, polygons, preview."""

    @property
    def total(self) -> float:
        return self.engine_start + self.model_load + self.export + self.features + self.clustering + self.outputs

    @property
    def first_run(self) -> str:
        """What this run adds before its first tile, e.g. 'the model load and its first int8 export (12 s)'; ''
        for none."""
        parts = [text for text, seconds in (("the engine start", self.engine_start), ("the model load",
                                                                                     self.model_load),
                                            ("its first int8 export", self.export)) if seconds]
        if not parts:
            return ""
        words = parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"
        return f"{words} ({format_duration(self.engine_start + self.model_load + self.export)})"


def estimate_run_time(model: CatalogueModel | str, width: int, height: int, stride: int = RUN_STRIDE,
                      tile_size: int = RUN_TILE_SIZE, device: str = "cpu", overlap: int = RUN_OVERLAP, *,
                      precision: str = "int8", automatic_k: bool = True, engine_started: bool = True,
                      model_loaded: bool = True, exported: bool = True, speed: float = 1.0,
                      cores: int | None = None) -> RunTime | None:
    """Expected seconds of a run over a width × height raster on the CPU, by part: the model's forward scaled
    from the calibration by the model's weights, the tokens per tile, the forward passes per tile (stride),
    the precision and the cores; the engine start, model load and first int8 export where they are still to
    come; the clustering; the per-pixel outputs. `speed` is this machine's measured time over the estimate
    (speed_factor). None on a GPU (not calibrated) or for a model that cannot be sized."""
    entry = model_entry(model) if isinstance(model, str) else model
    if entry is None or device in GPU_DEVICES:
        return None
    per_core = CALIBRATION_CORES / max(1, cores or os.cpu_count() or 1)
    millions = entry.params_millions
    start = 0.0 if engine_started else ENGINE_START_SECONDS
    load = 0.0 if model_loaded else MODEL_LOAD_SECONDS[0] + MODEL_LOAD_SECONDS[1] * millions
    export = 0.0 if exported or precision != "int8" else INT8_EXPORT_SECONDS[0] + INT8_EXPORT_SECONDS[1] * millions
    parts = (start, load, export * per_core,
             _forward_seconds(entry, tile_count(width, height, tile_size, overlap), stride, tile_size, precision,
                              per_core),
             CLUSTER_SECONDS["automatic" if automatic_k else "fixed"],
             width * height / 1e6 * (OUTPUT_SECONDS_PER_MEGAPIXEL["threaded"] * per_core
                                     + OUTPUT_SECONDS_PER_MEGAPIXEL["one_thread"]) + PREVIEW_SECONDS)
    return RunTime(*(speed * seconds for seconds in parts))


def _forward_seconds(entry: CatalogueModel, tiles: int, stride: int, tile_size: int, precision: str,
                     per_core: float) -> float:
    """The model's forward over `tiles` tiles: the calibration scaled by the weights, the tokens per tile, the
    passes per tile (stride) and the cores (`per_core`: the calibration's cores over these)."""
    per_tile = FEATURE_SECONDS_PER_TILE["int8" if precision == "int8" else "float32"]
    return (tiles * per_tile * entry.params_millions * 1e6 / CALIBRATION_PARAMETERS
            * tokens_per_tile(tile_size) / tokens_per_tile(RUN_TILE_SIZE) * (PATCH // stride) ** 2 * per_core)


def speed_factor(measured: list[float]) -> float:
    """This machine's speed from its last runs' measured seconds over their estimates: the median, kept within
    SPEED_FACTOR_RANGE; 1 without any."""
    if not measured:
        return 1.0
    ordered = sorted(measured)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return min(max(median, SPEED_FACTOR_RANGE[0]), SPEED_FACTOR_RANGE[1])


def tiles_text(tiles: int) -> str:
    """'1 tile', '25 tiles'."""
    return f"{tiles} tile" if tiles == 1 else f"{tiles} tiles"


def format_duration(seconds: float) -> str:
    """E.g. '40 s', '12 min', '3.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def tiles_and_time(model: CatalogueModel | str, width: int, height: int, stride: int = RUN_STRIDE,
                   tile_size: int = RUN_TILE_SIZE, device: str = "cpu", overlap: int = RUN_OVERLAP,
                   **estimate: Any) -> str:
    """E.g. '1 tile, about 25 s on the CPU with the model load and its first int8 export (12 s)' or '25 tiles, time
    unknown on the CUDA device'; `estimate`: the options of estimate_run_time (what is still to load, the speed)."""
    tiles = tile_count(width, height, tile_size, overlap)
    expected = estimate_run_time(model, width, height, stride, tile_size, device, overlap, **estimate)
    where = "the CPU" if device not in GPU_DEVICES else f"the {device.upper()} device"
    if expected is None:
        return f"{tiles_text(tiles)}, time unknown on {where}"
    text = f"{tiles_text(tiles)}, about {format_duration(expected.total)} on {where}"
    return f"{text} with {expected.first_run}" if expected.first_run else text


def run_estimate(model: CatalogueModel | str, width: int, height: int, stride: int = RUN_STRIDE,
                 tile_size: int = RUN_TILE_SIZE, batch_size: int = RUN_BATCH_SIZE, device: str = "cpu",
                 overlap: int = RUN_OVERLAP, **estimate: Any) -> str:
    """One line before a run: its tiles, the expected time and the memory it needs, e.g.
    'Estimate: 50176 tiles, about 9.9 h on the CPU, about 0.9 GB of memory'."""
    needed = estimate_peak_bytes(model, stride, tile_size, batch_size, device)
    memory_text = f"about {format_gigabytes(needed)} of memory" if needed is not None else "memory unknown"
    time_text = tiles_and_time(model, width, height, stride, tile_size, device, overlap, **estimate)
    return f"Estimate: {time_text}, {memory_text}"


def size_warning(model: CatalogueModel | str, width: int, height: int, stride: int = RUN_STRIDE,
                 tile_size: int = RUN_TILE_SIZE, device: str = "cpu", overlap: int = RUN_OVERLAP,
                 **estimate: Any) -> str | None:
    """A warning when a run is expected to take more than LARGE_RUN_SECONDS (or, where the time cannot be told,
    has more than LARGE_RUN_TILES tiles); None otherwise."""
    tiles = tile_count(width, height, tile_size, overlap)
    expected = estimate_run_time(model, width, height, stride, tile_size, device, overlap, **estimate)
    seconds = expected.total if expected is not None else None
    if seconds is not None and seconds <= LARGE_RUN_SECONDS or seconds is None and tiles <= LARGE_RUN_TILES:
        return None
    expected_text = f"about {format_duration(seconds)}" if seconds is not None else "a long time"
    remedy = "an extent or a mask, or a smaller model" + (f", or stride {RUN_STRIDE}" if stride != RUN_STRIDE else "")
    return (f"The raster is {width} × {height} px: {tiles_text(tiles)}, expected to take {expected_text}. "
            f"Choose {remedy} to make it shorter.")


def address_space_limit() -> int | None:
    """This process's address-space limit (ulimit -v) in bytes, or None where there is none or it cannot be read."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY else soft


def address_space_problem(model: CatalogueModel | str | None, stride: int = RUN_STRIDE, tile_size: int = RUN_TILE_SIZE,
                          batch_size: int = RUN_BATCH_SIZE, limit: int | None = None,
                          cores: int | None = None) -> str | None:
    """A message when the address-space limit is below what a CPU run of `model` (None: a colour method, or a
    model not known yet: the libraries alone) reserves; None when there is no limit or it is enough.

    Below it a run fails in torch's allocator or, worse, OpenBLAS spins forever in blas_memory_alloc (2026-11-27,
    ViT-S+ on OSBS_029: limits of 900 to 1100 MB hung at 100 % CPU, 1250 and 1500 MB failed with a traceback,
    1600 MB ran; the process's VmPeak unlimited was 1537 MiB on 2 cores).
    """
    limit = limit if limit is not None else address_space_limit()
    if limit is None:
        return None
    cores = max(1, cores or os.cpu_count() or 1)
    peak = (estimate_peak_bytes(model, stride, tile_size, batch_size) if model is not None else None
            ) or CPU_FIXED_OVERHEAD_BYTES
    needed = peak + ADDRESS_SPACE_BASE_BYTES + ADDRESS_SPACE_PER_CORE_BYTES * cores
    if limit >= needed:
        return None
    return (f"The address-space limit of this process (ulimit -v) is {limit / 1e6:.0f} MB; the run reserves "
            f"about {needed / 1e6:.0f} MB (libraries, thread stacks and buffers besides the memory it uses). "
            "Raise the limit (ulimit -v unlimited) or choose a smaller model.")


def format_gigabytes(size: int) -> str:
    """E.g. '27 GB', '1.2 GB', '0.8 GB' (decimal gigabytes)."""
    gigabytes = size / 1e9
    return f"{gigabytes:.0f} GB" if gigabytes >= 10 else f"{gigabytes:.1f} GB"


def format_size(size: int) -> str:
    """E.g. '0.5 MB', '343 MB', '1.2 GB', '27 GB' (decimal units)."""
    if size >= 1e9:
        return format_gigabytes(size)
    return f"{size / 1e6:.1f} MB" if size < 1e7 else f"{size / 1e6:.0f} MB"


def memory_warning(model: CatalogueModel | str, stride: int, tile_size: int, batch_size: int,
                   available_bytes: int | None, device: str = "cpu") -> str | None:
    """A warning when a run will not fit in `available_bytes`; None when it fits or cannot be told."""
    needed = estimate_peak_bytes(model, stride, tile_size, batch_size, device)
    if needed is None or available_bytes is None or needed <= available_bytes:
        return None
    entry = model_entry(model) if isinstance(model, str) else model
    on_gpu = device in GPU_DEVICES
    where = "the GPU" if on_gpu else "this machine"
    remedy = ("a smaller model, smaller tiles or the CPU" if on_gpu
              else "a smaller model or smaller tiles, or close other programs")
    return (f"{entry.name} needs about {format_gigabytes(needed)} at stride {stride} with {tile_size}-px tiles; "
            f"{where} has {format_gigabytes(available_bytes)} free. Choose {remedy}.")


def disk_free_bytes(folder: Path) -> int | None:
    """Free bytes on the disk that holds `folder` (or its nearest existing parent); None when none exists."""
    existing = next((candidate for candidate in (folder, *folder.parents) if candidate.is_dir()), None)
    return shutil.disk_usage(existing).free if existing is not None else None


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder`; links are not followed nor counted (a Hugging Face snapshot's links into
    its blobs, an engine's link to its Python), and a file that goes while it is measured is skipped."""
    total = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            try:
                status = os.lstat(os.path.join(parent, name))
            except OSError:
                continue
            if not stat.S_ISLNK(status.st_mode):
                total += status.st_size
    return total
