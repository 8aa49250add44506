"""`make eval`: the pipeline, the colour baselines and click-to-teach on real images with crown boxes.

Default images: OSBS_029 (the demo's own) and SOAP_061 (dead trees on green understory), both in
resources/sample/. Others: `scripts/eval_sample.py IMAGE BOXES.csv [IMAGE BOXES.csv ...]`. Per image it
writes a table to docs/QUALITY.md (or --report): reference rows (all pixels, per-pixel ExG+Otsu in
plain numpy), the product's methods, click-to-teach with seeded simulated clicks (class clicks at the
centres of randomly chosen boxes, other clicks at least 3 m from every box) and, where the boxes carry
the label --class-label (SOAP_061: Dead), the same teaching for that class alone. --teach-only leaves out the
product's segmentation rows and the three-class table (a faster loop on the teach rows; report in
output/eval/QUALITY.md unless --report).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from osgeo import gdal  # noqa: E402
from scipy import ndimage  # noqa: E402

from treeseg_qgis.engine.core.ceiling import (  # noqa: E402
    BOOSTED_BINS,
    CEILING_MODELS,
    CEILING_SAMPLE_STEP,
    Ceiling,
    ceiling,
)
from treeseg_qgis.engine.core.evaluation import (  # noqa: E402
    ReferenceObject,
    box_scores,
    boxes_to_objects,
    exg_otsu_mask,
    union_mask,
)
from treeseg_qgis.engine.core.examples import Example  # noqa: E402
from treeseg_qgis.engine.core.feature_grid import FeatureGrid, bilinear_sample  # noqa: E402
from treeseg_qgis.engine.core.models import hub_offline  # noqa: E402
from treeseg_qgis.engine.core.progress import Progress  # noqa: E402
from treeseg_qgis.engine.core.segmentation import RasterFeatures, ensure_features  # noqa: E402
from treeseg_qgis.engine.core.store import FeatureStore  # noqa: E402
from treeseg_qgis.engine.core.tiling import TileGrid, Window  # noqa: E402
from treeseg_qgis.engine.core.trees import excess_green  # noqa: E402
from treeseg_qgis.engine.evaluate import object_scores  # noqa: E402
from treeseg_qgis.engine.gis.raster import GdalRasterSource  # noqa: E402
from treeseg_qgis.engine.gis.reference import read_prediction  # noqa: E402
from treeseg_qgis.engine.pipeline import feature_extractor, load_model_for, segment, teach  # noqa: E402
from treeseg_qgis.params import SegmentationParams  # noqa: E402

gdal.UseExceptions()

SAMPLES = REPO / "resources" / "sample"
DEFAULT_IMAGES = [(SAMPLES / "OSBS_029.tif", SAMPLES / "OSBS_029_crowns_px.csv"),
                  (SAMPLES / "SOAP_061.png", SAMPLES / "SOAP_061_crowns_px.csv")]
OUT = REPO / "output" / "eval"
MIN_DISTANCE_M = 3.0
CLICK_COUNTS = (5,)
GOAL_RECALL = 0.9
GOAL_PRECISION_OVER_EXG = 0.10
GOAL_MAX_AREA = 1.5
DONE_SETS = 4  # of 5: the bar for a row
SWEEP = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
"""Thresholds the diagnosis applies to each click set's class probability: is the default threshold the problem,
or does no threshold reach the goal (the ranking of the pixels is)?"""
STABILITY_SETS = 2  # click sets taught again without each of their clicks
DINOV3 = dict(method="dinov3", model="small", stride=16)
RGB_PER_PIXEL = dict(method="rgb-kmeans", stride=1)
SEGMENT_RUNS = [
    ("DINOv3 {model}, stride 16 (default settings)", DINOV3),
    ("rgb-kmeans, per pixel", RGB_PER_PIXEL),
    ("exg-otsu, per pixel", dict(method="exg-otsu", stride=1)),
    ("exg-otsu, stride 16", dict(method="exg-otsu", stride=16)),
]
REFERENCE_ROWS = ("Reference: all pixels", "Reference: ExG + Otsu per pixel (plain numpy)")
TEACH_FEATURES = [("DINOv3 default", DINOV3), ("RGB per pixel", RGB_PER_PIXEL)]
CONTEXT_SIGMAS_M = (0.3, 0.6, 2.4)
"""Neighbourhoods (Gaussian σ, metres) of the local colour mean and spread the ceilings also try."""
TEXTURE_SIGMA_M = 0.2
"""Scale (Gaussian σ, metres) of the grey gradient whose local mean (at 3 σ) is the ceilings' texture feature."""
CONTEXT_FEATURES = "RGB + local context"


@dataclass
class Row:
    """One table row: a method's scores on one image (teach rows: one score set per seed)."""

    label: str
    weights: str
    scores: list[dict] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    goal: Goal | None = None
    stability: list[tuple[float, float]] = field(default_factory=list)
    """(pixel agreement, cover change) of the mask taught without one click, every click of the first sets."""
    sweeps: list[dict[float, dict]] = field(default_factory=list)
    """Per click set: threshold (SWEEP) → the box scores of its probability at that threshold."""
    click_labels: list[tuple[str, ...]] = field(default_factory=list)
    """Per click set: the labels of the boxes its class clicks fell on (when the boxes have labels)."""


@dataclass(frozen=True)
class Goal:
    """What a teach click set must reach on one image and class: box recall, in-box precision (ExG + Otsu's
    plus a margin) and no more cover than GOAL_MAX_AREA times the share of the image the boxes cover."""

    recall: float
    precision: float
    max_cover: float

    def margin(self, scores: dict) -> float:
        """How far a click set is from failing (negative: it fails), in the units of each measure."""
        boxes = scores["boxes"]
        return min(boxes["box_recall"] - self.recall, boxes["in_box_precision"] - self.precision,
                   self.max_cover - boxes["tree_cover"])

    def reached(self, scores: dict) -> bool:
        return self.margin(scores) >= 0


class SharedModel:
    """Loads the backbone once, so every run (and every teach call) of an evaluation uses the same weights;
    with untrained weights each load would be another random model, and their features are not cached."""

    def __init__(self) -> None:
        self.backbone = None

    def __call__(self, params: SegmentationParams):
        if self.backbone is None:
            self.backbone = load_model_for(params)
        return self.backbone


SHARED_MODEL = SharedModel()


@dataclass
class Image:
    """An image on a pixel grid GDAL reads, with its boxes, the DINOv3 model it is run with and the output folder."""

    name: str
    path: Path
    boxes: list[tuple[float, float, float, float, str]]
    pixel_size_m: float
    model: str
    out: Path
    class_rows: list[list[str]] = field(default_factory=list)
    ceilings: dict[str, list[tuple[str, str, Ceiling]]] = field(default_factory=dict)
    """Per taught class: (features, model, `ceiling`) for each kind of `ceiling_features` and CEILING_MODELS."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="*", metavar="IMAGE BOXES", help="image and CSV of pixel boxes, repeated")
    parser.add_argument("--seeds", type=int, default=5, help="simulated click sets per teach row (default 5)")
    parser.add_argument("--class-label", default="Dead", help="box label taught as a class of its own")
    parser.add_argument("--counts", default=",".join(map(str, CLICK_COUNTS)),
                        help="clicks of each side per teach row, comma-separated (default 5)")
    parser.add_argument("--pixel-size", type=float, default=0.1,
                        help="pixel size in metres of images without a georeference (default 0.1)")
    parser.add_argument("--model", default=DINOV3["model"], help="DINOv3 model: catalogue name, hub id or folder")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the runs' outputs (default output/eval)")
    parser.add_argument("--report", type=Path, default=None,
                        help="Markdown report (default: docs/QUALITY.md for the default images, else "
                        "output/eval/QUALITY.md)")
    parser.add_argument("--teach-only", action="store_true",
                        help="only the reference and teach rows (no segmentation rows, no three-class table)")
    parser.add_argument("--stability-sets", type=int, default=STABILITY_SETS,
                        help=f"click sets taught again without each click (default {STABILITY_SETS}; 0: none, "
                        "the fastest loop)")
    args = parser.parse_args()
    if len(args.pairs) % 2:
        parser.error("give images and box files in pairs")
    pairs = [(Path(a), Path(b)) for a, b in zip(args.pairs[::2], args.pairs[1::2])] or DEFAULT_IMAGES
    full = not args.pairs and not args.teach_only and args.stability_sets == STABILITY_SETS
    report = args.report or (REPO / "docs" / "QUALITY.md" if full else args.out / "QUALITY.md")
    shutil.rmtree(args.out / "cache", ignore_errors=True)  # timings of a fresh run, not of an earlier cache
    started = time.perf_counter()
    sections, untrained = [], set()
    for image_path, boxes_path in pairs:
        image = prepared_image(image_path, boxes_path, args.pixel_size, args.model, args.out)
        rows, class_rows = evaluate_image(image, args.seeds, args.class_label, untrained,
                                          tuple(int(n) for n in args.counts.split(",")), args.teach_only,
                                          args.stability_sets)
        sections.append((image, rows, class_rows))
    write_report(report, sections, untrained, args, time.perf_counter() - started)


def prepared_image(path: Path, boxes_path: Path, pixel_size: float, model: str, out: Path) -> Image:
    """The image as a GeoTIFF on a grid (a local one of `pixel_size` if it has no georeference)."""
    with open(boxes_path, newline="") as handle:
        boxes = [(float(r["xmin"]), float(r["ymin"]), float(r["xmax"]), float(r["ymax"]), r.get("label") or "")
                 for r in csv.DictReader(handle)]
    dataset = gdal.Open(str(path))
    geotransform = dataset.GetGeoTransform(can_return_null=True)
    if geotransform is not None and dataset.GetProjection():
        return Image(path.stem, path, boxes, abs(geotransform[1]), model, out)
    out.mkdir(parents=True, exist_ok=True)
    gridded = out / f"{path.stem}.tif"
    width, height = dataset.RasterXSize * pixel_size, dataset.RasterYSize * pixel_size
    gdal.Translate(str(gridded), dataset, format="GTiff", outputSRS="EPSG:32611",
                   outputBounds=[0, height, width, 0], bandList=[1, 2, 3])
    return Image(path.stem, gridded, boxes, pixel_size, model, out)


def evaluate_image(image: Image, seeds: int, class_label: str, untrained: set[str],
                   counts: tuple[int, ...] = CLICK_COUNTS, teach_only: bool = False,
                   stability_sets: int = STABILITY_SETS) -> tuple[list[Row], list[Row]]:
    """All rows for one image: trees against every box, and the class rows against its boxes (`teach_only`:
    no segmentation rows and no three-class table; `stability_sets`: click sets taught again without each
    click)."""
    with GdalRasterSource(str(image.path)) as source:
        rgb, valid = source.read_decimated(source.width, source.height)
    shape = valid.shape
    every_box = boxes_to_objects([b[:4] for b in image.boxes], shape)
    far_from_boxes = far_pixels(every_box, valid, MIN_DISTANCE_M / image.pixel_size_m)
    print(f"== {image.name}: {len(every_box)} boxes, {far_from_boxes.sum()} pixels ≥ {MIN_DISTANCE_M} m from all")
    textbook = exg_otsu_mask(rgb, valid)
    rows = [reference_row(REFERENCE_ROWS[0], valid, valid, every_box),
            reference_row(REFERENCE_ROWS[1], textbook, valid, every_box)]
    for label, options in [] if teach_only else SEGMENT_RUNS:
        params = run_params(image, options)
        started = time.perf_counter()
        record = segment(params, load_model=SHARED_MODEL)
        row = Row(label.format(model=image.model), record.model.weights, seconds=[time.perf_counter() - started])
        if record.model.untrained:
            untrained.add(record.model.model_id)
        mask, mask_valid, _, _ = read_prediction(record.outputs["trees"])
        row.scores.append(object_scores(mask, mask_valid, every_box))
        rows.append(row)
        print_row(row)
    features = ceiling_features(image, rgb)  # after the segmentation rows: their times include loading the model
    image.ceilings["trees"] = ceilings(features, valid, every_box, goal_for(rows[1], rows[0]))
    rows += teach_rows(image, every_box, far_from_boxes, seeds, "tree", goal_for(rows[1], rows[0]), counts,
                       stability_sets, labels=[b[4] for b in image.boxes])
    image.class_rows = [] if teach_only else three_class_rows(image, far_from_boxes, seeds, valid)
    class_boxes = boxes_to_objects([b[:4] for b in image.boxes if b[4] == class_label], shape)
    if not class_boxes:
        return rows, []
    class_rows = [reference_row(REFERENCE_ROWS[0], valid, valid, class_boxes),
                  reference_row(REFERENCE_ROWS[1], textbook, valid, class_boxes)]
    image.ceilings[class_label] = ceilings(features, valid, class_boxes, goal_for(class_rows[1], class_rows[0]))
    class_rows += teach_rows(image, class_boxes, far_from_boxes, seeds, class_label.lower(),
                             goal_for(class_rows[1], class_rows[0]), counts, stability_sets)
    return rows, class_rows


def ceiling_features(image: Image, rgb: np.ndarray) -> dict[str, np.ndarray]:
    """Per-pixel features the ceilings are fitted on: each kind of TEACH_FEATURES as teach scores it, and RGB
    with ExG, its local mean and spread at CONTEXT_SIGMAS_M and a texture (CONTEXT_FEATURES)."""
    features = {name: taught_features(image, options) for name, options in TEACH_FEATURES}
    colour = rgb.astype(np.float64) / 255.0
    context = [colour, excess_green(rgb)[..., None]]
    for sigma_m in CONTEXT_SIGMAS_M:
        sigma = (sigma_m / image.pixel_size_m, sigma_m / image.pixel_size_m, 0)
        mean = ndimage.gaussian_filter(colour, sigma)
        context += [mean, np.sqrt(np.maximum(ndimage.gaussian_filter(colour**2, sigma) - mean**2, 0.0))]
    sigma = TEXTURE_SIGMA_M / image.pixel_size_m
    gradient = ndimage.gaussian_gradient_magnitude(colour.mean(-1), sigma)
    features[CONTEXT_FEATURES] = np.concatenate([*context, ndimage.gaussian_filter(gradient, 3 * sigma)[..., None]],
                                                -1)
    return features


def taught_features(image: Image, options: dict) -> np.ndarray:
    """(h, w, D) features of every pixel as teach scores them: the run's projected feature cells, blended and
    interpolated (the evaluation's shared model, so untrained weights are the teach rows' own)."""
    params = run_params(image, options)
    with GdalRasterSource(str(image.path)) as source, tempfile.TemporaryDirectory() as folder:
        extractor = feature_extractor(params, SHARED_MODEL)
        grid = FeatureGrid.of_extractor(TileGrid(source.width, source.height, params.tile_size, params.overlap),
                                        extractor)
        store = FeatureStore(folder)
        ensure_features(params, RasterFeatures(source, grid, store, extractor), Progress(), {})
        rows, cols, rows_at, cols_at = grid.cell_window(Window(0, 0, source.width, source.height))
        cells, _ = grid.blended(store, rows, cols)
        return np.moveaxis(bilinear_sample(cells.astype(np.float32), rows_at, cols_at), 0, -1).astype(np.float64)


def ceilings(features: dict[str, np.ndarray], valid: np.ndarray, objects: list[ReferenceObject],
             goal: Goal) -> list[tuple[str, str, Ceiling]]:
    """`ceiling` at the goal's box recall and cover (GOAL_MAX_AREA × the boxes' share of the pixels scored) for
    every kind of features and CEILING_MODELS."""
    found = []
    for name, values in features.items():
        for model in CEILING_MODELS:
            found.append((name, model, ceiling(values, valid, objects, model, goal.recall, GOAL_MAX_AREA)))
            print(f"Ceiling, {name}, {model}: fitted on all {found[-1][2].fitted_on_all:.2f}, held out "
                  f"{' / '.join(f'{v:.2f}' for v in found[-1][2].held_out)}")
    return found


def reference_row(label: str, mask: np.ndarray, valid: np.ndarray, objects: list[ReferenceObject]) -> Row:
    row = Row(label, "none", scores=[object_scores(mask, valid, objects)])
    print_row(row)
    return row


THREE_CLASSES = {"Alive": "live tree", "Dead": "dead tree"}


def three_class_rows(image: Image, far_from_boxes: np.ndarray, seeds: int, valid: np.ndarray) -> list[list[str]]:
    """Live tree, dead tree and other taught at once (5 clicks each per seed) where the boxes carry both
    labels: per class, box recall and in-box precision against that label's boxes; the unsure share."""
    objects = {name: boxes_to_objects([b[:4] for b in image.boxes if b[4] == label], valid.shape)
               for label, name in THREE_CLASSES.items()}
    if not all(objects.values()):
        return []
    rows = []
    for features, options in TEACH_FEATURES:
        params = run_params(image, options)
        measured: dict[str, list[float]] = {}
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            clicks = []
            for name, found in objects.items():
                for i in rng.choice(len(found), size=min(5, len(found)), replace=False):
                    clicks.append(Example((found[i].cols.start + found[i].cols.stop) / 2,
                                          (found[i].rows.start + found[i].rows.stop) / 2, label=name))
            far_rows, far_cols = np.nonzero(far_from_boxes)
            clicks += [Example(far_cols[i] + 0.5, far_rows[i] + 0.5, label="other")
                       for i in rng.choice(len(far_rows), size=5, replace=False)]
            record = teach(params, clicks, load_model=SHARED_MODEL)
            dataset = gdal.Open(record["outputs"]["classes"])
            values = dataset.GetRasterBand(1).ReadAsArray()
            for name, found in objects.items():
                scores = box_scores(values == record["class_values"][name], found, valid)
                measured.setdefault(f"{name} recall", []).append(scores["box_recall"])
                measured.setdefault(f"{name} precision", []).append(scores["in_box_precision"])
            measured.setdefault("unsure", []).append(record["class_cover"]["unsure"])
        rows.append([features, record["model"]["weights"], *(summary(v, 2) for v in measured.values())])
        print(f"Three classes, {features}: " + ", ".join(f"{k} {summary(v, 2)}" for k, v in measured.items()))
    return rows


THREE_CLASS_HEADER = ["features", "weights", "live tree: box recall", "live tree: in-box precision",
                      "dead tree: box recall", "dead tree: in-box precision", "unsure cover"]


def three_class_table(image: Image) -> list[str]:
    if not image.class_rows:
        return []
    return [f"### {image.name}: live tree, dead tree and other at once", "",
            "5 clicks of each class per click set, one set per seed (cells: mean (min–max) over the sets; "
            "live and dead at the centres of Alive and Dead boxes, other ≥ 3 m from every box), at the defaults. "
            "A class's box recall and in-box precision count its own pixels against its own label's boxes "
            "(not every live crown has a box, so live precision is a lower bound).", "",
            "| " + " | ".join(THREE_CLASS_HEADER) + " |", "|" + " --- |" * len(THREE_CLASS_HEADER),
            *("| " + " | ".join(row) + " |" for row in image.class_rows), ""]


def goal_for(textbook: Row, all_pixels: Row) -> Goal:
    """The goal on one image and class, from its ExG + Otsu and all-pixels reference rows."""
    return Goal(GOAL_RECALL, textbook.scores[0]["boxes"]["in_box_precision"] + GOAL_PRECISION_OVER_EXG,
                GOAL_MAX_AREA * all_pixels.scores[0]["boxes"]["in_box_precision"])


def drop_one_click(params: SegmentationParams, examples: list[Example], class_name: str, mask: np.ndarray,
                   valid: np.ndarray) -> list[tuple[float, float]]:
    """Teach again without each click in turn: (pixel agreement with `mask`, change of cover) per click."""
    changes = []
    for index in range(len(examples)):
        record = teach(params, examples[:index] + examples[index + 1:], load_model=SHARED_MODEL,
                       class_name=class_name)
        dropped, _, _, _ = read_prediction(record["outputs"]["taught_trees"])
        changes.append((float((dropped == mask)[valid].mean()),
                        abs(float(dropped[valid].mean()) - float(mask[valid].mean()))))
    return changes


def teach_rows(image: Image, positives: list[ReferenceObject], far_from_boxes: np.ndarray, seeds: int,
               class_name: str, goal: Goal, counts: tuple[int, ...] = CLICK_COUNTS,
               stability_sets: int = STABILITY_SETS, labels: list[str] | None = None) -> list[Row]:
    """Click-to-teach with `seeds` simulated click sets per count, on each kind of features, at the defaults;
    each set's probability also thresholded at SWEEP, and the `labels` of the boxes its class clicks fell on."""
    rows = []
    for features, options in TEACH_FEATURES:
        params = run_params(image, options)
        for count in counts:
            row = Row(teach_label(class_name, count, features), "", goal=goal)
            for seed in range(seeds):
                examples = simulated_clicks(positives, far_from_boxes, count, seed)
                started = time.perf_counter()
                record = teach(params, examples, load_model=SHARED_MODEL, class_name=class_name)
                row.seconds.append(time.perf_counter() - started)
                row.weights = record["model"]["weights"]
                row.thresholds.append(record["threshold"])
                mask, valid, _, _ = read_prediction(record["outputs"]["taught_trees"])
                row.scores.append(object_scores(mask, valid, positives))
                row.sweeps.append(threshold_sweep(record["outputs"]["similarity"], valid, positives))
                if labels and any(labels):
                    row.click_labels.append(tuple(labels[i] for i in clicked_boxes(positives, count, seed)))
                if seed < stability_sets:
                    row.stability += drop_one_click(params, examples, class_name, mask, valid)
            rows.append(row)
            print_row(row)
    return rows


def threshold_sweep(probability_path: str, valid: np.ndarray, positives: list[ReferenceObject]) -> dict[float, dict]:
    """The box scores of the class probability thresholded at each of SWEEP."""
    dataset = gdal.Open(probability_path)
    probability = dataset.GetRasterBand(1).ReadAsArray()
    dataset = None
    return {threshold: object_scores((probability >= threshold) & valid, valid, positives)
            for threshold in SWEEP}


def clicked_boxes(positives: list[ReferenceObject], count: int, seed: int) -> list[int]:
    """The indices of the boxes `simulated_clicks` puts the class clicks of set `seed` in."""
    return [int(i) for i in np.random.default_rng(seed).choice(len(positives), size=min(count, len(positives)),
                                                               replace=False)]


def teach_label(class_name: str, count: int, features: str) -> str:
    return f"Teach {class_name}, {count} + {count} clicks, {features}"


def run_params(image: Image, options: dict) -> SegmentationParams:
    """Parameters of one run on `image`, with the cache of this evaluation (teach reuses segment's features)."""
    stem = f"{image.name}_{options['method']}_s{options['stride']}"
    model = {"model": image.model} if options["method"] == "dinov3" else {}
    return SegmentationParams(input_path=str(image.path), output_dir=str(image.out), allow_untrained=True,
                              cache_dir=str(image.out / "cache"), output_stem=stem, **{**options, **model})


def far_pixels(objects: list[ReferenceObject], valid: np.ndarray, distance_px: float) -> np.ndarray:
    """Valid pixels at least `distance_px` from every object."""
    return valid & (ndimage.distance_transform_edt(~union_mask(objects, valid.shape)) >= distance_px)


def simulated_clicks(positives: list[ReferenceObject], far: np.ndarray, count: int, seed: int) -> list[Example]:
    """`count` clicks at the centres of random boxes and `count` at random pixels far from every box."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(positives), size=min(count, len(positives)), replace=False)
    clicks = [Example((positives[i].cols.start + positives[i].cols.stop) / 2,
                      (positives[i].rows.start + positives[i].rows.stop) / 2, True) for i in chosen]
    rows, cols = np.nonzero(far)
    picked = rng.choice(len(rows), size=count, replace=False)
    return clicks + [Example(cols[i] + 0.5, rows[i] + 0.5, False) for i in picked]


def summary(values: list[float], digits: int = 3) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def cells(row: Row) -> list[str]:
    def measure(group: str, name: str) -> str:
        return summary([s[group][name] for s in row.scores if s[group][name] is not None])  # None: no reference

    return [row.label, row.weights, summary(row.thresholds, 2), measure("boxes", "tree_cover"),
            measure("boxes", "box_recall"), measure("boxes", "in_box_precision"), measure("pixel", "recall"),
            measure("pixel", "iou"), measure("crowns", "centroid_box_recall"),
            summary(row.seconds, 1) if row.seconds else "—"]


def print_row(row: Row) -> None:
    values = cells(row)
    reached = f", goal reached by {goal_count(row)}" if row.goal else ""
    print(f"{values[0]}: threshold {values[2]}, box recall {values[4]}, in-box precision {values[5]}, "
          f"cover {values[3]}{reached}")


def goal_count(row: Row) -> str:
    return f"{sum(row.goal.reached(s) for s in row.scores)} of {len(row.scores)}"


def stability(row: Row) -> str:
    if not row.stability:
        return "—"
    return f"{min(a for a, _ in row.stability):.2f} / {max(c for _, c in row.stability):.2f}"


def worst_set(row: Row) -> str:
    """The click set furthest from the goal: its seed, box recall, in-box precision and cover."""
    seed = int(np.argmin([row.goal.margin(s) for s in row.scores]))
    boxes = row.scores[seed]["boxes"]
    return (f"seed {seed}: {boxes['box_recall']:.2f} / {boxes['in_box_precision']:.2f} / "
            f"{boxes['tree_cover']:.2f}")


GOAL_HEADER = ["image: class", "features", "weights", "goal: box recall / in-box precision / cover at most",
               "click sets reaching it", "box recall", "in-box precision", "cover",
               "worst set: recall / precision / cover", "one click dropped: worst agreement / cover change",
               "one other threshold for all sets: most reaching it", "sets reaching it at some threshold",
               "highest in-box precision at box recall ≥ goal"]


def best_common_threshold(row: Row) -> str:
    """The threshold of SWEEP at which the most click sets reach the goal, and how many."""
    reached = {t: sum(row.goal.reached(sweep[t]) for sweep in row.sweeps) for t in SWEEP}
    best = max(SWEEP, key=lambda t: (reached[t], -abs(t - 0.5)))
    return f"{reached[best]} of {len(row.sweeps)} at {best:.1f}"


def reachable_sets(row: Row) -> str:
    """How many click sets reach the goal at one threshold of SWEEP or another (each its own)."""
    return f"{sum(any(row.goal.reached(s) for s in sweep.values()) for sweep in row.sweeps)} of {len(row.sweeps)}"


def precision_at_recall(row: Row) -> str:
    """Per click set, the highest in-box precision of a SWEEP threshold whose box recall reaches the goal's (0: none
    does): a ceiling set by how the features rank the pixels, whatever the threshold."""
    return summary([max((s["boxes"]["in_box_precision"] for s in sweep.values()
                         if s["boxes"]["box_recall"] >= row.goal.recall), default=0.0) for sweep in row.sweeps], 2)


def goal_table(sections: list, class_label: str) -> list[str]:
    """One line per image, class and kind of features: how many click sets reach the goal, and the worst."""
    lines = ["| " + " | ".join(GOAL_HEADER) + " |", "|" + " --- |" * len(GOAL_HEADER)]
    for image, rows, class_rows in sections:
        for taught, found in (("trees", rows), (class_label, class_rows)):
            for row in (r for r in found if r.goal and ", 5 + 5 " in r.label):
                goal = row.goal
                lines.append("| " + " | ".join([
                    f"{image.name}: {taught}", row.label.rsplit(", ", 1)[1], row.weights,
                    f"{goal.recall:.2f} / {goal.precision:.2f} / {goal.max_cover:.2f}", goal_count(row),
                    *(summary([s["boxes"][n] for s in row.scores], 2)
                      for n in ("box_recall", "in_box_precision", "tree_cover")),
                    worst_set(row), stability(row), best_common_threshold(row), reachable_sets(row),
                    precision_at_recall(row)]) + " |")
    rows = [r for _, rows, class_rows in sections for r in rows + class_rows if r.goal and ", 5 + 5 " in r.label]
    met = sum(sum(r.goal.reached(s) for s in r.scores) >= DONE_SETS * len(r.scores) / 5 for r in rows)
    return lines + ["", f"At least {DONE_SETS} of 5 click sets reach the goal on {met} of {len(rows)} rows.", "",
                    *click_label_findings(sections), *ceiling_findings(sections, class_label)]


CEILING_HEADER = ["image: class", "features", "goal: in-box precision at the goal's box recall and cover",
                  *(f"{model}: {fit}" for model in CEILING_MODELS
                    for fit in ("fitted on all", "held out: left / right half"))]


def ceiling_findings(sections: list, class_label: str) -> list[str]:
    """Per image and class, the goal's in-box precision beside `ceiling` on each kind of features, and which
    clear it held out on both halves."""
    lines = ["| " + " | ".join(CEILING_HEADER) + " |", "|" + " --- |" * len(CEILING_HEADER)]
    cleared = []
    for image, rows, class_rows in sections:
        for taught, found in (("trees", rows), (class_label, class_rows)):
            goal = next((r.goal for r in found if r.goal), None)
            if goal is None or taught not in image.ceilings:
                continue
            by_features: dict[str, dict[str, Ceiling]] = {}
            for features, model, measured in image.ceilings[taught]:
                by_features.setdefault(features, {})[model] = measured
                if min(measured.held_out) >= goal.precision:
                    cleared.append(f"{image.name} {taught}: {features}, {model}")
            for features, measured in by_features.items():
                lines.append("| " + " | ".join([
                    f"{image.name}: {taught}", features, f"{goal.precision:.2f}",
                    *(cell for model in CEILING_MODELS for cell in (
                        ceiling_cell(measured[model].fitted_on_all),
                        " / ".join(ceiling_cell(v) for v in measured[model].held_out)))]) + " |")
    if len(lines) == 2:
        return []
    return ["### Ceilings: a per-pixel model fitted to the boxes", "",
            f"Per image and class, the highest in-box precision at box recall ≥ {GOAL_RECALL:g} and cover ≤ "
            f"{GOAL_MAX_AREA:g} × the boxes' share (of the pixels scored) of a per-pixel model fitted with the boxes "
            "as labels (no click set has that many), over 40 thresholds of its probability: *linear*, a logistic "
            "regression; *boosted*, gradient-boosted trees (sklearn's HistGradientBoostingClassifier, 100 rounds of "
            f"15 leaves, ≥ 200 pixels a leaf, each feature split between {BOOSTED_BINS} equal-count bins), on the "
            "features each teach row scores (*RGB per pixel*, *DINOv3 default*) and on "
            f"*{CONTEXT_FEATURES}*: RGB, ExG, the local colour mean and spread at σ = "
            f"{', '.join(f'{s:g}' for s in CONTEXT_SIGMAS_M)} m and the local mean of the grey gradient at "
            f"{TEXTURE_SIGMA_M:g} m. Each model is fitted on every {CEILING_SAMPLE_STEP}th pixel. *Fitted on all*: "
            "fitted and scored on the whole image (a flexible model on local context learns the boxes' places by "
            "heart there); *held out*: the left half scored by a model fitted on the right half, and the right half "
            "by one fitted on the left, each against the boxes centred in it, cut to it (the pixels of the other "
            "half's boxes are not scored). A goal above the held-out ceiling is out of reach of such a scorer on "
            "those features, however clicked.", "",
            *lines, "", "—: no threshold reaches the box recall within the cover. Held out on both halves, the "
            f"goal's in-box precision is reached by: {'; '.join(cleared) if cleared else 'none'}.", ""]


def ceiling_cell(precision: float) -> str:
    """A ceiling's in-box precision, or — where no threshold reached the box recall within the cover."""
    return f"{precision:.2f}" if precision else "—"


def click_label_findings(sections: list) -> list[str]:
    """Where the boxes carry labels: each trees click set's box recall beside the labels its class clicks fell on
    (a class of two looks taught from clicks on one of them)."""
    lines = []
    for image, rows, _ in sections:
        for row in (r for r in rows if r.click_labels and r.goal and ", 5 + 5 " in r.label):
            sets = "; ".join(f"seed {seed}: {', '.join(f'{n} {label}' for label, n in sorted(Counter(labels).items()))}"
                             f" → box recall {scores['boxes']['box_recall']:.2f}"
                             for seed, (labels, scores) in enumerate(zip(row.click_labels, row.scores)))
            lines.append(f"- {image.name} trees, {row.label.rsplit(', ', 1)[1]}: the boxes the tree clicks fell on, "
                         f"by label: {sets}.")
    return [*lines, ""] if lines else []



HEADER = ["method", "weights", "threshold", "cover", "box recall (≥ 25 % area)", "in-box precision = pixel precision",
          "pixel recall", "pixel IoU", "centroid box recall", "time (s)"]


def table(rows: list[Row]) -> list[str]:
    return ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER),
            *("| " + " | ".join(cells(row)) + " |" for row in rows), ""]


def write_report(path: Path, sections: list, untrained: set[str], args: argparse.Namespace,
                 seconds: float) -> None:
    lines = [
        "# Quality, measured",
        "",
        f"Generated by `make eval` (`scripts/eval_sample.py`) on {datetime.date.today().isoformat()} at commit "
        f"{source_commit()} ({platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"{args.seeds} click sets per teach row, "
        f"{seconds / 60:.1f} minutes in all). "
        f"Hub reachable: {'no' if hub_offline() else 'yes'}.",
        "",
    ]
    if untrained:
        lines += [
            f"**Every DINOv3 row, and every teach row on DINOv3 features, used UNTRAINED (random) weights** "
            f"(`{', '.join(sorted(untrained))}` could not be downloaded: this machine cannot reach the Hugging "
            "Face hub). Those rows check the pipeline and the harness, not DINOv3's quality. The reference rows, "
            "the colour baselines and the teach rows on RGB features need no weights and are real measurements.",
            "",
        ]
    lines += goal_text(args.stability_sets) + goal_table(sections, args.class_label)
    lines += MEASURES + findings(sections, args.class_label)
    for image, rows, class_rows in sections:
        lines += [f"## {image.name}", "", f"{len(image.boxes)} boxes; trees against all of them.", ""]
        lines += table(rows)
        if class_rows:
            lines += [f"### {image.name}: the class '{args.class_label}' alone",
                      "",
                      f"Scored against the {sum(b[4] == args.class_label for b in image.boxes)} "
                      f"'{args.class_label}' boxes only; teach clicks at the centres of those boxes, other clicks "
                      f"≥ {MIN_DISTANCE_M:g} m from every box. Greenness is expected to fail here.",
                      ""]
            lines += table(class_rows)
        lines += three_class_table(image)
    lines += REPRODUCE
    if not args.pairs:
        lines += ["", "Imagery: NEON (National Ecological Observatory Network), CC BY 4.0, via the deepforest "
                  "package (MIT)."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(path)


def source_commit() -> str:
    """The repository's commit, '+ changes' when files differ from it ('unknown' outside a git checkout)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                                check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, cwd=REPO, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit} + changes" if changed else commit


def mean_of(rows: list[Row], label: str, group: str, name: str) -> float | None:
    """The mean of one measure over the row labelled `label`, if there is one."""
    row = next((r for r in rows if r.label == label), None)
    return float(np.mean([s[group][name] for s in row.scores])) if row else None


def findings(sections: list, class_label: str) -> list[str]:
    """A few sentences read off the tables (box recall / in-box precision, means over the click sets)."""
    lines = ["## Findings (computed from the tables below)", ""]
    textbook, all_pixels = REFERENCE_ROWS[1], REFERENCE_ROWS[0]
    for image, rows, class_rows in sections:
        def pair(found: list[Row], label: str) -> str:
            recall, precision = (mean_of(found, label, "boxes", n) for n in ("box_recall", "in_box_precision"))
            return "—" if recall is None else f"{recall:.2f} / {precision:.2f}"

        rgb, dino = "RGB per pixel", "DINOv3 default"
        lines.append(
            f"- **{image.name}**, box recall / in-box precision: textbook ExG + Otsu {pair(rows, textbook)}, the "
            f"product's exg-otsu per pixel {pair(rows, SEGMENT_RUNS[2][0])} and at stride 16 "
            f"{pair(rows, SEGMENT_RUNS[3][0])}; teaching trees with 5 + 5 clicks on RGB "
            f"{pair(rows, teach_label('tree', 5, rgb))}, on DINOv3 features {pair(rows, teach_label('tree', 5, dino))}"
            f"; all pixels {pair(rows, all_pixels)}.")
        if class_rows:
            taught = class_label.lower()
            lines.append(
                f"- **{image.name}, class '{class_label}'**: teaching it with 5 + 5 clicks on RGB "
                f"{pair(class_rows, teach_label(taught, 5, rgb))}, on DINOv3 features "
                f"{pair(class_rows, teach_label(taught, 5, dino))}; ExG + Otsu "
                f"{pair(class_rows, textbook)}; all pixels {pair(class_rows, all_pixels)}.")
    return lines + [""]


def goal_text(stability_sets: int) -> list[str]:
    """The goal table's heading and explanation."""
    return [
        "## Click-to-teach: how many click sets reach the goal",
        "",
        f"Per image and class, {CLICK_COUNTS[0]} + {CLICK_COUNTS[0]} simulated clicks at the defaults, one row per "
        "kind of features; each click set is a seed. The goal for a set: box recall ≥ "
        f"{GOAL_RECALL:g}, in-box precision ≥ ExG + Otsu's + {GOAL_PRECISION_OVER_EXG:g} on the same boxes, and a "
        f"cover of at most {GOAL_MAX_AREA:g} × the share of the image the boxes cover. Cells: mean (min–max) over "
        "the sets; the worst set is the one furthest from the goal. *One click dropped*: the first "
        f"{stability_sets} sets taught again without each of their clicks in turn; the lowest share of pixels "
        "that keep their label and the largest change of cover (how far one click swings the mask). The last three "
        "columns diagnose a miss: each set's class probability thresholded at "
        f"{', '.join(f'{t:g}' for t in SWEEP)} instead of the default. If one other threshold served all sets, the "
        "default would be the problem; if sets reach the goal only each at its own threshold, the calibration is; "
        "if the highest in-box precision at the goal's box recall stays under the goal's precision, no threshold can "
        "help: the features rank too many pixels outside the boxes above those inside.",
        "",
    ]

MEASURES = [
    "## What the columns mean",
    "",
    "The references are human-drawn **boxes**, larger than the crowns inside them, so pixel precision "
    "against the box union is a lower bound and pixel IoU is not a crown IoU. Read the box measures first:",
    "",
    "- **box recall (≥ 25 % area)**: share of boxes with at least a quarter of their area predicted. It does "
    "not depend on how the mask is split into crowns.",
    "- **in-box precision**: share of predicted pixels inside some box; the same number as pixel precision "
    "against the box union.",
    "- **centroid box recall**: share of boxes holding the centroid of a connected component of the mask "
    "(≥ 20 px); it moves with how the mask splits into pieces and is kept only beside the others.",
    "- **cover**: share of valid pixels predicted. **threshold**: the teach threshold (0.5 on the calibrated "
    "class probability at the defaults; see core/teach.py).",
    "- Teach rows: mean over the click sets, (min–max) in brackets. *DINOv3 default* teaches on the default "
    "run's features; *RGB per pixel* on the rgb-kmeans baseline's per-pixel colour (centred by its PCA), which "
    "needs no weights. The time is one teach call: scoring "
    "only when the segmentation row cached the features (colour features, pretrained weights), feature "
    "extraction included with untrained weights (their features are never cached). All DINOv3 rows of one "
    "evaluation share one loaded model.",
    "- Two reference rows make the numbers readable: **all pixels** (what predicting everything scores) and "
    "**ExG + Otsu per pixel**, the textbook colour rule in plain numpy. The product's `exg-otsu` per pixel "
    "matches it to 0.01 (tests/test_evaluation.py); at stride 16 it averages 16 × 16 cells first.",
    "",
]

REPRODUCE = [
    "## Reproduce, and with real weights",
    "",
    "1. `make eval` (a few minutes on 2 CPU cores); any image with pixel boxes: "
    "`.venv/bin/python scripts/eval_sample.py scene.tif boxes.csv` (report in output/eval/QUALITY.md); "
    "only the reference and teach rows: add `--teach-only`, and `--stability-sets 0` to skip the one-click-"
    "dropped column (the fastest loop; such reports go to output/eval/QUALITY.md).",
    "2. For the DINOv3 rows with real weights: accept the licence on "
    "https://huggingface.co/facebook/dinov3-vitb16-pretrain-lvd1689m, set `HF_TOKEN` (or run "
    "`hf auth login`), and run `make eval` again; the weights column then says `pretrained`.",
    "",
    "Score any run of your own: `.venv/bin/python -m treeseg_qgis evaluate OUT/scene_trees.tif "
    "--reference crowns.gpkg --image scene.tif --out report/`.",
]


if __name__ == "__main__":
    main()
