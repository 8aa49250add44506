"""The rasters of a survey on Dask distributed: a LocalCluster of N processes, or an existing cluster.

One cluster (`dask_session`) serves a survey's fit and its rasters. Each Dask worker loads the model
once (`ModelPlugin`, a worker plugin); the fit samples each raster's share as one task (survey_tasks.sample_raster,
tried once more after a failure), then each worker segments one raster per task with `pipeline.segment`,
exactly as a single process would (survey_tasks.run_job: a failed raster is tried once more, then reported while
the others finish). A raster of more than `window_tiles` tiles is
split into windows of tiles (survey_tasks.window_ranges): each window is a task that extracts its tiles'
features on its worker and writes them into the raster's one staged feature store in the output folder
(which the workers must therefore share); once every window is in, this process completes the store and
a last task segments the raster from it (no model load, the same outputs as one process). A window is
tried once more after a failure; a raster with a window that failed twice is reported.
Progress counts finished rasters and windows. The cluster (and its worker processes) is closed, the
staged stores removed, when the run ends, fails or is stopped.
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from multiprocessing import resource_tracker
from pathlib import Path

import numpy as np
from distributed import Client, Future, LocalCluster, Worker, WorkerPlugin, as_completed, get_worker

from ..params import SegmentationParams
from . import interrupts
from .core.errors import TreesegError
from .core.models import Backbone
from .core.progress import Progress
from .core.store import FeatureStore
from .interrupts import STOP_SIGNALS
from .pipeline import extract_window, feature_extractor, load_model_for
from .survey_tasks import (
    ATTEMPTS,
    RasterJob,
    RasterOutcome,
    RasterSample,
    RasterShare,
    run_job,
    sample_raster,
    window_ranges,
    with_retry,
)

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


@dataclass
class WindowOutcome:
    """One window's part of the cluster sample and what made its features, or the error of its last attempt."""

    part: tuple[np.ndarray, np.ndarray, dict] | None
    error: str | None


@dataclass
class WindowedRaster:
    """A raster split into windows: its staged feature store and the windows' outcomes so far."""

    job: RasterJob
    windows: list[range]
    folder: Path
    done: dict[int, WindowOutcome] = field(default_factory=dict)

    def failure(self) -> str | None:
        """The error of the first failed window, naming it."""
        for index, window in enumerate(self.windows):
            outcome = self.done[index]
            if outcome.error is not None:
                return (f"window {index + 1} of {len(self.windows)} (tiles {window.start + 1}–{window.stop}): "
                        f"{outcome.error}")
        return None

    def complete_store(self) -> None:
        """Join the windows' sample parts in tile order: the store is complete."""
        parts = [self.done[index].part for index in range(len(self.windows))]
        FeatureStore(self.folder).save_samples(np.concatenate([part[0] for part in parts]),
                                               np.concatenate([part[1] for part in parts]), parts[0][2])


def segment_on_worker(job: RasterJob) -> RasterOutcome:
    """One raster on a Dask worker with that worker's model, tried once more after a failure (survey_tasks.run_job)."""
    return run_job(job, get_worker().plugins[PLUGIN_NAME].load)


def extract_window_on_worker(job: RasterJob, window: range, folder: str) -> WindowOutcome:
    """One window of a raster on a Dask worker with that worker's model, tried once more after a failure."""
    load = get_worker().plugins[PLUGIN_NAME].load
    part, error, _ = with_retry(lambda: extract_window(job.params, window, folder, load),
                                f"{job.input_path}, tiles {window.start + 1}–{window.stop}")
    return WindowOutcome(part, error)


@dataclass
class DaskSession:
    """A client of a Dask cluster whose workers hold the model (`ModelPlugin`), and what to do once the cluster
    has closed."""

    client: Client
    after_close: ExitStack


@contextmanager
def dask_session(workers: int, scheduler: str | None) -> Iterator[DaskSession]:
    """The cluster at `scheduler`, or a LocalCluster of `workers` processes, closed (its worker processes
    ended) when the block ends, fails or is stopped. Distributed's messages in this process say only errors
    while it runs, and nothing once it has failed or been stopped; a LocalCluster's worker processes never see
    a terminal's stop signal (the survey's one line is all a stopped survey says), and log nothing below
    critical: a task's error comes back through its future, and a worker that loses the closing scheduler
    would otherwise print its heartbeat failure after that line."""
    _quiet_distributed(logging.ERROR)
    with ExitStack() as after_close, ExitStack() as stack:
        try:
            if scheduler:
                client = stack.enter_context(Client(scheduler, timeout="30s"))
            else:
                with interrupts.deferred(), _stop_signals_held():  # a stop while it starts: closed once started
                    cluster = stack.enter_context(LocalCluster(  # its HTTP server on a free port: 8787 may be taken
                        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}, silence_logs=logging.CRITICAL))
                client = stack.enter_context(Client(cluster))
            client.register_plugin(ModelPlugin())
            yield DaskSession(client, after_close)
        except BaseException:
            # A stopped or failed survey says so in one line; the closing cluster's complaints are not news.
            _quiet_distributed(logging.CRITICAL)
            raise


def _quiet_distributed(level: int) -> None:
    """Distributed's loggers in this process (the scheduler's, the nannies', the client's) say nothing below
    `level`. They pass their records to the command line's handler (distributed adds its own only when imported
    before logging is set up), which LocalCluster's `silence_logs` does not reach."""
    for name in ["distributed", *(name for name in logging.root.manager.loggerDict if name.startswith("distributed."))]:
        logging.getLogger(name).setLevel(level)


@contextmanager
def _stop_signals_held() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP held back from this thread while the LocalCluster starts: the threads it
    starts, and the worker processes they start, keep them blocked for good (a terminal signals the whole
    process group; the workers are ended by the cluster's close), and so does multiprocessing's resource
    tracker, started here first (it unblocks SIGINT and SIGTERM in the thread that starts it, and ignores them
    itself). A stop signal that arrives meanwhile reaches this process when the block ends."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def sample_on_worker(share: RasterShare, params: SegmentationParams, value_ranges: dict[int, tuple[float, float]]
                     ) -> tuple[RasterSample | None, str | None]:
    """One raster's share of the fit's sample on a Dask worker with that worker's model, tried once more after
    a failure."""
    load = get_worker().plugins[PLUGIN_NAME].load
    sample, error, _ = with_retry(
        lambda: sample_raster(share, params, value_ranges, feature_extractor(params, load)), share.path)
    return sample, error


def sample_on_dask(session: DaskSession, shares: Sequence[RasterShare], params: SegmentationParams,
                   value_ranges: dict[int, tuple[float, float]], progress: Progress
                   ) -> list[tuple[RasterSample | None, str | None]]:
    """Every raster's share of the fit's sample as one task on the cluster: (its sample, None) or (None, its
    error), in the order of `shares`."""
    client = session.client
    tasks = {client.submit(sample_on_worker, share, params, value_ranges, pure=False,
                           key=f"treeseg-sample-{share.index}-{Path(share.path).name}"): number
             for number, share in enumerate(shares)}
    results: dict[int, tuple[RasterSample | None, str | None]] = {}

    def sampled(future: Future) -> None:
        results[tasks[future]] = future.result() if future.status == "finished" else (None, _error(future))
        progress.report(len(results) / len(shares), f"Sampled {len(results)} of {len(shares)} rasters on the cluster")

    _collect(client, tasks, progress, sampled)
    return [results[number] for number in range(len(shares))]


def run_on_dask(jobs: Sequence[RasterJob], session: DaskSession, progress: Progress,
                window_tiles: int) -> list[RasterOutcome]:
    """Every job on the session's cluster, a raster of more than `window_tiles` tiles in windows."""
    windowed = {index: WindowedRaster(job, windows, _staged_store(job))
                for index, job in enumerate(jobs) if (windows := window_ranges(job, window_tiles))}
    session.after_close.callback(_remove_staged_stores, list(windowed.values()))
    return _run(session.client, jobs, windowed, progress)


def _run(client: Client, jobs: Sequence[RasterJob], windowed: dict[int, WindowedRaster],
         progress: Progress) -> list[RasterOutcome]:
    """Submit the windows and whole rasters, a windowed raster's last task once its windows are in; collect."""
    tasks: dict[Future, tuple[int, int | None]] = {}
    for index, job in enumerate(jobs):
        name = Path(job.input_path).name
        if index in windowed:
            raster = windowed[index]
            for number, window in enumerate(raster.windows):
                tasks[client.submit(extract_window_on_worker, job, window, str(raster.folder), pure=False,
                                    key=f"treeseg-{index}-window-{number}-{name}")] = (index, number)
        else:
            tasks[client.submit(segment_on_worker, job, pure=False, key=f"treeseg-{index}-{name}")] = (index, None)
    total = len(jobs) + sum(len(raster.windows) for raster in windowed.values())
    submitted = time.perf_counter()
    outcomes: dict[int, RasterOutcome] = {}

    def finished(future: Future) -> Future | None:
        index, number = tasks[future]
        raster, seconds = windowed.get(index), time.perf_counter() - submitted
        last = None
        if number is None:
            outcomes[index] = _outcome(jobs[index], future, seconds, len(raster.windows) if raster else 0)
        elif (last := _window_done(client, raster, number, future, seconds, outcomes, index)) is not None:
            tasks[last] = (index, None)
        if raster and index in outcomes:
            shutil.rmtree(raster.folder, ignore_errors=True)
        windows = sum(len(raster.done) for raster in windowed.values())
        progress.report((len(outcomes) + windows) / total,
                        f"{len(outcomes)} of {len(jobs)} rasters done on the cluster"
                        + (f" ({windows} of {total - len(jobs)} windows)" if windowed else ""))
        return last

    _collect(client, tasks, progress, finished)
    return [outcomes[index] for index in range(len(jobs))]


def _window_done(client: Client, raster: WindowedRaster, number: int, future: Future, seconds: float,
                 outcomes: dict[int, RasterOutcome], index: int) -> Future | None:
    """Record a finished window; when it was the raster's last, submit the raster's segmentation (returned)
    or, if a window failed, report the raster."""
    raster.done[number] = (future.result() if future.status == "finished"
                           else WindowOutcome(None, _error(future)))
    if len(raster.done) < len(raster.windows):
        return None
    job = raster.job
    error = raster.failure()
    if error is None:
        try:
            raster.complete_store()
        except (OSError, TreesegError) as failure:  # a full or failing disk
            error = f"the features of its windows could not be joined: {failure}"
    if error is not None:
        outcomes[index] = RasterOutcome(job.input_path, job.params.output_stem, None, error, ATTEMPTS, seconds,
                                        len(raster.windows))
        return None
    return client.submit(segment_on_worker, replace(job, features=str(raster.folder)), pure=False,
                         key=f"treeseg-{index}-{Path(job.input_path).name}")


def _staged_store(job: RasterJob) -> Path:
    """The folder the windows of a raster write their features into, beside its outputs (a shared filesystem)."""
    folder = Path(job.params.output_dir) / f".{job.params.output_stem}.treeseg-windows"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _remove_staged_stores(rasters: Sequence[WindowedRaster]) -> None:
    for raster in rasters:
        shutil.rmtree(raster.folder, ignore_errors=True)


def _collect(client: Client, tasks: dict[Future, object], progress: Progress,
             finished: Callable[[Future], Future | None]) -> None:
    """`finished(future)` for each task as it ends (a task it returns, already in `tasks`, is waited for too); a
    stop request is seen within POLL_S; on a stop or any error every task in `tasks` is cancelled."""
    try:
        pending = as_completed(list(tasks))
        while not pending.is_empty():
            progress.check()
            for future in pending.next_batch(block=False) or _wait(pending):
                if (follow_up := finished(future)) is not None:
                    pending.add(follow_up)
    except BaseException:
        client.cancel(list(tasks))
        raise


def _wait(pending: as_completed) -> list:
    """Nothing finished yet: wait a little (so a stop request is seen within POLL_S)."""
    time.sleep(POLL_S)
    return []


def _error(future: Future) -> str:
    """The error of a task the cluster could not run (e.g. its worker died)."""
    error = future.exception()
    return str(error) or type(error).__name__


def _outcome(job: RasterJob, future: Future, seconds: float, windows: int) -> RasterOutcome:
    """The worker's outcome, or the error of a task the cluster could not run (e.g. its worker died)."""
    if future.status == "finished":
        return replace(future.result(), windows=windows)
    return RasterOutcome(job.input_path, job.params.output_stem, None, _error(future), 1, seconds, windows)
