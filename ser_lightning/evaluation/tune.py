"""``tune``: nested hyper-parameter search. Inner validation speakers choose; outer test folds only report.

For every outer fold k (test speakers: fold k of the speaker-independent plan), an Optuna study
(TPE sampler, median pruning on the per-epoch validation UA) proposes hyper-parameters from the
declared space; each trial trains on fold k's training speakers and is scored by the best UA of
fold k's validation speakers (themselves training speakers of the outer fold). A trial never runs
a test loop and never sees the outer test speakers. The best trial's hyper-parameters are then
trained once more as a normal ``cv`` run of fold k and tested once; those runs make the report.

State lives in the output folder: one SQLite study per outer fold, so a stopped search resumes
with the trials it has (a trial that was cut off is marked failed and replaced), and finished
outer folds are skipped. ``OUT/study.json`` records the configuration (without the searched
options), the space and the code version; a rerun with another configuration or space is refused
(or, with ``--new_out``, goes to a new folder), as for ``cv``. Trials run one after another, or
``--workers`` at a time as Ray tasks (``--executor ray``; the local Ray instance listens on
127.0.0.1 only).

Space file (YAML), one entry per option:

    model.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    model.lam: {type: float, low: 0.1, high: 2.0}
    model.width: {type: categorical, choices: [1.0, 2.0, 4.0]}
    data.augment.time_mask_param: {type: int, low: 0, high: 30}
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Callback

from ser_lightning.errors import CommandParser, DataError, UsageError, one_line, os_reason
from ser_lightning.evaluation.cv import RunSpec, load_result, run_fold
from ser_lightning.evaluation.identity import StudyRecord, study_config
from ser_lightning.evaluation.report import write_report
from ser_lightning.outputs import atomic_write_text, check_writable

PARAM_TYPES = ("float", "int", "categorical")
STUDY_PREFIX = "outer_fold_"


@dataclass(frozen=True)
class Param:
    """One searched option: a float or int range (optionally log-scaled) or a list of choices."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_categorical(self.name, list(self.choices))


def load_space(path: Path) -> list[Param]:
    """The search space of a YAML file; UsageError naming the entry that is wrong."""
    try:
        entries = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise UsageError(f"tune: --space {path}: cannot read it ({os_reason(error)})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise UsageError(f"tune: --space {path}: not a YAML file ({one_line(str(error))})") from None
    if not isinstance(entries, dict) or not entries:
        raise UsageError(f"tune: --space {path}: expected a mapping of option -> {{type, low, high}} or {{type, choices}}")
    space = []
    for name, spec in entries.items():
        where = f"tune: --space {path}: {name}"
        if not isinstance(spec, dict) or spec.get("type") not in PARAM_TYPES:
            raise UsageError(f"{where}: 'type' must be one of {list(PARAM_TYPES)}")
        if spec["type"] == "categorical":
            if not spec.get("choices"):
                raise UsageError(f"{where}: a categorical entry needs a non-empty 'choices' list")
            space.append(Param(name, "categorical", choices=tuple(spec["choices"])))
            continue
        if "low" not in spec or "high" not in spec or not float(spec["low"]) < float(spec["high"]):
            raise UsageError(f"{where}: needs numbers 'low' < 'high'")
        if spec.get("log") and float(spec["low"]) <= 0:
            raise UsageError(f"{where}: a log-scaled range needs 'low' > 0")
        space.append(Param(name, spec["type"], float(spec["low"]), float(spec["high"]), bool(spec.get("log", False))))
    return space


def overrides(params: dict[str, Any]) -> list[str]:
    """Command-line overrides setting the sampled options."""
    return [f"--{name}={json.dumps(value)}" for name, value in sorted(params.items())]


@dataclass(frozen=True)
class TrialSpec:
    """One trial: the study's configuration arguments plus sampled options, on one outer fold."""

    args: tuple[str, ...]
    out: str
    fold: int
    num_folds: int
    number: int
    params: dict = field(hash=False)
    storage: str
    study_name: str


class PruningCallback(Callback):
    """Reports each epoch's validation UA to the Optuna trial and stops the fit when its pruner says so."""

    def __init__(self, trial: Any) -> None:
        self.trial, self.pruned = trial, False

    def on_validation_epoch_end(self, trainer: Any, module: Any) -> None:
        if trainer.sanity_checking or "val/UA" not in trainer.callback_metrics:
            return
        self.trial.report(float(trainer.callback_metrics["val/UA"]), step=trainer.current_epoch)
        if self.trial.should_prune():
            trainer.should_stop, self.pruned = True, True


def run_trial(spec: TrialSpec) -> dict:
    """Fit one trial on the outer fold's training speakers; its score is the best validation UA (no test)."""
    import optuna

    from ser_lightning.lightning_cli import build_cli

    folder = Path(spec.out) / f"{STUDY_PREFIX}{spec.fold}" / f"trial_{spec.number}"
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              "init_args": {"save_dir": str(folder.parent), "name": folder.name, "version": "run"}}
    cli = build_cli([*spec.args, *overrides(spec.params), f"--data.fold={spec.fold}",
                     f"--data.num_folds={spec.num_folds}", f"--trainer.logger={json.dumps(logger)}",
                     "--figures.every_n_epochs=0", "--figures.num_attention_maps=0"])
    study = optuna.load_study(study_name=spec.study_name, storage=spec.storage)
    # the trial the driver asked for, reopened here so that this process can report to its pruner
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, spec.number)
    pruning = PruningCallback(optuna.trial.Trial(study, trial_id))
    cli.trainer.callbacks.append(pruning)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    plan = cli.datamodule.fold_plan
    score = cli.trainer.checkpoint_callback.best_model_score
    record = {"number": spec.number, "params": spec.params, "val_UA": None if score is None else float(score),
              "pruned": pruning.pruned, "epochs": cli.trainer.current_epoch,
              "train_speakers": plan.train_speakers, "val_speakers": plan.val_speakers,
              "outer_test_speakers": plan.test_speakers}
    atomic_write_text(folder / "trial.json", json.dumps(record, indent=2))
    return record


def _study(out: Path, fold: int, seed: int) -> tuple[Any, str, str]:
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = out / f"{STUDY_PREFIX}{fold}"
    folder.mkdir(parents=True, exist_ok=True)
    database = folder / "study.db"
    storage, name = f"sqlite:///{database}", f"{STUDY_PREFIX}{fold}"
    try:
        study = optuna.create_study(
            storage=storage, study_name=name, direction="maximize", load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=seed + fold), pruner=optuna.pruners.MedianPruner(n_warmup_steps=5),
        )
    except SQLAlchemyError as error:
        reason = getattr(error, "orig", None) or error
        raise DataError(f"{database}: cannot be opened as an Optuna study database ({reason}); move it away to "
                        "start this outer fold's search again") from error
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)  # cut off when the search was stopped
    return study, storage, name


def search_fold(args: argparse.Namespace, lightning_args: list[str], space: list[Param], fold: int,
                num_folds: int, seed: int) -> dict:
    """Run the missing trials of one outer fold; return the best trial."""
    import optuna

    study, storage, name = _study(args.out, fold, seed)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished))
    print(f"[tune] outer fold {fold}: {done}/{args.trials} trials done", flush=True)
    pending: list[tuple[Any, TrialSpec]] = []

    def ask() -> tuple[Any, TrialSpec]:
        trial = study.ask()
        params = {param.name: param.suggest(trial) for param in space}
        return trial, TrialSpec(tuple(lightning_args), str(args.out), fold, num_folds, trial.number, params, storage, name)

    def tell(trial: Any, record: dict | None, error: Exception | None = None) -> None:
        if error is not None or record is None or record["val_UA"] is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            print(f"[tune] outer fold {fold} trial {trial.number}: FAILED ({error})", flush=True)
            return
        state = optuna.trial.TrialState.PRUNED if record["pruned"] else optuna.trial.TrialState.COMPLETE
        study.tell(trial, record["val_UA"] if state == optuna.trial.TrialState.COMPLETE else None, state=state)
        print(f"[tune] outer fold {fold} trial {trial.number}: validation UA {100 * record['val_UA']:.1f} % "
              f"{'(pruned) ' if record['pruned'] else ''}{record['params']}", flush=True)

    if args.executor == "ray":
        import ray

        from ser_lightning.evaluation.executors import start_ray
        from ser_lightning.runtime import configure_worker

        start_ray(args)

        def remote_trial(spec: TrialSpec, threads: int) -> dict:
            configure_worker(threads)
            return run_trial(spec)

        task = ray.remote(num_cpus=args.threads_per_worker, max_retries=0)(remote_trial)
        running: dict[Any, Any] = {}
        while done + len(running) < args.trials or running:
            while done + len(running) < args.trials and len(running) < args.workers:
                trial, spec = ask()
                running[task.remote(spec, args.threads_per_worker)] = trial
            finished_refs, _ = ray.wait(list(running), num_returns=1)
            trial = running.pop(finished_refs[0])
            try:
                tell(trial, ray.get(finished_refs[0]))
            except Exception as error:  # noqa: BLE001 - the trial failed; the search goes on
                tell(trial, None, error)
            done += 1
    else:
        while done < args.trials:
            trial, spec = ask()
            try:
                tell(trial, run_trial(spec))
            except Exception as error:  # noqa: BLE001
                tell(trial, None, error)
            done += 1
    best = study.best_trial
    return {"fold": fold, "best_trial": best.number, "best_val_UA": best.value, "params": best.params,
            "trials": len(study.get_trials(deepcopy=False, states=finished))}


def tune_main(argv: list[str]) -> None:
    """Nested search: per outer fold, trials scored on inner validation speakers; the best one tested once."""
    from ser_lightning.evaluation.cv import open_study, parse_folds, plan_runs, study_settings

    parser = CommandParser(
        prog="python -m ser_lightning tune", description=tune_main.__doc__,
        epilog="Any configuration option can follow (--config FILE|NAME, --data.root DIR, --trainer.max_epochs N).",
    )
    parser.add_argument("--space", type=Path, required=True, help="YAML file declaring the searched options")
    parser.add_argument("--trials", type=int, default=20, help="trials per outer fold (default 20)")
    parser.add_argument("--folds", type=int, help="outer folds (default: the config's data.num_folds)")
    parser.add_argument("--only", help="comma-separated outer folds to run here")
    parser.add_argument("--out", type=Path, default=Path("tune_runs"), help="output folder (default: tune_runs)")
    parser.add_argument("--new_out", action="store_true",
                        help="when --out holds a search of another configuration or space, write to a new folder "
                             "beside it (OUT-2, OUT-3, ...) instead of stopping")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="local: trials one after another (default); ray: --workers trials at a time as Ray tasks")
    parser.add_argument("--workers", type=int, default=2, help="parallel trials with ray (default 2)")
    parser.add_argument("--threads_per_worker", type=int, default=1, help="torch threads per trial with ray")
    parser.add_argument("--ray_address", help="an existing Ray cluster (default: $RAY_ADDRESS, else a local one)")
    args, lightning_args = parser.parse_known_args(argv)
    if args.trials < 1 or args.workers < 1 or args.threads_per_worker < 1:
        parser.error("--trials, --workers and --threads_per_worker must be >= 1")
    if args.folds is not None and args.folds < 2:
        parser.error(f"--folds must be >= 2, got {args.folds}")
    check_writable(args.out, "--out")
    space = load_space(args.space)
    from ser_lightning.lightning_cli import lines_held_until_accepted

    with lines_held_until_accepted(release=False):  # a rejected study prints only its error
        settings = study_settings(lightning_args, args.folds)
        parse_folds(args.only, settings.num_folds)
    tuned = tuple(param.name for param in space)
    record = StudyRecord("tune", study_config(settings.config, tuned), space={p.name: asdict(p) for p in space})
    args.out = open_study(args.out, record, new_out=args.new_out)
    runs = plan_runs(settings, args.out, args.only, repeats=1)
    chosen = []
    for run in runs:
        if load_result(run.folder) is not None:
            print(f"[tune] outer fold {run.fold}: complete, skipped", flush=True)
            chosen.append(json.loads((run.folder / "chosen.json").read_text()))
            continue
        best = search_fold(args, lightning_args, space, run.fold, run.num_folds, run.base_seed)
        final = RunSpec((*lightning_args, *overrides(best["params"])), run.out, run.fold, run.num_folds, 0, run.base_seed,
                        tuned=tuned)
        result = run_fold(final)
        atomic_write_text(run.folder / "chosen.json", json.dumps(best, indent=2))
        chosen.append(best)
        print(f"[tune] outer fold {run.fold}: chose {best['params']} (validation UA {100 * best['best_val_UA']:.1f} %); "
              f"test UA {100 * result['metrics']['UA']:.1f} %", flush=True)
    report = write_report([args.out], args.out)
    text = tune_markdown(chosen, report)
    atomic_write_text(args.out / "tune_report.md", text)
    atomic_write_text(args.out / "tune_report.json", json.dumps({"chosen": chosen, "space": [p.__dict__ for p in space],
                                                                  "cv_report": "cv_report.json"}, indent=2, default=str))
    print(text)


def tune_markdown(chosen: list[dict], report: dict) -> str:
    lines = ["# Nested hyper-parameter search", "",
             "For every outer fold, the trials trained on that fold's training speakers and were scored by the UA of "
             "validation speakers drawn from those same training speakers. No test fold took part in any choice: the "
             "chosen hyper-parameters were trained once more and tested once on the outer fold's test speakers.", "",
             "| Outer fold | Trials | Chosen hyper-parameters | Validation UA % | Test UA % |", "|---|---|---|---|---|"]
    tests = {f["fold"]: f["metrics"]["UA"] for f in report["folds"]}
    for best in sorted(chosen, key=lambda b: b["fold"]):
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(best["params"].items()))
        lines.append(f"| {best['fold']} | {best['trials']} | {params} | {100 * best['best_val_UA']:.1f} | "
                     f"{100 * tests[best['fold']]:.1f} |")
    mean, std = report["mean"], report["std"]
    lines += ["", "Outer test folds: " + ", ".join(f"{n} {100 * mean[n]:.1f} +- {100 * std[n]:.1f} %"
                                                   for n in ("WA", "UA", "F1")) + " (mean +- std over folds); "
              "the full report with the baseline is cv_report.md."]
    return "\n".join(lines) + "\n"
