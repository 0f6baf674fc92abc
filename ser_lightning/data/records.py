"""Corpus-independent records: utterances, scan results, the corpus interface and the emotion vocabulary.

This module stays light (no torch, Lightning or matplotlib): corpus modules, the synthesizer and
tools that only list files import it.
"""
from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

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

    kind = "label not in the vocabulary"


class Excluded(Exception):
    """A well-formed file that belongs to another task (e.g. RAVDESS song files in a speech corpus).

    ``kind`` names the task for the summary of unused files (e.g. "RAVDESS song file").
    """

    def __init__(self, message: str, kind: str = "file of another task") -> None:
        super().__init__(message)
        self.kind = kind


# Kinds of unused files (``Skipped.kind``), as the summaries name them.
APPLEDOUBLE = "AppleDouble (._*)"
HIDDEN = "hidden file"
DANGLING_LINK = "dangling link"
LINK_LOOP = "link loop"
DUPLICATE = "duplicate"
UNREADABLE = "unreadable"
NOT_A_FILE = "not a regular file"
MALFORMED = "malformed name"
OUTSIDE_ROOT = "outside the corpus root"
UNUSABLE_AUDIO = "unusable audio"


class Skipped(NamedTuple):
    """A file found but not used: its path, why (one line naming the file) and the kind of reason for summaries."""

    path: Path
    reason: str
    kind: str


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
    """Utterances found in a corpus, the files (or manifest entries) skipped, and non-audio files ignored."""

    utterances: list[Utterance]
    skipped: list[Skipped] = field(default_factory=list)
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

    scan(root, emotions, lenient) finds its utterances; read_classes(root, allow_outside_root), for a
    corpus whose classes come from its data (``classes`` None), lists the vocabulary classes it uses;
    ``lists_paths``: the corpus lists its files in metadata (manifest, EmoBox), so its scan and
    read_classes also take ``allow_outside_root`` (listed files must lie inside the root unless it is true);
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
    read_classes: Callable[..., tuple[str, ...]] | None = None
    lists_paths: bool = False


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


@dataclass
class FolderListing:
    """The files under a folder: audio files to use, other files, and files that cannot be used (with reasons)."""

    audio: list[Path] = field(default_factory=list)
    other: list[Path] = field(default_factory=list)
    unused: list[Skipped] = field(default_factory=list)


def walk_folder(root: str | Path) -> FolderListing:
    """Every file under ``root`` at any depth, following links to folders and files, each folder and file once.

    Audio files (by extension) that can be opened are listed in ``audio``, other files in ``other``;
    everything else is listed in ``unused`` with its reason: AppleDouble (``._*``) and other hidden
    files, links whose target is missing (dangling) or that lead to themselves or back to a folder
    they lie in (a loop: reported once, not followed), a folder or file reached a second time (a
    duplicate: kept where it was reached without a link), files and folders the system refuses to
    read (with its reason), and things that are not regular files (pipes, sockets, devices). Paths
    are spelled through ``root`` (links are not resolved). OSError if ``root`` itself cannot be read.
    """
    root = Path(root)
    top = os.stat(root)
    os.scandir(root).close()  # the caller's error when the folder itself cannot be listed
    listing = FolderListing()
    folders: dict[tuple[int, int], Path] = {}
    files: list[tuple[bool, Path, tuple[int, int]]] = []  # (reached through a link, path, identity)
    real, linked = [(root, (_identity(top),))], []  # folders to list, with the identities of those they lie in
    while real or linked:
        through_link = not real  # folders reached without a link first: they keep their own paths
        folder, above = (real or linked).pop()
        if above[-1] in folders:
            listing.unused.append(Skipped(folder, f"{folder}: the same folder as '{folders[above[-1]]}' (listed "
                                                  "there)", DUPLICATE))
            continue
        folders[above[-1]] = folder
        try:
            with os.scandir(folder) as scan:
                names = sorted(entry.name for entry in scan)
        except OSError as error:
            listing.unused.append(Skipped(folder, f"{folder}: cannot list this folder ({error.strerror})", UNREADABLE))
            continue
        for name in names:
            path = folder / name
            info = _stat(path, listing.unused)
            if info is None:
                continue
            if stat.S_ISDIR(info.st_mode):
                if _identity(info) in above:
                    listing.unused.append(Skipped(path, f"{path}: a link back to '{folders[_identity(info)]}', a "
                                                        "folder it lies in (a loop: not followed)", LINK_LOOP))
                else:
                    (linked if through_link or path.is_symlink() else real).append((path, (*above, _identity(info))))
            elif not stat.S_ISREG(info.st_mode):
                listing.unused.append(Skipped(path, f"{path}: not a regular file", NOT_A_FILE))
            elif name.startswith("._"):
                listing.unused.append(Skipped(path, f"{path}: AppleDouble metadata left by macOS, not audio",
                                              APPLEDOUBLE))
            elif name.startswith("."):
                listing.unused.append(Skipped(path, f"{path}: a hidden file", HIDDEN))
            else:
                files.append((through_link or path.is_symlink(), path, _identity(info)))
    _sort_files(files, listing)
    return listing


def _sort_files(files: list[tuple[bool, Path, tuple[int, int]]], listing: FolderListing) -> None:
    """Each file once (where reached without a link, if it was): audio, other or unused (duplicate, unreadable)."""
    kept: dict[tuple[int, int], Path] = {}
    for _, path, identity in sorted(files):
        if identity in kept:
            listing.unused.append(Skipped(path, f"{path}: the same file as '{kept[identity]}' (used once)", DUPLICATE))
            continue
        kept[identity] = path
        if path.suffix.lower() not in AUDIO_SUFFIXES:
            listing.other.append(path)
        elif (problem := _unreadable(path)) is not None:
            listing.unused.append(Skipped(path, f"{path}: cannot be read ({problem})", UNREADABLE))
        else:
            listing.audio.append(path)
    listing.audio.sort()
    listing.other.sort()
    listing.unused.sort()


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def _stat(path: Path, unused: list[Skipped]) -> os.stat_result | None:
    """The status of ``path`` through links; None (and the reason appended to ``unused``) when there is none."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            target = os.readlink(path)
            unused.append(Skipped(path, f"{path}: a link to '{target}', which does not exist", DANGLING_LINK))
            return None
        reason = "it disappeared while the folder was read"
    except OSError as error:
        if error.errno == errno.ELOOP:
            unused.append(Skipped(path, f"{path}: a link that leads back to itself ({error.strerror})", LINK_LOOP))
            return None
        reason = error.strerror or str(error)
    unused.append(Skipped(path, f"{path}: cannot be read ({reason})", UNREADABLE))
    return None


def _unreadable(path: Path) -> str | None:
    """The system's reason why ``path`` cannot be opened for reading, or None."""
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError as error:
        return error.strerror or str(error)
    return None


def listed_path(entry: str, base: Path) -> Path:
    """The path a manifest entry names: ``~`` expanded, relative entries taken from ``base``, ``..`` collapsed.

    Links are not resolved: the result is what the entry spells, so that ``within`` can check it.
    """
    return Path(os.path.normpath(base / Path(entry).expanduser()))


def within(path: Path, roots: Sequence[Path]) -> bool:
    """Whether ``path`` (as ``listed_path`` spells it) lies inside one of ``roots`` (a folder, spelled several ways)."""
    return any(path.is_relative_to(root) for root in roots)


def unused_summary(skipped: Sequence[Skipped], ignored: Sequence[Path] = (), examples: int = 5) -> list[str]:
    """Lines counting the files not used, one per kind of reason, each with up to ``examples`` of their reasons."""
    by_kind: dict[str, list[Skipped]] = {}
    for entry in skipped:
        by_kind.setdefault(entry.kind, []).append(entry)
    lines = []
    for kind, entries in sorted(by_kind.items(), key=lambda item: (-len(item[1]), item[0])):
        lines.append(f"{len(entries)} {kind}:")
        lines += [f"    {entry.reason}" for entry in entries[:examples]]
        if len(entries) > examples:
            lines.append(f"    ... and {len(entries) - examples} more")
    if ignored:
        kinds = Counter(path.suffix.lower() or "(no extension)" for path in ignored)
        lines.append(f"{len(ignored)} non-audio (" + ", ".join(f"{ext} x{n}" for ext, n in sorted(kinds.items())) + ")")
    return lines


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

    Files are found by ``walk_folder`` (links followed; hidden files, dangling links, loops and
    unreadable files are skipped and listed). ``parse`` raises CorpusError for a malformed name
    (fatal, or skipped and listed with ``lenient``), NotInVocabulary for a valid file whose emotion
    the vocabulary lacks and Excluded for a file of another task (both always skipped and listed).
    Files of unwanted emotions are simply not selected; non-audio files are listed in ``ignored``.
    An empty selection raises CorpusError naming the folder and an example name.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CorpusError(f"data.root: '{root}' is not a folder")
    try:
        listing = walk_folder(root)
    except OSError as error:
        raise CorpusError(f"data.root: cannot read the folder '{root}' ({error.strerror or error})") from error
    wanted = set(emotions)
    result = ScanResult([], skipped=listing.unused, ignored=listing.other)
    for path in listing.audio:
        try:
            utterance = parse(path)
        except (NotInVocabulary, Excluded) as reason:
            result.skipped.append(Skipped(path, str(reason), reason.kind))
            continue
        except CorpusError as err:
            if not lenient:
                raise CorpusError(f"{err} (set data.lenient=true to skip such files)") from err
            result.skipped.append(Skipped(path, str(err), MALFORMED))
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
