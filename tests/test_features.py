"""Features, their configuration, the pitch rows and SpecAugment."""
from __future__ import annotations

import hashlib

import pytest
import soundfile as sf
import torch
from torch import nn

from ser_lightning.data.features import (
    FEATURE_KINDS, LOG_FLOOR, FeatureConfig, FeatureExtractor, FrameKind, ResolvedFeatures, SpecAugment,
    SpecAugmentConfig,
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
    for name in ("logmel", "spectrogram", "loudness_contour"):
        fe = FeatureExtractor(FeatureConfig(name=name))
        batch = torch.stack([noise(20000, seed=1), torch.zeros(20000), 3 * noise(20000, seed=2)])
        out = fe(batch)
        for b in range(3):
            assert torch.allclose(out[b], fe(batch[b]), atol=1e-4), name
        assert torch.isfinite(out).all()


def test_loudness_contour_pads_short_clips_and_crops_long_ones():
    fe = FeatureExtractor(FeatureConfig(name="loudness_contour"))
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
     ({"name": "loudness_contour", "sample_rate": 16000}, "data.feature.sample_rate"),
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


@pytest.mark.parametrize("options, folder", [
    ({}, "2a807d68fb173414"), ({"name": "spectrogram"}, "04c8f3eb75f04bcc"),
    ({"name": "loudness_contour"}, "e11b57f3474b7403"), ({"pitch": True}, "6edcfa4c9b1d38b8"),
    ({"name": "ssl"}, "322bb40cf0f7a43d"),
])
def test_config_keys_of_earlier_versions_still_name_their_cache_folders(options, folder):
    """Existing feature caches stay valid: each kind's default key hashes to the folder it has always had."""
    assert hashlib.sha256(FeatureConfig(**options).key().encode()).hexdigest()[:16] == folder


def test_config_key_names_the_feature_code_version(monkeypatch):
    """Features computed by an older version of the code are never reused for the same options."""
    from ser_lightning.data import features

    before = FeatureConfig(pitch=True).key()
    monkeypatch.setattr(features, "FEATURE_CODE_VERSION", features.FEATURE_CODE_VERSION + 1)
    assert FeatureConfig(pitch=True).key() != before


class FrameEnergy(FrameKind):
    """A kind added by a test: the log mean power of each frame, one row."""

    name = "frame_energy"

    @classmethod
    def rows(cls, resolved: ResolvedFeatures) -> int:
        return 1

    def raw(self, wave: torch.Tensor) -> torch.Tensor:
        half = self.cfg.n_fft // 2
        frames = nn.functional.pad(wave, (half, half)).unfold(-1, self.cfg.n_fft, self.cfg.hop_length)
        return torch.log(frames.pow(2).mean(-1) + LOG_FLOOR).unsqueeze(-2)


def test_a_new_kind_is_one_class_and_its_registration(monkeypatch, tmp_path):
    """Registered, a kind is configured, checked, extracted (with the pitch rows) and cached like the others."""
    from ser_lightning.data.loading import load_features
    from ser_lightning.data.records import Utterance

    with pytest.raises(ValueError, match="data.feature.name: unknown feature 'frame_energy'"):
        FeatureConfig(name="frame_energy")
    monkeypatch.setitem(FEATURE_KINDS, FrameEnergy.name, FrameEnergy)
    config = FeatureConfig(name="frame_energy", hop_ms=20)
    extractor = FeatureExtractor(config)
    assert (config.num_features, extractor.hop_length, extractor.local) == (1, 320, True)
    with pytest.raises(ValueError, match="data.feature.n_fft: 256 is smaller than the window"):
        FeatureConfig(name="frame_energy", n_fft=256)
    with pytest.raises(ValueError, match="data.feature.ssl_model: applies to name: ssl only"):
        FeatureConfig(name="frame_energy", ssl_model="WAVLM_BASE")

    # a 0.1-amplitude tone: mean power 0.005 in every frame that the zero padding leaves whole
    tone = 0.1 * torch.sin(2 * torch.pi * 440 * torch.arange(16000) / 16000)
    features = extractor(tone)
    assert features.shape == (1, extractor.frames(16000)) == (1, 51)
    assert torch.allclose(features[0, 2:-2].exp(), torch.full((47,), 0.005), rtol=0.02)
    assert torch.equal(extractor(torch.stack([tone, tone]))[1], features)
    with_pitch = FeatureExtractor(FeatureConfig(name="frame_energy", hop_ms=20, pitch=True))
    assert with_pitch.num_features == 3 and torch.equal(with_pitch(tone)[:1], features)

    files = []
    for k, amplitude in enumerate((0.1, 0.3)):
        files.append(tmp_path / f"tone{k}.wav")
        sf.write(str(files[-1]), (amplitude / 0.1 * tone).numpy(), 16000, subtype="FLOAT")
    utterances = [Utterance(path, "neutral", "01", None, "manifest") for path in files]
    first = load_features(utterances, config, tmp_path / "cache")
    assert torch.equal(first.features[0], features) and first.features[1].mean() > features.mean() + 2
    cached = list((tmp_path / "cache" / "features").iterdir())
    assert [folder.name for folder in cached] == [hashlib.sha256(config.key().encode()).hexdigest()[:16]]
    assert "'frame_energy'" in config.key() and config.key() != FeatureConfig(hop_ms=20).key()
    monkeypatch.setattr(FrameEnergy, "raw", lambda *_: pytest.fail("computed again instead of read from the cache"))
    again = load_features(utterances, config, tmp_path / "cache")
    assert all(torch.equal(a, b) for a, b in zip(again.features, first.features))


def test_spec_augment_masks_without_changing_shape():
    torch.manual_seed(0)
    x = torch.ones(64, 100)
    y = SpecAugment(SpecAugmentConfig(freq_mask_param=10, time_mask_param=10, num_masks=2))(x)
    assert y.shape == x.shape and (y == 0).any() and (x == 1).all()
    assert torch.equal(SpecAugment(SpecAugmentConfig(0, 0, 1))(x), x)
    with pytest.raises(ValueError, match="data.augment.num_masks"):
        SpecAugmentConfig(num_masks=-1)


def test_pitch_rows_follow_the_fundamental_and_voicing():
    """A 150 Hz pulse train in the middle of silence: log-f0 near 150 Hz where voiced, voicing high only there."""
    from ser_lightning.data.pitch import pitch_track

    rate = 16000
    wave = torch.zeros(rate)
    voiced = torch.arange(4000, 12000)
    wave[voiced] = torch.sin(2 * torch.pi * 150 * voiced / rate) + 0.5 * torch.sin(2 * torch.pi * 300 * voiced / rate)
    semitones, strength = pitch_track(wave, rate, 160)
    assert semitones.shape == strength.shape == (1 + rate // 160,)
    middle = slice(35, 65)  # frames well inside the voiced part
    f0 = 100 * 2 ** (semitones[middle] / 12)
    assert torch.allclose(f0, torch.full_like(f0, 150.0), rtol=0.03)
    assert (strength[middle] > 0.9).all() and (strength[:15] < 0.45).all()
    assert torch.allclose(semitones[:15], semitones[25])  # held constant before the first voiced frame


def test_pitch_option_appends_two_aligned_rows():
    plain = FeatureExtractor(FeatureConfig())
    with_pitch = FeatureExtractor(FeatureConfig(pitch=True))
    wave = noise(12345)
    assert with_pitch.num_features == plain.num_features + 2
    assert torch.equal(with_pitch(wave)[:64], plain(wave)) and with_pitch(wave).shape[1] == plain(wave).shape[1]
    assert FeatureConfig(pitch=True).key() != FeatureConfig().key()
    with pytest.raises(ValueError, match="data.feature.pitch"):
        FeatureConfig(name="loudness_contour", pitch=True)


def test_pitch_magnitudes_keep_the_bits_of_abs():
    """pitch_frames takes |spectrum| as hypot of its parts (faster): the same bits as ``abs`` (else FEATURE_CODE_VERSION
    would have to change), at every magnitude."""
    generator = torch.Generator().manual_seed(0)
    frames = torch.randn(400, 640, generator=generator) * torch.logspace(-6, 1, 400)[:, None]
    spectrum = torch.fft.rfft(frames, 2048)
    assert torch.equal(torch.hypot(spectrum.real.contiguous(), spectrum.imag.contiguous()), spectrum.abs())


def test_raw_frames_of_many_waveforms_at_once_are_each_ones_own():
    """``raw_many`` lays waveforms end to end with silence between them: each gets the frames of its own ``raw``."""
    for cfg in (FeatureConfig(pitch=True), FeatureConfig(name="spectrogram"), FeatureConfig(sample_rate=8000, pitch=True)):
        extractor = FeatureExtractor(cfg)
        waves = [noise(n) for n in (640, 4736, 1, 161, 8000, 999)]
        for wave, raw in zip(waves, extractor.raw_many(waves)):
            torch.testing.assert_close(raw, extractor.raw(wave), rtol=0, atol=1e-5)
