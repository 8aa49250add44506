"""The records of engine jobs, typed: what a segmentation, a teach, a crowns or a fit job did and wrote.

The engine builds them and sends `to_dict()` as the `result` of a job (protocol.py) and writes a run's and a
teach's record as JSON beside its outputs (`to_json()`); the QGIS side reads them with `from_dict()` and uses
attributes. Reading checks every field against its type: a record that lacks a field or holds a wrong kind
of value (a damaged or hand-edited file, another version's record) is refused with one `RecordError` line naming
the field. Keys a record holds beyond its fields (a newer engine's additions) are ignored, except the model's
facts, which each backbone describes in its own words: the ones this module names are typed, the others are
kept in `ModelFacts.details` and written back as they came. The wire format is the protocol's (its version is
checked in the `hello` handshake); these classes change no key of it. Standard library only: both sides import
it.
"""

from __future__ import annotations

import json
import types
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Union, get_args, get_origin, get_type_hints

from . import __version__
from .params import SegmentationParams


class RecordError(ValueError):
    """A record that is not what its kind says: the message names the field, in one line."""


def _key(name: str) -> Any:
    """A field written under another JSON key than its name (`class` is a Python keyword)."""
    return field(metadata={"key": name})


def _fact() -> Any:
    """A model fact only some models have: None, and then left out of the record, where it does not apply."""
    return field(default=None, metadata={"omitted_when_none": True})


@dataclass(frozen=True)
class _ModelIdentity:
    """What every model a job ran states: its id, whether its weights are random, which weights, on what device."""

    model_id: str
    untrained: bool
    weights: str
    device: str


@dataclass(frozen=True)
class HeightModelFacts(_ModelIdentity):
    """The canopy-height model a run used."""


@dataclass(frozen=True)
class ModelFacts(_ModelIdentity):
    """The backbone (or colour baseline) a job ran; `details`: the other facts it describes itself with
    (normalisation, dtype, feature size…), kept as they came."""

    method: str | None = _fact()
    precision: str | None = _fact()
    fell_back_to_cpu: str | None = _fact()
    height_model: HeightModelFacts | None = _fact()
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_facts(cls, facts: dict[str, Any]) -> ModelFacts:
        """The facts a backbone's `describe()` gives (the canopy-height model's under `height_model`)."""
        return _build(cls, facts, "model")


@dataclass(frozen=True)
class InputFacts:
    """The raster a run read."""

    path: str
    width: int
    height: int
    bands: list[int]
    scaling: str


@dataclass(frozen=True)
class ClusterFacts:
    """The clusters of a run: K (and whether it was chosen), the inertia per K, each cluster's ExG and pixels."""

    k: int
    automatic: bool
    inertia_curve: dict[str, float]
    mean_exg: list[float]
    pixels: list[int]


@dataclass(frozen=True)
class TreeFacts:
    """Which clusters are trees, by which rule, and the tree cover of the valid pixels."""

    clusters: list[int]
    rule: str
    tree_pixels: int
    valid_pixels: int
    tree_cover: float


@dataclass(frozen=True)
class FeatureCacheUse:
    """Where a run's features came from: state 'hit', 'miss' or 'off', and the cache entry's folder."""

    state: str
    folder: str | None


@dataclass(frozen=True)
class ModelRun:
    """What the model ran: tiles with a valid pixel, and their pixels (a tile with nodata cropped to its valid box)."""

    tiles: int
    pixels: int


@dataclass(frozen=True)
class AppliedClusterModel:
    """The survey cluster model a run applied, and how much of each band its value scaling clipped."""

    path: str
    projection: str
    clipped: dict[str, float]
    warning: str | None


@dataclass(frozen=True)
class _Record:
    """What reading and writing every record shares."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form: the keys the protocol and the record files have always had."""
        return _plain(self)

    def to_json(self) -> str:
        """The record file's text."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Any) -> Any:
        """The record `data` holds, or RecordError (one line) for a missing field or a wrong kind of value."""
        try:
            return _build(cls, data, "")
        except RecordError as error:
            written_by = data.get("treeseg_version") if isinstance(data, dict) else None
            other = f" (written by treeseg {written_by}, this is {__version__})" \
                if isinstance(written_by, str) and written_by != __version__ else ""
            raise RecordError(f"Not a treeseg {_WHAT[cls]}{other}: {error}") from None

    @classmethod
    def from_json(cls, text: str) -> Any:
        """The record in a record file's `text`, or RecordError (one line)."""
        try:
            data = json.loads(text)
        except ValueError as error:
            raise RecordError(f"Not a treeseg {_WHAT[cls]}: not JSON ({error}).") from None
        return cls.from_dict(data)


@dataclass(frozen=True)
class RunRecord(_Record):
    """One segmentation run (`<stem>_run.json`): its input, model, clusters, trees, outputs and timings."""

    treeseg_version: str
    warning: str | None
    input: InputFacts
    method: str
    model: ModelFacts
    requested_model: str
    stride: int
    clusters: ClusterFacts
    trees: TreeFacts
    polygons: int
    tiles: int
    model_run: ModelRun
    parameters: SegmentationParams
    outputs: dict[str, str]
    """Output kind (outputs.OUTPUT_KINDS) → file, for the files written and the record."""
    timings: dict[str, float]
    platform: dict[str, str]
    crowns: int | None
    cluster_model: AppliedClusterModel | None
    feature_cache: FeatureCacheUse

    @property
    def total_seconds(self) -> float:
        """How long the whole run took."""
        return self.timings.get("total", 0.0)


@dataclass(frozen=True)
class TeachExamples:
    """How many examples of the taught class and of anything else a one-class teach used."""

    trees: int
    not_trees: int


@dataclass(frozen=True)
class SurveyModelUse:
    """The survey cluster model whose features a teach ran on: its file and PCA id (what finds the survey's
    layer group)."""

    path: str
    projection: str


@dataclass(frozen=True)
class _TaughtFacts(_Record):
    """What the records of a teach of one class and of several share."""

    treeseg_version: str
    warning: str | None
    model: ModelFacts
    threshold_note: str
    outputs: dict[str, str]
    classifier: dict[str, str] | None
    """{"applied": file} or {"saved": file} when a taught classifier file was used or kept."""
    held_out_accuracy: float | None
    temperature: float
    feature_cache: str
    timings: dict[str, float]
    cluster_model: SurveyModelUse | None = field(default=None, kw_only=True, metadata={"omitted_when_none": True})
    """Left out of a teach without a survey cluster model."""


@dataclass(frozen=True)
class TeachRecord(_TaughtFacts):
    """One class taught (`<stem>_teach.json`): its examples, threshold, cover and files."""

    class_name: str = _key("class")
    examples: TeachExamples
    threshold: float
    threshold_source: str
    tree_cover: float


@dataclass(frozen=True)
class ClassesRecord(_TaughtFacts):
    """Several classes taught (`<stem>_classes_teach.json`): the classes, their raster values, covers and files."""

    classes: list[str]
    class_values: dict[str, int]
    unsure_value: int
    examples: dict[str, int]
    class_cover: dict[str, float]
    polygons: int


TaughtRecord = Union[TeachRecord, ClassesRecord]


def taught_record(data: Any) -> TaughtRecord:
    """The record of a teach job: several classes (it names `classes`) or one; RecordError (one line) else."""
    return (ClassesRecord if isinstance(data, dict) and "classes" in data else TeachRecord).from_dict(data)


@dataclass(frozen=True)
class CrownsRecord(_Record):
    """A crowns job: how many crowns, in which file."""

    crowns: int
    outputs: dict[str, str]


@dataclass(frozen=True)
class FitRecord(_Record):
    """A survey cluster model fitted: its file, K, the tree clusters and rule, the rasters it sampled."""

    cluster_model: str
    model: dict[str, Any]
    """The extractor's facts as the model file keeps them."""
    k: int
    automatic_k: bool
    tree_clusters: list[int]
    tree_rule: str
    inputs: list[Any]


_WHAT = {RunRecord: "run record", TeachRecord: "teach record", ClassesRecord: "teach record",
         CrownsRecord: "crowns record", FitRecord: "fit record"}


def _plain(value: Any) -> Any:
    """A record (or a part of one) as JSON-ready values, under its JSON keys; `details` flattened into its owner."""
    if isinstance(value, SegmentationParams):
        return value.to_json()
    if is_dataclass(value):
        data: dict[str, Any] = {}
        for item in fields(value):
            if item.name == "details":
                data.update(getattr(value, item.name))
            elif not (item.metadata.get("omitted_when_none") and getattr(value, item.name) is None):
                data[item.metadata.get("key", item.name)] = _plain(getattr(value, item.name))
        return data
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    """`cls` from the JSON object `data`, every field checked; unknown keys ignored (or kept in `details`)."""
    if not isinstance(data, dict):
        raise RecordError(f"{where or 'the record'} is {_shown(data)}, not an object.")
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    known = set()
    for item in fields(cls):
        key = item.metadata.get("key", item.name)
        known.add(key)
        if item.name == "details":
            continue
        if key not in data:
            if item.default is MISSING and item.default_factory is MISSING:
                raise RecordError(f"{_joined(where, key)} is missing.")
            continue
        values[item.name] = _value(hints[item.name], data[key], _joined(where, key))
    if "details" in hints:
        values["details"] = {key: value for key, value in data.items() if key not in known}
    return cls(**values)


def _value(kind: Any, value: Any, where: str) -> Any:
    """`value` checked against the type `kind` (converted where the type says: nested records, parameters)."""
    origin, args = get_origin(kind), get_args(kind)
    if kind is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (single,) = [arg for arg in args if arg is not type(None)]
        return _value(single, value, where)
    if kind is SegmentationParams:
        try:
            parameters = SegmentationParams.from_json(value if isinstance(value, dict) else {})
            parameters.validate()
            return parameters
        except (ValueError, TypeError) as error:
            raise RecordError(f"{where}: {error}") from None
    if is_dataclass(kind):
        return _build(kind, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise RecordError(f"{where} is {_shown(value)}, not a list.")
        return [_value(args[0], item, f"{where}[{index}]") for index, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecordError(f"{where} is {_shown(value)}, not an object.")
        return {key: _value(args[1], item, _joined(where, key)) for key, item in value.items()}
    if _fits(kind, value):
        return float(value) if kind is float else value
    raise RecordError(f"{where} is {_shown(value)}, not {_NAMES[kind]}.")


_NAMES = {str: "text", int: "a whole number", float: "a number", bool: "true or false"}


def _fits(kind: type, value: Any) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _joined(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."
