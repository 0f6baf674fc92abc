"""Acoustic features (torchaudio transforms) and SpecAugment.

One class per kind of feature (``FeatureKind``), chosen by ``FeatureConfig.name`` (the ``data.feature``
YAML section) through ``FEATURE_KINDS``: ``logmel``, ``spectrogram``, ``loudness_contour`` and ``ssl``
(see each class for its defaults). Each kind fills in its defaults (``resolve``), checks the options
(``check``) and says how many rows it gives (``rows``), so that adding a kind is one class and its entry.

``pitch: true`` appends two rows to ``logmel`` or ``spectrogram``: a continuous log-f0 contour and
the voicing strength per frame (``ser_lightning.data.pitch``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torchaudio.transforms as T
from torch import nn

from .pitch import PITCH_REACH, PITCH_ROWS, continuous_pitch, pitch_frames
from .ssl import SAMPLE_RATE as SSL_SAMPLE_RATE
from .ssl import SSLExtractor, SSLSpec, resolve_ssl

SSL_OPTIONS = ("ssl_model", "ssl_layer", "ssl_weights", "ssl_arch")
FRAME_OPTIONS = ("win_ms", "hop_ms", "n_mels", "n_fft", "f_max")
POSITIVE_OPTIONS = ("sample_rate", "win_ms", "hop_ms", "n_mels", "n_fft", "n_bins", "f_max")
FEATURE_CODE_VERSION = 2
"""Part of every cache key: raise it whenever a change makes the same options compute different features,
so that no cache entry of the old code is ever mixed with new ones."""
LOG_FLOOR = 1e-6
"""Added before the log so that silence gives a finite floor instead of -inf."""
CONTOUR_OFFSET_S, CONTOUR_WINDOW_S = 0.5, 3.0
RAW_MANY_FRAMES = 256
"""Frames ``FeatureExtractor.raw_many`` computes in one call at most: beyond a few MB its temporaries (the pitch
track's 2048-point spectra) cost more in memory traffic than the calls they save."""


@dataclass(frozen=True)
class ResolvedFeatures:
    """A FeatureConfig with every default filled in by its kind (``FeatureKind.resolve``); its fields make the cache key."""

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
        return FEATURE_KINDS[self.name].rows(self) + (PITCH_ROWS if self.pitch else 0)


@dataclass
class FeatureConfig:
    """Feature choice and parameters; None means the kind's default (see the ``FeatureKind`` classes).

    name: the kind, a key of ``FEATURE_KINDS``.
    sample_rate: audio is resampled to this rate. win_ms / hop_ms: analysis window and hop in milliseconds.
    n_mels: mel bands. n_fft: DFT size. n_bins: lowest STFT bins kept (spectrogram). f_max: highest mel frequency.
    trim_silence: cut leading/trailing silence before the feature (off by default).
    pitch: append a log-f0 contour and the voicing strength as two more rows (logmel, spectrogram).
    ssl_model / ssl_layer / ssl_weights / ssl_arch (name ssl only): a torchaudio bundle name (default
    WAVLM_BASE_PLUS) or ``custom``; a layer 1..L or a list of layers to average (default: the middle
    one); a local weights file (state dict), else the bundle's file in the torch hub cache; the
    architecture of a custom model (see ``ser_lightning.data.ssl``).
    """

    name: str = "logmel"
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
        if self.name not in FEATURE_KINDS:
            raise ValueError(f"data.feature.name: unknown feature '{self.name}'; choose from {list(FEATURE_KINDS)}")
        for option in POSITIVE_OPTIONS:
            value = getattr(self, option)
            if value is not None and not value > 0:
                raise ValueError(f"data.feature.{option}: must be positive, got {value}")
        self.kind.check(self)

    @property
    def kind(self) -> type[FeatureKind]:
        return FEATURE_KINDS[self.name]

    def resolved(self) -> ResolvedFeatures:
        """The parameters actually used, every None replaced by the kind's default."""
        return self.kind.resolve(self)

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
    """One kind of feature (``data.feature.name``): options in the class methods, waveform -> (F, N) in ``forward``.

    ``resolve`` fills in the kind's defaults, ``check`` refuses what it cannot take (naming the
    ``data.feature.<option>``), ``rows`` gives its number of rows F. Options only this kind reads are
    its ``own_options``; ``takes_pitch`` says whether ``pitch: true`` may append the pitch rows.

    A *local* kind computes every frame from the samples within ``reach`` of its centre (frame t is
    centred on sample t * hop, zero padding outside the waveform), so a long stream can compute its
    frames once, as the audio arrives (``ser_lightning.inference.stream``). ``raw`` gives those per-frame
    values; ``finish`` turns the raw frames of one stretch of audio into its features (identity here).
    A *neural* kind extracts groups of waveforms at once (``extract_many``), on every CPU thread.
    """

    name: ClassVar[str] = ""
    local: ClassVar[bool] = True
    neural: ClassVar[bool] = False
    takes_pitch: ClassVar[bool] = False
    own_options: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def resolve(cls, cfg: FeatureConfig) -> ResolvedFeatures:
        """The parameters used: every None of ``cfg`` replaced by this kind's default."""
        raise NotImplementedError

    @classmethod
    def rows(cls, resolved: ResolvedFeatures) -> int:
        """Rows F of this kind's features (without the pitch rows)."""
        raise NotImplementedError

    @classmethod
    def check(cls, cfg: FeatureConfig) -> None:
        """Raise ValueError naming the option this kind cannot take (after the positive-value checks)."""
        for other in FEATURE_KINDS.values():
            for option in () if other is cls else other.own_options:
                if getattr(cfg, option) is not None:
                    raise ValueError(f"data.feature.{option}: applies to name: {other.name} only (name is {cfg.name})")
        if cfg.pitch and not cls.takes_pitch:
            pitched = " or ".join(name for name, kind in FEATURE_KINDS.items() if kind.takes_pitch)
            raise ValueError(f"data.feature.pitch: the pitch rows go with {pitched}, not {cls.name}")

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

    def load(self) -> None:
        """Load what the kind needs before its first waveform (nothing here)."""


class FrameKind(FeatureKind):
    """A short-time spectrum every hop: default 16 kHz, 10 ms hop, 64 mel bands, Nyquist f_max; pitch rows allowed."""

    takes_pitch = True
    default_win_ms: ClassVar[float] = 25.0

    @classmethod
    def default_n_fft(cls, sample_rate: int, win_length: int) -> int:
        return 2 ** math.ceil(math.log2(max(win_length, 2)))

    @classmethod
    def resolve(cls, cfg: FeatureConfig) -> ResolvedFeatures:
        sr = cfg.sample_rate or 16000
        win_ms = cfg.win_ms or cls.default_win_ms
        win, hop = round(sr * win_ms / 1000), round(sr * (cfg.hop_ms or 10.0) / 1000)
        return ResolvedFeatures(
            cfg.name, sr, win, hop, cfg.n_fft or cls.default_n_fft(sr, win), cfg.n_mels or 64, cfg.n_bins,
            float(cfg.f_max or sr / 2), cfg.trim_silence, cfg.pitch,
        )

    @classmethod
    def check(cls, cfg: FeatureConfig) -> None:
        super().check(cfg)
        r = cls.resolve(cfg)
        if r.win_length > r.n_fft:
            raise ValueError(f"data.feature.n_fft: {r.n_fft} is smaller than the window ({r.win_length} samples)")
        if r.hop_length < 1:
            raise ValueError(f"data.feature.hop_ms: {cfg.hop_ms} ms is shorter than one sample")
        cls.check_frames(r)

    @classmethod
    def check_frames(cls, r: ResolvedFeatures) -> None:
        """Raise ValueError naming the option whose resolved value ``r`` this kind cannot compute (nothing here)."""


class LogMel(FrameKind):
    """Log-mel spectrogram (power, centred frames, zero padding): 25 ms window, DFT the next power of two."""

    name = "logmel"

    @classmethod
    def rows(cls, resolved: ResolvedFeatures) -> int:
        return resolved.n_mels

    @classmethod
    def check_frames(cls, r: ResolvedFeatures) -> None:
        if r.f_max > r.sample_rate / 2:
            raise ValueError(f"data.feature.f_max: {r.f_max} Hz is above the Nyquist frequency {r.sample_rate / 2} Hz")

    def __init__(self, cfg: ResolvedFeatures) -> None:
        super().__init__(cfg)
        self.transform = T.MelSpectrogram(
            sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop_length,
            f_max=cfg.f_max, n_mels=cfg.n_mels, power=2.0, center=True, pad_mode="constant",
        )

    def raw(self, wave: torch.Tensor) -> torch.Tensor:
        return torch.log(self.transform(wave) + LOG_FLOOR)


class Spectrogram(FrameKind):
    """Log-magnitude STFT with a Hamming window, the lowest ``n_bins`` bins (Zhang et al. 2018): 40 ms window,
    50 ms DFT (800 points at 16 kHz), lowest 200 bins (0-4 kHz at 16 kHz)."""

    name = "spectrogram"
    default_win_ms = 40.0

    @classmethod
    def default_n_fft(cls, sample_rate: int, win_length: int) -> int:
        return max(win_length, round(sample_rate * 0.050))

    @classmethod
    def rows(cls, resolved: ResolvedFeatures) -> int:
        return resolved.n_bins

    @classmethod
    def check_frames(cls, r: ResolvedFeatures) -> None:
        if r.n_bins > r.n_fft // 2 + 1:
            raise ValueError(f"data.feature.n_bins: {r.n_bins} exceeds the {r.n_fft // 2 + 1} bins of an {r.n_fft}-point DFT")

    def __init__(self, cfg: ResolvedFeatures) -> None:
        super().__init__(cfg)
        self.transform = T.Spectrogram(
            n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop_length,
            window_fn=torch.hamming_window, power=1.0, center=True, pad_mode="constant",
        )

    def raw(self, wave: torch.Tensor) -> torch.Tensor:
        return torch.log(self.transform(wave)[..., : self.cfg.n_bins, :] + LOG_FLOOR)


class LoudnessContour(FeatureKind):
    """The input of the "Emotion in Motion" course project (not local: a fixed window).

    44.1 kHz audio (the only rate it takes) from 0.5 s to 3.5 s (zero-padded when shorter, never dropped),
    librosa-style slaney mel power spectrogram (2048-point FFT, hop 512, whatever win_ms/hop_ms/n_fft say;
    centred frames with reflect padding as in librosa 0.8; ``n_mels`` 128 bands up to ``f_max`` 8 kHz) in dB
    (ref 1, amin 1e-10, top_db 80), averaged over the mel bands: a 1 x 259 loudness contour.
    """

    name = "loudness_contour"
    local = False
    rate: ClassVar[int] = 44100

    @classmethod
    def resolve(cls, cfg: FeatureConfig) -> ResolvedFeatures:
        return ResolvedFeatures(
            cfg.name, cfg.sample_rate or cls.rate, 2048, 512, 2048, cfg.n_mels or 128, cfg.n_bins,
            float(cfg.f_max or 8000.0), cfg.trim_silence, cfg.pitch,
        )

    @classmethod
    def rows(cls, resolved: ResolvedFeatures) -> int:
        return 1

    @classmethod
    def check(cls, cfg: FeatureConfig) -> None:
        super().check(cfg)
        if cfg.sample_rate not in (None, cls.rate):
            raise ValueError(
                f"data.feature.sample_rate: loudness_contour reproduces the course project at {cls.rate} Hz, "
                f"got {cfg.sample_rate}"
            )

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
    """Hidden states of a self-supervised speech model (``ser_lightning.data.ssl``; ``ssl_model``, one layer or the
    mean of several: ``ssl_layer``): 16 kHz, one frame per 20 ms, F = the model's width. Not local: a transformer
    sees the whole clip."""

    name = "ssl"
    local = False
    neural = True
    own_options = SSL_OPTIONS

    @classmethod
    def resolve(cls, cfg: FeatureConfig) -> ResolvedFeatures:
        spec = resolve_ssl(cfg.ssl_model, cfg.ssl_layer, cfg.ssl_weights, cfg.ssl_arch)
        return ResolvedFeatures(
            cfg.name, SSL_SAMPLE_RATE, spec.receptive_field, spec.hop_length, 0, 0, 0, SSL_SAMPLE_RATE / 2,
            cfg.trim_silence, False, spec,
        )

    @classmethod
    def rows(cls, resolved: ResolvedFeatures) -> int:
        return resolved.ssl.width

    @classmethod
    def check(cls, cfg: FeatureConfig) -> None:
        super().check(cfg)
        for option in FRAME_OPTIONS:
            if getattr(cfg, option) is not None:
                raise ValueError(f"data.feature.{option}: the ssl model sets the frames (one per 20 ms for every "
                                 "torchaudio bundle); leave it unset")
        if cfg.sample_rate not in (None, SSL_SAMPLE_RATE):
            raise ValueError(f"data.feature.sample_rate: the ssl models take {SSL_SAMPLE_RATE} Hz, got {cfg.sample_rate}")
        cls.resolve(cfg)  # validates the ssl options

    def __init__(self, cfg: ResolvedFeatures) -> None:
        super().__init__(cfg)
        self.transform = SSLExtractor(cfg.ssl)

    def frames(self, num_samples: int | torch.Tensor) -> int | torch.Tensor:
        return self.transform.frames(num_samples)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.transform(wave)

    def load(self) -> None:
        self.transform.load()

    def extract_many(self, waves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.transform.extract_many(waves)


FEATURE_KINDS: dict[str, type[FeatureKind]] = {kind.name: kind for kind in (LogMel, Spectrogram, LoudnessContour,
                                                                            SelfSupervised)}
"""``data.feature.name`` -> its class: a new kind is one ``FeatureKind`` subclass and its entry here."""


class FeatureExtractor(nn.Module):
    """Waveform (T,) or (B, T) at ``cfg.sample_rate`` -> features (F, N) or (B, F, N): the configured kind, plus
    the two pitch rows (``pitch_frames`` raw, made continuous by ``continuous_pitch`` in ``finish``) with ``pitch``."""

    def __init__(self, cfg: FeatureConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or FeatureConfig()
        self.cfg = cfg.resolved()
        self.kind = cfg.kind(self.cfg)
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

    def raw_many(self, waves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``raw`` of each mono waveform, in few calls (local kinds): waveforms laid end to end, each starting on the
        frame grid and followed by at least ``reach`` zeros, so that every frame sees exactly the samples (and the
        zero padding) it sees in its own waveform; a few large operations instead of many small ones (streams,
        batched requests). Up to ``RAW_MANY_FRAMES`` frames a call: larger ones only wait on memory."""
        out: list[torch.Tensor] = []
        group: list[torch.Tensor] = []
        frames = 0
        for wave in waves:
            count = self.frames(wave.numel())
            if group and frames + count > RAW_MANY_FRAMES:
                out += self._packed(group)
                group, frames = [], 0
            group.append(wave)
            frames += count
        return out + (self._packed(group) if group else [])

    def _packed(self, waves: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(waves) == 1:
            return [self.raw(waves[0])]
        hop, reach = self.hop_length, self.reach
        offsets, position = [], 0
        for wave in waves:
            offsets.append(position)
            position += -(-(wave.numel() + reach) // hop) * hop
        signal = waves[0].new_zeros(position, dtype=torch.float32)
        for wave, offset in zip(waves, offsets):
            signal[offset : offset + wave.numel()] = wave
        raw = self.raw(signal)
        return [raw[:, offset // hop : offset // hop + self.frames(wave.numel())] for wave, offset in zip(waves, offsets)]

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

    @property
    def neural(self) -> bool:
        """Whether the kind is a neural front end (``FeatureKind.neural``: batched, on every thread)."""
        return self.kind.neural

    def load(self) -> None:
        """Load what the extractor needs before its first waveform (the ssl model); nothing for the others."""
        self.kind.load()

    def extract_many(self, waves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Features of each waveform (T_i,): batched by a neural kind (in groups that do not change them), else
        one by one."""
        if self.kind.neural:
            return self.kind.extract_many(waves)
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
