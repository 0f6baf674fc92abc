"""RAVDESS name parsing, folder scanning and emotion selection."""
from __future__ import annotations

import pytest

from ser_lightning.data.corpora import scan_corpus
from ser_lightning.data.ravdess import parse_ravdess_name, scan_ravdess
from ser_lightning.data.records import (
    APPLEDOUBLE, DEFAULT_EMOTIONS, EMOTIONS, HIDDEN, MALFORMED, CorpusError, resolve_emotions,
)


def test_parse_valid_name():
    name = parse_ravdess_name("Actor_12/03-01-05-02-01-02-12.wav")
    assert name.modality == "audio-only"
    assert name.vocal_channel == "speech"
    assert name.emotion == "angry"
    assert name.intensity == "strong"
    assert (name.statement, name.repetition, name.actor) == (1, 2, 12)
    assert name.sex == "female" and name.speaker == "12"
    assert parse_ravdess_name("03-02-08-01-02-01-07.flac").sex == "male"


@pytest.mark.parametrize(
    "filename",
    ["03-01-05-02-01-12.wav", "03-01-05-02-01-01-12-1.wav", "03-01-5-02-01-01-12.wav", "03-01-xx-02-01-01-12.wav",
     "recording.wav", "03_01_05_02_01_01_12.wav"],
)
def test_parse_malformed_name_names_the_file(filename):
    with pytest.raises(CorpusError, match=filename.replace(".", r"\.")):
        parse_ravdess_name(filename)


@pytest.mark.parametrize(
    "filename, what",
    [("03-01-09-01-01-01-01.wav", "emotion"), ("04-01-01-01-01-01-01.wav", "modality"),
     ("03-03-01-01-01-01-01.wav", "vocal channel"), ("03-01-03-03-01-01-01.wav", "intensity"),
     ("03-01-03-01-03-01-01.wav", "statement"), ("03-01-03-01-01-00-01.wav", "repetition"),
     ("03-01-03-01-01-01-00.wav", "actor"), ("03-01-01-02-01-01-01.wav", "neutral")],
)
def test_parse_unknown_codes(filename, what):
    with pytest.raises(CorpusError, match=what) as info:
        parse_ravdess_name(filename)
    assert filename in str(info.value)


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"RIFF")  # scanning never decodes
    return path


@pytest.fixture
def messy_tree(tmp_path):
    root = tmp_path / "Audio_Speech_Actors_01-24"
    speech = [
        _touch(root / "Actor_01" / "03-01-01-01-01-01-01.wav"),
        _touch(root / "Actor_01" / "03-01-05-02-02-01-01.wav"),
        _touch(root / "deeper" / "Actor_02" / "03-01-04-01-01-02-02.WAV"),
        _touch(root / "Actor_02" / "03-01-02-01-01-01-02.wav"),  # calm: not in the default selection
    ]
    song = _touch(tmp_path / "Audio_Song_Actors_01-24" / "Actor_01" / "03-02-03-01-01-01-01.wav")
    for stray in ("Actor_01/notes.txt", ".DS_Store", "Actor_02/labels.csv", "Actor_01/._03-01-01-01-01-01-01.wav"):
        _touch(root / stray)
    return tmp_path, speech, song


def test_scan_keeps_speech_of_selected_emotions_and_lists_everything_else(messy_tree):
    root, speech, song = messy_tree
    result = scan_ravdess(root, DEFAULT_EMOTIONS)
    paths = {u.path for u in result.utterances}
    assert paths == {speech[0].resolve(), speech[1].resolve(), speech[2].resolve()}
    assert song.resolve() not in paths
    assert [str(u.path) for u in result.utterances] == sorted(str(u.path) for u in result.utterances)
    by_name = {u.path.name: u for u in result.utterances}
    angry = by_name["03-01-05-02-02-01-01.wav"]
    assert (angry.emotion, angry.speaker, angry.sex, angry.corpus) == ("angry", "01", "male", "ravdess")
    assert angry.fields["intensity"] == "strong" and angry.fields["statement"] == 2
    listed = [(path, kind, "song file" in reason) for path, reason, kind in result.skipped]  # listed, not hidden
    speech_root = root / "Audio_Speech_Actors_01-24"
    assert sorted(listed) == sorted([(song, "RAVDESS song file", True), (speech_root / ".DS_Store", HIDDEN, False),
                             (speech_root / "Actor_01" / "._03-01-01-01-01-01-01.wav", APPLEDOUBLE, False)])
    assert sorted(p.name for p in result.ignored) == ["labels.csv", "notes.txt"]  # non-audio files, listed


def test_scan_song_channel_and_all_emotions(messy_tree):
    root, speech, song = messy_tree
    assert [u.path for u in scan_ravdess(root, EMOTIONS, vocal_channel="song").utterances] == [song.resolve()]
    assert len(scan_ravdess(root, EMOTIONS).utterances) == 4


def test_scan_malformed_name_is_an_error_or_skipped_when_lenient(messy_tree):
    root, _, _ = messy_tree
    bad = _touch(root / "Audio_Speech_Actors_01-24" / "Actor_03" / "03-01-09-01-01-01-03.wav")
    with pytest.raises(CorpusError, match="03-01-09-01-01-01-03.wav"):
        scan_ravdess(root, DEFAULT_EMOTIONS)
    result = scan_corpus("ravdess", root, DEFAULT_EMOTIONS, lenient=True)
    assert len(result.utterances) == 3
    malformed = [(path, reason) for path, reason, kind in result.skipped if kind == MALFORMED]
    assert [path for path, _ in malformed] == [bad] and "emotion" in malformed[0][1]


def test_empty_selection_says_what_and_where(tmp_path):
    _touch(tmp_path / "Actor_01" / "03-01-02-01-01-01-01.wav")  # calm only
    with pytest.raises(CorpusError, match=r"no RAVDESS speech files.*'angry'.*" + str(tmp_path)):
        scan_ravdess(tmp_path, DEFAULT_EMOTIONS)
    with pytest.raises(CorpusError, match="not a folder"):
        scan_ravdess(tmp_path / "missing", DEFAULT_EMOTIONS)


def test_unknown_corpus():
    with pytest.raises(ValueError, match="data.corpus"):
        scan_corpus("iemocap", ".", DEFAULT_EMOTIONS)


def test_resolve_emotions():
    assert resolve_emotions("default") == DEFAULT_EMOTIONS
    assert resolve_emotions("all") == EMOTIONS
    assert resolve_emotions(["Sad", "angry"]) == ("sad", "angry")
    assert resolve_emotions("angry, happy") == ("happy", "angry")  # vocabulary order
    with pytest.raises(ValueError, match=r"data.emotions.*'joy'.*neutral"):
        resolve_emotions(["joy", "sad"])
    with pytest.raises(ValueError, match="two different"):
        resolve_emotions(["sad"])
