"""Acoustic features (torchaudio transforms) and SpecAugment.

Four features, chosen by ``FeatureConfig.name`` (the ``data.feature`` YAML section):

- ``logmel``: log-mel spectrogram, defaults 16 kHz, 25 ms window, 10 ms hop, 64 mel bands.
- ``spectrogram``: log-magnitude STFT with a Hamming window as in Zhang et al. 2018; defaults
  40 ms window, 10 ms hop, 50 ms DFT (800 points at 16 kHz), lowest 200 bins (0-4 kHz at 16 kHz).
- ``loudness_contour``: the input of the "Emotion in Motion" course project: 44.1 kHz audio from
  0.5 s to 3.5 s (zero-padded when shorter, never dropped), librosa-style slaney mel power
  spectrogram (2048-point FFT, hop 512, centred frames with reflect padding as in librosa 0.8, 128
  bands up to 8 kHz) in dB (ref 1, amin 1e-10, top_db 80), averaged over the mel bands: a 1 x 259
  loudness contour. It requires sample_rate 44100 (the default for this feature).
- ``ssl``: hidden states of a self-supervised speech model (wav2vec 2.0, HuBERT, WavLM: ``ssl_model``,
  one layer or the mean of several: ``ssl_layer``), 16 kHz, one frame per 20 ms, F = the model's
  width (``ser_lightning.data.ssl``).

``pitch: true`` appends two rows to ``logmel`` or ``spectrogram``: a continuous log-f0 contour and
the voicing strength per frame (``ser_lightning.data.pitch``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torchaudio.transforms as T
from torch import nn

from .pitch import PITCH_REACH, PITCH_ROWS, continuous_pitch, pitch_frames
from .ssl import SAMPLE_RATE as SSL_SAMPLE_RATE
from .ssl import SSLExtractor, SSLSpec, resolve_ssl

FEATURE_NAMES = ("logmel", "spectrogram", "loudness_contour", "ssl")
SSL_OPTIONS = ("ssl_model", "ssl_layer", "ssl_weights", "ssl_arch")
FRAME_OPTIONS = ("win_ms", "hop_ms", "n_mels", "n_fft", "f_max")
FEATURE_CODE_VERSION = 2
"""Part of every cache key: raise it whenever a change makes the same options compute different features,
so that no cache entry of the old code is ever mixed with new ones."""
LOG_FLOOR = 1e-6
"""Added before the log so that silence gives a finite floor instead of -inf."""
CONTOUR_OFFSET_S, CONTOUR_WINDOW_S = 0.5, 3.0


@dataclass(frozen=True)
class ResolvedFeatures:
    """A FeatureConfig with every default filled in (see ``FeatureConfig.resolved``)."""

    name: str
    sample_rate: int
    win_length: int
    hop_length: int
    n_fft: int
    n_mels: int
    n_bins: int
    f_max: float
    trim_silence: bool
    pitch: bool = False
    ssl: SSLSpec | None = None

    @property
    def num_features(self) -> int:
        if self.ssl is not None:
            return self.ssl.width
        rows = {"logmel": self.n_mels, "spectrogram": self.n_bins, "loudness_contour": 1}[self.name]
        return rows + (PITCH_ROWS if self.pitch else 0)


@dataclass
class FeatureConfig:
    """Feature choice and parameters; None means the feature's default (see the module docstring).

    sample_rate: audio is resampled to this rate (logmel/spectrogram 16000, loudness_contour 44100).
    win_ms / hop_ms: analysis window and hop in milliseconds (fixed 2048/512 samples for loudness_contour).
    n_mels: mel bands (logmel 64; loudness_contour 128). n_fft: DFT size (logmel: next power of two of
    the window; spectrogram: 50 ms = 800 points at 16 kHz; loudness_contour 2048). n_bins: lowest STFT
    bins kept (spectrogram). f_max: highest mel frequency (logmel: Nyquist; loudness_contour 8000).
    trim_silence: cut leading/trailing silence before the feature (off by default).
    pitch: append a log-f0 contour and the voicing strength as two more rows (logmel, spectrogram).
    ssl_model / ssl_layer / ssl_weights / ssl_arch (name ssl only): a torchaudio bundle name (default
    WAVLM_BASE_PLUS) or ``custom``; a layer 1..L or a list of layers to average (default: the middle
    one); a local weights file (state dict), else the bundle's file in the torch hub cache; the
    architecture of a custom model (see ``ser_lightning.data.ssl``).
    """

    name: Literal["logmel", "spectrogram", "loudness_contour", "ssl"] = "logmel"
    sample_rate: int | None = None
    win_ms: float | None = None
    hop_ms: float | None = None
    n_mels: int | None = None
    n_fft: int | None = None
    n_bins: int = 200
    f_max: float | None = None
    trim_silence: bool = False
    pitch: bool = False
    ssl_model: str | None = None
    ssl_layer: int | list[int] | None = None
    ssl_weights: str | None = None
    ssl_arch: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.name not in FEATURE_NAMES:
            raise ValueError(f"data.feature.name: unknown feature '{self.name}'; choose from {list(FEATURE_NAMES)}")
        for option in ("sample_rate", "win_ms", "hop_ms", "n_mels", "n_fft", "n_bins", "f_max"):
            value = getattr(self, option)
            if value is not None and not value > 0:
                raise ValueError(f"data.feature.{option}: must be positive, got {value}")
        if self.name == "ssl":
            self._check_ssl()
            return
        for option in SSL_OPTIONS:
            if getattr(self, option) is not None:
                raise ValueError(f"data.feature.{option}: applies to name: ssl only (name is {self.name})")
        r = self.resolved()
        if r.name == "loudness_contour":
            if r.sample_rate != 44100:
                raise ValueError(
                    f"data.feature.sample_rate: loudness_contour reproduces the course project at 44100 Hz, "
                    f"got {r.sample_rate}"
                )
            if r.pitch:
                raise ValueError("data.feature.pitch: the pitch rows go with logmel or spectrogram, not loudness_contour")
            return
        if r.win_length > r.n_fft:
            raise ValueError(f"data.feature.n_fft: {r.n_fft} is smaller than the window ({r.win_length} samples)")
        if r.hop_length < 1:
            raise ValueError(f"data.feature.hop_ms: {self.hop_ms} ms is shorter than one sample")
        if r.name == "spectrogram" and r.n_bins > r.n_fft // 2 + 1:
            raise ValueError(f"data.feature.n_bins: {r.n_bins} exceeds the {r.n_fft // 2 + 1} bins of an {r.n_fft}-point DFT")
        if r.name == "logmel" and r.f_max > r.sample_rate / 2:
            raise ValueError(f"data.feature.f_max: {r.f_max} Hz is above the Nyquist frequency {r.sample_rate / 2} Hz")

    def _check_ssl(self) -> None:
        for option in FRAME_OPTIONS:
            if getattr(self, option) is not None:
                raise ValueError(f"data.feature.{option}: the ssl model sets the frames (one per 20 ms for every "
                                 "torchaudio bundle); leave it unset")
        if self.sample_rate not in (None, SSL_SAMPLE_RATE):
            raise ValueError(f"data.feature.sample_rate: the ssl models take {SSL_SAMPLE_RATE} Hz, got {self.sample_rate}")
        if self.pitch:
            raise ValueError("data.feature.pitch: the pitch rows go with logmel or spectrogram, not ssl")
        self.resolved()  # validates the ssl options

    def resolved(self) -> ResolvedFeatures:
        """The parameters actually used, every None replaced by the feature's default."""
        if self.name == "ssl":
            spec = resolve_ssl(self.ssl_model, self.ssl_layer, self.ssl_weights, self.ssl_arch)
            return ResolvedFeatures(
                self.name, SSL_SAMPLE_RATE, spec.receptive_field, spec.hop_length, 0, 0, 0, SSL_SAMPLE_RATE / 2,
                self.trim_silence, False, spec,
            )
        if self.name == "loudness_contour":
            return ResolvedFeatures(
                self.name, self.sample_rate or 44100, 2048, 512, 2048, self.n_mels or 128, self.n_bins,
                float(self.f_max or 8000.0), self.trim_silence, self.pitch,
            )
        sr = self.sample_rate or 16000
        win_ms = self.win_ms or (25.0 if self.name == "logmel" else 40.0)
        win, hop = round(sr * win_ms / 1000), round(sr * (self.hop_ms or 10.0) / 1000)
        if self.n_fft:
            n_fft = self.n_fft
        elif self.name == "spectrogram":
            n_fft = max(win, round(sr * 0.050))
        else:
            n_fft = 2 ** math.ceil(math.log2(max(win, 2)))
        return ResolvedFeatures(
            self.name, sr, win, hop, n_fft, self.n_mels or 64, self.n_bins, float(self.f_max or sr / 2),
            self.trim_silence, self.pitch,
        )

    @property
    def num_features(self) -> int:
        """Feature dimension F of the (F, N) output."""
        return self.resolved().num_features

    def key(self) -> str:
        """A stable text key of the resolved parameters and of the code computing them (for the feature cache);
        with ssl, also the weights' identity."""
        resolved = self.resolved()
        key = f"v{FEATURE_CODE_VERSION}|" + repr(sorted(asdict(resolved).items()))
        return key if resolved.ssl is None else f"{key}|weights={resolved.ssl.identity()}"


class FeatureKind(nn.Module):
    """One kind of feature (``data.feature.name``): configuration in ``__init__``, waveform -> (F, N) in ``forward``.

    A *local* kind computes every frame from the samples within ``reach`` of its centre (frame t is
    centred on sample t * hop, zero padding outside the waveform), so a long stream can compute its
    frames once, as the audio arrives (``ser_lightning.inference.stream``). ``raw`` gives those per-frame
    values; ``finish`` turns the raw frames of one stretch of audio into its features (identity here).
    """

    name: str = ""
    local = True

    def __init__(self, cfg: ResolvedFeatures) -> None:
        super().__init__()
        self.cfg = cfg

    @property
    def reach(self) -> int:
        """Samples on each side of a frame's centre that its value depends on (local kinds)."""
        return self.cfg.n_fft - self.cfg.n_fft // 2

    def frames(self, num_samples: int | torch.Tensor) -> int | torch.Tensor:
        """Number of frames of a waveform of ``num_samples`` samples (centred frames every hop)."""
        return 1 + num_samples // self.cfg.hop_length

    def raw(self, wave: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, raw: torch.Tensor) -> torch.Tensor:
        return raw

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.finish(self.raw(wave))


class LogMel(FeatureKind):
    """Log-mel spectrogram (power, centred frames, zero padding)."""

    name = "logmel"

    def __init__(self, cfg: ResolvedFeatures) -> None:
        super().__init__(cfg)
        self.transform = T.MelSpectrogram(
            sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop_length,
            f_max=cfg.f_max, n_mels=cfg.n_mels, power=2.0, center=True, pad_mode="constant",
        )

    def raw(self, wave: torch.Tensor) -> torch.Tensor:
        return torch.log(self.transform(wave) + LOG_FLOOR)


class Spectrogram(FeatureKind):
    """Log-magnitude STFT with a Hamming window, the lowest ``n_bins`` bins (Zhang et al. 2018)."""

    name = "spectrogram"

    def __init__(self, cfg: ResolvedFeatures) -> None:
        super().__init__(cfg)
        self.transform = T.Spectrogram(
            n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop_length,
            window_fn=torch.hamming_window, power=1.0, center=True, pad_mode="constant",
        )

    def raw(self, wave: torch.Tensor) -> torch.Tensor:
        return torch.log(self.transform(wave)[..., : self.cfg.n_bins, :] + LOG_FLOOR)


class LoudnessContour(FeatureKind):
    """The course project's 1 x 259 loudness contour of the 3 s after a 0.5 s offset (not local: a fixed window)."""

    name = "loudness_contour"
    local = False

    def __init__(self, cfg: ResolvedFeatures) -> None:
        super().__init__(cfg)
        self.transform = T.MelSpectrogram(
            sample_rate=cfg.sample_rate, n_fft=2048, win_length=2048, hop_length=512, f_min=0.0, f_max=cfg.f_max,
            n_mels=cfg.n_mels, power=2.0, center=True, pad_mode="reflect", norm="slaney", mel_scale="slaney",
        )
        self.to_db = T.AmplitudeToDB(stype="power", top_db=80.0)
        self.window_samples = round(CONTOUR_WINDOW_S * cfg.sample_rate)
        self.offset_samples = round(CONTOUR_OFFSET_S * cfg.sample_rate)

    def frames(self, num_samples: int | torch.Tensor) -> int | torch.Tensor:
        frames = 1 + self.window_samples // self.cfg.hop_length
        return torch.full_like(num_samples, frames) if isinstance(num_samples, torch.Tensor) else frames

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        window = wave[..., self.offset_samples : self.offset_samples + self.window_samples]
        window = nn.functional.pad(window, (0, self.window_samples - window.shape[-1]))
        power = self.transform(window)  # (..., n_mels, N)
        # AmplitudeToDB applies top_db per (channel-packed) item: give each utterance its own channel axis.
        db = self.to_db(power.unsqueeze(-3)).squeeze(-3)
        return db.mean(dim=-2, keepdim=True)


class SelfSupervised(FeatureKind):
    """Hidden states of a self-supervised speech model (``data.ssl``; not local: a transformer sees the whole clip)."""

    name = "ssl"
    local = False

    def __init__(self, cfg: ResolvedFeatures) -> None:
        super().__init__(cfg)
        self.transform = SSLExtractor(cfg.ssl)

    def frames(self, num_samples: int | torch.Tensor) -> int | torch.Tensor:
        return self.transform.frames(num_samples)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.transform(wave)


FEATURE_KINDS: dict[str, type[FeatureKind]] = {kind.name: kind for kind in (LogMel, Spectrogram, LoudnessContour,
                                                                            SelfSupervised)}
"""``data.feature.name`` -> its class. A new kind is one class here and its entry (and its ``FeatureConfig`` defaults)."""


class FeatureExtractor(nn.Module):
    """Waveform (T,) or (B, T) at ``cfg.sample_rate`` -> features (F, N) or (B, F, N): the configured kind, plus
    the two pitch rows (``pitch_frames`` raw, made continuous by ``continuous_pitch`` in ``finish``) with ``pitch``."""

    def __init__(self, cfg: FeatureConfig | None = None) -> None:
        super().__init__()
        self.cfg = (cfg or FeatureConfig()).resolved()
        self.kind = FEATURE_KINDS[self.cfg.name](self.cfg)
        self.sample_rate: int = self.cfg.sample_rate
        self.hop_length = self.cfg.hop_length

    @property
    def num_features(self) -> int:
        return self.cfg.num_features

    @property
    def hop_seconds(self) -> float:
        return self.hop_length / self.sample_rate

    @property
    def local(self) -> bool:
        """Whether every frame depends only on the samples within ``reach`` of its centre (see ``FeatureKind``)."""
        return self.kind.local

    @property
    def reach(self) -> int:
        return max(self.kind.reach, PITCH_REACH(self.sample_rate) if self.cfg.pitch else 0)

    def frames(self, num_samples: int | torch.Tensor) -> int | torch.Tensor:
        """Number of feature frames for a waveform of ``num_samples`` samples."""
        return self.kind.frames(num_samples)

    def raw(self, wave: torch.Tensor) -> torch.Tensor:
        """Per-frame values of a mono (T,) waveform (local kinds): the kind's rows, then the raw pitch rows."""
        rows = self.kind.raw(wave.float())
        if not self.cfg.pitch:
            return rows
        return torch.cat([rows, pitch_frames(wave.float(), self.sample_rate, self.hop_length).to(rows)], dim=-2)

    def finish(self, raw: torch.Tensor) -> torch.Tensor:
        """The features of one stretch of audio from its raw frames (``raw``)."""
        rows = self.kind.finish(raw[: raw.shape[0] - PITCH_ROWS] if self.cfg.pitch else raw)
        if not self.cfg.pitch:
            return rows
        return torch.cat([rows, continuous_pitch(raw[-PITCH_ROWS:])], dim=-2)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() not in (1, 2):
            raise ValueError(f"FeatureExtractor expects a waveform (T,) or (B, T), got shape {tuple(wave.shape)}")
        wave = wave.float()
        if not self.kind.local or not self.cfg.pitch:
            return self.kind(wave)
        if wave.dim() == 1:
            return self.finish(self.raw(wave))
        return torch.stack([self.finish(self.raw(w)) for w in wave])

    def load(self) -> None:
        """Load what the extractor needs before its first waveform (the ssl model); nothing for the others."""
        if self.cfg.name == "ssl":
            self.kind.transform.load()

    def extract_many(self, waves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Features of each waveform (T_i,): batched where the front end allows it (ssl), else one by one."""
        if self.cfg.name == "ssl":
            return self.kind.transform.extract_many(waves)
        return [self(wave) for wave in waves]


@dataclass
class SpecAugmentConfig:
    """SpecAugment-style masking for training batches (``data.augment``; omit it to disable).

    freq_mask_param / time_mask_param: maximum width of one mask in feature bins / frames;
    num_masks: masks of each kind per utterance.
    """

    freq_mask_param: int = 8
    time_mask_param: int = 20
    num_masks: int = 2

    def __post_init__(self) -> None:
        for option in ("freq_mask_param", "time_mask_param", "num_masks"):
            if getattr(self, option) < 0:
                raise ValueError(f"data.augment.{option}: must be >= 0, got {getattr(self, option)}")


class SpecAugment(nn.Module):
    """Applies frequency and time masks to one utterance (F, N) (its valid frames only)."""

    def __init__(self, cfg: SpecAugmentConfig) -> None:
        super().__init__()
        self.num_masks = cfg.num_masks
        self.freq = T.FrequencyMasking(cfg.freq_mask_param)
        self.time = T.TimeMasking(cfg.time_mask_param)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.clone()
        for _ in range(self.num_masks):
            x = self.time(self.freq(x))
        return x
