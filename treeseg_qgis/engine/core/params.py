"""The one parameters object: built by the dock, the Processing algorithm and the CLI alike."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from ...catalogue import HEIGHT_HEAD
from .devices import DEVICE_CHOICES, PRECISION_CHOICES
from .errors import InputError
from .features import COLOUR_STRIDES, METHODS, check_stride
from .models import DEFAULT_MODEL
from .trees import DEFAULT_MIN_EXG


@dataclass
class SegmentationParams:
    """Everything one segmentation run needs; plain data, JSON-serialisable."""

    input_path: str
    output_dir: str
    method: str = "dinov3"
    bands: tuple[int, int, int] = (1, 2, 3)
    model: str = DEFAULT_MODEL
    model_revision: str | None = None
    stride: int = 16
    clusters: int | None = None
    k_min: int = 2
    k_max: int = 8
    device: str = "auto"
    precision: str = "auto"
    allow_untrained: bool = False
    tree_clusters: tuple[int, ...] | None = None
    min_exg: float = DEFAULT_MIN_EXG
    tile_size: int = 512
    overlap: int = 64
    batch_size: int = 4
    sample_size: int = 40_000
    pca_dims: int = 32
    seed: int = 0
    crowns: bool = False
    feature_preview: bool = False
    canopy_height: bool = False
    height_model: str = HEIGHT_HEAD.repo_id
    min_tree_height_m: float | None = None
    crown_min_area_m2: float = 2.0
    crown_smoothing_m: float = 0.2
    use_cache: bool = True
    cache_dir: str | None = None
    cache_max_mb: int = 2048
    output_stem: str | None = None
    cluster_model: str | None = None
    clusters_path: str | None = None
    trees_path: str | None = None
    polygons_path: str | None = None
    preview_path: str | None = None
    record_path: str | None = None
    crowns_path: str | None = None
    features_path: str | None = None
    height_path: str | None = None
    elbow_path: str | None = None
    similarity_path: str | None = None
    taught_trees_path: str | None = None
    teach_record_path: str | None = None

    def validate(self) -> None:
        """Raise InputError for values no run can use."""
        if self.method not in METHODS:
            raise InputError(f"Unknown method '{self.method}': use one of {', '.join(METHODS)}.")
        if self.method == "dinov3":
            check_stride(self.stride)
        elif self.stride not in COLOUR_STRIDES:
            raise InputError(f"Stride {self.stride} is not supported for {self.method}: use one of "
                             f"{', '.join(map(str, COLOUR_STRIDES))}.")
        if self.method == "exg-otsu" and self.clusters not in (None, 2):
            raise InputError("The ExG-Otsu baseline always splits into 2 clusters; leave clusters on auto.")
        if self.device not in DEVICE_CHOICES:
            raise InputError(f"Unknown device '{self.device}': use one of {', '.join(DEVICE_CHOICES)}.")
        if self.precision not in PRECISION_CHOICES:
            raise InputError(f"Unknown precision '{self.precision}': use one of {', '.join(PRECISION_CHOICES)}.")
        if len(self.bands) != 3 or any(band < 1 for band in self.bands):
            raise InputError(f"Bands must be three 1-based band numbers, not {self.bands}.")
        if self.clusters is not None and not 1 <= self.clusters <= 250:
            raise InputError(f"The number of clusters must be between 1 and 250, not {self.clusters}.")
        if not 1 <= self.k_min <= self.k_max <= 250:
            raise InputError(f"The automatic cluster range {self.k_min}..{self.k_max} is not valid.")
        if self.tile_size % 16 or self.tile_size < 64:
            raise InputError(f"The tile size must be a multiple of 16 and at least 64, not {self.tile_size}.")
        for name in ("crown_min_area_m2", "crown_smoothing_m", "min_tree_height_m", "min_exg"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and (value >= 0 or name == "min_exg")):
                raise InputError(f"{name} must be a finite number of at least 0, not {value}.")
        if self.overlap % 16 or not 0 <= self.overlap <= self.tile_size // 2:
            raise InputError(
                f"The overlap must be a multiple of 16 up to half the tile size, not {self.overlap}."
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegmentationParams:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"Unknown parameters: {', '.join(sorted(unknown))}.")
        values = dict(data)
        for name in ("bands", "tree_clusters"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        return cls(**values)
