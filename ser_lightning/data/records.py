"""Corpus-independent utterance record and the common emotion vocabulary."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EMOTIONS: tuple[str, ...] = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")
DEFAULT_EMOTIONS: tuple[str, ...] = ("neutral", "happy", "sad", "angry")
AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".ogg"})


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


@dataclass
class ScanResult:
    """Utterances found in a corpus folder and the files skipped (path, reason)."""

    utterances: list[Utterance]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


class NotInVocabulary(Exception):
    """A well-formed file whose emotion has no counterpart in the common vocabulary (e.g. EmoDB boredom)."""


def decode_code(code: str, table: Mapping[str, Any], what: str, path: Path) -> Any:
    """Look up one code of a file name; CorpusError naming the file and the expected codes if unknown."""
    if code not in table:
        raise CorpusError(f"{path}: unknown {what} code '{code}' (expected one of {sorted(table)})")
    return table[code]


def iter_audio_files(root: Path) -> list[Path]:
    """All audio files under ``root`` (any nesting), sorted; hidden files are ignored."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in AUDIO_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def scan_folder(
    root: str | Path,
    parse: Callable[[Path], Utterance],
    emotions: Sequence[str],
    *,
    lenient: bool,
    corpus: str,
    example: str,
    keep: Callable[[Utterance], bool] | None = None,
) -> ScanResult:
    """Parse every audio file under ``root`` into an Utterance and keep the wanted emotions
    (and, with ``keep``, only the utterances it accepts; the others are ignored silently).

    ``parse`` raises CorpusError for a malformed name (fatal, or skipped and listed with
    ``lenient``) and NotInVocabulary for a valid file whose emotion the vocabulary lacks (always
    skipped and listed). An empty selection raises CorpusError naming the folder and an example name.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CorpusError(f"data.root: '{root}' is not a folder")
    wanted = set(emotions)
    utterances: list[Utterance] = []
    skipped: list[tuple[Path, str]] = []
    for path in iter_audio_files(root):
        try:
            utterance = parse(path)
        except NotInVocabulary as reason:
            skipped.append((path, str(reason)))
            continue
        except CorpusError as err:
            if not lenient:
                raise CorpusError(f"{err} (set data.lenient=true to skip such files)") from None
            skipped.append((path, str(err)))
            continue
        if utterance.emotion in wanted and (keep is None or keep(utterance)):
            utterances.append(utterance)
    if not utterances:
        raise CorpusError(
            f"no {corpus} files with emotions {sorted(wanted)} found under '{root}' "
            f"(looked for audio files named like {example} in any subfolder)"
        )
    utterances.sort(key=lambda u: str(u.path))
    return ScanResult(utterances, skipped)


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
