"""Where the runs of a study execute: here, one after another; in worker processes; or as Ray tasks.

Every executor runs ``cv.run_fold`` on the runs whose ``result.json`` does not exist yet, so a study
that is stopped and started again skips what is finished, whichever executor ran it. A run's result
is written atomically by the worker that ran it; a run whose worker died is run again (an
interrupted run resumes from its ``last.ckpt``). Parallel runs get ``threads_per_worker`` torch
threads each, so that several processes on one machine do not oversubscribe its cores.

Ray: without an address (``--ray_address`` or ``$RAY_ADDRESS``) a private local instance is started
that listens on 127.0.0.1 only; with one, the runs go to that existing cluster (started by the user
with ``ray start --head``), which must have this package installed on every node and see the data
and output folders at the same paths.
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context

from ser_lightning.errors import DataError, UsageError
from ser_lightning.evaluation.cv import RunSpec, load_result, run_fold
from ser_lightning.runtime import configure_worker

MAX_ATTEMPTS = 3
"""A run whose worker dies is started again up to this many times in all."""


class Progress:
    """The study-level progress line: runs done, running, failed, elapsed time and ETA."""

    def __init__(self, runs: Sequence[RunSpec]) -> None:
        self.total, self.done, self.failed, self.running = len(runs), 0, 0, 0
        self.started, self.durations = time.monotonic(), []

    def line(self, event: str) -> str:
        elapsed = time.monotonic() - self.started
        left = self.total - self.done - self.failed
        eta = ""
        if self.durations and left:
            parallel = max(1, self.running)
            eta = f", ETA {_clock(sum(self.durations) / len(self.durations) * left / parallel)}"
        return (f"[study] {event} | {self.done}/{self.total} done, {self.running} running, {self.failed} failed, "
                f"elapsed {_clock(elapsed)}{eta}")

    def print(self, event: str) -> None:
        print(self.line(event), flush=True)

    def finished(self, spec: RunSpec, result: dict | None, error: Exception | None, remaining: int,
                 workers: int) -> None:
        """Count a run that ended (with a result, or the error that stopped it) and print the line."""
        self.running = min(workers, remaining)
        if result is None:
            self.failed += 1
            self.print(f"{_name(spec)}: FAILED ({type(error).__name__}: {error})")
            return
        self.done += 1
        self.durations.append(result.get("run_seconds", result["wall_seconds"]))
        self.print(f"{_name(spec)}: {_summary(result)}")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _name(spec: RunSpec) -> str:
    return f"fold {spec.fold}" + (f" repeat {spec.repeat}" if spec.repeat else "")


def _summary(result: dict) -> str:
    text = f"test UA {100 * result['metrics']['UA']:.1f} %"
    baseline = result.get("baselines", {}).get("pooled")
    return text + (f" (baseline {100 * baseline['metrics']['UA']:.1f} %)" if baseline else "")


def pending_runs(runs: Sequence[RunSpec], progress: Progress) -> list[RunSpec]:
    """The runs without a result yet; finished ones are reported as skipped."""
    pending = []
    for spec in runs:
        result = load_result(spec.folder)
        if result is None:
            pending.append(spec)
        else:
            progress.done += 1
            progress.print(f"{_name(spec)}: complete, skipped ({_summary(result)})")
    return pending


def _run_in_worker(spec: RunSpec, threads: int) -> dict:
    configure_worker(threads)
    return run_fold(spec)


def run_local(runs: Sequence[RunSpec], options: argparse.Namespace) -> None:
    progress = Progress(runs)
    for spec in pending_runs(runs, progress):
        progress.running = 1
        progress.print(f"{_name(spec)}: running")
        progress.finished(spec, run_fold(spec), None, 0, 1)


def run_processes(runs: Sequence[RunSpec], options: argparse.Namespace) -> None:
    """Worker processes on this machine (spawned: no state shared with this process)."""
    progress = Progress(runs)
    todo = pending_runs(runs, progress)
    attempts: dict[RunSpec, int] = {}
    while todo:
        with ProcessPoolExecutor(max_workers=options.workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_run_in_worker, spec, options.threads_per_worker): spec for spec in todo}
            for spec in todo:
                attempts[spec] = attempts.get(spec, 0) + 1
            todo = []
            progress.running = min(options.workers, len(futures))
            progress.print(f"{len(futures)} run(s) submitted to {options.workers} worker processes")
            remaining = set(futures)
            while remaining:
                finished, remaining = wait(remaining, return_when=FIRST_COMPLETED)
                for future in finished:
                    spec = futures[future]
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        todo.append(spec)  # a worker died: run it again in a new pool
                        continue
                    except Exception as error:  # noqa: BLE001 - the run failed; the study goes on
                        progress.finished(spec, None, error, len(remaining), options.workers)
                        continue
                    progress.finished(spec, result, None, len(remaining), options.workers)
        given_up = [spec for spec in todo if attempts[spec] >= MAX_ATTEMPTS]
        for spec in given_up:
            progress.failed += 1
            progress.print(f"{_name(spec)}: FAILED (its worker died {MAX_ATTEMPTS} times)")
        todo = [spec for spec in todo if spec not in given_up]
    _raise_if_failed(progress)


def start_ray(options: argparse.Namespace) -> None:
    """Connect to the cluster at --ray_address / $RAY_ADDRESS, or start a private local instance on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    address = options.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=options.workers * options.threads_per_worker, include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=False)


def run_ray(runs: Sequence[RunSpec], options: argparse.Namespace) -> None:
    """Ray tasks with declared resources; Ray retries a task whose worker died."""
    import ray

    start_ray(options)
    progress = Progress(runs)
    todo = pending_runs(runs, progress)
    task = ray.remote(num_cpus=options.threads_per_worker, num_gpus=options.gpus_per_worker,
                      max_retries=MAX_ATTEMPTS - 1)(_run_in_worker)
    futures = {task.remote(spec, options.threads_per_worker): spec for spec in todo}
    progress.running = min(options.workers, len(futures))
    if futures:
        progress.print(f"{len(futures)} run(s) submitted to Ray")
    remaining = list(futures)
    while remaining:
        finished, remaining = ray.wait(remaining, num_returns=1)
        spec = futures[finished[0]]
        try:
            result = ray.get(finished[0])
        except Exception as error:  # noqa: BLE001 - the task raised, or its worker died more than max_retries times
            progress.finished(spec, None, error, len(remaining), options.workers)
            continue
        progress.finished(spec, result, None, len(remaining), options.workers)
    _raise_if_failed(progress)


def _raise_if_failed(progress: Progress) -> None:
    if progress.failed:
        raise DataError(f"[study] {progress.failed} run(s) failed; rerun the same command to retry them "
                        "(finished runs are kept)")


EXECUTORS: dict[str, Callable[[Sequence[RunSpec], argparse.Namespace], None]] = {
    "local": run_local, "processes": run_processes, "ray": run_ray,
}


def run_study(runs: Sequence[RunSpec], options: argparse.Namespace) -> None:
    """Run every unfinished run of the study with the chosen executor."""
    if options.workers < 1 or options.threads_per_worker < 1:
        raise UsageError("cv: --workers and --threads_per_worker must be >= 1")
    EXECUTORS[options.executor](runs, options)
