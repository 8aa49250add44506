"""Which device runs the model, and in which precision."""

from __future__ import annotations

import os

import torch

from .errors import InputError


def resolve_device(choice: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The torch device and dtype for a user's choice: CUDA, then Apple MPS, then CPU.

    On a GPU the model runs in bfloat16 where supported, else float16; on the CPU
    in float32.
    """
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
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"CUDA {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    if device.type == "mps":
        return "Apple MPS"
    return f"CPU ({torch.get_num_threads()} threads)"


def resolve_precision(device: torch.device, choice: str = "auto") -> str:
    """The precision the forward runs in on `device`: float32, bfloat16, float16 or int8.

    `auto` is float32 on the CPU: no faster CPU precision has met the bar yet
    (docs/BENCHMARKS.md: ≥ 1.8× the float32 forward with the features kept), so
    bfloat16 and int8 run only when asked for. On a GPU `auto` is the device's
    half precision; int8 is a CPU option.
    """
    if device.type != "cpu":
        if choice == "int8":
            raise InputError("int8 is a CPU precision: use auto, float32 or bfloat16 on a GPU.")
        if choice == "auto":
            return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float16"
        if choice == "bfloat16" and not (device.type == "cuda" and torch.cuda.is_bf16_supported()):
            raise InputError(f"This {device.type} device has no bfloat16: use auto or float32.")
        return choice
    if choice == "int8" and not set(torch.backends.quantized.supported_engines) & {"x86", "fbgemm", "qnnpack"}:
        raise InputError("This build of torch has no int8 engine for the CPU: use auto, float32 or bfloat16.")
    return "float32" if choice == "auto" else choice
