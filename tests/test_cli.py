"""The real `python -m ser_lightning` entry point on a tiny generated corpus."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ser_lightning.cli import main, run_lightning


def tiny_args(corpus: Path, tmp: Path, *extra: str) -> list[str]:
    """Arguments for a quick run on the tiny corpus, logging under `tmp`."""
    return [
        f"--data.root={corpus}",
        f"--data.cache_dir={tmp / 'cache'}",
        "--data.num_folds=3",
        "--data.num_val_speakers=1",
        "--data.batch_size=16",
        f"--trainer.default_root_dir={tmp}",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=1",
        *extra,
    ]


def event_file_tags(log_dir: Path) -> tuple[set[str], set[str]]:
    """Scalar and image tags found in the TensorBoard event files under `log_dir`."""
    scalars, images = set(), set()
    for events in log_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        images |= set(acc.Tags()["images"])
    return scalars, images


def test_fit_logs_scalars_figures_and_config(tiny_corpus, tmp_path, capsys):
    main(["fit", *tiny_args(tiny_corpus, tmp_path, "--trainer.max_epochs=2")])
    out = capsys.readouterr().out
    assert "validation: WA" in out and "test: WA" in out
    log_dir = tmp_path / "lightning_logs" / "version_0"
    assert (log_dir / "config.yaml").exists()
    assert list((log_dir / "checkpoints").glob("epoch*.ckpt"))
    scalars, images = event_file_tags(log_dir)
    for split in ("train", "val", "test"):
        for name in ("WA", "UA", "F1"):
            assert f"{split}/{name}" in scalars
    assert "train/loss" in scalars
    assert "val/confusion_matrix" in images and "test/confusion_matrix" in images
    assert any(tag.startswith("val/attention_") for tag in images)


def test_test_subcommand_from_checkpoint(tiny_corpus, tmp_path, capsys):
    main(["fit", *tiny_args(tiny_corpus, tmp_path, "--trainer.max_epochs=1", "--test_after_fit=false")])
    ckpt = next((tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("epoch*.ckpt"))
    capsys.readouterr()
    main(["test", *tiny_args(tiny_corpus, tmp_path), f"--ckpt_path={ckpt}"])
    assert "test/UA" in capsys.readouterr().out


def test_fast_dev_run(tiny_corpus, tmp_path):
    main(["fit", *tiny_args(tiny_corpus, tmp_path, "--trainer.fast_dev_run=true")])


def test_same_seed_same_metrics(tiny_corpus, tmp_path):
    results = []
    for run in ("a", "b"):
        cli_args = tiny_args(tiny_corpus, tmp_path / run, "--trainer.max_epochs=2", "--test_after_fit=false")
        cli = run_lightning(["fit", *cli_args])
        metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)[0]
        results.append(metrics)
    assert results[0] == results[1]


@pytest.mark.parametrize(
    "option, message",
    [
        ("--model.arch=transformer", "model.arch"),
        ("--data.feature.name=mfcc", "feature"),
        ("--model.lam=0", "model.lam"),
        ("--data.num_folds=7", "data.num_folds"),
        ("--data.fold=3", "data.fold"),
    ],
)
def test_invalid_configuration_fails_before_training(tiny_corpus, tmp_path, capsys, option, message):
    with pytest.raises((SystemExit, ValueError)) as error:
        main(["fit", *tiny_args(tiny_corpus, tmp_path, "--trainer.max_epochs=1"), option])
    text = str(error.value) + capsys.readouterr().err
    assert message in text
    assert not list(tmp_path.rglob("*.ckpt"))


def test_print_config_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--print_config"])
    out = capsys.readouterr().out
    assert "arch: seed1d" in out and "protocol: speaker_independent" in out


def test_synth_command_writes_ravdess_layout(tmp_path, capsys):
    main(["synth", str(tmp_path / "corpus"), "--actors=2", "--emotions=neutral,angry"])
    files = sorted((tmp_path / "corpus").rglob("*.wav"))
    assert "wrote" in capsys.readouterr().out
    assert len(files) == 2 * (4 + 8)
    assert {f.parent.name for f in files} == {"Actor_01", "Actor_02"}


@pytest.mark.slow
def test_ddp_on_cpu_completes_one_epoch(tiny_corpus, tmp_path):
    """Two gloo processes through Lightning's DDP, started the way a user starts them."""
    args = tiny_args(tiny_corpus, tmp_path, "--trainer.max_epochs=1", "--test_after_fit=false")
    cmd = [sys.executable, "-m", "ser_lightning", "fit", *args,
           "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.num_nodes=1"]
    env = {**os.environ, "PL_TORCH_DISTRIBUTED_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "lightning_logs").rglob("*.ckpt"))
