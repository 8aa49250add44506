"""One raster's part of a survey, the units of work that run here (survey.py) or as Dask tasks (dask_runner.py):
its share of the cluster sample (`sample_raster`), its run (`run_job`, tried once more after a failure), and its
windows of tiles (`window_ranges`). Both runners import this module; neither imports the other's work from here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from ..params import SegmentationParams
from ..run_record import RunRecord
from .core.errors import Cancelled, InputError, TreesegError
from .core.feature_grid import FeatureGrid
from .core.features import tiles_per_batch
from .core.progress import Progress
from .core.segmentation import PCA_TILES, TileFeatureExtractor, sample_raw_features
from .core.tiling import TileGrid
from .gis.raster import GdalRasterSource
from .pipeline import ModelLoader, segment

log = logging.getLogger("treeseg")
Result = TypeVar("Result")

ATTEMPTS = 2
"""A failed raster is tried once more before it is reported."""

@dataclass
class RasterJob:
    """One raster of a survey: its parameters (the cluster model set) and its output stem; `features`, a
    complete feature store of it (its windows extracted apart)."""

    input_path: str
    params: SegmentationParams
    features: str | None = None


@dataclass
class RasterOutcome:
    """What became of one raster: its run record, or the error of its last attempt; `taught`, the record of the
    survey's taught classifier applied to it."""

    input_path: str
    stem: str
    record: RunRecord | None
    error: str | None
    attempts: int
    seconds: float
    windows: int = 0
    taught: dict | None = None


@dataclass
class RasterShare:
    """One raster's share of a survey's cluster sample: `count` features, drawn with the raster's own generator
    (seeded with the survey's seed and `index`, so where and in what order the rasters are sampled does not
    matter)."""

    path: str
    index: int
    count: int


@dataclass
class RasterSample:
    """One raster's raw features for the survey's fit, their ExG, what made them and the raster's scaling."""

    features: np.ndarray
    exg: np.ndarray
    extractor: dict
    scaling: str


def sample_raster(share: RasterShare, params: SegmentationParams, value_ranges: dict[int, tuple[float, float]],
                  extractor: TileFeatureExtractor, progress: Progress | None = None) -> RasterSample:
    """A raster's share of the survey's cluster sample, read with the survey's stretch (`value_ranges`)."""
    cells_per_tile = (params.tile_size // params.stride) ** 2
    tiles = min(PCA_TILES, max(1, math.ceil(4 * share.count / cells_per_tile)))
    with GdalRasterSource(share.path, params.bands, value_ranges) as source:
        grid = FeatureGrid.of_extractor(TileGrid(source.width, source.height, params.tile_size, params.overlap),
                                        extractor)
        features, exg = sample_raw_features(source, extractor, grid, tiles, share.count,
                                            np.random.default_rng([params.seed, share.index]),
                                            progress or Progress())
        return RasterSample(features, exg, extractor.describe(), source.scaling)


def run_job(job: RasterJob, load_model: ModelLoader) -> RasterOutcome:
    """Segment one raster, trying once more after a failure; the error of the last attempt is kept."""
    started = time.perf_counter()
    record, error, attempts = with_retry(lambda: segment(job.params, load_model=load_model, features=job.features),
                                         job.input_path)
    return RasterOutcome(job.input_path, job.params.output_stem, record, error, attempts,
                         time.perf_counter() - started)


def with_retry(call: Callable[[], Result], what: str) -> tuple[Result | None, str | None, int]:
    """`call()` tried once more after a failure: (its result, None, attempts) or (None, the last error, attempts).
    A stop request is not a failure: it goes up."""
    error = None
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return call(), None, attempt
        except (TreesegError, OSError, RuntimeError, ValueError) as failure:
            if isinstance(failure, Cancelled):
                raise
            error = str(failure) or type(failure).__name__
            log.warning("%s failed (attempt %d of %d): %s", what, attempt, ATTEMPTS, error)
    return None, error, ATTEMPTS


def window_ranges(job: RasterJob, window_tiles: int) -> list[range]:
    """The raster's tiles (numbered in grid order) in windows of about `window_tiles`, each a whole number of
    the extractor's batches (so every tile goes through the model in the batch it has in one run); none when
    the raster has at most `window_tiles` tiles, or cannot be opened here (it then runs, and fails, whole)."""
    params = job.params
    try:
        with GdalRasterSource(job.input_path, params.bands) as source:
            count = len(TileGrid(source.width, source.height, params.tile_size, params.overlap))
    except InputError:
        return []
    if window_tiles < 1 or count <= window_tiles:
        return []
    batch = tiles_per_batch(params.batch_size, params.stride) if params.method == "dinov3" else 1
    size = math.ceil(window_tiles / batch) * batch
    windows = [range(start, min(start + size, count)) for start in range(0, count, size)]
    return windows if len(windows) > 1 else []
