"""The one pipeline function: parameters in, GeoTIFFs, polygons, preview and run record out.

The command line calls it now; the QGIS task and the Processing algorithm reach
it through the engine worker process. It wires the GDAL reader and writers
(gis/) to the QGIS-free engine (core/). Outputs are written under temporary
names and renamed when complete; on failure or cancel nothing of the run is left.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
from osgeo import gdal

from .. import __version__
from ..atomic import write_atomically
from ..memory import run_estimate, size_warning
from ..outputs import (
    DEFAULT_CLASS,
    SEGMENT_KINDS,
    SUFFIXES,
    TEACH_KINDS,
    OutputPaths,
    OutputTransaction,
    check_output_folder,
    check_run_paths,
    taught_class_paths,
)
from ..params import ParameterError, Role, SegmentationParams, settings_with
from ..run_record import (
    AppliedClusterModel,
    ClusterFacts,
    FeatureCacheUse,
    InputFacts,
    ModelFacts,
    ModelRun,
    RunRecord,
    TreeFacts,
    taught_record,
)
from . import interrupts
from .core.cache import CacheUnavailable, FeatureCache, file_identity
from .core.devices import describe_precision, device_type, resolve_precision
from .core.errors import InputError, OutputError, cannot_write
from .core.examples import OTHER, Example
from .core.feature_grid import FeatureGrid
from .core.features import ColourFeatures, FeatureExtractor
from .core.files import refuse_special_files_in
from .core.models import Backbone, load_backbone, weights_identity
from .core.progress import Progress
from .core.segmentation import (
    NO_VALID_PIXELS,
    RasterFeatures,
    SegmentationResult,
    TileFeatureExtractor,
    ensure_features,
    segment_raster,
)
from .core.store import FeatureStore
from .core.survey_model import SurveyModel, clipping_note
from .core.taught_model import TaughtModel
from .core.teach import UNSURE_BELOW, Taught, class_mask_rule, classes_rule, score_raster, teach_classifier
from .core.tiling import TileGrid, Window
from .gis.class_outputs import UNSURE, UNSURE_NAME, ClassRasterWriter, write_class_polygons
from .gis.polygons import polygonize_clusters
from .gis.preview import write_elbow_plot, write_preview
from .gis.raster import GdalRasterSource, HeightReader, RasterGrid, limit_block_cache
from .gis.reference import read_examples
from .gis.writers import HeightRasterWriter, LabelRasterWriter, ScoreRasterWriter, write_rgb_blocks
from .preflight import check_teach_options, output_check

CLASSES_RECORD_SUFFIX = "_classes_teach.json"
log = logging.getLogger("treeseg")

UNTRAINED_BANNER = (
    "UNTRAINED WEIGHTS: the model has random weights, so this result only checks the "
    "pipeline; it is not a real segmentation."
)


ModelLoader = Callable[[SegmentationParams], Backbone]


def segment(
    params: SegmentationParams,
    progress: Progress | None = None,
    load_model: ModelLoader | None = None,
    features: str | Path | None = None,
) -> RunRecord:
    """Run one segmentation and return its record (also written as `<stem>_run.json`).

    `load_model` loads the backbone (default: load_backbone); it is not called
    when the feature cache already holds this raster's features, nor when `features` is a complete
    feature store of this raster made with the run's cluster model (windows of it extracted apart,
    `extract_window`): that store becomes the run's cache entry (or serves the run when the cache is off).
    """
    validate_params(params)
    if params.method == "exg-otsu":
        params = replace(params, clusters=2)
    progress = progress or Progress()
    started = time.perf_counter()
    survey = SurveyModel.load(params.cluster_model) if params.cluster_model else None
    with _opened(params, progress, SEGMENT_KINDS, survey=survey) as (source, store, cache_state):
        if features is not None:
            store, cache_state = _prebuilt(FeatureStore(features), store, cache_state)
        if not store.complete and params.method == "dinov3":
            _report_estimate(params, source, progress)
        progress.report(0.0, "Reading cached features" if store.complete else "Loading model")
        progress.check()
        load_started = time.perf_counter()
        features, model = _features(params, source, store, load_model)
        load_seconds = time.perf_counter() - load_started
        if survey:
            survey.check_extractor(model)
        if model["untrained"]:
            log.warning(UNTRAINED_BANNER)
        paths = OutputPaths.for_params(params, model["untrained"])
        for folder in {str(path.parent) for path in paths.all()}:
            output_check(check_output_folder, folder)
        transaction = OutputTransaction(paths.all())
        staged = paths.staged(transaction)
        writers: list[LabelRasterWriter] = []
        written: list[Path] = []

        def open_sink(k: int, tree_clusters: list[int]) -> LabelRasterWriter:
            writers.append(LabelRasterWriter(
                str(staged.clusters), str(staged.trees), source.grid, k, tree_clusters,
                _raster_metadata(params, model)))
            return writers[-1]

        try:
            tree_filter = None
            height_timings: dict[str, float] = {}
            if params.canopy_height or params.min_tree_height_m is not None:
                model["height_model"] = _canopy_height(params, source, staged.height, progress.sub(0.0, 0.3),
                                                       height_timings)
                written.append(paths.height)
                tree_filter = _height_filter(staged.height, params.min_tree_height_m)
            result = segment_raster(params, features, open_sink,
                                    progress.sub(0.3 if height_timings else 0.03, 0.9), tree_filter, survey)
            if not result.valid_pixels:  # with a survey's cluster model nothing is fitted that would see it
                raise InputError(NO_VALID_PIXELS)
            if features.extractor is not None:
                model.update(features.extractor.describe())
            result.timings.update({name: round(seconds, 3) for name, seconds in height_timings.items()})
            if params.min_tree_height_m is not None:
                result.tree_rule += f" and canopy height ≥ {params.min_tree_height_m:g} m"
            writers[-1].close()
            written += [paths.clusters, paths.trees]
            with interrupts.deferred():
                polygons = _polygonize(staged, result, model, progress)
            written.append(paths.polygons)
            crowns = None
            if params.crowns:
                with interrupts.deferred():
                    crowns = _crowns(params, staged, result, model, progress)
                written.append(paths.crowns)
            if params.feature_preview:
                progress.report(0.97, "Writing the feature image")
                _write_feature_image(staged.features, source, store, result, params, model)
                written.append(paths.features)
            progress.report(0.98, "Writing preview")
            progress.check()
            preview_started = time.perf_counter()
            write_preview(source, str(staged.clusters), str(staged.trees), str(staged.preview),
                          title=_preview_title(params, model, result))
            written.append(paths.preview)
            if result.auto_k:
                write_elbow_plot(result.inertia_curve, result.k, str(staged.elbow))
                written.append(paths.elbow)
            result.timings["preview"] = round(time.perf_counter() - preview_started, 3)
            result.timings["load_model"] = round(load_seconds, 3)
            result.timings["total"] = round(time.perf_counter() - started, 3)
            record = _record(params, model, source, result, paths, polygons, written, crowns,
                             _survey_record(params, survey, source) if survey else None,
                             FeatureCacheUse(cache_state, str(store.home) if cache_state != "off" else None))
            with cannot_write(str(staged.record)):
                write_atomically(staged.record, record.to_json())
            progress.check()
            with interrupts.deferred(reraise=False):
                commit_outputs(transaction, [*written, paths.record],
                               paths.stale(params, SEGMENT_KINDS, [*written, paths.record]))
        except BaseException as error:
            _abort(transaction, *writers)
            if isinstance(error, RuntimeError) and _writing_failed(error, paths.clusters.parent) is not error:
                raise _writing_failed(error, paths.clusters.parent) from error
            raise
    progress.report(1.0, "Done")
    return record


def teach(
    params: SegmentationParams,
    examples: list[Example] | str,
    threshold: float | None = None,
    progress: Progress | None = None,
    load_model: ModelLoader | None = None,
    class_name: str = DEFAULT_CLASS,
    classifier: str | None = None,
    save_classifier: str | None = None,
) -> dict:
    """Click-to-teach: class probabilities from example locations and the class mask (core/teach.py).

    `examples` is a list of pixel positions (`is_tree`: an example of the class; `label`: its class when
    several are taught), or a file (points with `is_tree` or a text `class` field, or a CSV of col,row,is_tree
    or col,row,class). One class: its probability and mask (P ≥ `threshold`, default 0.5). Several classes:
    the class raster (most probable class, "unsure" where none reaches 0.5), one probability band per class and
    polygons with a `class` field. Features come from the cache when it holds them.

    With a survey cluster model (`params.cluster_model`), `save_classifier` keeps the taught classifier in a
    file (core/taught_model.py, written with the outputs), and `classifier` applies such a file instead of
    teaching from examples: the same classes and legend on every raster of the survey.
    """
    validate_params(params)
    check_teach_options(threshold, params.cluster_model, classifier, save_classifier)
    progress = progress or Progress()
    started = time.perf_counter()
    survey = SurveyModel.load(params.cluster_model) if params.cluster_model else None
    applied = TaughtModel.load(classifier) if classifier else None
    inputs = [p for p in (examples if isinstance(examples, str) else None, classifier) if p]
    if save_classifier:
        _check_not_an_input(save_classifier, [params.input_path, params.cluster_model, *inputs])
    with _opened(params, progress, TEACH_KINDS, inputs, survey) as (source, store, cache_state):
        if isinstance(examples, str):
            examples = _read_examples(examples, source)
        progress.report(0.0, "Loading model" if cache_state != "hit" else "Reading cached features")
        features, model = _features(params, source, store, load_model)
        if survey:
            survey.check_extractor(model)
        timings: dict[str, float] = {}
        raster_sample, _ = ensure_features(params, features, progress.sub(0.02, 0.8), timings,
                                           survey.projection if survey else None)
        if features.extractor is not None:
            model.update(features.extractor.describe())
        if applied:
            applied.check_features(survey.projection_id, model, raster_sample.shape[1])
            taught = Taught(applied.classifier, {}, None, False, [f"the classifier taught in {classifier}"])
            multi, class_name = applied.multi, applied.classifier.classes[0]
        else:
            taught = teach_classifier(store, features.grid, examples or [], raster_sample, class_name)
            multi = any(example.label for example in examples or [])
        keep = None
        if save_classifier:
            keep = (TaughtModel(taught.classifier, survey.projection_id, model,
                                weights_identity(params.model, params.model_revision)
                                if params.method == "dinov3" else {}, multi), Path(save_classifier))
        scoring = progress.sub(0.8, 0.99)
        summary = {
            "treeseg_version": __version__,
            "warning": UNTRAINED_BANNER if model["untrained"] else None,
            "model": model,
        }
        if multi:
            record = _write_classes(params, features, taught, summary, scoring, keep)
        else:
            record = _write_class(params, features, taught, threshold, class_name, summary, scoring, keep)
        record["classifier"] = ({"applied": classifier} if classifier else
                                {"saved": save_classifier} if save_classifier else None)
        record["held_out_accuracy"] = taught.held_out_accuracy
        record["temperature"] = taught.classifier.temperature
        record["feature_cache"] = cache_state
        if survey:  # the survey's layer group finds the record by it
            record["cluster_model"] = {"path": str(params.cluster_model), "projection": survey.projection_id}
        record["timings"] = {**{k: round(v, 3) for k, v in timings.items()},
                             "total": round(time.perf_counter() - started, 3)}
        _commit_teach(record, progress, keep[0] if keep else None)
    progress.report(1.0, "Done")
    return record


def _write_class(params: SegmentationParams, features: RasterFeatures, taught: Taught, threshold: float | None,
                 class_name: str, summary: dict, progress: Progress, keep: tuple[TaughtModel, Path] | None) -> dict:
    """One class taught: its probability raster and mask, staged; the record without timings."""
    decision = taught.threshold(threshold)
    paths = taught_class_paths(params, summary["model"]["untrained"], class_name)
    finals = [paths.similarity, paths.taught_trees, paths.teach_record, *([keep[1]] if keep else [])]
    transaction, staged = _teach_transaction(finals)
    writer = None
    try:
        writer = ScoreRasterWriter(str(staged[0]), str(staged[1]), features.source.grid,
                                   _raster_metadata(params, summary["model"]))
        counts = score_raster(features, taught.classifier, class_mask_rule(decision.value),
                              _ClassScores(writer), progress)
        writer.close()
    except BaseException:
        _abort(transaction, writer)
        raise
    valid_pixels = int(counts[:2].sum())
    return {
        **summary,
        "class": class_name,
        "examples": {"trees": taught.counts.get(class_name, 0), "not_trees": taught.counts.get(OTHER, 0)},
        "threshold": decision.value,
        "threshold_source": decision.source,
        "threshold_note": "; ".join([decision.note, *taught.notes]),
        "tree_cover": round(int(counts[1]) / valid_pixels, 4) if valid_pixels else 0.0,
        "outputs": {"similarity": str(paths.similarity), "taught_trees": str(paths.taught_trees),
                    "teach_record": str(paths.teach_record), **({"classifier": str(keep[1])} if keep else {})},
        "_transaction": (transaction, staged, finals),
    }


def _write_classes(params: SegmentationParams, features: RasterFeatures, taught: Taught, summary: dict,
                   progress: Progress, keep: tuple[TaughtModel, Path] | None) -> dict:
    """Several classes taught: the class raster, the probabilities and the class polygons, staged."""
    paths = OutputPaths.for_params(params, summary["model"]["untrained"])
    record_path = _classes_record_path(params, paths)
    finals = [paths.classes, paths.class_probabilities, paths.class_polygons, record_path,
              *([keep[1]] if keep else [])]
    transaction, staged = _teach_transaction(finals)
    names = taught.classifier.classes
    writer = None
    try:
        writer = ClassRasterWriter(str(staged[0]), str(staged[1]), features.source.grid, names,
                                   _raster_metadata(params, summary["model"]))
        counts = score_raster(features, taught.classifier, classes_rule(UNSURE), writer, progress)
        writer.close()
        polygons = write_class_polygons(str(staged[0]), str(staged[2]), names)
    except BaseException:
        _abort(transaction, writer)
        raise
    valid_pixels = max(int(counts[: len(names) + 1].sum()), 1)

    def share(pixels: int) -> float:
        return round(int(pixels) / valid_pixels, 4)

    return {
        **summary,
        "classes": names,
        "class_values": {name: index + 1 for index, name in enumerate(names)},
        "unsure_value": UNSURE,
        "examples": taught.counts,
        "class_cover": {**{name: share(counts[index + 1]) for index, name in enumerate(names)},
                        UNSURE_NAME: share(counts[UNSURE])},
        "polygons": polygons,
        "threshold_note": f"most probable class; {UNSURE_NAME} where none reaches {UNSURE_BELOW:.2f}"
                          + (f" (leave-one-out accuracy {taught.held_out_accuracy:.2f})"
                             if taught.held_out_accuracy is not None else " (too few examples to check them)")
                          + "".join(f"; {note}" for note in taught.notes),
        "outputs": {"classes": str(paths.classes), "class_probabilities": str(paths.class_probabilities),
                    "class_polygons": str(paths.class_polygons), "teach_record": str(record_path),
                    **({"classifier": str(keep[1])} if keep else {})},
        "_transaction": (transaction, staged, finals),
    }


def _classes_record_path(params: SegmentationParams, paths: OutputPaths) -> Path:
    """The record of a several-classes teach: the one asked for, else `<stem>_classes_teach.json`."""
    return paths.teach_record if params.outputs.teach_record else Path(
        str(paths.classes)[: -len(SUFFIXES["classes"])] + CLASSES_RECORD_SUFFIX)


def taught_output_paths(params: SegmentationParams, untrained: bool, applied: TaughtModel) -> list[Path]:
    """Every file applying the taught classifier `applied` to `params`' raster writes (`teach(classifier=…)`)."""
    if applied.multi:
        paths = OutputPaths.for_params(params, untrained)
        return [paths.classes, paths.class_probabilities, paths.class_polygons, _classes_record_path(params, paths)]
    paths = taught_class_paths(params, untrained, applied.classifier.classes[0])
    return [paths.similarity, paths.taught_trees, paths.teach_record]


def _check_not_an_input(path: str, inputs: list[str | None]) -> None:
    """Refuse an output file on one of the run's inputs, or on something that is not a plain file."""
    target = Path(path)
    if any(given and _same_file(target, Path(given)) for given in inputs):
        raise InputError(f"{path} is one of this run's inputs: choose another file for the taught classifier.")
    if target.exists() and not target.is_file():
        raise InputError(f"{path} is not a plain file: choose another file for the taught classifier.")


def _same_file(one: Path, other: Path) -> bool:
    try:
        return one.resolve() == other.resolve() or (one.exists() and other.exists() and one.samefile(other))
    except OSError:
        return False


def _teach_transaction(finals: list[Path]) -> tuple[OutputTransaction, list[Path]]:
    """The transaction of a teach run's files (their folders made) and where each is staged."""
    for folder in {str(path.parent) for path in finals}:
        output_check(check_output_folder, folder)
    transaction = OutputTransaction(finals)
    return transaction, [transaction.staged(path) for path in finals]


def _commit_teach(record: dict, progress: Progress, keep: TaughtModel | None) -> None:
    """Write the record (and the classifier to keep) beside the staged files and move them all into place,
    or none."""
    transaction, staged, finals = record.pop("_transaction")
    try:
        staged_record = staged[finals.index(Path(record["outputs"]["teach_record"]))]
        with cannot_write(str(staged_record)):
            write_atomically(staged_record, taught_record(record).to_json())
        if keep is not None:
            keep.save(staged[-1])
        progress.check()
        with interrupts.deferred(reraise=False):
            commit_outputs(transaction, finals, [])
    except BaseException:
        _abort(transaction)
        raise


class _ClassScores:
    """The teach score sink of one class: its probability band and the 0/1 mask to the score writer."""

    def __init__(self, writer: ScoreRasterWriter) -> None:
        self.writer = writer

    def write(self, x: int, y: int, probabilities: np.ndarray, labels: np.ndarray) -> None:
        self.writer.write(x, y, probabilities[0], labels)


def extract_window(params: SegmentationParams, tiles: range, folder: str | Path,
                   load_model: ModelLoader | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """One window of a raster split across workers: the tiles numbered `tiles` (in grid order) extracted,
    projected with the cluster model's PCA and stored in the feature store at `folder`; their part of the
    cluster sample, its ExG and what made the features (`FeatureStore.save_samples` completes the store)."""
    validate_params(params)
    survey = SurveyModel.load(params.cluster_model)
    limit_block_cache()
    with _survey_source(params, survey) as source:
        extractor = feature_extractor(params, load_model)
        survey.check_extractor(extractor.describe())
        grid = FeatureGrid.of_extractor(TileGrid(source.width, source.height, params.tile_size, params.overlap),
                                        extractor)
        features = RasterFeatures(source, grid, FeatureStore(folder), extractor)
        samples, exg = ensure_features(params, features, Progress(), {}, survey.projection,
                                       tiles=grid.tiles.tiles()[tiles.start:tiles.stop])
        return samples, exg, {**extractor.describe(), **grid.describe()}


def _read_examples(path: str, source: GdalRasterSource) -> list[Example]:
    try:
        return read_examples(path, source.grid)
    except (RuntimeError, ValueError) as error:
        raise InputError(f"Cannot use the examples in {path}: {error}. Every point needs valid coordinates "
                         "in a known CRS (or use a CSV of col,row,is_tree pixel numbers).") from error


def validate_params(params: SegmentationParams) -> None:
    """`params.validate()` for direct callers; a refused value is the user's (InputError), as is a model folder
    holding a pipe or device (refused before anything reads it)."""
    try:
        params.validate()
    except ParameterError as error:
        raise InputError(str(error)) from None
    if params.method == "dinov3" and Path(params.model).is_dir():
        refuse_special_files_in(params.model, "model folder")


@contextmanager
def _opened(params: SegmentationParams, progress: Progress, kinds: tuple[str, ...],
            extra_inputs: Sequence[str] = (),
            survey: SurveyModel | None = None) -> Iterator[tuple[GdalRasterSource, FeatureStore, str]]:
    """The input raster and the run's feature store (see `_feature_store`), output folder and paths checked;
    with a survey cluster model, the raster read with the survey's value scaling and checked against it."""
    limit_block_cache()
    _check_input_is_a_file(params.input_path)
    output_check(check_output_folder, params.output_dir)
    with _survey_source(params, survey) as source:
        output_check(check_run_paths, params, kinds,
                     (params.input_path, *source.files, *filter(None, [*extra_inputs, params.cluster_model])))
        with _feature_store(params, source, progress, survey) as (store, cache_state):
            yield source, store, cache_state


@contextmanager
def _survey_source(params: SegmentationParams, survey: SurveyModel | None) -> Iterator[GdalRasterSource]:
    """The input raster; with a survey cluster model, read with the survey's value scaling and checked against
    the model (a warning when much of it lies outside the survey's values)."""
    with GdalRasterSource(params.input_path, params.bands, survey.value_ranges if survey else None) as source:
        if survey:
            survey.check_run(settings_with(Role.SURVEY, params), _precision(params), source.bands, source.scaling)
            if note := clipping_note(source.clipped):
                log.warning("%s: %s", params.input_path, note)
        yield source


def _prebuilt(prebuilt: FeatureStore, store: FeatureStore, cache_state: str) -> tuple[FeatureStore, str]:
    """The run's store and cache state given a store filled apart (its windows on several workers): moved into
    the cache entry this run fills (gone from where it was: a retry after a failure extracts again), or, with
    the cache off, used where it is; with a cache hit, or when incomplete, it is not used."""
    if not prebuilt.complete or cache_state == "hit":
        return store, cache_state
    if cache_state == "off":
        return prebuilt, cache_state
    store.adopt(prebuilt)
    return store, cache_state


def _report_estimate(params: SegmentationParams, source: GdalRasterSource, progress: Progress) -> None:
    """The tiles, expected time and memory of the run, before any work, in the precision the forward runs in and
    with automatic K or not; a warning for a very long run."""
    device = device_type(params.device)
    precision = resolve_precision(device, params.precision) if params.method == "dinov3" else "int8"
    options = {"precision": precision, "automatic_k": params.fixed_clusters is None}
    progress.report(0.0, run_estimate(params.model, source.width, source.height, params.stride, params.tile_size,
                                      params.batch_size, device, params.overlap, **options))
    warning = size_warning(params.model, source.width, source.height, params.stride, params.tile_size, device,
                           params.overlap, **options)
    if warning is not None:
        log.warning(warning)


def _check_input_is_a_file(path: str) -> None:
    """Refuse a FIFO, socket or device before GDAL blocks on it forever."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # a GDAL virtual path, or missing: GDAL's own message follows
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise InputError(f"'{path}' is not a regular file (a pipe, socket or device): save the raster to a "
                         "file and choose that.")


@contextmanager
def _feature_store(params: SegmentationParams, source: GdalRasterSource, progress: Progress,
                   survey: SurveyModel | None) -> Iterator[tuple[FeatureStore, str]]:
    """The run's feature store and the cache state: 'hit', 'miss' (filled now) or 'off'.

    A cache folder that cannot take the features turns the cache off for this run, with a warning.
    """
    entry = None
    if params.use_cache:
        cache = FeatureCache(params.cache_dir, params.cache_max_mb)
        try:
            entry = cache.open(_cache_key(params, source, survey), _feature_bytes(params, source),
                               progress.is_cancelled,
                               lambda: progress.report(0.0, "Waiting for another run extracting the same features"))
        except CacheUnavailable as error:
            log.warning("The feature cache is off for this run (%s): the next run extracts the features again. "
                        "Free some space or choose another cache folder (--cache-dir), or turn the cache off "
                        "(--no-cache).", error)
    if entry is None:
        with tempfile.TemporaryDirectory(prefix="treeseg-features-") as folder:
            yield FeatureStore(folder), "off"
        return
    try:
        yield entry.store, entry.state
        entry.publish()
    finally:
        with interrupts.deferred(reraise=False):
            entry.close()
    cache.evict(keep=entry.final)


def _cache_key(params: SegmentationParams, source: GdalRasterSource, survey: SurveyModel | None = None) -> dict:
    """Everything that changes the features: every parameter of role FEATURES (params.Role; the bands as the
    source reads them, the precision resolved), the input's files (a VRT's sources too; not the .aux.xml GDAL
    may write beside them when reading), the weights, the value scaling, and a survey's PCA when features are
    projected with it (a per-raster entry is never taken for a survey-projected one)."""
    dinov3 = params.method == "dinov3"
    return {
        **settings_with(Role.FEATURES, params),
        **({"projection": survey.projection_id} if survey else {}),
        "format": 5,  # 3: a tile with nodata runs cropped to its valid pixels; 4: past the raster too; 5: a raster
        # smaller than a tile runs as a crop (issue #31)
        "input": [_input_identity(path) for path in source.files if not path.endswith(".aux.xml")],
        "bands": list(source.bands),
        "scaling": source.scaling,
        "weights": weights_identity(params.model, params.model_revision) if dinov3 else None,
        "precision": _precision(params),
    }


def _survey_record(params: SegmentationParams, survey: SurveyModel, source: GdalRasterSource,
                   ) -> AppliedClusterModel:
    """The cluster model a run applied, and how much of each band its value scaling clipped."""
    return AppliedClusterModel(str(params.cluster_model), survey.projection_id,
                               {f"band {number}": round(share, 4) for number, share in source.clipped.items()},
                               clipping_note(source.clipped))


def _precision(params: SegmentationParams) -> str | None:
    """What the model runs in, as the record says it (None for the colour baselines)."""
    if params.method != "dinov3":
        return None
    return describe_precision(resolve_precision(device_type(params.device), params.precision))


def _input_identity(path: str) -> dict:
    """A file's identity (core/cache.py); for a GDAL virtual path (/vsizip/…) its size and time."""
    if path.startswith("/vsi"):
        stat = gdal.VSIStatL(path)
        return {"path": path, "size": stat.size if stat else None, "mtime": stat.mtime if stat else None}
    return file_identity(path)


def _feature_bytes(params: SegmentationParams, source: GdalRasterSource) -> int:
    """About how much disk the features of this raster take (float16 PCA features, tiles overlapping)."""
    cells = (source.width / params.stride + 1) * (source.height / params.stride + 1)
    overlap = (params.tile_size / max(params.tile_size - params.overlap, 1)) ** 2
    return int(cells * overlap * (params.pca_dims + 2) * 2)


def _crowns(params: SegmentationParams, paths: OutputPaths, result: SegmentationResult, model: dict,
            progress: Progress) -> int:
    from .gis.crowns import write_crowns  # scipy and scikit-image: only for a run that splits crowns

    started = time.perf_counter()
    crown_progress = progress.sub(0.94, 0.97)
    count = write_crowns(
        str(paths.trees), str(paths.clusters), str(paths.crowns), layer_name(paths, "crowns"),
        params.crown_options,
        progress=lambda fraction: crown_progress.report(fraction, "Splitting crowns"),
        is_cancelled=progress.is_cancelled, description=_description(model),
    )
    result.timings["crowns"] = round(time.perf_counter() - started, 3)
    return count


def _canopy_height(params: SegmentationParams, source: GdalRasterSource, path: Path, progress: Progress,
                   timings: dict[str, float]) -> dict:
    """Predict the canopy height raster; returns what the height model is."""
    from .core.canopy import load_height_model, predict_heights  # torch: only for a run that predicts heights

    progress.report(0.0, "Loading the canopy-height model")
    started = time.perf_counter()
    height_model = load_height_model(params.height_model, params.device, params.allow_untrained,
                                     revision=params.model_revision if params.height_model == params.model else None)
    if height_model.untrained:
        log.warning(UNTRAINED_BANNER)
    writer = HeightRasterWriter(str(path), source.grid,
                                {"TREESEG_HEIGHT_MODEL": height_model.model_id, "TREESEG_UNITS": "metres",
                                 "TREESEG_WEIGHTS": "untrained" if height_model.untrained else "pretrained"})
    try:
        grid = TileGrid(source.width, source.height, params.tile_size, params.overlap)
        predict_heights(source, height_model, grid.blocks(), params.overlap, writer.write_heights, progress)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    timings["canopy_height"] = time.perf_counter() - started
    return height_model.describe()


def _height_filter(path: Path, min_height: float | None) -> Callable[[Window, np.ndarray], np.ndarray] | None:
    """Clears tree pixels lower than `min_height` metres (None: no height rule)."""
    if min_height is None:
        return None
    heights = HeightReader(str(path))

    def keep_tall_trees(block: Window, trees: np.ndarray) -> np.ndarray:
        low = heights.read(block.x, block.y, block.width, block.height) < min_height
        return np.where((trees == 1) & low, 0, trees).astype(np.uint8)

    return keep_tall_trees


def _write_feature_image(path: Path, source: GdalRasterSource, store: FeatureStore, result: SegmentationResult,
                         params: SegmentationParams, model: dict) -> None:
    """The first three PCA components of the features as an RGB GeoTIFF on the feature grid."""
    image = result.grid.image()
    gt = source.grid.geotransform
    offset, stride = image.offset, image.grid.stride
    geotransform = (gt[0] + offset * (gt[1] + gt[2]), stride * gt[1], stride * gt[2],
                    gt[3] + offset * (gt[4] + gt[5]), stride * gt[4], stride * gt[5])
    write_rgb_blocks(str(path), RasterGrid(image.cols, image.rows, geotransform, source.grid.crs_wkt),
                     image.blocks(store, result.samples), _raster_metadata(params, model))


def _polygonize(paths: OutputPaths, result: SegmentationResult, model: dict, progress: Progress) -> int:
    started = time.perf_counter()
    polygon_progress = progress.sub(0.9, 0.94)
    polygons = polygonize_clusters(
        str(paths.clusters), str(paths.polygons), result.tree_clusters,
        layer_name=layer_name(paths, "polygons"),
        progress=lambda fraction: polygon_progress.report(fraction, "Polygonizing"),
        is_cancelled=progress.is_cancelled,
        description=_description(model),
    )
    result.timings["polygonize"] = round(time.perf_counter() - started, 3)
    return polygons


def _writing_failed(error: RuntimeError, folder: Path) -> BaseException:
    """GDAL's or SQLite's error while writing (most often a full disk) as one line; any other error as it is."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if not re.search(r"disk|full|space|sqlite|tiff|write|writing", reason, re.IGNORECASE):
        return error
    free = f"{shutil.disk_usage(folder).free // 2**20} MB are free in {folder}: " if folder.is_dir() else ""
    return OutputError(f"Writing the outputs failed ({reason}). {free}free some space or choose another output "
                       "folder; the earlier outputs are unchanged.")


def commit_outputs(transaction: OutputTransaction, produced: list[Path], stale: list[Path],
                   what: str = "the outputs") -> None:
    """Move the staged files into place and remove `stale`, all or none; a file that cannot move as one line."""
    try:
        transaction.commit(produced, stale)
    except OSError as error:
        raise OutputError(f"Cannot move {what} into place ({error.filename}: {error.strerror}). Remove their "
                          "layers from the QGIS project (or close the program using them), or choose another "
                          "output folder.") from error


def _abort(transaction: OutputTransaction, *writers: LabelRasterWriter | None) -> None:
    """A failed or stopped write: the open raster writers (None: not opened yet) and every staged file dropped;
    a stop signal waits until they are."""
    with interrupts.deferred(reraise=False):
        for writer in writers:
            if writer is not None:
                writer.abort()
        transaction.abort()


def layer_name(paths: OutputPaths, kind: str) -> str:
    """The GeoPackage layer name of output `kind`: the run's file stem and the kind, punctuation such as '-', '$'
    or '(' (which GDAL refuses) as '_'."""
    stem = paths.clusters.name.removesuffix(SUFFIXES["clusters"])
    return re.sub(r"[^0-9A-Za-z_]", "_", f"{stem}_{kind}")


def _features(params: SegmentationParams, source: GdalRasterSource, store: FeatureStore,
              load_model: ModelLoader | None) -> tuple[RasterFeatures, dict]:
    """The raster's features (no extractor when the store holds every feature: no model is loaded) and the
    facts about the model for the run record."""
    tiles = TileGrid(source.width, source.height, params.tile_size, params.overlap)
    if store.complete:
        return RasterFeatures(source, FeatureGrid.of_store(tiles, store), store), store.model()
    extractor = feature_extractor(params, load_model)
    return RasterFeatures(source, FeatureGrid.of_extractor(tiles, extractor), store, extractor), extractor.describe()


def feature_extractor(params: SegmentationParams, load_model: ModelLoader | None) -> TileFeatureExtractor:
    """The DINOv3 feature extractor (loading the model), or a colour baseline."""
    if params.method != "dinov3":
        return ColourFeatures(params.method, params.stride)
    return FeatureExtractor((load_model or load_model_for)(params), params.stride, params.batch_size)


def load_model_for(params: SegmentationParams) -> Backbone:
    """The backbone the parameters ask for; from its cached int8 export for the run's tile size where there is one."""
    return load_backbone(params.model, params.device, params.allow_untrained, revision=params.model_revision,
                         precision=params.precision, tile_shape=(params.tile_size, params.tile_size))


def _raster_metadata(params: SegmentationParams, model: dict) -> dict[str, str]:
    return {
        "TREESEG_VERSION": __version__,
        "TREESEG_METHOD": params.method,
        "TREESEG_MODEL": model["model_id"],
        "TREESEG_WEIGHTS": "untrained" if model["untrained"] else model["weights"],
        "TREESEG_STRIDE": str(params.stride),
        "TREESEG_INPUT": str(params.input_path),
    }


def _description(model: dict) -> str:
    text = f"treeseg {__version__}, {model['model_id']}"
    return f"{text} — {UNTRAINED_BANNER}" if model["untrained"] else text


def _preview_title(params: SegmentationParams, model: dict, result: SegmentationResult) -> str:
    title = (f"{Path(params.input_path).name} — {model['model_id']}, stride {params.stride}, "
             f"K={result.k}, tree cover {100 * result.tree_cover:.1f} %")
    return f"{title}\nUNTRAINED WEIGHTS — pipeline check only" if model["untrained"] else title


def _record(
    params: SegmentationParams,
    model: dict,
    source: GdalRasterSource,
    result: SegmentationResult,
    paths: OutputPaths,
    polygons: int,
    written: list[Path],
    crowns: int | None,
    cluster_model: AppliedClusterModel | None,
    feature_cache: FeatureCacheUse,
) -> RunRecord:
    """The run's record, built once when everything is written (the record file itself is the last)."""
    return RunRecord(
        treeseg_version=__version__,
        warning=UNTRAINED_BANNER if model["untrained"] else None,
        input=InputFacts(str(params.input_path), source.width, source.height, list(source.bands), source.scaling),
        method=params.method,
        model=ModelFacts.from_facts(model),
        requested_model=params.model,
        stride=params.stride,
        clusters=ClusterFacts(result.k, result.auto_k,
                              {str(k): round(v, 3) for k, v in result.inertia_curve.items()},
                              list(result.cluster_exg), list(result.cluster_pixels)),
        trees=TreeFacts(list(result.tree_clusters), result.tree_rule, result.tree_pixels, result.valid_pixels,
                        round(result.tree_cover, 4)),
        polygons=polygons,
        tiles=result.tiles,
        model_run=ModelRun(result.model_work.tiles, result.model_work.pixels),
        parameters=params,
        outputs={kind: path for kind, path in paths.as_dict().items() if Path(path) in written or kind == "record"},
        timings=dict(result.timings),
        platform={"python": platform.python_version(), "machine": platform.machine()},
        crowns=crowns,
        cluster_model=cluster_model,
        feature_cache=feature_cache,
    )
