"""Canopy height in metres from the DINOv3 canopy-height head (transformers CHMv2).

Loaded like the backbone (core/models.py): a Hugging Face id or a local folder,
through AutoModelForDepthEstimation, safetensors only, no remote code; gated
access and offline failures become the same messages; random weights only when
the caller allows them, and the result then says so. Each output block is
predicted from a window with `context` extra pixels on every side and only its
centre is kept, so blocks join without seams.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...catalogue import HEIGHT_HEAD
from .devices import resolve_device
from .errors import ModelUnavailableError
from .models import explain_load_failure, hub_offline
from .progress import Progress
from .segmentation import RasterSource
from .tiling import PATCH, Window

log = logging.getLogger(__name__)

HEIGHT_MODEL = HEIGHT_HEAD.repo_id
CHM_MEAN = (0.420, 0.411, 0.296)
CHM_STD = (0.213, 0.156, 0.143)
HEIGHT_NODATA = -1.0


@dataclass
class HeightModel:
    """A loaded canopy-height model and what it really is."""

    model: torch.nn.Module
    model_id: str
    untrained: bool
    device: torch.device
    dtype: torch.dtype
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def describe(self) -> dict:
        return {"model_id": self.model_id, "untrained": self.untrained,
                "weights": "untrained (random initialisation)" if self.untrained else "pretrained",
                "device": str(self.device)}

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        """Heights (H, W) in metres for an (H, W, 3) image in 0..1, H and W multiples of 16."""
        image = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        with torch.inference_mode():
            pixels = ((image - mean) / std).to(device=self.device, dtype=self.dtype)
            depth = self.model(pixel_values=pixels).predicted_depth.float()
            if depth.shape[-2:] != image.shape[-2:]:
                depth = torch.nn.functional.interpolate(depth[:, None], size=image.shape[-2:], mode="bilinear",
                                                        align_corners=False)[:, 0]
            return depth[0].cpu().numpy()


def load_height_model(model: str = HEIGHT_MODEL, device: str = "auto", allow_untrained: bool = False,
                      token: str | None = None, revision: str | None = None) -> HeightModel:
    """Load the canopy-height model; ModelUnavailableError with the model page when it cannot be had."""
    from transformers import AutoModelForDepthEstimation

    torch_device, dtype = resolve_device(device)
    local = Path(model)
    if local.is_dir():
        _check_height_folder(local)
    try:
        network = AutoModelForDepthEstimation.from_pretrained(
            model, use_safetensors=True, trust_remote_code=False, token=token,
            local_files_only=not local.is_dir() and hub_offline(), revision=revision or "main")
        untrained = False
    except OSError as error:
        if not allow_untrained or model != HEIGHT_MODEL:
            raise ModelUnavailableError(explain_load_failure(model, error)) from error
        network = _untrained_height_model()
        untrained = True
    if getattr(network.config, "model_type", "") != "chmv2":
        raise ModelUnavailableError(f"{model} is a '{network.config.model_type}' model, not the DINOv3 "
                                    f"canopy-height head (CHMv2), e.g. {HEIGHT_MODEL}.")
    mean, std = _normalisation(local)
    network = network.to(device=torch_device, dtype=dtype).eval()
    return HeightModel(network, model, untrained, torch_device, dtype, mean, std)


def _untrained_height_model() -> torch.nn.Module:
    from transformers import CHMv2Config, CHMv2ForDepthEstimation

    log.warning("UNTRAINED WEIGHTS: %s could not be loaded; using a randomly initialised canopy-height "
                "model. The heights only check the pipeline.", HEIGHT_MODEL)
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    network = CHMv2ForDepthEstimation(CHMv2Config())
    torch.random.set_rng_state(state)
    return network


def _check_height_folder(folder: Path) -> None:
    config = folder / "config.json"
    if not config.is_file() or json.loads(config.read_text()).get("model_type") != "chmv2":
        raise ModelUnavailableError(f"{folder} is not a canopy-height model folder (config.json with "
                                    "model_type 'chmv2').")


def _normalisation(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    config = folder / "preprocessor_config.json"
    if config.is_file():
        values = json.loads(config.read_text())
        if len(values.get("image_mean", [])) == 3 and len(values.get("image_std", [])) == 3:
            return tuple(values["image_mean"]), tuple(values["image_std"])
    return CHM_MEAN, CHM_STD


def predict_heights(source: RasterSource, model: HeightModel, blocks: list[Window], context: int,
                    write: Callable[[int, int, np.ndarray], None], progress: Progress) -> None:
    """Heights for every block (each predicted with `context` pixels around it), nodata outside the data."""
    for index, block in enumerate(blocks):
        progress.check()
        progress.report(index / len(blocks), f"Canopy height: block {index + 1} of {len(blocks)}")
        x0, y0 = max(0, block.x - context), max(0, block.y - context)
        x1 = min(source.width, block.x + block.width + context)
        y1 = min(source.height, block.y + block.height + context)
        rgb, valid = source.read(x0, y0, x1 - x0, y1 - y0)
        padded_h, padded_w = -(-rgb.shape[0] // PATCH) * PATCH, -(-rgb.shape[1] // PATCH) * PATCH
        padded = np.pad(rgb, ((0, padded_h - rgb.shape[0]), (0, padded_w - rgb.shape[1]), (0, 0)), mode="edge")
        heights = model.predict(padded)[: rgb.shape[0], : rgb.shape[1]]
        heights = np.where(valid, np.maximum(heights, 0.0), HEIGHT_NODATA).astype(np.float32)
        inner = (slice(block.y - y0, block.y - y0 + block.height), slice(block.x - x0, block.x - x0 + block.width))
        write(block.x, block.y, heights[inner])
    progress.report(1.0, "Canopy height done")
