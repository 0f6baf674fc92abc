"""Features, their configuration, normalisation and SpecAugment."""
from __future__ import annotations

import pytest
import torch

from ser_lightning.data.features import (
    FeatureConfig, FeatureExtractor, SpecAugment, SpecAugmentConfig, feature_stats, normalize,
)


def noise(*shape: int, seed: int = 0) -> torch.Tensor:
    return 0.1 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "cfg, num_features, sample_rate, hop",
    [(FeatureConfig(), 64, 16000, 160), (FeatureConfig(name="spectrogram"), 200, 16000, 160),
     (FeatureConfig(name="logmel", n_mels=40, hop_ms=20, sample_rate=8000), 40, 8000, 160),
     (FeatureConfig(name="spectrogram", n_bins=100, sample_rate=8000), 100, 8000, 80)],
)
def test_frame_features_shapes(cfg, num_features, sample_rate, hop):
    fe = FeatureExtractor(cfg)
    assert (fe.num_features, fe.sample_rate, fe.hop_length) == (num_features, sample_rate, hop)
    assert cfg.num_features == num_features
    assert fe.hop_seconds == pytest.approx(hop / sample_rate)
    for length in (1, 50, 1000, 12345):
        out = fe(noise(length))
        assert out.shape == (num_features, fe.frames(length))
        assert torch.isfinite(out).all()


def test_spectrogram_defaults_follow_the_paper():
    r = FeatureConfig(name="spectrogram").resolved()
    assert (r.win_length, r.hop_length, r.n_fft, r.n_bins) == (640, 160, 800, 200)
    # the lowest 200 bins of an 800-point DFT at 16 kHz cover 0-4 kHz: a 5 kHz tone is absent, 3 kHz present
    fe = FeatureExtractor(FeatureConfig(name="spectrogram"))
    t = torch.arange(16000) / 16000
    high, low = fe(torch.sin(2 * torch.pi * 5000 * t)), fe(torch.sin(2 * torch.pi * 3000 * t))
    assert high.max() < low.max() - 3  # natural-log units: > 26 dB below (Hamming side lobes)


def test_batch_equals_single_and_silence_is_finite():
    for name in ("logmel", "spectrogram", "seed_contour"):
        fe = FeatureExtractor(FeatureConfig(name=name))
        batch = torch.stack([noise(20000, seed=1), torch.zeros(20000), 3 * noise(20000, seed=2)])
        out = fe(batch)
        for b in range(3):
            assert torch.allclose(out[b], fe(batch[b]), atol=1e-4), name
        assert torch.isfinite(out).all()


def test_seed_contour_pads_short_clips_and_crops_long_ones():
    fe = FeatureExtractor(FeatureConfig(name="seed_contour"))
    assert fe.sample_rate == 44100 and fe.num_features == 1 and fe.frames(10) == 259
    short, long_ = noise(44100), noise(5 * 44100, seed=3)
    assert fe(short).shape == fe(long_).shape == (1, 259)
    out = fe(short)
    assert torch.isfinite(out).all()
    # 0.5 s of signal after the 0.5 s offset, then zero padding: the contour drops to the 80 dB floor
    assert out[0, 10] > out[0, 200] + 40
    # only samples 0.5 s .. 3.5 s matter
    shifted = long_.clone()
    shifted[:22050] = 0
    shifted[4 * 44100 :] = 0
    assert torch.allclose(fe(shifted), fe(long_), atol=1e-3)


@pytest.mark.parametrize(
    "kwargs, option",
    [({"name": "mfcc"}, "data.feature.name"), ({"n_mels": 0}, "data.feature.n_mels"),
     ({"name": "seed_contour", "sample_rate": 16000}, "data.feature.sample_rate"),
     ({"name": "spectrogram", "n_bins": 500}, "data.feature.n_bins"), ({"n_fft": 128}, "data.feature.n_fft"),
     ({"f_max": 9000.0}, "data.feature.f_max"), ({"hop_ms": -1.0}, "data.feature.hop_ms")],
)
def test_config_errors_name_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        FeatureConfig(**kwargs)


def test_config_key_distinguishes_parameters():
    assert FeatureConfig().key() == FeatureConfig(n_mels=64, win_ms=25.0).key()
    assert FeatureConfig().key() != FeatureConfig(n_mels=40).key()
    assert FeatureConfig().key() != FeatureConfig(trim_silence=True).key()


def padded_batch():
    x = torch.randn(3, 4, 10, generator=torch.Generator().manual_seed(0)) * 3 + 5
    lengths = torch.tensor([10, 6, 1])
    for b, n in enumerate(lengths):
        x[b, :, n:] = 0
    return x, lengths


def test_feature_stats_and_global_normalisation():
    x, lengths = padded_batch()
    utterances = [x[b, :, : lengths[b]] for b in range(3)]
    mean, std = feature_stats(utterances)
    frames = torch.cat(utterances, dim=1)
    assert torch.allclose(mean, frames.mean(dim=1), atol=1e-5)
    assert torch.allclose(std, frames.std(dim=1, unbiased=False), atol=1e-5)
    y = normalize(x, lengths, "global", mean, std)
    valid = torch.cat([y[b, :, : lengths[b]] for b in range(3)], dim=1)
    assert torch.allclose(valid.mean(dim=1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(valid.std(dim=1, unbiased=False), torch.ones(4), atol=1e-4)
    for b in range(3):
        assert (y[b, :, lengths[b] :] == 0).all()
    with pytest.raises(ValueError, match="mean and std"):
        normalize(x, lengths, "global")


def test_utterance_normalisation_and_none():
    x, lengths = padded_batch()
    y = normalize(x, lengths, "utterance")
    for b in range(2):
        seg = y[b, :, : lengths[b]]
        assert torch.allclose(seg.mean(dim=1), torch.zeros(4), atol=1e-5)
        assert torch.allclose(seg.std(dim=1, unbiased=False), torch.ones(4), atol=1e-4)
    assert torch.isfinite(y).all() and (y[2] == 0).all()  # one frame: centred to zero, not NaN
    # each utterance is normalised alone: the batch composition does not matter
    assert torch.allclose(normalize(x[:1], lengths[:1], "utterance"), y[:1])
    assert torch.equal(normalize(x, lengths, "none"), x)
    with pytest.raises(ValueError, match="data.normalization"):
        normalize(x, lengths, "batch")


def test_feature_stats_of_silence_are_finite():
    fe = FeatureExtractor(FeatureConfig())
    mean, std = feature_stats([fe(torch.zeros(8000))])
    assert torch.isfinite(mean).all() and (std > 0).all()


def test_spec_augment_masks_without_changing_shape():
    torch.manual_seed(0)
    x = torch.ones(64, 100)
    y = SpecAugment(SpecAugmentConfig(freq_mask_param=10, time_mask_param=10, num_masks=2))(x)
    assert y.shape == x.shape and (y == 0).any() and (x == 1).all()
    assert torch.equal(SpecAugment(SpecAugmentConfig(0, 0, 1))(x), x)
    with pytest.raises(ValueError, match="data.augment.num_masks"):
        SpecAugmentConfig(num_masks=-1)
