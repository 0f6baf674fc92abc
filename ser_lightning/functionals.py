"""Utterance-level statistics of frame features: what the statistics head and the linear baselines read.

Two sets, each a pure function of raw or normalised (B, F, N) features and their lengths:

- ``pooled`` (``utterance_statistics``): per row mean, standard deviation and mean absolute change,
  the loudness dynamics and the log duration: 3F + 2 values of whatever the input is.
- ``prosodic`` (``prosodic_functionals``): voice-science functionals of a log spectrum followed by the
  pitch rows (log-f0 in semitones and the voicing strength, ``data.feature.pitch``), in the spirit of
  eGeMAPS (Eyben et al. 2016) but computed in torch from the model's own input, so that they stream,
  export to ONNX and need no second front end: F0 level, percentiles, range, rises and falls, a jitter
  proxy and the terminal movement; the voicing strength (a harmonics-to-noise proxy); loudness level,
  percentiles, spread and change; rate (voiced segments per second, voiced and unvoiced segment
  lengths, the voiced share, the log duration of speech); spectral slope and an alpha ratio (energy
  above against below the lower 3/8 of the spectral rows, about 1 kHz for 64 mel bands to 8 kHz).
  Speech frames are those within ``SPEECH_RANGE`` (30 dB) of the utterance's loudest frame.

The prosodic set is meant to be z-normalised per speaker at the functional level (each speaker's mean
and standard deviation of every functional over their utterances, no labels): this is what makes
functionals work across voices (see ``ser_lightning.data.speakers``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ser_lightning.padding import length_mask

PITCH_ROWS = 2
"""Rows the pitch track appends: log-f0 in semitones re 100 Hz, then the voicing strength."""
VOICING_THRESHOLD = 0.45
"""Voicing strength above which a frame counts as voiced (the pitch tracker's own threshold)."""
SPEECH_RANGE = 30.0 * math.log(10) / 10
"""Frames whose log energy is within 30 dB (in natural-log units of power) of the loudest one are speech."""
FINAL_FRAMES = 20
"""The terminal pitch movement is measured over the last voiced frames, this many."""
LOW_BAND_FRACTION = 3 / 8
NUM_PROSODIC = 27
"""Width of ``prosodic_functionals``."""


def utterance_statistics(x: Tensor, lengths: Tensor) -> Tensor:
    """Pooled statistics of (B, F, N) features over each utterance's valid frames: (B, 3F + 2).

    Per row: mean, standard deviation and mean absolute frame-to-frame change; then the standard
    deviation of the row-mean contour (loudness dynamics for log spectra) and the log number of
    frames (duration). The linear baseline and the models' statistics head use exactly these.
    """
    valid = length_mask(lengths, x.shape[-1])
    mask = valid.unsqueeze(1).to(x.dtype)
    count = lengths.to(x.dtype).clamp_min(1).unsqueeze(1)  # (B, 1)
    mean, std = _row_mean_std(x, valid)
    pairs = mask[..., 1:] * mask[..., :-1]
    change = ((x[..., 1:] - x[..., :-1]).abs() * pairs).sum(-1) / (count - 1).clamp_min(1)
    _, contour_std = _row_mean_std(x.mean(dim=1, keepdim=True), valid)
    return torch.cat([mean, std, change, contour_std, count.log()], dim=1)


def _row_mean_std(x: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's mean and standard deviation of (B, F, N) values over the (B, N) boolean ``frames`` (0 where none)."""
    mask = frames.unsqueeze(1).to(x.dtype)
    count = mask.sum(-1).clamp_min(1)
    mean = (x * mask).sum(-1) / count
    var = ((x - mean.unsqueeze(-1)).pow(2) * mask).sum(-1) / count
    return mean, var.clamp_min(0).sqrt()


def num_statistics(num_features: int) -> int:
    """Width of ``utterance_statistics`` for F feature rows."""
    return 3 * num_features + 2


def voiced_statistics(x: Tensor, raw: Tensor, lengths: Tensor) -> Tensor:
    """(B, 2F): the mean and standard deviation of each row of (B, F, N) features ``x`` over the voiced frames only
    (voicing strength, the last row of the raw features ``raw``, above ``VOICING_THRESHOLD``), as eGeMAPS computes
    its spectral parameters over voiced segments; 0 for an utterance without a voiced frame."""
    return torch.cat(_row_mean_std(x, length_mask(lengths, x.shape[-1]) & (raw[:, -1] > VOICING_THRESHOLD)), dim=1)


class _Masked:
    """Means and standard deviations of (B, N) values over one (B, N) boolean mask (0 where it is empty): its weights
    and count computed once for all the values it is applied to."""

    def __init__(self, mask: Tensor, dtype: torch.dtype) -> None:
        self.weights = mask.to(dtype)
        self.count = self.weights.sum(-1).clamp_min(1)

    def mean(self, values: Tensor) -> Tensor:
        return (values * self.weights).sum(-1) / self.count

    def std(self, values: Tensor, mean: Tensor | None = None) -> Tensor:
        """The standard deviation; ``mean``: ``self.mean(values)`` when known already."""
        mean = self.mean(values) if mean is None else mean
        return (((values - mean.unsqueeze(-1)) * self.weights).pow(2).sum(-1) / self.count).sqrt()


def _mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of (B, N) values over a (B, N) boolean mask; 0 where the mask is empty."""
    return _Masked(mask, values.dtype).mean(values)


def _std(values: Tensor, mask: Tensor) -> Tensor:
    return _Masked(mask, values.dtype).std(values)


def _quantiles(values: Tensor, mask: Tensor, quantiles: tuple[float, ...]) -> Tensor:
    """(B, Q) quantiles (linear interpolation, as ``torch.quantile``) of (B, N) values over a mask; 0 where empty."""
    ordered = values.masked_fill(~mask, float("inf")).sort(dim=-1).values
    count = mask.sum(-1, keepdim=True)
    last = (count - 1).clamp_min(0)
    position = torch.tensor(quantiles, dtype=values.dtype, device=values.device) * last.to(values.dtype)
    below = position.floor().long()
    above = torch.minimum(below + 1, last)
    weight = position - below.to(values.dtype)
    low, high = ordered.gather(-1, below), ordered.gather(-1, above)
    result = low + weight * (high - low)
    return torch.where(count > 0, result, torch.zeros_like(result))


def _segments(mask: Tensor) -> Tensor:
    """(B,) number of runs of True along the last axis."""
    starts = mask[..., 1:] & ~mask[..., :-1]
    return starts.sum(-1) + mask[..., 0].long()


def _slope(values: Tensor, mask: Tensor) -> Tensor:
    """(B,) least-squares slope of values against the frame index over the mask (0 with fewer than 2 frames)."""
    weights = mask.to(values.dtype)
    t = torch.arange(values.shape[-1], device=values.device, dtype=values.dtype).expand_as(values)
    count = weights.sum(-1).clamp_min(1)
    t_mean = (t * weights).sum(-1, keepdim=True) / count.unsqueeze(-1)
    v_mean = (values * weights).sum(-1, keepdim=True) / count.unsqueeze(-1)
    covariance = ((t - t_mean) * (values - v_mean) * weights).sum(-1)
    variance = ((t - t_mean).pow(2) * weights).sum(-1)
    return torch.where(variance > 0, covariance / variance.clamp_min(1e-12), torch.zeros_like(covariance))


def prosodic_functionals(x: Tensor, lengths: Tensor) -> Tensor:
    """(B, NUM_PROSODIC) functionals of raw (B, S + 2, N) features: S log-spectral rows, then the pitch rows.

    Every value is finite, also for silence or an utterance without a voiced frame (0 where a set is empty).
    """
    x = x.double() if x.dtype == torch.float64 else x.float()
    spectrum, semitones, strength = x[:, :-PITCH_ROWS], x[:, -2], x[:, -1]
    frames = x.shape[-1]
    valid = length_mask(lengths, frames)
    energy = torch.logsumexp(spectrum, dim=1)  # (B, N) log power of each frame
    loudest = energy.masked_fill(~valid, float("-inf")).amax(-1, keepdim=True)
    speech = valid & (energy > loudest - SPEECH_RANGE)
    voiced = valid & (strength > VOICING_THRESHOLD)
    zero = torch.zeros_like(energy[:, 0])

    over_voiced, over_speech = _Masked(voiced, x.dtype), _Masked(speech, x.dtype)  # (each mask's weights once)
    pitch_mean = over_voiced.mean(semitones)

    pitch_q = _quantiles(semitones, voiced, (0.2, 0.5, 0.8))
    pitch = [pitch_q, pitch_mean.unsqueeze(-1), over_voiced.std(semitones, pitch_mean).unsqueeze(-1),
             (pitch_q[:, 2] - pitch_q[:, 0]).unsqueeze(-1)]
    step = semitones[:, 1:] - semitones[:, :-1]
    pairs = voiced[:, 1:] & voiced[:, :-1]
    rises, falls = _mean(step, pairs & (step > 0)), _mean(step, pairs & (step < 0))
    curvature = (semitones[:, 2:] - 2 * semitones[:, 1:-1] + semitones[:, :-2]).abs()
    jitter = _mean(curvature, pairs[:, 1:] & voiced[:, :-2])
    from_end = voiced.flip(-1).long().cumsum(-1).flip(-1)  # voiced frames at or after each frame
    final = voiced & (from_end <= FINAL_FRAMES)
    voiced_count = voiced.sum(-1)
    enough = voiced_count >= 5
    final_slope = torch.where(enough, _slope(semitones, final), zero)
    final_level = torch.where(enough, _mean(semitones, voiced & (from_end <= 5)) - pitch_mean, zero)
    movement = torch.stack([rises, falls, jitter, final_slope, final_level], dim=-1)

    quality = torch.stack([over_voiced.mean(strength), over_speech.mean(strength)], dim=-1)
    loudness_q = _quantiles(energy, speech, (0.2, 0.5, 0.8))
    change = _mean((energy[:, 1:] - energy[:, :-1]).abs(), speech[:, 1:] & speech[:, :-1])
    loudness = [loudness_q, over_speech.std(energy).unsqueeze(-1), change.unsqueeze(-1)]

    index = torch.arange(frames, device=x.device)
    first = torch.where(speech, index, frames).amin(-1)
    last = torch.where(speech, index, -1).amax(-1)
    duration = (last - first + 1).clamp_min(1).to(x.dtype)
    segments = _segments(voiced).to(x.dtype)
    pauses = speech & ~voiced
    voiced_frames = voiced_count.to(x.dtype)
    rate = torch.stack([
        segments / duration,
        voiced_frames / segments.clamp_min(1),
        voiced_frames / duration,
        duration.log(),
        pauses.sum(-1).to(x.dtype) / _segments(pauses).clamp_min(1).to(x.dtype),
    ], dim=-1)

    rows = spectrum.shape[1]
    centred = torch.arange(rows, device=x.device, dtype=x.dtype) - (rows - 1) / 2
    tilt = (centred[None, :, None] * (spectrum - spectrum.mean(1, keepdim=True))).sum(1) / centred.pow(2).sum()
    split = max(1, round(rows * LOW_BAND_FRACTION))
    alpha = torch.logsumexp(spectrum[:, split:], dim=1) - torch.logsumexp(spectrum[:, :split], dim=1)
    tilt_mean, alpha_mean = over_voiced.mean(tilt), over_voiced.mean(alpha)
    spectral = torch.stack([tilt_mean, over_voiced.std(tilt, tilt_mean), alpha_mean, over_voiced.std(alpha, alpha_mean)],
                           dim=-1)
    return torch.cat([*pitch, movement, quality, *loudness, rate, spectral], dim=-1)


def prosodic_rows(features: list[Tensor], chunk: int = 64) -> Tensor:
    """(N, NUM_PROSODIC) prosodic functionals of each raw (F, n) utterance (in padded chunks; float32)."""
    from ser_lightning.padding import pad_last

    rows = [prosodic_functionals(*pad_last(features[start : start + chunk])) for start in range(0, len(features), chunk)]
    return torch.cat(rows).float() if rows else torch.zeros(0, NUM_PROSODIC)


def speaker_stats_width(num_features: int, pitch: bool) -> int:
    """Columns of a speaker's statistics (2, W): the F frame rows, then (with the pitch rows) the prosodic functionals."""
    return num_features + (NUM_PROSODIC if pitch else 0)
