"""Helpers shared by the benchmark scripts: environment, timing, memory accounting, tables, goals, JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils import benchmark

CPU_MEMORY_NOTE = ("memory = bytes kept beyond the inputs (every contender holds those): CPU, tensors saved for "
                   "backward other than the inputs (storages deduplicated); CUDA, peak allocated minus allocated before")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: printed at the top of every run and stored in the JSON."""
    from ser_lightning.ops import cpu_capabilities, cpu_capability

    return {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": cpu_capability(),  # the fused CPU kernels' instruction-set path
        "cpu_capabilities": cpu_capabilities(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "command": command_line(),
    }


def command_line() -> str:
    """The command that made the numbers, paths inside the checkout written relative to it (the JSON is committed:
    it must read the same from any clone)."""
    root = str(Path(__file__).resolve().parent.parent) + os.sep
    return " ".join(["python", *(arg.replace(root, "") for arg in sys.argv)])


def print_environment(env: dict[str, Any]) -> None:
    print(f"device: {env['device']} ({env['device_name']}), torch {env['torch']}, "
          f"threads {env['threads']}, python {env['python']}")
    if env["device"] == "cpu":
        print(f"fused CPU kernels: {env['cpu_capability'] or 'not loaded'} path "
              f"(this CPU runs: {', '.join(env['cpu_capabilities']) or '-'}; SER_LIGHTNING_CPU_CAPABILITY overrides)")
    print(f"command: {env['command']}")
    load, cores = env["load_average_1min"], env["cpu_count"]
    if load is not None and cores and load > 0.5 * cores:
        print(f"warning: load average {load:.1f} on {cores} cores before the run: other processes compete for the "
              "CPU, so timings are noisy (an intra-op parallel region can wait a whole scheduler time slice)")


QUICK_SPLIT = ("--data.num_folds=3", "--data.num_val_speakers=1")
"""The split of a smoke test's small corpus (6 speakers: too few for 5 folds of 2 validation speakers)."""


def fit_args(root_dir: Path, cache_dir: Path, epochs: int, *extra: str) -> list[str]:
    """Options of a benchmark's fit of the demo configuration: ``epochs``, logs under ``root_dir``, features
    cached in ``cache_dir``, then ``extra``."""
    return [f"--trainer.max_epochs={epochs}", f"--trainer.default_root_dir={root_dir}", f"--data.cache_dir={cache_dir}",
            *extra]


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def require_positive(args: Any, *names: str) -> None:
    """Exit with a message naming the option when a numeric option is not > 0 (None = unset, allowed)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be > 0, got {value}")


def resolve_device(name: str) -> torch.device:
    """--device cpu|cuda; a clear error when CUDA is asked for but absent."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return torch.device(name)


def interleaved_medians(fns: dict[str, Callable[[], Any]], device: torch.device, min_run_time: float,
                        repeats: int, rounds: int,
                        setup: dict[str, Callable[[], Any]] | None = None) -> dict[str, tuple[float, float]]:
    """(median, minimum) seconds per call of each function, measured in `rounds` interleaved rounds.

    Interleaving (A, B, C, A, B, C, ...) exposes every contender to the same machine load, so ratios stay
    fair on a shared machine. CPU: torch.utils.benchmark blocked_autorange (min_run_time / rounds per
    round, current thread count), over all blocks of all rounds. CUDA: CUDA events around
    each call (repeats / rounds per round) after warm-up, synchronising after each call.
    `setup[name]()`, when given, runs before each of that function's blocks, untimed (e.g. choosing
    the CPU kernels' instruction-set path).
    """
    setup = setup or {}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():  # warm-up
        setup.get(name, lambda: None)()
        for _ in range(3 if device.type == "cuda" else 1):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            setup.get(name, lambda: None)()
            if device.type == "cuda":
                times[name] += _cuda_event_times(fn, device, max(1, repeats // rounds))
            else:
                timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
                times[name] += timer.blocked_autorange(min_run_time=min_run_time / rounds).times
    return {name: (statistics.median(values), min(values)) for name, values in times.items()}


def _cuda_event_times(fn: Callable[[], Any], device: torch.device, repeats: int) -> list[float]:
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1e3)
    return times


def saved_tensor_bytes(fn: Callable[[], Any], inputs: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the tensors autograd saves for backward while `fn` runs, each storage counted once,
    leaving out the storages of `inputs`."""
    excluded = {t.untyped_storage().data_ptr() for t in inputs}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device, inputs: Sequence[torch.Tensor] = ()) -> int:
    """Memory `fn` needs beyond its inputs (see CPU_MEMORY_NOTE)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return saved_tensor_bytes(fn, inputs)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def goal(name: str, value: float | None, threshold: float, higher_is_better: bool = True) -> dict[str, Any]:
    """One goal of the checklist; `passed` is None when the value could not be measured."""
    if value is None:
        passed = None
    else:
        passed = value >= threshold if higher_is_better else value <= threshold
    return {"goal": name, "value": value, "threshold": threshold,
            "comparison": ">=" if higher_is_better else "<=", "passed": passed}


def print_goals(goals: Sequence[dict[str, Any]]) -> None:
    print("\ngoals:")
    for g in goals:
        status = {True: "PASS", False: "FAIL", None: "N/A "}[g["passed"]]
        value = "not measured" if g["value"] is None else f"{g['value']:.2f}"
        print(f"  [{status}] {g['goal']}: {value} (goal {g['comparison']} {g['threshold']:g})")


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {path}")
