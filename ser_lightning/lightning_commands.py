"""The Lightning commands: ``fit``, ``validate``, ``test`` and ``predict-split``.

Each parses its configuration with ``parser.build_cli``, then runs ``run.training.fit_and_test``, the
evaluation loops or the prediction loop itself.
"""
from __future__ import annotations

import argparse
import csv
from collections.abc import Callable, Sequence
from pathlib import Path

from ser_lightning.checkpoints import load_module
from ser_lightning.errors import CommandParser, UsageError
from ser_lightning.evaluation.baseline import BaselineResult, run_baselines
from ser_lightning.outputs import atomic_open, check_writable_file
from ser_lightning.parser import baseline_names, build_cli
from ser_lightning.run.training import FitOutcome, fit_and_test


def summary_lines(outcome: FitOutcome, baselines: Sequence[BaselineResult]) -> list[str]:
    """Validation and test metrics of the chosen checkpoint, with each baseline's UA on the same split."""
    lines = []
    for split, scores in (("validation", outcome.val), ("test", outcome.test)):
        if scores is None:
            continue
        line = f"{split:>10}: " + ", ".join(f"{name} {100 * scores.metrics[name]:.1f} %" for name in ("WA", "UA", "F1"))
        for baseline in baselines:
            other = baseline.val if split == "validation" else baseline.test
            if other is not None:
                line += f" | baseline {baseline.name}: UA {100 * other.UA:.1f} %"
        lines.append(line)
    return lines


def fit_main(argv: list[str]) -> None:
    """Train one fold, then evaluate the checkpoint its validation speakers chose on its test speakers."""
    cli = build_cli(argv, prepare_data=True)
    trainer, module, datamodule = cli.trainer, cli.model, cli.datamodule
    if trainer.fast_dev_run:
        trainer.fit(module, datamodule=datamodule)
        return
    outcome = fit_and_test(trainer, module, datamodule, test=cli.config.test_after_fit)
    log_dir = trainer.log_dir  # every process: it is a collective under DDP
    if not trainer.is_global_zero:
        return
    baselines = run_baselines(datamodule, baseline_names(cli)) if cli.config.test_after_fit else []
    print("\n".join(summary_lines(outcome, baselines)))
    if outcome.best_checkpoint:
        print(f"best checkpoint: {outcome.best_checkpoint}")
    if log_dir:
        print(f"TensorBoard: tensorboard --logdir {Path(log_dir).parent}")


def _checkpoint_command(argv: list[str], name: str, extra: Callable | None = None):
    """Split --ckpt_path / --trust_checkpoint (and the command's own options) from the configuration options.

    The checkpoint is read, and an ``--output`` file checked writable, before the data is loaded.
    """
    parser = CommandParser(prog=f"python -m ser_lightning {name}", add_help=False)
    parser.add_argument("--ckpt_path", type=Path, required=True, help="checkpoint written by fit or cv")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="load a checkpoint that needs more than the safe loader allows (only files you trust)")
    if extra is not None:
        extra(parser)
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        build_cli(["--help"])  # prints the configuration options and exits
    args, rest = parser.parse_known_args(argv)
    module = load_module(args.ckpt_path, trusted=args.trust_checkpoint)
    if getattr(args, "output", None) is not None:
        check_writable_file(args.output, "--output")
    cli = build_cli(rest, prepare_data=True)
    trained, configured = module.hparams.normalization, cli.config.data.normalization
    if trained != configured:
        raise UsageError(f"checkpoint {args.ckpt_path} was trained with normalization '{trained}' but "
                         f"data.normalization is '{configured}': pass the configuration it was trained with")
    return args, cli, module


def _evaluate_main(argv: list[str], split: str) -> None:
    _, cli, module = _checkpoint_command(argv, "validate" if split == "val" else "test")
    loop = cli.trainer.validate if split == "val" else cli.trainer.test
    loop(module, datamodule=cli.datamodule)


def validate_main(argv: list[str]) -> None:
    """Evaluate a checkpoint on the fold's validation speakers."""
    _evaluate_main(argv, "val")


def test_main(argv: list[str]) -> None:
    """Evaluate a checkpoint on the fold's test speakers."""
    _evaluate_main(argv, "test")


def predict_split_main(argv: list[str]) -> None:
    """Predict every utterance of the fold's test split with a checkpoint and write them to a CSV file."""
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--output", type=Path, default=Path("predictions.csv"),
                            help="CSV file: path, speaker, label, emotion, p_<class>... (default predictions.csv)")

    args, cli, module = _checkpoint_command(argv, "predict-split", options)
    datamodule = cli.datamodule
    batches = cli.trainer.predict(module, datamodule=datamodule)
    names = module.class_names
    with atomic_open(args.output, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "speaker", "label", "emotion", *(f"p_{name}" for name in names)])
        for batch in batches:
            for index, probabilities in zip(batch["index"].tolist(), batch["probabilities"].tolist()):
                utterance = datamodule.utterances[index]
                best = max(range(len(names)), key=probabilities.__getitem__)
                writer.writerow([utterance.path, utterance.speaker, utterance.emotion, names[best],
                                 *(f"{p:.6f}" for p in probabilities)])
    print(f"{sum(len(batch['index']) for batch in batches)} test utterances predicted; written to {args.output}")
