"""Dense DINOv3 features: a tile in, an (h, w, D) grid of patch features out.

The only place where pixels meet the model. With stride s < 16 the tile is run
(16/s)² times, each copy shifted by a multiple of s pixels, and the patch grids
are interleaved: a truly denser grid, not an upsampled one. Grid cell g covers
the pixels [g*s, g*s + 16) of the tile, so its centre lies at g*s + 8.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ...memory import RUN_BATCH_SIZE
from ...params import METHODS
from .errors import InputError
from .models import Backbone
from .onnx_int8 import OnnxInt8Network
from .tiling import PATCH
from .trees import excess_green

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

COLOUR_METHODS = METHODS[1:]


def tiles_per_batch(batch_size: int, stride: int) -> int:
    """How many tiles one DINOv3 forward batch of `batch_size` images holds (each tile is (16 / stride)² images)."""
    return max(1, batch_size // (PATCH // stride) ** 2)


class FeatureExtractor:
    """Runs a Backbone over tiles and returns L2-normalised dense patch features.

    The backbone may be shared (the engine worker keeps it for the next job): the
    extractor never changes it. Out of GPU memory it goes on with a CPU copy of its own.
    """

    def __init__(self, backbone: Backbone, stride: int, batch_size: int = RUN_BATCH_SIZE) -> None:
        if stride < 1 or PATCH % stride:  # the shifted copies must tile the patch (params.STRIDES are checked)
            raise InputError(f"Stride {stride} does not divide the {PATCH}-px patch.")
        if backbone.patch_size != PATCH:
            raise InputError(f"Only patch size {PATCH} models are supported, not {backbone.patch_size}.")
        self.backbone = backbone
        self.stride = stride
        self.cell_size = PATCH
        self.batch_size = max(1, batch_size)
        self.fell_back_from: str | None = None
        self._mean = np.array(backbone.normalisation.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        self._std = np.array(backbone.normalisation.std, dtype=np.float32).reshape(1, 3, 1, 1)

    @property
    def shifts(self) -> list[tuple[int, int]]:
        """The (dy, dx) pixel offsets of the copies one tile is run at."""
        steps = range(0, PATCH, self.stride)
        return [(dy, dx) for dy in steps for dx in steps]

    @property
    def tiles_per_batch(self) -> int:
        """How many tiles one forward batch holds (each tile is len(shifts) images)."""
        return tiles_per_batch(self.batch_size, self.stride)

    @property
    def feature_dim(self) -> int:
        """The length of one feature vector (the backbone's width)."""
        return self.backbone.feature_dim

    def extract(self, rgb: np.ndarray) -> np.ndarray:
        """Features for one tile: rgb (H, W, 3) float in 0..1, H and W multiples of 16.

        Returns float32 (H / stride, W / stride, D), each vector of unit length.
        """
        return self.extract_tiles([rgb])[0]

    def extract_tiles(self, tiles: Sequence[np.ndarray], cropped: bool = False) -> list[np.ndarray]:
        """Features for tiles of one size, their images run through the model together in batches of
        `batch_size` (on a GPU, and on the CPU too, a batch of tiles is faster than one at a time); `cropped`:
        tiles cropped to their valid pixels (in int8 they run the export of any shape)."""
        height, width = tiles[0].shape[:2]
        for rgb in tiles:
            if rgb.shape != (height, width, 3) or height % PATCH or width % PATCH:
                raise ValueError(f"tiles must be (H, W, 3) of one size, H and W multiples of {PATCH}, "
                                 f"got {rgb.shape}")
        images = np.stack(tiles).astype(np.float32, copy=False).transpose(0, 3, 1, 2)
        images = (images - self._mean) / self._std
        copies = [_shifted(images[index:index + 1], dy, dx) for index in range(len(tiles)) for dy, dx in self.shifts]
        grids = []
        start = 0
        while start < len(copies):
            batch = np.concatenate(copies[start:start + self.batch_size])
            try:
                grids.append(self._forward(batch, cropped))
            except RuntimeError as error:
                if not _is_out_of_memory(error):
                    raise
                self._recover_from_out_of_memory()
                continue
            start += batch.shape[0]
        patches = np.concatenate(grids)
        factor = PATCH // self.stride
        rows, cols = height // PATCH, width // PATCH
        dense = patches.reshape(len(tiles), factor, factor, rows, cols, -1).transpose(0, 3, 1, 4, 2, 5)
        dense = dense.reshape(len(tiles), rows * factor, cols * factor, -1)
        dense /= np.maximum(np.linalg.norm(dense, axis=-1, keepdims=True), 1e-12)  # as torch's F.normalize
        return list(dense)

    def describe(self) -> dict:
        """The backbone's facts; after a fall-back to the CPU, those of the CPU copy and where it fell back from."""
        facts = {"method": "dinov3", **self.backbone.describe()}
        if self.fell_back_from is not None:
            facts["fell_back_to_cpu"] = f"out of memory on {self.fell_back_from}; the rest ran on the CPU in float32"
        return facts

    def _recover_from_out_of_memory(self) -> None:
        """Halve the batch; at batch 1 on a GPU, go on with a CPU copy of the backbone; on the CPU, give up
        clearly."""
        backbone = self.backbone
        if backbone.device_type == "cuda":
            import torch

            torch.cuda.empty_cache()
        if self.batch_size > 1:
            self.batch_size //= 2
            log.warning("Out of memory on %s: retrying with batches of %d.", backbone.device, self.batch_size)
            return
        if backbone.device_type != "cpu":
            import torch

            log.warning("Out of memory on %s even with one image at a time: continuing on the CPU "
                        "(much slower). A smaller model or tile size would keep the GPU.", backbone.device)
            self.fell_back_from = str(backbone.device)
            self.backbone = dataclasses.replace(backbone, model=_cpu_copy(backbone.model), device=torch.device("cpu"),
                                                dtype=torch.float32, precision="float32")
            return
        raise InputError("Out of memory on the CPU even with one image at a time: choose a smaller model "
                         "or a smaller tile size, or close other programs.")

    def _forward(self, batch: np.ndarray, cropped: bool) -> np.ndarray:
        """Patch tokens (B, H/16, W/16, D) in float32; CLS and registers dropped. The int8 ONNX Runtime
        session takes the batch as it is (no torch); a torch model on its device in its dtype."""
        backbone = self.backbone
        rows, cols = batch.shape[2] // PATCH, batch.shape[3] // PATCH
        if isinstance(backbone.model, OnnxInt8Network):
            tokens = backbone.model.hidden_states(batch, cropped)
        else:
            tokens = _torch_forward(backbone, batch)
        return tokens[:, 1 + backbone.num_register_tokens:, :].reshape(batch.shape[0], rows, cols, -1)


def _torch_forward(backbone: Backbone, batch: np.ndarray) -> np.ndarray:
    """The last hidden state of a torch model, as float32 on the CPU."""
    import torch

    autocast = backbone.device_type == "cpu" and backbone.precision == "bfloat16"
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        pixels = torch.from_numpy(batch).to(device=backbone.device, dtype=backbone.dtype)
        return backbone.model(pixel_values=pixels).last_hidden_state.float().cpu().numpy()


def _cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A float32 copy of `model` on the CPU; the model itself is untouched and nothing new is put on its
    device (each parameter and buffer is copied straight to the CPU)."""
    import torch

    copies: dict[int, object] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        moved = tensor.detach().to("cpu")
        moved = moved.float() if moved.is_floating_point() else moved
        copies[id(tensor)] = torch.nn.Parameter(moved, requires_grad=False) if isinstance(
            tensor, torch.nn.Parameter) else moved
    return copy.deepcopy(model, copies)


def _is_out_of_memory(error: RuntimeError) -> bool:
    torch = sys.modules.get("torch")
    return (torch is not None and isinstance(error, torch.OutOfMemoryError)) or "out of memory" in str(error).lower()


def _shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The (1, 3, H, W) image moved up by dy and left by dx, edge-padded back to its size."""
    if dy == 0 and dx == 0:
        return image
    return np.pad(image[:, :, dy:, dx:], ((0, 0), (0, 0), (0, dy), (0, dx)), mode="edge")


def pool_to_grid(values: np.ndarray, stride: int, cell_size: int = PATCH) -> np.ndarray:
    """Mean of a (H, W) map over each grid cell (cell_size pixels square): (H / stride, W / stride)."""
    height, width = values.shape
    if stride == cell_size and height % stride == 0 and width % stride == 0:
        cells = values.reshape(height // stride, stride, width // stride, stride)
        return cells.mean(axis=(1, 3), dtype=np.float32)
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None, None]
    padded = F.pad(tensor, (0, cell_size - stride, 0, cell_size - stride), mode="replicate")
    return F.avg_pool2d(padded, kernel_size=cell_size, stride=stride)[0, 0].numpy()


@dataclasses.dataclass(frozen=True)
class ColourFeatures:
    """Baselines in the same code path: the colour of each stride × stride cell as its feature.

    `rgb-kmeans` clusters the mean RGB of each cell; `exg-otsu` clusters the mean
    ExG into two groups, which is Otsu's threshold (Otsu's split is the 1-D
    two-means split). Everything after the features is the DINOv3 pipeline.
    """

    method: str
    stride: int
    tiles_per_batch: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if self.method not in COLOUR_METHODS:
            raise InputError(f"Unknown baseline '{self.method}': use one of {', '.join(COLOUR_METHODS)}.")

    @property
    def cell_size(self) -> int:
        return self.stride

    @property
    def feature_dim(self) -> int:
        return 1 if self.method == "exg-otsu" else 3

    def extract_tiles(self, tiles: Sequence[np.ndarray], cropped: bool = False) -> list[np.ndarray]:
        return [self.extract(rgb) for rgb in tiles]

    def extract(self, rgb: np.ndarray) -> np.ndarray:
        if self.method == "exg-otsu":
            channels = [excess_green(rgb)]
        else:
            channels = [rgb[..., band] for band in range(3)]
        return np.stack([pool_to_grid(channel, self.stride, self.cell_size) for channel in channels], -1)

    def describe(self) -> dict:
        return {"method": self.method, "model_id": f"baseline:{self.method}", "weights": "none (colour baseline)",
                "untrained": False, "device": "cpu"}
