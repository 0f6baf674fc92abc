"""TESS (Toronto emotional speech set): file names, classes, speakers and the synthetic layout.

Names look like ``OAF_back_angry.wav``: speaker (OAF older, YAF younger adult female; both
female), the carrier word, the emotion. Files usually sit in one folder per speaker and emotion
(``OAF_angry/``, ``YAF_pleasant_surprised/``). Emotions map onto the common vocabulary as
angry, disgust, fear -> fearful, happy, neutral, sad and ps (pleasant surprise) -> surprised; TESS
has no calm. Case, spaces around underscores (``YAF_germ_ angry.wav``) and the spellings
``pleasant_surprise``/``pleasant_surprised``/``surprise(d)`` are accepted; a file whose name and
emotion folder disagree is an error. TESS has only two speakers: speaker-independent folds can
test on one speaker and train on the other, leaving none to validate (see ``SERDataModule``).
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

EXAMPLE = "OAF_back_angry.wav"
CLASSES = ("neutral", "happy", "sad", "angry", "fearful", "disgust", "surprised")
SPEAKERS = {"OAF": "older adult female", "YAF": "younger adult female"}
EMOTION_NAMES = {
    "angry": "angry", "anger": "angry", "disgust": "disgust", "disgusted": "disgust", "fear": "fearful",
    "fearful": "fearful", "happy": "happy", "happiness": "happy", "neutral": "neutral", "sad": "sad",
    "sadness": "sad", "ps": "surprised", "pleasant_surprise": "surprised", "pleasant_surprised": "surprised",
    "surprise": "surprised", "surprised": "surprised",
}
_EMOTION = "|".join(sorted(EMOTION_NAMES, key=len, reverse=True))
NAME = re.compile(rf"(?P<speaker>[a-z]+)_(?P<word>[a-z]+)_(?P<emotion>{_EMOTION})")
FOLDER = re.compile(rf"(?P<speaker>oaf|yaf)_(?P<emotion>{_EMOTION})")


def _normalise(text: str) -> str:
    """Lower case, no spaces around underscores."""
    return re.sub(r"\s*_\s*", "_", text.strip().lower())


@dataclass(frozen=True)
class TessName:
    """The fields encoded in one TESS file name."""

    speaker: str
    word: str
    emotion: str
    age_group: str


def parse_tess_name(path: str | Path) -> TessName:
    """The fields of a TESS file: speaker, word, emotion (checked against its folder); CorpusError if malformed."""
    path = Path(path)
    match = NAME.fullmatch(_normalise(path.stem))
    if match is None:
        raise CorpusError(
            f"{path}: not a TESS name (expected SPEAKER_WORD_EMOTION with an emotion from "
            f"{sorted(set(EMOTION_NAMES))}, e.g. {EXAMPLE})"
        )
    speaker, emotion = match["speaker"].upper(), EMOTION_NAMES[match["emotion"]]
    if speaker not in SPEAKERS:
        raise CorpusError(f"{path}: unknown TESS speaker '{speaker}' (expected one of {sorted(SPEAKERS)})")
    folder = FOLDER.fullmatch(_normalise(path.parent.name))
    if folder and (folder["speaker"].upper(), EMOTION_NAMES[folder["emotion"]]) != (speaker, emotion):
        raise CorpusError(f"{path}: the file name says {speaker}/{emotion} but its folder '{path.parent.name}' disagrees")
    return TessName(speaker=speaker, word=match["word"], emotion=emotion, age_group=SPEAKERS[speaker])


def scan_tess(root: str | Path, emotions: Sequence[str], *, lenient: bool = False) -> ScanResult:
    """Find the TESS files of the wanted emotions under ``root`` (see ``scan_folder``)."""

    def parse(path: Path) -> Utterance:
        name = parse_tess_name(path)
        return Utterance(path.resolve(), name.emotion, name.speaker, "female", "tess", asdict(name))

    return scan_folder(root, parse, emotions, lenient=lenient, corpus="TESS", example=EXAMPLE)


def synthetic_speakers(count: int) -> list[SyntheticSpeaker]:
    """OAF, then YAF (both female)."""
    return synthetic_voices([(name, "female") for name in sorted(SPEAKERS)][:count])


def synthetic_files(speaker: SyntheticSpeaker, emotions: Sequence[str]) -> list[SyntheticFile]:
    """``SPEAKER_EMOTION/SPEAKER_WORD_EMOTION.wav`` with the words back, bar, base and TESS's spellings."""
    short = {"fearful": "fear", "surprised": "ps"}
    folder = {"fearful": "Fear", "surprised": "pleasant_surprised"}

    def relpath(emotion: str, take: int, strong: bool) -> str:
        word = ("back", "bar", "base")[take]
        return f"{speaker.id}_{folder.get(emotion, emotion)}/{speaker.id}_{word}_{short.get(emotion, emotion)}.wav"

    return synthetic_takes(speaker, emotions, 2, relpath)


CORPUS = Corpus(
    name="tess", title="TESS", classes=CLASSES, example=EXAMPLE, scan=scan_tess,
    synthetic_speakers=synthetic_speakers, synthetic_files=synthetic_files, default_speakers=2,
    max_speakers=len(SPEAKERS),
)
