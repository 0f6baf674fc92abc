"""Attention pooling: eager reference vs torch.compile(reference) vs the fused operator.

For every shape (B, L, C, D) it times the forward (under no_grad) and forward+backward (gradients
of a, W, b, u from random output gradients of both context and alpha) of each contender on the
same inputs (float32 by default, ragged seeded lengths in 1..L, the longest = L), with the same
thread count, and reports medians, speed-ups, memory, the compile time of torch.compile and, on
CUDA, the achieved bandwidth against the device's peak under the bytes model of `minimal_bytes`.
Speed-up "x eager" = eager time / this time (> 1 is faster); "x compiled" likewise.

On CPU the fused kernels run the instruction-set path in use (reported at the top; the
SER_LIGHTNING_CPU_CAPABILITY environment variable picks it); `--cpu-paths all` times every path this
CPU supports side by side, as contenders fused-avx512, fused-avx2, fused-default.

    python benchmarks/bench_attention.py [--device cpu|cuda|all] [--quick] [--no-compile]
                                         [--compile-shapes SHAPE ...] [--cpu-paths all] [--json out.json]

Each shape compiles afresh (a cold compile of forward and backward, seconds each on CUDA);
`--compile-shapes` limits the torch.compile contender to some shapes (the others report "-" against it).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common import (CPU_MEMORY_NOTE, environment, format_table, goal, interleaved_medians, peak_memory_bytes,
                    print_environment, print_goals, require_positive, resolve_device, set_threads, write_json)
from ser_lightning.ops import attention_pool, attention_pool_reference, cpu_capabilities, cpu_capability, set_cpu_capability

SHAPES: dict[str, tuple[int, int, int, int]] = {  # name: (B, L, C, D)
    "seed1d": (51, 4, 30, 30),
    "logmel-1d": (64, 75, 30, 30),
    "zhang2d": (32, 48, 256, 256),
    "long": (16, 2048, 256, 128),
    "large": (256, 4096, 256, 128),
}
CUDA_ONLY = ("large",)
QUICK_SHAPES = ("seed1d", "logmel-1d")
SMALL_SHAPES = ("seed1d", "logmel-1d")
LAM = 0.8

# Peak memory bandwidth in GB/s (vendor figures), matched by substring of the device name in order.
PEAK_BANDWIDTH_GBS = (
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("GH200", 4000.0),
    ("H200", 4800.0),
    ("H100", 3350.0),  # SXM
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB", 1935.0),  # PCIe
    ("A100", 1555.0),  # 40 GB
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("V100", 900.0),
    ("T4", 320.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
)

Contender = Callable[..., tuple[Tensor, Tensor]]


def minimal_bytes(shape: tuple[int, int, int, int], element_size: int, backward: bool) -> int:
    """Bytes any implementation must move, with the activation tanh(W a + b) (B, L, D) never stored.

    Forward: read a (B L C), W (D C), b, u (D each), lengths (B int64); write context (B C), alpha (B L).
    Backward: read a again (to recompute the activation), W, b, u, lengths, the saved alpha (B L) and the
    incoming gradients of context (B C) and alpha (B L); write da (B L C), dW (D C), db, du (D each).
    Forward+backward is the sum of the two.
    """
    b, l, c, d = shape
    forward = element_size * (b * l * c + d * c + 2 * d + b * c + b * l) + 8 * b
    if not backward:
        return forward
    grads = element_size * (b * l * c + d * c + 2 * d + b * l + b * c + b * l + b * l * c + d * c + 2 * d) + 8 * b
    return forward + grads


def peak_bandwidth_gbs(name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    for key, value in PEAK_BANDWIDTH_GBS:
        if key.lower() in name.lower():
            return value
    return None


def make_inputs(shape: tuple[int, int, int, int], device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, Any]:
    """Seeded inputs shared by every contender: a, W, b, u, ragged lengths and output gradients."""
    b, l, c, d = shape
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, l + 1, (b,), generator=g)
    lengths[0] = l  # a padded batch is as long as its longest row
    tensors = {
        "a": torch.randn(b, l, c, generator=g),
        "weight": torch.randn(d, c, generator=g) / c**0.5,
        "bias": 0.1 * torch.randn(d, generator=g),
        "u": torch.randn(d, generator=g) / d**0.5,
        "grad_context": torch.randn(b, c, generator=g),
        "grad_alpha": torch.randn(b, l, generator=g),
    }
    out = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
    out["lengths"] = lengths.to(device)
    return out


def forward_fn(fn: Contender, x: dict[str, Any]) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return fn(x["a"], x["weight"], x["bias"], x["u"], LAM, x["lengths"])

    return run


def forward_backward_fn(fn: Contender, x: dict[str, Any]) -> Callable[[], Any]:
    params = [x[k].detach().clone().requires_grad_() for k in ("a", "weight", "bias", "u")]

    def run() -> Any:
        context, alpha = fn(*params, LAM, x["lengths"])
        return torch.autograd.grad((context, alpha), params, (x["grad_context"], x["grad_alpha"]))

    run.inputs = [*params, x["lengths"]]  # what the caller holds anyway (left out of the memory measure)
    return run


def max_abs_diff(x: tuple[Tensor, ...], y: tuple[Tensor, ...]) -> float:
    return max(float((p.double() - q.double()).abs().max()) for p, q in zip(x, y))


def fused_paths(device: torch.device, requested: list[str]) -> dict[str, str | None]:
    """Fused contender label -> the CPU instruction-set path it runs on (None on CUDA)."""
    if device.type != "cpu":
        return {"fused": None}
    if requested == ["active"]:
        return {"fused": cpu_capability()}
    names = cpu_capabilities() if requested == ["all"] else requested
    unknown = [name for name in names if name not in cpu_capabilities()]
    if unknown:
        raise SystemExit(f"--cpu-paths: this CPU cannot run {unknown}; it runs {cpu_capabilities()}")
    return {f"fused-{name}": name for name in names}


def contenders(
    device: torch.device, dtype: torch.dtype, compile_: bool, paths: dict[str, str | None]
) -> tuple[dict[str, Contender | None], dict[str, str]]:
    """name -> function (None for torch.compile: built per shape) and name -> reason it is skipped."""
    found: dict[str, Contender | None] = {"eager": functools.partial(attention_pool, backend="reference")}
    skipped: dict[str, str] = {}
    if compile_:
        found["compiled"] = None
    else:
        skipped["compiled"] = "--no-compile"
    probe = make_inputs((1, 1, 1, 1), device, dtype, 0)
    try:  # the fused backend raises RuntimeError saying why when it cannot run on this device/dtype
        attention_pool(probe["a"], probe["weight"], probe["bias"], probe["u"], LAM, backend="fused")
        for label in paths:
            found[label] = functools.partial(attention_pool, backend="fused")
    except RuntimeError as err:
        skipped["fused"] = str(err)
    return found, skipped


def on_path(path: str | None) -> Any:
    """A context running the fused CPU kernels on `path` (no-op for None)."""
    return contextlib.nullcontext() if path is None else set_cpu_capability(path)


def print_profile(title: str, fn: Callable[[], Any], device: torch.device, calls: int = 20) -> None:
    """Where the time goes: torch.profiler's operator table for `calls` calls of `fn`."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the profiler's notice about clearing events between cycles
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(calls):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile: {title} ({calls} calls)")
    print(prof.key_averages().table(sort_by=sort_by, row_limit=12))


def bench_shape(name: str, shape: tuple[int, int, int, int], device: torch.device, dtype: torch.dtype,
                found: dict[str, Contender | None], paths: dict[str, str | None], args: argparse.Namespace,
                peak_gbs: float | None) -> dict[str, Any]:
    """Time, measure and cross-check every contender at one shape (fused ones on their CPU path)."""
    x = make_inputs(shape, device, dtype, args.seed)
    result: dict[str, Any] = {"shape": name, "B": shape[0], "L": shape[1], "C": shape[2], "D": shape[3],
                              "lengths_mean": float(x["lengths"].float().mean()), "contenders": {}}
    forward: dict[str, Callable[[], Any]] = {}
    forward_backward: dict[str, Callable[[], Any]] = {}
    for label, fn in found.items():
        entry: dict[str, Any] = {}
        if fn is None:  # torch.compile: a fresh compilation per shape, its cost timed separately
            torch._dynamo.reset()  # on-disk caches are off (see main), so this is a cold compile
            fn = torch.compile(attention_pool_reference, dynamic=False)
            start = time.perf_counter()
            forward_fn(fn, x)()
            entry["compile_forward_s"] = time.perf_counter() - start
            start = time.perf_counter()
            forward_backward_fn(fn, x)()
            entry["compile_forward_backward_s"] = time.perf_counter() - start
        forward[label], forward_backward[label] = forward_fn(fn, x), forward_backward_fn(fn, x)
        result["contenders"][label] = entry
    eager_out = forward["eager"]() + forward_backward["eager"]()
    for label, entry in result["contenders"].items():
        with on_path(paths.get(label)):
            entry["max_abs_diff_vs_eager"] = max_abs_diff(forward[label]() + forward_backward[label](), eager_out)
        if paths.get(label):
            entry["cpu_path"] = paths[label]
    setup = {label: functools.partial(set_cpu_capability, path) for label, path in paths.items() if path}
    for key, fns in (("forward_s", forward), ("forward_backward_s", forward_backward)):
        medians = interleaved_medians(fns, device, args.min_run_time, args.repeats, args.rounds, setup)
        for label, (median, best) in medians.items():
            result["contenders"][label][key] = median
            result["contenders"][label][key.removesuffix("_s") + "_min_s"] = best
    if name in (args.profile or ()):
        for label, fn in forward_backward.items():
            with on_path(paths.get(label)):
                print_profile(f"{name} {label} forward+backward", fn, device)
    for label, entry in result["contenders"].items():
        with on_path(paths.get(label)):
            entry["memory_bytes"] = peak_memory_bytes(forward_backward[label], device, forward_backward[label].inputs)
        if device.type == "cuda":
            for key, backward in (("forward", False), ("forward_backward", True)):
                gbs = minimal_bytes(shape, x["a"].element_size(), backward) / entry[f"{key}_s"] / 1e9
                entry[f"{key}_gbs"] = gbs
                entry[f"{key}_peak_fraction"] = gbs / peak_gbs if peak_gbs else None
    for entry in result["contenders"].values():  # speed-ups: other's time / this time
        for other in ("eager", "compiled"):
            base = result["contenders"].get(other)
            for key in ("forward", "forward_backward"):
                entry[f"{key}_x_{other}"] = base[f"{key}_s"] / entry[f"{key}_s"] if base else None
        entry["memory_x_eager"] = entry["memory_bytes"] / result["contenders"]["eager"]["memory_bytes"]
    return result


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_results(results: list[dict[str, Any]], device: torch.device) -> None:
    headers = ["shape", "B,L,C,D", "contender", "fwd ms", "fwd x eager", "fwd x comp",
               "f+b ms", "f+b best", "f+b x eager", "f+b x comp", "mem MiB", "mem x eager", "max|diff|"]
    if device.type == "cuda":
        headers += ["fwd GB/s", "f+b GB/s", "f+b % peak"]
    rows = []
    for r in results:
        for label, e in r["contenders"].items():
            row = [r["shape"], f"{r['B']},{r['L']},{r['C']},{r['D']}", label,
                   fmt(e["forward_s"] * 1e3, ".3f"), fmt(e["forward_x_eager"], ".2f"), fmt(e["forward_x_compiled"], ".2f"),
                   fmt(e["forward_backward_s"] * 1e3, ".3f"), fmt(e["forward_backward_min_s"] * 1e3, ".3f"),
                   fmt(e["forward_backward_x_eager"], ".2f"),
                   fmt(e["forward_backward_x_compiled"], ".2f"), fmt(e["memory_bytes"] / 2**20, ".2f"),
                   fmt(e["memory_x_eager"], ".2f"), fmt(e["max_abs_diff_vs_eager"], ".1e")]
            if device.type == "cuda":
                fraction = e["forward_backward_peak_fraction"]
                row += [fmt(e["forward_gbs"], ".0f"), fmt(e["forward_backward_gbs"], ".0f"),
                        fmt(None if fraction is None else 100 * fraction, ".1f")]
            rows.append(row)
    print(format_table(headers, rows))
    print("ms = median; f+b best = fastest timed block (less sensitive to other load); x eager / x comp = that "
          "contender's median / this median (> 1: faster); f+b = forward+backward; "
          "max|diff| = largest difference of outputs and gradients from eager")
    print(CPU_MEMORY_NOTE if device.type == "cpu" else "CUDA memory = torch.cuda.max_memory_allocated during "
          "forward+backward (inputs included)")
    compiled = [(r["shape"], r["contenders"]["compiled"]) for r in results if "compiled" in r["contenders"]]
    if compiled:
        print("\ntorch.compile(attention_pool_reference, dynamic=False), first-call time (excluded above; "
              "the first shape also pays torch.compile's one-time start-up in this process):")
        print(format_table(["shape", "forward s", "forward+backward s"],
                           [[s, f"{e['compile_forward_s']:.2f}", f"{e['compile_forward_backward_s']:.2f}"]
                            for s, e in compiled]))


def speedup(results: list[dict[str, Any]], shape: str, other: str, label: str = "fused") -> float | None:
    for r in results:
        if r["shape"] == shape and label in r["contenders"]:
            return r["contenders"][label][f"forward_backward_x_{other}"]
    return None


def memory_ratio(results: list[dict[str, Any]], shape: str, label: str = "fused") -> float | None:
    for r in results:
        if r["shape"] == shape and label in r["contenders"]:
            return r["contenders"][label]["memory_x_eager"]
    return None


def evaluate_goals(results: list[dict[str, Any]], device: torch.device,
                   paths: dict[str, str | None]) -> list[dict[str, Any]]:
    """The issue's goals (fused vs the other contender, forward+backward) from the measured numbers;
    on CPU, for each fused contender (each instruction-set path timed)."""
    goals = []
    measured = [r["shape"] for r in results]
    if device.type == "cpu":
        for label in paths:
            fused = "fused" if label == "fused" else f"fused [{paths[label]}]"
            for shape in ("seed1d", "logmel-1d"):
                goals.append(goal(f"CPU {shape}: {fused} >= 3x eager", speedup(results, shape, "eager", label), 3.0))
            for shape in ("zhang2d", "long"):
                if shape in measured:
                    goals.append(goal(f"CPU {shape}: {fused} >= 1x eager", speedup(results, shape, "eager", label),
                                      1.0))
            if "long" in measured:
                goals.append(goal(f"CPU long: {fused} memory <= 0.6x eager", memory_ratio(results, "long", label), 0.6,
                                  higher_is_better=False))
            for shape in measured:
                goals.append(goal(f"CPU {shape}: {fused} >= 1x compiled", speedup(results, shape, "compiled", label),
                                  1.0))
    else:
        for shape in SMALL_SHAPES:
            goals.append(goal(f"GPU {shape}: fused >= 3x eager", speedup(results, shape, "eager"), 3.0))
            goals.append(goal(f"GPU {shape}: fused >= 1.5x compiled", speedup(results, shape, "compiled"), 1.5))
        if "large" in measured:
            fused = next((r["contenders"].get("fused") for r in results if r["shape"] == "large"), None)
            fraction = fused["forward_backward_peak_fraction"] if fused else None
            goals.append(goal("GPU large: fused forward+backward >= 60 % of peak bandwidth",
                              None if fraction is None else 100 * fraction, 60.0))
    return goals


def run_device(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    env = environment(device)
    env["dtype"] = args.dtype
    print_environment(env)
    dtype = getattr(torch, args.dtype)
    peak_gbs = peak_bandwidth_gbs(env["device_name"], args.peak_gbs) if device.type == "cuda" else None
    if device.type == "cuda":
        print(f"peak memory bandwidth: {fmt(peak_gbs, '.0f')} GB/s"
              + (" (--peak-gbs)" if args.peak_gbs else " (table in this script; pass --peak-gbs if unknown)"))
    paths = fused_paths(device, args.cpu_paths)
    found, skipped = contenders(device, dtype, args.compile, paths)
    paths = {label: path for label, path in paths.items() if label in found}
    for label, reason in skipped.items():
        print(f"{label}: unavailable ({reason})")
    names = args.shapes or (QUICK_SHAPES if args.quick else list(SHAPES))
    if "compiled" in found and args.compile_shapes is not None:
        print(f"compiled: at {', '.join(args.compile_shapes)} only (--compile-shapes)")
    results = []
    for name in names:
        if name in CUDA_ONLY and device.type != "cuda":
            print(f"{name}: skipped (CUDA only)")
            continue
        print(f"... {name} {SHAPES[name]}", flush=True)
        at_shape = {label: fn for label, fn in found.items()
                    if label != "compiled" or args.compile_shapes is None or name in args.compile_shapes}
        with on_path(env["cpu_capability"] if device.type == "cpu" and paths else None):  # restored after
            results.append(bench_shape(name, SHAPES[name], device, dtype, at_shape, paths, args, peak_gbs))
    print()
    print_results(results, device)
    goals = evaluate_goals(results, device, paths)
    print_goals(goals)
    return {"environment": env, "peak_bandwidth_gbs": peak_gbs, "skipped": skipped,
            "memory_measure": CPU_MEMORY_NOTE if device.type == "cpu" else "torch.cuda.max_memory_allocated",
            "results": results, "goals": goals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="where to run; 'all' = CPU, plus CUDA when present (default)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="shapes to run (default: all; 'large' runs on CUDA only)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: shapes {', '.join(QUICK_SHAPES)} and short timing runs")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile contender")
    parser.add_argument("--compile-shapes", nargs="+", choices=list(SHAPES), metavar="SHAPE",
                        help="run the torch.compile contender at these shapes only (default: every shape; each "
                             "shape is a cold compile)")
    parser.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16"), default="float32",
                        help="element type of every input (default float32)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for every contender (default: torch's)")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="CPU: seconds of timing per contender and pass, split over the rounds "
                             "(default 2.0, --quick 0.1)")
    parser.add_argument("--repeats", type=int, default=None, help="CUDA: timed calls (default 100, --quick 10)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds over the contenders (default 20, --quick 4)")
    parser.add_argument("--cpu-paths", nargs="+", default=["active"], metavar="PATH",
                        help="CPU: instruction-set paths of the fused kernels to time side by side: 'active' "
                             "(default: the path in use, contender 'fused'), 'all' (every path this CPU runs) or "
                             "names (avx512, avx2, default), as contenders 'fused-<path>'")
    parser.add_argument("--peak-gbs", type=float, help="CUDA: the device's peak memory bandwidth in GB/s")
    parser.add_argument("--profile", nargs="+", choices=list(SHAPES), metavar="SHAPE",
                        help="also print torch.profiler's operator table of forward+backward at these shapes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.min_run_time is None:
        args.min_run_time = 0.1 if args.quick else 2.0
    if args.repeats is None:
        args.repeats = 10 if args.quick else 100
    if args.rounds is None:
        args.rounds = 4 if args.quick else 20
    require_positive(args, "min_run_time", "repeats", "rounds", "peak_gbs")
    set_threads(args.threads)
    torch._inductor.config.fx_graph_cache = False  # report the compile time, not a cache hit
    torch._functorch.config.enable_autograd_cache = False
    if args.device == "all":
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [resolve_device(args.device)]
    runs = []
    for i, device in enumerate(devices):
        if i:
            print("\n" + "=" * 80)
        runs.append(run_device(device, args))
    write_json(args.json, {"benchmark": "attention", "quick": args.quick, "runs": runs})


if __name__ == "__main__":
    main()
