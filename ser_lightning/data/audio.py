"""Robust audio decoding: any rate, any channel count, WAV/FLAC/OGG, never NaN.

Decoding uses soundfile (libsndfile); resampling uses ``torchaudio.functional.resample``.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from ser_lightning.errors import DataError, os_reason

MAX_NONFINITE_FRACTION = 0.01
"""Files with more non-finite samples than this fraction are rejected; fewer are zeroed."""


class AudioError(DataError, ValueError):
    """An audio file cannot be decoded into usable samples; the message names the file."""


def _unusable(source: Any, name: str, error: Exception, what: str) -> AudioError:
    """The AudioError for a file libsndfile refused: the system's reason when a named file cannot even be
    opened (libsndfile then says only "System error."), else libsndfile's."""
    if isinstance(source, (str, Path)):
        try:
            with open(source, "rb"):
                pass
        except OSError as os_error:
            return AudioError(f"{name}: cannot be read ({os_reason(os_error)})")
    return AudioError(f"{name}: {what} ({error})")


def _sanitize(block: np.ndarray, path: Path) -> np.ndarray:
    """(frames, channels) float32 -> finite mono (frames,) clamped to [-1, 1]."""
    finite = np.isfinite(block)
    if not finite.all():
        bad = block.size - int(finite.sum())
        if bad > MAX_NONFINITE_FRACTION * block.size:
            raise AudioError(
                f"{path}: {bad} of {block.size} samples are NaN or infinite "
                f"(more than {MAX_NONFINITE_FRACTION:.0%}); the file looks corrupt"
            )
        block = np.where(finite, block, 0.0).astype(np.float32)
    return np.clip(block.mean(axis=1), -1.0, 1.0).astype(np.float32, copy=False)


def _resample(wave: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    return wave if orig == new else AF.resample(wave, orig, new)


def trim_silence_edges(wave: torch.Tensor, sample_rate: int, top_db: float) -> torch.Tensor:
    """Cut leading/trailing parts whose 25 ms frame energy is more than ``top_db`` below the peak.

    An all-silent clip is returned unchanged (silence is valid audio).
    """
    frame, hop = max(1, int(0.025 * sample_rate)), max(1, int(0.010 * sample_rate))
    if wave.numel() < frame:
        return wave
    energy = wave.unfold(0, frame, hop).pow(2).mean(dim=1)
    peak = energy.max()
    if peak <= 0:
        return wave
    loud = torch.nonzero(10 * torch.log10(energy / peak + 1e-20) > -top_db).flatten()
    start, stop = int(loud[0]) * hop, int(loud[-1]) * hop + frame
    return wave[start:stop]


@dataclass(frozen=True)
class DecodedAudio:
    """A recording decoded once (``decode``): every frame as libsndfile gives it, (frames, channels) float32, and its
    rate. ``load_audio``, ``read_blocks`` and ``audio_duration`` read it exactly as they read the file it came from,
    from memory: a server decodes an upload once instead of once per use (and per block)."""

    data: np.ndarray
    samplerate: int
    name: str = "the audio data"


AudioSource = Union[str, Path, BinaryIO, DecodedAudio]
"""A file name, an open binary file (e.g. an upload in memory) or a decoded recording: read, never written."""


def decode(source: AudioSource) -> DecodedAudio:
    """All of a recording's frames, decoded once (AudioError naming it when it cannot be; see ``load_audio``)."""
    if isinstance(source, DecodedAudio):
        return source
    target, name = _target(source)
    try:
        check_complete(target, name)
        data, rate = sf.read(target, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError) as err:
        raise _unusable(target, name, err, "cannot decode audio") from err
    return DecodedAudio(data, rate, name)


def _target(source: AudioSource) -> tuple[Any, str]:
    """What soundfile opens, and the name errors give."""
    if isinstance(source, (str, Path)):
        return str(source), str(source)
    source.seek(0)
    return source, str(getattr(source, "name", None) or "the audio data")


def check_complete(source: Any, name: str) -> None:
    """Raise AudioError when a WAV file is cut short: its header declares more sample bytes than it holds
    (the decoder would silently return what is there). Other formats fail in the decoder itself."""
    if isinstance(source, str):
        with open(source, "rb") as handle:
            header = handle.read(4096)
            size = handle.seek(0, 2)
    else:
        header = source.read(4096)
        size = source.seek(0, 2)
        source.seek(0)
    if len(header) < 12 or header[:4] not in (b"RIFF", b"RIFX") or header[8:12] != b"WAVE":
        return
    order = "little" if header[:4] == b"RIFF" else "big"
    position = 12
    while position + 8 <= len(header):
        chunk, length = header[position : position + 4], int.from_bytes(header[position + 4 : position + 8], order)
        if chunk == b"data":
            present = size - position - 8
            if length != 0xFFFFFFFF and present < length:
                raise AudioError(f"{name}: the file is truncated (its header declares {length} bytes of samples, "
                                 f"{max(0, present)} are present)")
            return
        position += 8 + length + (length & 1)


def load_audio(
    path: AudioSource, sample_rate: int, *, trim_silence: bool = False, trim_db: float = 40.0
) -> torch.Tensor:
    """Decode ``path`` to a finite mono float32 tensor (T,) at ``sample_rate``.

    Channels are averaged; samples are clamped to [-1, 1] (clipping and out-of-range float WAVs);
    NaN/Inf samples are replaced by 0 when they are at most 1 % of the file, otherwise the file is
    rejected. Silence is valid and comes back as zeros. Raises AudioError (naming the file and the
    reason) for unreadable, empty or mostly non-finite files.
    """
    decoded = decode(path)
    data, rate, name = decoded.data, decoded.samplerate, decoded.name
    if data.shape[0] == 0:
        raise AudioError(f"{name}: the file contains no samples")
    wave = _resample(torch.from_numpy(_sanitize(data, name)), rate, sample_rate)
    if trim_silence:
        wave = trim_silence_edges(wave, sample_rate, trim_db)
    return wave.contiguous()


def read_blocks(path: AudioSource, block_seconds: float) -> tuple[int, Iterator[torch.Tensor]]:
    """The file's sample rate and its consecutive mono blocks of ``block_seconds`` at that rate (sanitised like
    ``load_audio``; bounded memory). The file is opened here, so a file that cannot be opened fails at once."""
    if block_seconds <= 0:
        raise ValueError(f"block_seconds must be positive, got {block_seconds}")
    if isinstance(path, DecodedAudio):
        return path.samplerate, _decoded_blocks(path, block_seconds)
    target, name = _target(path)
    try:
        check_complete(target, name)
        handle = sf.SoundFile(target)
    except (sf.SoundFileError, RuntimeError, OSError) as err:
        raise _unusable(target, name, err, "cannot decode audio") from err

    def blocks() -> Iterator[torch.Tensor]:
        with handle:
            frames = max(1, int(round(block_seconds * handle.samplerate)))
            while True:
                try:
                    block = handle.read(frames, dtype="float32", always_2d=True)
                except (sf.SoundFileError, RuntimeError) as err:
                    raise AudioError(f"{name}: decoding failed at frame {handle.tell()} ({err})") from err
                if block.shape[0] == 0:
                    return
                yield torch.from_numpy(_sanitize(block, name))

    return handle.samplerate, blocks()


def _decoded_blocks(decoded: DecodedAudio, block_seconds: float) -> Iterator[torch.Tensor]:
    """The blocks ``read_blocks`` reads from the file, cut from its decoded frames."""
    frames = max(1, int(round(block_seconds * decoded.samplerate)))
    for start in range(0, decoded.data.shape[0], frames):
        yield torch.from_numpy(_sanitize(decoded.data[start : start + frames], decoded.name))


def iter_audio_blocks(path: AudioSource, sample_rate: int, block_seconds: float) -> Iterator[torch.Tensor]:
    """Stream a (long) file as consecutive mono blocks at ``sample_rate`` with bounded memory.

    Each block holds ``block_seconds`` of audio (the last one may be shorter) and is sanitised like
    ``load_audio``. Blocks are resampled independently, so block edges carry tiny resampling
    transients; the sum of block lengths matches a whole-file resampling to within a sample per block.
    """
    rate, blocks = read_blocks(path, block_seconds)
    for block in blocks:
        yield _resample(block, rate, sample_rate)


def audio_duration(path: AudioSource) -> float:
    """Duration in seconds read from the file header (no decoding)."""
    if isinstance(path, DecodedAudio):
        return path.data.shape[0] / path.samplerate
    target, name = _target(path)
    try:
        return float(sf.info(target).duration)
    except (sf.SoundFileError, RuntimeError, OSError) as err:
        raise _unusable(target, name, err, "cannot read the audio header") from err
