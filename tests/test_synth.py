"""The synthetic RAVDESS-layout corpus: layout, determinism, caching, and learnability."""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import torch

from ser_lightning.data import synth
from ser_lightning.data.features import FeatureConfig, FeatureExtractor
from ser_lightning.data.audio import load_audio
from ser_lightning.data.loading import torch_threads
from ser_lightning.data.pitch import pitch_track
from ser_lightning.data.folds import SplitConfig, make_fold_plan
from ser_lightning.data.ravdess import parse_ravdess_name, scan_ravdess
from ser_lightning.data.records import EMOTIONS


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout_names_and_counts(tmp_path):
    paths = synth.synthesize_corpus(tmp_path, actors=1, sample_rate=16000, random_seed=0)
    assert len(paths) == 60
    names = [parse_ravdess_name(p) for p in paths]
    assert all(p.parent.name == "Actor_01" for p in paths)
    assert all(n.modality == "audio-only" and n.vocal_channel == "speech" and n.actor == 1 for n in names)
    per_emotion = Counter(n.emotion for n in names)
    assert per_emotion == {e: 4 if e == "neutral" else 8 for e in EMOTIONS}
    info = sf.info(str(paths[0]))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    durations = [sf.info(str(p)).duration for p in paths]
    assert 1.5 < min(durations) and max(durations) < 6.0
    for p in paths[:5]:  # speech in the middle, silence around it
        wave = load_audio(p, 16000)
        head, body = wave[: 4000].abs().max(), wave.abs().max()
        assert body > 0.05 and head < 0.01 * body + 1e-3


def test_deterministic_and_subsets_are_identical(tmp_path):
    full = synth.synthesize_corpus(tmp_path / "a", actors=2, emotions=["neutral", "sad"], random_seed=5)
    again = synth.synthesize_corpus(tmp_path / "b", actors=2, emotions=["sad", "neutral"], random_seed=5)
    subset = synth.synthesize_corpus(tmp_path / "c", actors=1, emotions=["sad"], random_seed=5)
    other = synth.synthesize_corpus(tmp_path / "d", actors=1, emotions=["sad"], random_seed=6)
    assert [digest(p) for p in full] == [digest(p) for p in again]
    by_name = {p.relative_to(tmp_path / "a"): digest(p) for p in full}
    assert all(by_name[p.relative_to(tmp_path / "c")] == digest(p) for p in subset)
    assert digest(subset[0]) != digest(other[0])


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="emotions"):
        synth.synthesize_corpus(tmp_path, actors=1, emotions=["joy"])
    with pytest.raises(ValueError, match="actors"):
        synth.synthesize_corpus(tmp_path, actors=0)


def test_ensure_synthetic_corpus_generates_once(tmp_path, monkeypatch):
    root = synth.ensure_synthetic_corpus(tmp_path, actors=2, random_seed=1)
    assert root == synth.default_synthetic_root(tmp_path, actors=2, random_seed=1)
    assert (root / synth.COMPLETE_MARKER).exists()
    assert len(list(root.rglob("*.wav"))) == 120
    assert [p.name for p in root.parent.iterdir()] == [root.name]  # no temporary folder left behind

    def fail(*args, **kwargs):
        raise AssertionError("the corpus should have been reused")

    monkeypatch.setattr(synth, "synthesize_corpus", fail)
    assert synth.ensure_synthetic_corpus(tmp_path, actors=2, random_seed=1) == root
    monkeypatch.setenv("SER_LIGHTNING_CACHE", str(tmp_path / "env"))
    assert synth.default_synthetic_root(actors=2, random_seed=1).is_relative_to(tmp_path / "env")


def test_simple_classifier_separates_classes_on_held_out_actors(tmp_path):
    """Logistic regression on pooled log-mel statistics: above chance, below perfect."""
    emotions = ("neutral", "happy", "sad", "angry")
    with torch_threads(1):
        accuracies = _held_out_accuracies(tmp_path, emotions)
    mean_accuracy = sum(accuracies) / len(accuracies)
    print(f"held-out-actor accuracy per fold {accuracies}, mean {mean_accuracy:.3f}")
    assert 0.45 < mean_accuracy < 0.95  # chance is ~0.29 (the majority class share)
    assert max(accuracies) < 1.0


def _held_out_accuracies(tmp_path, emotions) -> list[float]:
    synth.synthesize_corpus(tmp_path, actors=12, emotions=emotions, random_seed=0)
    utterances = scan_ravdess(tmp_path, emotions).utterances
    fe = FeatureExtractor(FeatureConfig())
    with torch.inference_mode():
        feats = [fe(load_audio(u.path, 16000)) for u in utterances]
    x = torch.stack([torch.cat([f.mean(dim=1), f.std(dim=1)]) for f in feats])
    y = torch.tensor([emotions.index(u.emotion) for u in utterances])
    accuracies = []
    for fold in range(3):
        plan = make_fold_plan(utterances, emotions, SplitConfig(num_folds=3, fold=fold, num_val_speakers=1))
        train, test = torch.tensor(plan.train + plan.val), torch.tensor(plan.test)
        mean, std = x[train].mean(dim=0), x[train].std(dim=0) + 1e-6
        z = (x - mean) / std
        torch.manual_seed(0)
        linear = torch.nn.Linear(z.shape[1], len(emotions))
        optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=100)

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(linear(z[train]), y[train]) + 1e-2 * linear.weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            accuracies.append((linear(z[test]).argmax(dim=1) == y[test]).float().mean().item())
    return accuracies


def _render(monkeypatch, **cue) -> np.ndarray:
    """One neutral utterance of actor 1 with one voice setting of generator 2 replaced (the same random draws)."""
    monkeypatch.setattr(synth, "file_prosody", lambda rng, emotion, strong: replace(synth.PROSODY["neutral"], **cue))
    return synth.render_utterance(np.random.default_rng(3), synth.actor_voice(0, 1), "neutral", False, 1, 16000)


def _power(wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    frames = np.lib.stride_tricks.sliding_window_view(wave, 512)[::256] * np.hanning(512)
    return np.fft.rfftfreq(512, 1 / 16000), (np.abs(np.fft.rfft(frames)) ** 2).mean(axis=0)


def _high_to_low(wave: np.ndarray) -> float:
    """Energy above 1 kHz over energy below: a flatter source spectrum (a tenser voice) raises it."""
    freqs, power = _power(wave)
    return power[freqs > 1000].sum() / power[freqs <= 1000].sum()


def _centroid(wave: np.ndarray) -> float:
    """The spectral centroid below 4 kHz: formants shifted up raise it."""
    freqs, power = _power(wave)
    band = freqs < 4000
    return float((freqs[band] * power[band]).sum() / power[band].sum())


def _tremor_power(wave: np.ndarray) -> float:
    """The voiced f0 contour's power at 4.5-7 Hz (100 frames a second)."""
    semitones, strength = pitch_track(torch.from_numpy(wave), 16000, 160).numpy()
    voiced = semitones[strength > 0.45]
    spectrum = np.abs(np.fft.rfft(voiced - voiced.mean())) ** 2
    freqs = np.fft.rfftfreq(len(voiced), 1 / 100)
    return float(spectrum[(freqs >= 4.5) & (freqs <= 7.0)].sum() / spectrum.sum())


@pytest.mark.parametrize(("cue", "low", "high", "measure"), [
    ("tension", -1.0, 1.0, _high_to_low),
    ("formant_shift", 0.92, 1.08, _centroid),
    ("tremor", 0.0, 1.0, _tremor_power),
])
def test_each_voice_cue_changes_what_it_names(monkeypatch, cue, low, high, measure):
    """Generator 2's cues beyond global prosody are in the audio: raising one (all else and every random draw the
    same) raises what it stands for."""
    assert measure(_render(monkeypatch, **{cue: high})) > 1.1 * measure(_render(monkeypatch, **{cue: low}))
