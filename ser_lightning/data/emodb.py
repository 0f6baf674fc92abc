"""EmoDB (Berlin Database of Emotional Speech): file names, classes, speakers and the synthetic layout.

Names look like ``03a01Fa.wav``: speaker (03, 08-16), text code (a01 ... b10), emotion letter
(German initial) and version letter. Emotion letters map onto the common vocabulary as
W (Ärger) -> angry, E (Ekel) -> disgust, A (Angst) -> fearful, F (Freude) -> happy,
T (Trauer) -> sad, N -> neutral. L (Langeweile, boredom) has no counterpart in the vocabulary:
such files are skipped and listed in ``ScanResult.skipped`` (never relabelled). EmoDB has no calm
and no surprised. Speakers 03, 10, 11, 12, 15 are male; 08, 09, 13, 14, 16 female.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .records import (
    Corpus, CorpusError, NotInVocabulary, ScanResult, SyntheticFile, SyntheticSpeaker, Utterance, scan_folder,
    synthetic_takes, synthetic_voices,
)

EXAMPLE = "03a01Fa.wav"
CLASSES = ("neutral", "happy", "sad", "angry", "fearful", "disgust")
SPEAKER_SEX = {
    "03": "male", "08": "female", "09": "female", "10": "male", "11": "male",
    "12": "male", "13": "female", "14": "female", "15": "male", "16": "female",
}
EMOTION_CODES = {"W": "angry", "E": "disgust", "A": "fearful", "F": "happy", "T": "sad", "N": "neutral"}
UNMAPPED_CODES = {"L": "boredom"}
NAME = re.compile(r"(?P<speaker>\d{2})(?P<text>[ab]\d{2})(?P<code>[A-Z])(?P<version>[a-z])")


@dataclass(frozen=True)
class EmodbName:
    """The fields encoded in one EmoDB file name."""

    speaker: str
    text: str
    emotion: str
    code: str
    version: str
    sex: str


def parse_emodb_name(path: str | Path) -> EmodbName:
    """The fields of an EmoDB name; CorpusError if malformed, NotInVocabulary for boredom (L)."""
    path = Path(path)
    match = NAME.fullmatch(path.stem)
    if match is None:
        raise CorpusError(f"{path}: not an EmoDB name (expected SPEAKER TEXT EMOTION VERSION, e.g. {EXAMPLE})")
    speaker, code = match["speaker"], match["code"]
    if speaker not in SPEAKER_SEX:
        raise CorpusError(f"{path}: unknown EmoDB speaker '{speaker}' (expected one of {sorted(SPEAKER_SEX)})")
    if code in UNMAPPED_CODES:
        raise NotInVocabulary(f"{path}: EmoDB {UNMAPPED_CODES[code]} ({code}) is not in the common emotion vocabulary")
    if code not in EMOTION_CODES:
        valid = sorted(EMOTION_CODES) + sorted(UNMAPPED_CODES)
        raise CorpusError(f"{path}: unknown EmoDB emotion letter '{code}' (expected one of {valid})")
    return EmodbName(
        speaker=speaker, text=match["text"], emotion=EMOTION_CODES[code], code=code, version=match["version"],
        sex=SPEAKER_SEX[speaker],
    )


def scan_emodb(root: str | Path, emotions: Sequence[str], *, lenient: bool = False) -> ScanResult:
    """Find the EmoDB files of the wanted emotions under ``root`` (see ``scan_folder``)."""

    def parse(path: Path) -> Utterance:
        name = parse_emodb_name(path)
        return Utterance(path.resolve(), name.emotion, name.speaker, name.sex, "emodb", asdict(name))

    return scan_folder(root, parse, emotions, lenient=lenient, corpus="EmoDB", example=EXAMPLE)


def synthetic_speakers(count: int) -> list[SyntheticSpeaker]:
    """The corpus's speakers in id order with their real sexes."""
    return synthetic_voices(sorted(SPEAKER_SEX.items())[:count])


def synthetic_files(speaker: SyntheticSpeaker, emotions: Sequence[str]) -> list[SyntheticFile]:
    """``wav/SPEAKER TEXT EMOTION a.wav`` with the texts a01, a02, b01."""
    codes = {emotion: code for code, emotion in EMOTION_CODES.items()}

    def relpath(emotion: str, take: int, strong: bool) -> str:
        return f"wav/{speaker.id}{('a01', 'a02', 'b01')[take]}{codes[emotion]}a.wav"

    return synthetic_takes(speaker, emotions, 4, relpath)


CORPUS = Corpus(
    name="emodb", title="EmoDB", classes=CLASSES, example=EXAMPLE, scan=scan_emodb,
    synthetic_speakers=synthetic_speakers, synthetic_files=synthetic_files, default_speakers=10,
    max_speakers=len(SPEAKER_SEX),
)
