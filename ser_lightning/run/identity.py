"""What a study is: the configuration (and code version) its runs were made with, and how two of them differ.

A run's configuration is the whole LightningCLI configuration it was parsed into. What tells one
study from another is that configuration without the options that differ between the runs of one
study by design (``RUN_OPTIONS``: the fold, where logs go, the progress bar, the feature cache) and
without the options a nested search chooses per fold (``tuned``). ``config_key`` hashes it (without
the seed too, which repeats vary) for the runs of one report; ``StudyRecord`` keeps it, with the
seed, the command and the code version, in ``OUT/study.json`` (written by ``studies.plan.open_study``).
Every run records its key and code version in its result, so this module sits with the run, below the studies.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ser_lightning.run.result import RunResult

STUDY_FILE = "study.json"
FORMAT = 1
RUN_OPTIONS = ("config", "data.fold", "data.cache_dir", "trainer.logger", "trainer.default_root_dir",
               "trainer.enable_progress_bar")
"""Options that differ between the runs of one study by design (or do not change results)."""
SEED = "seed_everything"
MAX_LISTED = 8
_UNSET = object()


class StudyMismatch(ValueError):
    """Runs or a study folder come from another configuration than the one at hand."""


def study_config(config: dict, tuned: tuple[str, ...] = ()) -> dict:
    """The configuration without ``RUN_OPTIONS`` and the ``tuned`` options (dotted names), as plain JSON values."""
    config = _plain(config)
    for name in (*RUN_OPTIONS, *tuned):
        *sections, option = name.split(".")
        section = config
        for key in sections:
            section = section.get(key, {}) if isinstance(section, dict) else {}
        if isinstance(section, dict):
            section.pop(option, None)
    return config


def config_key(config: dict, tuned: tuple[str, ...] = ()) -> str:
    """Hash of everything in the configuration that must agree across the runs of one report (seeds may differ)."""
    comparable = study_config(config, tuned)
    comparable.pop(SEED, None)
    return hashlib.sha256(json.dumps(comparable, sort_keys=True).encode()).hexdigest()[:16]


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted names (``{"model": {"width": 1}}`` -> ``{"model.width": 1}``); lists stay whole."""
    if not isinstance(config, dict) or (prefix and not config):
        return {prefix: config}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def differences(old: dict, new: dict) -> list[str]:
    """``name: old -> new`` for every dotted option whose value differs (``(unset)`` where one side lacks it)."""
    before, after = flatten(old), flatten(new)
    return [f"{name}: {_shown(before.get(name, _UNSET))} -> {_shown(after.get(name, _UNSET))}"
            for name in sorted(before.keys() | after.keys()) if before.get(name, _UNSET) != after.get(name, _UNSET)]


def run_differences(first: RunResult, other: RunResult) -> list[str]:
    """How the configuration of run ``other`` differs from ``first``'s (seeds and tuned options aside)."""
    tuned = tuple({*first.tuned, *other.tuned})
    before, after = (study_config(run.config, tuned) for run in (first, other))
    for config in (before, after):
        config.pop(SEED, None)  # repeats differ in it by design
    return differences(before, after)


def describe(changes: list[str]) -> str:
    """The differences on one line, the first ``MAX_LISTED`` of them."""
    more = f", and {len(changes) - MAX_LISTED} more" if len(changes) > MAX_LISTED else ""
    return ", ".join(changes[:MAX_LISTED]) + more


def _shown(value: Any) -> str:
    if value is _UNSET:
        return "(unset)"
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


@functools.cache
def code_version() -> dict[str, str | None]:
    """The package version, a hash of the package's Python sources and, in a git checkout, its commit."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    try:
        version = importlib.metadata.version("ser_lightning")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"package": version, "sources": digest.hexdigest()[:16], "git_commit": _git_commit(package.parent)}


def _git_commit(folder: Path) -> str | None:
    if not (folder / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


@dataclass(frozen=True)
class StudyRecord:
    """What ``OUT/study.json`` holds: the command, its configuration (``study_config``, with the seed), the
    searched space of a nested search, and the code version that started the study.

    A field a record lacks (``space`` None: a study folder of an earlier version) constrains nothing.
    """

    command: str
    config: dict
    space: dict | None = None
    code: dict = field(default_factory=code_version)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    format: int = FORMAT

    def __post_init__(self) -> None:  # plain JSON values, as a record read back from its file has
        object.__setattr__(self, "config", _plain(self.config))
        object.__setattr__(self, "space", None if self.space is None else _plain(self.space))

    def differences(self, other: StudyRecord) -> list[str]:
        """How ``other`` differs from this record in what makes a study (not in code version or date)."""
        changes = [] if self.command == other.command else [f"command: {self.command} -> {other.command}"]
        changes += differences(self.config, other.config)
        if self.space is not None and other.space is not None:
            changes += differences({"space": self.space}, {"space": other.space})
        return changes

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: Path) -> StudyRecord:
        """The record in ``text`` (read from ``source``); StudyMismatch naming the file if it is not one."""
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
            return cls(command=str(data["command"]), config=dict(data["config"]), space=data.get("space"),
                       code=dict(data.get("code") or {}), created=str(data.get("created", "")))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise StudyMismatch(f"{source}: not a study record ({type(error).__name__}: {error}); "
                                "move the folder aside or choose another --out") from error

    @classmethod
    def from_result(cls, result: RunResult) -> StudyRecord:
        """The record of a study folder without ``study.json`` (made by an earlier version), from one of its runs."""
        config = study_config(result.config, tuple(result.tuned))
        config[SEED] = result.seed_everything - result.repeat
        return cls(command="tune" if result.tuned else "cv", config=config, code=result.code, created="")
