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

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Callback

from ser_lightning.errors import CommandParser, DataError, UsageError, one_line, os_reason
from ser_lightning.outputs import atomic_write_text, check_writable
from ser_lightning.run.fold import RunSpec, run_fold
from ser_lightning.run.identity import StudyRecord, study_config
from ser_lightning.run.result import load_result
from ser_lightning.studies.executors import ExecutorOptions, add_executor_arguments, executor_options, open_executor
from ser_lightning.studies.plan import open_study, parse_folds, plan_runs, study_settings
from ser_lightning.studies.report import write_report

PARAM_TYPES = ("float", "int", "categorical")
STUDY_PREFIX = "outer_fold_"
TRIAL_OPTIONS = ("--figures.every_n_epochs=0", "--figures.num_attention_maps=0")
"""A trial draws no figures."""


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


def run_trial(spec: RunSpec, trial: Any) -> dict:
    """Fit one trial (an Optuna trial the study asked for) on the outer fold's training speakers; its score is the
    best validation UA (no test). The trial, pickled to a worker, still reports to its study's pruner."""
    from ser_lightning.parser import build_cli

    cli = build_cli(spec.lightning_args())
    pruning = PruningCallback(trial)
    cli.trainer.callbacks.append(pruning)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    plan = cli.datamodule.fold_plan
    score = cli.trainer.checkpoint_callback.best_model_score
    record = {"number": trial.number, "params": trial.params, "val_UA": None if score is None else float(score),
              "pruned": pruning.pruned, "epochs": cli.trainer.current_epoch,
              "train_speakers": plan.train_speakers, "val_speakers": plan.val_speakers,
              "outer_test_speakers": plan.test_speakers}
    atomic_write_text(spec.folder / "trial.json", json.dumps(record, indent=2))
    return record


def _study(out: Path, fold: int, seed: int) -> Any:
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = out / f"{STUDY_PREFIX}{fold}"
    folder.mkdir(parents=True, exist_ok=True)
    database = folder / "study.db"
    try:
        study = optuna.create_study(
            storage=f"sqlite:///{database}", study_name=f"{STUDY_PREFIX}{fold}", direction="maximize",
            load_if_exists=True, sampler=optuna.samplers.TPESampler(seed=seed + fold),
            pruner=optuna.pruners.MedianPruner(n_warmup_steps=5),
        )
    except SQLAlchemyError as error:
        reason = getattr(error, "orig", None) or error
        raise DataError(f"{database}: cannot be opened as an Optuna study database ({reason}); move it away to "
                        "start this outer fold's search again") from error
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)  # cut off when the search was stopped
    return study


def search_fold(run: RunSpec, space: list[Param], trials: int, options: ExecutorOptions) -> dict:
    """Run the missing trials of one outer fold (``run``: the fold's final run); return the best trial.

    A trial is a run of the outer fold with the sampled options, in ``OUT/outer_fold_K/trial_N``, figures off.
    """
    import optuna

    fold = run.fold
    study = _study(Path(run.out), fold, run.base_seed)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished))
    print(f"[tune] outer fold {fold}: {done}/{trials} trials done", flush=True)

    def tell(trial: Any, record: dict | None, error: BaseException | None = None) -> None:
        if error is not None or record is None or record["val_UA"] is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            print(f"[tune] outer fold {fold} trial {trial.number}: FAILED ({error})", flush=True)
            return
        state = optuna.trial.TrialState.PRUNED if record["pruned"] else optuna.trial.TrialState.COMPLETE
        study.tell(trial, record["val_UA"] if state == optuna.trial.TrialState.COMPLETE else None, state=state)
        print(f"[tune] outer fold {fold} trial {trial.number}: validation UA {100 * record['val_UA']:.1f} % "
              f"{'(pruned) ' if record['pruned'] else ''}{record['params']}", flush=True)

    with open_executor(options) as executor:
        while done + executor.busy < trials or executor.busy:
            while done + executor.busy < trials and executor.busy < executor.capacity:
                trial = study.ask()
                params = {param.name: param.suggest(trial) for param in space}
                spec = replace(run, args=(*run.args, *overrides(params), *TRIAL_OPTIONS),
                               out=str(Path(run.out) / f"{STUDY_PREFIX}{fold}"), name=f"trial_{trial.number}")
                executor.submit(trial, run_trial, spec, trial)
            ended = executor.next_finished()
            tell(ended.key, ended.result, ended.error)
            done += 1
    best = study.best_trial
    return {"fold": fold, "best_trial": best.number, "best_val_UA": best.value, "params": best.params,
            "trials": len(study.get_trials(deepcopy=False, states=finished))}


def tune_main(argv: list[str]) -> None:
    """Nested search: per outer fold, trials scored on inner validation speakers; the best one tested once."""
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
    add_executor_arguments(parser, ("local", "ray"), "trial")
    args, lightning_args = parser.parse_known_args(argv)
    if args.trials < 1:
        parser.error(f"--trials must be >= 1, got {args.trials}")
    executor = executor_options(parser, args)
    if args.folds is not None and args.folds < 2:
        parser.error(f"--folds must be >= 2, got {args.folds}")
    check_writable(args.out, "--out")
    space = load_space(args.space)
    from ser_lightning.parser import lines_held_until_accepted

    with lines_held_until_accepted(release=False):  # a rejected study prints only its error
        settings = study_settings(lightning_args, args.folds)
        parse_folds(args.only, settings.num_folds)
    tuned = tuple(param.name for param in space)
    record = StudyRecord("tune", study_config(settings.config, tuned), space={p.name: asdict(p) for p in space})
    out = open_study(args.out, record, new_out=args.new_out)
    chosen = []
    for run in plan_runs(settings, out, args.only, repeats=1):
        if load_result(run.folder) is not None:
            print(f"[tune] outer fold {run.fold}: complete, skipped", flush=True)
            chosen.append(json.loads((run.folder / "chosen.json").read_text()))
            continue
        best = search_fold(run, space, args.trials, executor)
        result = run_fold(replace(run, args=(*run.args, *overrides(best["params"])), tuned=tuned))
        atomic_write_text(run.folder / "chosen.json", json.dumps(best, indent=2))
        chosen.append(best)
        print(f"[tune] outer fold {run.fold}: chose {best['params']} (validation UA {100 * best['best_val_UA']:.1f} %); "
              f"test UA {100 * result.metrics['UA']:.1f} %", flush=True)
    report = write_report([out], out)
    text = tune_markdown(chosen, report)
    atomic_write_text(out / "tune_report.md", text)
    atomic_write_text(out / "tune_report.json", json.dumps({"chosen": chosen, "space": [p.__dict__ for p in space],
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
