"""Which device runs the model, and in which precision.

Where no GPU can be present (`gpu_cannot_be_present`), the CPU is known without importing torch, so a run whose
int8 export is cached never imports it (core/models.py `load_backbone`).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError
from .onnx_int8 import cpu_has_fast_int8, cpu_threads, runtime_name, runtime_version

if TYPE_CHECKING:
    import torch

GPU_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/kfd", "/dev/dxg")
"""Linux: the NVIDIA driver, AMD's ROCm compute device, WSL's GPU bridge; without any of them torch finds no GPU."""


def gpu_cannot_be_present() -> bool:
    """True where torch could not find a GPU even if it looked: Linux without a GPU driver, or an Intel Mac.
    Elsewhere (Windows, Apple silicon, a GPU driver present) only torch can tell."""
    if sys.platform.startswith("linux"):
        return not any(Path(path).exists() for path in GPU_DRIVER_PATHS)
    return sys.platform == "darwin" and platform.machine() != "arm64"


def device_type(choice: str = "auto") -> str:
    """'cpu', 'cuda' or 'mps' for a user's choice, as `resolve_device` picks it; without importing torch where
    the choice is the CPU or no GPU can be present."""
    if choice == "cpu" or (choice == "auto" and gpu_cannot_be_present()):
        return "cpu"
    return resolve_device(choice)[0].type


def resolve_device(choice: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The torch device and dtype for a user's choice: CUDA, then Apple MPS, then CPU.

    On a GPU the model runs in bfloat16 where supported, else float16; on the CPU
    in float32.
    """
    import torch

    if choice == "auto":
        if torch.cuda.is_available():
            choice = "cuda"
        elif torch.backends.mps.is_available():
            choice = "mps"
        else:
            choice = "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise InputError("CUDA was asked for, but torch finds no CUDA GPU here: use auto or cpu.")
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.device("cuda"), dtype
    if choice == "mps":
        if not torch.backends.mps.is_available():
            raise InputError("Apple MPS was asked for, but it is not available here: use auto or cpu.")
        return torch.device("mps"), torch.float16
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return torch.device("cpu"), torch.float32


def describe_device(device: torch.device) -> str:
    """A short human description: GPU name and memory, or CPU threads."""
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"CUDA {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    if device.type == "mps":
        return "Apple MPS"
    return f"CPU ({cpu_threads()} threads)"


def resolve_precision(device: torch.device | str, choice: str = "auto") -> str:
    """The precision the forward runs in on `device`: float32, bfloat16, float16 or int8.

    On the CPU, int8 runs in ONNX Runtime (core/onnx_int8.py), the one faster CPU precision that met the
    bar (docs/BENCHMARKS.md: ≥ 1.8× the float32 forward with the features kept): `auto` picks it when ONNX
    Runtime imports and the CPU has fast int8 (AVX2 or AVX-512), else float32, the reference. bfloat16 runs
    only when asked for. On a GPU `auto` is the device's half precision; int8 is a CPU option.
    `device` is a torch device or its type ('cpu', as `device_type` gives it).
    """
    kind = device if isinstance(device, str) else device.type
    if kind != "cpu":
        import torch

        if choice == "int8":
            raise InputError("int8 is a CPU precision: use auto, float32 or bfloat16 on a GPU.")
        if choice == "auto":
            return "bfloat16" if kind == "cuda" and torch.cuda.is_bf16_supported() else "float16"
        if choice == "bfloat16" and not (kind == "cuda" and torch.cuda.is_bf16_supported()):
            raise InputError(f"This {kind} device has no bfloat16: use auto or float32.")
        return choice
    if choice == "int8" and runtime_version() is None:
        raise InputError("int8 on the CPU runs in ONNX Runtime, which this engine lacks (onnxruntime and onnx "
                         "from requirements.txt): repair the engine, or use auto, float32 or bfloat16.")
    if choice == "auto":
        return "int8" if runtime_version() is not None and cpu_has_fast_int8() else "float32"
    return choice


def describe_precision(precision: str) -> str:
    """What runs the forward in `precision`, for the run record and the feature cache key:
    `int8 (ONNX Runtime 1.32.0)` for int8 (so a runtime update never reuses another runtime's features)."""
    return f"{precision} ({runtime_name()})" if precision == "int8" else precision
