"""RAVDESS: file names, classes, speakers and the synthetic layout.

Names look like ``MM-VV-EE-II-SS-RR-AA.wav``: modality (01 full-AV, 02 video-only, 03 audio-only),
vocal channel (01 speech, 02 song), emotion (01-08), intensity (01 normal, 02 strong), statement
(01, 02), repetition (01, 02) and actor (01-24; odd actors are male, even female). Files of the
song archive are skipped (and listed) when scanning speech.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from .records import (
    EMOTIONS, Corpus, CorpusError, Excluded, ScanResult, SyntheticFile, SyntheticSpeaker, Utterance, decode_code,
    scan_folder,
)

__all__ = ["CORPUS", "EMOBOX_TEST_ACTORS", "RavdessName", "parse_ravdess_name", "ravdess_utterance", "scan_ravdess"]
EXAMPLE = "03-01-05-02-01-01-12.wav"
EMOTION_CODES = {f"{i:02d}": name for i, name in enumerate(EMOTIONS, start=1)}
MODALITY_CODES = {"01": "audio-video", "02": "video-only", "03": "audio-only"}
VOCAL_CHANNEL_CODES = {"01": "speech", "02": "song"}
INTENSITY_CODES = {"01": "normal", "02": "strong"}
STATEMENT_CODES = {"01": 1, "02": 2}  # "Kids are talking by the door", "Dogs are sitting by the door"
REPETITION_CODES = {"01": 1, "02": 2}
MAX_ACTORS = 99
EMOBOX_TEST_ACTORS: tuple[tuple[int, ...], ...] = (
    (1, 11, 20, 21), (4, 10, 12, 14), (8, 9, 19, 23), (3, 5, 7, 24), (2, 15, 16, 18), (6, 13, 17, 22),
)
"""The test actors of EmoBox's six RAVDESS folds (fold_1 .. fold_6 of its data/ravdess; ``data.protocol: emobox_ravdess``)."""


@dataclass(frozen=True)
class RavdessName:
    """The fields encoded in one RAVDESS file name."""

    modality: str
    vocal_channel: str
    emotion: str
    intensity: str
    statement: int
    repetition: int
    actor: int
    sex: str

    @property
    def speaker(self) -> str:
        return f"{self.actor:02d}"


def parse_ravdess_name(path: str | Path) -> RavdessName:
    """Parse a RAVDESS file name; raise CorpusError naming the file if it is malformed."""
    path = Path(path)
    parts = path.stem.split("-")
    if len(parts) != 7 or not all(len(p) == 2 and p.isdigit() for p in parts):
        raise CorpusError(
            f"{path}: not a RAVDESS name (expected seven two-digit fields MM-VV-EE-II-SS-RR-AA, e.g. {EXAMPLE})"
        )
    modality, channel, emotion, intensity, statement, repetition, actor = parts
    name = RavdessName(
        modality=decode_code(modality, MODALITY_CODES, "modality", path),
        vocal_channel=decode_code(channel, VOCAL_CHANNEL_CODES, "vocal channel", path),
        emotion=decode_code(emotion, EMOTION_CODES, "emotion", path),
        intensity=decode_code(intensity, INTENSITY_CODES, "intensity", path),
        statement=decode_code(statement, STATEMENT_CODES, "statement", path),
        repetition=decode_code(repetition, REPETITION_CODES, "repetition", path),
        actor=int(actor),
        sex="male" if int(actor) % 2 == 1 else "female",
    )
    if name.actor < 1:
        raise CorpusError(f"{path}: actor code '{actor}' must be 01 or higher")
    if name.emotion == "neutral" and name.intensity == "strong":
        raise CorpusError(f"{path}: RAVDESS has no strong intensity for neutral (intensity code 02 with emotion 01)")
    return name


def ravdess_utterance(path: Path, vocal_channel: str = "speech") -> Utterance:
    """The Utterance of one RAVDESS file (CorpusError if malformed, Excluded if of the other vocal channel)."""
    name = parse_ravdess_name(path)
    if name.vocal_channel != vocal_channel:
        raise Excluded(f"{path}: a RAVDESS {name.vocal_channel} file (vocal channel), not {vocal_channel}",
                       kind=f"RAVDESS {name.vocal_channel} file")
    return Utterance(
        path=path.resolve(), emotion=name.emotion, speaker=name.speaker, sex=name.sex, corpus="ravdess",
        fields=asdict(name),
    )


def scan_ravdess(
    root: str | Path,
    emotions: Sequence[str],
    *,
    vocal_channel: Literal["speech", "song"] = "speech",
    lenient: bool = False,
) -> ScanResult:
    """Find the RAVDESS files of the wanted emotions and vocal channel under ``root`` (see ``scan_folder``)."""
    return scan_folder(
        root, lambda path: ravdess_utterance(path, vocal_channel), emotions, lenient=lenient,
        corpus=f"RAVDESS {vocal_channel}", example=EXAMPLE,
    )


def synthetic_speakers(count: int) -> list[SyntheticSpeaker]:
    """Actors 1..count; odd actors male, even female; the actor number is the voice."""
    return [SyntheticSpeaker(f"{actor:02d}", "male" if actor % 2 else "female", actor) for actor in range(1, count + 1)]


def synthetic_files(speaker: SyntheticSpeaker, emotions: Sequence[str]) -> list[SyntheticFile]:
    """The 60 speech files of one actor for all eight emotions (neutral has no strong intensity)."""
    actor = speaker.voice
    files = []
    for emotion in emotions:
        code = EMOTIONS.index(emotion) + 1
        for intensity in (1,) if emotion == "neutral" else (1, 2):
            for statement in (1, 2):
                for repetition in (1, 2):
                    name = f"03-01-{code:02d}-{intensity:02d}-{statement:02d}-{repetition:02d}-{actor:02d}.wav"
                    files.append(SyntheticFile(
                        f"Actor_{actor:02d}/{name}", emotion, intensity == 2, statement,
                        (actor, code, intensity, statement, repetition),
                    ))
    return files


CORPUS = Corpus(
    name="ravdess", title="RAVDESS", classes=EMOTIONS, example=EXAMPLE, scan=scan_ravdess,
    synthetic_speakers=synthetic_speakers, synthetic_files=synthetic_files, default_speakers=24,
    max_speakers=MAX_ACTORS,
)
