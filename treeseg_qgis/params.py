"""The one parameters object of a run.

The panel, each Processing algorithm and the command line build a `SegmentationParams` and call
`validate()` before the job crosses to the engine worker; the worker rebuilds it from JSON with
`from_json()` and validates it again. Every allowed value (methods, strides, devices, precisions, the
cluster range) is defined here and nowhere else. Each field declares its `Role` (what it changes), unit and
default: the feature-cache key, a survey model's settings, the engine's kept-model key and the dock's remembered
settings are derived from those declarations (`names_with`, `settings_with`, `remembered_names`), never listed by
hand. `CrownOptions` carries crown splitting across the process boundary. Standard library only: QGIS and the
engine import it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import MISSING, asdict, dataclass, field, fields, make_dataclass, replace
from typing import Any, Literal, Union, get_args

from .catalogue import BACKBONES, DEFAULT_MODEL, HEIGHT_HEAD
from .memory import RUN_BATCH_SIZE, RUN_OVERLAP, RUN_STRIDE, RUN_TILE_SIZE
from .outputs import OUTPUT_KINDS

Method = Literal["dinov3", "rgb-kmeans", "exg-otsu"]
Stride = Literal[16, 8, 4]
Device = Literal["auto", "cpu", "cuda", "mps"]
Precision = Literal["auto", "float32", "bfloat16", "int8"]
METHODS: tuple[str, ...] = get_args(Method)
STRIDES: tuple[int, ...] = get_args(Stride)
COLOUR_STRIDES = (16, 8, 4, 2, 1)  # the colour baselines work per pixel too
DEVICES: tuple[str, ...] = get_args(Device)
PRECISIONS: tuple[str, ...] = get_args(Precision)
MODEL_NAMES = tuple(BACKBONES)
AUTO = "auto"  # the one spelling of "choose for me": the number of clusters, the device, the precision
K_MIN, K_MAX = 1, 250  # cluster ids 0..249; the rasters keep 255 for nodata
DEFAULT_K_RANGE = (2, 8)
DEFAULT_MIN_EXG = 0.02
WINDOW_TILES = 64  # segment-many on Dask splits a raster of more tiles into windows of about this many
Clusters = Union[int, Literal["auto"]]

OutputFiles = make_dataclass(
    "OutputFiles", [(kind, Union[str, None], field(default=None)) for kind in OUTPUT_KINDS], frozen=True)
OutputFiles.__doc__ = ("Where each output goes, one field per kind in outputs.OUTPUT_KINDS; None: "
                       "named after the output stem in the output folder.")
OutputFiles.__module__ = __name__


class ParameterError(ValueError):
    """A value no run can use; the message says which and what is allowed."""


class Role(enum.Flag):
    """What a parameter changes. Each field of `SegmentationParams` declares its roles, and every list of names
    that depends on them is derived from those declarations (`names_with`)."""

    INPUT = enum.auto()
    """What is read; the feature-cache key holds its files' identity, not its name."""
    FEATURES = enum.auto()
    """The extracted features: part of the feature-cache key (pipeline._cache_key)."""
    MODEL = enum.auto()
    """Which backbone is loaded: the engine worker keeps its loaded model while these stay the same."""
    SURVEY = enum.auto()
    """Fixed by a survey cluster model: stored in it, and a run asking another value is refused."""
    RESULT = enum.auto()
    """The labels, masks and polygons, not the features."""
    OUTPUT = enum.auto()
    """Only which files are written and where."""
    RESOURCES = enum.auto()
    """How a run uses the machine; never changes a result."""


def _param(role: Role, default: Any = MISSING, unit: str = "", remembered: bool = False, **options: Any) -> Any:
    """A field of SegmentationParams declaring its role, its unit and its default (`remembered`: the dock keeps
    the last run's value between sessions)."""
    return field(default=default, metadata={"role": role, "unit": unit, "remembered": remembered}, **options)


class _JsonFields:
    """A frozen dataclass that crosses the process boundary as the JSON object of its fields."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; `from_json` reads it back."""
        return asdict(self)

    @classmethod
    def _known_values(cls, what: str, data: dict[str, Any]) -> dict[str, Any]:
        """A copy of `data`, each of whose names is a field; a name that is not is refused (a newer or older
        sender), as one of the unknown `what`."""
        _refuse_unknown(what, data, (item.name for item in fields(cls)))
        return dict(data)


@dataclass(frozen=True)
class CrownOptions(_JsonFields):
    """Crown splitting (engine/core/crowns.py), in metres; `max_crown_m` is the widest crown a window split must
    see whole. The `crowns` job carries one across the process boundary (`to_json`, `from_json`)."""

    min_area_m2: float = 2.0
    min_distance_m: float = 1.0
    smoothing_m: float = 0.2
    max_crown_m: float = 25.0
    min_radius_m: float = 0.3

    def validate(self) -> None:
        """Raise ParameterError for a value no split can use."""
        for item in fields(self):
            value = getattr(self, item.name)
            if not (_is_number(value) and value >= 0) or (item.name == "max_crown_m" and value <= 0):
                raise ParameterError(f"{item.name} must be a finite number of at least 0"
                                     f"{' (above 0)' if item.name == 'max_crown_m' else ''}, not {value}.")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CrownOptions:
        """The options `to_json` wrote, validated; unknown names are refused."""
        options = cls(**cls._known_values("crown options", data))
        options.validate()
        return options


CROWN_DEFAULTS = CrownOptions()


@dataclass(frozen=True)
class SegmentationParams(_JsonFields):
    """Everything one segmentation (or teach) run needs; plain, frozen data, JSON-serialisable
    (`dataclasses.replace` makes a changed copy). Each field declares its `Role`, unit and default."""

    input_path: str = _param(Role.INPUT)
    output_dir: str = _param(Role.OUTPUT, remembered=True)
    method: Method = _param(Role.FEATURES | Role.SURVEY, "dinov3")
    bands: tuple[int, int, int] = _param(Role.FEATURES | Role.SURVEY, (1, 2, 3), "band number")
    model: str = _param(Role.FEATURES | Role.MODEL | Role.SURVEY, DEFAULT_MODEL, remembered=True)
    model_revision: str | None = _param(Role.FEATURES | Role.MODEL | Role.SURVEY, None)
    stride: int = _param(Role.FEATURES | Role.SURVEY, RUN_STRIDE, "px", remembered=True)
    clusters: Clusters = _param(Role.RESULT, AUTO, "clusters", remembered=True)
    k_min: int = _param(Role.RESULT, DEFAULT_K_RANGE[0], "clusters")
    k_max: int = _param(Role.RESULT, DEFAULT_K_RANGE[1], "clusters")
    device: Device = _param(Role.MODEL, "auto", remembered=True)
    precision: Precision = _param(Role.FEATURES | Role.MODEL, "auto", remembered=True)
    """Not SURVEY: a survey model checks the precision its features were extracted in (its extractor record)."""
    allow_untrained: bool = _param(Role.MODEL, False)
    tree_clusters: tuple[int, ...] | None = _param(Role.RESULT, None, "cluster id")
    min_exg: float = _param(Role.RESULT, DEFAULT_MIN_EXG, "excess green")
    tile_size: int = _param(Role.FEATURES | Role.SURVEY, RUN_TILE_SIZE, "px")
    overlap: int = _param(Role.FEATURES | Role.SURVEY, RUN_OVERLAP, "px")
    batch_size: int = _param(Role.RESOURCES, RUN_BATCH_SIZE, "tiles")
    sample_size: int = _param(Role.FEATURES, 40_000, "features")
    pca_dims: int = _param(Role.FEATURES, 32, "dimensions")
    seed: int = _param(Role.FEATURES, 0)
    crowns: bool = _param(Role.OUTPUT, False, remembered=True)
    feature_preview: bool = _param(Role.OUTPUT, False, remembered=True)
    canopy_height: bool = _param(Role.OUTPUT, False, remembered=True)
    height_model: str = _param(Role.RESULT, HEIGHT_HEAD.repo_id)
    min_tree_height_m: float | None = _param(Role.RESULT, None, "m", remembered=True)
    crown_min_area_m2: float = _param(Role.RESULT, CROWN_DEFAULTS.min_area_m2, "m²", remembered=True)
    crown_smoothing_m: float = _param(Role.RESULT, CROWN_DEFAULTS.smoothing_m, "m")
    use_cache: bool = _param(Role.RESOURCES, True)
    cache_dir: str | None = _param(Role.RESOURCES, None)
    cache_max_mb: int = _param(Role.RESOURCES, 2048, "MB")
    output_stem: str | None = _param(Role.OUTPUT, None)
    cluster_model: str | None = _param(Role.RESULT, None)
    """A saved survey cluster model (.treeseg) applied instead of fitting; its PCA's id joins the cache key."""
    outputs: OutputFiles = _param(Role.OUTPUT, default_factory=OutputFiles)

    @property
    def crown_options(self) -> CrownOptions:
        """The crown splitting this run asks for (the options it has no field for at their defaults)."""
        return replace(CROWN_DEFAULTS, min_area_m2=self.crown_min_area_m2, smoothing_m=self.crown_smoothing_m)

    @property
    def fixed_clusters(self) -> int | None:
        """The number of clusters asked for, or None when it is chosen automatically."""
        return None if self.clusters == AUTO else int(self.clusters)

    def validate(self) -> None:
        """Raise ParameterError for values no run can use."""
        _check_choice("method", self.method, METHODS)
        if self.method == "dinov3":
            _check_choice("stride", self.stride, STRIDES)
        else:
            _check_choice(f"stride for {self.method}", self.stride, COLOUR_STRIDES)
        _check_choice("device", self.device, DEVICES)
        _check_choice("precision", self.precision, PRECISIONS)
        if not isinstance(self.input_path, str) or not self.input_path.strip():
            raise ParameterError("Choose an input raster.")
        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            raise ParameterError("Choose an output folder.")
        if not isinstance(self.model, str) or not self.model.strip():
            raise ParameterError(f"Choose a model: one of {', '.join(MODEL_NAMES)}, a Hugging Face id or a folder.")
        if len(self.bands) != 3 or any(not _is_int(band) or band < 1 for band in self.bands):
            raise ParameterError(f"Bands must be three 1-based band numbers, not {self.bands}.")
        if self.clusters != AUTO and not (_is_int(self.clusters) and K_MIN <= self.clusters <= K_MAX):
            raise ParameterError(f"The number of clusters must be '{AUTO}' or between {K_MIN} and {K_MAX}, "
                                 f"not {self.clusters}.")
        if self.method == "exg-otsu" and self.fixed_clusters not in (None, 2):
            raise ParameterError("The ExG-Otsu baseline always splits into 2 clusters; leave clusters on auto.")
        if not (_is_int(self.k_min) and _is_int(self.k_max) and K_MIN <= self.k_min <= self.k_max <= K_MAX):
            raise ParameterError(f"The automatic cluster range {self.k_min}..{self.k_max} is not valid: "
                                 f"it must lie within {K_MIN}..{K_MAX}.")
        if self.tree_clusters is not None and any(not _is_int(c) or not 0 <= c < K_MAX for c in self.tree_clusters):
            raise ParameterError(f"Tree clusters must be cluster ids from 0 to {K_MAX - 1}, not {self.tree_clusters}.")
        if not _is_int(self.tile_size) or self.tile_size % 16 or self.tile_size < 64:
            raise ParameterError(f"The tile size must be a multiple of 16 and at least 64, not {self.tile_size}.")
        if not _is_int(self.overlap) or self.overlap % 16 or not 0 <= self.overlap <= self.tile_size // 2:
            raise ParameterError(
                f"The overlap must be a multiple of 16 up to half the tile size, not {self.overlap}.")
        if self.cluster_model is not None and (not isinstance(self.cluster_model, str)
                                               or not self.cluster_model.strip()):
            raise ParameterError("The cluster model must be the path of a .treeseg file (or none).")
        for name in ("batch_size", "sample_size", "pca_dims", "cache_max_mb"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ParameterError(f"{name} must be a whole number of at least 1, not {getattr(self, name)}.")
        for name in ("crown_min_area_m2", "crown_smoothing_m", "min_tree_height_m", "min_exg"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and (value >= 0 or name == "min_exg")):
                raise ParameterError(f"{name} must be a finite number of at least 0, not {value}.")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SegmentationParams:
        """The object `to_json` wrote; unknown names are refused (a newer or older sender)."""
        values = cls._known_values("parameters", data)
        for name in ("bands", "tree_clusters"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        outputs = values.get("outputs") or {}
        _refuse_unknown("outputs", outputs, OUTPUT_KINDS)
        values["outputs"] = OutputFiles(**outputs)
        return cls(**values)


def names_with(role: Role, params: SegmentationParams | type[SegmentationParams] = SegmentationParams,
               ) -> tuple[str, ...]:
    """The names of the fields of `params` (an object or its class, a subclass too) that have `role`, in field
    order."""
    return tuple(item.name for item in fields(params) if role in item.metadata["role"])


def settings_with(role: Role, params: SegmentationParams) -> dict[str, Any]:
    """The fields of `params` that have `role`: name → value."""
    return {name: getattr(params, name) for name in names_with(role, params)}


def remembered_names(params: type[SegmentationParams] = SegmentationParams) -> tuple[str, ...]:
    """The fields whose last value the dock keeps between sessions."""
    return tuple(item.name for item in fields(params) if item.metadata["remembered"])


def parse_clusters(text: str | int | None) -> Clusters:
    """A number of clusters as a user writes it: a whole number, or 'auto' (also empty or 0)."""
    if text is None or str(text).strip().lower() in ("", AUTO, "0"):
        return AUTO
    try:
        return int(str(text).strip())
    except ValueError:
        raise ParameterError(f"The number of clusters must be '{AUTO}' or a whole number, not {text!r}.") from None


def parse_cluster_ids(text: str | None) -> tuple[int, ...] | None:
    """Cluster ids as a user writes them ("0, 3" or "0;3"); None for empty text (the greenness rule)."""
    parts = [part.strip() for part in (text or "").replace(";", ",").split(",") if part.strip()]
    if not parts:
        return None
    try:
        return tuple(sorted({int(part) for part in parts}))
    except ValueError:
        raise ParameterError(f"Tree clusters must be cluster ids separated by commas, e.g. 0,3, not {text!r}.") \
            from None


def _refuse_unknown(what: str, names: Iterable[str], known: Iterable[str]) -> None:
    unknown = set(names) - set(known)
    if unknown:
        raise ParameterError(f"Unknown {what}: {', '.join(sorted(unknown))}.")


def _check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices or isinstance(value, bool):
        raise ParameterError(f"Unknown {name} {value!r}: use one of {', '.join(map(str, choices))}.")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
