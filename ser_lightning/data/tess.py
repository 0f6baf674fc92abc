"""TESS (Toronto emotional speech set) file-name parsing and folder scanning.

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
from pathlib import Path

from .records import CorpusError, ScanResult, Utterance, scan_folder

CORPUS = "tess"
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


def parse_tess_name(path: str | Path) -> dict:
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
    return {"speaker": speaker, "word": match["word"], "emotion": emotion, "age_group": SPEAKERS[speaker]}


def scan_tess(root: str | Path, emotions: Sequence[str], *, lenient: bool = False) -> ScanResult:
    """Find the TESS files of the wanted emotions under ``root`` (see ``scan_folder``)."""

    def parse(path: Path) -> Utterance:
        name = parse_tess_name(path)
        return Utterance(path.resolve(), name["emotion"], name["speaker"], "female", CORPUS, name)

    return scan_folder(root, parse, emotions, lenient=lenient, corpus="TESS", example=EXAMPLE)
