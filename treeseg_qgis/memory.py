"""How much memory a run needs, how much this machine has, and a warning when it will not fit.

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
import sys
from pathlib import Path

from .catalogue import LVD_1689M, Architecture, CatalogueModel, find_model

PATCH = 16
EXTRA_TOKENS = 5
"""The class token and the 4 register tokens of every DINOv3 ViT."""
MIB = 2**20
CPU_FIXED_OVERHEAD_BYTES = 626 * MIB
"""Process overhead on the CPU besides the model; calibrated as described above."""
GPU_WORKSPACE_BYTES = 512 * MIB
"""Allocator slack and library workspaces on a GPU (not calibrated on a GPU yet)."""
GPU_DEVICES = ("cuda", "mps")
RUN_TILE_SIZE = 512
"""The tile size of a run from the panel (SegmentationParams.tile_size; a test keeps them equal)."""
RUN_BATCH_SIZE = 4
"""The images per forward batch of a run from the panel (SegmentationParams.batch_size)."""
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
        config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
        shape = Architecture(int(config["hidden_size"]), int(config["num_hidden_layers"]),
                             int(config["num_attention_heads"]), int(config["intermediate_size"]),
                             bool(config.get("use_gated_mlp", False)))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return CatalogueModel(Path(model).name, "local folder", (model,), _parameters_millions(shape), 0, shape, LVD_1689M)


def _parameters_millions(shape: Architecture) -> float:
    """Weights of a ViT/16 of this shape, in millions: attention, MLP (gated or not), norms and patch embedding."""
    hidden, inner = shape.hidden_size, shape.intermediate_size
    mlp = (3 if shape.gated_mlp else 2) * hidden * inner
    per_layer = 4 * hidden * hidden + mlp + 10 * hidden
    return (shape.num_hidden_layers * per_layer + 3 * PATCH * PATCH * hidden) / 1e6


def estimate_peak_bytes(model: CatalogueModel | str, stride: int = 16, tile_size: int = 512, batch_size: int = 4,
                        device: str = "cpu") -> int | None:
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

