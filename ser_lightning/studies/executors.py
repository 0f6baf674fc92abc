"""Where a study's work runs: here, one task after another; in worker processes; or as Ray tasks.

``cv`` runs its runs (``run.fold.run_fold``) and ``tune`` its trials through the same executors: a
study submits tasks (a key, a module-level function and its arguments) and takes them back as they
finish (``Finished``: the key with the function's result, or the error that stopped it). Parallel
tasks get ``threads_per_worker`` torch threads each, so that several processes on one machine do not
oversubscribe its cores; a task whose worker died is started again, up to ``attempts`` times in all.

Ray: without an address (``--ray_address`` or ``$RAY_ADDRESS``) a private local instance is started
that listens on 127.0.0.1 only; with one, the tasks go to that existing cluster (started by the user
with ``ray start --head``), which must have this package installed on every node and see the data
and output folders at the same paths.
"""
from __future__ import annotations

import argparse
import os
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

from ser_lightning.errors import DataError
from ser_lightning.runtime import configure_worker

EXECUTORS = ("local", "processes", "ray")
KIND_HELP = {"local": "one {unit} after another in this process (default)",
             "processes": "parallel worker processes on this machine",
             "ray": "Ray tasks on a local or existing cluster"}


@dataclass(frozen=True)
class ExecutorOptions:
    """Which executor a study uses, and how wide (``--executor``, ``--workers``, ``--threads_per_worker``, ...)."""

    kind: str = "local"
    workers: int = 2
    threads_per_worker: int = 1
    gpus_per_worker: float = 0.0
    ray_address: str | None = None


def add_executor_arguments(parser: argparse.ArgumentParser, kinds: Sequence[str], unit: str) -> None:
    """The executor options of a study command whose tasks are ``unit``s (run, trial), on the executors ``kinds``."""
    parser.add_argument("--executor", choices=list(kinds), default="local",
                        help="; ".join(f"{kind}: {KIND_HELP[kind].format(unit=unit)}" for kind in kinds))
    parser.add_argument("--workers", type=int, default=2,
                        help=f"parallel {unit}s for {'/'.join(kinds[1:])} (default 2)")
    parser.add_argument("--threads_per_worker", type=int, default=1,
                        help=f"torch threads per parallel {unit} (default 1: no oversubscription)")
    parser.add_argument("--ray_address", help="an existing Ray cluster (default: $RAY_ADDRESS, else a local one)")


def executor_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ExecutorOptions:
    """The options ``add_executor_arguments`` parsed, checked (the parser's error names a bad one)."""
    if args.workers < 1 or args.threads_per_worker < 1:
        parser.error("--workers and --threads_per_worker must be >= 1")
    return ExecutorOptions(args.executor, args.workers, args.threads_per_worker,
                           getattr(args, "gpus_per_worker", 0.0), args.ray_address)


class WorkerDied(DataError):
    """A task's worker process died every time it was started."""


@dataclass(frozen=True)
class Finished:
    """A task taken back: its key, and the function's result or the error that stopped it."""

    key: Hashable
    result: Any = None
    error: BaseException | None = None


def _in_worker(threads: int, work: Callable[..., Any], *args: Any) -> Any:
    configure_worker(threads)
    return work(*args)


class Executor:
    """Runs submitted tasks: ``submit(key, work, *args)``, then ``next_finished()`` for each, in the order they end.

    ``busy``: tasks submitted and not yet taken back; ``running``: how many of them run now; ``capacity``: how many
    can run at once; ``where``: where they run, for the study's progress lines (None: here, one at a time).
    """

    where: str | None = None
    capacity = 1
    pending: Any  # the tasks not yet taken back, as the executor holds them

    @property
    def busy(self) -> int:
        return len(self.pending)

    @property
    def running(self) -> int:
        return min(self.capacity, self.busy)

    def submit(self, key: Hashable, work: Callable[..., Any], *args: Any) -> None:
        raise NotImplementedError

    def next_finished(self) -> Finished:
        raise NotImplementedError

    def close(self) -> None:
        self.pending.clear()


class LocalExecutor(Executor):
    """One task after another in this process, each run when it is taken back (``on_start`` is told first)."""

    def __init__(self, on_start: Callable[[Hashable], None] | None = None) -> None:
        self.pending: deque[tuple[Hashable, Callable[..., Any], tuple]] = deque()
        self.on_start = on_start

    @property
    def running(self) -> int:
        return 0  # a task runs only inside next_finished

    def submit(self, key: Hashable, work: Callable[..., Any], *args: Any) -> None:
        self.pending.append((key, work, args))

    def next_finished(self) -> Finished:
        key, work, args = self.pending.popleft()
        if self.on_start is not None:
            self.on_start(key)
        try:
            return Finished(key, work(*args))
        except Exception as error:  # noqa: BLE001 - the study decides what a failed task means
            return Finished(key, error=error)


class ProcessExecutor(Executor):
    """Worker processes on this machine (spawned: no state shared with this process). A worker that dies breaks
    its pool: the tasks it held are started again in a new one."""

    def __init__(self, options: ExecutorOptions, attempts: int) -> None:
        self.options, self.attempts = options, attempts
        self.where, self.capacity = f"{options.workers} worker processes", options.workers
        self.pool: ProcessPoolExecutor | None = None
        self.pending: dict[Future, tuple[Hashable, Callable[..., Any], tuple, ProcessPoolExecutor]] = {}
        self.started: Counter[Hashable] = Counter()

    def submit(self, key: Hashable, work: Callable[..., Any], *args: Any) -> None:
        if self.pool is None:
            self.pool = ProcessPoolExecutor(max_workers=self.options.workers, mp_context=get_context("spawn"))
        self.started[key] += 1
        future = self.pool.submit(_in_worker, self.options.threads_per_worker, work, *args)
        self.pending[future] = (key, work, args, self.pool)

    def next_finished(self) -> Finished:
        while True:
            done, _ = wait(self.pending, return_when=FIRST_COMPLETED)
            future = next(iter(done))
            key, work, args, pool = self.pending.pop(future)
            try:
                return Finished(key, future.result())
            except BrokenProcessPool:
                if pool is self.pool:
                    self.pool.shutdown()
                    self.pool = None
                if self.started[key] >= self.attempts:
                    return Finished(key, error=WorkerDied(f"its worker died {self.attempts} times"))
                self.submit(key, work, *args)
            except Exception as error:  # noqa: BLE001 - the study decides what a failed task means
                return Finished(key, error=error)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
        self.pending.clear()


def start_ray(options: ExecutorOptions) -> None:
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


class RayExecutor(Executor):
    """Ray tasks with declared resources; Ray starts a task again when its worker dies."""

    where = "Ray"

    def __init__(self, options: ExecutorOptions, attempts: int) -> None:
        import ray

        start_ray(options)
        self.threads, self.capacity = options.threads_per_worker, options.workers
        self.task = ray.remote(num_cpus=options.threads_per_worker, num_gpus=options.gpus_per_worker,
                               max_retries=attempts - 1)(_in_worker)
        self.pending: dict[Any, Hashable] = {}  # Ray's reference to a task's result -> its key

    def submit(self, key: Hashable, work: Callable[..., Any], *args: Any) -> None:
        self.pending[self.task.remote(self.threads, work, *args)] = key

    def next_finished(self) -> Finished:
        import ray

        finished, _ = ray.wait(list(self.pending), num_returns=1)
        key = self.pending.pop(finished[0])
        try:
            return Finished(key, ray.get(finished[0]))
        except Exception as error:  # noqa: BLE001 - the task raised, or its worker died more than max_retries times
            return Finished(key, error=error)


@contextmanager
def open_executor(options: ExecutorOptions, *, attempts: int = 1,
                  on_start: Callable[[Hashable], None] | None = None) -> Iterator[Executor]:
    """The executor ``options`` choose (``on_start``: told when the local executor starts a task), closed after."""
    executor: Executor
    if options.kind == "processes":
        executor = ProcessExecutor(options, attempts)
    elif options.kind == "ray":
        executor = RayExecutor(options, attempts)
    else:
        executor = LocalExecutor(on_start)
    try:
        yield executor
    finally:
        executor.close()
