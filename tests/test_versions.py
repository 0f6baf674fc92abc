"""Runs that share a log folder get version folders of their own, claimed atomically."""
from __future__ import annotations

import multiprocessing
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from conftest import tiny_args

from ser_lightning.cli import main
from ser_lightning.data.datamodule import SERDataModule
from ser_lightning.parser import allocate_version


def test_version_numbers_claimed_at_once_are_all_different(tmp_path):
    (tmp_path / "version_0").mkdir()
    (tmp_path / "version_2").mkdir()
    start = threading.Barrier(8)

    def claim() -> list[int]:
        start.wait()
        return [allocate_version(tmp_path) for _ in range(5)]

    with ThreadPoolExecutor(8) as pool:
        claimed = [version for future in [pool.submit(claim) for _ in range(8)] for version in future.result()]
    assert len(set(claimed)) == 40 and min(claimed) == 3  # after the highest existing one, never shared
    assert {path.name for path in tmp_path.iterdir()} == {f"version_{n}" for n in (0, 2, *claimed)}


def _fit_when_all_ready(start, args: list[str]) -> None:
    start.wait()
    main(args)


def test_three_fits_started_at_once_in_one_folder_get_three_version_folders(tiny_corpus, feature_cache, tmp_path):
    SERDataModule(root=str(tiny_corpus), num_folds=3, num_val_speakers=1, cache_dir=str(feature_cache)).setup()
    logs = tmp_path / "lightning_logs"
    for version in range(3):  # as in the report: the next free number is version_3 for all three runs
        (logs / f"version_{version}").mkdir(parents=True)
    # forked from a fresh server process that has the package imported (each run starts at once) but never ran
    # autograd: a fork of this test process would fail in backward if an earlier test here trained in process
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["ser_lightning.cli", "test_versions"])
    start = context.Barrier(3)
    runs = [context.Process(target=_fit_when_all_ready, args=(start, [
        "fit", *tiny_args(tiny_corpus, tmp_path, f"--model.lr=0.00{run + 1}", "--test_after_fit=false",
                          "--baseline=false", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
                          "--figures.every_n_epochs=0", "--figures.num_attention_maps=0", cache=feature_cache)]))
            for run in range(3)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=120)
    assert [run.exitcode for run in runs] == [0, 0, 0]
    folders = [logs / f"version_{version}" for version in (3, 4, 5)]
    assert sorted(path.name for path in logs.iterdir()) == [f"version_{n}" for n in range(6)]
    rates = {yaml.safe_load((folder / "config.yaml").read_text())["model"]["lr"] for folder in folders}
    assert rates == {0.001, 0.002, 0.003}  # each run's own configuration, none overwritten
    writers = [{_writer_pid(path) for path in folder.glob("events.out.tfevents.*")} for folder in folders]
    assert all(len(pids) == 1 for pids in writers) and len(set.union(*writers)) == 3  # no events mixed
    assert all(list((folder / "checkpoints").glob("*.ckpt")) for folder in folders)


def _writer_pid(events: Path) -> int:
    """The process that wrote a TensorBoard events file (events.out.tfevents.TIME.HOST.PID.N)."""
    return int(re.fullmatch(r"events\.out\.tfevents\.\d+\..+\.(\d+)\.\d+", events.name)[1])
