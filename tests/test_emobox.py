"""EmoBox data folders: manifests, label maps, speakers, the benchmark's folds as given, shared-speaker reports."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY_EMOTIONS

from ser_lightning.data.corpora import corpus_classes, scan_corpus
from ser_lightning.data.datamodule import SERDataModule
from ser_lightning.data.emobox import SPLIT_FIELD
from ser_lightning.data.folds import format_fold_plan
from ser_lightning.data.records import CorpusError

LABELS = {"neutral": "Neutral", "happy": "Happy", "sad": "Sad", "angry": "Angry"}
FOLD_TESTS = ({"01", "02"}, {"03", "04", "05"})
"""Test actors per fold; fold_2 tests only half of actor 05's files and trains on the other half."""


def emobox_records(tiny_corpus: Path) -> list[tuple[dict, Path]]:
    """Two files per actor and emotion of the tiny corpus, as EmoBox lines (speakers only in the file names)."""
    records = []
    for source in sorted(tiny_corpus.rglob("*.wav")):
        fields = source.stem.split("-")  # MM-VV-EE-II-SS-RR-AA
        emotion = {"01": "neutral", "03": "happy", "04": "sad", "05": "angry"}[fields[2]]
        if fields[3] == "01" and fields[5] == "01":  # normal intensity, first repetition: two statements
            wav = f"downloads/mini/Actor_{fields[6]}/{source.name}"
            records.append(({"key": f"mini-{source.stem}", "dataset": "mini", "wav": wav, "type": "raw",
                             "sample_rate": 16000, "task": "category", "emo": LABELS[emotion], "channel": 1}, source))
    return records


def split_of(record: dict, fold: int) -> str:
    actor, statement = record["key"][-2:], record["key"].split("-")[5]
    if fold == 1 and actor == "05":
        return "test" if statement == "01" else "train"
    return "test" if actor in FOLD_TESTS[fold] else "train"


def write_emobox(base: Path, tiny_corpus: Path, *, label_map: dict | None = None, extra: list[dict] = ()) -> Path:
    """``base/downloads/mini/...`` audio and ``base/data/mini`` (two folds, a label map); returns the dataset folder."""
    root = base / "data" / "mini"
    records = emobox_records(tiny_corpus)
    for record, source in records:
        target = base / record["wav"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    for fold in range(len(FOLD_TESTS)):
        folder = root / f"fold_{fold + 1}"
        folder.mkdir(parents=True)
        for split in ("train", "test"):
            lines = [json.dumps(r) for r, _ in records if split_of(r, fold) == split]
            lines += [json.dumps(r) for r in extra if split == "train"]
            (folder / f"mini_{split}_fold_{fold + 1}.jsonl").write_text("\n".join(lines) + "\n")
    mapping = {name: name for name in LABELS.values()} if label_map is None else label_map
    (root / "label_map.json").write_text(json.dumps(mapping))
    return root


@pytest.fixture(scope="module")
def emobox_root(tiny_corpus, tmp_path_factory) -> Path:
    return write_emobox(tmp_path_factory.mktemp("emobox"), tiny_corpus)


def make_dm(root: Path, cache: Path, **options) -> SERDataModule:
    args = {"root": str(root), "corpus": "emobox", "protocol": "emobox", "num_folds": 2, "num_val_speakers": 1,
            "batch_size": 8, "cache_dir": str(cache)}
    return SERDataModule(**(args | options))


def test_records_labels_speakers_and_folds_are_read(emobox_root):
    utterances = scan_corpus("emobox", emobox_root, TINY_EMOTIONS).utterances
    assert len(utterances) == 6 * 4 * 2 and all(u.path.is_file() for u in utterances)
    assert {u.speaker for u in utterances} == {f"{actor:02d}" for actor in range(1, 7)}  # from RAVDESS file names
    assert {u.sex for u in utterances if u.speaker == "01"} == {"male"}
    assert corpus_classes("emobox", emobox_root) == TINY_EMOTIONS
    for utterance in (u for u in utterances if u.speaker == "05"):  # fold_2 tests statement 1 of actor 05
        statement = utterance.path.stem.split("-")[4]
        assert utterance.fields[SPLIT_FIELD] == ("train", "test" if statement == "01" else "train")


@pytest.mark.parametrize("fold, test_speakers, shared", [(0, ["01", "02"], []), (1, ["03", "04", "05"], ["05"])])
def test_benchmark_folds_are_used_as_given_and_shared_speakers_reported(emobox_root, tmp_path, fold, test_speakers,
                                                                         shared):
    dm = make_dm(emobox_root, tmp_path, fold=fold)
    if shared:
        with pytest.warns(UserWarning, match=r"fold 1 \(emobox\) puts speaker\(s\) \['05'\] in both training and test"):
            dm.setup()
    else:
        dm.setup()
    plan = dm.fold_plan
    test_keys = {dm.utterances[i].fields["key"] for i in plan.test}
    assert test_keys == given_keys(emobox_root, fold, "test") and plan.test_speakers == test_speakers
    assert plan.shared_speakers == shared and plan.speaker_dependent == bool(shared)
    assert len(plan.val_speakers) == 1 and not set(plan.val_speakers) & set(plan.test_speakers)
    assert sorted(plan.train + plan.val + plan.test) == list(range(len(dm.utterances)))
    text = format_fold_plan(plan, dm.class_names)
    assert f"EmoBox fold_{fold + 1}" in text and ("SPEAKER-DEPENDENT: speaker(s) 05" in text) == bool(shared)


def given_keys(root: Path, fold: int, split: str) -> set[str]:
    """The keys the benchmark's file lists for ``split`` of ``fold`` (0-based)."""
    path = root / f"fold_{fold + 1}" / f"mini_{split}_fold_{fold + 1}.jsonl"
    return {json.loads(line)["key"] for line in path.read_text().splitlines() if line}


@pytest.mark.parametrize("change, message", [
    ({"label_map": {"Neutral": "Neutral", "Happy": "Joy!", "Sad": "Sad", "Angry": "Angry"}},
     r"fold_1.jsonl line \d+: label 'Happy' \(Joy!\) has no counterpart in the vocabulary"),
    ({"label_map": {"Neutral": "Neutral", "Sad": "Sad", "Angry": "Angry"}}, r"label 'Happy' is not in .*label_map.json"),
    ({"extra": [{"key": "lost", "wav": "downloads/mini/lost.wav", "emo": "Sad"}]},
     r"line \d+: audio file 'downloads/mini/lost.wav' not found"),
])
def test_bad_records_are_errors_naming_the_file_and_line(change, message, tiny_corpus, tmp_path):
    root = write_emobox(tmp_path, tiny_corpus, **change)
    with pytest.raises(CorpusError, match=message):
        scan_corpus("emobox", root, TINY_EMOTIONS)
    assert scan_corpus("emobox", root, TINY_EMOTIONS, lenient=True).skipped  # skipped and listed when lenient


def test_out_of_vocabulary_labels_are_skipped_and_speakers_come_from_the_stm_file(emobox_root, tiny_corpus, tmp_path):
    source = shutil.copy(next(emobox_root.parents[1].rglob("*.wav")), tmp_path / "guest.wav")
    extra = [{"key": "bored-1", "wav": str(source), "emo": "Bored"}, {"key": "spk-x", "wav": str(source), "emo": "Sad"}]
    labels = {name: name for name in LABELS.values()} | {"Bored": "Boredom"}
    root = write_emobox(tmp_path, tiny_corpus, label_map=labels, extra=extra)
    with pytest.raises(CorpusError, match="no speaker for 'spk-x'"):  # not a RAVDESS name, no speaker field
        scan_corpus("emobox", root, TINY_EMOTIONS)
    (root / "data.seg.wrd.stm").write_text("spk-x 1 guest 0 3.2 <id=spk-x,lang=en,spk=guest,emotion=Sad> Sad\n")
    result = scan_corpus("emobox", root, TINY_EMOTIONS)
    assert len(result.skipped) == 1 and "label 'Bored' is not in the vocabulary" in result.skipped[0][1]
    assert {u.speaker for u in result.utterances if u.fields["key"] == "spk-x"} == {"guest"}


@pytest.mark.parametrize("options, message", [
    ({"num_folds": 3}, r"data.num_folds=3 but the EmoBox folder .* has 2 folds"),
    ({"corpus": "ravdess"}, "data.protocol=emobox takes the folds of an EmoBox data folder: set data.corpus=emobox"),
    ({"protocol": "emobox_ravdess"}, "set data.corpus=ravdess"),
])
def test_protocol_options_are_checked_before_loading(options, message, emobox_root, tmp_path):
    with pytest.raises(ValueError, match=message):
        make_dm(emobox_root, tmp_path, **options)
