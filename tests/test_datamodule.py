"""SERDataModule: setup, batches, cache reuse and recovery, options, lenient loading."""
from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from ser_lightning.data import loading as loading_module
from ser_lightning.data.batches import BucketBatchSampler, collate_utterances
from ser_lightning.data.datamodule import SERDataModule
from ser_lightning.data.features import FeatureConfig, SpecAugmentConfig
from ser_lightning.normalization import feature_stats


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """A feature cache shared by the tests that do not test the cache itself."""
    return tmp_path_factory.mktemp("shared_cache")


def copy_corpus(source, dest, actors=3):
    """A private copy of the first ``actors`` actors of a corpus (for tests that modify files)."""
    for k in range(1, actors + 1):
        shutil.copytree(source / f"Actor_{k:02d}", dest / f"Actor_{k:02d}")
    return dest


def make_dm(root, cache_dir, **kwargs) -> SERDataModule:
    args = {"num_folds": 3, "fold": 0, "num_val_speakers": 1, "batch_size": 8} | kwargs
    dm = SERDataModule(root=str(root), cache_dir=str(cache_dir), **args)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_collate_pads_and_reports_lengths():
    items = [{"features": torch.ones(3, n), "label": k, "index": 10 + k, "speaker_stats": torch.full((2, 3), k)}
             for k, n in enumerate([4, 7, 1])]
    batch = collate_utterances(items)
    assert batch["features"].shape == (3, 3, 7) and batch["features"].dtype == torch.float32
    assert batch["lengths"].tolist() == [4, 7, 1] and batch["lengths"].dtype == torch.int64
    assert batch["labels"].tolist() == [0, 1, 2] and batch["index"].tolist() == [10, 11, 12]
    assert batch["speaker_stats"].shape == (3, 2, 3) and batch["speaker_stats"][:, 0, 0].tolist() == [0, 1, 2]
    for b, n in enumerate([4, 7, 1]):
        assert (batch["features"][b, :, :n] == 1).all() and (batch["features"][b, :, n:] == 0).all()
    assert "speaker_stats" not in collate_utterances([{k: v for k, v in items[0].items() if k != "speaker_stats"}])


@pytest.mark.parametrize("drop_last", [False, True])
def test_bucket_sampler_groups_similar_lengths(drop_last):
    lengths = list(range(95))
    generator = torch.Generator().manual_seed(0)
    sampler = BucketBatchSampler(torch.utils.data.RandomSampler(lengths, generator=generator), 10, drop_last,
                                 lengths=lengths, pool_batches=10, generator=generator)
    batches = list(sampler)
    assert len(batches) == len(sampler) == (9 if drop_last else 10)
    taken = sorted(i for b in batches for i in b)
    assert taken == lengths if not drop_last else len(taken) == 90
    assert all(max(b) - min(b) <= 10 for b in batches if len(b) == 10)  # one pool: consecutive lengths
    assert batches != list(sampler)  # a new order every epoch


def test_setup_batches_and_statistics(tiny_corpus, shared_cache):
    dm = make_dm(tiny_corpus, shared_cache)
    assert dm.class_names == ["neutral", "happy", "sad", "angry"] and dm.num_classes == 4
    assert dm.num_features == 64 and len(dm.utterances) == 6 * 28
    plan = dm.fold_plan
    assert len(plan.test_speakers) == 2 and len(plan.val_speakers) == 1 and len(plan.train_speakers) == 3
    assert dm.class_counts("train").tolist() == [12, 24, 24, 24]
    assert dm.class_counts("test").tolist() == [8, 16, 16, 16]
    mean, std = dm.feature_stats
    expected_mean, expected_std = feature_stats([dm.features[i] for i in plan.train])
    assert torch.equal(mean, expected_mean) and torch.equal(std, expected_std)
    all_mean, _ = feature_stats(dm.features)
    assert not torch.allclose(mean, all_mean)  # statistics come from the training split only

    seen = []
    for batch in dm.train_dataloader():
        assert batch["features"].shape[:2] == (batch["labels"].shape[0], 64)
        assert batch["features"].shape[2] == batch["lengths"].max()
        for b, i in enumerate(batch["index"].tolist()):
            n = dm.features[i].shape[1]
            assert batch["lengths"][b] == n and batch["labels"][b] == dm.labels[i]
            assert torch.equal(batch["features"][b, :, :n], dm.features[i])
            assert (batch["features"][b, :, n:] == 0).all()
        seen += batch["index"].tolist()
    assert sorted(seen) == plan.train
    order = lambda module: [i for b in module.train_dataloader() for i in b["index"].tolist()]  # noqa: E731
    assert order(make_dm(tiny_corpus, shared_cache)) == seen  # seeded shuffling: the same seed, the same order
    assert order(dm) != seen  # a loader built again (the next epoch's, a resumed run's) goes on, not back
    assert sorted(i for b in dm.test_dataloader() for i in b["index"].tolist()) == plan.test
    assert [b["index"].tolist() for b in dm.predict_dataloader()] == [b["index"].tolist() for b in dm.test_dataloader()]
    assert sorted(i for b in dm.val_dataloader() for i in b["index"].tolist()) == plan.val


@pytest.mark.parametrize("eval_batch_size, expected", [(None, 16), (5, 5)])
@pytest.mark.parametrize("split", ["val", "test"])
def test_evaluation_batches_go_longest_first_at_the_evaluation_batch_size(tiny_corpus, shared_cache, split,
                                                                          eval_batch_size, expected):
    dm = make_dm(tiny_corpus, shared_cache, eval_batch_size=eval_batch_size)  # batch_size 8
    batches = list(getattr(dm, f"{split}_dataloader")())
    assert [len(b["index"]) for b in batches[:-1]] == [expected] * (len(batches) - 1)
    assert 1 <= len(batches[-1]["index"]) <= expected
    lengths = [n for b in batches for n in b["lengths"].tolist()]
    assert lengths == sorted(lengths, reverse=True) and len(set(lengths)) > 1
    assert sorted(i for b in batches for i in b["index"].tolist()) == getattr(dm.fold_plan, split)


def test_second_setup_uses_the_cache_without_decoding(tiny_corpus, shared_cache, monkeypatch):
    first = make_dm(tiny_corpus, shared_cache)

    def no_decoding(*args, **kwargs):
        raise AssertionError("audio was decoded although the cache holds every file")

    monkeypatch.setattr(loading_module, "load_audio", no_decoding)
    second = make_dm(tiny_corpus, shared_cache)
    assert all(torch.equal(a, b) for a, b in zip(first.features, second.features))
    with pytest.raises(AssertionError, match="decoded"):  # another feature configuration is not cached
        make_dm(tiny_corpus, shared_cache, feature=FeatureConfig(n_mels=32))


def test_corrupt_and_stale_cache_entries_are_rebuilt(tiny_corpus, tmp_path, caplog):
    corpus = copy_corpus(tiny_corpus, tmp_path / "corpus")
    first = make_dm(corpus, tmp_path / "cache")
    entries = sorted((tmp_path / "cache" / "features").rglob("*.pt"))
    assert len(entries) == len(first.utterances)
    entries[0].write_bytes(b"garbage")
    entries[1].write_bytes(entries[1].read_bytes()[:100])  # truncated
    payload = torch.load(entries[2], weights_only=True)
    payload["features"][0, 0] = float("nan")
    torch.save(payload, entries[2])
    payload = torch.load(entries[3], weights_only=True)
    payload["features"] = payload["features"][:10]
    torch.save(payload, entries[3])
    payload = torch.load(entries[4], weights_only=True)
    payload["features"][0, 0] += 1.0  # finite, well-shaped, wrong: only the checksum tells
    torch.save(payload, entries[4])
    with caplog.at_level(logging.WARNING):
        second = make_dm(corpus, tmp_path / "cache")
    rebuilt = [r.message for r in caplog.records if "rebuilding cache entry" in r.message]
    assert len(rebuilt) == 5 and sum("checksum does not match" in message for message in rebuilt) == 2  # 2: the NaN too
    assert all(torch.equal(a, b) for a, b in zip(first.features, second.features))

    # a changed source file gets new features (its old entry is not used)
    changed = first.utterances[5].path
    sf.write(changed, np.zeros(8000, np.float32), 16000, subtype="PCM_16")
    third = make_dm(corpus, tmp_path / "cache")
    assert third.features[5].shape[1] == 51 and not torch.equal(third.features[5], first.features[5])


def test_crop_bucketing_and_augmentation(tiny_corpus, shared_cache):
    dm = make_dm(
        tiny_corpus, shared_cache, crop_seconds=1.0, bucketing=True,
        augment=SpecAugmentConfig(freq_mask_param=8, time_mask_param=10, num_masks=1),
    )
    train = next(iter(dm.train_dataloader()))
    assert train["features"].shape[2] == 100 and (train["lengths"] <= 100).all()
    test = next(iter(dm.test_dataloader()))
    assert test["features"].shape[2] == 100
    i = test["index"][0].item()
    full = dm.features[i]
    start = (full.shape[1] - 100) // 2
    assert torch.equal(test["features"][0], full[:, start : start + 100])  # centre crop, no augmentation


def test_options_are_validated_early(tmp_path):
    for kwargs, option in [
        ({"fold": 5}, "data.fold"), ({"num_folds": 1}, "data.num_folds"), ({"emotions": ["joy"]}, "data.emotions"),
        ({"protocol": "loso"}, "data.protocol"), ({"normalization": "batch"}, "data.normalization"),
        ({"batch_size": 0}, "data.batch_size"), ({"eval_batch_size": 0}, "data.eval_batch_size"),
        ({"crop_seconds": 0.0}, "data.crop_seconds"),
        ({"corpus": "iemocap"}, "data.corpus"), ({"root": str(tmp_path / "missing")}, "data.root"),
    ]:
        with pytest.raises(ValueError, match=option):
            SERDataModule(**kwargs)
    dm = SERDataModule(emotions="all", feature=FeatureConfig(name="spectrogram"))
    assert dm.num_features == 200 and len(dm.class_names) == 8  # before setup
    with pytest.raises(RuntimeError, match="setup"):
        dm.class_counts("train")


def test_too_many_folds_fails_before_feature_extraction(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(loading_module, "load_audio", None)  # never reached
    with pytest.raises(ValueError, match="data.num_folds=8 but RAVDESS has 6 speakers"):
        make_dm(tiny_corpus, tmp_path, num_folds=8)


def test_unreadable_audio_is_an_error_or_skipped_when_lenient(tiny_corpus, tmp_path):
    corpus = copy_corpus(tiny_corpus, tmp_path / "corpus")
    bad = corpus / "Actor_03" / "03-01-04-01-01-01-03.wav"
    bad.write_text("not audio")
    (corpus / "Actor_02" / "03-01-04-01-01-01-02.wav").write_bytes(b"")
    with pytest.raises(ValueError, match=r"(?s)2 of 84 audio files.*data\.lenient.*03-01-04-01-01-01-03\.wav"):
        make_dm(corpus, tmp_path / "cache")
    with pytest.warns(UserWarning, match="skipped 2 file"):
        dm = make_dm(corpus, tmp_path / "cache", lenient=True)
    assert len(dm.utterances) == 82 and len(dm.skipped) == 2
    assert bad.resolve() not in {u.path for u in dm.utterances}
    assert sum(dm.class_counts(s).sum().item() for s in ("train", "val", "test")) == 82


def test_builtin_synthetic_corpus_when_root_is_none(tmp_path):
    dm = SERDataModule(cache_dir=str(tmp_path), synthetic_actors=3, num_folds=3, num_val_speakers=1)
    dm.prepare_data()
    dm.setup()
    assert len(dm.utterances) == 3 * 28
    assert {u.speaker for u in dm.utterances} == {"01", "02", "03"}
    assert (tmp_path / "synthetic").is_dir()


def test_speaker_normalisation_puts_each_speakers_statistics_in_the_batches(tiny_corpus, shared_cache):
    dm = make_dm(tiny_corpus, shared_cache, normalization="speaker")
    by_speaker = {}
    for position, utterance in enumerate(dm.utterances):
        by_speaker.setdefault(utterance.speaker, []).append(dm.features[position])
    for loader in (dm.train_dataloader(), dm.test_dataloader()):
        batch = next(iter(loader))
        for row, index in enumerate(batch["index"].tolist()):
            speaker = dm.utterances[index].speaker
            assert torch.equal(batch["speaker_stats"][row], torch.stack(feature_stats(by_speaker[speaker])))
    assert "speaker_stats" not in next(iter(make_dm(tiny_corpus, shared_cache).train_dataloader()))