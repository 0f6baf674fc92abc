"""Where a fit's time goes: an epoch's wall time against its pure training work, and a 5-fold study.

Demo epoch: ``configs/demo.yaml`` is fitted for ``--epochs`` epochs through the same code and process
settings as ``python -m ser_lightning fit`` (the data set up beforehand, so the time is the fit itself:
training, validation, logging, figures, checkpoints). An epoch's wall time is the time from one
epoch's start to the next one's (training, validation, metrics, logging, checkpoints; the median over
the epochs); the fit's one-off costs (sanity check, the figures after the last epoch) are reported
beside it. It is compared, in the same process, with the pure work of one epoch: the same training
batches of the same model and optimizer, forward, loss, backward and optimizer step in a bare loop
(the median of a few epochs).

``--cv``: ``cv --config configs/seed1d.yaml`` (5 speaker-independent folds) run as a user runs it,
in a fresh process, with ``--executor processes`` (one thread per worker, ``--workers`` workers),
against the same study as it ran before this version: either an older checkout given with
``--legacy-tree DIR`` (its extension built; run with its own command line), or else this version
with the old settings (figures every epoch, 4 attention maps, one run after another).

    python benchmarks/bench_fit.py [--epochs 30] [--threads 1] [--cv [--legacy-tree DIR]] [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from common import environment, goal, print_environment, print_goals, set_threads, write_json
from ser_lightning.runtime import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]
QUICK_DATA = ["--data.synthetic_actors=6", "--data.num_folds=3", "--data.num_val_speakers=1"]


def demo_epoch(args: argparse.Namespace, cache: Path, workdir: Path) -> dict[str, Any]:
    """Epoch wall time of the demo fit and the pure training work of the same batches."""
    from ser_lightning.lightning_cli import build_cli

    extra = QUICK_DATA if args.quick else []
    cli = build_cli([f"--trainer.max_epochs={args.epochs}", f"--trainer.default_root_dir={workdir}",
                     f"--data.cache_dir={cache}", "--trainer.enable_progress_bar=false",
                     "--trainer.enable_model_summary=false", *extra])
    trainer, module, datamodule = cli.trainer, cli.model, cli.datamodule
    datamodule.prepare_data()
    datamodule.setup("fit")
    clock = EpochClock()
    trainer.callbacks.append(clock)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    fit_s = time.perf_counter() - start
    epochs = trainer.current_epoch
    epoch_s = [later - earlier for earlier, later in zip(clock.starts, clock.starts[1:])]

    # the same model and optimizer on the same batches, in a bare loop
    batches = list(datamodule.train_dataloader())
    bare = copy.deepcopy(module).train()
    optimizer = torch.optim.AdamW(bare.parameters(), lr=bare.hparams.lr, weight_decay=bare.hparams.weight_decay)
    step = bare._mixup_step if bare.hparams.mixup_alpha > 0 else bare.model_step
    times = []
    for _ in range(args.bare_epochs + 1):
        start = time.perf_counter()
        for batch in batches:
            _, loss = step(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
    work_s = statistics.median(times[1:])  # the first epoch warms the allocator up
    epoch_wall_s = statistics.median(epoch_s)
    return {"config": "configs/demo.yaml", "extra_args": extra, "epochs": epochs, "batches_per_epoch": len(batches),
            "fit_s": fit_s, "epoch_wall_s": epoch_wall_s, "epoch_wall_all_s": epoch_s,
            "one_off_s": fit_s - sum(epoch_s) - epoch_wall_s, "epoch_work_s": work_s,
            "wall_x_work": epoch_wall_s / work_s, "fit_per_epoch_x_work": fit_s / epochs / work_s}


class EpochClock(Callback):
    """When each training epoch starts."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        self.starts.append(time.perf_counter())


def timed(command: list[str], cwd: Path, env: dict[str, str], label: str) -> float:
    print(f"... {label}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{label} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def cv_study(args: argparse.Namespace, cache: Path, workdir: Path) -> dict[str, Any]:
    """The 5-fold study of configs/seed1d.yaml: parallel executor against the previous version."""
    extra = [*QUICK_DATA, "--trainer.max_epochs=2"] if args.quick else []
    env = {**os.environ, "SER_LIGHTNING_CACHE": str(cache)}
    study = ["-m", "ser_lightning", "cv", "--config", "configs/seed1d.yaml", *extra]
    current = timed([sys.executable, *study, f"--out={workdir / 'current'}", "--executor=processes",
                     f"--workers={args.workers}", "--threads_per_worker=1"], ROOT, env, "cv, this version")
    if args.legacy_tree:
        legacy_root = Path(args.legacy_tree).resolve()
        old = [sys.executable, *study, f"--out={workdir / 'legacy'}"]
        legacy = timed(old, legacy_root, {**env, "PYTHONPATH": str(legacy_root)}, "cv, previous version")
        legacy_kind = f"the previous version's code in {legacy_root}"
    else:
        old = [sys.executable, *study, f"--out={workdir / 'legacy'}", "--executor=local", "--figures.every_n_epochs=1",
               "--figures.num_attention_maps=4"]
        legacy = timed(old, ROOT, env, "cv, previous settings")
        legacy_kind = "this version with the previous settings (figures every epoch, runs one after another)"
    return {"config": "configs/seed1d.yaml", "extra_args": extra, "workers": args.workers, "current_s": current,
            "legacy_s": legacy, "legacy": legacy_kind, "speedup": legacy / current}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30, help="epochs of the demo fit (default 30, as the demo)")
    parser.add_argument("--bare-epochs", type=int, default=5, help="bare-loop epochs timed (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the demo fit (default: torch's)")
    parser.add_argument("--cv", action="store_true", help="also time the 5-fold seed1d study (minutes)")
    parser.add_argument("--workers", type=int, default=2, help="parallel runs of the study (default 2)")
    parser.add_argument("--legacy-tree", help="a checkout of the previous version, its extension built")
    parser.add_argument("--quick", action="store_true", help="smoke test: 6 actors, 2 epochs")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.bare_epochs = 2, 1
    set_threads(args.threads)
    keep_freed_memory()  # as the commands do
    env = environment(torch.device("cpu"))
    print_environment(env)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(os.environ.get("SER_LIGHTNING_CACHE") or Path(tmp) / "cache")
        demo = demo_epoch(args, cache, Path(tmp) / "demo")
        print(f"\ndemo fit: {demo['epochs']} epochs of {demo['batches_per_epoch']} batches in {demo['fit_s']:.1f} s: "
              f"an epoch takes {demo['epoch_wall_s']:.3f} s (median) against {demo['epoch_work_s']:.3f} s of pure "
              f"training work ({demo['wall_x_work']:.2f}x); one-off costs (sanity check, final figures) "
              f"{demo['one_off_s']:.2f} s; the whole fit is {demo['fit_per_epoch_x_work']:.2f}x the pure work of its "
              f"epochs")
        study = cv_study(args, cache, Path(tmp) / "cv") if args.cv else None
    goals = [goal("demo epoch wall time <= 1.5x its pure training work", demo["wall_x_work"], 1.5,
                  higher_is_better=False)]
    if study:
        print(f"5-fold study: {study['current_s']:.1f} s with {study['workers']} worker processes against "
              f"{study['legacy_s']:.1f} s for {study['legacy']} ({study['speedup']:.2f}x faster)")
        goals.append(goal("5-fold seed1d study >= 5x faster than the previous version", study["speedup"], 5.0))
    print_goals(goals)
    write_json(args.json, {"benchmark": "fit", "quick": args.quick, "environment": env, "demo": demo, "cv": study,
                           "goals": goals})


if __name__ == "__main__":
    main()
