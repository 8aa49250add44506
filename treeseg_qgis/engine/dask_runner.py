"""The rasters of a survey on Dask distributed: a LocalCluster of N processes, or an existing cluster.

Each Dask worker loads the model once (`ModelPlugin`, a worker plugin) and segments one raster per
task with `pipeline.segment`, exactly as a single process would (survey.run_job: a failed raster is
tried once more, then reported while the others finish). Progress counts finished rasters.
The cluster (and its worker processes) is closed when the run ends, fails or is stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from distributed import Client, Future, LocalCluster, Worker, WorkerPlugin, as_completed, get_worker

from ..params import SegmentationParams
from .core.models import Backbone
from .core.progress import Progress
from .pipeline import load_model_for
from .survey import RasterJob, RasterOutcome, run_job

PLUGIN_NAME = "treeseg-model"
POLL_S = 0.5


class ModelPlugin(WorkerPlugin):
    """Holds the backbone of one Dask worker: loaded by the first raster, reused by the others."""

    name = PLUGIN_NAME

    def setup(self, worker: Worker) -> None:
        self._lock = threading.Lock()
        self._backbone = None
        self.loads = 0

    def load(self, params: SegmentationParams) -> Backbone:
        with self._lock:
            if self._backbone is None:
                self._backbone = load_model_for(params)
                self.loads += 1
            return self._backbone


def segment_on_worker(job: RasterJob) -> RasterOutcome:
    """One raster on a Dask worker with that worker's model, tried once more after a failure (survey.run_job)."""
    return run_job(job, get_worker().plugins[PLUGIN_NAME].load)


def run_on_dask(jobs: Sequence[RasterJob], workers: int, scheduler: str | None,
                progress: Progress) -> list[RasterOutcome]:
    """Every job on the cluster at `scheduler`, or on a LocalCluster of `workers` processes."""
    with ExitStack() as stack:
        if scheduler:
            client = stack.enter_context(Client(scheduler, timeout="30s"))
        else:
            cluster = stack.enter_context(LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                silence_logs=logging.ERROR))
            client = stack.enter_context(Client(cluster))
        client.register_plugin(ModelPlugin())
        futures = {client.submit(segment_on_worker, job, pure=False,
                                 key=f"treeseg-{index}-{Path(job.input_path).name}"): job
                   for index, job in enumerate(jobs)}
        submitted = time.perf_counter()
        outcomes: dict[str, RasterOutcome] = {}
        try:
            pending = as_completed(futures)
            while not pending.is_empty():
                progress.check()
                for future in pending.next_batch(block=False) or _wait(pending):
                    job = futures[future]
                    outcomes[job.input_path] = _outcome(job, future, time.perf_counter() - submitted)
                    progress.report(len(outcomes) / len(jobs),
                                    f"{len(outcomes)} of {len(jobs)} rasters done on the cluster")
        except BaseException:
            client.cancel(list(futures))
            raise
        return [outcomes[job.input_path] for job in jobs]


def _wait(pending: as_completed) -> list:
    """Nothing finished yet: wait a little (so a stop request is seen within POLL_S)."""
    time.sleep(POLL_S)
    return []


def _outcome(job: RasterJob, future: Future, seconds: float) -> RasterOutcome:
    """The worker's outcome, or the error of a task the cluster could not run (e.g. its worker died)."""
    if future.status == "finished":
        return future.result()
    error = future.exception()
    return RasterOutcome(job.input_path, job.params.output_stem, None, str(error) or type(error).__name__,
                         1, seconds)
