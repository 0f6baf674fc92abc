"""Streaming recognition: every event equals the offline prediction of its window, whatever the chunking."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from ser_lightning import EmotionRecognizer
from ser_lightning.data.speakers import functional_stats
from ser_lightning.functionals import prosodic_rows
from ser_lightning.inference.stream import IncrementalResampler, prepare_streams

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def speech(tiny_corpus) -> np.ndarray:
    """About 7 s of 16 kHz speech: three tiny-corpus utterances of different speakers and emotions, back to back."""
    files = sorted(tiny_corpus.rglob("*.wav"))
    return np.concatenate([sf.read(files[k], dtype="float32")[0] for k in (0, 33, 70)])


@pytest.fixture(scope="module")
def recognizers(seed1d_checkpoint, speaker_checkpoint) -> dict[str, EmotionRecognizer]:
    plain = EmotionRecognizer.from_checkpoint(seed1d_checkpoint.parent / "last.ckpt")
    speaker = EmotionRecognizer.from_checkpoint(speaker_checkpoint.parent / "last.ckpt")
    return {"plain": plain, "speaker": speaker}


def chunks(samples: np.ndarray, size: int | str, seed: int = 0):
    rng = np.random.default_rng(seed)
    position = 0
    while position < len(samples):
        step = int(rng.integers(1, 6000)) if size == "random" else size
        yield samples[position : position + step]
        position += step


def run(stream, samples: np.ndarray, size: int | str) -> list:
    events = []
    for chunk in chunks(samples, size):
        events += stream.push(chunk)
    return events + stream.close()


def at_rate(samples: np.ndarray, rate: int) -> np.ndarray:
    return samples if rate == 16000 else AF.resample(torch.from_numpy(samples), 16000, rate).numpy()


@pytest.mark.parametrize("rate", [16000, 48000])
@pytest.mark.parametrize("model, normalization", [("plain", None), ("speaker", "enrolled"), ("speaker", "running")])
def test_every_event_equals_predict_batch_on_its_window_whatever_the_chunking(recognizers, speech, model,
                                                                              normalization, rate):
    recognizer = recognizers[model]
    samples = at_rate(speech, rate)
    enrolled = recognizer.speaker_statistics([torch.from_numpy(speech)]) if normalization == "enrolled" else None
    reference = None
    for size in (1, 160, 4000, "random"):
        audio = samples[: int(2.6 * rate)] if size == 1 else samples  # one sample at a time: a short stream
        stream = recognizer.stream(rate, speaker_statistics=enrolled, classify_silence=True)
        assert stream.incremental
        events = run(stream, audio, size)
        regular = 1 + (len(audio) - 2 * rate) // (rate // 2)
        assert len(events) == regular + ((regular - 1) * (rate // 2) + 2 * rate < len(audio))
        for event in events:
            window = audio[round(event.start_s * rate) : round(event.end_s * rate)]
            expected = recognizer.predict_batch([window], rate, speaker_stats=event.speaker_stats)[0]
            assert event.emotion == expected.label
            assert event.probabilities == pytest.approx(expected.probabilities, abs=TOLERANCE)
            if normalization is not None:
                assert event.normalization in ({"enrolled"} if enrolled is not None else {"warmup", "running"})
        if size == "random":  # every chunking gives the same events
            assert reference is not None
        if size != 1:
            probabilities = [list(e.probabilities.values()) for e in events]
            if reference is not None:
                np.testing.assert_allclose(probabilities, reference, atol=TOLERANCE)
            reference = probabilities


def test_events_span_their_windows_to_the_sample_and_close_aligns_the_last_to_the_end(recognizers, speech):
    recognizer, rate = recognizers["plain"], 16000
    audio = speech[: 3 * rate + 1234]
    events = run(recognizer.stream(rate, window_seconds=2.0, hop_seconds=0.5, classify_silence=True), audio, 777)
    spans = [(round(e.start_s * rate), round(e.end_s * rate)) for e in events]
    assert spans == [(0, 32000), (8000, 40000), (16000, 48000), (len(audio) - 32000, len(audio))]
    assert [e.index for e in events] == [0, 1, 2, 3]
    short = run(recognizer.stream(rate, classify_silence=True), speech[:12345], 1000)
    assert [(e.start_s, e.end_s) for e in short] == [(0.0, 12345 / rate)]  # shorter than a window: all of it


def test_events_are_ready_as_soon_as_their_window_is_complete(recognizers, speech):
    stream = recognizers["plain"].stream(16000, classify_silence=True)
    assert stream.push(speech[:31999]) == []
    assert [e.index for e in stream.push(speech[31999:32000])] == [0]
    assert [e.index for e in stream.push(speech[32000:40000])] == [1]


@pytest.mark.parametrize("model", ["plain", "speaker"])
def test_windows_without_speech_say_so_instead_of_forcing_an_emotion(recognizers, speech, model):
    """Silence, then speech: silent windows give no emotion and (running statistics) add nothing to the speaker's
    statistics; the windows with speech are still exactly the offline model on their samples."""
    recognizer, rate = recognizers[model], 16000
    noise = (10 ** (-70 / 20) * np.random.default_rng(0).standard_normal(3 * rate)).astype(np.float32)
    audio = np.concatenate([noise, speech[: 3 * rate]])
    for vad in ("silero", "energy"):
        stream = recognizer.stream(rate, vad=vad)
        events = run(stream, audio, 4000)
        silent, voiced = events[0], events[-1]
        assert (silent.speech, silent.emotion, silent.probabilities) == (False, None, None), vad
        assert voiced.speech and voiced.emotion in recognizer.class_names, vad
        assert silent.speech_seconds < 0.25 <= voiced.speech_seconds
        for event in (e for e in events if e.speech):
            window = audio[round(event.start_s * rate) : round(event.end_s * rate)]
            expected = recognizer.predict_batch([window], rate, speaker_stats=event.speaker_stats)[0]
            assert event.probabilities == pytest.approx(expected.probabilities, abs=TOLERANCE), vad
        if model == "speaker":  # frames counted: those of the speech windows only, each once
            first_speech = min(e.start_s for e in events if e.speech and e.index < len(events) - 1)
            assert stream.running.counted_until - first_speech * 100 == pytest.approx(stream.running.count, abs=1)


def test_int16_and_interleaved_channels_equal_their_float_mono_mix(recognizers, speech):
    recognizer, rate = recognizers["plain"], 16000
    audio = speech[: 3 * rate]
    stereo = np.stack([audio, 0.5 * audio], axis=1)
    pcm = np.round(np.clip(stereo, -1, 1) * 32767).astype(np.int16)
    mono = pcm.astype(np.float32).mean(axis=1) / 32768.0
    expected = run(recognizer.stream(rate, classify_silence=True), mono, 4000)
    for samples in (pcm.reshape(-1), pcm):  # interleaved 1-D, and (n, channels)
        got = run(recognizer.stream(rate, channels=2, classify_silence=True), samples, 3000 * 2)
        assert [e.probabilities for e in got] == [pytest.approx(e.probabilities, abs=TOLERANCE) for e in expected]
    with pytest.raises(ValueError, match="whole number of 2-channel frames"):
        recognizer.stream(rate, channels=2).push(pcm.reshape(-1)[:5])
    with pytest.raises(ValueError, match="NaN or infinite"):
        recognizer.stream(rate).push(np.array([0.0, np.nan], dtype=np.float32))


def test_running_speaker_statistics_come_from_the_streams_own_speech(recognizers, speech):
    recognizer, rate = recognizers["speaker"], 16000
    stream = recognizer.stream(rate, warmup_windows=3, features=True, classify_silence=True)
    events = run(stream, speech, 4000)
    assert [e.normalization for e in events[:2]] == ["warmup", "warmup"] and events[-1].normalization == "running"
    regular = [e for e in events if e.speech][:-1]  # the end-aligned window is counted too; leave it out here
    frames = torch.cat([regular[0].features] + [e.features[:, -50:] for e in regular[1:]], dim=1).double()
    num_rows = frames.shape[0]
    last = regular[-1].speaker_stats
    torch.testing.assert_close(last[0, :num_rows].double(), frames.mean(1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last[1, :num_rows].double(), frames.std(1, unbiased=False), rtol=1e-3, atol=1e-3)
    # the functionals' part: the moments of every speech window's functionals so far (kept as running sums)
    torch.testing.assert_close(last[:, num_rows:], functional_stats(prosodic_rows([e.features for e in regular])),
                               rtol=1e-4, atol=1e-5)


def test_a_long_live_stream_holds_the_same_state_after_a_minute_as_after_twenty_seconds(recognizers, speech):
    """Nothing a stream keeps grows with its age: samples, frames, voice-activity decisions, running statistics (their
    functionals' moments are running sums, not a list of every window's)."""
    recognizer, rate = recognizers["speaker"], 16000
    audio = np.tile(speech, -(-60 * rate // len(speech)))[: 60 * rate]
    stream = recognizer.stream(rate)

    def held() -> list[int]:
        return [stream.raw.numel(), stream.model_signal.numel(), stream.frames.signal.numel(),
                sum(part.shape[1] for part in stream.frames.frames), len(stream.vad.flags), stream.vad.buffer.numel(),
                stream.running.functionals.sum.numel()]

    sizes = {}
    for position in range(0, len(audio), 4000):
        stream.push(audio[position : position + 4000])
        if position + 4000 in (20 * rate, 60 * rate):
            sizes[position + 4000] = held()
    assert sizes[20 * rate] == sizes[60 * rate] and stream.running.count > 0


def test_non_incremental_windows_are_exact_too(recognizers, speech):
    recognizer, rate = recognizers["plain"], 11025  # a 0.5 s hop is not a whole number of resampler periods
    audio = at_rate(speech, rate)[: 3 * rate]
    stream = recognizer.stream(rate, classify_silence=True)
    assert not stream.incremental
    for event in run(stream, audio, 3000):
        window = audio[round(event.start_s * rate) : round(event.end_s * rate)]
        expected = recognizer.predict_batch([window], rate)[0]
        assert event.probabilities == pytest.approx(expected.probabilities, abs=TOLERANCE)


def test_seed_ensembles_stream(seed1d_checkpoint, speech):
    checkpoints = [seed1d_checkpoint.parent / "last.ckpt", next(seed1d_checkpoint.parent.glob("epoch*.ckpt"))]
    ensemble = EmotionRecognizer.from_checkpoint(checkpoints)
    for event in run(ensemble.stream(16000, classify_silence=True), speech[: 3 * 16000], 5000):
        window = speech[round(event.start_s * 16000) : round(event.end_s * 16000)]
        expected = ensemble.predict_batch([window], 16000)[0]
        assert event.probabilities == pytest.approx(expected.probabilities, abs=TOLERANCE)


@pytest.mark.parametrize("model", ["plain", "speaker"])
def test_streams_prepared_together_give_each_stream_its_own_events(recognizers, speech, model):
    """prepare_streams (a server's streams at once: voice activity, frames and functionals batched across them) gives
    each stream the events it gives alone; a stream's bad samples are its own error, the others go on."""
    recognizer, rate = recognizers[model], 16000
    audios = [np.roll(speech, 4321 * k) for k in range(3)] + [at_rate(speech, 48000)]
    rates = [rate] * 3 + [48000]
    together = [recognizer.stream(r, classify_silence=k == 0) for k, r in enumerate(rates)]
    alone = [recognizer.stream(r, classify_silence=k == 0) for k, r in enumerate(rates)]
    got, expected = [[] for _ in audios], [[] for _ in audios]
    rng = np.random.default_rng(3)
    steps = [int(s) for s in rng.integers(100, 9000, size=4 * len(speech) // 4000)]
    positions = [0] * len(audios)
    for step in steps:
        items = [(stream, audio[p : p + step * (r // rate)]) for stream, audio, p, r in zip(together, audios, positions,
                                                                                             rates)]
        if step % 7 == 0:  # one stream sends a bad chunk now and then
            items[1] = (together[1], np.array([0.0, np.nan], dtype=np.float32))
        results = prepare_streams(items)
        for k, (result, (stream, samples)) in enumerate(zip(results, items)):
            if k == 1 and step % 7 == 0:
                assert isinstance(result, ValueError)
                continue
            got[k] += recognizer.classify(result)
            expected[k] += alone[k].push(samples)
        positions = [p + step * (r // rate) for p, r in zip(positions, rates)]
    for k, result in enumerate(prepare_streams([(stream, None) for stream in together])):
        got[k] += recognizer.classify(result)
        expected[k] += alone[k].close()
    assert all(len(events) > 4 for events in got)
    for mine, theirs in zip(got, expected):
        assert [(e.index, e.start_s, e.speech, e.normalization) for e in mine] == [
            (e.index, e.start_s, e.speech, e.normalization) for e in theirs]
        for a, b in zip(mine, theirs):
            assert (a.probabilities is None) == (b.probabilities is None)
            if a.probabilities is not None:
                assert a.probabilities == pytest.approx(b.probabilities, abs=TOLERANCE)
    with pytest.raises(ValueError, match="twice"):
        prepare_streams([(together[0], speech[:10]), (together[0], speech[:10])])


@pytest.mark.parametrize("orig, new", [(48000, 16000), (44100, 16000), (8000, 16000), (16000, 16000)])
def test_incremental_resampler_gives_the_whole_signals_resampling(orig, new):
    signal = torch.randn(orig + 321, generator=torch.Generator().manual_seed(0))
    resampler = IncrementalResampler(orig, new)
    out = torch.cat([resampler.push(part) for part in signal.split(997)])
    whole = AF.resample(signal, orig, new)
    assert len(out) <= len(whole) and len(whole) - len(out) <= resampler.edge_blocks * resampler.new + resampler.new
    torch.testing.assert_close(out, whole[: len(out)], atol=1e-5, rtol=0)
