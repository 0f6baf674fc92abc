"""A pitch track aligned with the spectral features: log-f0 and voicing strength per frame.

For each frame (centred like the spectrogram frames: frame t covers samples around t * hop) the
normalised cross-correlation function (NCCF) of a ``win_ms`` window is computed for every lag
between 1 / f_max and 1 / f_min; the shortest lag whose NCCF is a local peak within ``OCTAVE_MARGIN``
of the highest gives f0 = sample_rate / lag (multiples of the period, which peak almost as high,
would give octave errors) and its value (0..1) the voicing strength. Frames whose strength exceeds ``voicing_threshold`` are voiced; the
log-f0 row (semitones relative to 100 Hz) is interpolated linearly through unvoiced frames and
held constant beyond the first and last voiced frame, so it is a continuous contour (as Kaldi's
pitch features are). An utterance with no voiced frame gets a flat contour at 0 (100 Hz).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

PITCH_ROWS = 2
"""Rows appended to the features: log-f0 in semitones re 100 Hz, voicing strength."""
OCTAVE_MARGIN = 0.9
"""A peak at a shorter lag wins when it reaches this fraction of the highest peak."""


WIN_MS = 40.0
VOICING_THRESHOLD = 0.45


def _window(sample_rate: int, win_ms: float = WIN_MS) -> int:
    return max(4, round(sample_rate * win_ms / 1000))


def PITCH_REACH(sample_rate: int) -> int:  # noqa: N802 - a constant of the sample rate
    """Samples on each side of a frame's centre that its raw pitch values depend on."""
    win = _window(sample_rate)
    return win - win // 2


def pitch_track(wave: Tensor, sample_rate: int, hop_length: int, **options: float) -> Tensor:
    """(T,) waveform -> (2, 1 + T // hop_length): semitones re 100 Hz (continuous) and voicing strength."""
    return continuous_pitch(pitch_frames(wave, sample_rate, hop_length, **options))


def continuous_pitch(raw: Tensor, voicing_threshold: float = VOICING_THRESHOLD) -> Tensor:
    """Raw (2, N) frames (``pitch_frames``) -> the semitone row interpolated through unvoiced frames, and the strength."""
    return torch.stack([_through_unvoiced(raw[0], raw[1] > voicing_threshold), raw[1]])


def pitch_frames(
    wave: Tensor,
    sample_rate: int,
    hop_length: int,
    *,
    win_ms: float = WIN_MS,
    f_min: float = 60.0,
    f_max: float = 500.0,
) -> Tensor:
    """(T,) waveform -> raw (2, 1 + T // hop_length) frames: the semitones of each frame's best lag (also where it is
    unvoiced) and the voicing strength; every frame depends only on the samples within ``PITCH_REACH`` of its centre."""
    if wave.dim() != 1:
        raise ValueError(f"pitch_track expects a waveform (T,), got shape {tuple(wave.shape)}")
    wave = wave.float()
    win = _window(sample_rate, win_ms)
    num_frames = 1 + wave.numel() // hop_length
    padded = torch.nn.functional.pad(wave, (win // 2, win // 2))
    needed = (num_frames - 1) * hop_length + win
    padded = torch.nn.functional.pad(padded, (0, max(0, needed - padded.numel())))
    frames = padded.unfold(0, win, hop_length)[:num_frames]
    frames = frames - frames.mean(dim=1, keepdim=True)

    n_fft = 1 << (2 * win - 1).bit_length()
    spectrum = torch.fft.rfft(frames, n_fft)
    # |spectrum|: hypot of contiguous real and imaginary parts gives the bits of spectrum.abs() at half its time
    magnitude = torch.hypot(spectrum.real.contiguous(), spectrum.imag.contiguous())
    autocorrelation = torch.fft.irfft(magnitude.pow(2), n_fft)[:, :win]
    low = max(1, int(sample_rate / f_max))
    high = min(win - 1, int(math.ceil(sample_rate / f_min)))
    lags = torch.arange(low, high + 1)
    energy = torch.nn.functional.pad(frames.pow(2), (1, 0)).cumsum(dim=1)  # energy[:, k] = sum x[:k]^2
    head = energy[:, win - lags]  # sum of x[0 : win - lag]^2
    tail = energy[:, win : win + 1] - energy[:, lags]  # sum of x[lag : win]^2
    nccf = autocorrelation[:, lags] / (head * tail).clamp_min(1e-12).sqrt()
    inner = nccf[:, 1:-1]
    peaks = (inner >= nccf[:, :-2]) & (inner >= nccf[:, 2:]) & (inner >= OCTAVE_MARGIN * nccf.amax(dim=1, keepdim=True))
    best = torch.where(peaks.any(dim=1), peaks.int().argmax(dim=1) + 1, nccf.argmax(dim=1))  # argmax: first peak
    strength = nccf.gather(1, best.unsqueeze(1)).squeeze(1).clamp(0.0, 1.0)
    semitones = 12 * torch.log2(sample_rate / lags[best].float() / 100.0)
    return torch.stack([semitones, strength])


def _through_unvoiced(values: Tensor, voiced: Tensor) -> Tensor:
    """``values`` at voiced frames, linearly interpolated between them and held beyond the ends."""
    known = torch.nonzero(voiced).flatten()
    if known.numel() == 0:
        return torch.zeros_like(values)
    if known.numel() == 1:
        return torch.full_like(values, float(values[known[0]]))
    frames = torch.arange(values.numel())
    right = torch.searchsorted(known, frames).clamp(1, known.numel() - 1)
    x0, x1 = known[right - 1], known[right]
    weight = ((frames - x0).float() / (x1 - x0).float()).clamp(0.0, 1.0)
    return values[x0] + weight * (values[x1] - values[x0])
