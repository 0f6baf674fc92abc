"""Cross-validation fold plans.

- ``speaker_independent`` (default): speakers dealt into balanced groups, one group tests.
- ``random``: class-stratified random folds (speaker-dependent: speakers leak between splits).
- ``emobox``: the folds of an EmoBox dataset folder as given (``data.corpus: emobox``).
- ``emobox_ravdess``: EmoBox's six RAVDESS folds of four test actors (``ravdess.EMOBOX_TEST_ACTORS``).

Where a fold does not give a validation split, validation speakers are drawn from its training
speakers. Every plan lists the speakers its test split shares with training or validation.
"""
from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args
from .emobox import benchmark_folds, benchmark_split
from .ravdess import EMOBOX_TEST_ACTORS
from .records import Utterance

SplitProtocol = Literal["speaker_independent", "random", "emobox", "emobox_ravdess"]
PROTOCOLS: tuple[str, ...] = get_args(SplitProtocol)
SPLITS = ("train", "val", "test")
EMOBOX_VAL_FRACTION = 0.2
"""Validation share of a benchmark fold's training utterances when it cannot hold out speakers (EmoBox's own 80/20)."""


@dataclass(frozen=True)
class SplitConfig:
    """How one run splits its utterances: the DataModule's ``data.protocol``, ``num_folds``, ``fold``,
    ``num_val_speakers`` and ``random_seed``, checked here once; the planners below trust it.

    ``corpus`` is the training corpus (the EmoBox protocols need theirs); ``cross_corpus``: a second corpus
    tests (``data.test_root``), so the whole training corpus trains and validates.
    """

    protocol: SplitProtocol = "speaker_independent"
    num_folds: int = 5
    fold: int = 0
    num_val_speakers: int = 2
    random_seed: int = 0
    corpus: str = "ravdess"
    cross_corpus: bool = False

    def __post_init__(self) -> None:
        protocol, num_folds, fold = self.protocol, self.num_folds, self.fold
        emobox_ravdess_folds = len(EMOBOX_TEST_ACTORS)
        checks = [
            (not self.cross_corpus or protocol == "speaker_independent",
             f"data.protocol={protocol} does not apply to cross-corpus runs (data.test_root set): validation holds out speakers"),
            (protocol in PROTOCOLS, f"data.protocol: '{protocol}' is not one of {list(PROTOCOLS)}"),
            (protocol != "emobox" or self.corpus == "emobox",
             "data.protocol=emobox takes the folds of an EmoBox data folder: set data.corpus=emobox"),
            (protocol != "emobox_ravdess" or self.corpus == "ravdess",
             "data.protocol=emobox_ravdess is EmoBox's split of the RAVDESS actors: set data.corpus=ravdess "
             "(for EmoBox's own data/ravdess folder use data.corpus=emobox, data.protocol=emobox)"),
            (protocol != "emobox_ravdess" or num_folds == emobox_ravdess_folds,
             f"data.num_folds={num_folds}: data.protocol=emobox_ravdess has {emobox_ravdess_folds} folds"),
            (num_folds >= 2 or (protocol == "emobox" and num_folds == 1),
             f"data.num_folds={num_folds}: at least 2 folds are needed"),
            (0 <= fold < num_folds, f"data.fold={fold} is out of range for data.num_folds={num_folds} (use 0..{num_folds - 1})"),
            (self.num_val_speakers >= 1, f"data.num_val_speakers={self.num_val_speakers}: at least 1 is needed"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class FoldPlan:
    """Which utterances (indices into the utterance list) train, validate and test one fold."""

    fold: int
    num_folds: int
    protocol: str
    random_seed: int
    train: list[int]
    val: list[int]
    test: list[int]
    train_speakers: list[str]
    val_speakers: list[str]
    test_speakers: list[str]
    counts: dict[str, dict[str, int]]
    shared_speakers: list[str] = field(default_factory=list)

    @property
    def speaker_dependent(self) -> bool:
        """True when test speakers also appear in training or validation (always for the random protocol)."""
        return self.protocol == "random" or bool(self.shared_speakers)

    def split(self, name: str) -> list[int]:
        if name not in SPLITS:
            raise ValueError(f"unknown split '{name}'; choose from {list(SPLITS)}")
        return getattr(self, name)


def _speakers_of(utterances: Sequence[Utterance], indices: list[int]) -> list[str]:
    return sorted({utterances[i].speaker for i in indices})


def _counts(utterances: Sequence[Utterance], indices: list[int], class_names: Sequence[str]) -> dict[str, int]:
    counter = Counter(utterances[i].emotion for i in indices)
    return {name: counter.get(name, 0) for name in class_names}


def assign_speaker_folds(utterances: Sequence[Utterance], num_folds: int, random_seed: int) -> dict[str, int]:
    """Deal speakers into ``num_folds`` groups balanced by speaker count, sex and class counts.

    Speakers are taken sex by sex (in a seeded random order, larger speakers first) and each goes
    to the group with the fewest speakers, then the fewest of that sex, then the lowest load on the
    speaker's classes relative to the corpus, ties broken by the seeded generator.
    """
    rng = random.Random(random_seed)
    per_speaker: dict[str, Counter] = {}
    sex: dict[str, str] = {}
    for u in utterances:
        per_speaker.setdefault(u.speaker, Counter())[u.emotion] += 1
        sex[u.speaker] = u.sex or "unknown"
    totals = Counter(u.emotion for u in utterances)
    order = sorted(per_speaker)
    rng.shuffle(order)
    order.sort(key=lambda s: (sex[s], -sum(per_speaker[s].values())))  # stable: keeps the shuffle within ties

    sizes = [0] * num_folds
    sex_sizes = [Counter() for _ in range(num_folds)]
    loads = [Counter() for _ in range(num_folds)]
    assignment: dict[str, int] = {}
    for speaker in order:
        counts = per_speaker[speaker]

        def cost(k: int) -> tuple:
            load = max((loads[k][c] + n) / totals[c] for c, n in counts.items())
            return sizes[k], sex_sizes[k][sex[speaker]], load, rng.random()

        k = min(range(num_folds), key=cost)
        assignment[speaker] = k
        sizes[k] += 1
        sex_sizes[k][sex[speaker]] += 1
        loads[k].update(counts)
    return assignment


def _pick_validation_speakers(
    candidates: list[str], sex: dict[str, str], count: int, rng: random.Random
) -> list[str]:
    """``count`` speakers alternating between the sexes (seeded order)."""
    by_sex: dict[str, list[str]] = {}
    for s in candidates:
        by_sex.setdefault(sex[s], []).append(s)
    queues = [sorted(group) for _, group in sorted(by_sex.items())]
    for q in queues:
        rng.shuffle(q)
    rng.shuffle(queues)
    picked: list[str] = []
    while len(picked) < count:
        for q in queues:
            if q and len(picked) < count:
                picked.append(q.pop())
    return sorted(picked)


def check_fold_feasibility(utterances: Sequence[Utterance], split: SplitConfig, title: str = "the corpus") -> None:
    """Raise ValueError naming the option when the corpus cannot be split as asked (before any decoding)."""
    protocol, num_folds, num_val_speakers = split.protocol, split.num_folds, split.num_val_speakers
    speakers = {u.speaker for u in utterances}
    if protocol == "emobox":
        given = benchmark_folds(utterances)
        if num_folds != given:
            raise ValueError(f"data.num_folds={num_folds} but {title} has {given} EmoBox folds (fold_1 .. fold_{given})")
        return
    if protocol == "emobox_ravdess":
        wanted = {f"{actor:02d}" for fold in EMOBOX_TEST_ACTORS for actor in fold}
        missing = sorted(wanted - speakers)
        if missing:
            raise ValueError(f"data.protocol=emobox_ravdess: {title} lacks actor(s) {missing}; EmoBox's RAVDESS folds "
                             "test all 24 actors (use the whole Audio_Speech_Actors_01-24 folder)")
        return
    if protocol == "speaker_independent" and len(speakers) < num_val_speakers + 2:
        raise ValueError(
            f"data.num_folds={num_folds}: {title} has only {len(speakers)} speakers, too few for speaker-independent "
            f"folds with data.num_val_speakers={num_val_speakers} (each fold needs a test speaker, "
            f"{num_val_speakers} validation speaker(s) and a training speaker). Use data.protocol=random "
            f"(speaker-dependent: speakers leak between splits) or test on it with a model trained on another "
            f"corpus (data.test_corpus, data.test_root)"
        )
    if protocol == "speaker_independent" and num_folds > len(speakers):
        raise ValueError(
            f"data.num_folds={num_folds} but {title} has {len(speakers)} speakers "
            "(speaker-independent folds need at least one test speaker per fold)"
        )
    if protocol == "random" and num_folds > len(utterances):
        raise ValueError(f"data.num_folds={num_folds} but {title} has {len(utterances)} utterances")


def make_fold_plan(utterances: Sequence[Utterance], class_names: Sequence[str], split: SplitConfig) -> FoldPlan:
    """Build the train/val/test split of fold ``split.fold`` of ``split.num_folds``; deterministic for a random seed.

    speaker_independent: the speakers are dealt into ``num_folds`` balanced groups; group ``fold``
    is the test set and ``num_val_speakers`` of the remaining speakers (balanced by sex) validate.
    random: a class-stratified random split of utterances (the course project's protocol; speakers
    leak between splits), with a stratified validation part of the same relative size.
    emobox_ravdess: EmoBox's RAVDESS fold ``fold`` (0-based: fold_1 is 0) tests its four actors;
    ``num_val_speakers`` of the other twenty validate. emobox: see ``_benchmark_splits``.
    """
    check_fold_feasibility(utterances, split)
    protocol, num_folds, fold = split.protocol, split.num_folds, split.fold
    num_val_speakers, random_seed = split.num_val_speakers, split.random_seed
    speakers = sorted({u.speaker for u in utterances})

    if protocol == "speaker_independent":
        assignment = assign_speaker_folds(utterances, num_folds, random_seed)
        test_speakers = sorted(s for s, k in assignment.items() if k == fold)
        splits = _speaker_splits(utterances, test_speakers, fold, num_val_speakers, random_seed)
    elif protocol == "emobox_ravdess":
        splits = _speaker_splits(utterances, [f"{actor:02d}" for actor in EMOBOX_TEST_ACTORS[fold]], fold,
                                 num_val_speakers, random_seed)
    elif protocol == "emobox":
        splits = _benchmark_splits(utterances, class_names, fold, num_val_speakers, random_seed)
    else:
        splits = _random_splits(utterances, class_names, num_folds, fold, random_seed, num_val_speakers / len(speakers))

    speakers_of = {name: _speakers_of(utterances, splits[name]) for name in SPLITS}
    return FoldPlan(
        fold=fold, num_folds=num_folds, protocol=protocol, random_seed=random_seed,
        train=splits["train"], val=splits["val"], test=splits["test"],
        train_speakers=speakers_of["train"], val_speakers=speakers_of["val"], test_speakers=speakers_of["test"],
        counts={name: _counts(utterances, splits[name], class_names) for name in SPLITS},
        shared_speakers=sorted(set(speakers_of["test"]) & set(speakers_of["train"] + speakers_of["val"])),
    )


def _speaker_splits(
    utterances: Sequence[Utterance], test_speakers: Sequence[str], fold: int, num_val_speakers: int, random_seed: int
) -> dict[str, list[int]]:
    """The test speakers test; ``num_val_speakers`` of the others (balanced by sex, seeded) validate; the rest train."""
    rest = sorted({u.speaker for u in utterances} - set(test_speakers))
    if num_val_speakers >= len(rest):
        raise ValueError(
            f"data.num_val_speakers={num_val_speakers} leaves no training speakers: fold {fold} keeps "
            f"{len(rest)} speakers outside its test set"
        )
    sex = {u.speaker: u.sex or "unknown" for u in utterances}
    val_speakers = _pick_validation_speakers(rest, sex, num_val_speakers, random.Random(random_seed * 1000 + fold))
    split_of = {s: "test" for s in test_speakers} | {s: "val" for s in val_speakers}
    splits: dict[str, list[int]] = {name: [] for name in SPLITS}
    for i, u in enumerate(utterances):
        splits[split_of.get(u.speaker, "train")].append(i)
    return splits


def _benchmark_splits(
    utterances: Sequence[Utterance], class_names: Sequence[str], fold: int, num_val_speakers: int, random_seed: int
) -> dict[str, list[int]]:
    """An EmoBox fold as given: its test file tests; its valid file validates when there is one.

    Otherwise ``num_val_speakers`` training speakers that do not also test (balanced by sex, seeded)
    validate; a fold without enough of them (a random EmoBox split, or very few speakers) validates
    on a class-stratified EMOBOX_VAL_FRACTION of its training utterances instead.
    """
    given: dict[str, list[int]] = {name: [] for name in ("train", "valid", "test")}
    for i, u in enumerate(utterances):
        split = benchmark_split(u, fold)
        if split is not None:
            given[split].append(i)
    if given["valid"]:
        return {"train": given["train"], "val": given["valid"], "test": given["test"]}
    test_speakers = set(_speakers_of(utterances, given["test"]))
    candidates = [s for s in _speakers_of(utterances, given["train"]) if s not in test_speakers]
    rng = random.Random(random_seed * 1000 + fold)
    if len(candidates) > num_val_speakers:
        sex = {u.speaker: u.sex or "unknown" for u in utterances}
        val_speakers = set(_pick_validation_speakers(candidates, sex, num_val_speakers, rng))
        val = [i for i in given["train"] if utterances[i].speaker in val_speakers]
    else:
        val = []
        for name in class_names:
            members = [i for i in given["train"] if utterances[i].emotion == name]
            rng.shuffle(members)
            val += members[: round(EMOBOX_VAL_FRACTION * len(members))] if len(members) > 1 else []
    held = set(val)
    return {"train": [i for i in given["train"] if i not in held], "val": sorted(val), "test": given["test"]}


def make_cross_corpus_plan(
    train_corpus: Sequence[Utterance], test_corpus: Sequence[Utterance], class_names: Sequence[str], split: SplitConfig
) -> FoldPlan:
    """Train and validate on one corpus, test on another (indices into ``train_corpus + test_corpus``).

    ``split.num_val_speakers`` speakers of the training corpus (balanced by sex, seeded) validate; all
    others train; every utterance of the test corpus tests.
    """
    num_val_speakers, random_seed = split.num_val_speakers, split.random_seed
    speakers = sorted({u.speaker for u in train_corpus})
    if num_val_speakers >= len(speakers):
        raise ValueError(
            f"data.num_val_speakers={num_val_speakers}: the training corpus has {len(speakers)} speakers; "
            f"use 1 to {len(speakers) - 1} so that some remain for training"
        )
    sex = {u.speaker: u.sex or "unknown" for u in train_corpus}
    val_speakers = set(_pick_validation_speakers(speakers, sex, num_val_speakers, random.Random(random_seed)))
    utterances = [*train_corpus, *test_corpus]
    splits = {
        "train": [i for i, u in enumerate(train_corpus) if u.speaker not in val_speakers],
        "val": [i for i, u in enumerate(train_corpus) if u.speaker in val_speakers],
        "test": list(range(len(train_corpus), len(utterances))),
    }
    return FoldPlan(
        fold=0, num_folds=1, protocol="cross_corpus", random_seed=random_seed,
        train=splits["train"], val=splits["val"], test=splits["test"],
        train_speakers=_speakers_of(utterances, splits["train"]),
        val_speakers=_speakers_of(utterances, splits["val"]),
        test_speakers=_speakers_of(utterances, splits["test"]),
        counts={name: _counts(utterances, splits[name], class_names) for name in SPLITS},
    )


def _random_splits(
    utterances: Sequence[Utterance], class_names: Sequence[str], num_folds: int, fold: int, random_seed: int,
    val_fraction: float,
) -> dict[str, list[int]]:
    """Class-stratified random folds; a stratified ``val_fraction`` of the corpus validates."""
    rng = random.Random(random_seed)
    splits: dict[str, list[int]] = {name: [] for name in SPLITS}
    for name in class_names:
        members = [i for i, u in enumerate(utterances) if u.emotion == name]
        rng.shuffle(members)
        test = members[fold::num_folds]
        rest = [i for i in members if i not in set(test)]
        n_val = min(len(rest) - 1, max(1, round(val_fraction * len(members)))) if len(rest) > 1 else 0
        splits["test"] += test
        splits["val"] += rest[:n_val]
        splits["train"] += rest[n_val:]
    return {name: sorted(indices) for name, indices in splits.items()}


def format_fold_plan(plan: FoldPlan, class_names: Sequence[str]) -> str:
    """A readable table: speakers and class counts per split."""
    if plan.protocol == "random":
        title = (
            f"Fold {plan.fold} of {plan.num_folds} (protocol: random, random seed {plan.random_seed}) -- SPEAKER-DEPENDENT: "
            "test speakers also appear in training; results are inflated by speaker leakage"
        )
    elif plan.protocol == "cross_corpus":
        title = f"Cross-corpus (random seed {plan.random_seed}): train/val on one corpus, test on all of another"
    else:
        benchmark = f", EmoBox fold_{plan.fold + 1}" if plan.protocol.startswith("emobox") else ""
        title = (f"Fold {plan.fold} of {plan.num_folds} (protocol: {plan.protocol}{benchmark}, "
                 f"random seed {plan.random_seed})")
        if plan.shared_speakers:
            title += (f" -- SPEAKER-DEPENDENT: speaker(s) {' '.join(plan.shared_speakers)} in both training and test; "
                      "this fold's numbers are not speaker-independent")
    width = max(8, *(len(c) for c in class_names))
    header = f"{'split':<6} " + " ".join(f"{c:>{width}}" for c in class_names) + f" {'total':>6}  speakers"
    lines = [title, header]
    for name in SPLITS:
        counts = plan.counts[name]
        speakers = getattr(plan, f"{name}_speakers")
        lines.append(
            f"{name:<6} " + " ".join(f"{counts[c]:>{width}}" for c in class_names)
            + f" {sum(counts.values()):>6}  {len(speakers)}: {' '.join(speakers)}"
        )
    return "\n".join(lines)
