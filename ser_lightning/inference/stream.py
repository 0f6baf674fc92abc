"""Streaming recognition: windows of a live stream classified as the audio arrives, exactly as offline.

``EmotionRecognizer.stream(sample_rate, window_seconds=2.0, hop_seconds=0.5)`` returns an ``EmotionStream``.
``push(samples)`` takes chunks of any size (float or int16; mono, or interleaved / (n, channels) with
``channels``) and returns the ``StreamEvent``s that became ready; ``close()`` flushes the end. Window k
covers input samples [k * hop, k * hop + window); after ``close()`` one more window is aligned to the end of
the audio when the regular ones stop short of it (a stream shorter than one window gives one event for all
of it). The offline long-recording path of ``predict`` runs the same class over the file's blocks.

**Exactness.** Every event's probabilities equal ``recognizer.predict_batch([window samples], sample_rate,
speaker_stats=event.speaker_stats)`` (up to float rounding), whatever the chunking. Offline, a window is
resampled to the model's rate and its features computed with zero padding at its edges; here the audio is
resampled and its frames computed once, as it arrives (``IncrementalResampler``, ``FrameCache``), and each
window reuses the frames whose support lies inside it; only the few frames at each window edge (those that
see the window's zero padding, or the resampler's edge effects) are computed again from the window's own
edge samples. Window-level steps (the pitch contour's interpolation through unvoiced frames) run per window.
Feature kinds that are not local (``ssl``, ``loudness_contour``), and hops that do not fall on the frame
grid and on the resampler's period, compute each window from its raw samples instead (``incremental`` is
False); the result is the same.

**Speech.** A voice-activity detector (silero-vad's ONNX model on onnxruntime; an energy gate when the
package is absent, or with ``vad="energy"``) runs over the whole stream in 32 ms chunks; a window with less
than ``min_speech_seconds`` of speech gives a ``speech: false`` event without an emotion. It runs on a second
thread while the frames of the new audio and of the ready windows are computed; a window's speech is decided once
both are done (a window left unclassified then drops its frames).

**Speaker normalisation.** A model trained with ``normalization: speaker`` needs a speaker's statistics:
either enrolment statistics given up front (``speaker_statistics``, e.g. ``recognizer.speaker_statistics([...])``)
or the running statistics of the stream's own speech (no labels): the frame statistics of every frame of
the speech windows heard so far (the current one included) and, with the pitch rows, the statistics of
the speech windows' prosodic functionals. Warm-up: until ``warmup_windows`` speech windows have been heard
the functionals' statistics are not used (each functional reads as the speaker's mean); events say which
statistics they used (``normalization``: ``enrolled``, ``warmup`` or ``running``).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torchaudio.functional as AF
from torch import Tensor
from torchaudio.functional.functional import _get_sinc_resample_kernel

from ser_lightning.data.audio import AudioError
from ser_lightning.data.speakers import speaker_statistics
from ser_lightning.functionals import NUM_PROSODIC, prosodic_rows
from ser_lightning.normalization import feature_stats, stats_from_sums

if TYPE_CHECKING:
    from ser_lightning.inference.recognizer import EmotionRecognizer

PENDING = 2048
"""Samples that may wait before being processed (chunks of a few samples are gathered first)."""
VAD_RATE = 16000
VAD_CHUNK = 512
"""silero-vad reads 32 ms chunks of 16 kHz audio."""


@dataclass
class StreamEvent:
    """One window of a stream: its span (seconds from the stream's start), whether it holds speech, and the emotion.

    ``emotion`` / ``probabilities`` are None for a window without speech (unless the stream classifies every
    window); ``emotion`` is ``"uncertain"`` when the top probability is below the stream's ``min_confidence``.
    ``speaker_stats`` are the statistics the window was normalised with (speaker-normalised models).
    """

    index: int
    start_s: float
    end_s: float
    speech: bool
    emotion: str | None = None
    probabilities: dict[str, float] | None = None
    speech_seconds: float = 0.0
    normalization: str | None = None
    attention: np.ndarray | None = field(default=None, repr=False)
    attention_grid: tuple[int, int] | None = field(default=None, repr=False)  # (F', T') of a 2-D model
    features: Tensor | None = field(default=None, repr=False)
    speaker_stats: Tensor | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"index": self.index, "start_s": round(self.start_s, 6), "end_s": round(self.end_s, 6),
                                "speech": self.speech, "speech_seconds": round(self.speech_seconds, 3),
                                "emotion": self.emotion, "probabilities": self.probabilities}
        if self.normalization is not None:
            data["normalization"] = self.normalization
        if self.attention is not None:
            data["attention"] = [round(float(a), 5) for a in self.attention]
        return data


@dataclass
class WindowJob:
    """A window whose features are ready for the model, or a waveform whose features ``classify_jobs`` computes (with
    the other jobs' at hand): the unit ``classify`` batches (also across streams and requests). Empty features and no
    waveform: nothing to classify (a window without speech)."""

    event: StreamEvent
    features: Tensor  # (F, N)
    speaker_stats: Tensor | None = None  # (2, W)
    attention: bool = False
    keep_features: bool = False
    min_confidence: float | None = None
    name: str = ""  # how errors name it
    peak: float | None = None  # the largest sample magnitude, when known (for errors)
    functionals: Tensor | None = None  # (NUM_PROSODIC,) prosodic functionals of the features, when computed already
    wave: Tensor | None = None  # a model-rate waveform, features to compute (then features are empty)
    own_statistics: bool = False  # normalised with the speaker statistics of its own features (a recording alone)

    @property
    def needs_model(self) -> bool:
        return self.wave is not None or self.features.numel() > 0


class IncrementalResampler:
    """The samples ``torchaudio.functional.resample`` would give for the whole stream, computed as it arrives.

    torchaudio's polyphase resampler computes output block b (``new`` samples per ``orig`` input samples,
    both divided by their gcd) from the input samples [b * orig - width, (b + 1) * orig + width): here each
    block is computed once its input is there, with the same kernel.
    """

    def __init__(self, orig_freq: int, new_freq: int) -> None:
        self.identity = orig_freq == new_freq
        gcd = math.gcd(orig_freq, new_freq)
        self.orig, self.new = orig_freq // gcd, new_freq // gcd
        self.orig_freq, self.new_freq = orig_freq, new_freq
        if not self.identity:
            self.kernel, self.width = _get_sinc_resample_kernel(orig_freq, new_freq, gcd, 6, 0.99, "sinc_interp_hann",
                                                                None, torch.device("cpu"), torch.float32)
        else:
            self.kernel, self.width = None, 0
        self.buffer = torch.zeros(self.width)  # input from (next block) * orig - width on: zeros before the start
        self.blocks = 0

    @property
    def edge_blocks(self) -> int:
        """Output blocks at each edge of a window that see its zero padding."""
        return 0 if self.identity else -(-self.width // self.orig)

    def blocks_of(self, x: Tensor) -> Tensor:
        """Output of the blocks whose input windows tile ``x`` (x starts ``width`` samples before the first block)."""
        out = torch.nn.functional.conv1d(x[None, None], self.kernel, stride=self.orig)  # (1, new, blocks)
        return out[0].transpose(0, 1).reshape(-1)

    def push(self, x: Tensor) -> Tensor:
        """New input samples -> the output samples that became computable."""
        if self.identity:
            return x
        self.buffer = torch.cat([self.buffer, x])
        ready = (self.buffer.numel() - 2 * self.width) // self.orig
        if ready <= 0:
            return x.new_zeros(0)
        out = self.blocks_of(self.buffer[: ready * self.orig + 2 * self.width])
        self.buffer = self.buffer[ready * self.orig :]
        self.blocks += ready
        return out

    def window(self, x: Tensor) -> Tensor:
        """``torchaudio.functional.resample`` of one window (exactly), for edges and windows computed from raw."""
        return x if self.identity else AF.resample(x, self.orig_freq, self.new_freq)

    def left_edge(self, x: Tensor) -> Tensor:
        """The first ``edge_blocks`` output blocks of a window starting with samples ``x`` (zero padding before)."""
        count = self.edge_blocks
        return self.blocks_of(torch.nn.functional.pad(x[: count * self.orig + self.width], (self.width, 0)))

    def right_edge(self, x: Tensor) -> Tensor:
        """The last ``edge_blocks`` output blocks of a window ending with samples ``x`` (zero padding after)."""
        count = self.edge_blocks
        return self.blocks_of(torch.nn.functional.pad(x[x.numel() - count * self.orig - self.width :], (0, self.width)))


class FrameCache:
    """Raw feature frames (``FeatureExtractor.raw``) of a stream at the model's rate, each computed once.

    Frame t is centred on sample t * hop and depends on the samples within ``reach`` of it; a chunk of the
    stream starting ``pad`` (a multiple of the hop, >= reach) before frame t0 gives the exact frames
    t0, t0 + 1, ... whose support lies inside the chunk.
    """

    def __init__(self, extractor: Any, keep_frames: int) -> None:
        self.extractor, self.hop = extractor, extractor.hop_length
        self.pad = -(-extractor.reach // self.hop) * self.hop
        self.signal = torch.zeros(self.pad)  # model-rate samples from (first frame not yet computed) * hop - pad on
        self.first = 0  # global index of the first frame not yet computed
        self.frames: list[Tensor] = []  # computed raw frames (R, n) chunks
        self.offset = 0  # global index of the first kept frame
        self.keep = keep_frames
        self.ready = 0  # frames of the stretch ``take`` gave last

    def take(self, y: Tensor) -> Tensor | None:
        """Add model-rate samples; the stretch of signal whose ``raw`` frames became computable (None: none did).
        Its frames go to ``accept``; ``push`` does both."""
        self.signal = torch.cat([self.signal, y])
        # frame t needs samples up to t * hop + reach, i.e. signal[(t - first) * hop + pad + reach]
        ready = (self.signal.numel() - self.pad - self.extractor.reach) // self.hop + 1
        if ready <= 0:
            return None
        self.ready = ready
        return self.signal[: (ready - 1) * self.hop + self.pad + self.extractor.reach]

    def accept(self, raw: Tensor) -> None:
        """The ``raw`` frames of the stretch ``take`` gave."""
        skip, ready = self.pad // self.hop, self.ready
        self.frames.append(raw[:, skip : skip + ready])
        self.first += ready
        self.signal = self.signal[ready * self.hop :]
        self._trim()

    def push(self, y: Tensor) -> None:
        chunk = self.take(y)
        if chunk is not None:
            self.accept(self.extractor.raw(chunk))

    def _trim(self) -> None:
        total = sum(part.shape[1] for part in self.frames)
        while self.frames and total - self.frames[0].shape[1] >= self.keep:
            total -= self.frames[0].shape[1]
            self.offset += self.frames[0].shape[1]
            self.frames.pop(0)

    def get(self, start: int, stop: int) -> Tensor:
        """Raw frames [start, stop) (global indices), all computed already."""
        if start < self.offset or stop > self.first:
            raise RuntimeError(f"frames {start}..{stop} are not cached (cached {self.offset}..{self.first})")
        return torch.cat(self.frames, dim=1)[:, start - self.offset : stop - self.offset]


class SpeechDetector:
    """Voice activity per 32 ms chunk of the stream: silero-vad (stateful, ONNX) or an energy gate."""

    threshold = 0.5
    energy_floor_db = -45.0

    def __init__(self, kind: str, input_rate: int) -> None:
        if kind == "silero":
            self.session = _silero_session()
            self.state = np.zeros((2, 1, 128), dtype=np.float32)
            self.context = np.zeros((1, 64), dtype=np.float32)
        elif kind != "energy":
            raise ValueError(f"vad: unknown detector {kind!r}; choose silero or energy")
        self.kind = kind
        self.resampler = IncrementalResampler(input_rate, VAD_RATE)
        self.buffer = torch.zeros(0)
        self.flags: list[bool] = []  # one per chunk, from chunk ``first_flag`` on (older ones are forgotten)
        self.first_flag = 0

    def push(self, x: Tensor) -> None:
        self.take(x)
        detect_speech([self])

    def take(self, x: Tensor) -> None:
        """Add input samples; ``detect_speech`` then classifies the complete chunks (of many detectors at once)."""
        self.buffer = torch.cat([self.buffer, self.resampler.push(x)])

    def _chunks(self) -> np.ndarray:
        """The complete chunks waiting (count, VAD_CHUNK), taken out of the buffer."""
        count = self.buffer.numel() // VAD_CHUNK
        chunks = self.buffer[: count * VAD_CHUNK].reshape(count, VAD_CHUNK).numpy()
        self.buffer = self.buffer[count * VAD_CHUNK :]
        return chunks

    def _speech(self, chunk: np.ndarray) -> bool:
        """The energy gate's decision for one chunk."""
        return 10 * math.log10(float(np.mean(chunk.astype(np.float64) ** 2)) + 1e-12) > self.energy_floor_db

    def speech_seconds(self, start: int, end: int) -> float:
        """Seconds of speech among the chunks within input samples [start, end) that are computable from those samples
        alone (the resampler needs ``width`` samples beyond a block), so the answer never depends on the chunking."""
        r = self.resampler
        last_out = end if r.identity else max(0, (end - r.width) // r.orig) * r.new
        first, last = self._first_chunk(start) - self.first_flag, last_out // VAD_CHUNK - self.first_flag
        if first < 0:
            raise ValueError(f"speech_seconds: input sample {start} lies before what the detector still holds")
        return VAD_CHUNK / VAD_RATE * sum(self.flags[first : max(first, min(last, len(self.flags)))])

    def forget_before(self, start: int) -> None:
        """Drop the decisions no window starting at input sample ``start`` or later reads (bounded memory)."""
        drop = min(len(self.flags), self._first_chunk(start) - self.first_flag)
        if drop > 0:
            del self.flags[:drop]
            self.first_flag += drop

    def _first_chunk(self, start: int) -> int:
        """The first chunk that lies wholly at or after input sample ``start``."""
        first_out = -(-start * self.resampler.new // self.resampler.orig)  # the first resampled sample (ceil)
        return -(-first_out // VAD_CHUNK)


def detect_speech(detectors: Sequence[SpeechDetector]) -> None:
    """Classify the complete chunks every detector holds. silero-vad is stateful, so a stream's chunks run one after
    the other; the chunks of many streams run side by side, one ONNX call per step with one row (and its own state)
    per stream: the same decisions as one call per chunk, at a fraction of the calls."""
    pending = [(detector, detector._chunks()) for detector in detectors]
    for detector, chunks in pending:
        if detector.kind == "energy":
            detector.flags.extend(detector._speech(chunk) for chunk in chunks)
    silero = [(detector, chunks) for detector, chunks in pending if detector.kind == "silero" and len(chunks)]
    rate = np.array(VAD_RATE, np.int64)
    for step in range(max((len(chunks) for _, chunks in silero), default=0)):
        rows = [(detector, chunks[step]) for detector, chunks in silero if step < len(chunks)]
        if len(rows) == 1:
            detector, chunk = rows[0]
            context, state = detector.context, detector.state
            x = np.concatenate([context, chunk[None].astype(np.float32)], axis=1)
        else:
            context = np.concatenate([detector.context for detector, _ in rows])
            x = np.concatenate([context, np.stack([chunk for _, chunk in rows]).astype(np.float32)], axis=1)
            state = np.concatenate([detector.state for detector, _ in rows], axis=1)
        out, state = rows[0][0].session.run(None, {"input": x, "state": state, "sr": rate})
        for k, (detector, _) in enumerate(rows):
            detector.state = state[:, k : k + 1]
            detector.context = x[k : k + 1, -64:]
            detector.flags.append(float(out[k, 0]) >= detector.threshold)


_SILERO = None


def _silero_session() -> Any:
    global _SILERO
    if _SILERO is None:
        from importlib.resources import files

        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.inter_op_num_threads = options.intra_op_num_threads = 1
        path = files("silero_vad.data").joinpath("silero_vad.onnx")
        _SILERO = onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return _SILERO


def default_vad() -> str:
    try:
        import silero_vad  # noqa: F401
    except ImportError:
        return "energy"
    return "silero"


def as_mono(samples: Any, channels: int) -> Tensor:
    """float32 mono samples from a chunk: float or int16 values; (n,), interleaved (n * channels,) or (n, channels)."""
    array = np.asarray(samples)
    if array.dtype == np.int16:
        array = array.astype(np.float32) / 32768.0
    elif array.dtype.kind == "f":
        array = array.astype(np.float32, copy=False)
    else:
        raise ValueError(f"samples: expected float or int16 values, got {array.dtype}")
    if array.ndim == 2:
        if array.shape[1] != channels:
            raise ValueError(f"samples: shape {array.shape} but the stream has {channels} channel(s)")
        array = array.mean(axis=1)
    elif array.ndim == 1 and channels > 1:
        if array.size % channels:
            raise ValueError(f"samples: {array.size} interleaved values are not a whole number of {channels}-channel frames")
        array = array.reshape(-1, channels).mean(axis=1)
    elif array.ndim != 1:
        raise ValueError(f"samples: expected (n,) or (n, channels), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("samples: NaN or infinite values")
    return torch.from_numpy(np.array(array, dtype=np.float32))  # a copy: the caller's buffer may be read-only


class EmotionStream:
    """Windows of one live stream classified as the audio arrives (see the module docstring)."""

    def __init__(self, recognizer: EmotionRecognizer, sample_rate: int, *, window_seconds: float = 2.0,
                 hop_seconds: float = 0.5, channels: int = 1, speaker_statistics: Tensor | None = None,
                 vad: str | None = "auto", min_speech_seconds: float = 0.25, warmup_windows: int = 3,
                 attention: bool = False, classify_silence: bool = False, min_confidence: float | None = None,
                 features: bool = False) -> None:
        checks = [
            (sample_rate >= 1000, f"sample_rate must be at least 1000 Hz, got {sample_rate}"),
            (channels >= 1, f"channels must be >= 1, got {channels}"),
            (window_seconds > 0, f"window_seconds must be > 0, got {window_seconds}"),
            (0 < hop_seconds <= window_seconds, f"hop_seconds must be in (0, window_seconds], got {hop_seconds}"),
            (min_confidence is None or 0 <= min_confidence <= 1, f"min_confidence must be in [0, 1], got {min_confidence}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.recognizer, self.sample_rate, self.channels = recognizer, sample_rate, channels
        self.window = round(window_seconds * sample_rate)
        self.hop = max(1, round(hop_seconds * sample_rate))
        self.attention, self.classify_silence, self.min_confidence = attention, classify_silence, min_confidence
        self.keep_features = features
        self.min_speech_seconds, self.warmup_windows = min_speech_seconds, warmup_windows
        extractor = recognizer.extractor
        self.extractor = extractor
        self.resampler = IncrementalResampler(sample_rate, extractor.sample_rate)
        model_window, model_hop = (n * self.resampler.new / self.resampler.orig for n in (self.window, self.hop))
        self.incremental = (extractor.local and self.hop % self.resampler.orig == 0 and self.window % self.resampler.orig == 0
                            and model_hop % extractor.hop_length == 0)
        self.model_window, self.model_hop = int(model_window), int(model_hop)
        keep = self.model_window // extractor.hop_length + 2 * self.model_hop // extractor.hop_length + 8
        self.frames = FrameCache(extractor, keep) if self.incremental else None
        self.model_signal = torch.zeros(0)  # the resampled stream, from model sample `model_offset` on
        self.model_offset = 0
        vad = default_vad() if vad == "auto" else vad
        self.vad = SpeechDetector(vad, sample_rate) if vad else None
        self.raw = torch.zeros(0)  # input samples from `raw_offset` on (at least the last window)
        self.raw_offset = 0
        self.received = 0
        self.pending: list[Tensor] = []
        self.pending_count = 0
        self.next_window = 0
        self.closed = False
        if speaker_statistics is not None and not recognizer.needs_speaker_stats:
            raise ValueError("speaker_statistics: this model does not normalise per speaker")
        self.enrolled = speaker_statistics
        self.running = _RunningStatistics(extractor.num_features) if recognizer.needs_speaker_stats else None
        self.functionals = recognizer.window_functionals  # each window's prosodic functionals, computed once

    # ----------------------------------------------------------------- input
    def push(self, samples: Any) -> list[StreamEvent]:
        """Add samples; returns the events of the windows that became ready (classified here)."""
        return self.recognizer.classify(self.prepare(samples))

    def close(self) -> list[StreamEvent]:
        """End of the stream: the window aligned to the end (or the whole of a short stream), if any is left."""
        return self.recognizer.classify(self.finish())

    def prepare(self, samples: Any) -> list[WindowJob]:
        """Add samples; the windows that became ready, with their features, for ``recognizer.classify``
        (``prepare_streams`` does this for many streams at once)."""
        self._take(samples)
        return _process([(self, False)])[0] if self.due(0) else []

    def finish(self) -> list[WindowJob]:
        """End of the stream: the jobs of the windows left (``close`` classifies them)."""
        return [] if self.closed else _process([(self, True)])[0]

    def due(self, count: int) -> bool:
        """Whether ``count`` more samples would make the stream do work (a window complete, or enough gathered);
        small chunks otherwise only wait, cheaply, so a server can take them without a worker thread."""
        pending = self.pending_count + count
        return self.received + pending >= self.next_window * self.hop + self.window or pending >= PENDING

    def _take(self, samples: Any) -> None:
        """Check and keep the samples, to be processed when the stream is due."""
        if self.closed:
            raise ValueError("the stream is closed")
        x = as_mono(samples, self.channels)
        if x.numel():
            self.pending.append(x)
            self.pending_count += x.numel()

    def _ingest(self) -> Tensor | None:
        """The pending samples into the stream: kept raw, to the voice-activity detector, resampled to the model's
        rate; the stretch of model-rate signal whose frames became computable (for ``FrameCache.accept``)."""
        if not self.pending:
            return None
        x = torch.cat(self.pending) if len(self.pending) > 1 else self.pending[0]
        self.pending, self.pending_count = [], 0
        self.received += x.numel()
        self.raw = torch.cat([self.raw, x])
        if self.vad is not None:
            self.vad.take(x)
        if not self.incremental:
            return None
        y = self.resampler.push(x)
        self.model_signal = torch.cat([self.model_signal, y])
        return self.frames.take(y)

    def _windows(self, closing: bool) -> list[_Window]:
        """The windows that became ready (and, closing, the end's), in order; their features still to assemble."""
        windows = []
        while self.next_window * self.hop + self.window <= self.received:
            windows.append(self._window(self.next_window * self.hop, self.window, incremental=self.incremental))
            self.next_window += 1
        if closing:
            self.closed = True
            windows += self._tail()
        return windows

    def _tail(self) -> list[_Window]:
        if self.received == 0:
            return []
        if self.next_window == 0:  # shorter than one window: all of it, as offline
            return [self._window(0, self.received, incremental=False)]
        last_end = (self.next_window - 1) * self.hop + self.window
        if last_end >= self.received:
            return []
        return [self._window(self.received - self.window, self.window, incremental=False)]

    def _trim(self) -> None:
        keep_from = max(0, min(self.next_window * self.hop, self.received - self.window))  # the end-aligned window too
        drop = keep_from - self.raw_offset
        if drop > 0:
            self.raw, self.raw_offset = self.raw[drop:], keep_from
        if self.vad is not None:
            self.vad.forget_before(keep_from)
        if self.incremental:
            model_from = (self.next_window * self.hop) * self.resampler.new // self.resampler.orig
            drop = model_from - self.model_offset
            if drop > 0:
                self.model_signal, self.model_offset = self.model_signal[drop:], model_from

    # ----------------------------------------------------------------- windows
    def _window(self, start: int, length: int, *, incremental: bool) -> _Window:
        """Window [start, start + length) of the input: its event (speech still to hear, ``_hear``) and what its
        features need: the edge stretches whose frames are computed again (see the module docstring), or its own
        samples (not incremental)."""
        start_s, end_s = start / self.sample_rate, (start + length) / self.sample_rate
        event = StreamEvent(self.next_window, start_s, end_s, True, speech_seconds=end_s - start_s)
        window = _Window(self, event, start, length)
        if not incremental:
            window.samples = self.raw[start - self.raw_offset : start - self.raw_offset + length]
            return window
        extractor, hop = self.extractor, self.extractor.hop_length
        length = self.model_window
        window.first_frame = start * self.resampler.new // self.resampler.orig // hop
        window.frames = extractor.frames(length)
        edge = self.resampler.edge_blocks * self.resampler.new
        window.left = min(window.frames, -(-(extractor.reach + edge) // hop) + 1)
        window.right_from = max(window.left, (length - edge - extractor.reach) // hop)  # first frame reaching the edge
        model_start = start * self.resampler.new // self.resampler.orig - self.model_offset
        y = self.model_signal[model_start : model_start + length - edge]  # the last `edge` samples are not out yet
        if edge:
            samples = self.raw[start - self.raw_offset : start - self.raw_offset + window.length]
            y = torch.cat([self.resampler.left_edge(samples), y[edge:], self.resampler.right_edge(samples)])
        window.segments = [y[: (window.left - 1) * hop + extractor.reach]]
        if window.right_from < window.frames:
            window.begin = max(0, window.right_from * hop - -(-extractor.reach // hop) * hop)
            window.segments.append(y[window.begin :])
        return window

    def _hear(self, window: _Window) -> None:
        """The window's speech, once the voice activity is known: a window to leave unclassified loses its features;
        one computed from its own samples gets them now (only when it is classified)."""
        event = window.event
        if self.vad is not None:
            event.speech_seconds = self.vad.speech_seconds(window.start, window.start + window.length)
            event.speech = event.speech_seconds >= min(self.min_speech_seconds, event.end_s - event.start_s)
        if not event.speech and not self.classify_silence:
            window.features = window.functionals = None
        elif window.samples is not None:
            window.features = self.extractor(self.resampler.window(window.samples))
        window.samples = None

    def _assemble(self, window: _Window, edges: list[Tensor]) -> Tensor:
        """A window's features from its edge stretches' raw frames and the cached frames between them."""
        hop = self.extractor.hop_length
        parts = [edges[0][:, : window.left]]
        if window.right_from > window.left:
            parts.append(self.frames.get(window.first_frame + window.left, window.first_frame + window.right_from))
        if window.right_from < window.frames:
            parts.append(edges[1][:, window.right_from - window.begin // hop :])
        return self.extractor.finish(torch.cat(parts, dim=1))

    def _job(self, window: _Window) -> WindowJob:
        event, features = window.event, window.features
        stats = None
        if features is None:
            features = torch.zeros(0)
        elif self.recognizer.needs_speaker_stats:
            stats, event.normalization = self._statistics(window)
        return WindowJob(event, features, stats, self.attention, self.keep_features, self.min_confidence,
                         f"stream window at {event.start_s:.2f} s", functionals=window.functionals)

    def _statistics(self, window: _Window) -> tuple[Tensor, str]:
        if self.enrolled is not None:
            return self.enrolled, "enrolled"
        functionals = window.functionals if self.recognizer.speaker_functionals else None
        if window.event.speech:
            first = window.start * self.resampler.new // self.resampler.orig // self.extractor.hop_length
            self.running.add(window.features, first, functionals)
        return self.running.current(window.features, functionals, self.warmup_windows)


@dataclass
class _Window:
    """A ready window on its way to a job: its event, and its features once assembled (None: not classified)."""

    stream: EmotionStream
    event: StreamEvent
    start: int  # first input sample
    length: int  # input samples
    samples: Tensor | None = None  # its input samples, when its features are computed from them (not incremental)
    features: Tensor | None = None
    functionals: Tensor | None = None  # (NUM_PROSODIC,) of the features, when the recognizer uses them
    segments: list[Tensor] = field(default_factory=list)  # edge stretches whose raw frames the features need
    first_frame: int = 0
    frames: int = 0
    left: int = 0
    right_from: int = 0
    begin: int = 0


def prepare_streams(items: Sequence[tuple[EmotionStream, Any]]) -> list[list[WindowJob] | Exception]:
    """``prepare(samples)`` of many streams at once (``finish()`` for an item whose samples are None): each item's
    jobs, or the ValueError its samples raised (the other streams go on). The same jobs as one stream at a time,
    from a few large operations: the voice activity of every stream in one ONNX call per 32 ms step, the new frames
    and every window's edge frames in one ``raw_many`` call each, the prosodic functionals of every window in one
    batch. Each stream appears at most once."""
    if len({id(stream) for stream, _ in items}) < len(items):
        raise ValueError("prepare_streams: a stream appears twice")
    results: list[list[WindowJob] | Exception] = [[] for _ in items]
    todo: list[tuple[int, EmotionStream, bool]] = []
    for index, (stream, samples) in enumerate(items):
        if samples is None:
            if not stream.closed:
                todo.append((index, stream, True))
            continue
        try:
            stream._take(samples)
        except ValueError as error:
            results[index] = error
            continue
        if stream.due(0):
            todo.append((index, stream, False))
    for (index, _, _), jobs in zip(todo, _process([(stream, closing) for _, stream, closing in todo])):
        results[index] = jobs
    return results


@torch.no_grad()  # features only: without autograd's bookkeeping, the many small operations take about half the time
def _process(batch: Sequence[tuple[EmotionStream, bool]]) -> list[list[WindowJob]]:
    """The pending audio of each (stream, closing) and the jobs of the windows it completed (see ``prepare_streams``)."""
    streams = [stream for stream, _ in batch]
    ingested = [(stream, stream._ingest()) for stream in streams]
    ready = [(stream, chunk) for stream, chunk in ingested if chunk is not None]
    windows = [stream._windows(closing) for stream, closing in batch]
    pending = [window for group in windows for window in group if window.segments]
    detectors = [stream.vad for stream in streams if stream.vad is not None]
    # voice activity beside the frames (onnxruntime and the FFTs release the GIL): on two cores at once. The frames
    # of every window are computed meanwhile, speech or not (a few edge frames); ``_hear`` then drops the unused.
    aside = _aside().submit(detect_speech, detectors) if (ready or pending) and _worth_aside(detectors) else None
    if aside is None:
        detect_speech(detectors)
    # the new frames and every window's edge frames in one call
    raws = _raw_many([(stream.extractor, chunk) for stream, chunk in ready]
                     + [(window.stream.extractor, segment) for window in pending for segment in window.segments])
    for (stream, _), raw in zip(ready, raws):
        stream.frames.accept(raw)
    edges = iter(raws[len(ready) :])
    for window in pending:
        window.features = window.stream._assemble(window, [next(edges) for _ in window.segments])
    every = [window for group in windows for window in group]
    _functionals(every)  # still beside the voice activity
    if aside is not None:
        aside.result()
    for window in every:
        window.stream._hear(window)
    _functionals(every)  # of the windows computed from their own samples
    jobs = []
    for stream, group in zip(streams, windows):
        jobs.append([stream._job(window) for window in group])
        stream._trim()
    return jobs


def _functionals(windows: Sequence[_Window]) -> None:
    """The prosodic functionals of the windows that have features and need them, in one batch."""
    todo = [window for window in windows
            if window.features is not None and window.functionals is None and window.stream.functionals]
    for window, row in zip(todo, prosodic_rows([window.features for window in todo])):
        window.functionals = row


ASIDE_CHUNKS = 4
"""silero-vad chunks from which voice activity runs beside the frames (fewer are not worth the thread's handover)."""
_ASIDE: tuple[int, ThreadPoolExecutor] | None = None


def _aside() -> ThreadPoolExecutor:
    """The thread voice activity runs on beside the frames: one per process (made again in a forked child)."""
    global _ASIDE
    if _ASIDE is None or _ASIDE[0] != os.getpid():
        _ASIDE = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="ser-vad"))
    return _ASIDE[1]


def _worth_aside(detectors: Sequence[SpeechDetector]) -> bool:
    return sum(detector.buffer.numel() // VAD_CHUNK for detector in detectors if detector.kind == "silero") >= ASIDE_CHUNKS


def _raw_many(requests: list[tuple[Any, Tensor]]) -> list[Tensor]:
    """``extractor.raw(wave)`` of each (extractor, wave), one ``raw_many`` call per extractor."""
    groups: dict[int, list[int]] = {}
    for k, (extractor, _) in enumerate(requests):
        groups.setdefault(id(extractor), []).append(k)
    out: list[Tensor] = [torch.zeros(0)] * len(requests)
    for indices in groups.values():
        for k, raw in zip(indices, requests[indices[0]][0].raw_many([requests[k][1] for k in indices])):
            out[k] = raw
    return out


class _RunningStatistics:
    """A stream's own speaker statistics: frame moments of its speech windows' frames (each frame once) and the
    moments of their prosodic functionals, as running sums (float64): constant memory and time per window however
    long the stream lives."""

    def __init__(self, num_features: int) -> None:
        self.frames = _Moments(num_features)
        self.counted_until = 0  # global frame index up to which frames were added
        self.functionals = _Moments(NUM_PROSODIC)

    @property
    def count(self) -> int:
        """Frames added so far."""
        return self.frames.count

    def add(self, features: Tensor, first_frame: int, functionals: Tensor | None) -> None:
        """A speech window's features (from global frame ``first_frame``) and, with the pitch rows, its functionals."""
        self.frames.add(features[:, max(0, self.counted_until - first_frame) :].T)
        self.counted_until = max(self.counted_until, first_frame + features.shape[1])
        if functionals is not None:
            self.functionals.add(functionals[None])

    def current(self, features: Tensor, functionals: Tensor | None, warmup: int) -> tuple[Tensor, str]:
        """The statistics for a window with these features and functionals (None: the model has no pitch rows)."""
        # no speech heard yet: this window's own frames
        stats = self.frames.stats() if self.count else torch.stack(feature_stats([features]))
        if functionals is None:
            return stats, "running" if self.count else "warmup"
        if self.functionals.count < warmup:
            return torch.cat([stats, torch.stack([functionals, torch.ones_like(functionals)])], dim=1), "warmup"
        return torch.cat([stats, self.functionals.stats()], dim=1), "running"


class _Moments:
    """Count, sum and sum of squares of (n, G) rows added over time (float64): ``functional_stats`` of all of them."""

    def __init__(self, width: int) -> None:
        self.count = 0
        self.sum = torch.zeros(width, dtype=torch.float64)
        self.square = torch.zeros(width, dtype=torch.float64)

    def add(self, rows: Tensor) -> None:
        rows = rows.double()
        self.count += rows.shape[0]
        self.sum += rows.sum(0)
        self.square += rows.pow(2).sum(0)

    def stats(self) -> Tensor:
        """(2, G) mean and standard deviation (floored) of the rows added."""
        return torch.stack(stats_from_sums(self.count, self.sum, self.square))


UNCERTAIN = "uncertain"
"""The emotion reported when the top probability is below the minimum confidence asked for."""


def confident(probabilities: dict[str, float], min_confidence: float | None) -> bool:
    return min_confidence is None or max(probabilities.values()) >= min_confidence


@torch.no_grad()
def _features_of(recognizer: EmotionRecognizer, jobs: Sequence[WindowJob]) -> None:
    """The features of jobs given as waveforms (frames of many in one ``raw_many`` call), their prosodic functionals
    (in one batch) and, for those that ask, the speaker statistics of their own features."""
    if not jobs:
        return
    extractor = recognizer.extractor
    waves = [job.wave.to(recognizer.device) for job in jobs]
    if extractor.local:
        features = [extractor.finish(raw).cpu() for raw in extractor.raw_many(waves)]
    else:
        features = [f.cpu() for f in extractor.extract_many(waves)]
    rows = prosodic_rows(features) if recognizer.window_functionals else None
    for k, (job, job_features) in enumerate(zip(jobs, features)):
        job.features, job.wave = job_features, None
        if rows is not None:
            job.functionals = rows[k]
        if job.own_statistics:  # its functionals' statistics from the very row its head reads
            job.speaker_stats = speaker_statistics([job_features], [0], functionals=recognizer.speaker_functionals,
                                                   rows=None if rows is None else rows[k : k + 1])[0]


def classify_jobs(recognizer: EmotionRecognizer, jobs: Sequence[WindowJob]) -> list[StreamEvent]:
    """Run the model on the jobs' features (in batches of equal length) and fill in their events, in order."""
    from ser_lightning.padding import pad_last

    _features_of(recognizer, [job for job in jobs if job.wave is not None])
    todo = [job for job in jobs if job.features.numel()]
    for first in range(0, len(todo), recognizer.batch_size):
        group = todo[first : first + recognizer.batch_size]
        batch, lengths = pad_last([job.features.to(recognizer.device) for job in group])
        stats = None
        if recognizer.needs_speaker_stats:
            stats = torch.stack([job.speaker_stats for job in group]).to(recognizer.device)
        extra = {}
        if all(job.functionals is not None for job in group):  # computed once already (streams)
            extra["functionals"] = torch.stack([job.functionals for job in group]).to(recognizer.device)
        with torch.inference_mode():  # nothing of the forward pass is kept but numbers: the lightest mode
            output = recognizer.module(batch, lengths, stats, **extra)
        probabilities = output.logits.float().softmax(dim=1).cpu()
        finite = torch.isfinite(probabilities).all(dim=1)
        if not bool(finite.all()):
            k = int((~finite).nonzero()[0])
            peak = f"the samples peak at {group[k].peak:.3g}" if group[k].peak is not None else "the input lies"
            raise AudioError(f"{group[k].name or 'window'}: the model's output is not finite (NaN or infinite), so no "
                             f"emotion can be given; {peak} far outside [-1, 1], the range of audio samples")
        for k, job in enumerate(group):
            event = job.event
            label, event.probabilities = recognizer.named(probabilities[k])
            event.emotion = label if confident(event.probabilities, job.min_confidence) else UNCERTAIN
            event.speaker_stats = job.speaker_stats
            if job.attention:
                positions = int(output.positions[k])
                event.attention = output.alpha[k, :positions].float().cpu().numpy()
                event.attention_grid = None if output.grid is None else (output.grid[0], positions // output.grid[0])
            if job.keep_features:
                event.features = job.features
    return [job.event for job in jobs]
