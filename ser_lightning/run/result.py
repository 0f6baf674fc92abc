"""``RunResult``: what one run of a study wrote to ``FOLDER/result.json``, and the one place that file is read.

The file is the record's fields as JSON keys, ``format_version`` first (``RESULT_FORMAT``). Files written
before results had a version carry none: they are read as format 0, in which the fields added over time
(those with defaults: the calibration, the network weight, the seconds of the whole run, ...) may be
missing. A file of a newer format, or one that lacks a required field, is a ``DataError`` naming the file.
Readers use the record's attributes; this module is the only reader of the file.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ser_lightning.errors import DataError, os_error_text

RESULT_FILE = "result.json"
RESULT_FORMAT = 1
"""The format ``RunResult.to_json`` writes; 0 is that of the files written before results had a version."""
UNVERSIONED = 0


def _read_fields(cls: type, data: dict, source: str | Path, what: str) -> dict[str, Any]:
    """The values of ``cls``'s fields in ``data`` (other keys are left out); DataError naming the missing ones."""
    if not isinstance(data, dict):
        raise DataError(f"{source}: not a run result ({what} is a {type(data).__name__}, not a mapping)")
    known = fields(cls)
    missing = [f.name for f in known if f.name not in data and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise DataError(f"{source}: not a complete run result ({what} lacks {', '.join(missing)})")
    return {f.name: data[f.name] for f in known if f.name in data}


@dataclass(frozen=True, kw_only=True)
class BaselineScores:
    """One linear baseline on the run's split: the C it chose, how, and its validation and test scores."""

    C: float  # noqa: N815 (scikit-learn's name)
    selection: str
    val_metrics: dict[str, float] | None = None  # None when C was chosen by inner cross-validation
    metrics: dict[str, float]
    per_class_recall: dict[str, float]
    confusion_matrix: list[list[int]] | None = None


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """One run (fold, repeat) of a study: its configuration, the test and validation scores of the checkpoint its
    validation speakers chose, the baselines on the same split, the predictions, and how the run went."""

    format_version: int = RESULT_FORMAT
    fold: int
    repeat: int = 0
    num_folds: int
    config_key: str  # ``identity.config_key``: equal for the runs of one report
    tuned: dict[str, Any] = field(default_factory=dict)  # options a nested search chose for this fold
    config: dict[str, Any]
    protocol: str
    speaker_dependent: bool
    seed_everything: int
    data_random_seed: int
    class_names: list[str]
    metrics: dict[str, float]  # WA, UA, F1 on the test speakers
    val_metrics: dict[str, float] = field(default_factory=dict)
    per_class_recall: dict[str, float]
    confusion_matrix: list[list[int]]
    baselines: dict[str, BaselineScores] = field(default_factory=dict)
    num_test_utterances: int
    test_utterances: list[str]
    test_labels: list[int] | None = None
    test_probabilities: list[list[float]] | None = None  # after temperature scaling
    test_logits: list[list[float]] | None = None
    test_parts: dict[str, list[list[float]]] = field(default_factory=dict)  # each head's own logits
    val_logits: list[list[float]] | None = None
    val_labels: list[int] | None = None
    val_parts: dict[str, list[list[float]]] = field(default_factory=dict)
    temperature: float | None = None
    network_weight: float | None = None
    calibration: dict[str, Any] | None = None  # ``calibration.calibration_summary`` of the test predictions
    head_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    train_speakers: list[str] = field(default_factory=list)
    val_speakers: list[str] = field(default_factory=list)
    test_speakers: list[str]
    shared_speakers: list[str] = field(default_factory=list)
    best_checkpoint: str | None = None
    best_val_UA: float | None = None  # noqa: N815 (the metric's name)
    epochs_trained: int
    resumed_from_epoch: int | None = None
    code: dict[str, Any] = field(default_factory=dict)  # ``identity.code_version`` of the code that ran it
    wall_seconds: float  # fitting and evaluating the model
    run_seconds: float | None = None  # the whole run: data, model, baselines

    @property
    def seconds(self) -> float:
        """How long the whole run took (the model's fit and evaluation alone for results that predate that count)."""
        return self.wall_seconds if self.run_seconds is None else self.run_seconds

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, source: str | Path) -> RunResult:
        """The result in ``text`` (read from ``source``, which error messages name)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{source}: not a run result (not JSON: {error})") from None
        if not isinstance(data, dict):
            raise DataError(f"{source}: not a run result (a JSON {type(data).__name__}, not an object)")
        version = data.get("format_version", UNVERSIONED)
        if not isinstance(version, int) or isinstance(version, bool) or version < UNVERSIONED:
            raise DataError(f"{source}: not a run result (format_version {version!r})")
        if version > RESULT_FORMAT:
            raise DataError(f"{source}: a run result of format {version}, newer than this version of ser-lightning "
                            f"reads (up to {RESULT_FORMAT}); read it with the version that wrote it")
        values = _read_fields(cls, data, source, "the file")
        values["format_version"] = version
        values["baselines"] = {name: BaselineScores(**_read_fields(BaselineScores, entry, source, f"baseline {name}"))
                               for name, entry in (data.get("baselines") or {}).items()}
        return cls(**values)

    @classmethod
    def read(cls, path: Path) -> RunResult:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise DataError(f"run result: cannot be read ({os_error_text(error, path)})") from error
        except UnicodeDecodeError:
            raise DataError(f"{path}: not a run result (not UTF-8 text)") from None
        return cls.from_json(text, path)


def load_result(folder: Path) -> RunResult | None:
    """The result of the run whose folder is ``folder``, or None while the run has not finished."""
    path = folder / RESULT_FILE
    return RunResult.read(path) if path.exists() else None
