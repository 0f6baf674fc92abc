"""Where a fit's time goes: an epoch's wall time against its pure training work, and a 5-fold study.

Demo epoch: ``configs/demo.yaml`` is fitted for ``--epochs`` epochs through the same code and process
settings as ``python -m ser_lightning fit``, progress bar included (the data set up beforehand from a
feature cache another process built, as every fit but a user's first finds it, so the time is the fit
itself: training, validation, logging, figures, checkpoints). An epoch's wall time is the time from
one epoch's start to the next one's. It is compared with the pure work of the same epoch: at the next
epoch's start, before that epoch's clock starts, the batches the epoch just trained on go through a
copy of the model and optimizer in a bare loop (forward, loss, backward, optimizer step; the random
state is restored afterwards). Pairing each epoch with its own bare run, measured seconds apart, keeps
a machine whose speed drifts (a shared virtual machine) from favouring either side; the result is the
median over epochs of the paired ratios, the first epoch left out as warm-up. The fit's one-off costs
(model summary, sanity check, the figures after the last epoch) are reported beside it.

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

from common import QUICK_SPLIT, environment, fit_args, goal, print_environment, print_goals, set_threads, write_json
from ser_lightning.runtime import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]
QUICK_DATA = ["--data.synthetic_actors=6", *QUICK_SPLIT]
PREPARE = """import sys
from ser_lightning.parser import build_cli
data = build_cli(sys.argv[1:]).datamodule
data.prepare_data()
data.setup("fit")
"""


def demo_epoch(args: argparse.Namespace, cache: Path, workdir: Path) -> dict[str, Any]:
    """Epoch wall time of the demo fit and the pure training work of the same batches."""
    from ser_lightning.parser import build_cli

    extra = QUICK_DATA if args.quick else []
    options = fit_args(workdir, cache, args.epochs, *extra)
    # the corpus and feature cache are built by another process, as every fit but a user's first finds them (a
    # --quick smoke run builds them here: it times nothing that counts)
    if not args.quick:
        subprocess.run([sys.executable, "-c", PREPARE, *options], check=True, capture_output=True)
    cli = build_cli(options)
    trainer, module, datamodule = cli.trainer, cli.model, cli.datamodule
    datamodule.prepare_data()
    datamodule.setup("fit")
    clock = PairedEpochs()
    trainer.callbacks.append(clock)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    fit_s = time.perf_counter() - start - clock.bare_total_s
    walls, works = clock.walls[1:], clock.works[1:]  # the first epoch warms both up
    ratios = [wall / work for wall, work in zip(walls, works)]
    epoch_wall_s, work_s = statistics.median(walls), statistics.median(works)
    epochs = trainer.current_epoch
    return {"config": "configs/demo.yaml", "extra_args": extra, "epochs": epochs,
            "batches_per_epoch": clock.batches_per_epoch, "fit_s": fit_s, "epoch_wall_s": epoch_wall_s,
            "epoch_wall_all_s": clock.walls, "epoch_work_all_s": clock.works,
            "one_off_s": fit_s - sum(clock.walls) - epoch_wall_s, "epoch_work_s": work_s,
            "wall_x_work": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
            "fit_per_epoch_x_work": fit_s / epochs / work_s}


class PairedEpochs(Callback):
    """Each epoch's wall time, and the pure work of its batches timed at the next epoch's start."""

    def __init__(self) -> None:
        self.walls: list[float] = []
        self.works: list[float] = []
        self.bare_total_s = 0.0
        self.batches_per_epoch = 0
        self._batches: list[Any] = []
        self._epoch_start: float | None = None

    def on_train_start(self, trainer: Any, module: Any) -> None:
        self.bare = copy.deepcopy(module).train()
        hp = self.bare.hparams
        self.optimizer = torch.optim.AdamW(self.bare.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        self.step = self.bare._mixup_step if hp.mixup_alpha > 0 else self.bare.model_step

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        self._batches.append(batch)

    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        now = time.perf_counter()
        if self._epoch_start is not None:
            self.walls.append(now - self._epoch_start)
            self.works.append(self._bare_epoch())
            self.bare_total_s += time.perf_counter() - now
        self._epoch_start = time.perf_counter()

    def _bare_epoch(self) -> float:
        batches, self._batches = self._batches, []
        self.batches_per_epoch = len(batches)
        rng = torch.random.get_rng_state()
        start = time.perf_counter()
        for batch in batches:
            _, loss = self.step(batch)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        elapsed = time.perf_counter() - start
        torch.random.set_rng_state(rng)
        return elapsed


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
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the demo fit (default: torch's)")
    parser.add_argument("--cv", action="store_true", help="also time the 5-fold seed1d study (minutes)")
    parser.add_argument("--workers", type=int, default=2, help="parallel runs of the study (default 2)")
    parser.add_argument("--legacy-tree", help="a checkout of the previous version, its extension built")
    parser.add_argument("--quick", action="store_true", help="smoke test: 6 actors, 3 epochs")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.quick:
        args.epochs = 3
    set_threads(args.threads)
    keep_freed_memory()  # as the commands do
    env = environment(torch.device("cpu"))
    print_environment(env)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(os.environ.get("SER_LIGHTNING_CACHE") or Path(tmp) / "cache")
        demo = demo_epoch(args, cache, Path(tmp) / "demo")
        print(f"\ndemo fit: {demo['epochs']} epochs of {demo['batches_per_epoch']} batches in {demo['fit_s']:.1f} s: "
              f"an epoch takes {demo['epoch_wall_s']:.3f} s (median) against {demo['epoch_work_s']:.3f} s of pure "
              f"training work; paired epoch by epoch {demo['wall_x_work']:.2f}x (median; range "
              f"{demo['ratio_range'][0]:.2f}-{demo['ratio_range'][1]:.2f}x); one-off costs (summary, sanity check, final figures) "
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
