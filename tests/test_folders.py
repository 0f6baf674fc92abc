"""Which files a corpus uses: folder links followed, every unused file counted by reason, listed paths confined."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from conftest import TINY_EMOTIONS, tiny_args

from ser_lightning.cli import main
from ser_lightning.data.corpora import scan_corpus
from ser_lightning.data.datamodule import SERDataModule
from ser_lightning.data.records import (
    APPLEDOUBLE, DANGLING_LINK, DUPLICATE, HIDDEN, LINK_LOOP, NOT_A_FILE, OUTSIDE_ROOT, UNREADABLE, CorpusError,
    walk_folder,
)
from ser_lightning.data.synth import synthesize_corpus


# ----------------------------------------------------------------------------- folders
def test_a_speaker_folder_that_is_a_link_is_planned(tmp_path, feature_cache, caplog):
    """The probe: synth 10 actors, move Actor_02 out, link it back; `fit` plans 10 speakers, not 9."""
    emotions = ("neutral", "angry")
    synthesize_corpus(tmp_path / "L", actors=10, emotions=emotions, sample_rate=16000)
    (tmp_path / "st").mkdir()
    shutil.move(tmp_path / "L" / "Actor_02", tmp_path / "st" / "Actor_02")
    (tmp_path / "L" / "Actor_02").symlink_to(Path("..") / "st" / "Actor_02")
    caplog.set_level(logging.INFO)
    main(["fit", *tiny_args(tmp_path / "L", tmp_path, "--trainer.fast_dev_run=true", "--data.emotions=neutral,angry",
                            cache=feature_cache)])
    planned = [line for line in caplog.text.splitlines() if line.startswith(("train ", "val ", "test "))]
    speakers = sorted(s for line in planned for s in line.split(":", 1)[1].split())
    assert speakers == [f"{actor:02d}" for actor in range(1, 11)], planned


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory) -> Path:
    """One usable file and one file or link of every kind that cannot be used."""
    root = tmp_path_factory.mktemp("messy") / "corpus"
    (root / "a").mkdir(parents=True)
    (root / "a" / "good.wav").write_bytes(b"RIFF")
    (root / "a" / "notes.txt").write_text("not audio")
    (root / "a" / "._good.wav").write_bytes(b"\x00\x05\x16\x07")
    (root / "a" / ".DS_Store").write_bytes(b"")
    (root / "a" / "locked.wav").write_bytes(b"RIFF")
    (root / "a" / "gone.wav").symlink_to("missing.wav")
    (root / "a" / "self.wav").symlink_to("self.wav")
    (root / "a" / "up").symlink_to("..")
    (root / "0again").symlink_to("a")  # links that sort before what they point to: still the duplicates
    (root / "0good.wav").symlink_to(Path("a") / "good.wav")
    os.mkfifo(root / "a" / "pipe.wav")
    return root


@pytest.fixture
def unreadable_locked(monkeypatch):
    """``locked.wav`` refuses to open as for a user without read permission (the tests may run as root)."""
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if Path(path).name == "locked.wav":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)


@pytest.mark.parametrize("name, kind, words", [
    ("a/._good.wav", APPLEDOUBLE, "AppleDouble"),
    ("a/.DS_Store", HIDDEN, "hidden"),
    ("a/gone.wav", DANGLING_LINK, "'missing.wav', which does not exist"),
    ("a/self.wav", LINK_LOOP, "leads back to itself"),
    ("a/up", LINK_LOOP, "a folder it lies in (a loop: not followed)"),
    ("0again", DUPLICATE, "the same folder as"),
    ("0good.wav", DUPLICATE, "the same file as"),
    ("a/locked.wav", UNREADABLE, "Permission denied"),
    ("a/pipe.wav", NOT_A_FILE, "not a regular file"),
])
def test_every_file_a_folder_walk_cannot_use_is_listed_once_with_its_reason(messy_folder, unreadable_locked, name,
                                                                         kind, words):
    listing = walk_folder(messy_folder)
    assert listing.audio == [messy_folder / "a" / "good.wav"] and listing.other == [messy_folder / "a" / "notes.txt"]
    entries = [entry for entry in listing.unused if entry.path == messy_folder / name]
    assert len(entries) == 1 and entries[0].kind == kind and words in entries[0].reason, listing.unused
    assert str(messy_folder / name) in entries[0].reason
    assert len(listing.unused) == 9  # the loop and the duplicate folder are reported once, not walked into


def test_corpus_scan_and_datamodule_summary_count_unused_files_by_reason(tiny_corpus, tmp_path, feature_cache):
    root = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, root, symlinks=True)
    (root / "Actor_01" / "._03-01-01-01-01-01-01.wav").write_bytes(b"\x00\x05\x16\x07")
    (root / "Actor_01" / "stale.wav").symlink_to("nowhere.wav")
    (root / "Actor_01" / "loop").symlink_to("..")
    dm = SERDataModule(root=str(root), num_folds=3, num_val_speakers=1, cache_dir=str(feature_cache))
    with pytest.warns(UserWarning) as warned:
        dm.setup()
    message = str(warned[0].message)
    assert message.startswith("data: skipped 3 file(s) and ignored 0 non-audio file(s) (168 used)")
    for line in (f"1 {APPLEDOUBLE}:", f"1 {DANGLING_LINK}:", f"1 {LINK_LOOP}:"):
        assert f"\n  {line}\n" in message + "\n", message
    assert {entry.kind for entry in dm.skipped} == {APPLEDOUBLE, DANGLING_LINK, LINK_LOOP}


# ----------------------------------------------------------------------------- listed paths confined to the root
def manifest_with_outside_rows(base: Path, elsewhere: Path) -> tuple[Path, list[str]]:
    """A manifest in base/corpus listing its own file plus three outside it; returns it and the outside entries."""
    (base / "corpus").mkdir()
    shutil.copy(elsewhere, base / "corpus" / "own.wav")
    outside = ["../../../../../../../../etc/passwd", "/proc/self/environ", str(elsewhere)]
    rows = ["path,label,speaker", "own.wav,sad,s1", *(f"{entry},happy,s2" for entry in outside)]
    (base / "corpus" / "manifest.csv").write_text("\n".join(rows) + "\n")
    return base / "corpus" / "manifest.csv", outside


def emobox_with_outside_records(base: Path, elsewhere: Path) -> tuple[Path, list[str]]:
    """An EmoBox folder (base/EmoBox/data/mini) listing its own file plus three outside the EmoBox folder."""
    root = base / "EmoBox" / "data" / "mini"
    (base / "EmoBox" / "downloads").mkdir(parents=True)
    shutil.copy(elsewhere, base / "EmoBox" / "downloads" / "own.wav")
    outside = ["../../../../../../../../etc/passwd", "/proc/self/environ", str(elsewhere)]
    records = [{"key": "own", "wav": "downloads/own.wav", "emo": "Sad", "speaker": "s1"}]
    records += [{"key": f"out{k}", "wav": entry, "emo": "Happy", "speaker": "s2"} for k, entry in enumerate(outside)]
    (root / "fold_1").mkdir(parents=True)
    for split, chosen in (("train", records[1:]), ("test", records[:1])):
        (root / "fold_1" / f"mini_{split}_fold_1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen))
    return root, outside


@pytest.mark.parametrize("corpus, write", [("manifest", manifest_with_outside_rows),
                                           ("emobox", emobox_with_outside_records)])
def test_listed_paths_outside_the_corpus_root_are_refused_unopened_unless_allowed(corpus, write, tiny_corpus, tmp_path,
                                                                               monkeypatch):
    elsewhere = shutil.copy(sorted(tiny_corpus.rglob("*.wav"))[0], tmp_path / "elsewhere.wav")
    root, outside = write(tmp_path, Path(elsewhere))
    looked_at = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda path, *a, **k: looked_at.append(str(path)) or real_stat(path, *a, **k))
    with pytest.raises(CorpusError) as error:
        scan_corpus(corpus, root, TINY_EMOTIONS)
    message = str(error.value)
    assert "3 bad r" in message and message.count("data.allow_outside_root=true") == 3
    for entry in outside:
        assert f"'{entry}' is outside the" in message
    assert not [path for path in looked_at if path.startswith(("/etc", "/proc")) or path == str(elsewhere)]
    monkeypatch.undo()

    lenient = scan_corpus(corpus, root, TINY_EMOTIONS, lenient=True)
    assert [u.path.name for u in lenient.utterances] == ["own.wav"]
    assert [entry.kind for entry in lenient.skipped] == [OUTSIDE_ROOT] * 3
    allowed = scan_corpus(corpus, root, TINY_EMOTIONS, lenient=True, allow_outside_root=True)
    assert {"elsewhere.wav", "own.wav"} <= {u.path.name for u in allowed.utterances}  # used, as asked


def test_the_datamodule_option_lets_a_manifest_use_audio_outside_its_folder(tmp_path, feature_cache):
    synthesize_corpus(tmp_path / "corpus", layout="manifest", actors=4, emotions=("neutral", "angry"))
    rows = (tmp_path / "corpus" / "manifest.csv").read_text().splitlines()
    (tmp_path / "lists").mkdir()
    moved = tmp_path / "lists" / "manifest.csv"  # the same rows, now reaching the audio through '..'
    moved.write_text("\n".join([rows[0], *(f"../corpus/{row}" for row in rows[1:])]) + "\n")
    options = {"root": str(moved), "corpus": "manifest", "emotions": "neutral,angry", "num_folds": 2,
               "num_val_speakers": 1, "cache_dir": str(feature_cache)}
    with pytest.raises(CorpusError, match=r"(?s)24 bad row\(s\).*line 2: path '../corpus/audio/spk01/"):
        SERDataModule(**options).setup()
    dm = SERDataModule(**options, allow_outside_root=True)
    dm.setup()
    assert len(dm.utterances) == 24
