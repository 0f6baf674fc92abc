"""Fold plans: speaker-independent grouping, validation speakers, random protocol, errors."""
from __future__ import annotations

from collections import Counter

import pytest

from ser_lightning.data.folds import SplitConfig, format_fold_plan, make_fold_plan

CLASSES = ["neutral", "happy", "sad", "angry"]  # the classes of the utterance_factory fixture


def plans(utterances, num_folds=5, random_seed=0, protocol="speaker_independent", num_val_speakers=2):
    return [
        make_fold_plan(utterances, CLASSES, SplitConfig(protocol=protocol, num_folds=num_folds, fold=k,
                                                        num_val_speakers=num_val_speakers, random_seed=random_seed))
        for k in range(num_folds)
    ]


@pytest.mark.parametrize("num_speakers, num_folds", [(24, 5), (24, 4), (10, 10), (7, 3)])
def test_speaker_independent_folds_partition_the_speakers(num_speakers, num_folds, utterance_factory):
    utterances = utterance_factory(num_speakers)
    all_plans = plans(utterances, num_folds=num_folds, num_val_speakers=1)
    test_counts = Counter(s for p in all_plans for s in p.test_speakers)
    assert sorted(test_counts) == sorted({u.speaker for u in utterances})
    assert set(test_counts.values()) == {1}  # every speaker in exactly one test fold
    sizes = [len(p.test_speakers) for p in all_plans]
    assert max(sizes) - min(sizes) <= 1
    for p in all_plans:
        assert not p.speaker_dependent
        train, val, test = set(p.train_speakers), set(p.val_speakers), set(p.test_speakers)
        assert not (train & val or train & test or val & test)  # no speaker in two splits
        assert len(val) == 1
        assert sorted(p.train + p.val + p.test) == list(range(len(utterances)))
        for split in ("train", "val", "test"):
            indices = p.split(split)
            assert {utterances[i].speaker for i in indices} == set(getattr(p, f"{split}_speakers"))
            assert sum(p.counts[split].values()) == len(indices)


def test_folds_are_balanced_by_sex(utterance_factory):
    for p in plans(utterance_factory(24), num_folds=4):
        sexes = Counter("male" if int(s) % 2 else "female" for s in p.test_speakers)
        assert sexes["male"] == sexes["female"] == 3
        val_sexes = Counter("male" if int(s) % 2 else "female" for s in p.val_speakers)
        assert val_sexes["male"] == val_sexes["female"] == 1


def test_deterministic_per_seed(utterance_factory):
    utterances = utterance_factory(24)
    assert plans(utterances, random_seed=3) == plans(utterances, random_seed=3)
    assert [p.test_speakers for p in plans(utterances, random_seed=3)] != [p.test_speakers for p in plans(utterances, random_seed=4)]


def test_random_protocol_differs_and_mixes_speakers(utterance_factory):
    utterances = utterance_factory(12)
    independent = plans(utterances, num_folds=4)
    random_plans = plans(utterances, num_folds=4, protocol="random")
    assert [p.test for p in random_plans] != [p.test for p in independent]
    test_counts = Counter(i for p in random_plans for i in p.test)
    assert set(test_counts.values()) == {1} and len(test_counts) == len(utterances)
    for p in random_plans:
        assert p.speaker_dependent
        assert set(p.test_speakers) & set(p.train_speakers)  # speakers leak: the point of the protocol
        assert sorted(p.train + p.val + p.test) == list(range(len(utterances)))
        assert p.val and all(p.counts["val"][c] > 0 for c in CLASSES)  # stratified
        per_class = [p.counts["test"][c] / sum(1 for u in utterances if u.emotion == c) for c in CLASSES]
        assert max(per_class) - min(per_class) < 0.1
    assert plans(utterances, protocol="random", random_seed=1) == plans(utterances, protocol="random", random_seed=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"num_folds": 30}, "data.num_folds=30 but the corpus has 24 speakers"),
     ({"num_val_speakers": 19}, "data.num_val_speakers=19"), ({"num_val_speakers": 23}, "too few for speaker-independent"),
     ({"protocol": "random", "num_folds": 700}, "data.num_folds=700 but the corpus has 672 utterances")],
)
def test_plans_the_data_cannot_support_name_the_option(kwargs, message, utterance_factory):
    """Option values alone are checked where the configuration enters (SplitConfig); these depend on the data."""
    split = SplitConfig(**kwargs)
    with pytest.raises(ValueError, match=message):
        make_fold_plan(utterance_factory(24), CLASSES, split)


@pytest.mark.parametrize("kwargs, message", [
    ({"protocol": "leave_one_out"},
     r"data\.protocol: 'leave_one_out' is not one of \['speaker_independent', 'random', 'emobox', 'emobox_ravdess'\]"),
    ({"num_folds": 1}, r"data\.num_folds=1: at least 2 folds are needed"),
    ({"protocol": "emobox", "corpus": "emobox", "num_folds": 1, "fold": 1},
     r"data\.fold=1 is out of range for data\.num_folds=1 \(use 0\.\.0\)"),
    ({"num_val_speakers": 0}, r"data\.num_val_speakers=0: at least 1 is needed"),
    ({"protocol": "emobox"}, r"data\.protocol=emobox takes the folds of an EmoBox data folder: set data\.corpus=emobox"),
    ({"protocol": "emobox_ravdess", "corpus": "cremad", "num_folds": 6}, r"data\.protocol=emobox_ravdess is EmoBox's split of the RAVDESS actors: set data\.corpus=ravdess"),
    ({"protocol": "emobox_ravdess", "num_folds": 5}, r"data\.num_folds=5: data\.protocol=emobox_ravdess has 6 folds"),
    ({"protocol": "random", "cross_corpus": True},
     r"data\.protocol=random does not apply to cross-corpus runs \(data\.test_root set\)"),
])
def test_split_config_refuses_option_values_naming_the_option(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        SplitConfig(**kwargs)
    assert SplitConfig(protocol="emobox", corpus="emobox", num_folds=1).num_folds == 1  # one EmoBox fold is a split


def test_format_fold_plan(utterance_factory):
    utterances = utterance_factory(12)
    text = format_fold_plan(plans(utterances, num_folds=3)[1], CLASSES)
    assert "Fold 1 of 3" in text and "speaker_independent" in text and "SPEAKER-DEPENDENT" not in text
    assert all(c in text for c in CLASSES) and "test" in text and "val" in text
    random_text = format_fold_plan(plans(utterances, num_folds=3, protocol="random")[0], CLASSES)
    assert "SPEAKER-DEPENDENT" in random_text


EMOBOX_RAVDESS_TEST_ACTORS = [{1, 11, 20, 21}, {4, 10, 12, 14}, {8, 9, 19, 23}, {3, 5, 7, 24}, {2, 15, 16, 18},
                              {6, 13, 17, 22}]


def test_emobox_ravdess_plan_tests_exactly_the_benchmarks_actors(utterance_factory):
    utterances = utterance_factory(24)
    all_plans = plans(utterances, num_folds=6, protocol="emobox_ravdess", num_val_speakers=2)
    assert [{int(s) for s in p.test_speakers} for p in all_plans] == EMOBOX_RAVDESS_TEST_ACTORS
    for p in all_plans:
        train, val, test = set(p.train_speakers), set(p.val_speakers), set(p.test_speakers)
        assert len(train) == 18 and len(val) == 2 and not (train & val or train & test or val & test)
        assert not p.speaker_dependent and "EmoBox fold_" in format_fold_plan(p, CLASSES)
        assert sorted(p.train + p.val + p.test) == list(range(len(utterances)))
    with pytest.raises(ValueError, match=r"lacks actor\(s\) \['21', '22', '23', '24'\]"):
        plans(utterance_factory(20), num_folds=6, protocol="emobox_ravdess")
