"""Robust audio decoding: any rate, any channel count, WAV/FLAC/OGG, never NaN.

Decoding uses soundfile (libsndfile); resampling uses ``torchaudio.functional.resample``.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from ser_lightning.errors import DataError, os_reason

MAX_NONFINITE_FRACTION = 0.01
"""Files with more non-finite samples than this fraction are rejected; fewer are zeroed."""


class AudioError(DataError, ValueError):
    """An audio file cannot be decoded into usable samples; the message names the file."""


def _unusable(path: Path, error: Exception, what: str) -> AudioError:
    """The AudioError for a file libsndfile refused: the system's reason when the file cannot even be
    opened (libsndfile then says only "System error."), else libsndfile's."""
    try:
        with open(path, "rb"):
            pass
    except OSError as os_error:
        return AudioError(f"{path}: cannot be read ({os_reason(os_error)})")
    return AudioError(f"{path}: {what} ({error})")


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


def load_audio(
    path: str | Path, sample_rate: int, *, trim_silence: bool = False, trim_db: float = 40.0
) -> torch.Tensor:
    """Decode ``path`` to a finite mono float32 tensor (T,) at ``sample_rate``.

    Channels are averaged; samples are clamped to [-1, 1] (clipping and out-of-range float WAVs);
    NaN/Inf samples are replaced by 0 when they are at most 1 % of the file, otherwise the file is
    rejected. Silence is valid and comes back as zeros. Raises AudioError (naming the file and the
    reason) for unreadable, empty or mostly non-finite files.
    """
    path = Path(path)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError) as err:
        raise _unusable(path, err, "cannot decode audio") from err
    if data.shape[0] == 0:
        raise AudioError(f"{path}: the file contains no samples")
    wave = _resample(torch.from_numpy(_sanitize(data, path)), rate, sample_rate)
    if trim_silence:
        wave = trim_silence_edges(wave, sample_rate, trim_db)
    return wave.contiguous()


def iter_audio_blocks(path: str | Path, sample_rate: int, block_seconds: float) -> Iterator[torch.Tensor]:
    """Stream a (long) file as consecutive mono blocks at ``sample_rate`` with bounded memory.

    Each block holds ``block_seconds`` of audio (the last one may be shorter) and is sanitised like
    ``load_audio``. Blocks are resampled independently, so block edges carry tiny resampling
    transients; the sum of block lengths matches a whole-file resampling to within a sample per block.
    """
    if block_seconds <= 0:
        raise ValueError(f"block_seconds must be positive, got {block_seconds}")
    path = Path(path)
    try:
        handle = sf.SoundFile(str(path))
    except (sf.SoundFileError, RuntimeError, OSError) as err:
        raise _unusable(path, err, "cannot decode audio") from err
    with handle:
        frames = max(1, int(round(block_seconds * handle.samplerate)))
        while True:
            try:
                block = handle.read(frames, dtype="float32", always_2d=True)
            except (sf.SoundFileError, RuntimeError) as err:
                raise AudioError(f"{path}: decoding failed at frame {handle.tell()} ({err})") from err
            if block.shape[0] == 0:
                return
            yield _resample(torch.from_numpy(_sanitize(block, path)), handle.samplerate, sample_rate)


def audio_duration(path: str | Path) -> float:
    """Duration in seconds read from the file header (no decoding)."""
    try:
        return float(sf.info(str(path)).duration)
    except (sf.SoundFileError, RuntimeError, OSError) as err:
        raise _unusable(Path(path), err, "cannot read the audio header") from err
