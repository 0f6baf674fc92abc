"""`python -m ser_lightning predict` and the EmotionRecognizer API on generated recordings."""

import csv
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF
from conftest import failing_command

from ser_lightning import EmotionRecognizer
from ser_lightning.cli import main
from ser_lightning.checkpoints import CheckpointError

CLASSES = ("neutral", "happy", "sad", "angry")
CSV_COLUMNS = ["path", "status", "error", "note", "duration_s", "window", "start_s", "end_s", "emotion",
               *(f"p_{name}" for name in CLASSES)]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def speech(tiny_corpus) -> tuple[np.ndarray, int]:
    """One synthetic utterance (mono float32) and its sample rate."""
    path = sorted(tiny_corpus.rglob("*.wav"))[0]
    wave, rate = sf.read(path, dtype="float32")
    return wave, rate


def resample(wave: np.ndarray, orig: int, new: int) -> np.ndarray:
    return AF.resample(torch.from_numpy(wave), orig, new).numpy()


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames), list(reader)


def write_mixed_folder(folder: Path, wave: np.ndarray, rate: int) -> tuple[set[str], dict[str, str]]:
    """Good recordings and broken ones; returns the good names and, per broken name, a word its error must contain."""
    folder.mkdir()
    sub = folder / "nested"
    sub.mkdir()
    sf.write(folder / "good.wav", wave, rate)
    sf.write(sub / "good.flac", wave, rate)
    stereo_8k = resample(wave, rate, 8000)
    sf.write(folder / "stereo_8k.wav", np.stack([stereo_8k, 0.5 * stereo_8k], axis=1), 8000)
    sf.write(folder / "rate_96k.wav", resample(wave, rate, 96000), 96000)
    sf.write(folder / "short.wav", wave[: rate // 4], rate)  # shorter than the receptive field: padded
    header = (folder / "good.wav").read_bytes()
    (folder / "truncated.wav").write_bytes(header[:30])
    (folder / "zero_bytes.wav").write_bytes(b"")
    (folder / "text.wav").write_text("this is not audio\n" * 50)
    sf.write(folder / "silence.wav", np.zeros(2 * rate, dtype=np.float32), rate)
    sf.write(folder / "nan.wav", np.full(rate, np.nan, dtype=np.float32), rate, subtype="FLOAT")
    sf.write(folder / "empty.wav", np.zeros(0, dtype=np.float32), rate)
    sf.write(folder / "good.mp3", wave, rate, format="MP3")
    sf.write(sub / "good.opus", wave, rate, format="OGG", subtype="OPUS")
    sf.write(folder / "good.caf", wave, rate, format="CAF")
    (folder / "notes.txt").write_text("not audio: counted in the summary, not predicted")
    good = {"good.wav", "good.flac", "stereo_8k.wav", "rate_96k.wav", "short.wav", "good.mp3", "good.opus", "good.caf"}
    broken = {"truncated.wav": "cannot read", "zero_bytes.wav": "cannot read", "text.wav": "cannot read",
              "silence.wav": "silence", "nan.wav": "NaN", "empty.wav": "no samples"}
    return good, broken


def test_folder_with_broken_files_gives_error_rows_and_exit_1(seed1d_checkpoint, speech, tmp_path, capsys):
    wave, rate = speech
    good, broken = write_mixed_folder(tmp_path / "mixed", wave, rate)
    out = tmp_path / "results.csv"
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--ckpt_path", str(seed1d_checkpoint), str(tmp_path / "mixed"), "--output", str(out)])
    assert exit_info.value.code == 1
    printed = capsys.readouterr().out
    assert (f"{len(good) + len(broken)} files: {len(good)} predicted, {len(broken)} failed; "
            "1 non-audio file(s) in folders skipped (.txt x1)") in printed

    columns, rows = read_csv(out)
    assert columns == CSV_COLUMNS
    by_name = {Path(row["path"]).name: row for row in rows}
    assert set(by_name) == good | set(broken)
    for name in good:
        row = by_name[name]
        assert row["status"] == "ok" and row["error"] == "" and row["window"] == "all"
        assert row["emotion"] in CLASSES
        assert sum(float(row[f"p_{c}"]) for c in CLASSES) == pytest.approx(1.0, abs=1e-5)
    assert "zero-padded" in by_name["short.wav"]["note"]
    assert float(by_name["rate_96k.wav"]["duration_s"]) == pytest.approx(len(wave) / rate, abs=0.01)
    for name, reason in broken.items():
        row = by_name[name]
        assert row["status"] == "error" and row["emotion"] == ""
        assert name in row["error"] and reason in row["error"], row["error"]


def test_folder_links_are_followed_and_every_file_not_used_is_counted_and_listed(seed1d_checkpoint, speech, tmp_path,
                                                                                capsys):
    wave, rate = speech
    (tmp_path / "elsewhere").mkdir()
    sf.write(tmp_path / "elsewhere" / "linked.wav", wave, rate)
    folder = tmp_path / "clips"
    folder.mkdir()
    sf.write(folder / "good.wav", wave, rate)
    (folder / "._good.wav").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble metadata, as macOS leaves it
    (folder / "stale.wav").symlink_to("deleted.wav")
    (folder / "back").symlink_to(".")
    (folder / "more").symlink_to(tmp_path / "elsewhere")
    main(["predict", "--ckpt_path", str(seed1d_checkpoint), str(folder)])
    printed = capsys.readouterr().out
    assert str(folder / "more" / "linked.wav") in printed  # found through the link to a folder
    assert ("2 files: 2 predicted, 0 failed; 3 other file(s) in folders not used (AppleDouble (._*) x1, "
            "dangling link x1, link loop x1)") in printed
    listing = printed.split("not used, by reason:\n", 1)[1]
    for path in ("._good.wav", "stale.wav", "back"):
        assert f"{folder / path}: " in listing


def test_all_good_files_exit_0_with_documented_json(seed1d_checkpoint, speech, tmp_path, capsys):
    wave, rate = speech
    sf.write(tmp_path / "a.wav", wave, rate)
    sf.write(tmp_path / "long.wav", np.concatenate([wave] * 4), rate)
    out = tmp_path / "results.json"
    main(["predict", "--ckpt_path", str(seed1d_checkpoint), str(tmp_path / "*.wav"), "--output", str(out)])
    assert "2 files: 2 predicted, 0 failed" in capsys.readouterr().out
    records = {Path(r["path"]).name: r for r in json.loads(out.read_text())}
    assert set(records) == {"a.wav", "long.wav"}
    for record in records.values():
        assert set(record) == {"path", "status", "error", "note", "duration_s", "emotion", "probabilities",
                               "windows", "plot"}
        assert record["status"] == "ok" and record["error"] is None
        assert list(record["probabilities"]) == list(CLASSES)
    assert records["a.wav"]["windows"] == []
    windows = records["long.wav"]["windows"]
    assert len(windows) >= 3
    assert set(windows[0]) == {"start_s", "end_s", "speech", "emotion", "probabilities"}
    assert windows[-1]["end_s"] == pytest.approx(records["long.wav"]["duration_s"], abs=1e-3)


def test_python_api_agrees_with_cli(seed1d_checkpoint, speech, tmp_path):
    wave, rate = speech
    files = [tmp_path / "short.wav", tmp_path / "long.wav"]
    sf.write(files[0], wave, rate)
    sf.write(files[1], np.concatenate([wave, -wave, wave, 0.5 * wave]), rate)
    out = tmp_path / "results.csv"
    main(["predict", "--ckpt_path", str(seed1d_checkpoint), *map(str, files), "--output", str(out),
          "--window_seconds=3", "--hop_seconds=1.5", "--batch_size=3"])
    _, rows = read_csv(out)
    recognizer = EmotionRecognizer.from_checkpoint(seed1d_checkpoint, window_seconds=3, hop_seconds=1.5)
    for path in files:
        prediction = recognizer.predict_file(path)
        file_rows = [row for row in rows if row["path"] == str(path)]
        spans = [prediction.probabilities] + [w.probabilities for w in prediction.windows]
        labels = [prediction.label] + [w.label for w in prediction.windows]
        assert [row["window"] for row in file_rows] == ["all", *map(str, range(len(prediction.windows)))]
        for row, probabilities, label in zip(file_rows, spans, labels):
            assert row["emotion"] == label
            for name in CLASSES:
                assert float(row[f"p_{name}"]) == pytest.approx(probabilities[name], abs=1e-6)
    long = recognizer.predict_file(files[1])
    assert len(long.windows) > 1 and long.windows[-1].end == pytest.approx(long.duration)
    mean = {c: np.mean([w.probabilities[c] for w in long.windows]) for c in CLASSES}
    assert long.probabilities == pytest.approx(mean, abs=1e-6)


def test_predict_batch_matches_single_calls(seed1d_checkpoint, speech):
    wave, rate = speech
    recognizer = EmotionRecognizer.from_checkpoint(seed1d_checkpoint, device="cpu", batch_size=4)
    waves = [wave, wave[: rate // 5], np.tile(wave, 3), torch.from_numpy(wave[: len(wave) // 2] * 0.3)]
    batched = recognizer.predict_batch(waves, rate)
    assert len(batched) == len(waves)
    for wave_k, result in zip(waves, batched):
        single = recognizer.predict_batch([wave_k], rate)[0]
        assert result.label == single.label
        assert result.probabilities == pytest.approx(single.probabilities, abs=1e-6)
        np.testing.assert_allclose(result.attention, single.attention, atol=1e-6)
        assert result.attention.sum() == pytest.approx(1.0, abs=1e-5)
        assert result.attention_grid is None
    assert "zero-padded" in batched[1].note
    assert batched[0].windows == [] and len(batched[2].windows) > 1
    with pytest.raises(ValueError, match="waveform 0"):
        recognizer.predict_batch([np.full(100, np.nan, dtype=np.float32)], rate)


def test_plot_dir_writes_valid_pngs(seed1d_checkpoint, zhang2d_checkpoint, speech, tmp_path):
    wave, rate = speech
    sf.write(tmp_path / "short.wav", wave, rate)
    sf.write(tmp_path / "long.wav", np.tile(wave, 3), rate)
    for name, ckpt in (("seed1d", seed1d_checkpoint), ("zhang2d", zhang2d_checkpoint)):
        plots = tmp_path / f"plots_{name}"
        out = tmp_path / f"{name}.json"
        main(["predict", "--ckpt_path", str(ckpt), str(tmp_path / "short.wav"), str(tmp_path / "long.wav"),
              "--plot_dir", str(plots), "--output", str(out)])
        written = sorted(p.name for p in plots.iterdir())
        assert written == ["long.png", "short.png"]
        for png in plots.iterdir():
            assert png.read_bytes()[:8] == PNG_MAGIC
            image = matplotlib.image.imread(png)
            assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
            assert image.std() > 0.01  # not a blank canvas
        assert all(record["plot"] for record in json.loads(out.read_text()))


def test_zhang2d_prediction_has_a_time_frequency_grid(zhang2d_checkpoint, speech, tmp_path):
    wave, rate = speech
    sf.write(tmp_path / "a.wav", wave, rate)
    prediction = EmotionRecognizer.from_checkpoint(zhang2d_checkpoint).predict_file(tmp_path / "a.wav")
    freq, time = prediction.attention_grid
    assert prediction.attention.shape == (freq * time,) and freq > 1 and time > 1
    assert prediction.attention.sum() == pytest.approx(1.0, abs=1e-5)


def test_mismatched_or_broken_checkpoint_is_rejected(seed1d_checkpoint, speech, tmp_path, capsys):
    checkpoint = torch.load(seed1d_checkpoint, map_location="cpu", weights_only=False)
    checkpoint["datamodule_hyper_parameters"]["feature"]["n_mels"] = 32
    mismatched = tmp_path / "mismatched.ckpt"
    torch.save(checkpoint, mismatched)
    with pytest.raises(CheckpointError, match=r"model.num_features is 64 but data.feature .* gives 32"):
        EmotionRecognizer.from_checkpoint(mismatched)
    with pytest.raises(CheckpointError, match=r"model.num_features is 64 .* gives 200"):
        EmotionRecognizer.from_checkpoint(seed1d_checkpoint, feature={"name": "spectrogram"})

    wave, rate = speech
    sf.write(tmp_path / "a.wav", wave, rate)
    status, err = failing_command(["predict", "--ckpt_path", str(mismatched), str(tmp_path / "a.wav")], capsys)
    assert status == 1 and "num_features" in err and "mismatched.ckpt" in err

    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(seed1d_checkpoint.read_bytes()[:1000])
    for path, reason in ((tmp_path / "missing.ckpt", "no such file"), (corrupt, "cannot be read")):
        with pytest.raises(CheckpointError, match=reason) as error:
            EmotionRecognizer.from_checkpoint(path)
        assert str(path) in str(error.value)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    from ser_lightning import EmotionRecognizer

    recognizer = EmotionRecognizer.from_checkpoint(sys.argv[1], batch_size=16)
    recognizer.predict_file(sys.argv[2])  # warm-up on a 30 s file: the same code path, allocator pools filled
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prediction = recognizer.predict_file(sys.argv[3])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(before, after, len(prediction.windows), prediction.duration, prediction.windows[-1].end)
    """
)


@pytest.mark.slow
def test_a_five_minute_file_is_streamed_in_windows_with_bounded_memory(seed1d_checkpoint, tmp_path):
    """Peak RSS may not grow by a fraction of what holding the whole file would take."""
    rate, minutes = 22050, 5  # resampled to 16 kHz as it streams
    rng = np.random.default_rng(0)
    t = np.arange(rate) / rate
    second = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2).astype(np.float32)
    long, warm = tmp_path / "long.wav", tmp_path / "warm.wav"
    for path, seconds in ((long, 60 * minutes), (warm, 30)):
        with sf.SoundFile(path, "w", samplerate=rate, channels=1, subtype="PCM_16") as handle:
            for _ in range(seconds):
                handle.write(second + 0.01 * rng.standard_normal(rate).astype(np.float32))
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(seed1d_checkpoint), str(warm), str(long)],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    before, after, windows, duration, last_end = result.stdout.split()
    growth_mb = (int(after) - int(before)) / 1024  # ru_maxrss is in KiB on Linux
    whole_file_mb = 60 * minutes * (rate + 16000) * 4 / 2**20  # decoded + resampled float32 copies: ~44 MB
    print(f"peak RSS growth {growth_mb:.1f} MB for {minutes} minutes of audio (whole-file arrays: {whole_file_mb:.0f} MB)")
    assert growth_mb < whole_file_mb / 4
    assert int(windows) == 1 + (60 * minutes - 4) // 2
    assert float(duration) == pytest.approx(60 * minutes, abs=0.01)
    assert float(last_end) == pytest.approx(float(duration), abs=1e-6)


@pytest.mark.parametrize("code", [
    "import sys, ser_lightning; assert 'torch' not in sys.modules; print(ser_lightning.EmotionRecognizer.__name__)",
    "import sys, ser_lightning.data.records, ser_lightning.data.ravdess, ser_lightning.cli; "
    "heavy = {'torch', 'lightning', 'matplotlib'} & set(sys.modules); assert not heavy, heavy; print('light')",
])
def test_imports_stay_light(code):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0 and result.stdout.strip() in ("EmotionRecognizer", "light"), result.stderr


def test_speaker_normalised_model_takes_each_folders_statistics(speaker_checkpoint, tiny_corpus, tmp_path, capsys):
    checkpoint = speaker_checkpoint
    recognizer = EmotionRecognizer.from_checkpoint(checkpoint)
    assert recognizer.needs_speaker_stats
    files = sorted((tiny_corpus / "Actor_05").glob("*.wav"))
    with pytest.raises(ValueError, match="speaker_stats"):
        recognizer.predict_file(files[0])
    stats = recognizer.speaker_statistics(files)
    single = recognizer.predict_file(files[0], stats)
    main(["predict", "--ckpt_path", str(checkpoint), str(tiny_corpus / "Actor_05"), str(tiny_corpus / "Actor_06"),
          "--output", str(tmp_path / "out.json")])
    assert "56 files: 56 predicted, 0 failed; speaker statistics per folder" in capsys.readouterr().out
    records = {Path(r["path"]).name: r for r in json.loads((tmp_path / "out.json").read_text())}
    assert records[files[0].name]["probabilities"] == pytest.approx(single.probabilities, abs=1e-5)


def test_seed_ensemble_predicts_its_members_mean_probabilities_and_rejects_mixed_models(
        seed1d_checkpoint, zhang2d_checkpoint, tiny_corpus, feature_cache, speech, tmp_path, capsys):
    from conftest import train_tiny_checkpoint

    other = train_tiny_checkpoint(tiny_corpus, tmp_path / "seed1", "--seed_everything=1", f"--data.cache_dir={feature_cache}")
    wave, rate = speech
    files = [tmp_path / "a.wav", tmp_path / "long.wav"]
    sf.write(files[0], wave, rate)
    sf.write(files[1], np.concatenate([wave, -wave, wave]), rate)
    out = tmp_path / "ensemble.csv"
    main(["predict", "--ckpt_path", str(seed1d_checkpoint), "--ckpt_path", str(other), *map(str, files),
          "--output", str(out)])
    _, rows = read_csv(out)
    members = [EmotionRecognizer.from_checkpoint(path) for path in (seed1d_checkpoint, other)]
    for path in files:
        singles = [member.predict_file(path).probabilities for member in members]
        assert singles[0] != pytest.approx(singles[1], abs=1e-3)  # the seeds differ, so the mean says something
        row = next(row for row in rows if row["path"] == str(path) and row["window"] == "all")
        expected = [(singles[0][name] + singles[1][name]) / 2 for name in CLASSES]
        assert [float(row[f"p_{name}"]) for name in CLASSES] == pytest.approx(expected, abs=1e-4)
    status, err = failing_command(["predict", "--ckpt_path", str(seed1d_checkpoint), "--ckpt_path",
                                   str(zhang2d_checkpoint), str(files[0])], capsys)
    assert status == 1 and re.search(r"zhang2d.*arch|arch.*zhang2d|features", err)


def test_a_recording_decoded_once_predicts_as_its_file_with_its_own_statistics(speaker_checkpoint, speech, tmp_path):
    """What the server does with an upload (decode it once, its own statistics from the features of its prediction)
    gives what the file gives through ``speaker_statistics`` and ``predict_file``, short or long, at any rate."""
    from ser_lightning.data.audio import decode

    recognizer = EmotionRecognizer.from_checkpoint(speaker_checkpoint)
    wave, rate = speech
    files = {"short.wav": (wave, rate), "long.flac": (np.concatenate([wave, wave[::-1], wave]), rate),
             "stereo_8k.wav": (np.stack([resample(wave, rate, 8000), 0.3 * resample(wave, rate, 8000)], axis=1), 8000),
             "short.mp3": (wave, rate)}
    for name, (samples, file_rate) in files.items():
        path = tmp_path / name
        sf.write(path, samples, file_rate)
        expected = recognizer.predict_file(path, recognizer.speaker_statistics([path]))
        for source in (path, decode(path)):
            got = recognizer.predict_with_own_statistics(source)
            if name.endswith(".mp3"):  # libsndfile's MP3 samples differ by an ulp from one read of the file to another
                assert got.probabilities == pytest.approx(expected.probabilities, abs=1e-4), name
                continue
            assert got.probabilities == expected.probabilities, name
            assert [w.probabilities for w in got.windows] == [w.probabilities for w in expected.windows], name
            assert got.duration == expected.duration and np.array_equal(got.features, expected.features), name
    sf.write(tmp_path / "silence.wav", np.zeros(rate, dtype=np.float32), rate)
    with pytest.raises(ValueError, match="silence"):
        recognizer.predict_with_own_statistics(decode(tmp_path / "silence.wav"))
