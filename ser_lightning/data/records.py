"""Corpus-independent records: utterances, scan results, the corpus interface and the emotion vocabulary.

This module stays light (no torch, Lightning or matplotlib): corpus modules, the synthesizer and
tools that only list files import it.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import soundfile

from ser_lightning.errors import DataError

EMOTIONS: tuple[str, ...] = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")
DEFAULT_EMOTIONS: tuple[str, ...] = ("neutral", "happy", "sad", "angry")
# Every container libsndfile decodes (WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF, CAF, ...); headerless raw is left out.
AUDIO_SUFFIXES = frozenset(
    {f".{name.lower()}" for name in soundfile.available_formats() if name != "RAW"} | {".aif", ".opus", ".oga"}
)


class CorpusError(DataError, ValueError):
    """A corpus folder or file name does not follow the expected layout."""


class NotInVocabulary(Exception):
    """A well-formed file whose emotion has no counterpart in the common vocabulary (e.g. EmoDB boredom)."""


class Excluded(Exception):
    """A well-formed file that belongs to another task (e.g. RAVDESS song files in a speech corpus)."""


@dataclass(frozen=True)
class Utterance:
    """One labelled audio file of a corpus; ``fields`` holds what its name (or manifest row) encodes."""

    path: Path
    emotion: str
    speaker: str
    sex: str | None
    corpus: str
    fields: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class ScanResult:
    """Utterances found in a corpus folder, files skipped (path, reason) and non-audio files ignored."""

    utterances: list[Utterance]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class SyntheticSpeaker:
    """A speaker of a synthetic corpus: the corpus's own id, a sex, and the synthesizer's voice number."""

    id: str
    sex: str
    voice: int


@dataclass(frozen=True)
class SyntheticFile:
    """One file of a synthetic corpus: where it goes, what it says, and the key of its random generator."""

    relpath: str
    emotion: str
    strong: bool
    statement: int
    random_key: tuple[int, ...]
    take: int = 0


@dataclass(frozen=True)
class Corpus:
    """Everything about one corpus: its names, classes, speakers and the layout the synthesizer writes.

    scan(root, emotions, lenient) finds its utterances; read_classes(root), for a corpus whose
    classes come from its data (``classes`` None), lists the vocabulary classes it uses;
    synthetic_speakers(count) and synthetic_files(speaker, emotions) describe a synthetic copy;
    write_synthetic_metadata(out_dir, rows), when set, writes the corpus's side files (rows:
    (file, speaker) pairs).
    """

    name: str
    title: str
    classes: tuple[str, ...] | None  # None: read from the data (read_classes)
    example: str
    scan: Callable[..., ScanResult]
    synthetic_speakers: Callable[[int], list[SyntheticSpeaker]]
    synthetic_files: Callable[[SyntheticSpeaker, Sequence[str]], list[SyntheticFile]]
    default_speakers: int
    max_speakers: int
    root_is_file: bool = False
    write_synthetic_metadata: Callable[[Path, list[tuple[SyntheticFile, SyntheticSpeaker]]], None] | None = None
    read_classes: Callable[[Path], tuple[str, ...]] | None = None


SYNTHETIC_TAKES = 3
"""Files per speaker and emotion in the synthetic layouts of corpora other than RAVDESS."""


def synthetic_voices(ids_and_sexes: Sequence[tuple[str, str]]) -> list[SyntheticSpeaker]:
    """Speakers in order with their synthesizer voices (odd voice numbers male, even female)."""
    return [
        SyntheticSpeaker(speaker, sex, 2 * position + (1 if sex == "male" else 2))
        for position, (speaker, sex) in enumerate(ids_and_sexes)
    ]


def synthetic_takes(
    speaker: SyntheticSpeaker, emotions: Sequence[str], corpus_number: int, relpath: Callable[[str, int, bool], str]
) -> list[SyntheticFile]:
    """SYNTHETIC_TAKES files per emotion: take 0 and 1 normal (statements 1, 2), take 2 strong (but neutral).

    ``relpath(emotion, take, strong)`` names the file by the corpus's convention; ``corpus_number``
    keeps the random generators of different corpora apart.
    """
    files = []
    for emotion in emotions:
        for take in range(SYNTHETIC_TAKES):
            strong = take == 2 and emotion != "neutral"
            key = (corpus_number, speaker.voice, EMOTIONS.index(emotion), take)
            files.append(SyntheticFile(relpath(emotion, take, strong), emotion, strong, take % 2 + 1, key, take))
    return files


def decode_code(code: str, table: Mapping[str, Any], what: str, path: Path) -> Any:
    """Look up one code of a file name; CorpusError naming the file and the expected codes if unknown."""
    if code not in table:
        raise CorpusError(f"{path}: unknown {what} code '{code}' (expected one of {sorted(table)})")
    return table[code]


def list_files(root: Path) -> tuple[list[Path], list[Path]]:
    """(audio files, other files) under ``root`` at any depth, sorted; hidden files are left out."""
    audio, other = [], []
    for path in sorted(root.rglob("*")):
        if path.name.startswith(".") or not path.is_file():
            continue
        (audio if path.suffix.lower() in AUDIO_SUFFIXES else other).append(path)
    return audio, other


def scan_folder(
    root: str | Path,
    parse: Callable[[Path], Utterance],
    emotions: Sequence[str],
    *,
    lenient: bool,
    corpus: str,
    example: str,
) -> ScanResult:
    """Parse every audio file under ``root`` into an Utterance and keep the wanted emotions.

    ``parse`` raises CorpusError for a malformed name (fatal, or skipped and listed with
    ``lenient``), NotInVocabulary for a valid file whose emotion the vocabulary lacks and Excluded
    for a file of another task (both always skipped and listed). Files of unwanted emotions are
    simply not selected; non-audio files are listed in ``ignored``. An empty selection raises
    CorpusError naming the folder and an example name.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CorpusError(f"data.root: '{root}' is not a folder")
    wanted = set(emotions)
    audio, other = list_files(root)
    result = ScanResult([], ignored=other)
    for path in audio:
        try:
            utterance = parse(path)
        except (NotInVocabulary, Excluded) as reason:
            result.skipped.append((path, str(reason)))
            continue
        except CorpusError as err:
            if not lenient:
                raise CorpusError(f"{err} (set data.lenient=true to skip such files)") from err
            result.skipped.append((path, str(err)))
            continue
        if utterance.emotion in wanted:
            result.utterances.append(utterance)
    if not result.utterances:
        raise CorpusError(
            f"no {corpus} files with emotions {sorted(wanted)} found under '{root}' "
            f"(looked for audio files named like {example} in any subfolder)"
        )
    result.utterances.sort(key=lambda u: str(u.path))
    return result


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
