"""Corpus-independent utterance record and the common emotion vocabulary."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EMOTIONS: tuple[str, ...] = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")
DEFAULT_EMOTIONS: tuple[str, ...] = ("neutral", "happy", "sad", "angry")


class CorpusError(ValueError):
    """A corpus folder or file name does not follow the expected layout."""


@dataclass(frozen=True)
class Utterance:
    """One labelled audio file of a corpus."""

    path: Path
    emotion: str
    speaker: str
    sex: str | None
    corpus: str
    fields: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


def resolve_emotions(spec: str | Sequence[str], option: str = "data.emotions") -> tuple[str, ...]:
    """Turn "default", "all", a comma-separated string or a list of names into emotion names.

    The result keeps the order of ``EMOTIONS`` so that class indices do not depend on how the
    user wrote the list.
    """
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key == "default":
            return DEFAULT_EMOTIONS
        if key == "all":
            return EMOTIONS
        names = [part.strip().lower() for part in key.split(",") if part.strip()]
    else:
        names = [str(name).strip().lower() for name in spec]
    if not names:
        raise ValueError(f"{option}: empty emotion list; use 'default', 'all' or names from {list(EMOTIONS)}")
    unknown = [name for name in names if name not in EMOTIONS]
    if unknown:
        raise ValueError(f"{option}: unknown emotion(s) {unknown}; valid names are {list(EMOTIONS)}, 'default' or 'all'")
    if len(set(names)) < 2:
        raise ValueError(f"{option}: at least two different emotions are needed, got {names}")
    return tuple(name for name in EMOTIONS if name in names)
