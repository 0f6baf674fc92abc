"""Emotion recognition on new recordings with a trained checkpoint.

``EmotionRecognizer.from_checkpoint(path)`` rebuilds the model (``SERModule``, eval mode) and the
feature extractor the checkpoint was trained with, and predicts files or in-memory waveforms:

- A recording no longer than ``window_seconds`` is decoded whole (``load_audio``, exactly as in
  training) and classified at once; ``Prediction.windows`` is then empty.
- A longer recording is streamed from disk in blocks (``iter_audio_blocks``; never held whole in
  memory) and cut into windows of ``window_seconds`` (default 4 s) every ``hop_seconds`` (default
  half a window). When the last regular window stops short of the end, one more window is aligned
  to the end of the recording, so every window has the full length. Each window's features are
  computed from that window alone; windows are classified ``batch_size`` at a time. The utterance-level probabilities are the mean of the
  window probabilities; the attention (and the features kept for plots) are those of the window
  with the highest probability for the predicted emotion (``Prediction.attention_span``).
- A clip shorter than the model's receptive field (``min_input_frames``) is zero-padded to it by
  the model, and ``Prediction.note`` says so. An empty file, an undecodable one, one with more than
  1 % NaN/Inf samples or one that is digital silence (every sample 0) raises ``AudioError``.
- Silence trimming (``data.feature.trim_silence``) applies to whole-file predictions only, not to
  windows of long recordings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio.functional as AF
from torch import Tensor

from ser_lightning.checkpoints import (
    CheckpointError, as_feature_config, feature_config, module_from_checkpoint, read_checkpoint,
)
from ser_lightning.data.audio import AudioError, AudioSource, audio_duration, iter_audio_blocks, load_audio, read_blocks
from ser_lightning.data.features import FeatureConfig, FeatureExtractor
from ser_lightning.models.ensemble import SeedEnsemble
from ser_lightning.data.speakers import speaker_statistics
from ser_lightning.inference.stream import UNCERTAIN, EmotionStream, StreamEvent, WindowJob, classify_jobs, confident

__all__ = ["CheckpointError", "EmotionRecognizer", "Prediction", "WindowPrediction"]


@dataclass(frozen=True)
class WindowPrediction:
    """Prediction for one window of a long recording (times in seconds from the start; ``speech``: whether the
    voice-activity detector heard speech in it)."""

    start: float
    end: float
    label: str
    probabilities: dict[str, float]
    speech: bool = True


@dataclass
class Prediction:
    """Prediction for one recording or waveform.

    label / probabilities: the utterance-level result (mean over windows for long audio).
    duration: seconds of audio at the model's sample rate.
    attention: the attention weights over the model's valid positions, (L,); for a 2-D model they
        are flattened time-major and ``attention_grid`` = (F', T') gives their layout (None for 1-D).
    windows: per-window predictions of a long recording (empty for a recording within one window).
    features: the (F, N) input features the attention refers to (before normalisation).
    attention_span: (start, end) seconds covered by ``features`` and ``attention``.
    note: warnings (e.g. padding of a clip shorter than the receptive field); empty when none.
    """

    path: str | None
    label: str
    probabilities: dict[str, float]
    duration: float
    attention: np.ndarray = field(repr=False)
    attention_grid: tuple[int, int] | None
    windows: list[WindowPrediction] = field(default_factory=list)
    features: np.ndarray | None = field(default=None, repr=False)
    attention_span: tuple[float, float] = (0.0, 0.0)
    note: str = ""


def check_compatible(model_hparams: Mapping[str, Any], feature: FeatureConfig, data_hparams: Mapping[str, Any]) -> None:
    """Raise CheckpointError naming the option when the model and the feature/data configuration disagree."""
    extractor_features = feature.num_features
    if model_hparams.get("num_features") != extractor_features:
        raise CheckpointError(
            f"model.num_features is {model_hparams.get('num_features')} but data.feature "
            f"(name={feature.name}) gives {extractor_features} features: the model was not trained on this feature "
            "configuration"
        )
    names = model_hparams.get("class_names")
    if not names or len(names) != model_hparams.get("num_classes"):
        raise CheckpointError(
            f"model.class_names is {names!r} but model.num_classes is {model_hparams.get('num_classes')}: "
            "class names are needed to report predictions"
        )
    data_norm, model_norm = data_hparams.get("normalization"), model_hparams.get("normalization")
    if data_norm is not None and data_norm != model_norm:
        raise CheckpointError(f"model.normalization is {model_norm!r} but data.normalization is {data_norm!r}")


class EmotionRecognizer:
    """A trained model plus its feature extractor, ready to classify recordings."""

    def __init__(
        self,
        module: Any,
        feature: FeatureConfig,
        *,
        window_seconds: float = 4.0,
        hop_seconds: float | None = None,
        batch_size: int = 16,
        min_confidence: float | None = None,
    ) -> None:
        hop_seconds = window_seconds / 2 if hop_seconds is None else hop_seconds
        if min_confidence is not None and not 0 <= min_confidence <= 1:
            raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
        if not window_seconds > 0:
            raise ValueError(f"window_seconds must be > 0, got {window_seconds}")
        if not 0 < hop_seconds <= window_seconds:
            raise ValueError(f"hop_seconds must be in (0, window_seconds={window_seconds}], got {hop_seconds}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_compatible(module.hparams, feature, {})
        self.module = module.eval()
        self.device = module.device
        self.extractor = FeatureExtractor(feature).to(self.device)
        self.extractor.load()  # an ssl model's missing weights: one error now, not one per recording
        self.feature = feature
        self.class_names: list[str] = list(module.hparams["class_names"])
        self.arch: str = module.hparams["arch"]
        self.sample_rate = self.extractor.sample_rate
        self.window_samples = round(window_seconds * self.sample_rate)
        self.hop_samples = max(1, round(hop_seconds * self.sample_rate))
        self.window_seconds, self.hop_seconds = window_seconds, hop_seconds
        self.batch_size = batch_size
        self.min_confidence = min_confidence
        self.classifier: Callable[[EmotionRecognizer, Sequence[WindowJob]], list[StreamEvent]] = classify_jobs

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path | Sequence[str | Path],
        device: str | torch.device = "cpu",
        *,
        window_seconds: float = 4.0,
        hop_seconds: float | None = None,
        batch_size: int = 16,
        feature: FeatureConfig | Mapping[str, Any] | None = None,
        trusted: bool = False,
        min_confidence: float | None = None,
    ) -> EmotionRecognizer:
        """Load a checkpoint written by ``python -m ser_lightning fit`` (or ``cv``), safely; several paths
        load a seed ensemble (``SeedEnsemble``: their probabilities averaged; same classes, features and architecture).

        ``min_confidence``: below this top probability a prediction's emotion is ``"uncertain"`` (the probabilities
        are still given). Recordings longer than ``window_seconds`` are split into windows every ``hop_seconds``
        (default: half a window). The feature configuration comes from the checkpoint's datamodule hyper-parameters; pass
        ``feature`` to give it explicitly (e.g. for a checkpoint trained without the datamodule).
        The file is read with the safe loader (``ser_lightning.checkpoints``); ``trusted=True``
        allows a file that needs more, with a warning. Raises CheckpointError naming the file, or
        the mismatching option with both values.
        """
        paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
        if not paths:
            raise ValueError("from_checkpoint: no checkpoint given")
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine")
        modules, config = [], None
        for path in paths:
            checkpoint = read_checkpoint(path, trusted=trusted)
            data_hparams = checkpoint.get("datamodule_hyper_parameters") or {}
            own = feature_config(checkpoint, path) if feature is None else as_feature_config(feature, path)
            try:
                check_compatible(checkpoint["hyper_parameters"], own, data_hparams)
            except CheckpointError as error:
                raise CheckpointError(f"checkpoint {path}: {error}") from error
            if config is not None and own != config:
                raise CheckpointError(f"checkpoint {path}: its features {own} differ from those of {paths[0]} ({config})")
            config = own
            modules.append(module_from_checkpoint(checkpoint, path, device=torch.device(device)))
        try:
            module = modules[0] if len(modules) == 1 else SeedEnsemble(modules)
        except ValueError as error:
            raise CheckpointError(f"checkpoints {', '.join(map(str, paths))}: {error}") from error
        return cls(module, config, window_seconds=window_seconds, hop_seconds=hop_seconds, batch_size=batch_size,
                   min_confidence=min_confidence)

    # ----------------------------------------------------------------- model
    @property
    def needs_speaker_stats(self) -> bool:
        """Whether the model normalises with speaker statistics (``normalization: speaker``)."""
        return self.module.hparams.normalization == "speaker"

    @property
    def speaker_functionals(self) -> bool:
        """Whether a speaker's statistics also hold the prosodic functionals' (``data.speakers``): speaker
        normalisation with the pitch rows."""
        return self.needs_speaker_stats and bool(self.module.hparams.get("pitch_rows", False))

    @property
    def window_functionals(self) -> bool:
        """Whether a stream computes each window's prosodic functionals (once, with those of the other windows and
        streams at hand): for its running speaker statistics and for the model's statistics head, which takes them
        from the job instead of computing them again."""
        return self.speaker_functionals or bool(getattr(self.module, "reads_functionals", False))

    @torch.no_grad()
    def speaker_statistics(self, sources: Iterable[str | Path | Tensor]) -> Tensor:
        """(2, W) statistics of one speaker's recordings (files, or waveforms at the model's rate): the mean and std
        of every feature row, then (``speaker_functionals``) of every prosodic functional over the recordings.

        Files are streamed in blocks, so long recordings are never held whole. Raises AudioError naming
        the first file that cannot be read.
        """
        recordings = []
        for source in sources:
            if isinstance(source, Tensor):
                blocks = source.split(self.window_samples)
            else:
                blocks = iter_audio_blocks(source, self.sample_rate, block_seconds=max(self.window_seconds, 30.0))
            features = [self.extractor(block.to(self.device)).cpu() for block in blocks if block.numel()]
            if features:
                recordings.append(torch.cat(features, dim=1))
        if not recordings:
            raise AudioError("speaker statistics: no audio to compute them from")
        return speaker_statistics(recordings, [0] * len(recordings), functionals=self.speaker_functionals)[0]

    def _stats_for(self, speaker_stats: Tensor | None, count: int, name: str) -> Tensor | None:
        if not self.needs_speaker_stats:
            return None
        if speaker_stats is None:
            raise ValueError(f"{name}: the model normalises each speaker with that speaker's own statistics; pass "
                             "speaker_stats=recognizer.speaker_statistics([...the speaker's recordings...])")
        return speaker_stats.to(self.device).expand(count, *speaker_stats.shape)

    @torch.no_grad()
    def _classify(self, waves: Sequence[Tensor], speaker_stats: Tensor | None = None,
                  min_confidence: float | None = None, names: Sequence[str] = (),
                  own_statistics: bool = False) -> list[StreamEvent]:
        """Each whole waveform classified (through ``classify``, which batches, features included); one event per
        waveform. AudioError naming the waveform (``names``) when the model's output for it is not finite.
        ``own_statistics``: each normalised with the speaker statistics of its own features."""
        stats = None if own_statistics else self._stats_for(speaker_stats, 1, "prediction")
        jobs = [WindowJob(StreamEvent(k, 0.0, w.numel() / self.sample_rate, True), torch.zeros(0),
                          None if stats is None else stats[0].cpu(), attention=True, keep_features=True,
                          min_confidence=self.min_confidence if min_confidence is None else min_confidence,
                          name=names[k] if k < len(names) else f"waveform {k}", peak=float(w.abs().max()), wave=w,
                          own_statistics=own_statistics and self.needs_speaker_stats)
                for k, w in enumerate(waves)]
        return self.classify(jobs)

    def named(self, probabilities: Tensor) -> tuple[str, dict[str, float]]:
        """The predicted class and {class: probability} of a (K,) probability vector."""
        probs = {name: float(p) for name, p in zip(self.class_names, probabilities)}
        return self.class_names[int(probabilities.argmax())], probs

    def _single(self, path: str | None, num_samples: int, event: StreamEvent) -> Prediction:
        duration = num_samples / self.sample_rate
        frames = event.features.shape[-1]
        note = ""
        if frames < self.module.model.min_input_frames:
            note = f"shorter than the model's receptive field ({frames} < {self.module.model.min_input_frames} frames): zero-padded"
        return Prediction(path, event.emotion, event.probabilities, duration, event.attention, event.attention_grid, [],
                          event.features.numpy(), (0.0, duration), note)

    # ----------------------------------------------------------------- windows
    def stream(self, sample_rate: int, window_seconds: float = 2.0, hop_seconds: float = 0.5, **options: Any) -> EmotionStream:
        """A live stream at ``sample_rate``: ``push(samples)`` returns the events that became ready, ``close()`` the
        rest (``ser_lightning.inference.stream``; options: ``channels``, ``speaker_statistics``, ``vad``,
        ``min_speech_seconds``, ``warmup_windows``, ``attention``, ``classify_silence``, ``min_confidence``)."""
        return EmotionStream(self, sample_rate, window_seconds=window_seconds, hop_seconds=hop_seconds, **options)

    def classify(self, jobs: Sequence[WindowJob]) -> list[StreamEvent]:
        """Run the model on prepared windows (batched); their events, in order. Every model call of the recognizer
        goes through here; a server replaces ``classifier`` to batch the windows of many clients together."""
        return self.classifier(self, jobs)

    def _predict_windows(self, path: str | None, blocks: Iterable[Tensor], speaker_stats: Tensor | None = None,
                         sample_rate: int | None = None, min_confidence: float | None = None) -> Prediction | None:
        """Classify a long recording window by window (an ``EmotionStream`` over its blocks); None when it fits
        within one window. The recording's probabilities are the mean over the windows with speech (over all
        windows when none has speech, with a note); its attention is that of the speech window with the highest
        probability of the predicted emotion."""
        stats = self._stats_for(speaker_stats, 1, "prediction")
        min_confidence = self.min_confidence if min_confidence is None else min_confidence
        stream = self.stream(sample_rate or self.sample_rate, self.window_seconds, self.hop_seconds, classify_silence=True,
                             attention=True, features=True, min_confidence=min_confidence,
                             speaker_statistics=None if stats is None else stats[0])
        events: list[StreamEvent] = []
        best: dict[tuple[bool, str], StreamEvent] = {}  # (speech, class) -> the window most sure of that class so far
        total, peak, padded = 0, 0.0, False
        rate = sample_rate or self.sample_rate

        def keep(new: list[StreamEvent]) -> None:
            """Remember the new windows, holding features and attention only for the ones that may be shown."""
            nonlocal padded
            candidates = {id(event): event for event in best.values()}
            for event in new:
                padded |= event.features.shape[-1] < self.module.model.min_input_frames
                candidates[id(event)] = event
                for name, p in event.probabilities.items():
                    if (event.speech, name) not in best or p > best[event.speech, name].probabilities[name]:
                        best[event.speech, name] = event
            shown = {id(event) for event in best.values()}
            for key, event in candidates.items():  # memory stays bounded however long the recording
                if key not in shown:
                    event.features = event.attention = None
            events.extend(new)

        for block in blocks:
            total += block.numel()
            if block.numel():
                peak = max(peak, float(block.abs().max()))
            keep(stream.push(block))
        if stream.next_window == 0:
            return None
        keep(stream.close())
        if peak == 0.0:
            raise AudioError(f"{path or 'waveform'}: the recording is digital silence (every sample is 0)")
        windows = [WindowPrediction(e.start_s, e.end_s, e.emotion, e.probabilities, e.speech) for e in events]
        heard = any(e.speech for e in events)
        speech = [e for e in events if e.speech == heard]  # the windows with speech; all of them when none has any
        mean = torch.tensor([list(e.probabilities.values()) for e in speech]).mean(dim=0)
        label, probs = self.named(mean)
        shown = best[heard, label]
        label = label if confident(probs, min_confidence) else UNCERTAIN
        notes = [] if heard else ["no speech detected"]
        if padded:
            notes.append(f"windows of {self.window_seconds} s are shorter than the model's receptive field: zero-padded")
        return Prediction(path, label, probs, total / rate, shown.attention, shown.attention_grid, windows,
                          shown.features.numpy(), (shown.start_s, shown.end_s), "; ".join(notes))

    # ----------------------------------------------------------------- public API
    def predict_file(self, path: AudioSource, speaker_stats: Tensor | None = None, *,
                     min_confidence: float | None = None) -> Prediction:
        """Classify one audio file, by name or open in memory (any rate / channel count / format soundfile reads).

        ``speaker_stats`` (from ``speaker_statistics``) is needed when the model normalises per speaker.
        Raises AudioError naming the file when it cannot be used.
        """
        name = str(path) if isinstance(path, (str, Path)) else str(getattr(path, "name", None) or "the audio data")
        if audio_duration(path) > self.window_seconds:  # in windows, exactly as a stream at the file's own rate
            rate, blocks = read_blocks(path, block_seconds=self.hop_seconds)
            prediction = self._predict_windows(name, blocks, speaker_stats, rate, min_confidence)
            if prediction is not None:  # None: shorter than a window once decoded
                return prediction
        wave = load_audio(path, self.sample_rate, trim_silence=self.feature.trim_silence)
        _check_not_silent(wave, name)
        return self._single(name, wave.numel(), self._classify([wave], speaker_stats, min_confidence, [name])[0])

    @torch.no_grad()
    def predict_with_own_statistics(self, path: AudioSource, *, min_confidence: float | None = None) -> Prediction:
        """``predict_file(path, speaker_statistics([path]))``: a recording normalised with its own speaker statistics
        (plain ``predict_file`` for a model without speaker normalisation). A recording classified whole (within
        ``window_seconds``, not trimmed) has its features computed once, for its statistics and its prediction."""
        if not self.needs_speaker_stats:
            return self.predict_file(path, min_confidence=min_confidence)
        duration = audio_duration(path)
        if self.feature.trim_silence or duration > self.window_seconds or duration == 0:
            return self.predict_file(path, self.speaker_statistics([path]), min_confidence=min_confidence)
        name = str(path) if isinstance(path, (str, Path)) else str(getattr(path, "name", None) or "the audio data")
        wave = load_audio(path, self.sample_rate)  # what speaker_statistics reads too: one block of it
        _check_not_silent(wave, name)
        return self._single(name, wave.numel(), self._classify([wave], None, min_confidence, [name], True)[0])

    def predict_batch(self, waveforms: Sequence[Tensor | np.ndarray], sample_rate: int,
                      speaker_stats: Tensor | None = None) -> list[Prediction]:
        """Classify in-memory mono waveforms (T,) sampled at ``sample_rate`` (all of one speaker when
        ``speaker_stats`` is given).

        Waveforms within one window are classified together in padded batches; longer ones are
        split into windows like files. Per-sample results equal those of single calls.
        """
        waves = [self._prepare(w, sample_rate, k) for k, w in enumerate(waveforms)]
        short = [k for k, w in enumerate(waves) if w.numel() <= self.window_samples]
        segments = dict(zip(short, self._classify([waves[k] for k in short], speaker_stats,
                                                  names=[f"waveform {k}" for k in short])))
        results: list[Prediction] = []
        for k, wave in enumerate(waves):
            if k in segments:
                results.append(self._single(None, wave.numel(), segments[k]))
            else:
                results.append(self._predict_windows(None, wave.split(self.hop_samples), speaker_stats))
        return results

    def _prepare(self, wave: Tensor | np.ndarray, sample_rate: int, index: int) -> Tensor:
        wave = torch.as_tensor(wave).detach().to("cpu", torch.float32)
        if wave.dim() != 1:
            raise ValueError(f"waveform {index}: expected a mono (T,) waveform, got shape {tuple(wave.shape)}")
        if wave.numel() == 0:
            raise ValueError(f"waveform {index}: no samples")
        if not bool(torch.isfinite(wave).all()):
            raise ValueError(f"waveform {index}: contains NaN or infinite samples")
        _check_not_silent(wave, f"waveform {index}")
        return wave if sample_rate == self.sample_rate else AF.resample(wave, sample_rate, self.sample_rate)


def _check_not_silent(wave: Tensor, name: str) -> None:
    if not bool(wave.abs().max() > 0):
        raise AudioError(f"{name}: the recording is digital silence (every sample is 0)")
