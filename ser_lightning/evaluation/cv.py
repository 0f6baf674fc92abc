"""``cv``: k-fold cross-validation (optionally repeated with several random seeds), resumable.

Each run (fold, repeat) trains on the fold's training speakers, lets its validation speakers
choose the checkpoint (best validation UA), then tests that checkpoint once on the fold's test
speakers; the linear baseline is fitted and tested on the same split. The result goes to
``OUT/fold_K/result.json`` (``OUT/fold_K_repeat_R/`` for repeats after the first), written
atomically; a rerun skips complete runs and resumes an interrupted one from its last checkpoint.
Runs are independent, so an executor can run them in any order and place (``executors``).

``OUT/study.json`` records the configuration and code version the study was started with
(``identity``); a rerun into the same folder with another configuration is refused, naming the
options that differ, or goes to a new folder beside it with ``--new_out``.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from ser_lightning.evaluation.identity import (
    STUDY_FILE, StudyMismatch, StudyRecord, code_version, config_key, describe, study_config,
)
from ser_lightning.errors import CommandParser, UsageError
from ser_lightning.evaluation.report import write_report
from ser_lightning.outputs import atomic_write_text, check_writable

RUN_NAME = "run"


@dataclass(frozen=True)
class RunSpec:
    """One training run of a study: configuration arguments, output folder, fold and repeat."""

    args: tuple[str, ...]
    out: str
    fold: int
    num_folds: int
    repeat: int = 0
    base_seed: int = 0
    tuned: tuple[str, ...] = ()  # options chosen per fold by `tune` (dotted names): not part of the config key

    @property
    def folder(self) -> Path:
        return run_dir(Path(self.out), self.fold, self.repeat)

    @property
    def seed(self) -> int:
        return self.base_seed + self.repeat


def run_dir(out: Path, fold: int, repeat: int = 0) -> Path:
    return out / (f"fold_{fold}" if repeat == 0 else f"fold_{fold}_repeat_{repeat}")


def _dotted(config: dict, name: str) -> object:
    for key in name.split("."):
        config = config.get(key, {}) if isinstance(config, dict) else {}
    return config


def load_result(folder: Path) -> dict | None:
    path = folder / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_args(spec: RunSpec) -> list[str]:
    """The configuration arguments of one run: the study's, plus its fold, seed and logger."""
    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(spec.folder.parent), "name": spec.folder.name, "version": RUN_NAME},
    }
    return [*spec.args, f"--data.fold={spec.fold}", f"--data.num_folds={spec.num_folds}",
            f"--seed_everything={spec.seed}", f"--trainer.logger={json.dumps(logger)}"]


def run_fold(spec: RunSpec) -> dict:
    """Fit one run, test its best checkpoint and the baselines, and return (and store) its result."""
    from ser_lightning.evaluation.baseline import run_baselines
    from ser_lightning.evaluation.calibration import calibration_summary, softmax
    from ser_lightning.evaluation.metrics import split_scores
    from ser_lightning.models.module import HEAD_NAMES
    from ser_lightning.lightning_cli import baseline_names, build_cli
    from ser_lightning.training import fit_and_test

    started = time.monotonic()
    cli = build_cli(run_args(spec))
    config = dumped_config(cli)
    trainer, module, datamodule = cli.trainer, cli.model, cli.datamodule
    last = spec.folder / RUN_NAME / "checkpoints" / "last.ckpt"
    resumed_from = resume_epoch(last)
    outcome = fit_and_test(trainer, module, datamodule, resume_from=last if resumed_from is not None else None)
    plan = datamodule.fold_plan
    baselines = run_baselines(datamodule, baseline_names(cli)) if spec.repeat == 0 else []  # deterministic per fold
    predictions = outcome.test_predictions
    order = {index: position for position, index in enumerate(predictions.index.tolist())}
    rows = [order[i] for i in plan.test]
    logits, labels = predictions.logits[rows], predictions.labels[rows]
    probabilities = softmax(logits, outcome.temperature)
    parts = {} if predictions.parts is None else {
        name: predictions.parts[rows, k] for k, name in enumerate(HEAD_NAMES[: predictions.parts.shape[1]])}
    result = {
        "fold": spec.fold,
        "repeat": spec.repeat,
        "num_folds": spec.num_folds,
        "config_key": config_key(config, spec.tuned),
        "tuned": {name: _dotted(config, name) for name in spec.tuned},
        "config": config,
        "protocol": plan.protocol,
        "speaker_dependent": plan.speaker_dependent,
        "seed_everything": spec.seed,
        "data_random_seed": config["data"]["random_seed"],
        "class_names": list(datamodule.class_names),
        "metrics": outcome.test.metrics,
        "val_metrics": outcome.val.metrics,
        "per_class_recall": outcome.test.per_class_recall,
        "confusion_matrix": outcome.test.confusion,
        "baselines": {
            b.name: {"C": b.C, "selection": b.selection, "val_metrics": b.val.metrics if b.val else None,
                     "metrics": b.test.metrics, "per_class_recall": b.test.per_class_recall,
                     "confusion_matrix": b.test.confusion}
            for b in baselines
        },
        "num_test_utterances": len(plan.test),
        "test_utterances": [str(datamodule.utterances[i].path) for i in plan.test],
        "test_labels": [datamodule.labels[i] for i in plan.test],
        "test_probabilities": _rounded(probabilities),
        "test_logits": _rounded(logits),
        "test_parts": {name: _rounded(values) for name, values in parts.items()},
        "val_logits": _rounded(outcome.val_predictions.logits),
        "val_labels": outcome.val_predictions.labels.tolist(),
        "val_parts": {} if outcome.val_predictions.parts is None else {
            name: _rounded(outcome.val_predictions.parts[:, k])
            for k, name in enumerate(HEAD_NAMES[: outcome.val_predictions.parts.shape[1]])},
        "temperature": outcome.temperature,
        "network_weight": outcome.network_weight,
        "calibration": calibration_summary(logits, labels, outcome.temperature),
        "head_metrics": {name: split_scores(labels, values.argmax(1), list(datamodule.class_names)).metrics
                         for name, values in parts.items()},
        "train_speakers": plan.train_speakers,
        "val_speakers": plan.val_speakers,
        "test_speakers": plan.test_speakers,
        "shared_speakers": plan.shared_speakers,
        "best_checkpoint": outcome.best_checkpoint,
        "best_val_UA": outcome.best_val_UA,
        "epochs_trained": outcome.epochs_trained,
        "resumed_from_epoch": resumed_from,
        "code": code_version(),
        "wall_seconds": outcome.wall_seconds,  # fitting and evaluating the model
        "run_seconds": time.monotonic() - started,  # the whole run: data, model, baselines
    }
    atomic_write_text(spec.folder / "result.json", json.dumps(result, indent=2))
    return result


def _rounded(values) -> list[list[float]]:
    return [[round(float(v), 6) for v in row] for row in values]


def resume_epoch(last: Path) -> int | None:
    """The epoch an interrupted run can resume from (its ``last.ckpt``), or None to start afresh.

    A checkpoint that cannot be read (e.g. cut short when the run was killed while writing it) is
    set aside with a warning and the run starts again.
    """
    if not last.exists():
        return None
    import warnings

    import torch

    from ser_lightning.checkpoints import safe_loading

    try:
        with safe_loading():
            return int(torch.load(last, map_location="cpu", weights_only=True)["epoch"])
    except Exception as error:  # noqa: BLE001 - any unreadable file
        warnings.warn(f"{last}: cannot resume from it ({type(error).__name__}: {error}); the run starts again",
                      stacklevel=2)
        last.rename(last.with_suffix(".unreadable"))
        return None


def parse_folds(spec: str | None, num_folds: int) -> list[int]:
    if spec is None:
        return list(range(num_folds))
    try:
        folds = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise UsageError(f"--only {spec}: expected comma-separated fold indices, e.g. 0,2") from None
    bad = [f for f in folds if not 0 <= f < num_folds]
    if bad or not folds:
        raise UsageError(f"--only {spec}: fold(s) {bad} outside 0..{num_folds - 1}" if bad else f"--only {spec!r}: no fold")
    return folds


def dumped_config(cli: Any) -> dict:
    """The whole configuration a LightningCLI parsed, as plain values (link targets and nulls included)."""
    return yaml.safe_load(cli.parser.dump(cli.config, skip_link_targets=False, skip_none=False))


@dataclass(frozen=True)
class StudySettings:
    """A study's configuration, validated before any training: its folds, base seed and the whole configuration."""

    args: tuple[str, ...]
    num_folds: int
    base_seed: int
    config: dict


def study_settings(lightning_args: list[str], num_folds: int | None = None) -> StudySettings:
    """The study's settings (``num_folds``: ``--folds``, else the configuration's); parsing validates them."""
    from ser_lightning.lightning_cli import build_cli

    cli = build_cli([*lightning_args, *([f"--data.num_folds={num_folds}"] if num_folds else [])])
    if cli.config.data.test_root is not None:
        raise UsageError("data.test_root is set (cross-corpus evaluation has one train/test split, not folds); "
                         "use `fit` for it")
    if cli.trainer.world_size > 1:
        raise UsageError("trainer.devices / num_nodes > 1 is for `fit`: cv runs one process per run; use "
                         "--executor processes or ray to run runs in parallel")
    return StudySettings(tuple(lightning_args), int(cli.config.data.num_folds), int(cli.config.seed_everything),
                         dumped_config(cli))


def plan_runs(settings: StudySettings, out: Path, folds_spec: str | None, repeats: int) -> list[RunSpec]:
    """Every run of the study (``--only``: ``folds_spec``; ``--repeats``) into ``out``."""
    return [RunSpec(settings.args, str(out), fold, settings.num_folds, repeat, settings.base_seed)
            for repeat in range(repeats) for fold in parse_folds(folds_spec, settings.num_folds)]


def open_study(out: Path, record: StudyRecord, *, new_out: bool = False) -> Path:
    """The folder a study writes to, with ``record`` in its ``study.json``.

    ``out`` when it is new or was started with the same configuration (a different code version is
    only reported); else, with ``new_out``, the first of ``OUT-2``, ``OUT-3``, ... that is new or
    holds this configuration, and without it StudyMismatch naming the options that differ. A folder
    with runs but no ``study.json`` (an earlier version's) is judged by the configuration of its runs.
    """
    folder, number = out, 1
    while (existing := read_study(folder)) is not None and (changes := existing.differences(record)):
        if not new_out:
            raise StudyMismatch(f"--out {folder}: this study was made with another configuration "
                                f"({describe(changes)}); run it with that configuration, choose another --out, or pass "
                                "--new_out to start a new folder beside it")
        number += 1
        folder = out.with_name(f"{out.name}-{number}")
    if folder != out:
        print(f"[{record.command}] --out {out} holds a study of another configuration: this one is in {folder}",
              flush=True)
    if existing is not None and existing.code and existing.code != record.code:
        print(f"[{record.command}] note: {folder} was started by another code version ({existing.code}; now "
              f"{record.code}); its finished runs are kept", flush=True)
    if existing is None or not (folder / STUDY_FILE).exists():
        atomic_write_text(folder / STUDY_FILE, record.to_json())
    return folder


def read_study(folder: Path) -> StudyRecord | None:
    """The record of the study in ``folder``: its ``study.json``, else its first run's, else None (a new study)."""
    path = folder / STUDY_FILE
    if path.exists():
        return StudyRecord.from_json(path.read_text(encoding="utf-8"), path)
    for result in sorted(folder.glob("fold_*/result.json")):
        return StudyRecord.from_result(json.loads(result.read_text()))
    return None


def cv_main(argv: list[str]) -> None:
    """Speaker-independent k-fold cross-validation with the linear baseline on the same folds."""
    from ser_lightning.evaluation.executors import EXECUTORS, run_study

    parser = CommandParser(
        prog="python -m ser_lightning cv", description=cv_main.__doc__,
        epilog="Any configuration option can follow (--config FILE|NAME, --data.root DIR, --trainer.max_epochs N).",
    )
    parser.add_argument("--folds", type=int, help="number of folds (default: the config's data.num_folds)")
    parser.add_argument("--only", help="comma-separated fold indices to run here (merge later with cv-report)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per fold with seeds seed_everything + 0..R-1; the report separates the variance "
                             "over folds from the variance over seeds (default 1)")
    parser.add_argument("--out", type=Path, default=Path("cv_runs"), help="output folder (default: cv_runs)")
    parser.add_argument("--new_out", action="store_true",
                        help="when --out holds a study of another configuration, write to a new folder beside it "
                             "(OUT-2, OUT-3, ...) instead of stopping")
    parser.add_argument("--executor", choices=sorted(EXECUTORS), default="local",
                        help="local: one run after another in this process (default); processes: parallel worker "
                             "processes on this machine; ray: Ray tasks on a local or existing cluster")
    parser.add_argument("--workers", type=int, default=2, help="parallel runs for processes/ray (default 2)")
    parser.add_argument("--threads_per_worker", type=int, default=1,
                        help="torch threads per parallel run (default 1: no oversubscription)")
    parser.add_argument("--gpus_per_worker", type=float, default=0.0, help="GPU share per run with ray (e.g. 0.25)")
    parser.add_argument("--ray_address", help="an existing Ray cluster (default: $RAY_ADDRESS, else a local one)")
    args, lightning_args = parser.parse_known_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.folds is not None and args.folds < 2:
        parser.error(f"--folds must be >= 2, got {args.folds}")
    check_writable(args.out, "--out")
    from ser_lightning.lightning_cli import lines_held_until_accepted

    with lines_held_until_accepted(release=False):  # a rejected study prints only its error
        settings = study_settings(lightning_args, args.folds)
        parse_folds(args.only, settings.num_folds)
    out = open_study(args.out, StudyRecord("cv", study_config(settings.config)), new_out=args.new_out)
    runs = plan_runs(settings, out, args.only, args.repeats)
    run_study(runs, args)
    report = write_report([out], out)
    print(report["markdown"])
    print(f"[cv] report written to {out}")


def cv_report_main(argv: list[str]) -> None:
    """Merge fold results (e.g. from --only runs on several machines) into one report."""
    parser = CommandParser(prog="python -m ser_lightning cv-report", description=cv_report_main.__doc__)
    parser.add_argument("dirs", type=Path, nargs="+", help="folders holding fold_K/result.json")
    parser.add_argument("--out", type=Path, help="where to write the report (default: the first folder)")
    args = parser.parse_args(argv)
    missing = [str(folder) for folder in args.dirs if not folder.is_dir()]
    if missing:
        raise UsageError(f"cv-report: no such folder(s): {', '.join(missing)}")
    check_writable(args.out or args.dirs[0], "--out")
    report = write_report(args.dirs, args.out or args.dirs[0])
    print(report["markdown"])


def spec_dict(spec: RunSpec) -> dict:
    """A RunSpec as plain data (for executors that ship it to another process)."""
    return asdict(spec)
