"""Command line: `python -m treeseg_qgis segment INPUT --out DIR [options]`; `fit` and `segment-many` for
surveys of many rasters.

Exit status: 0 on success; 3 when `segment-many` finished but some rasters failed; 2 with one line on
stderr when the input, a parameter or the model weights are not usable; 128 + the signal number when stopped by a
signal: 130 (Ctrl-C, SIGINT), 143 (SIGTERM), 129 (SIGHUP). A failed or stopped
run leaves the earlier outputs as they were and nothing of its own; a signal
that arrives while the finished outputs are moved into place is too late (exit 0).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

from .. import __version__
from ..catalogue import BACKBONES, DEFAULT_MODEL, HEIGHT_HEAD
from ..memory import RUN_STRIDE, RUN_TILE_SIZE
from ..params import (
    COLOUR_STRIDES,
    CROWN_DEFAULTS,
    DEFAULT_K_RANGE,
    DEVICES,
    METHODS,
    PRECISIONS,
    STRIDES,
    WINDOW_TILES,
    ParameterError,
    SegmentationParams,
    parse_cluster_ids,
    parse_clusters,
)
from ..run_record import RunRecord
from . import interrupts
from .core.errors import Cancelled, InputError, TreesegError
from .core.progress import Progress

EXIT_USER_ERROR = 2
EXIT_SOME_FAILED = 3
EXIT_INTERRUPTED = 130
PROGRESS_EVERY_S = 15.0
"""The longest the command line stays silent while a stage goes on."""


class _Parser(argparse.ArgumentParser):
    """Usage mistakes in two lines (the error and where the help is), not the whole usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"treeseg: error: {message}\nSee `{self.prog} --help`.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m treeseg_qgis",
        description="Label-free tree segmentation of orthophotos with DINOv3 features.",
    )
    parser.add_argument("--version", action="version", version=f"treeseg-qgis {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = commands.add_parser(
        "segment",
        help="segment the trees of one raster",
        description="Cluster dense DINOv3 features of INPUT and write clusters, trees, "
        "polygons, a preview and a run record into --out.",
    )
    run.add_argument("input", metavar="INPUT", help="a raster GDAL can read (GeoTIFF, VRT, ...)")
    run.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    _model_options(run)
    run.add_argument("--method", default="dinov3", choices=METHODS,
                     help="dinov3 (default), or a colour baseline for comparison: rgb-kmeans "
                     "(k-means on RGB) or exg-otsu (Otsu threshold on excess green)")
    run.add_argument("--crowns", action="store_true",
                     help="also split the trees into individual crowns (<stem>_crowns.gpkg)")
    run.add_argument("--crown-min-area", type=float, default=CROWN_DEFAULTS.min_area_m2, metavar="M2",
                     help=f"smallest crown kept, in square metres (default: {CROWN_DEFAULTS.min_area_m2:g})")
    run.add_argument("--feature-preview", action="store_true",
                     help="also write the first three feature components as an RGB GeoTIFF (<stem>_features.tif)")
    run.add_argument("--canopy-height", action="store_true",
                     help="also write the canopy height in metres (<stem>_height.tif) with the DINOv3 CHMv2 head")
    run.add_argument("--min-tree-height", type=float, metavar="M",
                     help="trees must also be at least this tall (metres; implies --canopy-height)")
    run.add_argument("--height-model", default=HEIGHT_HEAD.repo_id, metavar="HF_ID|FOLDER",
                     help=f"canopy-height model (default: {HEIGHT_HEAD.repo_id})")
    run.add_argument("--cluster-model", metavar="FILE",
                     help="apply a saved survey cluster model (.treeseg, from `fit`) instead of fitting the "
                     "clusters: the same ids and legend as every other raster it was applied to")
    run.add_argument("--quiet", action="store_true", help="print only errors and the result paths")
    _survey_commands(commands)
    learn = commands.add_parser(
        "teach",
        help="click-to-teach: scores of a class (trees, or any class) from a few example points, and its mask",
        description="A regularised classifier learns from the features around each example; every pixel gets "
        "a calibrated class probability in 0..1 (<stem>_similarity.tif) and the mask probability >= threshold "
        "(<stem>_taught_trees.tif; for another class <stem>_<class>_similarity.tif and <stem>_taught_<class>.tif). "
        "The threshold is 0.5 unless --threshold is given. Features come from the cache when an earlier "
        "run made them (the same feature options, --cluster-model too), so only the scoring runs.",
    )
    learn.add_argument("input", metavar="INPUT", help="the raster")
    learn.add_argument("--examples",
                       help="points with an is_tree field (1 = an example of the class, 0 = something else) or a "
                       "text class field naming each point's class (two or more classes: <stem>_classes.tif, "
                       "<stem>_class_probabilities.tif, <stem>_class_polygons.gpkg), or a CSV with col,row,is_tree "
                       "or col,row,class in pixels")
    learn.add_argument("--out", required=True, metavar="DIR")
    learn.add_argument("--threshold", type=float, default=None,
                       help="class probability threshold (default: 0.5 on calibrated probabilities)")
    learn.add_argument("--class-name", default="tree", help="what the examples show, e.g. 'dead tree' (default: tree)")
    _feature_options(learn)
    learn.add_argument("--cluster-model", metavar="FILE",
                       help="a survey cluster model (.treeseg, from `fit`): its PCA makes the features of every "
                       "raster of the survey alike, so a taught classifier can be saved and applied to the others")
    learn.add_argument("--save-classifier", metavar="FILE",
                       help="keep the taught classifier in this file (.treeseg; needs --cluster-model)")
    learn.add_argument("--classifier", metavar="FILE",
                       help="apply a saved taught classifier instead of examples (with its --cluster-model): "
                       "the same classes and legend as on every other raster it was applied to")
    check = commands.add_parser(
        "evaluate",
        help="score a tree prediction against reference crowns, boxes or a class raster",
        description="Pixel precision/recall/F1/IoU, crown matching (IoU >= 0.4), box recall and, with a "
        "class raster and --clusters, mIoU. Writes a CSV and an HTML report into --out.",
    )
    check.add_argument("prediction", metavar="PREDICTION",
                       help="tree raster (1 = tree) or polygons with an is_tree field")
    check.add_argument("--reference", required=True,
                       help="polygons (crowns or boxes), a CSV of pixel boxes, or a class raster")
    check.add_argument("--out", required=True, metavar="DIR", help="folder for the CSV and HTML report")
    check.add_argument("--image", help="the image: pixel grid for polygon predictions, picture background")
    check.add_argument("--clusters", help="cluster raster, for mIoU against a class raster")
    check.add_argument("--tree-class", type=int, default=1, help="tree class value in a class raster (default 1)")
    return parser


def _survey_commands(commands: argparse._SubParsersAction) -> None:
    """`fit` (one cluster model from many rasters) and `segment-many` (fit and apply it to each)."""
    fit = commands.add_parser(
        "fit", help="fit one cluster model on several rasters and save it (.treeseg)",
        description="Draw a feature sample from all INPUTs (proportional to their valid area), fit the PCA, "
        "the clusters and the tree rule once, and write them into one small file that `segment "
        "--cluster-model` and `segment-many --cluster-model` apply unchanged: one legend for a survey.")
    fit.add_argument("inputs", nargs="+", metavar="INPUT", help="the survey's rasters")
    fit.add_argument("--out", required=True, metavar="FILE", help="the cluster model file to write (.treeseg)")
    many = commands.add_parser(
        "segment-many", help="segment many rasters with one cluster model (one legend), optionally on Dask",
        description="Fit one cluster model on all INPUTs (unless --cluster-model is given) and apply it to each: "
        "each raster's outputs in --out as `segment` writes them, plus survey.treeseg, survey_summary.json and "
        ".csv (per-raster tree cover, the shared legend) and survey_polygons.gpkg (all polygons, with a `source` "
        "field), `survey_UNTRAINED…` with untrained weights; all of them appear together at the end, or the "
        "earlier ones stay as they were. A raster whose outputs would take one of these names gets `_2`. A raster "
        f"that fails is tried once more, then reported while the others finish (exit status {EXIT_SOME_FAILED}).")
    many.add_argument("inputs", nargs="+", metavar="INPUT", help="the survey's rasters")
    many.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    many.add_argument("--cluster-model", metavar="FILE",
                      help="apply this cluster model (its settings) instead of fitting one")
    many.add_argument("--classifier", metavar="FILE",
                      help="then apply this taught classifier (.treeseg, from `teach --save-classifier` with the "
                      "same --cluster-model) to every raster: each gets its class outputs as `teach` writes them, "
                      "with the same classes, values and legend")
    many.add_argument("--window-tiles", type=int, default=WINDOW_TILES, metavar="N",
                      help="on Dask, split a raster of more than N tiles into windows of about N tiles whose "
                      f"features are extracted on several workers (default {WINDOW_TILES}; 0: never split)")
    for command in (fit, many):
        where = command.add_mutually_exclusive_group()
        where.add_argument("--workers", type=int, default=1, metavar="N",
                           help="rasters on a local Dask cluster of N worker processes (default 1: in this process)")
        where.add_argument("--scheduler", metavar="ADDRESS",
                           help="rasters on an existing Dask cluster, e.g. tcp://10.0.0.5:8786")
        _model_options(command)
        command.add_argument("--quiet", action="store_true", help="print only errors and the results")


def _survey_params(args: argparse.Namespace, out_dir: str) -> SegmentationParams:
    """The parameters shared by every raster of a `fit` or `segment-many` run, validated (on the first input;
    each raster's run sets its own), the number of workers too."""
    if args.workers < 1:
        raise InputError(f"--workers must be at least 1, not {args.workers}.")
    params = SegmentationParams(input_path=args.inputs[0], output_dir=out_dir, stride=args.stride or RUN_STRIDE,
                                **_model_settings(args))
    params.validate()
    return params


def _fit(args: argparse.Namespace) -> int:
    from .preflight import check_fit_paths, check_rasters_open

    params = _survey_params(args, ".")
    check_fit_paths(args.inputs, args.out)
    check_rasters_open(args.inputs)
    from .survey import fit_survey, survey_cluster  # torch and the libraries load once the arguments are good

    with survey_cluster(args.workers, args.scheduler) as cluster:
        model = fit_survey(args.inputs, params, args.out, _progress(args), cluster=cluster)
    header = model.header()
    print(f"K={header['k']}{' (auto)' if header['automatic_k'] else ''}, tree clusters {header['tree_clusters']}, "
          f"{sum(item['samples'] for item in header['inputs'])} samples from {len(header['inputs'])} rasters")
    print(args.out)
    return 0


def _segment_many(args: argparse.Namespace) -> int:
    if args.window_tiles < 0:
        raise InputError(f"--window-tiles must be 0 (never split) or more, not {args.window_tiles}.")
    from .preflight import check_named_files, raster_files

    params = _survey_params(args, args.out)
    raster_files(args.inputs)
    check_named_files({args.cluster_model: "cluster model", args.classifier: "classifier"})
    from .survey import segment_many  # torch and the libraries load once the arguments are good

    summary = segment_many(args.inputs, params, args.out, args.cluster_model,
                           args.workers, args.scheduler, _progress(args), window_tiles=args.window_tiles,
                           classifier=args.classifier)
    legend = summary["legend"]
    if summary["warning"]:
        print(f"\n!!! {summary['warning']}\n", file=sys.stderr)
    print(f"K={legend['k']}, tree clusters {legend['tree_clusters']} in every raster ({summary['cluster_model']})")
    if summary["classifier"]:
        print(f"taught classes {', '.join(summary['classifier']['classes'])} in every raster "
              f"({summary['classifier']['path']})")
    for row in summary["rasters"]:
        result = f"tree cover {100 * row['tree_cover']:.1f} %" if row["status"] == "ok" else f"FAILED: {row['error']}"
        covers = "".join(f", {name} {100 * cover:.1f} %" for name, cover in row.get("class_cover", {}).items())
        print(f"{row['input']}: {result}{covers}")
    print(summary["merged_polygons"], "polygons in", summary["outputs"]["polygons"])
    if summary["failed"]:
        print(f"treeseg: {summary['failed']} of {len(summary['rasters'])} rasters failed (see above).",
              file=sys.stderr)
        return EXIT_SOME_FAILED
    return 0


def _progress(args: argparse.Namespace) -> Progress:
    return Progress(None if args.quiet else _TerminalProgress(), interrupts.stop_requested)


def _model_options(command: argparse.ArgumentParser) -> None:
    """The options of the model, its features and the clusters: `segment`, `fit` and `segment-many` share them."""
    _feature_options(command)
    command.add_argument("--clusters", default="auto", metavar="auto|K",
                     help="number of clusters, or auto for the elbow rule (default: auto)")
    command.add_argument("--k-range", default=f"{DEFAULT_K_RANGE[0]}-{DEFAULT_K_RANGE[1]}", metavar="MIN-MAX",
                     help=f"range searched by --clusters auto (default: {DEFAULT_K_RANGE[0]}-{DEFAULT_K_RANGE[1]})")
    command.add_argument("--tree-clusters", default=None, metavar="IDS",
                     help="comma-separated cluster ids that are trees (overrides the ExG rule)")


def _feature_options(command: argparse.ArgumentParser) -> None:
    """The options of the model and its features (and the cache): `teach` shares them with every command that
    extracts, so it finds the features `segment` cached."""
    command.add_argument(
        "--model", default=DEFAULT_MODEL, metavar="NAME|HF_ID|FOLDER",
        help=f"catalogue name ({', '.join(BACKBONES)}), a Hugging Face id or a local model "
        f"folder (default: {DEFAULT_MODEL})",
    )
    command.add_argument("--model-revision", metavar="REV",
                     help="pin a hub model to a branch, tag or commit hash (default: main)")
    command.add_argument("--stride", type=int, default=None,
                     help=f"feature grid step in pixels: {_choices(STRIDES)} for dinov3 ({RUN_STRIDE}, the default; "
                     f"smaller is denser and slower), {_choices(COLOUR_STRIDES)} for the colour baselines (per "
                     "pixel, 1, unless a stride is given)")
    command.add_argument("--bands", default="1,2,3", metavar="R,G,B",
                     help="the three bands to use, 1-based (default: 1,2,3)")
    command.add_argument("--device", default="auto", choices=DEVICES,
                     help="auto picks CUDA, then Apple MPS, then the CPU")
    command.add_argument("--precision", default="auto", choices=PRECISIONS,
                     help="what the model runs in; auto: int8 in ONNX Runtime on a CPU with AVX2 or AVX-512, else "
                     "float32 (the reference), half precision on a GPU (docs/BENCHMARKS.md)")
    command.add_argument("--allow-untrained", action="store_true",
                     help="when the weights cannot be had, run with random weights "
                     "(every output then says so)")
    command.add_argument("--tile-size", type=int, default=RUN_TILE_SIZE,
                         help=f"tile size in pixels (default: {RUN_TILE_SIZE})")
    _cache_options(command)


def _cache_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--cache-dir", metavar="DIR",
                         help="feature cache folder (default: ~/.cache/treeseg/features or $XDG_CACHE_HOME)")
    command.add_argument("--no-cache", action="store_true",
                         help="neither read nor keep cached features (a re-run extracts them again)")


def _choices(values: Sequence[object]) -> str:
    return "/".join(map(str, values))


def params_from_args(args: argparse.Namespace) -> SegmentationParams:
    """The SegmentationParams for parsed `segment` arguments (not yet validated)."""
    return SegmentationParams(
        input_path=args.input,
        output_dir=args.out,
        method=args.method,
        stride=args.stride if args.stride is not None else (RUN_STRIDE if args.method == "dinov3" else 1),
        crowns=args.crowns,
        feature_preview=args.feature_preview,
        canopy_height=args.canopy_height,
        min_tree_height_m=args.min_tree_height,
        height_model=args.height_model,
        crown_min_area_m2=args.crown_min_area,
        cluster_model=args.cluster_model,
        **_model_settings(args),
    )


def teach_params_from_args(args: argparse.Namespace) -> SegmentationParams:
    """The SegmentationParams for parsed `teach` arguments (not yet validated): the features' settings as `segment`
    reads them from the same options, so teach finds the features segment cached."""
    return SegmentationParams(input_path=args.input, output_dir=args.out,
                              stride=RUN_STRIDE if args.stride is None else args.stride,
                              cluster_model=args.cluster_model, **_feature_settings(args))


def _model_settings(args: argparse.Namespace) -> dict:
    """The SegmentationParams fields of the options `_model_options` adds (the stride aside)."""
    k_min, k_max = _range(args.k_range)
    return {
        **_feature_settings(args), "clusters": parse_clusters(args.clusters), "k_min": k_min, "k_max": k_max,
        "tree_clusters": parse_cluster_ids(args.tree_clusters),
    }


def _feature_settings(args: argparse.Namespace) -> dict:
    """The SegmentationParams fields of the options `_feature_options` adds (the stride aside)."""
    return {
        "bands": _bands(args.bands), "model": args.model, "model_revision": args.model_revision,
        "device": args.device, "precision": args.precision, "allow_untrained": args.allow_untrained,
        "tile_size": args.tile_size, "use_cache": not args.no_cache, "cache_dir": args.cache_dir,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR if getattr(args, "quiet", False) else logging.WARNING,
                        format="treeseg: %(message)s", stream=sys.stderr)
    _quiet_libraries()
    sys.unraisablehook = _log_unraisable
    with interrupts.stop_signals_handled():
        try:
            if args.command == "evaluate":
                return _evaluate(args)
            _check_address_space(args)
            if args.command == "teach":
                return _teach(args)
            if args.command == "fit":
                return _fit(args)
            if args.command == "segment-many":
                return _segment_many(args)
            params = params_from_args(args)
            params.validate()
            from .preflight import check_named_files, check_rasters_open

            check_named_files({params.cluster_model: "cluster model"})
            check_rasters_open([params.input_path])
            from .pipeline import segment  # torch and the libraries load once the arguments are known to be good

            record = segment(params, Progress(None if args.quiet else _TerminalProgress(),
                                              interrupts.stop_requested))
        except (interrupts.Interrupted, Cancelled) as error:
            return _stopped(error)
        except (TreesegError, ParameterError) as error:
            print(f"treeseg: error: {' '.join(str(error).split())}", file=sys.stderr)  # GDAL 3.10 texts span lines
            return EXIT_USER_ERROR
        except OSError as error:
            print(f"treeseg: error: {error.strerror or error}{f': {error.filename}' if error.filename else ''}. "
                  "Nothing of this run was kept.", file=sys.stderr)
            return EXIT_USER_ERROR
        except (MemoryError, RuntimeError) as error:
            if isinstance(error, RuntimeError) and not _out_of_memory(error):
                raise
            print(f"treeseg: error: out of memory: try a smaller --tile-size, stride {RUN_STRIDE}, a smaller model, "
                  "or close other programs. Nothing of this run was kept.", file=sys.stderr)
            return EXIT_USER_ERROR
        if interrupts.received():
            print(f"treeseg: {interrupts.Interrupted(interrupts.received())} too late: the run had finished and "
                  "its outputs are complete.", file=sys.stderr)
        with interrupts.deferred(reraise=False):  # the outputs are complete: a late stop signal changes nothing
            _print_summary(record)
    return 0


def _check_address_space(args: argparse.Namespace) -> None:
    """Refuse an address-space limit a run cannot live with, before the libraries load (one line, not a hang);
    a model folder holding a pipe or device is refused first (reading its config.json would block)."""
    from ..memory import address_space_problem
    from .core.files import refuse_special_files_in

    if getattr(args, "model", None) and os.path.isdir(args.model):
        refuse_special_files_in(args.model, "model folder")

    dinov3 = getattr(args, "method", "dinov3") == "dinov3"
    problem = address_space_problem(args.model if dinov3 else None, getattr(args, "stride", None) or RUN_STRIDE,
                                    getattr(args, "tile_size", None) or RUN_TILE_SIZE)
    if problem is not None:
        raise InputError(problem)


def _out_of_memory(error: RuntimeError) -> bool:
    """torch's allocator and thread creation report an exhausted memory as RuntimeError."""
    return any(text in str(error) for text in ("can't allocate memory", "can't start new thread"))


def _log_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    """GDAL's errors while closing a failed file (the run's error line says what happened) go to the debug log."""
    logging.getLogger("treeseg").debug("ignored while cleaning up: %s", unraisable.exc_value)


def _stopped(error: BaseException) -> int:
    """One line for a stopped run; the exit status names the signal (130 for a cancel without one)."""
    signum = interrupts.received()
    if signum is None:
        print(f"treeseg: {error}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"treeseg: {interrupts.Interrupted(signum)}; the earlier outputs are unchanged and nothing of this "
          "run was kept.", file=sys.stderr)
    return 128 + signum


class _TerminalProgress:
    """Prints a line each time the stage changes, 10 % more is done or PROGRESS_EVERY_S passed (a raster of
    tens of thousands of tiles takes hours per 10 %)."""

    def __init__(self) -> None:
        self._last: tuple[str, int] | None = None
        self._printed_at = time.monotonic()

    def __call__(self, percent: float, stage: str) -> None:
        key = (stage.split(":")[0], int(percent // 10))
        if key != self._last or time.monotonic() - self._printed_at >= PROGRESS_EVERY_S:
            self._last = key
            self._printed_at = time.monotonic()
            print(f"{percent:5.1f} %  {stage}", file=sys.stderr, flush=True)


def _print_summary(record: RunRecord) -> None:
    trees, model = record.trees, record.model
    if record.warning:
        print(f"\n!!! {record.warning}\n", file=sys.stderr)
    print(f"model {model.model_id} ({model.weights}) on {model.device} in {model.precision}, "
          f"stride {record.stride}, K={record.clusters.k}{' (auto)' if record.clusters.automatic else ''}, "
          f"tree clusters {trees.clusters}, tree cover {100 * trees.tree_cover:.1f} %, "
          f"{record.total_seconds:.1f} s")
    for path in record.outputs.values():
        print(path)


def _teach(args: argparse.Namespace) -> int:
    if bool(args.examples) == bool(args.classifier):
        raise InputError("Give the examples (--examples) or a taught classifier to apply (--classifier), one of "
                         "the two.")
    from .preflight import check_named_files, check_rasters_open, check_teach_options

    params = teach_params_from_args(args)
    params.validate()
    check_teach_options(args.threshold, args.cluster_model, args.classifier, args.save_classifier)
    check_named_files({args.examples: "example points", args.classifier: "taught classifier",
                       args.cluster_model: "cluster model"})
    check_rasters_open([params.input_path])
    from .pipeline import teach  # torch and the libraries load once the arguments are good

    record = teach(params, args.examples, args.threshold, Progress(_TerminalProgress(), interrupts.stop_requested),
                   class_name=args.class_name, classifier=args.classifier, save_classifier=args.save_classifier)
    if record["warning"]:
        print(f"\n!!! {record['warning']}\n", file=sys.stderr)
    if "classes" in record:
        covers = ", ".join(f"{name} {100 * cover:.1f} %" for name, cover in record["class_cover"].items())
        examples = ", ".join(f"{count} {name}" for name, count in record["examples"].items())
        print(f"{len(record['classes'])} classes from {examples} examples; {record['threshold_note']}; cover: "
              f"{covers} (features: {record['feature_cache']})")
    else:
        print(f"{record['examples']['trees']} {record['class']} and {record['examples']['not_trees']} other "
              f"examples, {record['threshold_note']}, {record['class']} cover {100 * record['tree_cover']:.1f} % "
              f"(features: {record['feature_cache']})")
    for path in record["outputs"].values():
        print(path)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, flat_scores, format_score

    scores = evaluate(args.prediction, args.reference, args.out, image=args.image, clusters=args.clusters,
                      tree_class=args.tree_class)
    for key, value in flat_scores(scores).items():
        print(f"{key:28s} {format_score(value)}")
    for path in scores["outputs"].values():
        print(path)
    return 0


def _quiet_libraries() -> None:
    """The hub's and transformers' progress bars and warnings off: through the environment they read when they
    load (loading them here would cost seconds before an argument error or `evaluate`), and directly where
    they already have."""
    os.environ.update(HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_VERBOSITY="error", TRANSFORMERS_VERBOSITY="error")
    if "transformers" not in sys.modules:
        return
    from huggingface_hub.utils import disable_progress_bars
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    hub_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def _int(text: str, option: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ParameterError(f"{option} expects a whole number, not '{text}'.") from None


def _int_list(text: str, option: str) -> tuple[int, ...]:
    return tuple(_int(part.strip(), option) for part in text.split(",") if part.strip())


def _bands(text: str) -> tuple[int, ...]:
    """Three band numbers; one band number means a grey image (that band three times)."""
    bands = _int_list(text, "--bands")
    return bands * 3 if len(bands) == 1 else bands


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return _int(low, "--k-range"), _int(high or low, "--k-range")
