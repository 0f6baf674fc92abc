"""RAVDESS file-name parsing and folder scanning.

Names look like ``MM-VV-EE-II-SS-RR-AA.wav``: modality (01 full-AV, 02 video-only, 03 audio-only),
vocal channel (01 speech, 02 song), emotion (01-08), intensity (01 normal, 02 strong), statement
(01, 02), repetition (01, 02) and actor (01-24; odd actors are male, even female).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from .records import EMOTIONS, CorpusError, ScanResult, Utterance, decode_code, scan_folder

__all__ = ["RavdessName", "parse_ravdess_name", "ravdess_utterance", "scan_ravdess"]
EMOTION_CODES = {f"{i:02d}": name for i, name in enumerate(EMOTIONS, start=1)}
MODALITY_CODES = {"01": "audio-video", "02": "video-only", "03": "audio-only"}
VOCAL_CHANNEL_CODES = {"01": "speech", "02": "song"}
INTENSITY_CODES = {"01": "normal", "02": "strong"}
STATEMENT_CODES = {"01": 1, "02": 2}  # "Kids are talking by the door", "Dogs are sitting by the door"
REPETITION_CODES = {"01": 1, "02": 2}


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
            f"{path}: not a RAVDESS name (expected seven two-digit fields MM-VV-EE-II-SS-RR-AA, e.g. 03-01-05-02-01-01-12.wav)"
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


def scan_ravdess(
    root: str | Path,
    emotions: Sequence[str],
    *,
    vocal_channel: Literal["speech", "song"] = "speech",
    lenient: bool = False,
) -> ScanResult:
    """Find the RAVDESS files of the wanted emotions and vocal channel under ``root``.

    Non-audio files are ignored. A malformed name raises CorpusError, or with ``lenient`` is
    skipped and listed in ``ScanResult.skipped``. An empty selection always raises CorpusError.
    """
    return scan_folder(
        root, ravdess_utterance, emotions, lenient=lenient, corpus=f"RAVDESS {vocal_channel}",
        example="03-01-05-02-01-01-12.wav", keep=lambda u: u.fields["vocal_channel"] == vocal_channel,
    )


def ravdess_utterance(path: Path) -> Utterance:
    """The Utterance of one RAVDESS file (CorpusError if its name is malformed)."""
    name = parse_ravdess_name(path)
    return Utterance(
        path=path.resolve(), emotion=name.emotion, speaker=name.speaker, sex=name.sex, corpus="ravdess",
        fields=asdict(name),
    )
