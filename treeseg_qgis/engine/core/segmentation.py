"""The segmentation of one raster, window by window, with bounded memory.

Where features sit on the raster (tiles, cells, blending, sampling) is the
FeatureGrid (feature_grid.py); this module runs the segmentation on it.

1. Features: every tile of the TileGrid is read, run through the FeatureExtractor
   once, and its features are stored on disk (FeatureStore); a tile without a valid pixel (all nodata, or
   masked out) never reaches the model: its cells are invalid and hold zero projected features (the
   PCA mean), so it weighs as little in the blend as any invalid cell. A tile with some nodata runs cropped
   to the box of its valid pixels (rounded out to a quarter tile); its cells outside the crop, all invalid,
   repeat the crop's edge cells. The PCA basis is
   fitted on a sample of cells from tiles spread over the whole raster (those
   tiles are extracted first); every tile is then projected with it.
2. Clustering: k-means (fixed K or the elbow K) is fitted once on a sample of
   projected cells drawn from all tiles, so a cluster id means the same thing
   everywhere. Clusters are numbered by decreasing ExG; the tree rule picks trees.
3. Assignment: for each output block the projected features of all tiles
   covering it are blended with tent weights (no seams at tile borders), the
   squared distances to the centres are interpolated bilinearly to every pixel
   and the nearest centre wins; blocks go to the sink as they are done.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from ...params import SegmentationParams
from .clustering import ClusterModel, Projection, fit_clusters
from .errors import InputError
from .feature_grid import MIN_VALID_FRACTION, FeatureGrid, bilinear_sample
from .heap import release_free_memory
from .progress import Progress
from .store import FeatureStore, TileFeatures
from .survey_model import ClusterFit, SurveyModel
from .tiling import Tile, Window
from .trees import check_tree_override, cluster_means, tree_clusters_by_exg

NODATA = 255
PCA_TILES = 16
NO_VALID_PIXELS = ("The raster has no valid pixels to segment: every pixel is nodata, masked or transparent in "
                   "the chosen bands.")


class RasterSource(Protocol):
    """What the pipeline needs of an input raster (implemented with GDAL in gis/)."""

    width: int
    height: int

    def read(self, x: int, y: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """(rgb float32 (h, w, 3) in 0..1, valid bool (h, w)) for a window inside the raster."""

    def read_valid(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """The valid mask alone of a window (cheap when the raster has no nodata)."""


class TileFeatureExtractor(Protocol):
    """Turns a tile into a grid of features: DINOv3 (FeatureExtractor) or a colour baseline."""

    stride: int
    cell_size: int
    tiles_per_batch: int
    feature_dim: int

    def extract_tiles(self, tiles: Sequence[np.ndarray], cropped: bool = False) -> list[np.ndarray]:
        """(H / stride, W / stride, C) features of each (H, W, 3) tile (`cropped`: tiles cropped to their valid
        pixels)."""

    def describe(self) -> dict:
        """Plain facts for the run record."""


class LabelSink(Protocol):
    """Where finished blocks go (a GeoTIFF writer in gis/)."""

    def write(self, x: int, y: int, labels: np.ndarray, trees: np.ndarray) -> None:
        """Store uint8 cluster ids and the 0/1 tree mask (255 = nodata) of one window."""


@dataclass
class ModelWork:
    """What went through the model: tiles, and their pixels (a cropped tile counts its crop; a tile's shifted
    copies for a stride under 16 are not counted again)."""

    tiles: int = 0
    pixels: int = 0


@dataclass(frozen=True)
class RasterFeatures:
    """One raster's features: the raster, its feature grid, the store that holds them and the extractor that
    makes those the store lacks (None when it is complete: no model is loaded)."""

    source: RasterSource
    grid: FeatureGrid
    store: FeatureStore
    extractor: TileFeatureExtractor | None = None


@dataclass
class SegmentationResult:
    """What one run found, for the run metadata and the user's summary."""

    k: int
    auto_k: bool
    inertia_curve: dict[int, float]
    tree_clusters: list[int]
    tree_rule: str
    cluster_exg: list[float]
    cluster_pixels: list[int]
    tree_pixels: int
    valid_pixels: int
    tiles: int
    timings: dict[str, float] = field(default_factory=dict)
    model_work: ModelWork = field(default_factory=ModelWork)
    grid: FeatureGrid | None = None
    samples: np.ndarray | None = None

    @property
    def tree_cover(self) -> float:
        return self.tree_pixels / self.valid_pixels if self.valid_pixels else 0.0


def segment_raster(
    params: SegmentationParams,
    features: RasterFeatures,
    open_sink: Callable[[int, list[int]], LabelSink],
    progress: Progress,
    tree_filter: Callable[[Window, np.ndarray], np.ndarray] | None = None,
    survey: SurveyModel | None = None,
) -> SegmentationResult:
    """Segment the raster of `features` into clusters and trees; `open_sink(k, tree_ids)` receives the blocks.

    `tree_filter(block, trees)` may clear tree
    pixels of a block (e.g. below a canopy height). With a `survey` model its PCA and clusters are applied
    as they are: nothing is fitted.
    """
    timings: dict[str, float] = {}
    work = ModelWork()
    samples, sample_exg = ensure_features(params, features, progress.sub(0, 0.85), timings,
                                          survey.projection if survey else None, work)
    release_free_memory()

    progress.report(0.86, "Clustering")
    progress.check()
    started = time.perf_counter()
    fitted = survey.fit if survey else fit_clustering(samples, sample_exg, params)
    clusters, trees, rule, exg = fitted.clusters, fitted.tree_clusters, fitted.tree_rule, fitted.cluster_exg
    timings["cluster"] = time.perf_counter() - started

    sink = open_sink(clusters.k, trees)
    counts, tree_pixels = _assign_all(features, clusters, trees, sink, progress.sub(0.88, 1.0), timings,
                                      tree_filter)
    valid = int(counts.sum())
    return SegmentationResult(
        k=clusters.k,
        auto_k=clusters.auto_k,
        inertia_curve=clusters.inertia_curve,
        tree_clusters=trees,
        tree_rule=rule,
        cluster_exg=[round(float(v), 4) for v in exg],
        cluster_pixels=[int(c) for c in counts],
        tree_pixels=tree_pixels,
        valid_pixels=valid,
        tiles=len(features.grid.tiles),
        timings={name: round(seconds, 3) for name, seconds in timings.items()},
        model_work=work,
        grid=features.grid,
        samples=samples,
    )


def fit_clustering(samples: np.ndarray, sample_exg: np.ndarray, params: SegmentationParams) -> ClusterFit:
    """k-means on projected samples, clusters renumbered by decreasing ExG, and the tree rule."""
    clusters = fit_clusters(samples, params.fixed_clusters, (params.k_min, params.k_max), params.seed)
    exg, weights = cluster_means(clusters.assign(samples), sample_exg, clusters.k)
    order = np.argsort(-exg, kind="stable")
    clusters.reorder(order)
    exg, weights = exg[order], weights[order]
    if params.tree_clusters is not None:
        trees, rule = check_tree_override(list(params.tree_clusters), clusters.k), "user list"
    else:
        trees, rule = tree_clusters_by_exg(exg, weights, params.min_exg), "ExG (Otsu over clusters)"
    return ClusterFit(clusters, trees, rule, exg, weights)


def read_tile(source: RasterSource, tile: Tile) -> tuple[np.ndarray, np.ndarray]:
    """A tile's pixels, edge-padded where it reaches past the raster (marked invalid)."""
    width = min(tile.width, source.width - tile.x)
    height = min(tile.height, source.height - tile.y)
    rgb, valid = source.read(tile.x, tile.y, width, height)
    pad = ((0, tile.height - height), (0, tile.width - width))
    if pad != ((0, 0), (0, 0)):
        rgb = np.pad(rgb, pad + ((0, 0),), mode="edge")
        valid = np.pad(valid, pad, mode="constant", constant_values=False)
    return rgb, valid


def ensure_features(
    params: SegmentationParams,
    features: RasterFeatures,
    progress: Progress,
    timings: dict[str, float],
    projection: Projection | None = None,
    work: ModelWork | None = None,
    tiles: list[Tile] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every tile's features in the store, and the clustering sample with its ExG: from the store when it is
    complete, else extracted now (the extractor may be None only then) and the sample kept with them. Features
    are projected with `projection` when given (a survey's PCA), else with a PCA fitted on this raster. With a
    projection, `tiles` extracts only those (one window of the raster; its sample is not kept: the windows'
    samples, joined in tile order, are the run's, as each tile's is drawn with a seed of its own). What the
    model ran is added to `work`."""
    source, grid, store = features.source, features.grid, features.store
    if store.complete:
        progress.report(0.0, "Features from the cache")
        return store.load_samples()
    if features.extractor is None:
        raise ValueError("the feature store is incomplete and no extractor was given")
    rng = np.random.default_rng(params.seed)
    given = projection is not None
    pca_tiles = [] if given else grid.tiles.spread(PCA_TILES)
    first = {(t.row, t.col) for t in pca_tiles}
    order = (tiles or grid.tiles.tiles()) if given else pca_tiles + [
        t for t in grid.tiles.tiles() if (t.row, t.col) not in first]
    per_tile_pca = math.ceil(params.sample_size / max(len(pca_tiles), 1))
    per_tile = math.ceil(params.sample_size / len(grid.tiles))
    pca_samples: list[np.ndarray] = []
    raw: dict[tuple[int, int], TileFeatures] = {}
    samples: list[np.ndarray] = []
    sample_exg: list[np.ndarray] = []
    timings.update(read=0.0, features=0.0, project=0.0)

    def keep_sample(key: tuple[int, int], tile_features: TileFeatures) -> None:
        rows = _sample_rows(tile_features.valid, per_tile, np.random.default_rng([params.seed, *key]) if given else rng)
        samples.append(tile_features.features.reshape(-1, tile_features.features.shape[-1])[rows])
        sample_exg.append(tile_features.exg.reshape(-1)[rows])

    for tile, (cell_valid, cell_exg), tile_features in _extracted(source, order, grid, features.extractor, progress,
                                                                  timings, work):
        started = time.perf_counter()
        key = (tile.row, tile.col)
        if projection is None:
            raw[key] = TileFeatures(tile_features.astype(np.float16), cell_valid, cell_exg)
            rows = _sample_rows(cell_valid, per_tile_pca, rng)
            pca_samples.append(tile_features.reshape(-1, tile_features.shape[-1])[rows])
            if len(raw) == len(pca_tiles):
                projection = _fit_projection(pca_samples, params)
                for raw_key, item in raw.items():
                    projected = _projected(projection, item)
                    store.put(raw_key, projected)
                    keep_sample(raw_key, projected)
                raw.clear()
        else:
            projected = _projected(projection, TileFeatures(tile_features, cell_valid, cell_exg))
            store.put(key, projected)
            keep_sample(key, projected)
        timings["project"] += time.perf_counter() - started
    progress.report(1.0, "Features extracted")
    sample = np.concatenate(samples).astype(np.float32), np.concatenate(sample_exg).astype(np.float64)
    if tiles is None:
        store.save_samples(*sample, {**features.extractor.describe(), **grid.describe()})
    return sample


def sample_raw_features(
    source: RasterSource,
    extractor: TileFeatureExtractor,
    grid: FeatureGrid,
    tiles: int,
    count: int,
    rng: np.random.Generator,
    progress: Progress,
) -> tuple[np.ndarray, np.ndarray]:
    """Up to `count` unprojected features of mostly valid cells and their ExG, from `tiles` tiles spread over
    the raster (a survey's share of this raster)."""
    spread = grid.tiles.spread(tiles)
    per_tile = math.ceil(count / len(spread))
    features_kept: list[np.ndarray] = []
    exg_kept: list[np.ndarray] = []
    timings = {"read": 0.0, "features": 0.0}
    for _, (cell_valid, cell_exg), features in _extracted(source, spread, grid, extractor, progress, timings):
        rows = _sample_rows(cell_valid, per_tile, rng)
        features_kept.append(features.reshape(-1, features.shape[-1])[rows].astype(np.float32))
        exg_kept.append(cell_exg.reshape(-1)[rows].astype(np.float64))
    return np.concatenate(features_kept), np.concatenate(exg_kept)


def _extracted(
    source: RasterSource,
    tiles: list[Tile],
    grid: FeatureGrid,
    extractor: TileFeatureExtractor,
    progress: Progress,
    timings: dict[str, float],
    work: ModelWork | None = None,
) -> Iterator[tuple[Tile, tuple[np.ndarray, np.ndarray], np.ndarray]]:
    """Each tile with its cell statistics (valid share, ExG) and features, in order. Tiles go through
    the model in batches of `extractor.tiles_per_batch`; a reader thread reads the next batch and
    computes its cell statistics while this one is in the model. A tile without a valid pixel is not run:
    its features are zeros (every cell of it is invalid, so nothing samples them). A tile with nodata runs
    cropped to its valid pixels (`TileGrid.model_window`; in int8 through the export of any shape); crops of one
    shape are batched together.
    The heap's freed memory goes back to the system after every batch: otherwise glibc keeps more
    of it batch after batch (measured at 36 MP: 720 MB resident after the first batches, 920 MB by
    the end, peak 956 MB; with the release 750 to 850 MB throughout, peak 880 MB, and no slower).

    Only the reader thread touches the source until the loop ends.
    """
    per_batch = extractor.tiles_per_batch
    batches = [tiles[start:start + per_batch] for start in range(0, len(tiles), per_batch)]

    def timed_read(batch: list[Tile]) -> list[tuple[Window | None, np.ndarray, tuple[np.ndarray, np.ndarray]]]:
        """Each tile's model window (None without a valid pixel), its pixels and its cell statistics."""
        started = time.perf_counter()
        pixels = []
        for tile in batch:
            rgb, valid = read_tile(source, tile)
            pixels.append((grid.tiles.model_window(tile, valid), rgb, grid.cell_statistics(rgb, valid)))
        timings["read"] += time.perf_counter() - started
        return pixels

    done = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="treeseg-reader") as reader:
        pending = reader.submit(timed_read, batches[0])
        for index, batch in enumerate(batches):
            pixels = pending.result()
            if index + 1 < len(batches):
                pending = reader.submit(timed_read, batches[index + 1])
            progress.check()
            progress.report(done / len(tiles), f"Extracting features: tile {done + 1} of {len(tiles)}")
            started = time.perf_counter()
            windows = [window for window, _, _ in pixels]
            run = [(rgb[window.y:window.y + window.height, window.x:window.x + window.width],
                    not grid.tiles.runs_whole(window))
                   for window, (_, rgb, _) in zip(windows, pixels) if window is not None]
            features = iter(_extract_by_shape(extractor, run))
            release_free_memory()
            timings["features"] += time.perf_counter() - started
            if work is not None:
                work.tiles += len(run)
                work.pixels += sum(crop.shape[0] * crop.shape[1] for crop, _ in run)
            done += len(batch)
            for tile, window, (_, _, statistics) in zip(batch, windows, pixels):
                cells = statistics[0].shape
                yield tile, statistics, (_no_features(cells, extractor) if window is None
                                         else _on_tile_cells(next(features), window, cells, extractor.stride))


def _no_features(cells: tuple[int, ...], extractor: TileFeatureExtractor) -> np.ndarray:
    """The features of a tile that was not run: zeros on its cell grid."""
    return np.zeros((*cells, extractor.feature_dim), dtype=np.float32)


def _extract_by_shape(extractor: TileFeatureExtractor, crops: list[tuple[np.ndarray, bool]]) -> list[np.ndarray]:
    """The features of each (pixels, cropped) in order; crops of one shape go through the model together."""
    by_shape: dict[tuple[tuple[int, ...], bool], list[int]] = {}
    for index, (crop, cropped) in enumerate(crops):
        by_shape.setdefault((crop.shape, cropped), []).append(index)
    features: list[np.ndarray] = [np.empty(0)] * len(crops)
    for (_, cropped), indices in by_shape.items():
        for index, grid in zip(indices, extractor.extract_tiles([crops[i][0] for i in indices], cropped)):
            features[index] = grid
    return features


def _on_tile_cells(features: np.ndarray, window: Window, cells: tuple[int, ...], stride: int) -> np.ndarray:
    """A cropped tile's features placed on its whole cell grid. The cells outside the crop hold no valid
    pixel; they repeat the nearest cell of the crop, as pixels past the raster repeat its edge, so a valid
    pixel beside them interpolates towards its own cell's features, never towards zeros."""
    top, left = window.y // stride, window.x // stride
    pad = ((top, cells[0] - top - features.shape[0]), (left, cells[1] - left - features.shape[1]), (0, 0))
    return features if pad == ((0, 0), (0, 0), (0, 0)) else np.pad(features, pad, mode="edge")


def _projected(projection: Projection, tile: TileFeatures) -> TileFeatures:
    """A tile's features projected; zeros (the PCA mean) for a tile without a valid cell, which was not run."""
    if tile.valid.any():
        return TileFeatures(projection.project(tile.features), tile.valid, tile.exg)
    zeros = np.zeros((*tile.valid.shape, projection.components.shape[0]), dtype=np.float32)
    return TileFeatures(zeros, tile.valid, tile.exg)


def _fit_projection(pca_samples: list[np.ndarray], params: SegmentationParams) -> Projection:
    stacked = np.concatenate(pca_samples).astype(np.float32)
    if stacked.shape[0] == 0:
        raise InputError(NO_VALID_PIXELS)
    return Projection(stacked, params.pca_dims, params.seed)


def _sample_rows(valid: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `count` random flat indices of cells that are mostly valid (or, in a raster smaller
    than a patch, of any cell with valid pixels)."""
    flat = valid.reshape(-1)
    candidates = np.flatnonzero(flat >= MIN_VALID_FRACTION)
    if candidates.size == 0:
        candidates = np.flatnonzero(flat > 0)
    if candidates.size <= count:
        return candidates
    return np.sort(rng.choice(candidates, size=count, replace=False))


def _assign_all(
    features: RasterFeatures,
    clusters: ClusterModel,
    trees: list[int],
    sink: LabelSink,
    progress: Progress,
    timings: dict[str, float],
    tree_filter: Callable[[Window, np.ndarray], np.ndarray] | None,
) -> tuple[np.ndarray, int]:
    """Label every pixel block by block; returns the pixel count of each cluster and the tree pixels."""
    counts = np.zeros(clusters.k, dtype=np.int64)
    tree_lookup = np.zeros(256, dtype=np.uint8)
    tree_lookup[trees] = 1
    tree_lookup[NODATA] = NODATA
    blocks = features.grid.tiles.blocks()
    tree_pixels = 0
    timings.update(assign=0.0, write=0.0)
    for index, block in enumerate(blocks):
        progress.check()
        progress.report(index / len(blocks), f"Assigning clusters: block {index + 1} of {len(blocks)}")
        started = time.perf_counter()
        valid = features.source.read_valid(block.x, block.y, block.width, block.height)
        if valid.any():
            labels = _label_block(features.store, features.grid, clusters, block)
            labels[~valid] = NODATA
        else:  # all nodata or masked out: no feature is blended, no distance computed
            labels = np.full(valid.shape, NODATA, np.uint8)
        counts += np.bincount(labels[valid], minlength=clusters.k)[: clusters.k]
        tree_mask = tree_lookup[labels]
        if tree_filter is not None:
            tree_mask = tree_filter(block, tree_mask)
        tree_pixels += int((tree_mask == 1).sum())
        timings["assign"] += time.perf_counter() - started
        started = time.perf_counter()
        sink.write(block.x, block.y, labels, tree_mask)
        timings["write"] += time.perf_counter() - started
    progress.report(1.0, "Clusters assigned")
    return counts, tree_pixels


def _label_block(store: FeatureStore, grid: FeatureGrid, clusters: ClusterModel, block: Window) -> np.ndarray:
    """Cluster ids (uint8) for every pixel of one block."""
    rows, cols, rows_at, cols_at = grid.cell_window(block)
    features, _ = grid.blended(store, rows, cols)
    return _nearest_centre_bilinear(clusters.squared_distances(features), rows_at, cols_at)


def _nearest_centre_bilinear(distances: np.ndarray, rows_at: np.ndarray, cols_at: np.ndarray) -> np.ndarray:
    """Argmin over K of (h, w, K) distances sampled bilinearly at fractional rows × cols."""
    return bilinear_sample(distances, rows_at, cols_at).argmin(0).astype(np.uint8)
