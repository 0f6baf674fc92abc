"""Prosodic functionals, their speaker statistics, the statistics heads, and the speaker-normalised openSMILE baselines."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ser_lightning.data.features import FeatureConfig, FeatureExtractor
from ser_lightning.data.speakers import functional_stats, speaker_statistics
from ser_lightning.functionals import NUM_PROSODIC, VOICING_THRESHOLD, prosodic_functionals, prosodic_rows, voiced_statistics
from ser_lightning.models.heads import HEADS, LogisticHead
from ser_lightning.models.logistic import C_GRID, cross_fitted_logits, fit_logistic
from ser_lightning.padding import pad_last

RATE = 16000


def voice(f0: float, seconds: float = 1.5, rise: float = 0.0, loud: float = 0.3, seed: int = 0) -> torch.Tensor:
    """A harmonic tone with an f0 glide of ``rise`` semitones over its last third, in silence."""
    t = torch.arange(int(seconds * RATE)) / RATE
    glide = torch.where(t > 2 * seconds / 3, rise * (t - 2 * seconds / 3) / (seconds / 3), torch.zeros_like(t))
    phase = 2 * torch.pi * torch.cumsum(f0 * 2 ** (glide / 12), 0) / RATE
    wave = sum(torch.sin(k * phase) / k for k in range(1, 6)) * loud
    noise = 1e-4 * torch.randn(len(t) + 8000, generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.zeros(4000), wave, torch.zeros(4000)]) + noise


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor(FeatureConfig(name="logmel", pitch=True))


def functionals(extractor, wave: torch.Tensor) -> torch.Tensor:
    features = extractor(wave)
    return prosodic_functionals(features.unsqueeze(0), torch.tensor([features.shape[1]]))[0]


def test_functionals_measure_pitch_level_movement_and_loudness(extractor):
    low, high = functionals(extractor, voice(120)), functionals(extractor, voice(240))
    assert high[3] - low[3] == pytest.approx(12.0, abs=0.5)  # mean F0 over voiced frames: one octave up
    rising, flat = functionals(extractor, voice(150, rise=6.0)), functionals(extractor, voice(150))
    assert rising[9] > 0.1 > abs(flat[9])  # the terminal slope over the last voiced frames
    assert rising[10] > 2.0 and abs(flat[10]) < 0.5  # the final level above the voiced mean (semitones)
    loud, soft = functionals(extractor, voice(150, loud=0.3)), functionals(extractor, voice(150, loud=0.03))
    assert loud[14] - soft[14] == pytest.approx(2 * np.log(10), abs=0.3)  # median log power: 20 dB


def test_functionals_of_a_batch_equal_each_alone_and_silence_is_finite(extractor):
    features = [extractor(voice(f0, seconds=s, seed=k)) for k, (f0, s) in enumerate([(110, 1.0), (200, 2.2), (160, 0.4)])]
    features.append(extractor(torch.zeros(12000)))
    batch = prosodic_functionals(*pad_last(features))
    assert batch.shape == (4, NUM_PROSODIC) and torch.isfinite(batch).all()
    for row, alone in zip(batch, features):
        torch.testing.assert_close(row, prosodic_functionals(alone.unsqueeze(0), torch.tensor([alone.shape[1]]))[0])
    torch.testing.assert_close(prosodic_rows(features, chunk=2), batch.float())


def test_voiced_statistics_pool_the_voiced_frames_only_and_a_batch_equals_each_alone(extractor):
    features = [extractor(voice(f0, seconds=s, seed=k)) for k, (f0, s) in enumerate([(110, 1.0), (200, 2.2)])]
    features.append(extractor(torch.zeros(12000)))  # no voiced frame: zeros, not NaN
    raw, lengths = pad_last(features)
    x = raw * 2.0 - 1.0  # stands for the normalised input the head pools
    batch = voiced_statistics(x, raw, lengths)
    assert batch.shape == (3, 2 * raw.shape[1]) and torch.isfinite(batch).all() and not batch[2].any()
    for k, alone in enumerate(features[:2]):
        voiced = alone[-1] > VOICING_THRESHOLD
        assert 0 < voiced.sum() < alone.shape[1]  # silence around the tone: frames are left out
        rows = (alone * 2.0 - 1.0)[:, voiced]
        torch.testing.assert_close(batch[k], torch.cat([rows.mean(1), rows.std(1, unbiased=False)]))


def test_a_speakers_functional_statistics_come_from_that_speakers_utterances_only(extractor):
    features = [extractor(voice(f0, seed=k)) for k, f0 in enumerate([110, 130, 210, 230])]
    speakers = ["a", "a", "b", "b"]
    stats = speaker_statistics(features, speakers, functionals=True)
    width = features[0].shape[0] + NUM_PROSODIC
    assert stats["a"].shape == (2, width)
    torch.testing.assert_close(stats["a"][:, -NUM_PROSODIC:], functional_stats(prosodic_rows(features[:2])))
    changed = speaker_statistics([features[0], features[1], features[3], features[2]], speakers, functionals=True)
    torch.testing.assert_close(changed["a"], stats["a"])  # b's recordings do not move a's statistics


def test_adding_a_statistics_head_mode_is_one_class_and_its_registration():
    class Doubled(LogisticHead):
        """A toy mode: the frozen regression's logits, doubled."""

        def forward(self, *args, **kwargs):
            return 2 * super().forward(*args, **kwargs)

    HEADS["doubled"] = Doubled
    try:
        from ser_lightning.models.module import SERModule

        module = SERModule(num_features=66, num_classes=3, class_names=["a", "b", "c"], statistics_head="doubled",
                           statistics=["pooled", "prosodic"], pitch_rows=True, backend="reference")
        assert isinstance(module.statistics_head, Doubled)
    finally:
        del HEADS["doubled"]


def test_cross_fitted_logits_never_see_their_own_speaker():
    rng = np.random.default_rng(0)
    groups = np.repeat([f"s{k}" for k in range(10)], 12)
    labels = np.tile(np.arange(3), 40)
    inputs = rng.normal(size=(120, 5)) + labels[:, None]
    logits = cross_fitted_logits(inputs, labels, groups, 1.0, 3)
    scrambled = labels.copy()
    scrambled[groups == "s3"] = rng.permutation(scrambled[groups == "s3"])  # speaker 3's labels changed:
    again = cross_fitted_logits(inputs, scrambled, groups, 1.0, 3)
    np.testing.assert_allclose(again[groups == "s3"], logits[groups == "s3"])  # its own logits did not move
    assert not np.allclose(again[groups != "s3"], logits[groups != "s3"])  # the others', fitted on it, did
    full = fit_logistic(inputs, labels, inputs, labels, scaled=True)
    assert (logits.argmax(1) == labels).mean() <= (full.predict(inputs) == labels).mean()  # never optimistic


@pytest.mark.parametrize(("use_speakers", "expected_c"), [(False, C_GRID[0]), (True, 3.0)])
def test_c_is_chosen_on_the_validation_speakers_or_also_on_every_training_speaker_held_out(
        monkeypatch, use_speakers, expected_c):
    """Validation rows every C classifies alike leave the choice to the tie rule (the smallest C); with the training
    speakers, their held-out predictions decide (here made right for C = 3 only)."""
    from ser_lightning.models import logistic

    rng = np.random.default_rng(0)
    groups = np.repeat([f"s{k}" for k in range(6)], 10)
    labels = np.tile(np.arange(2), 30)
    inputs = rng.normal(size=(60, 3)) + 2 * labels[:, None]
    val_labels = np.array([0, 1])
    val_inputs = np.array([[-10.0] * 3, [10.0] * 3])  # far from any boundary

    def held_out(inputs, targets, groups, c, classes):
        return np.eye(classes)[np.asarray(targets) if c == 3.0 else 1 - np.asarray(targets)]

    monkeypatch.setattr(logistic, "cross_fitted_logits", held_out)
    fitted = fit_logistic(inputs, labels, val_inputs, val_labels, scaled=True,
                          train_groups=groups if use_speakers else None)
    assert fitted.C == expected_c


def test_the_frozen_head_gives_cross_fitted_logits_while_training_and_its_own_otherwise():
    head = LogisticHead(num_features=4, num_classes=3, sets=["pooled"])
    rng = np.random.default_rng(1)
    rows = torch.tensor(rng.normal(size=(60, head.linear.in_features)), dtype=torch.float32)
    labels = [k % 3 for k in range(60)]
    rows[:, 0] += torch.tensor(labels, dtype=torch.float32) * 2
    head.prepare(rows[:40], labels[:40], rows[40:], labels[40:], [f"s{k % 8}" for k in range(40)], list(range(40)), 60)
    x = torch.randn(2, 4, 30)
    index = torch.tensor([3, 7])
    head.train()
    torch.testing.assert_close(head(x, x, torch.tensor([30, 30]), None, index), head.offsets[index])
    head.eval()
    evaluated = head(x, x, torch.tensor([30, 30]), None, index)
    assert not torch.allclose(evaluated, head.offsets[index])
    assert not any(p.requires_grad for p in head.parameters())


def test_speaker_normalised_opensmile_baselines_are_z_scored_within_each_speaker():
    pytest.importorskip("opensmile")
    from ser_lightning.evaluation.baseline import per_speaker_z

    rows = np.arange(24, dtype=float).reshape(6, 4) ** 1.5
    speakers = ["a", "a", "a", "b", "b", "b"]
    z = per_speaker_z(rows, speakers)
    for speaker in ("a", "b"):
        mine = np.array(speakers) == speaker
        np.testing.assert_allclose(z[mine].mean(0), 0, atol=1e-6)
        np.testing.assert_allclose(z[mine].std(0), 1, atol=1e-6)
    np.testing.assert_allclose(per_speaker_z(rows[[3, 4, 5, 0, 1, 2]], speakers[3:] + speakers[:3])[:3], z[3:])


def test_opensmile_functionals_of_files_are_cached(tiny_corpus, tmp_path):
    pytest.importorskip("opensmile")
    from ser_lightning.evaluation.baseline import opensmile_functionals

    files = sorted(tiny_corpus.rglob("*.wav"))[:3]
    first = opensmile_functionals(files, "egemaps", tmp_path)
    assert first.shape == (3, 88) and np.isfinite(first).all()
    np.testing.assert_array_equal(opensmile_functionals(files, "egemaps", tmp_path), first)
    assert len(list((tmp_path / "features").rglob("*.pt"))) == 3
