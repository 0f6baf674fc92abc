"""Normalisation inside the model, speaker statistics and the pooled utterance statistics."""
from __future__ import annotations

import pytest
import torch

from ser_lightning.data.features import FeatureConfig, FeatureExtractor
from ser_lightning.data.speakers import per_utterance, speaker_statistics
from ser_lightning.functionals import num_statistics, utterance_statistics
from ser_lightning.normalization import check_normalization, feature_stats, normalize
from ser_lightning.padding import length_mask, pad_last


def padded_batch():
    x = torch.randn(3, 4, 10, generator=torch.Generator().manual_seed(0)) * 3 + 5
    lengths = torch.tensor([10, 6, 1])
    return x * length_mask(lengths, 10).unsqueeze(1), lengths


def valid(x: torch.Tensor, lengths: torch.Tensor, row: int) -> torch.Tensor:
    return x[row, :, : lengths[row]]


def test_pad_last_and_length_mask():
    batch, lengths = pad_last([torch.ones(2, 4), torch.ones(2, 7), torch.ones(2, 1)])
    assert batch.shape == (3, 2, 7) and lengths.tolist() == [4, 7, 1] and lengths.dtype == torch.int64
    assert torch.equal(batch.sum(dim=(1, 2)), 2.0 * lengths)
    assert torch.equal(length_mask(lengths, 7).sum(1), lengths)


def test_feature_stats_and_global_normalisation():
    x, lengths = padded_batch()
    utterances = [valid(x, lengths, b) for b in range(3)]
    mean, std = feature_stats(utterances)
    frames = torch.cat(utterances, dim=1)
    assert torch.allclose(mean, frames.mean(dim=1), atol=1e-5)
    assert torch.allclose(std, frames.std(dim=1, unbiased=False), atol=1e-5)
    y = normalize(x, lengths, "global", mean, std)
    normalised = torch.cat([valid(y, lengths, b) for b in range(3)], dim=1)
    assert torch.allclose(normalised.mean(dim=1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(normalised.std(dim=1, unbiased=False), torch.ones(4), atol=1e-4)
    assert (y * ~length_mask(lengths, 10).unsqueeze(1) == 0).all()
    with pytest.raises(ValueError, match="mean and std"):
        normalize(x, lengths, "global")


def test_utterance_and_speaker_normalisation_per_row():
    x, lengths = padded_batch()
    y = normalize(x, lengths, "utterance")
    for b in range(2):
        assert torch.allclose(valid(y, lengths, b).mean(dim=1), torch.zeros(4), atol=1e-5)
    assert torch.isfinite(y).all() and (y[2] == 0).all()  # one frame: centred to zero, not NaN
    assert torch.allclose(normalize(x[:1], lengths[:1], "utterance"), y[:1])  # alone = in a batch
    assert torch.equal(normalize(x, lengths, "none"), x)
    mean, std = torch.arange(12.0).view(3, 4), torch.full((3, 4), 2.0)
    z = normalize(x, lengths, "speaker", mean, std)
    for b in range(3):
        assert torch.allclose(valid(z, lengths, b), (valid(x, lengths, b) - mean[b, :, None]) / 2)
    with pytest.raises(ValueError, match=r"^model\.normalization: 'batch' is not one of \['global', 'speaker', 'utterance', 'none'\]$"):
        check_normalization("batch", "model.normalization")


def test_speaker_statistics_use_only_that_speakers_recordings_and_no_labels():
    """The signature takes no labels; a speaker's statistics are unchanged when another speaker's audio changes."""
    generator = torch.Generator().manual_seed(1)
    features = [torch.randn(3, n, generator=generator) + k for k, n in enumerate([5, 8, 6, 9])]
    speakers = ["a", "b", "a", "b"]
    stats = speaker_statistics(features, speakers)
    assert set(stats) == {"a", "b"}
    expected = torch.stack(feature_stats([features[0], features[2]]))
    assert torch.equal(stats["a"], expected)
    changed = [features[0], features[1] * 10 + 3, features[2], -features[3]]
    assert torch.equal(speaker_statistics(changed, speakers)["a"], expected)
    assert [t.data_ptr() for t in per_utterance(stats, speakers)] == [stats[s].data_ptr() for s in speakers]
    with pytest.raises(ValueError, match="speaker ids"):
        speaker_statistics(features, speakers[:3])


def test_utterance_statistics_over_valid_frames_only():
    x, lengths = padded_batch()
    stats = utterance_statistics(x, lengths)
    assert stats.shape == (3, num_statistics(4))
    for b in range(3):
        seg = valid(x, lengths, b)
        alone = utterance_statistics(seg.unsqueeze(0), lengths[b : b + 1])[0]
        assert torch.allclose(stats[b], alone, atol=1e-5)  # padding changes nothing
        assert torch.allclose(stats[b, :4], seg.mean(1), atol=1e-5)
        assert torch.allclose(stats[b, 4:8], seg.std(1, unbiased=False), atol=1e-4)
        change = (seg[:, 1:] - seg[:, :-1]).abs().mean(1) if seg.shape[1] > 1 else torch.zeros(4)
        assert torch.allclose(stats[b, 8:12], change, atol=1e-5)
        assert torch.isclose(stats[b, -1], torch.log(lengths[b].float()))


def test_feature_stats_of_silence_are_finite():
    mean, std = feature_stats([FeatureExtractor(FeatureConfig())(torch.zeros(8000))])
    assert torch.isfinite(mean).all() and (std > 0).all()
