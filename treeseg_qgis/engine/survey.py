"""Surveys: one cluster model fitted on many rasters, then applied to each of them (one legend).

A survey has one value scaling: `fit_survey` measures a non-Byte survey's percentile stretch over all its
inputs (a bounded value sample weighted by valid area), reads every input with it and stores it in the model.
`fit_survey` draws a bounded feature sample from every input, proportional to its valid area (`sample_raster`,
each raster with its own generator, so here or as one Dask task per raster gives the same sample), fits the
PCA and the clusters on it and writes a `.treeseg` file (core/survey_model.py). `segment_many` fits
(unless a model is given), runs `pipeline.segment` with that model on every input, here one after the
other or on Dask (dask_runner.py, where a raster of more than `window_tiles` tiles is split into windows of
tiles extracted on several workers), retries a failed raster once and writes a survey summary (JSON and
CSV) and one merged polygons GeoPackage with a `source` field, as one outputs transaction.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..outputs import (
    COMMIT_JOURNAL,
    LOCK_NAME,
    MODEL_SUFFIX,
    OUTPUT_KINDS,
    SEGMENT_KINDS,
    SUFFIXES,
    UNTRAINED_TAG,
    OutputPaths,
    OutputTransaction,
    check_output_folder,
    check_output_paths,
)
from ..params import WINDOW_TILES, Role, SegmentationParams, settings_with
from ..run_record import RunRecord, taught_record
from . import interrupts
from .core.clustering import Projection
from .core.errors import InputError
from .core.progress import Progress
from .core.segmentation import TileFeatureExtractor, fit_clustering
from .core.survey_model import SurveyModel, scaling_kind, weights_content
from .core.taught_model import TaughtModel
from .core.tiling import TileGrid
from .gis.class_outputs import UNSURE, class_palette
from .gis.merge import merge_polygons
from .gis.raster import GdalRasterSource, limit_block_cache, stretch_limits
from .pipeline import (
    UNTRAINED_BANNER,
    ModelLoader,
    commit_outputs,
    feature_extractor,
    load_model_for,
    taught_output_paths,
    teach,
    validate_params,
)
from .preflight import check_fit_paths, output_check, raster_files
from .survey_tasks import RasterJob, RasterOutcome, RasterSample, RasterShare, run_job, sample_raster, with_retry

if TYPE_CHECKING:
    from .dask_runner import DaskSession

log = logging.getLogger("treeseg")

SURVEY_STEM = "survey"
SURVEY_SUFFIXES = (MODEL_SUFFIX, "_summary.json", "_summary.csv", "_polygons.gpkg")
"""The survey-wide files: the cluster model, the summary JSON and CSV, the merged polygons."""
MODEL_NAME = f"{SURVEY_STEM}{MODEL_SUFFIX}"
VALUE_SAMPLES = 1024 * 1024
"""Values per band kept across a survey to measure its stretch limits (bounded memory)."""


def fit_survey(inputs: Sequence[str], params: SegmentationParams, out_path: str | Path,
               progress: Progress | None = None, load_model: ModelLoader | None = None,
               failures: dict[str, str] | None = None, cluster: DaskSession | None = None) -> SurveyModel:
    """Fit one cluster model on a sample of all `inputs` (proportional to valid area) and save it.

    Every input is read with the survey's value scaling (one stretch for all, stored in the model). A
    raster that cannot be read is left out and reported in `failures` (path → reason) when given;
    without `failures` it stops the fit. The parameters' input is not read: `inputs` are. The rasters' features
    are sampled on `cluster` when given (one task per raster, the same model as here), else in this process.
    """
    if not inputs:
        raise InputError("Give the rasters to fit the cluster model on.")
    validate_params(replace(params, input_path=inputs[0]))
    check_fit_paths(inputs, out_path)
    progress = progress or Progress()
    limit_block_cache()
    areas: dict[str, int] = {}
    scalings: dict[str, str] = {}
    value_rng = np.random.default_rng(params.seed)
    values: dict[int, list[tuple[np.ndarray, float]]] = {}
    for index, path in enumerate(inputs):
        progress.check()
        progress.report(0.1 * index / len(inputs), f"Measuring valid area and values: raster {index + 1} of "
                        f"{len(inputs)}")
        try:
            with GdalRasterSource(path, params.bands) as source:
                areas[path] = _valid_pixels(source, params)
                scalings[path] = source.scaling
                for number in source.stretched_bands if areas[path] else ():
                    values.setdefault(number, []).append(
                        _value_sample(source, number, areas[path], math.ceil(VALUE_SAMPLES / len(inputs)), value_rng))
        except InputError as error:
            if failures is None:
                raise
            failures[path] = str(error)
            log.warning("Left out of the fit: %s", error)
    kinds = {scaling_kind(scaling) for scaling in scalings.values()}
    if len(kinds) > 1:
        raise InputError("The rasters are scaled differently (" + "; ".join(sorted(kinds)) + "): one cluster "
                         "model needs rasters of one data type and band layout.")
    total = sum(areas.values())
    if total == 0:
        raise InputError("None of the rasters has valid pixels to fit a cluster model on.")
    value_ranges = {number: _weighted_limits(samples) for number, samples in values.items()}
    shares = [RasterShare(path, index, math.ceil(params.sample_size * area / total))
              for index, (path, area) in enumerate(areas.items()) if area]
    sampling = progress.sub(0.1, 0.9)
    if cluster is not None:
        from .dask_runner import sample_on_dask

        results = sample_on_dask(cluster, shares, params, value_ranges, sampling)
    else:
        results = _sample_here(shares, params, value_ranges, feature_extractor(params, load_model), sampling)
    samples: list[RasterSample] = []
    fitted_inputs = []
    for share, (sample, error) in zip(shares, results):
        if sample is None:
            if failures is None:
                raise InputError(error)
            failures[share.path] = error
            log.warning("Left out of the fit: %s", error)
            continue
        samples.append(sample)
        fitted_inputs.append({"path": str(share.path), "valid_pixels": areas[share.path],
                              "samples": int(sample.features.shape[0])})
    if not samples:
        raise InputError("No raster could give features to fit a cluster model on: " + "; ".join(failures.values()))
    progress.report(0.9, "Fitting the survey's clusters")
    stacked = np.concatenate([sample.features for sample in samples])
    projection = Projection(stacked, params.pca_dims, params.seed)
    projected = projection.project(stacked)
    fit = fit_clustering(projected, np.concatenate([sample.exg for sample in samples]), params)
    settings = {**settings_with(Role.SURVEY, params), "bands": list(params.bands)}
    extractor = next((sample.extractor for sample in samples if "fell_back_to_cpu" in sample.extractor),
                     samples[-1].extractor)
    weights = weights_content(params.model, params.model_revision) if params.method == "dinov3" else None
    model = SurveyModel(projection, fit, settings, extractor, samples[-1].scaling, value_ranges, fitted_inputs,
                        weights)
    model.save(out_path)
    progress.report(1.0, "Cluster model written")
    return model


def _sample_here(shares: Sequence[RasterShare], params: SegmentationParams,
                 value_ranges: dict[int, tuple[float, float]], extractor: TileFeatureExtractor,
                 progress: Progress) -> list[tuple[RasterSample | None, str | None]]:
    """Every raster's share in this process, one after the other, with one extractor: (its sample, None) or
    (None, its error). The stage texts name the raster ("Raster 2 of 3: ..."); the bar moves on after each."""
    results = []
    for number, share in enumerate(shares):
        step = progress.sub(number / len(shares), (number + 1) / len(shares)).labelled(
            f"Raster {number + 1} of {len(shares)}: ")
        sample, error, _ = with_retry(partial(sample_raster, share, params, value_ranges, extractor, step),
                                      share.path)
        step.report(1.0, f"sampled {Path(share.path).name}" if sample is not None else "failed")
        results.append((sample, error))
    return results


def _valid_pixels(source: GdalRasterSource, params: SegmentationParams) -> int:
    """The number of valid pixels of a raster, read block by block."""
    grid = TileGrid(source.width, source.height, params.tile_size, params.overlap)
    return sum(int(source.read_valid(b.x, b.y, b.width, b.height).sum()) for b in grid.blocks())


def _value_sample(source: GdalRasterSource, number: int, valid_pixels: int, most: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """At most `most` of a band's valid values, and the weight of each so that the raster counts as its valid area."""
    sample = source.value_sample(number)
    if sample.size > most:
        sample = sample[rng.choice(sample.size, most, replace=False)]
    return sample, valid_pixels / max(sample.size, 1)


def _weighted_limits(samples: list[tuple[np.ndarray, float]]) -> tuple[float, float]:
    """The survey's stretch limits of one band from every raster's weighted value sample."""
    return stretch_limits(np.concatenate([sample for sample, _ in samples]),
                          np.concatenate([np.full(sample.size, weight) for sample, weight in samples]))


def raster_jobs(inputs: Sequence[str], params: SegmentationParams, out_dir: str | Path,
                model_path: str | Path) -> list[RasterJob]:
    """One job per input, each with a distinct output stem (the file's name; `_2`, `_3`… for repeats, and for a
    stem whose outputs would take a survey-wide file's name, e.g. a raster named survey.tif)."""
    jobs = []
    used: set[str] = set()
    for path in inputs:
        stem, number = Path(path).stem, 2
        while stem in used or _takes_a_survey_name(stem):
            stem, number = f"{Path(path).stem}_{number}", number + 1
        used.add(stem)
        jobs.append(RasterJob(str(path), replace(params, input_path=str(path), output_dir=str(out_dir),
                                                 output_stem=stem, cluster_model=str(model_path))))
    return jobs


def survey_files(out_dir: Path, untrained: bool) -> list[Path]:
    """The survey-wide files (`SURVEY_SUFFIXES`), `_UNTRAINED` in their names when the weights are untrained."""
    stem = f"{SURVEY_STEM}_{UNTRAINED_TAG}" if untrained else SURVEY_STEM
    return [out_dir / f"{stem}{suffix}" for suffix in SURVEY_SUFFIXES]


RESERVED_NAMES = frozenset(path.name for untrained in (False, True) for path in survey_files(Path(), untrained))
"""No raster's outputs take these names (`raster_jobs`)."""


def _takes_a_survey_name(stem: str) -> bool:
    return any(f"{name}{SUFFIXES[kind]}" in RESERVED_NAMES
               for name in (stem, f"{stem}_{UNTRAINED_TAG}") for kind in OUTPUT_KINDS)


def run_locally(jobs: Sequence[RasterJob], progress: Progress,
                load_model: ModelLoader | None = None) -> list[RasterOutcome]:
    """Each raster in this process, one after the other, the model loaded once."""
    loader = _memoised(load_model or load_model_for)
    outcomes = []
    for index, job in enumerate(jobs):
        progress.check()
        progress.report(index / len(jobs), f"Raster {index + 1} of {len(jobs)}: {Path(job.input_path).name}")
        outcomes.append(run_job(job, loader))
    return outcomes


def _memoised(load_model: ModelLoader) -> ModelLoader:
    """A loader that loads the backbone on the first call and hands out the same one afterwards."""
    loaded = {}

    def load(params: SegmentationParams):
        if "backbone" not in loaded:
            loaded["backbone"] = load_model(params)
        return loaded["backbone"]

    return load


def survey_cluster(workers: int, scheduler: str | None) -> AbstractContextManager[DaskSession | None]:
    """The Dask cluster a survey runs on, open for its fit and its rasters: the one at `scheduler`, or a
    LocalCluster of `workers` processes when there are more than one; else none (this process)."""
    if workers > 1 or scheduler:
        from .dask_runner import dask_session

        return dask_session(workers, scheduler)
    return nullcontext()


def segment_many(
    inputs: Sequence[str],
    params: SegmentationParams,
    out_dir: str | Path,
    cluster_model: str | None = None,
    workers: int = 1,
    scheduler: str | None = None,
    progress: Progress | None = None,
    load_model: ModelLoader | None = None,
    window_tiles: int = WINDOW_TILES,
    classifier: str | None = None,
) -> dict:
    """Fit (unless `cluster_model` is given) and apply one cluster model to every input; the survey summary.

    `classifier`, a taught classifier (core/taught_model.py) taught with `cluster_model`, is then applied to every
    raster segmented (`pipeline.teach`, here, from the features the segmentation cached): the same classes,
    values and legend in each; a raster it fails on is reported failed, without outputs.

    `workers` > 1 runs the fit's sampling and the rasters on a Dask LocalCluster of that many processes (started
    once), `scheduler` on an existing Dask cluster, there splitting a raster of more than `window_tiles` tiles
    (0: none) into windows; otherwise they run here one after the other.

    The survey is one outputs transaction: the model file, every raster's outputs, the summary and the merged
    polygons are written into one staging folder in `out_dir` and moved into place together at the end; a
    failed, stopped or killed survey leaves the previous survey's files as they were. Every output path is
    checked before any work.
    """
    if not inputs:
        raise InputError("Give at least one input raster.")
    progress = progress or Progress()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    output_check(check_output_folder, out_dir)
    model = SurveyModel.load(cluster_model) if cluster_model else None
    taught = _taught_model(classifier, model)
    sources = raster_files(inputs)
    finals = raster_jobs(inputs, params, out_dir, cluster_model or out_dir / MODEL_NAME)
    every_survey_file = survey_files(out_dir, False) + survey_files(out_dir, True)
    writable = [path for path in every_survey_file if not (model and path.name.endswith(MODEL_SUFFIX))]
    output_check(check_output_paths, [*sources, *filter(None, [cluster_model, classifier])],
                 [str(path) for path in [*writable, *_all_outputs(finals, taught)]])
    transaction = OutputTransaction(writable)
    staging = transaction.staged(writable[0]).parent
    try:
        with survey_cluster(workers, scheduler) as cluster:
            if model is not None:
                params = replace(params, **model.run_settings())
                model_path = Path(cluster_model)
            else:
                model = fit_survey(inputs, params, staging / MODEL_NAME, progress.sub(0.0, 0.3), load_model, {},
                                   cluster)
                model_path = staging / survey_files(staging, _untrained(model))[0].name
                os.replace(staging / MODEL_NAME, model_path)
            jobs = raster_jobs(inputs, params, staging, model_path)
            apply = progress.sub(0.0 if cluster_model else 0.3, 0.95)
            if cluster is not None:
                from .dask_runner import run_on_dask

                outcomes = run_on_dask(jobs, cluster, apply, window_tiles)
            else:
                outcomes = run_locally(jobs, apply, load_model)
        if taught is not None:
            outcomes = apply_classifier(jobs, outcomes, classifier, progress.sub(0.9, 0.95), load_model)
        progress.report(0.95, "Writing the survey summary")
        progress.check()
        files = survey_files(out_dir, _untrained(model))
        outcomes = [_moved_outcome(outcome, staging, out_dir) for outcome in outcomes]
        summary = _summary(model, Path(cluster_model) if cluster_model else files[0], outcomes,
                           time.perf_counter() - started)
        summary["classifier"] = _classifier_legend(classifier, taught) if taught else None
        summary["outputs"] = {"summary_json": str(files[1]), "summary_csv": str(files[2]), "polygons": str(files[3])}
        _write_survey_outputs(summary, outcomes, staging, [transaction.staged(path) for path in files[1:]])
        progress.check()
        with interrupts.deferred(reraise=False):
            _commit_survey(transaction, staging, out_dir, [*_all_outputs(finals, taught), *writable])
    except BaseException:
        with interrupts.deferred(reraise=False):
            transaction.abort()
        raise
    progress.report(1.0, "Done")
    return summary


def _all_outputs(jobs: Sequence[RasterJob], taught: TaughtModel | None = None) -> list[Path]:
    """Every file the jobs may write (trained or untrained), those of applying `taught` too."""
    return [*(getattr(OutputPaths.for_params(job.params, untrained), kind)
              for job in jobs for untrained in (False, True) for kind in SEGMENT_KINDS),
            *(path for job in jobs if taught for untrained in (False, True)
              for path in taught_output_paths(job.params, untrained, taught))]


def _taught_model(classifier: str | None, model: SurveyModel | None) -> TaughtModel | None:
    """The taught classifier to apply, read and checked against the survey's cluster model before any work."""
    if classifier is None:
        return None
    if model is None:
        raise InputError("A taught classifier works on a survey's features: give the survey cluster model it was "
                         "taught with (--cluster-model).")
    taught = TaughtModel.load(classifier)
    if taught.projection_id != model.projection_id:
        raise InputError(f"The taught classifier {classifier} was taught with another survey cluster model (its "
                         "PCA differs): give the cluster model it was taught with.")
    return taught


def apply_classifier(jobs: Sequence[RasterJob], outcomes: list[RasterOutcome], classifier: str,
                     progress: Progress, load_model: ModelLoader | None = None) -> list[RasterOutcome]:
    """The taught classifier applied to every segmented raster (its outputs staged beside the raster's); its
    record joins the raster's outcome as `taught`. A raster it fails on becomes a failed raster, its files
    removed."""
    loader = _memoised(load_model or load_model_for)
    done = []
    for index, (job, outcome) in enumerate(zip(jobs, outcomes)):
        progress.check()
        if outcome.record is not None:
            step = progress.sub(index / len(jobs), (index + 1) / len(jobs))
            record, error, _ = with_retry(partial(teach, job.params, None, progress=step, load_model=loader,
                                                  classifier=classifier), job.input_path)
            if record is None:
                _remove_staged(outcome.record)
                outcome = replace(outcome, record=None, error=f"applying the taught classifier failed: {error}")
            else:
                outcome = replace(outcome, taught=record)
        done.append(outcome)
    return done


def _remove_staged(record: RunRecord) -> None:
    """A raster's staged outputs (those its record names), removed."""
    for path in record.outputs.values():
        Path(path).unlink(missing_ok=True)
        Path(f"{path}.aux.xml").unlink(missing_ok=True)


def _classifier_legend(classifier: str, taught: TaughtModel) -> dict:
    """The survey-wide legend of the taught classes: every raster's class raster has these values and colours."""
    names = taught.classifier.classes
    legend = {"path": str(classifier), "classes": names}
    if taught.multi:
        legend["values"] = {name: index + 1 for index, name in enumerate(names)}
        palette = class_palette(len(names))
        legend["colours"] = {name: "#{:02x}{:02x}{:02x}".format(*palette[index + 1][:3])
                             for index, name in enumerate(names)}
        legend["unsure_value"] = UNSURE
    return legend


def _moved_outcome(outcome: RasterOutcome, staging: Path, out_dir: Path) -> RasterOutcome:
    """The outcome with its record's paths in the staging folder told as their final paths; the raster's run
    record file in the staging folder rewritten alike."""
    if outcome.record is None:
        return outcome
    record = RunRecord.from_dict(_moved(outcome.record.to_dict(), str(staging), str(out_dir)))
    taught = _moved(outcome.taught, str(staging), str(out_dir))
    for written in filter(None, (record, taught and taught_record(taught))):
        staged_record = staging / Path(written.outputs.get("record") or written.outputs["teach_record"]).name
        if staged_record.is_file():
            staged_record.write_text(written.to_json())
    return replace(outcome, record=record, taught=taught)


def _moved(value: object, staging: str, final: str) -> object:
    """`value` (a record) with every path inside `staging` moved to `final`."""
    if isinstance(value, dict):
        return {key: _moved(item, staging, final) for key, item in value.items()}
    if isinstance(value, list):
        return [_moved(item, staging, final) for item in value]
    if isinstance(value, str) and (value == staging or value.startswith(staging + os.sep)):
        return final + value[len(staging):]
    return value


def _untrained(model: SurveyModel) -> bool:
    return bool(model.extractor.get("untrained"))


def _commit_survey(transaction: OutputTransaction, staging: Path, out_dir: Path, replaced: list[Path]) -> None:
    """Move every staged file into place at once, removing the `replaced` files (an earlier survey's
    default-named outputs) this survey does not make: a raster that failed now keeps nothing of an earlier
    survey's legend, and trained outputs replace untrained ones."""
    produced = [out_dir / entry.name for entry in staging.iterdir() if entry.is_file()
                and entry.name not in (LOCK_NAME, COMMIT_JOURNAL) and not entry.name.endswith(".aux.xml")]
    stale = [path for path in replaced if path not in produced]
    commit_outputs(transaction, produced, stale, "the survey's outputs")


def _summary(model: SurveyModel, model_path: Path, outcomes: list[RasterOutcome], seconds: float) -> dict:
    header = model.header()
    untrained = bool(header["extractor"].get("untrained"))
    return {
        "cluster_model": str(model_path),
        "warning": UNTRAINED_BANNER if untrained else None,
        "untrained": untrained,
        "legend": {"k": header["k"], "tree_clusters": header["tree_clusters"], "tree_rule": header["tree_rule"],
                   "mean_exg": [round(v, 4) for v in header["cluster_exg"]]},
        "model": header["extractor"],
        "scaling": header["scaling"],
        "rasters": [_raster_row(outcome) for outcome in outcomes],
        "failed": sum(outcome.error is not None for outcome in outcomes),
        "seconds": round(seconds, 3),
    }


def _raster_row(outcome: RasterOutcome) -> dict:
    record, taught = outcome.record, outcome.taught
    return {
        "input": outcome.input_path,
        "stem": outcome.stem,
        "status": "ok" if record else "failed",
        "error": outcome.error,
        "attempts": outcome.attempts,
        "windows": outcome.windows,
        "tree_cover": record.trees.tree_cover if record else None,
        "cluster_pixels": record.clusters.pixels if record else None,
        "scaling_warning": record.cluster_model.warning if record and record.cluster_model else None,
        "seconds": round(outcome.seconds, 3),
        "outputs": record.outputs if record else None,
        **({"class_cover": _taught_cover(taught), "taught_outputs": taught["outputs"]} if taught else {}),
    }


def _taught_cover(taught: dict) -> dict[str, float]:
    """The share of valid pixels of each taught class (one class: that class)."""
    return taught["class_cover"] if "class_cover" in taught else {taught["class"]: taught["tree_cover"]}


def _write_survey_outputs(summary: dict, outcomes: list[RasterOutcome], staging: Path, staged: list[Path]) -> None:
    """The summary JSON and CSV and the merged polygons, written to their `staged` paths (moved into place with
    the rest)."""
    json_path, csv_path, merged_path = staged
    parts = [(outcome.stem, str(staging / Path(outcome.record.outputs["polygons"]).name))
             for outcome in outcomes if outcome.record and "polygons" in outcome.record.outputs]
    summary["merged_polygons"] = merge_polygons(parts, str(merged_path), "survey_polygons")
    json_path.write_text(json.dumps(summary, indent=2))
    csv_path.write_text(_csv(summary))


def _csv(summary: dict) -> str:
    text = io.StringIO()
    writer = csv.writer(text)
    k = summary["legend"]["k"]
    classes = summary["classifier"]["classes"] if summary.get("classifier") else []
    writer.writerow(["input", "status", "tree_cover", *(f"cluster_{i}_pixels" for i in range(k)),
                     *(f"{name}_cover" for name in classes), "seconds", "error"])
    for row in summary["rasters"]:
        pixels = row["cluster_pixels"] or [""] * k
        covers = row.get("class_cover") or {}
        writer.writerow([row["input"], row["status"], row["tree_cover"] if row["tree_cover"] is not None else "",
                         *pixels, *(covers.get(name, "") for name in classes), row["seconds"], row["error"] or ""])
    return text.getvalue()

