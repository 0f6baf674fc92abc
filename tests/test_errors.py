"""Nothing lost, nothing silently wrong: one-line errors, safe outputs, numbers that make no sense refused."""
from __future__ import annotations

import errno
import importlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_EMOTIONS, failing_command, tiny_args

from ser_lightning import cli
from ser_lightning.errors import DataError, UsageError, describe
from ser_lightning.parser import LIGHTNING_LOGGERS
from ser_lightning.outputs import OutputError

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture
def lightning_lines(capsys):
    """Lightning's log lines go to the captured stderr too, so that a test sees everything a command prints there."""
    handler = logging.StreamHandler(sys.stderr)  # the captured stream: capsys is active by now
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    yield
    for logger in loggers:
        logger.removeHandler(handler)


@pytest.fixture
def places(tiny_corpus, tmp_path) -> dict[str, str]:
    """Paths the bad arguments refer to: {wav}, {corpus}, {tmp}, {empty} (an empty folder), {full} (a non-empty one)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    return {"wav": str(next(tiny_corpus.rglob("*.wav"))), "corpus": str(tiny_corpus), "tmp": str(tmp_path),
            "empty": str(tmp_path / "empty"), "full": str(tmp_path / "full")}


FIT = ("fit", "{tiny}")
BAD_ARGUMENTS = [
    # (command line, exit status, what the line must name)
    ([*FIT, "--model.width=-1"], 2, "model.width"),
    ([*FIT, "--model.lr=-1"], 2, "model.lr"),
    ([*FIT, "--model.lr=abc"], 2, "model.lr"),
    ([*FIT, "--model.dropout=2"], 2, "model.dropout"),
    ([*FIT, "--model.arch=transformer"], 2, "model.arch"),
    ([*FIT, "--data.fold=9"], 2, "data.fold"),
    ([*FIT, "--data.num_folds=1"], 2, "data.num_folds"),
    ([*FIT, "--data.corpus=foo"], 2, "data.corpus"),
    ([*FIT, "--data.root="], 2, "data.root"),
    ([*FIT, "--data.root={tmp}/missing"], 2, "data.root"),
    ([*FIT, "--data.root={empty}"], 1, "{empty}"),
    ([*FIT, "--data.num_val_speakers=50"], 2, "data.num_val_speakers"),
    ([*FIT, "--data.batch_size=0"], 2, "data.batch_size"),
    ([*FIT, "--data.emotions=calm2"], 2, "data.emotions"),
    ([*FIT, "--data.feature.name=mfcc"], 2, "data.feature.name"),
    ([*FIT, "--data.lenient=maybe"], 2, "data.lenient"),
    ([*FIT, "--trainer.max_epochs=0"], 2, "trainer.max_epochs"),
    ([*FIT, "--trainer.max_epochs=-5"], 2, "max_epochs"),
    ([*FIT, "--figures.every_n_epochs=-1"], 2, "figures.every_n_epochs"),
    ([*FIT, "--baseline_extra=[foo]"], 2, "--baseline_extra"),
    ([*FIT, "--nosuch=1"], 2, "--nosuch"),
    (["fit", "--config", "nosuch"], 2, "--config nosuch"),
    (["cv", "--folds=1", "--out={tmp}/cv", "{tiny}"], 2, "--folds"),
    (["cv", "--repeats=0", "--out={tmp}/cv", "{tiny}"], 2, "--repeats"),
    (["cv", "--only=7", "--out={tmp}/cv", "{tiny}"], 2, "--only 7"),
    (["cv", "--only=a", "--out={tmp}/cv", "{tiny}"], 2, "--only a"),
    (["cv-report", "{tmp}/missing"], 2, "{tmp}/missing"),
    (["cv-report", "{empty}"], 2, "{empty}"),
    (["tune", "--space={tmp}/missing.yaml", "--out={tmp}/tune", "{tiny}"], 2, "--space {tmp}/missing.yaml"),
    (["tune", "--space={wav}", "--trials=0", "{tiny}"], 2, "--trials"),
    (["predict", "--ckpt_path={wav}", "{wav}"], 1, "checkpoint {wav}: not a checkpoint"),
    (["predict", "--ckpt_path={tmp}/missing.ckpt", "{wav}"], 1, "{tmp}/missing.ckpt"),
    (["predict", "--ckpt_path={empty}", "{wav}"], 1, "{empty}: a folder"),
    (["predict", "--ckpt_path={wav}", "--output={tmp}/out.txt", "{wav}"], 2, "--output"),
    (["predict", "--ckpt_path={wav}"], 2, "PATH"),
    (["test", "--ckpt_path={wav}", "{tiny}"], 1, "checkpoint {wav}"),
    (["validate", "{tiny}"], 2, "--ckpt_path"),
    (["predict-split", "--ckpt_path={wav}", "{tiny}"], 1, "checkpoint {wav}"),
    (["export", "--ckpt_path={wav}", "{tmp}/model.onnx"], 1, "checkpoint {wav}"),
    (["export", "--ckpt_path={wav}"], 2, "OUT.onnx"),
    (["synth", "{tmp}/s", "--actors=0"], 2, "actors"),
    (["synth", "{tmp}/s", "--emotions=foo"], 2, "--emotions"),
    (["synth", "{tmp}/s", "--layout=foo"], 2, "--layout"),
    (["synth", "{full}"], 2, "{full}"),
    (["frobnicate"], 2, "frobnicate"),
]


def expand(args: list[str], places: dict[str, str], corpus: Path, tmp_path: Path) -> list[str]:
    expanded = []
    for arg in args:
        if arg == "{tiny}":
            expanded += tiny_args(corpus, tmp_path / "logs")
        else:
            expanded.append(arg.format(**places))
    return expanded


@pytest.mark.parametrize("args, status, named", BAD_ARGUMENTS,
                         ids=[" ".join(arg for arg in args if arg != "{tiny}") for args, _, _ in BAD_ARGUMENTS])
def test_a_bad_option_or_file_ends_the_command_in_one_line_naming_it(args, status, named, places, tiny_corpus, tmp_path,
                                                                    capsys, lightning_lines):
    code, err = failing_command(expand(args, places, tiny_corpus, tmp_path), capsys)
    assert code == status, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert named.format(**places) in err, err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_the_real_process_prints_one_line(tiny_corpus, tmp_path):
    """As a user runs it, Lightning's start-up lines and all, for an error found while reading the data."""
    args = [sys.executable, "-m", "ser_lightning", "fit", *tiny_args(tiny_corpus, tmp_path), "--data.num_val_speakers=50"]
    env = {key: value for key, value in os.environ.items() if key != "SER_LIGHTNING_DEBUG"}
    plain = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1, plain.stderr
    assert plain.stderr.startswith("error: data.num_folds=3: RAVDESS has only 6 speakers") and not plain.stdout


@pytest.mark.parametrize("how", ["flag", "variable"])
def test_debug_raises_the_original_error_for_its_traceback(how, tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("SER_LIGHTNING_DEBUG", "1" if how == "variable" else "0")
    with pytest.raises(ValueError, match="model.width must be > 0"):
        cli.main(["fit", *tiny_args(tiny_corpus, tmp_path), "--model.width=-1", *(["--debug"] if how == "flag" else [])])


def chained(error: BaseException, cause: BaseException) -> BaseException:
    error.__context__ = cause
    return error


@pytest.mark.parametrize("error, status, line", [
    (UsageError("data.fold=9 is out of range"), 2, "data.fold=9 is out of range"),
    (DataError("3 of 84 audio files could not be used:\n  a.wav: x\n  b.wav: y"), 1,
     "3 of 84 audio files could not be used: a.wav: x; b.wav: y"),
    (OSError(errno.ENOSPC, "No space left on device", "/out/r.csv"), 1, "no space left on device: /out/r.csv"),
    (PermissionError(errno.EACCES, "Permission denied", "/out"), 1, "permission denied: /out"),
    (chained(RuntimeError("[enforce fail at inline_container.cc:672] ."), OSError(errno.ENOSPC, "No space left")), 1,
     "no space left on device (RuntimeError: [enforce fail at inline_container.cc:672] .)"),
    (KeyboardInterrupt(), 130, "interrupted"),
    (TypeError("boom"), 1, "unexpected TypeError: boom (rerun with --debug or SER_LIGHTNING_DEBUG=1 for the "
                           "traceback, and report it if it is a bug)"),
])
def test_errors_map_to_an_exit_status_and_one_line(error, status, line):
    assert describe(error) == (status, line)


def test_a_value_error_from_a_library_is_unexpected_but_one_from_a_configuration_check_is_usage():
    from ser_lightning.models.module import SERModule

    try:
        int("x")  # raised by Python itself, not by a check of the project
    except ValueError as error:
        assert describe(error)[0] == 1 and describe(error)[1].startswith("unexpected ValueError")
    with pytest.raises(ValueError) as raised:
        SERModule(arch="transformer")
    assert describe(raised.value) == (2, "model.arch must be one of ('seed1d', 'zhang2d'), got 'transformer'")


# ----------------------------------------------------------------------------- commands and process settings
@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_of_the_table_imports(name):
    module, function = cli.COMMANDS[name][1].split(":")
    assert callable(getattr(importlib.import_module(module), function))


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_only_the_commands_that_loop_over_batches_or_files_change_the_allocator(name, monkeypatch):
    applied = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: applied.append(name))
    monkeypatch.setitem(cli.COMMANDS, name, ("", "builtins:len"))  # the command itself does nothing here
    cli.run_command([name])
    loops = {"fit", "validate", "test", "predict-split", "cv", "tune", "predict"}
    assert applied == ([name] if name in loops else [])


def test_lightnings_advertising_tips_are_not_printed(tiny_corpus, feature_cache, tmp_path):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(handler)
    try:
        cli.main(["fit", *tiny_args(tiny_corpus, tmp_path, "--trainer.fast_dev_run=true", cache=feature_cache)])
    finally:
        logger.removeHandler(handler)
    messages = [record.getMessage() for record in records]
    assert any(m.startswith("GPU available") for m in messages)  # Lightning's other lines still come
    assert not [m for m in messages if "Tip:" in m or "litlogger" in m or "litmodels" in m]


# ----------------------------------------------------------------------------- outputs
def not_a_folder(tmp_path: Path) -> Path:
    """A folder path below a file: no process, root included, can create or write it."""
    (tmp_path / "a_file").write_text("")
    return tmp_path / "a_file" / "out"


OUTPUT_COMMANDS = {
    "fit": lambda out, corpus, wav: ["fit", *tiny_args(corpus, out)],
    "cv": lambda out, corpus, wav: ["cv", f"--out={out}", *tiny_args(corpus, out.parent / "logs")],
    "tune": lambda out, corpus, wav: ["tune", f"--space={wav}", f"--out={out}", *tiny_args(corpus, out.parent / "logs")],
    "predict": lambda out, corpus, wav: ["predict", f"--ckpt_path={wav}", f"--output={out / 'p.csv'}", wav],
    "export": lambda out, corpus, wav: ["export", f"--ckpt_path={wav}", str(out / "m.onnx")],
}


@pytest.mark.parametrize("readonly", [False, True], ids=["below-a-file", "chmod-read-only"])
@pytest.mark.parametrize("command", sorted(OUTPUT_COMMANDS))
def test_an_unwritable_output_folder_fails_before_any_work_naming_it(command, readonly, tiny_corpus, tmp_path, capsys):
    if readonly:
        if AS_ROOT:
            pytest.skip("running as root: chmod does not stop root from writing (the below-a-file case still runs)")
        out = tmp_path / "read_only"
        out.mkdir()
        out.chmod(0o500)
    else:
        out = not_a_folder(tmp_path)
    wav = str(next(tiny_corpus.rglob("*.wav")))  # also a bad --space and checkpoint: the output check comes first
    status, err = failing_command(OUTPUT_COMMANDS[command](out, tiny_corpus, wav), capsys)
    reason = f"permission denied: {out}" if readonly else f"{out.parent} is a file, not a folder"
    assert status == 1 and err.count("\n") == 1 and f"cannot write there: {reason}" in err, err


def fake_fsync_enospc(fd: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_a_full_disk_leaves_the_old_result_file_and_says_so_in_one_line(suffix, tmp_path, monkeypatch):
    from ser_lightning.inference.commands import FileResult, write_results

    output = tmp_path / f"results{suffix}"
    output.write_text("the old results\n")
    monkeypatch.setattr("ser_lightning.outputs.os.fsync", fake_fsync_enospc)
    with pytest.raises(OutputError) as error:
        write_results([FileResult("a.wav", error="a.wav: broken")], output, list(TINY_EMOTIONS))
    assert describe(error.value) == (1, f"no space left on device: {output}")
    assert output.read_text() == "the old results\n" and sorted(tmp_path.iterdir()) == [output]


def test_cv_report_on_a_full_disk_keeps_the_old_report(tmp_path, monkeypatch, capsys):
    from test_cv import fake_result, write_results

    write_results(tmp_path, [fake_result(0, 0.8, 0.7), fake_result(1, 0.6, 0.65)])
    cli.main(["cv-report", str(tmp_path)])
    before = {path.name: path.read_bytes() for path in tmp_path.glob("cv_report.*")}
    monkeypatch.setattr("ser_lightning.outputs.os.fsync", fake_fsync_enospc)
    status, err = failing_command(["cv-report", str(tmp_path)], capsys)
    report = tmp_path / "cv_report.json"
    assert (status, err) == (1, f"error: no space left on device: {report}\n")
    assert {path.name: path.read_bytes() for path in tmp_path.glob("cv_report.*")} == before
    assert not list(tmp_path.glob(".*tmp*"))


def test_the_feature_cache_on_a_full_disk_says_no_space_left_naming_the_folder(tmp_path, monkeypatch):
    """torch.save reports the failed write as "enforce fail at inline_container.cc"; the reason is in its chain."""
    from ser_lightning.data import cache as cache_module

    real_fdopen = os.fdopen

    class FullDisk:
        """The file's first 64 bytes fit on the disk; then every write fails."""

        def __init__(self, fd: int, mode: str) -> None:
            self.handle, self.written = real_fdopen(fd, mode), 0

        def write(self, data) -> int:
            self.written += len(data)
            if self.written > 64:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.handle.close()

    source = tmp_path / "a.wav"
    source.write_bytes(b"x")
    cache = cache_module.FeatureCache(tmp_path / "cache", "key")
    monkeypatch.setattr(cache_module.os, "fdopen", FullDisk)
    with pytest.raises(OutputError) as error:
        cache.store(source, torch.ones(3, 4))
    assert "inline_container" in str(error.value.__cause__)  # the probe's failure, reproduced
    assert describe(error.value) == (1, f"feature cache (data.cache_dir): no space left on device: {cache.dir}")
    assert not list(cache.dir.iterdir())  # no temporary file left behind


# ----------------------------------------------------------------------------- numbers that make no sense
def test_a_run_that_never_trained_is_an_error_not_a_result(tiny_corpus, feature_cache, tmp_path):
    from ser_lightning.parser import build_cli
    from ser_lightning.run.training import fit_and_test

    built = build_cli(tiny_args(tiny_corpus, tmp_path, cache=feature_cache))
    built.trainer.fit_loop.max_epochs = 0  # as if the configuration check had been bypassed
    with pytest.raises(DataError, match=r"the run never trained \(no optimizer step in 0 epoch\(s\)\)"):
        fit_and_test(built.trainer, built.model, built.datamodule)


def test_a_diverged_run_stops_with_one_line_and_draws_no_figure(tiny_corpus, feature_cache, tmp_path, capsys):
    """--model.lr 1e6: the loss is NaN within the first epoch; figures are on (every epoch) in tiny.yaml."""
    status, err = failing_command(["fit", *tiny_args(tiny_corpus, tmp_path, "--model.lr=1e6", "--trainer.max_epochs=2",
                                                     cache=feature_cache)], capsys)
    assert (status, err) == (1, "error: training diverged (loss is NaN at epoch 0); lower model.lr (now 1000000.0) "
                                "or check the input features\n")
    assert not list(tmp_path.rglob("*.ckpt"))


def test_non_finite_model_outputs_are_an_error_naming_the_waveform():
    from ser_lightning.data.audio import AudioError
    from ser_lightning.data.features import FeatureConfig
    from ser_lightning.inference.recognizer import EmotionRecognizer
    from ser_lightning.models.module import SERModule

    torch.manual_seed(0)
    feature = FeatureConfig()
    module = SERModule(num_features=feature.num_features, class_names=list(TINY_EMOTIONS))
    recognizer = EmotionRecognizer(module, feature)
    speech = 0.1 * torch.randn(16000)
    assert recognizer.predict_batch([speech], 16000)[0].label in TINY_EMOTIONS
    with pytest.raises(AudioError, match=r"^waveform 1: the model's output is not finite .* peak at 1e\+20"):
        recognizer.predict_batch([speech, torch.full((16000,), 1e20)], 16000)


# ----------------------------------------------------------------------------- files
def test_a_wav_given_as_a_checkpoint_is_named_as_such(tiny_corpus):
    from ser_lightning.checkpoints import CheckpointError, read_checkpoint

    wav = next(tiny_corpus.rglob("*.wav"))
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(wav)
    assert str(error.value) == f"checkpoint {wav}: not a checkpoint written by fit or cv (it is a WAV audio file)"


@pytest.mark.parametrize("case", ["folder", "permission"])
def test_an_unreadable_audio_file_gives_the_systems_reason(case, tiny_corpus, tmp_path, monkeypatch):
    """libsndfile says only "System error." for a file it cannot open; the message gives the system's reason."""
    from ser_lightning.data import audio

    if case == "folder":
        path, reason = tmp_path / "x.wav", "is a directory"
        path.mkdir()
    else:  # a mocked EACCES: chmod does not stop root
        path, reason = next(tiny_corpus.rglob("*.wav")), "permission denied"

        def denied(*args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

        def libsndfile(*args, **kwargs):
            raise audio.sf.LibsndfileError(2, prefix=f"Error opening {str(path)!r}: ")  # 2: "System error."

        monkeypatch.setattr(audio, "open", denied, raising=False)
        monkeypatch.setattr(audio.sf, "read", libsndfile)
        monkeypatch.setattr(audio.sf, "info", libsndfile)
    for read in (lambda: audio.load_audio(path, 16000), lambda: audio.audio_duration(path)):
        with pytest.raises(audio.AudioError) as error:
            read()
        assert str(error.value) == f"{path}: cannot be read ({reason})"


def test_a_tampered_study_database_is_named(tiny_corpus, tmp_path, capsys, lightning_lines):
    out = tmp_path / "tune"
    database = out / "outer_fold_0" / "study.db"
    database.parent.mkdir(parents=True)
    database.write_bytes(b"not a database, but long enough to look like a file header " * 4)
    space = tmp_path / "space.yaml"
    space.write_text("model.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    status, err = failing_command(["tune", f"--space={space}", f"--out={out}", "--only=0", "--trials=1",
                                   *tiny_args(tiny_corpus, tmp_path / "logs")], capsys)
    assert status == 1 and err.startswith(f"error: {database}: cannot be opened as an Optuna study database (file is "
                                          "not a database)") and err.count("\n") == 1, err


# ----------------------------------------------------------------------------- synth
def test_an_interrupted_synth_leaves_no_corpus_and_no_temporary_folder(tmp_path, monkeypatch, capsys):
    from ser_lightning.data import synth

    written = []

    def interrupted(*args, **kwargs):
        written.append(args)
        if len(written) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = synth.sf.write
    monkeypatch.setattr(synth.sf, "write", interrupted)
    status, err = failing_command(["synth", str(tmp_path / "corpus"), "--actors=1"], capsys)
    assert (status, err) == (130, "error: interrupted\n") and len(written) == 3
    assert list(tmp_path.iterdir()) == []


def test_a_temporary_folder_of_a_killed_writer_is_removed_by_the_next_one(tmp_path):
    from ser_lightning.data.synth import _temporary_prefix, write_complete

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)  # a process of this machine that no longer runs
    target = tmp_path / "corpus"
    abandoned = tmp_path / f"{_temporary_prefix(target)}{dead}-0123abcd"
    live = tmp_path / f"{_temporary_prefix(target)}{os.getpid()}-0123abcd"  # a writer still at work: kept
    for folder in (abandoned, live):
        (folder / "Actor_01").mkdir(parents=True)
    assert write_complete(target, lambda folder: (folder / "Actor_01").mkdir(parents=True))
    assert sorted(tmp_path.iterdir()) == sorted([target, live]) and (target / "Actor_01").is_dir()
