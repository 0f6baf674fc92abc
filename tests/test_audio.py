"""Audio loading of every kind of file a user may have, and of broken ones."""
from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from ser_lightning.data.audio import AudioError, audio_duration, iter_audio_blocks, load_audio

SR = 16000


def tone(seconds: float, rate: int, freq: float = 440.0, amp: float = 0.5, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([mono * (0.5 + 0.5 * c / max(1, channels - 1)) for c in range(channels)], axis=1)


def check(wave: torch.Tensor, seconds: float) -> None:
    assert wave.dtype == torch.float32 and wave.dim() == 1
    assert torch.isfinite(wave).all()
    assert wave.abs().max() <= 1.0
    assert abs(wave.numel() - seconds * SR) <= 2


@pytest.mark.parametrize(
    "fmt, subtype, suffix",
    [("WAV", "PCM_U8", "wav"), ("WAV", "PCM_16", "wav"), ("WAV", "PCM_24", "wav"), ("WAV", "PCM_32", "wav"),
     ("WAV", "FLOAT", "wav"), ("WAV", "DOUBLE", "wav"), ("FLAC", "PCM_16", "flac"), ("FLAC", "PCM_24", "flac"),
     ("OGG", "VORBIS", "ogg")],
)
def test_formats_and_bit_depths(tmp_path, fmt, subtype, suffix):
    path = tmp_path / f"x.{suffix}"
    sf.write(path, tone(0.5, SR), SR, format=fmt, subtype=subtype)
    wave = load_audio(path, SR)
    check(wave, 0.5)
    # the decoded tone matches what was written (up to quantisation / lossy coding)
    reference = torch.from_numpy(tone(0.5, SR)[:, 0])
    tolerance = 0.05 if subtype in ("PCM_U8", "VORBIS") else 1e-3
    assert (wave - reference).pow(2).mean().sqrt() < tolerance


@pytest.mark.parametrize("channels", [2, 4])
def test_multichannel_is_mixed_to_mono(tmp_path, channels):
    data = tone(0.3, SR, channels=channels)
    sf.write(tmp_path / "multi.wav", data, SR, subtype="PCM_16")
    wave = load_audio(tmp_path / "multi.wav", SR)
    check(wave, 0.3)
    assert torch.allclose(wave, torch.from_numpy(data.mean(axis=1)), atol=1e-3)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000, 96000])
def test_any_sample_rate_is_resampled(tmp_path, rate):
    sf.write(tmp_path / "r.wav", tone(0.4, rate, freq=300.0), rate, subtype="PCM_16")
    wave = load_audio(tmp_path / "r.wav", SR)
    check(wave, 0.4)
    spectrum = torch.fft.rfft(wave).abs()
    peak_hz = spectrum.argmax().item() * SR / wave.numel()
    assert abs(peak_hz - 300.0) < 5.0


def test_silence_is_valid_audio(tmp_path):
    sf.write(tmp_path / "s.wav", np.zeros((SR, 1), np.float32), SR, subtype="PCM_16")
    wave = load_audio(tmp_path / "s.wav", SR)
    check(wave, 1.0)
    assert wave.abs().max() == 0
    assert load_audio(tmp_path / "s.wav", SR, trim_silence=True).numel() == SR  # nothing to trim against


def test_clipping_is_clamped(tmp_path):
    data = tone(0.2, SR, amp=3.0)  # float WAV can hold values beyond full scale
    sf.write(tmp_path / "hot.wav", data, SR, subtype="FLOAT")
    wave = load_audio(tmp_path / "hot.wav", SR)
    check(wave, 0.2)
    assert wave.max() == 1.0 and wave.min() == -1.0
    sf.write(tmp_path / "full.wav", np.clip(data, -1, 1), SR, subtype="PCM_16")
    check(load_audio(tmp_path / "full.wav", SR), 0.2)


def test_a_few_nonfinite_samples_are_zeroed(tmp_path):
    data = tone(0.5, SR)
    data[100, 0], data[200, 0], data[300, 0] = np.nan, np.inf, -np.inf
    sf.write(tmp_path / "nan.wav", data, SR, subtype="FLOAT")
    wave = load_audio(tmp_path / "nan.wav", SR)
    check(wave, 0.5)
    assert wave[100] == 0 and wave[200] == 0 and wave[300] == 0


def test_mostly_nonfinite_file_is_rejected(tmp_path):
    data = tone(0.5, SR)
    data[::10] = np.nan  # 10 %
    sf.write(tmp_path / "broken.wav", data, SR, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"broken\.wav.*NaN or infinite"):
        load_audio(tmp_path / "broken.wav", SR)


def test_resampled_nonfinite_file_stays_finite(tmp_path):
    data = tone(0.5, 44100)
    data[1000, 0] = np.nan
    sf.write(tmp_path / "nan44.wav", data, 44100, subtype="FLOAT")
    check(load_audio(tmp_path / "nan44.wav", SR), 0.5)


def test_broken_files_raise_audio_error_naming_the_file(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    good = tmp_path / "good.wav"
    sf.write(good, tone(0.5, SR), SR, subtype="PCM_16")
    (tmp_path / "truncated.wav").write_bytes(good.read_bytes()[:30])
    (tmp_path / "text.wav").write_text("this is not audio\n" * 20)
    for name in ("empty.wav", "truncated.wav", "text.wav", "missing.wav"):
        with pytest.raises(AudioError, match=name.replace(".", r"\.")):
            load_audio(tmp_path / name, SR)
    sf.write(tmp_path / "zero_frames.wav", np.zeros((0, 1), np.float32), SR, subtype="PCM_16")
    with pytest.raises(AudioError, match="no samples"):
        load_audio(tmp_path / "zero_frames.wav", SR)


def test_trim_silence_cuts_leading_and_trailing_silence(tmp_path):
    data = np.concatenate([np.zeros((SR // 2, 1)), tone(0.5, SR), np.zeros((SR, 1))]).astype(np.float32)
    data += np.float32(1e-5) * np.random.default_rng(0).standard_normal(data.shape).astype(np.float32)
    sf.write(tmp_path / "padded.wav", data, SR, subtype="FLOAT")
    assert load_audio(tmp_path / "padded.wav", SR).numel() == 2 * SR
    trimmed = load_audio(tmp_path / "padded.wav", SR, trim_silence=True)
    assert abs(trimmed.numel() - SR // 2) < 0.05 * SR


def test_block_streaming_matches_whole_file(tmp_path):
    rate = 22050
    data = tone(2.3, rate, channels=2)
    sf.write(tmp_path / "long.flac", data, rate, subtype="PCM_16")
    blocks = list(iter_audio_blocks(tmp_path / "long.flac", SR, block_seconds=0.5))
    assert len(blocks) == math.ceil(2.3 / 0.5)
    assert all(b.dtype == torch.float32 and b.dim() == 1 and torch.isfinite(b).all() for b in blocks)
    whole = load_audio(tmp_path / "long.flac", SR)
    streamed = torch.cat(blocks)
    assert abs(streamed.numel() - whole.numel()) <= len(blocks)
    n = min(streamed.numel(), whole.numel())
    assert (streamed[:n] - whole[:n]).abs().mean() < 0.01
    assert abs(audio_duration(tmp_path / "long.flac") - 2.3) < 1e-3
    with pytest.raises(AudioError, match="nothing.wav"):
        audio_duration(tmp_path / "nothing.wav")
    with pytest.raises(AudioError, match="nothing.wav"):
        next(iter_audio_blocks(tmp_path / "nothing.wav", SR, 1.0))
