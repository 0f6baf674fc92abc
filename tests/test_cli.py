"""The real `python -m ser_lightning` entry point on a tiny generated corpus."""

import ctypes
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_CONFIG, TINY_EMOTIONS, failing_command, tiny_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ser_lightning.cli import COMMANDS, main
from ser_lightning.configs import config_dirs
from ser_lightning.data.corpora import scan_corpus
from ser_lightning.data.folds import SplitConfig, make_fold_plan
from ser_lightning.runtime import cache_cuda_check, keep_freed_memory


def event_file_tags(log_dir: Path) -> tuple[set[str], set[str]]:
    """Scalar and image tags found in the TensorBoard event files under `log_dir`."""
    scalars, images = set(), set()
    for events in log_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        images |= set(acc.Tags()["images"])
    return scalars, images


def printed_metrics(text: str) -> list[str]:
    return re.findall(r"(?m)^ *(?:validation|test): .*$", text)


def test_help_lists_every_command_with_one_line(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for name, (text, _) in COMMANDS.items():
        assert re.search(rf"(?m)^  {re.escape(name)} +{re.escape(text)}$", out), name
    assert failing_command(["frobnicate"], capsys) == (2, "error: unknown command 'frobnicate'; the commands are "
                                                       f"{', '.join(COMMANDS)} (python -m ser_lightning --help)\n")


def test_fit_prints_model_and_baseline_and_logs_scalars_figures_and_config(tiny_corpus, feature_cache, tmp_path, capsys):
    main(["fit", *tiny_args(tiny_corpus, tmp_path, "--trainer.max_epochs=2", cache=feature_cache)])
    lines = printed_metrics(capsys.readouterr().out)
    assert len(lines) == 2 and all("baseline pooled: UA" in line for line in lines)
    log_dir = tmp_path / "lightning_logs" / "version_0"
    config = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert config["model"]["lr"] == 0.003 and config["figures"]["num_attention_maps"] == 2
    assert len(list((log_dir / "checkpoints").glob("epoch*.ckpt"))) == 1 and (log_dir / "checkpoints" / "last.ckpt").exists()
    scalars, images = event_file_tags(log_dir)
    for split in ("train", "val", "test"):
        for name in ("WA", "UA", "F1", "loss"):
            assert f"{split}/{name}" in scalars
    assert {"val/confusion_matrix", "test/confusion_matrix", "val/attention_0", "val/attention_1"} <= images


def test_demo_config_is_the_default_only_without_a_config(tiny_corpus, tmp_path, capsys):
    """A --config file that does not set model.lr gets SERModule's default, not demo.yaml's 0.003."""
    bare = tmp_path / "bare.yaml"
    bare.write_text(TINY_CONFIG.read_text().replace("  lr: 0.003\n", ""))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(bare), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["model"]["lr"] == 0.001
    with pytest.raises(SystemExit):
        main(["fit", "--print_config"])
    demo = yaml.safe_load(capsys.readouterr().out)
    assert demo["model"]["lr"] == 0.003 and demo["trainer"]["max_epochs"] == 30


def test_shipped_configs_are_found_by_name_and_a_missing_one_says_where_it_looked(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", "zhang2d", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["model"]["arch"] == "zhang2d"
    status, err = failing_command(["fit", "--config", "nosuch"], capsys)
    assert status == 2 and re.fullmatch(r"error: --config nosuch: no such file.*" + re.escape(str(config_dirs()[0]))
                                        + r".*\n", err)


def test_test_and_validate_from_a_checkpoint(seed1d_checkpoint, tiny_corpus, feature_cache, tmp_path, capsys):
    for command in ("test", "validate"):
        main([command, *tiny_args(tiny_corpus, tmp_path, cache=feature_cache), f"--ckpt_path={seed1d_checkpoint}"])
        out = capsys.readouterr().out
        split = "test" if command == "test" else "val"
        assert f"{split}/UA" in out and f"{'val' if split == 'test' else 'test'}/UA" not in out


def test_predict_split_writes_every_test_utterance(seed1d_checkpoint, tiny_corpus, feature_cache, tmp_path, capsys):
    output = tmp_path / "predictions.csv"
    main(["predict-split", *tiny_args(tiny_corpus, tmp_path, cache=feature_cache), f"--ckpt_path={seed1d_checkpoint}",
          f"--output={output}"])
    rows = output.read_text().splitlines()
    assert rows[0] == "path,speaker,label,emotion,p_neutral,p_happy,p_sad,p_angry"
    assert len(rows) == 1 + 2 * 28  # two test speakers of 28 files each
    assert "56 test utterances predicted" in capsys.readouterr().out
    data = yaml.safe_load(TINY_CONFIG.read_text())["data"]  # the test speakers of the configuration's fold 0
    split = SplitConfig(num_folds=data["num_folds"], num_val_speakers=data["num_val_speakers"])
    plan = make_fold_plan(scan_corpus("ravdess", tiny_corpus, TINY_EMOTIONS).utterances, TINY_EMOTIONS, split)
    speakers = [row.split(",")[1] for row in rows[1:]]
    assert set(speakers) == set(plan.test_speakers) and len(plan.test_speakers) == 2
    assert [Path(row.split(",")[0]).parent.name for row in rows[1:]] == [f"Actor_{s}" for s in speakers]
    assert all(abs(sum(map(float, row.split(",")[4:])) - 1) < 1e-4 for row in rows[1:])


def test_fast_dev_run_trains_one_batch_and_writes_nothing(tiny_corpus, feature_cache, tmp_path, capsys, monkeypatch):
    from lightning.pytorch import Trainer

    batches = []
    original = Trainer.fit

    def fit(self, *args, **kwargs):
        original(self, *args, **kwargs)
        batches.append((self.fit_loop.epoch_loop.batch_progress.total.completed, self.fast_dev_run))

    monkeypatch.setattr(Trainer, "fit", fit)
    main(["fit", *tiny_args(tiny_corpus, tmp_path, "--trainer.fast_dev_run=true", cache=feature_cache)])
    assert batches == [(1, 1)]  # one training batch
    assert not printed_metrics(capsys.readouterr().out)  # no evaluation after a fast_dev_run
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "lightning_logs").exists()


def test_same_seed_same_metrics(tiny_corpus, feature_cache, tmp_path, capsys):
    results = []
    for run in ("a", "b"):
        main(["fit", *tiny_args(tiny_corpus, tmp_path / run, "--trainer.max_epochs=2", "--figures.num_attention_maps=0",
                                cache=feature_cache)])
        results.append(printed_metrics(capsys.readouterr().out))
    assert results[0] == results[1] and len(results[0]) == 2


@pytest.mark.parametrize(
    "option, message",
    [
        ("--model.arch=transformer", "model.arch"),
        ("--data.feature.name=mfcc", "feature"),
        ("--model.lam=0", "model.lam"),
        ("--data.num_folds=7", "data.num_folds"),
        ("--data.fold=3", "data.fold"),
        ("--figures.every_n_epochs=-1", "figures.every_n_epochs"),
    ],
)
def test_invalid_configuration_fails_before_training(tiny_corpus, tmp_path, capsys, option, message):
    status, err = failing_command(["fit", *tiny_args(tiny_corpus, tmp_path), option], capsys)
    assert status == 2 and message in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_synth_command_writes_ravdess_layout(tmp_path, capsys):
    main(["synth", str(tmp_path / "corpus"), "--actors=2", "--emotions=neutral,angry", "--random_seed=3"])
    files = sorted((tmp_path / "corpus").rglob("*.wav"))
    assert "wrote 24 files" in capsys.readouterr().out
    assert len(files) == 2 * (4 + 8) and {f.parent.name for f in files} == {"Actor_01", "Actor_02"}


@pytest.mark.slow
def test_ddp_on_cpu_with_length_buckets(tiny_corpus, feature_cache, tmp_path):
    """Two gloo processes through Lightning's DDP, started the way a user starts them, with bucketing on."""
    args = tiny_args(tiny_corpus, tmp_path, "--test_after_fit=false", "--data.bucketing=true", "--baseline=false",
                     "--figures.every_n_epochs=0", cache=feature_cache)  # DDP is the point: no figures, no baselines
    cmd = [sys.executable, "-m", "ser_lightning", "fit", *args,
           "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.num_nodes=1"]
    env = {**os.environ, "PL_TORCH_DISTRIBUTED_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "lightning_logs").rglob("*.ckpt"))


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"),
                    reason="glibc only")
@pytest.mark.parametrize("setting, applied", [("", True), ("default", False), ("DEFAULT", False)])
def test_the_commands_keep_freed_memory_unless_told_not_to(setting, applied, monkeypatch):
    monkeypatch.setenv("SER_LIGHTNING_MALLOC", setting)
    assert keep_freed_memory() is applied


@pytest.mark.parametrize("setting, devices, expected", [("1", 0, "0"), ("1", 2, "1"), ("0", 0, "0"), (None, 0, None)])
def test_cuda_checks_come_from_torchs_cache_only_without_cuda_devices(setting, devices, expected, monkeypatch):
    """Lightning's NVML check is kept where devices exist (it keeps forks usable); without any it costs every step."""
    if setting is None:
        monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    else:
        monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", setting)
    monkeypatch.setattr("torch.cuda.device_count", lambda: devices)
    assert cache_cuda_check() is (setting == "1" and devices == 0)
    assert os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == expected


@pytest.mark.parametrize("options, expected", [
    ([], "ThrottledProgressBar"),
    (["--trainer.enable_progress_bar=false"], None),
    (["--trainer.callbacks+=TQDMProgressBar", "--trainer.callbacks.refresh_rate=5"], "TQDMProgressBar"),
])
def test_the_trainer_gets_the_throttled_progress_bar_unless_configured_otherwise(tmp_path, options, expected):
    from lightning.pytorch.callbacks import ProgressBar

    from ser_lightning.parser import build_cli

    trainer = build_cli([f"--trainer.default_root_dir={tmp_path}", "--data.cache_dir=unused", *options]).trainer
    bars = [type(callback).__name__ for callback in trainer.callbacks if isinstance(callback, ProgressBar)]
    assert bars == ([expected] if expected else [])
