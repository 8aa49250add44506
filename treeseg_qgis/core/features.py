"""Dense DINOv3 features: a tile in, an (h, w, D) grid of patch features out.

The only place where pixels meet the model. With stride s < 16 the tile is run
(16/s)² times, each copy shifted by a multiple of s pixels, and the patch grids
are interleaved: a truly denser grid, not an upsampled one. Grid cell g covers
the pixels [g*s, g*s + 16) of the tile, so its centre lies at g*s + 8.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .models import Backbone

PATCH = 16
STRIDES = (16, 8, 4, 2)


def check_stride(stride: int) -> None:
    if stride not in STRIDES:
        raise InputError(f"Stride {stride} is not supported: use one of {', '.join(map(str, STRIDES))}.")


class FeatureExtractor:
    """Runs a Backbone over tiles and returns L2-normalised dense patch features."""

    def __init__(self, backbone: Backbone, stride: int = 16, batch_size: int = 4) -> None:
        check_stride(stride)
        if backbone.patch_size != PATCH:
            raise InputError(f"Only patch size {PATCH} models are supported, not {backbone.patch_size}.")
        self.backbone = backbone
        self.stride = stride
        self.batch_size = max(1, batch_size)
        self._mean = torch.tensor(backbone.normalisation.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(backbone.normalisation.std, dtype=torch.float32).view(1, 3, 1, 1)

    @property
    def shifts(self) -> list[tuple[int, int]]:
        """The (dy, dx) pixel offsets of the copies one tile is run at."""
        steps = range(0, PATCH, self.stride)
        return [(dy, dx) for dy in steps for dx in steps]

    def extract(self, rgb: np.ndarray) -> np.ndarray:
        """Features for one tile: rgb (H, W, 3) float in 0..1, H and W multiples of 16.

        Returns float32 (H / stride, W / stride, D), each vector of unit length.
        """
        height, width = rgb.shape[:2]
        if height % PATCH or width % PATCH or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"tile must be (H, W, 3) with H, W multiples of {PATCH}, got {rgb.shape}")
        image = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None]
        image = (image - self._mean) / self._std
        copies = [_shifted(image, dy, dx) for dy, dx in self.shifts]
        grids = []
        for start in range(0, len(copies), self.batch_size):
            grids.append(self._forward(torch.cat(copies[start:start + self.batch_size])))
        patches = torch.cat(grids)
        factor = PATCH // self.stride
        rows, cols = height // PATCH, width // PATCH
        dense = patches.view(factor, factor, rows, cols, -1).permute(2, 0, 3, 1, 4)
        dense = dense.reshape(rows * factor, cols * factor, -1)
        return F.normalize(dense, dim=-1).numpy()

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, H/16, W/16, D) in float32 on the CPU; CLS and registers dropped."""
        backbone = self.backbone
        rows, cols = batch.shape[2] // PATCH, batch.shape[3] // PATCH
        with torch.inference_mode():
            pixels = batch.to(device=backbone.device, dtype=backbone.dtype)
            tokens = backbone.model(pixel_values=pixels).last_hidden_state
            patches = tokens[:, 1 + backbone.num_register_tokens:, :]
            return patches.float().cpu().reshape(batch.shape[0], rows, cols, -1)


def _shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The image moved up by dy and left by dx, edge-padded back to its size."""
    if dy == 0 and dx == 0:
        return image
    cropped = image[:, :, dy:, dx:]
    return F.pad(cropped, (0, dx, 0, dy), mode="replicate")


def pool_to_grid(values: np.ndarray, stride: int) -> np.ndarray:
    """Mean of a (H, W) map over each grid cell's 16×16 patch: (H / stride, W / stride)."""
    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None, None]
    padded = F.pad(tensor, (0, PATCH - stride, 0, PATCH - stride), mode="replicate")
    return F.avg_pool2d(padded, kernel_size=PATCH, stride=stride)[0, 0].numpy()
