"""Shared fixtures: tiny synthetic corpora and utterance lists generated on the fly."""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from filelock import FileLock

if TYPE_CHECKING:
    from ser_lightning.data.records import Utterance

# The tests run in two worker processes (pytest.ini): one thread each, for them and the processes they
# start, so that they do not oversubscribe the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


TINY_EMOTIONS = ("neutral", "happy", "sad", "angry")
TINY_CONFIG = Path(__file__).parent / "conf" / "tiny.yaml"


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """Where tests run (not in the process that hands them out: this file imports nothing heavy at the top)."""
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def made_once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], Path]) -> Path:
    """What ``make(folder)`` returns, made once per test session: the first worker to ask makes it, the others wait
    and reuse it (the workers' temporary folders share a parent). Tests never change what it returns."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    folder, record = base / f"made-once-{name}", base / f"made-once-{name}.path"
    with FileLock(f"{folder}.lock"):
        if not record.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a worker whose making failed left: made afresh
            folder.mkdir()
            record.write_text(str(make(folder)))
    return Path(record.read_text())


def make_tiny_corpus(root: Path) -> Path:
    from ser_lightning.data.synth import synthesize_corpus

    synthesize_corpus(root, actors=6, emotions=TINY_EMOTIONS, sample_rate=16000, random_seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A RAVDESS-layout synthetic corpus: 6 actors x 4 emotions (28 files per actor), 16 kHz."""
    return made_once(tmp_path_factory, "tiny_corpus", make_tiny_corpus)


def make_utterances(num_speakers: int = 24, emotions=TINY_EMOTIONS, per_class: int = 8) -> list[Utterance]:
    """Utterance records without audio (for fold tests): odd speakers male, even female."""
    from ser_lightning.data.records import Utterance

    return [
        Utterance(
            path=Path(f"/corpus/Actor_{s:02d}/{e}_{k}.wav"),
            emotion=e,
            speaker=f"{s:02d}",
            sex="male" if s % 2 else "female",
            corpus="test",
        )
        for s in range(1, num_speakers + 1)
        for e in emotions
        for k in range(per_class // 2 if e == "neutral" else per_class)
    ]


@pytest.fixture
def utterance_factory():
    return make_utterances


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    """One feature cache for the end-to-end tests (features of a file are computed once per session)."""
    return tmp_path_factory.mktemp("feature_cache")


def tiny_args(corpus: Path, root: Path, *extra: str, cache: Path | None = None) -> list[str]:
    """Configuration arguments of a quick run on a tiny corpus (tests/conf/tiny.yaml), logging under ``root``."""
    return ["--config", str(TINY_CONFIG), f"--data.root={corpus}", f"--data.cache_dir={cache or root / 'cache'}",
            f"--trainer.default_root_dir={root}", *extra]


def failing_command(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run ``python -m ser_lightning ARGV`` in this process, expecting it to fail: (exit status, its stderr)."""
    from ser_lightning.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def train_tiny_checkpoint(corpus: Path, root: Path, *extra: str) -> Path:
    """One epoch of `python -m ser_lightning fit` on a tiny corpus; returns the last checkpoint."""
    from ser_lightning.cli import main

    main(["fit", *tiny_args(corpus, root, "--test_after_fit=false", "--figures.every_n_epochs=0", *extra)])
    return root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


def trained_once(tmp_path_factory: pytest.TempPathFactory, name: str, corpus: Path, *extra: str) -> Path:
    return made_once(tmp_path_factory, name, lambda root: train_tiny_checkpoint(corpus, root, *extra))


@pytest.fixture(scope="session")
def seed1d_checkpoint(tiny_corpus, tmp_path_factory) -> Path:
    """A seed1d/logmel checkpoint trained for one epoch through the real CLI."""
    return trained_once(tmp_path_factory, "seed1d_run", tiny_corpus)


@pytest.fixture(scope="session")
def zhang2d_checkpoint(tiny_corpus, tmp_path_factory) -> Path:
    """A small zhang2d/spectrogram checkpoint trained for one epoch through the real CLI."""
    return trained_once(tmp_path_factory, "zhang2d_run", tiny_corpus,
                        "--model.arch=zhang2d", "--data.feature.name=spectrogram", "--model.width=0.125")


@pytest.fixture(scope="session")
def speaker_checkpoint(tiny_corpus, tmp_path_factory) -> Path:
    """seed1d with speaker normalisation, the pitch rows and the statistics head (pooled and prosodic), one epoch."""
    return trained_once(tmp_path_factory, "speaker_run", tiny_corpus, "--data.normalization=speaker",
                        "--data.feature.pitch=true", "--model.statistics_head=logistic",
                        "--model.statistics=[pooled, prosodic]")


FINAL_WEIGHTS = "--trainer.callbacks+=final_weights.FinalWeights"
"""The option that adds ``FinalWeights`` to a run (its process must find this file as ``conftest``)."""
