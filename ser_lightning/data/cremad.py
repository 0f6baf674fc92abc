"""CREMA-D: file names, classes, speakers (with the demographics file) and the synthetic layout.

Names look like ``1001_DFA_ANG_XX.wav``: actor (1001-1091), sentence code, emotion code and
emotion level (LO low, MD medium, HI high, XX unspecified). Emotion codes map onto the common
vocabulary as ANG -> angry, DIS -> disgust, FEA -> fearful, HAP -> happy, NEU -> neutral,
SAD -> sad; CREMA-D has no calm and no surprised. The actors' sex is not in the file names: it is
read from the corpus's ``VideoDemographics.csv`` (columns ActorID, Sex, ...) when that file lies
in the scanned folder or its parent, and is None otherwise.
"""
from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .records import (
    Corpus, CorpusError, ScanResult, SyntheticFile, SyntheticSpeaker, Utterance, decode_code, scan_folder,
    synthetic_takes, synthetic_voices,
)

EXAMPLE = "1001_DFA_ANG_XX.wav"
CLASSES = ("neutral", "happy", "sad", "angry", "fearful", "disgust")
EMOTION_CODES = {"ANG": "angry", "DIS": "disgust", "FEA": "fearful", "HAP": "happy", "NEU": "neutral", "SAD": "sad"}
LEVEL_CODES = {"LO": "low", "MD": "medium", "HI": "high", "XX": "unspecified"}
SENTENCES = {
    "IEO": "It's eleven o'clock.",
    "TIE": "That is exactly what happened.",
    "IOM": "I'm on my way to the meeting.",
    "IWW": "I wonder what this is about.",
    "TAI": "The airplane is almost full.",
    "MTI": "Maybe tomorrow it will be cold.",
    "IWL": "I would like a new alarm clock.",
    "ITH": "I think I have a doctor's appointment.",
    "DFA": "Don't forget a jacket.",
    "ITS": "I think I've seen this before.",
    "TSI": "The surface is slick.",
    "WSI": "We'll stop in a couple of minutes.",
}
ACTORS = range(1001, 1092)
DEMOGRAPHICS = "VideoDemographics.csv"


@dataclass(frozen=True)
class CremadName:
    """The fields encoded in one CREMA-D file name."""

    actor: int
    sentence: str
    text: str
    emotion: str
    level: str


def parse_cremad_name(path: str | Path) -> CremadName:
    """The fields of a CREMA-D file name: actor, sentence (code and text), emotion, level; CorpusError if malformed."""
    path = Path(path)
    parts = path.stem.split("_")
    if len(parts) != 4 or not parts[0].isdigit():
        raise CorpusError(f"{path}: not a CREMA-D name (expected ACTOR_SENTENCE_EMOTION_LEVEL, e.g. {EXAMPLE})")
    actor, sentence, emotion, level = parts
    if int(actor) not in ACTORS:
        raise CorpusError(f"{path}: CREMA-D actor '{actor}' is outside 1001-1091")
    return CremadName(
        actor=int(actor),
        sentence=sentence,
        text=decode_code(sentence, SENTENCES, "CREMA-D sentence", path),
        emotion=decode_code(emotion, EMOTION_CODES, "CREMA-D emotion", path),
        level=decode_code(level, LEVEL_CODES, "CREMA-D emotion level", path),
    )


def read_demographics(path: Path) -> dict[str, str]:
    """Actor id -> "male"/"female" from VideoDemographics.csv; CorpusError naming the file if unusable."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise CorpusError(f"{path}: cannot read the CREMA-D demographics ({err})") from err
    if not rows or not {"ActorID", "Sex"} <= set(rows[0]):
        raise CorpusError(f"{path}: expected CSV columns ActorID and Sex")
    sexes = {}
    for line, row in enumerate(rows, start=2):
        sex = (row["Sex"] or "").strip().lower()
        if sex not in ("male", "female"):
            raise CorpusError(f"{path} line {line}: Sex '{row['Sex']}' is neither Male nor Female")
        sexes[(row["ActorID"] or "").strip()] = sex
    return sexes


def find_demographics(root: Path) -> Path | None:
    """VideoDemographics.csv in ``root`` or its parent (the archive's top folder), if any."""
    for folder in (root, root.parent):
        if (folder / DEMOGRAPHICS).is_file():
            return folder / DEMOGRAPHICS
    return None


def scan_cremad(root: str | Path, emotions: Sequence[str], *, lenient: bool = False) -> ScanResult:
    """Find the CREMA-D files of the wanted emotions under ``root`` (see ``scan_folder``)."""
    root = Path(root).expanduser()
    demographics = find_demographics(root)
    sexes = read_demographics(demographics) if demographics else {}

    def parse(path: Path) -> Utterance:
        name = parse_cremad_name(path)
        speaker = str(name.actor)
        return Utterance(path.resolve(), name.emotion, speaker, sexes.get(speaker), "cremad", asdict(name))

    return scan_folder(root, parse, emotions, lenient=lenient, corpus="CREMA-D", example=EXAMPLE)


def synthetic_speakers(count: int) -> list[SyntheticSpeaker]:
    """The first actors 1001, 1002, ... with alternating sexes (the real ones come from the demographics file)."""
    return synthetic_voices([(str(ACTORS[j]), ("male", "female")[j % 2]) for j in range(count)])


def synthetic_files(speaker: SyntheticSpeaker, emotions: Sequence[str]) -> list[SyntheticFile]:
    """``AudioWAV/ACTOR_SENTENCE_EMOTION_LEVEL.wav``: sentences DFA, TIE, IEO; the strong take at level HI."""
    codes = {emotion: code for code, emotion in EMOTION_CODES.items()}

    def relpath(emotion: str, take: int, strong: bool) -> str:
        sentence = ("DFA", "TIE", "IEO")[take]
        return f"AudioWAV/{speaker.id}_{sentence}_{codes[emotion]}_{'HI' if strong else 'XX'}.wav"

    return synthetic_takes(speaker, emotions, 1, relpath)


def write_synthetic_metadata(out_dir: Path, rows: list[tuple[SyntheticFile, SyntheticSpeaker]]) -> None:
    """The demographics file (ActorID, Sex) the scanner reads the actors' sex from."""
    speakers = dict.fromkeys(speaker for _, speaker in rows)
    lines = ["ActorID,Sex", *(f"{speaker.id},{speaker.sex.capitalize()}" for speaker in speakers)]
    (out_dir / DEMOGRAPHICS).write_text("\n".join(lines) + "\n")


CORPUS = Corpus(
    name="cremad", title="CREMA-D", classes=CLASSES, example=EXAMPLE, scan=scan_cremad,
    synthetic_speakers=synthetic_speakers, synthetic_files=synthetic_files, default_speakers=6,
    max_speakers=len(ACTORS), write_synthetic_metadata=write_synthetic_metadata,
)
