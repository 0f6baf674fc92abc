"""The configuration of every training command: one ``LightningCLI`` (``build_cli``) that parses ``--config``
YAML files and ``--section.option value`` overrides, checks them and instantiates trainer, model and data.

The Lightning commands (``lightning_commands``), one run of a study (``run``) and the studies use it; the data
and model layers never do. It also owns how Lightning's own log lines are shown: its advertising tips
dropped, its lines held while a configuration is checked.
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from ser_lightning.callbacks import DivergenceCheck, FigureCallback, RandomStates, ThrottledProgressBar
from ser_lightning.configs import with_default_config
from ser_lightning.data.datamodule import SERDataModule
from ser_lightning.errors import UsageError, one_line
from ser_lightning.evaluation.baseline import BASELINES, DEFAULT_BASELINES
from ser_lightning.models.module import SERModule
from ser_lightning.outputs import check_writable
from ser_lightning.runtime import cache_cuda_check

# The commands hand LightningCLI explicit argument lists on purpose.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
# Lightning's own use of a torch API deprecated in torch 2.11: nothing a user can act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")
"""The loggers Lightning prints its lines through (its modules log to children of these)."""


class AdvertisingFilter(logging.Filter):
    """Drops the tips Lightning prints on every run to advertise its cloud services (litlogger, litmodels)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("\N{ELECTRIC LIGHT BULB} Tip:")


def quiet_lightning() -> None:
    """Install ``AdvertisingFilter`` on the loggers Lightning's tips come from (once)."""
    from lightning_utilities.core import rank_zero

    for logger in {rank_zero.log, logging.getLogger("lightning.pytorch.utilities.rank_zero")}:
        if not any(isinstance(f, AdvertisingFilter) for f in logger.filters):
            logger.addFilter(AdvertisingFilter())


class _HeldRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def lines_held_until_accepted(*, release: bool = True) -> Iterator[None]:
    """Hold Lightning's log lines while the configuration is checked: printed if the block succeeds (unless
    ``release`` is False), dropped if it fails, so that a rejected configuration prints only its error line."""
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    saved = [(logger.handlers, logger.propagate) for logger in loggers]
    held = _HeldRecords()
    for logger in loggers:
        logger.handlers, logger.propagate = [held], False
    try:
        yield
    finally:
        for logger, (handlers, propagate) in zip(loggers, saved):
            logger.handlers, logger.propagate = handlers, propagate
    for record in held.records if release else []:  # reached only when the block succeeded
        logging.getLogger(record.name).handle(record)


class SERLightningCLI(LightningCLI):
    """LightningCLI with the data properties linked into the model and the project's extra sections."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit, evaluate the best checkpoint (chosen on validation UA) on the test fold.")
        parser.add_argument("--baseline", type=bool, default=True,
                            help="Also fit the linear baselines (--baselines) on the same split and report them beside "
                                 "the model.")
        parser.add_argument("--baselines", type=list[str], default=list(DEFAULT_BASELINES),
                            help=f"The baselines of every report (default {list(DEFAULT_BASELINES)}; all: "
                                 f"{list(BASELINES)}).")
        parser.add_argument("--baseline_extra", type=list[str], default=[],
                            help="Baselines added to --baselines (e.g. egemaps, compare: openSMILE functionals with C "
                                 "chosen by speaker-grouped inner cross-validation; egemaps_svm, egemaps_speaker_svm: "
                                 "eGeMAPS functionals with an RBF SVM).")
        parser.add_lightning_class_args(FigureCallback, "figures")
        parser.link_arguments("data.normalization", "model.normalization")
        parser.link_arguments("data.num_features", "model.num_features", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.pitch_rows", "model.pitch_rows", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with ``RandomStates`` (exact resume), ``ThrottledProgressBar`` unless bars are switched off
        or the configuration brings one, and loggers that claim their version folder atomically."""
        config = {**self.config_init.get("trainer", {}), **kwargs}
        given = config.get("callbacks") or []
        given = [*(given if isinstance(given, list) else [given]), RandomStates(), DivergenceCheck()]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            given.append(ThrottledProgressBar())
        kwargs["callbacks"] = given
        trainer = super().instantiate_trainer(**kwargs)
        claim_log_versions(trainer)
        return trainer


def claim_log_versions(trainer: Trainer) -> None:
    """Let each TensorBoard/CSV logger claim its ``version_N`` folder atomically when it first needs one.

    Lightning picks the next number by listing the folder, so runs started at once in one folder
    all take the same ``version_N`` (one ``config.yaml`` overwritten, their events mixed). The
    loggers here create the folder with ``os.mkdir`` instead (``allocate_version``), on the main
    process only (under DDP the other ranks follow its log folder); a given version is kept.
    """
    for logger in trainer.loggers:
        if isinstance(logger, (TensorBoardLogger, CSVLogger)) and "://" not in logger.root_dir:
            logger._get_next_version = partial(_claim_version, logger)  # what Lightning's `version` calls


def _claim_version(logger: TensorBoardLogger | CSVLogger) -> int:
    if rank_zero_only.rank != 0:
        return type(logger)._get_next_version(logger)
    return allocate_version(Path(logger.root_dir))


def allocate_version(root: Path) -> int:
    """The number of a new ``root/version_N`` folder, created here: one past the highest, the next free one if taken."""
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(match[1]) for name in os.listdir(root) if (match := re.fullmatch(r"version_(\d+)", name))]
    version = max(taken, default=-1) + 1
    while True:
        try:
            (root / f"version_{version}").mkdir()
        except FileExistsError:  # another run took it a moment ago
            version += 1
            continue
        return version


def build_cli(args: Sequence[str], *, prepare_data: bool = False) -> SERLightningCLI:
    """Parse ``args`` (``configs/demo.yaml`` when no ``--config`` is given) and instantiate trainer, model, data.

    The configuration is checked here: a bad value raises ``UsageError`` (or the ``ValueError`` of the
    check that names it) before anything is printed or written; a fit that would never train and log
    folders that cannot be written are refused.
    ``prepare_data``: also scan the corpus and load its features (``SERDataModule.setup``), so that a
    corpus that cannot be split as configured fails here too.
    """
    cache_cuda_check()  # Lightning is imported by now: its device-check setting is in place to revise
    quiet_lightning()
    args = with_default_config(list(args))
    try:
        with lines_held_until_accepted():
            cli = SERLightningCLI(
                SERModule, SERDataModule, args=args, run=False, seed_everything_default=0,
                auto_configure_optimizers=False, save_config_kwargs={"overwrite": True},
                parser_kwargs={"exit_on_error": False},
            )
            check_trains(cli.trainer)
            check_log_folders(cli.trainer)
            baseline_names(cli)
            if prepare_data:
                cli.datamodule.prepare_data()
                cli.datamodule.setup("fit")
    except (ArgumentError, MisconfigurationException) as error:
        raise UsageError(one_line(str(error))) from error
    return cli


def check_log_folders(trainer: Trainer) -> None:
    """The folders the trainer's loggers (and checkpoints) write to can be written."""
    check_writable(trainer.default_root_dir, "trainer.default_root_dir")
    for logger in trainer.loggers:
        if getattr(logger, "save_dir", None):
            check_writable(logger.save_dir, f"trainer.logger ({type(logger).__name__} save_dir)")


def check_trains(trainer: Trainer) -> None:
    """A fit that would never take an optimizer step is refused before it starts."""
    limits = {"trainer.max_epochs": trainer.max_epochs, "trainer.max_steps": trainer.max_steps,
              "trainer.limit_train_batches": trainer.limit_train_batches}
    for option, value in limits.items():
        if value == 0:
            raise UsageError(f"{option}=0: nothing would be trained; give at least 1 (or -1 for no limit where allowed)")


def baseline_names(cli: SERLightningCLI) -> list[str]:
    """The baselines the configuration asks for: --baselines then --baseline_extra (none with --baseline false)."""
    if not cli.config.baseline:
        return []
    for option in ("baselines", "baseline_extra"):
        unknown = [name for name in cli.config[option] if name not in BASELINES]
        if unknown:
            raise UsageError(f"--{option}: unknown {unknown}; choose from {list(BASELINES)}")
    return list(dict.fromkeys([*cli.config.baselines, *cli.config.baseline_extra]))


def dumped_config(cli: SERLightningCLI) -> dict:
    """The whole configuration a LightningCLI parsed, as plain values (link targets and nulls included)."""
    return yaml.safe_load(cli.parser.dump(cli.config, skip_link_targets=False, skip_none=False))
