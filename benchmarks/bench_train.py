"""Training throughput of the seed1d and zhang2d models with the fused vs the reference attention.

Each training step (forward, cross-entropy, backward, Adam step) runs on the same seeded synthetic
feature batches (log-mel 64 x ~300 frames for seed1d, spectrogram 200 x ~300 for zhang2d, ragged
lengths) from the same initial weights for both backends, interleaved so both see the same load.
Throughput = batch size / median step time. (The time of whole epochs through the command line,
against this step time, is `benchmarks/bench_fit.py`.)

`--precision bf16-mixed` runs forward and loss under torch.autocast(bfloat16), as Lightning's
bf16-mixed does: on CUDA the fused attention then runs in bfloat16; the CPU kernels have no
bfloat16, so on CPU only the reference runs.

    python benchmarks/bench_train.py [--device cpu|cuda] [--precision 32|bf16-mixed] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common import (CPU_MEMORY_NOTE, environment, format_table, goal, interleaved_medians, peak_memory_bytes,
                    print_environment, print_goals, require_positive, resolve_device, set_threads, write_json)
from ser_lightning.models.seed1d import Seed1D
from ser_lightning.ops import fused, fused_available
from ser_lightning.padding import length_mask
from ser_lightning.models.zhang2d import Zhang2D

NUM_CLASSES = 4
FEATURES = {"seed1d": 64, "zhang2d": 200}  # log-mel bands / spectrogram bins
BACKENDS = ("reference", "fused")


def make_batches(arch: str, batch_size: int, frames: int, count: int, device: torch.device, seed: int) -> list[dict]:
    """`count` seeded batches of zero-padded features with ragged lengths around `frames`."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        lengths = torch.randint(int(0.8 * frames), int(1.2 * frames) + 1, (batch_size,), generator=g)
        features = torch.randn(batch_size, FEATURES[arch], int(lengths.max()), generator=g)
        features *= length_mask(lengths, features.shape[-1]).unsqueeze(1)
        labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
        batches.append({"features": features.to(device), "lengths": lengths.to(device), "labels": labels.to(device)})
    return batches


def make_model(arch: str, backend: str, zhang_width: float, device: torch.device) -> nn.Module:
    torch.manual_seed(0)  # same initial weights for every backend
    if arch == "seed1d":
        model = Seed1D(FEATURES[arch], NUM_CLASSES, backend=backend)
    else:
        model = Zhang2D(FEATURES[arch], NUM_CLASSES, width=zhang_width, backend=backend)
    return model.to(device).train()


def step_fn(model: nn.Module, batches: list[dict], precision: str = "32") -> Callable[[], None]:
    """One Adam training step per call, cycling through the batches (forward and loss under bfloat16
    autocast for precision "bf16-mixed")."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    cycle = itertools.cycle(batches)
    device_type = next(model.parameters()).device.type

    def step() -> None:
        batch = next(cycle)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            output = model(batch["features"], batch["lengths"])
            loss = F.cross_entropy(output.logits, batch["labels"])
        loss.backward()
        optimizer.step()

    return step


def bench_arch(arch: str, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    batches = make_batches(arch, args.batch_size, args.frames, args.batches, device, args.seed)
    models = {backend: make_model(arch, backend, args.zhang_width, device) for backend in args.backends}
    with torch.no_grad():
        positions = int(models["reference"](batches[0]["features"], batches[0]["lengths"]).alpha.shape[1])
    steps = {backend: step_fn(model, batches, args.precision) for backend, model in models.items()}
    medians = interleaved_medians(steps, device, args.min_run_time, args.repeats, args.rounds)
    result: dict[str, Any] = {"arch": arch, "precision": args.precision, "batch_size": args.batch_size,
                              "features": FEATURES[arch],
                              "frames_mean": float(torch.cat([b["lengths"] for b in batches]).float().mean()),
                              "attention_positions_max": positions, "backends": {}}
    if arch == "zhang2d":
        result["width"] = args.zhang_width
    for backend in args.backends:
        result["backends"][backend] = {
            "step_s": medians[backend][0],
            "step_min_s": medians[backend][1],
            "utterances_per_s": args.batch_size / medians[backend][0],
            "memory_bytes": peak_memory_bytes(
                steps[backend], device, [*models[backend].parameters(), *(t for b in batches for t in b.values())]
            ),
        }
    ref, fused = result["backends"]["reference"], result["backends"].get("fused")
    result["throughput_ratio"] = fused["utterances_per_s"] / ref["utterances_per_s"] if fused else None
    result["memory_ratio"] = fused["memory_bytes"] / ref["memory_bytes"] if fused else None
    return result


def print_results(results: list[dict[str, Any]], device: torch.device) -> None:
    rows = []
    for r in results:
        shape = f"{r['batch_size']}x{r['features']}x~{r['frames_mean']:.0f}"
        for backend, e in r["backends"].items():
            fused = backend == "fused"
            ratio = r["throughput_ratio"] if fused else 1.0
            memory = r["memory_ratio"] if fused else 1.0
            rows.append([r["arch"] + (f" (width {r['width']})" if "width" in r else ""), shape,
                         r["attention_positions_max"], backend, f"{e['step_s'] * 1e3:.1f}", f"{e['step_min_s'] * 1e3:.1f}",
                         f"{e['utterances_per_s']:.1f}", "-" if ratio is None else f"{ratio:.2f}",
                         f"{e['memory_bytes'] / 2**20:.1f}", "-" if memory is None else f"{memory:.2f}"])
    print(format_table(["model", "batch (BxFxN)", "attn L", "backend", "step ms", "best ms", "utt/s", "x reference",
                        "mem MiB", "mem x ref"], rows))
    print("step ms = median, best ms = fastest timed block (less sensitive to other load); "
          "x reference = fused throughput / reference throughput (from medians); "
          + (CPU_MEMORY_NOTE + ", for one training step" if device.type == "cpu"
             else "CUDA memory = torch.cuda.max_memory_allocated during one training step"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--archs", nargs="+", choices=("seed1d", "zhang2d"), default=["seed1d", "zhang2d"])
    parser.add_argument("--quick", action="store_true", help="smoke test: short timing runs")
    parser.add_argument("--precision", choices=("32", "bf16-mixed"), default="32",
                        help="32 (default) or bf16-mixed: forward and loss under bfloat16 autocast")
    parser.add_argument("--zhang-width", type=float, default=None,
                        help="zhang2d channel multiplier (default 0.25 on CPU, 1.0 on CUDA)")
    parser.add_argument("--batch-size", type=int, default=32, help="utterances per step (default 32, as the demo)")
    parser.add_argument("--frames", type=int, default=300, help="typical frames per utterance (lengths 0.8x-1.2x)")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="CPU: seconds of timing per backend, split over the rounds (default 4.0, --quick 0.5)")
    parser.add_argument("--repeats", type=int, default=None, help="CUDA: timed steps (default 50, --quick 10)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 10, --quick 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    device = resolve_device(args.device)
    set_threads(args.threads)
    for name, quick, full in (("min_run_time", 0.5, 4.0), ("repeats", 10, 50), ("rounds", 2, 10)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.zhang_width is None:
        args.zhang_width = 0.25 if device.type == "cpu" else 1.0
    require_positive(args, "batch_size", "frames", "batches", "zhang_width", "min_run_time", "repeats", "rounds")

    env = environment(device)
    env["precision"] = args.precision
    print_environment(env)
    print(f"precision: {args.precision}")
    args.backends = list(BACKENDS)
    if not fused_available(device):
        print(f"fused: unavailable ({fused.LOAD_ERROR or 'the extension has no kernel for ' + device.type})")
        args.backends.remove("fused")
    elif device.type == "cpu" and args.precision == "bf16-mixed":
        print("fused: unavailable (the CPU kernels have no bfloat16)")
        args.backends.remove("fused")
    results = []
    for arch in args.archs:
        print(f"... {arch}", flush=True)
        results.append(bench_arch(arch, device, args))
    print()
    print_results(results, device)
    goals = []
    if device.type == "cpu":
        seed = next((r for r in results if r["arch"] == "seed1d"), None)
        goals.append(goal("CPU training: seed1d fused >= 1.3x reference throughput",
                          seed["throughput_ratio"] if seed else None, 1.3))
        print_goals(goals)
    write_json(args.json, {"benchmark": "train", "quick": args.quick, "environment": env, "results": results,
                           "memory_measure": CPU_MEMORY_NOTE if device.type == "cpu"
                           else "torch.cuda.max_memory_allocated", "goals": goals})


if __name__ == "__main__":
    main()
