"""EmoBox data folders: the benchmark's manifests, labels, speakers and folds (Ma et al., Interspeech 2024).

``data.root`` is one dataset's folder of the EmoBox repository, e.g. ``EmoBox/data/ravdess``. Read:

- ``fold_K/<dataset>_train_fold_K.jsonl`` and ``fold_K/<dataset>_test_fold_K.jsonl`` for K = 1..n
  (and ``<dataset>_valid_fold_K.jsonl`` where a dataset has an official validation split): one JSON
  object per line with ``key`` (unique id), ``wav`` (audio path) and ``emo`` (the dataset's label);
  ``speaker`` or ``spk``, ``gender`` or ``sex`` are used when present; ``type`` must be ``raw`` and
  segments (``start_time``/``end_time``) are refused (whole files are read). The other fields
  (``dataset``, ``sample_rate``, ``length``, ``num_frame``, ``task``, ``channel``) are not needed:
  audio is decoded, resampled and down-mixed as for every corpus. The ``.json`` copies are not read.
- ``label_map.json`` (when present): the dataset's labels -> EmoBox's names (e.g. ``Fearful`` ->
  ``Fear``, IEMOCAP ``exc`` -> ``Happy``); those names are mapped onto the project's vocabulary
  (``LABEL_ALIASES``). Names the vocabulary lacks (``OUT_OF_VOCABULARY``: boredom, contempt, ...) are
  skipped and listed, like EmoDB's boredom; any other label is an error naming the file and line.
- Speakers: the record's own ``speaker``/``spk`` field, else ``data.seg.wrd.stm`` of the dataset
  folder (``key channel speaker start end <...> label`` per line, as EmoBox writes it), else the
  actor of a RAVDESS-style file name. A record whose speaker cannot be found is an error.
- Relative ``wav`` paths are EmoBox's (``downloads/<dataset>/...``, relative to the EmoBox folder):
  each is looked up under ``data.root``, then under the two folders above it (``EmoBox/data`` and
  ``EmoBox``). Every path must lie inside the EmoBox folder (the one two above ``data.root``; ``..``
  that climbs out of it, or an absolute path elsewhere, is a bad record that is never opened) unless
  ``data.allow_outside_root`` is true, which also looks under every folder above ``data.root``.

Each utterance keeps its place in the benchmark's folds in ``fields[SPLIT_FIELD]``: per fold, the
split (``train``, ``valid``, ``test``) or None. ``data.protocol: emobox`` uses those folds as given
(``ser_lightning.data.folds``); EmoBox partitions some datasets by speaker and others at random, so
the fold plan reports every fold that puts a speaker in both training and test.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .ravdess import parse_ravdess_name
from .records import (
    EMOTIONS, OUTSIDE_ROOT, Corpus, CorpusError, NotInVocabulary, ScanResult, Skipped, SyntheticFile,
    SyntheticSpeaker, Utterance, listed_path, synthetic_takes, synthetic_voices, within,
)

SPLIT_FIELD = "emobox_splits"
SPLITS = ("train", "valid", "test")
LABEL_MAP = "label_map.json"
SPEAKER_FILE = "data.seg.wrd.stm"
FOLD_FOLDER = re.compile(r"fold_(\d+)")
LABEL_ALIASES = {
    "neutral": "neutral", "neu": "neutral", "calm": "calm",
    "happy": "happy", "happiness": "happy", "hap": "happy", "joy": "happy",
    "sad": "sad", "sadness": "sad",
    "angry": "angry", "anger": "angry", "ang": "angry",
    "fear": "fearful", "fearful": "fearful", "fea": "fearful",
    "disgust": "disgust", "disgusted": "disgust", "dis": "disgust",
    "surprise": "surprised", "surprised": "surprised", "sur": "surprised",
}
"""EmoBox's label names (lower case) -> the vocabulary."""
OUT_OF_VOCABULARY = frozenset({"boredom", "contempt", "excited", "frustrated", "other", "unknown"})
"""EmoBox label names that the vocabulary lacks: their records are skipped and listed, never an error."""
SEXES = {"male": "male", "m": "male", "female": "female", "f": "female"}
MAX_LISTED = 20
BAD_RECORD = "bad EmoBox record"


@dataclass
class _Record:
    """One utterance as the fold files list it, with its split in each fold."""

    key: str
    data: dict[str, Any]
    source: str  # "file line N" of its first listing
    splits: list[str | None]
    problems: list[str] = field(default_factory=list)


def fold_folders(root: str | Path) -> list[Path]:
    """``fold_1`` .. ``fold_n`` of an EmoBox dataset folder; CorpusError if there are none or some are missing."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CorpusError(f"data.root: '{root}' is not a folder")
    found = {int(match.group(1)): path for path in root.iterdir()
             if path.is_dir() and (match := FOLD_FOLDER.fullmatch(path.name))}
    if not found:
        raise CorpusError(f"data.root: '{root}' has no fold_K folders (an EmoBox dataset folder such as "
                          "EmoBox/data/ravdess holds fold_1/ravdess_train_fold_1.jsonl, fold_1/ravdess_test_fold_1.jsonl, ...)")
    if sorted(found) != list(range(1, len(found) + 1)):
        raise CorpusError(f"{root}: the fold folders {sorted(p.name for p in found.values())} are not fold_1 .. "
                          f"fold_{len(found)}")
    return [found[number] for number in sorted(found)]


def _fold_files(folder: Path, number: int) -> dict[str, Path]:
    files = {}
    for split in SPLITS:
        matches = sorted(folder.glob(f"*_{split}_fold_{number}.jsonl"))
        if len(matches) > 1:
            raise CorpusError(f"{folder}: several {split} files {[p.name for p in matches]}")
        if matches:
            files[split] = matches[0]
    for split in ("train", "test"):
        if split not in files:
            raise CorpusError(f"{folder}: no <dataset>_{split}_fold_{number}.jsonl")
    return files


def _read_label_map(root: Path) -> dict[str, str] | None:
    path = root / LABEL_MAP
    if not path.is_file():
        return None
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorpusError(f"{path}: cannot read it ({error})") from error
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise CorpusError(f"{path}: expected a JSON object mapping the dataset's labels to label names")
    return {str(k): v for k, v in mapping.items()}


def _read_speakers(root: Path) -> dict[str, str]:
    """key -> speaker from ``data.seg.wrd.stm`` (third field of each line), when the file exists."""
    path = root / SPEAKER_FILE
    if not path.is_file():
        return {}
    speakers = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 3:
            speakers[parts[0]] = parts[2]
    return speakers


def _read_folds(root: Path) -> dict[str, _Record]:
    """Every record of every fold file, with its split per fold (problems are kept on the records)."""
    folders = fold_folders(root)
    records: dict[str, _Record] = {}
    for fold, folder in enumerate(folders):
        for split, path in _fold_files(folder, fold + 1).items():
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as error:
                raise CorpusError(f"{path}: cannot read it ({error})") from error
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"{path} line {number}"
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as error:
                    raise CorpusError(f"{where}: not a JSON object ({error})") from error
                missing = [name for name in ("key", "wav", "emo") if not isinstance(data, dict) or not data.get(name)]
                if missing:
                    raise CorpusError(f"{where}: missing field(s) {missing} (EmoBox lines have key, wav, emo, ...)")
                key = str(data["key"])
                record = records.setdefault(key, _Record(key, data, where, [None] * len(folders)))
                if (record.data["wav"], record.data["emo"]) != (data["wav"], data["emo"]):
                    record.problems.append(f"{where}: '{key}' disagrees with {record.source} (wav or emo)")
                if record.splits[fold] is not None:
                    record.problems.append(f"{where}: '{key}' is listed twice in fold_{fold + 1} "
                                           f"({record.splits[fold]} and {split})")
                record.splits[fold] = split
    return records


def _vocabulary_label(record: _Record, label_map: dict[str, str] | None, root: Path) -> str | None:
    """The record's vocabulary emotion; None for a known out-of-vocabulary name; a problem otherwise."""
    raw = str(record.data["emo"])
    name = raw
    if label_map is not None:
        if raw not in label_map:
            record.problems.append(f"{record.source}: label '{raw}' is not in {root / LABEL_MAP}")
            return None
        name = label_map[raw]
    key = name.strip().lower()
    if key in LABEL_ALIASES:
        return LABEL_ALIASES[key]
    if key not in OUT_OF_VOCABULARY:
        record.problems.append(f"{record.source}: label '{raw}' ({name}) has no counterpart in the vocabulary "
                               f"{list(EMOTIONS)} (known names: {sorted(LABEL_ALIASES)})")
    return None


def _search_folders(root: Path, allow_outside_root: bool) -> tuple[list[Path], tuple[Path, ...] | None]:
    """(folders a relative ``wav`` path is looked up under, the EmoBox folder (two spellings) or None: anywhere)."""
    root = root.absolute()
    if allow_outside_root:
        return [root, *root.parents], None
    bases = [root, *root.parents][:3]  # EmoBox/data/<dataset>, EmoBox/data, EmoBox
    return bases, (bases[-1], bases[-1].resolve())


def _audio_path(wav: str, bases: Sequence[Path], top: Sequence[Path] | None) -> Path | Skipped:
    """The audio file a record names (under the first base that has it), or why there is none."""
    candidates = [listed_path(wav, base) for base in bases]  # an absolute path is the same under every base
    if top is not None:
        candidates = [path for path in candidates if within(path, top)]
        if not candidates:
            return Skipped(Path(wav), f"audio path '{wav}' is outside the EmoBox folder {top[0]} "
                                      "(set data.allow_outside_root=true to use files elsewhere)", OUTSIDE_ROOT)
    found = next((path.resolve() for path in candidates if path.is_file()), None)
    if found is None:
        above = "the two folders above it" if top is not None else "each folder above it"
        return Skipped(bases[0] / wav, f"audio file '{wav}' not found (looked under {bases[0]} and {above}; "
                                       "EmoBox's paths start at the EmoBox folder)", BAD_RECORD)
    return found


def _speaker_and_sex(record: _Record, speakers: Mapping[str, str]) -> tuple[str | None, str | None]:
    data = record.data
    sex = SEXES.get(str(data.get("gender") or data.get("sex") or "").strip().lower())
    speaker = data.get("speaker") or data.get("spk") or speakers.get(record.key)
    try:
        name = parse_ravdess_name(Path(str(data["wav"])).name)
    except CorpusError:
        name = None
    if speaker is None and name is not None:
        speaker = name.speaker
    if sex is None and name is not None and speaker == name.speaker:
        sex = name.sex
    return (None if speaker is None else str(speaker)), sex


def _utterances(root: Path, allow_outside_root: bool = False) -> tuple[list[Utterance], list[Skipped]]:
    """(utterances, skipped records: bad ones and those whose label the vocabulary lacks) of the fold files."""
    records = _read_folds(root)
    label_map, speakers = _read_label_map(root), _read_speakers(root)
    bases, top = _search_folders(root, allow_outside_root)
    utterances, skipped = [], []
    for record in records.values():
        emotion = _vocabulary_label(record, label_map, root)
        data = record.data
        if emotion is None and not record.problems:  # a label the vocabulary lacks: skipped whatever else it has
            skipped.append(Skipped(Path(str(data["wav"])), f"{record.source}: label '{data['emo']}' is not in the "
                                   "vocabulary", NotInVocabulary.kind))
            continue
        if data.get("type", "raw") != "raw":
            record.problems.append(f"{record.source}: type '{data['type']}' (precomputed features): only raw audio is read")
        if "start_time" in data or "end_time" in data:
            record.problems.append(f"{record.source}: segments (start_time/end_time) are not supported: whole files are read")
        path = _audio_path(str(data["wav"]), bases, top)
        if isinstance(path, Skipped):
            record.problems.append(f"{record.source}: {path.reason}")
        speaker, sex = _speaker_and_sex(record, speakers)
        if speaker is None:
            record.problems.append(f"{record.source}: no speaker for '{record.key}' (add a speaker field, or keep "
                                   f"EmoBox's {SPEAKER_FILE} in {root})")
        if record.problems:
            where, kind = (path.path, path.kind) if isinstance(path, Skipped) else (path, BAD_RECORD)
            skipped.append(Skipped(where, "; ".join(record.problems), kind))
            continue
        fields = {"key": record.key, "dataset": data.get("dataset"), SPLIT_FIELD: tuple(record.splits)}
        utterances.append(Utterance(path, emotion, speaker, sex, "emobox", fields))
    return utterances, skipped


def scan_emobox(
    root: str | Path, emotions: Sequence[str], *, lenient: bool = False, allow_outside_root: bool = False
) -> ScanResult:
    """The records of an EmoBox dataset folder with the wanted emotions; every bad record reported at once."""
    root = Path(root).expanduser()
    utterances, skipped = _utterances(root, allow_outside_root)
    problems = [entry for entry in skipped if entry.kind != NotInVocabulary.kind]
    if problems and not lenient:
        listing = "\n  ".join(problem.reason for problem in problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise CorpusError(f"{root}: {len(problems)} bad record(s) (set data.lenient=true to skip them):\n  {listing}{more}")
    wanted = set(emotions)
    selected = sorted((u for u in utterances if u.emotion in wanted), key=lambda u: str(u.path))
    if not selected:
        raise CorpusError(f"{root}: no EmoBox records with emotions {sorted(wanted)}")
    return ScanResult(selected, skipped)


def emobox_classes(root: Path, *, allow_outside_root: bool = False) -> tuple[str, ...]:
    """The vocabulary classes the dataset's records use, in vocabulary order."""
    used = {u.emotion for u in _utterances(Path(root).expanduser(), allow_outside_root)[0]}
    return tuple(name for name in EMOTIONS if name in used)


def benchmark_split(utterance: Utterance, fold: int) -> str | None:
    """The split (train, valid, test) of ``utterance`` in benchmark fold ``fold`` (0-based: fold_1 is 0), or None."""
    splits = utterance.fields.get(SPLIT_FIELD)
    if splits is None:
        raise ValueError(f"{utterance.path}: no EmoBox folds (data.protocol=emobox needs data.corpus=emobox)")
    return splits[fold] if fold < len(splits) else None


def benchmark_folds(utterances: Sequence[Utterance]) -> int:
    """The number of benchmark folds the utterances carry (0 when they come from another corpus)."""
    counts = {len(u.fields.get(SPLIT_FIELD, ())) for u in utterances}
    return counts.pop() if len(counts) == 1 else 0


# -- synthetic layout: a small EmoBox dataset folder partitioned the way EmoBox partitions ------------------

EMOBOX_NAMES = {"neutral": "Neutral", "calm": "Calm", "happy": "Happy", "sad": "Sad", "angry": "Angry",
                "fearful": "Fearful", "disgust": "Disgust", "surprised": "Surprised"}
"""The synthetic dataset's own labels (RAVDESS's, as EmoBox writes them); label_map.json maps them like EmoBox's."""
EMOBOX_MAP = {"Neutral": "Neutral", "Calm": "Calm", "Happy": "Happy", "Sad": "Sad", "Angry": "Angry",
              "Fearful": "Fear", "Disgust": "Disgust", "Surprised": "Surprise"}


def synthetic_speakers(count: int) -> list[SyntheticSpeaker]:
    """spk01, spk02, ... with alternating sexes."""
    return synthetic_voices([(f"spk{j + 1:02d}", ("male", "female")[j % 2]) for j in range(count)])


def synthetic_files(speaker: SyntheticSpeaker, emotions: Sequence[str]) -> list[SyntheticFile]:
    """``downloads/SPEAKER/SPEAKER_EMOTION_NN.wav``."""
    return synthetic_takes(
        speaker, emotions, 6,
        lambda emotion, take, strong: f"downloads/{speaker.id}/{speaker.id}_{emotion}_{take + 1:02d}.wav",
    )


def synthetic_folds(speakers: Sequence[str]) -> list[set[str] | None]:
    """Test speakers per fold, as EmoBox partitions: None = one random-like fold (fewer than 4 speakers),
    each speaker alone (4-6 speakers), else groups of about four dealt in order."""
    if len(speakers) < 4:
        return [None]
    if len(speakers) <= 6:
        return [{speaker} for speaker in speakers]
    groups = len(speakers) // 4
    return [set(speakers[k::groups]) for k in range(groups)]


def write_synthetic_metadata(out_dir: Path, rows: list[tuple[SyntheticFile, SyntheticSpeaker]]) -> None:
    """``label_map.json``, ``data.seg.wrd.stm`` and ``fold_K/synthetic_{train,test}_fold_K.jsonl``.

    With fewer than four speakers the single fold tests the third take of every speaker and emotion
    (speaker-dependent, like EmoBox's stratified split of such datasets).
    """
    (out_dir / LABEL_MAP).write_text(json.dumps(EMOBOX_MAP, indent=4) + "\n")
    entries = []
    for file, speaker in rows:
        key = f"synthetic-{Path(file.relpath).stem}"
        entries.append((key, file, speaker))
    (out_dir / SPEAKER_FILE).write_text("".join(
        f"{key} 1 {speaker.id} 0 0 <id={key},spk={speaker.id},emotion={EMOBOX_NAMES[file.emotion]}> "
        f"{EMOBOX_NAMES[file.emotion]}\n" for key, file, speaker in entries
    ))
    speakers = list(dict.fromkeys(speaker.id for _, _, speaker in entries))
    for number, test_speakers in enumerate(synthetic_folds(speakers), start=1):
        folder = out_dir / f"fold_{number}"
        folder.mkdir(parents=True, exist_ok=True)
        lines: dict[str, list[str]] = {"train": [], "test": []}
        for key, file, speaker in entries:
            testing = file.take == 2 if test_speakers is None else speaker.id in test_speakers
            record = {"key": key, "dataset": "synthetic", "wav": file.relpath, "type": "raw", "task": "category",
                      "emo": EMOBOX_NAMES[file.emotion], "channel": 1}
            lines["test" if testing else "train"].append(json.dumps(record))
        for split, split_lines in lines.items():
            (folder / f"synthetic_{split}_fold_{number}.jsonl").write_text("\n".join(split_lines) + "\n")


CORPUS = Corpus(
    name="emobox", title="EmoBox", classes=None, example="fold_1/<dataset>_train_fold_1.jsonl",
    scan=scan_emobox, synthetic_speakers=synthetic_speakers, synthetic_files=synthetic_files, default_speakers=6,
    max_speakers=99, write_synthetic_metadata=write_synthetic_metadata, read_classes=emobox_classes,
    lists_paths=True,
)
