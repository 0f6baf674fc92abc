"""One run of a study: what it is (``RunSpec``), and ``run_fold``, which fits it, tests it and writes its result.

A run trains on its fold's training speakers, lets its validation speakers choose the checkpoint (best
validation UA), then tests that checkpoint once on the fold's test speakers; the linear baselines are
fitted and tested on the same split. Its result goes to ``FOLDER/result.json`` (``result.RunResult``),
written atomically; a run started again resumes from its last checkpoint (``resume_epoch``). Runs are
independent, so an executor can run them in any order and place (``studies.executors``).
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from ser_lightning.outputs import atomic_write_text
from ser_lightning.run.identity import code_version, config_key
from ser_lightning.run.result import RESULT_FILE, BaselineScores, RunResult

RUN_NAME = "run"
"""The log folder of a run inside its folder (its TensorBoard events and checkpoints)."""


@dataclass(frozen=True)
class RunSpec:
    """One training run: configuration arguments, where it writes, its fold and its seed.

    ``folder`` is ``OUT/fold_K`` (``OUT/fold_K_repeat_R`` for repeats after the first) unless ``name`` names it
    (a nested search's trials). ``tuned``: the options a nested search chose for this run (dotted names), which
    do not tell one study from another.
    """

    args: tuple[str, ...]
    out: str
    fold: int
    num_folds: int
    repeat: int = 0
    base_seed: int = 0
    tuned: tuple[str, ...] = ()
    name: str = ""

    @property
    def folder(self) -> Path:
        default = f"fold_{self.fold}" if self.repeat == 0 else f"fold_{self.fold}_repeat_{self.repeat}"
        return Path(self.out) / (self.name or default)

    @property
    def seed(self) -> int:
        return self.base_seed + self.repeat

    @property
    def last_checkpoint(self) -> Path:
        return self.folder / RUN_NAME / "checkpoints" / "last.ckpt"

    def lightning_args(self) -> list[str]:
        """The configuration arguments of the run: the study's, plus its fold, seed and logger (into ``folder``)."""
        logger = {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": str(self.folder.parent), "name": self.folder.name, "version": RUN_NAME},
        }
        return [*self.args, f"--data.fold={self.fold}", f"--data.num_folds={self.num_folds}",
                f"--seed_everything={self.seed}", f"--trainer.logger={json.dumps(logger)}"]


def _dotted(config: dict, name: str) -> object:
    for key in name.split("."):
        config = config.get(key, {}) if isinstance(config, dict) else {}
    return config


def run_fold(spec: RunSpec) -> RunResult:
    """Fit one run, test its best checkpoint and the baselines, and return (and store) its result."""
    from ser_lightning.evaluation.baseline import run_baselines
    from ser_lightning.evaluation.calibration import calibration_summary, softmax
    from ser_lightning.evaluation.metrics import split_scores
    from ser_lightning.models.module import HEAD_NAMES
    from ser_lightning.parser import baseline_names, build_cli, dumped_config
    from ser_lightning.run.training import fit_and_test

    started = time.monotonic()
    cli = build_cli(spec.lightning_args())
    config = dumped_config(cli)
    trainer, module, datamodule = cli.trainer, cli.model, cli.datamodule
    last = spec.last_checkpoint
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
    result = RunResult(
        fold=spec.fold,
        repeat=spec.repeat,
        num_folds=spec.num_folds,
        config_key=config_key(config, spec.tuned),
        tuned={name: _dotted(config, name) for name in spec.tuned},
        config=config,
        protocol=plan.protocol,
        speaker_dependent=plan.speaker_dependent,
        seed_everything=spec.seed,
        data_random_seed=config["data"]["random_seed"],
        class_names=list(datamodule.class_names),
        metrics=outcome.test.metrics,
        val_metrics=outcome.val.metrics,
        per_class_recall=outcome.test.per_class_recall,
        confusion_matrix=outcome.test.confusion,
        baselines={
            b.name: BaselineScores(C=b.C, selection=b.selection, val_metrics=b.val.metrics if b.val else None,
                                   metrics=b.test.metrics, per_class_recall=b.test.per_class_recall,
                                   confusion_matrix=b.test.confusion)
            for b in baselines
        },
        num_test_utterances=len(plan.test),
        test_utterances=[str(datamodule.utterances[i].path) for i in plan.test],
        test_labels=[datamodule.labels[i] for i in plan.test],
        test_probabilities=_rounded(probabilities),
        test_logits=_rounded(logits),
        test_parts={name: _rounded(values) for name, values in parts.items()},
        val_logits=_rounded(outcome.val_predictions.logits),
        val_labels=outcome.val_predictions.labels.tolist(),
        val_parts={} if outcome.val_predictions.parts is None else {
            name: _rounded(outcome.val_predictions.parts[:, k])
            for k, name in enumerate(HEAD_NAMES[: outcome.val_predictions.parts.shape[1]])},
        temperature=outcome.temperature,
        network_weight=outcome.network_weight,
        calibration=calibration_summary(logits, labels, outcome.temperature),
        head_metrics={name: split_scores(labels, values.argmax(1), list(datamodule.class_names)).metrics
                      for name, values in parts.items()},
        train_speakers=plan.train_speakers,
        val_speakers=plan.val_speakers,
        test_speakers=plan.test_speakers,
        shared_speakers=plan.shared_speakers,
        best_checkpoint=outcome.best_checkpoint,
        best_val_UA=outcome.best_val_UA,
        epochs_trained=outcome.epochs_trained,
        resumed_from_epoch=resumed_from,
        code=code_version(),
        wall_seconds=outcome.wall_seconds,
        run_seconds=time.monotonic() - started,
    )
    atomic_write_text(spec.folder / RESULT_FILE, result.to_json())
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
