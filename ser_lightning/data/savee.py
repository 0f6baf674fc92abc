"""SAVEE (Surrey Audio-Visual Expressed Emotion): file names, classes, speakers and the synthetic layout.

Files are named ``DC_a01.wav`` (speaker prefix) or, as in the AudioData archive, ``DC/a01.wav``
(one folder per speaker). Speakers DC, JE, JK, KL, all male. Emotion codes map onto the common
vocabulary as a -> angry, d -> disgust, f -> fearful, h -> happy, n -> neutral, sa -> sad,
su -> surprised; SAVEE has no calm. Sentences are numbered 01-15 per emotion and 01-30 for neutral.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .records import (
    Corpus, CorpusError, ScanResult, SyntheticFile, SyntheticSpeaker, Utterance, scan_folder, synthetic_takes,
    synthetic_voices,
)

EXAMPLE = "DC_a01.wav or DC/a01.wav"
CLASSES = ("neutral", "happy", "sad", "angry", "fearful", "disgust", "surprised")
SPEAKERS = ("DC", "JE", "JK", "KL")
EMOTION_CODES = {
    "a": "angry", "d": "disgust", "f": "fearful", "h": "happy", "n": "neutral", "sa": "sad", "su": "surprised",
}
NAME = re.compile(r"(?:(?P<speaker>[a-z]{2})_)?(?P<code>sa|su|[a-z])(?P<number>\d{2})")


@dataclass(frozen=True)
class SaveeName:
    """The fields encoded in one SAVEE file name (and its folder)."""

    speaker: str
    emotion: str
    code: str
    sentence: int


def parse_savee_name(path: str | Path) -> SaveeName:
    """The fields of a SAVEE file: speaker (from the prefix or the folder), emotion, sentence number."""
    path = Path(path)
    match = NAME.fullmatch(path.stem.lower())
    if match is None:
        raise CorpusError(f"{path}: not a SAVEE name (expected SPEAKER_CODENN or SPEAKER/CODENN, e.g. {EXAMPLE})")
    speaker = (match["speaker"] or path.parent.name).upper()
    if speaker not in SPEAKERS:
        where = "prefix" if match["speaker"] else "folder"
        raise CorpusError(f"{path}: unknown SAVEE speaker {where} '{speaker}' (expected one of {list(SPEAKERS)})")
    code, number = match["code"], int(match["number"])
    if code not in EMOTION_CODES:
        raise CorpusError(f"{path}: unknown SAVEE emotion code '{code}' (expected one of {sorted(EMOTION_CODES)})")
    most = 30 if code == "n" else 15
    if not 1 <= number <= most:
        raise CorpusError(f"{path}: SAVEE sentence number {number:02d} is outside 01-{most} for code '{code}'")
    return SaveeName(speaker=speaker, emotion=EMOTION_CODES[code], code=code, sentence=number)


def scan_savee(root: str | Path, emotions: Sequence[str], *, lenient: bool = False) -> ScanResult:
    """Find the SAVEE files of the wanted emotions under ``root`` (see ``scan_folder``)."""

    def parse(path: Path) -> Utterance:
        name = parse_savee_name(path)
        return Utterance(path.resolve(), name.emotion, name.speaker, "male", "savee", asdict(name))

    return scan_folder(root, parse, emotions, lenient=lenient, corpus="SAVEE", example=EXAMPLE)


def synthetic_speakers(count: int) -> list[SyntheticSpeaker]:
    """DC, JE, JK, KL (all male)."""
    return synthetic_voices([(name, "male") for name in SPEAKERS][:count])


def synthetic_files(speaker: SyntheticSpeaker, emotions: Sequence[str]) -> list[SyntheticFile]:
    """``SPEAKER/CODENN.wav`` (the AudioData archive's layout), sentences 01-03."""
    codes = {emotion: code for code, emotion in EMOTION_CODES.items()}
    return synthetic_takes(speaker, emotions, 3, lambda emotion, take, strong: f"{speaker.id}/{codes[emotion]}{take + 1:02d}.wav")


CORPUS = Corpus(
    name="savee", title="SAVEE", classes=CLASSES, example=EXAMPLE, scan=scan_savee,
    synthetic_speakers=synthetic_speakers, synthetic_files=synthetic_files, default_speakers=4,
    max_speakers=len(SPEAKERS),
)
