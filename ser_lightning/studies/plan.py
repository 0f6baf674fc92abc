"""What a study runs and where: its settings (validated before any training), its runs, and its output folder.

``OUT/study.json`` records the configuration and code version a study was started with
(``run.identity``); a rerun into the same folder with another configuration is refused, naming the
options that differ, or goes to a new folder beside it with ``--new_out``. ``cv`` and ``tune`` both
plan their runs here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ser_lightning.errors import UsageError
from ser_lightning.outputs import atomic_write_text
from ser_lightning.run.fold import RunSpec
from ser_lightning.run.identity import STUDY_FILE, StudyMismatch, StudyRecord, describe
from ser_lightning.run.result import RESULT_FILE, RunResult


@dataclass(frozen=True)
class StudySettings:
    """A study's configuration, validated before any training: its folds, base seed and the whole configuration."""

    args: tuple[str, ...]
    num_folds: int
    base_seed: int
    config: dict


def study_settings(lightning_args: list[str], num_folds: int | None = None) -> StudySettings:
    """The study's settings (``num_folds``: ``--folds``, else the configuration's); parsing validates them."""
    from ser_lightning.parser import build_cli, dumped_config

    cli = build_cli([*lightning_args, *([f"--data.num_folds={num_folds}"] if num_folds else [])])
    if cli.config.data.test_root is not None:
        raise UsageError("data.test_root is set (cross-corpus evaluation has one train/test split, not folds); "
                         "use `fit` for it")
    if cli.trainer.world_size > 1:
        raise UsageError("trainer.devices / num_nodes > 1 is for `fit`: cv runs one process per run; use "
                         "--executor processes or ray to run runs in parallel")
    return StudySettings(tuple(lightning_args), int(cli.config.data.num_folds), int(cli.config.seed_everything),
                         dumped_config(cli))


def parse_folds(spec: str | None, num_folds: int) -> list[int]:
    """The folds ``--only`` names (all of them without it); UsageError naming a fold that does not exist."""
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
    for result in sorted(folder.glob(f"fold_*/{RESULT_FILE}")):
        return StudyRecord.from_result(RunResult.read(result))
    return None
