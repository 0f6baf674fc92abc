"""Loading a checkpoint never runs code from it; the project's own checkpoints load with the safe loader."""

import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import failing_command, tiny_args

from ser_lightning import EmotionRecognizer
from ser_lightning.checkpoints import UnsafeCheckpointError, load_module, read_checkpoint
from ser_lightning.cli import main


class Payload:
    """Unpickling this object runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def malicious(seed1d_checkpoint, tmp_path) -> tuple[Path, Path]:
    """A copy of a real checkpoint whose hyper-parameters carry the payload; and the marker it would create."""
    marker = tmp_path / "code_ran"
    checkpoint = torch.load(seed1d_checkpoint, weights_only=True)
    checkpoint["hyper_parameters"]["class_names"] = Payload(marker)
    path = tmp_path / "shared model.ckpt"
    torch.save(checkpoint, path)
    return path, marker


@pytest.mark.parametrize("command", ["predict", "export", "test"])
def test_every_command_refuses_a_malicious_checkpoint_without_running_it(command, malicious, tiny_corpus, feature_cache,
                                                                      tmp_path, capsys):
    """Each command as a user runs it (in this process: the payload would run here just the same)."""
    path, marker = malicious
    args = {
        "predict": ["predict", f"--ckpt_path={path}", str(next(tiny_corpus.rglob("*.wav")))],
        "export": ["export", f"--ckpt_path={path}", str(tmp_path / "model.onnx")],
        "test": ["test", f"--ckpt_path={path}", *tiny_args(tiny_corpus, tmp_path, cache=feature_cache)],
    }[command]
    code, stderr = failing_command(args, capsys)
    assert code != 0 and not marker.exists()
    message = stderr.strip().splitlines()[-1]
    assert str(path) in message and "posix.system" in message and "--trust_checkpoint" in message, message


def test_python_api_refuses_a_malicious_checkpoint_and_trusting_it_is_explicit(malicious):
    path, marker = malicious
    for load in (EmotionRecognizer.from_checkpoint, load_module, read_checkpoint):
        with pytest.raises(UnsafeCheckpointError, match=r"posix\.system.*trusted=True") as error:
            load(path)
        assert str(path) in str(error.value) and not marker.exists()
    with pytest.warns(UserWarning, match="unrestricted unpickler"), pytest.raises(Exception):
        EmotionRecognizer.from_checkpoint(path, trusted=True)  # runs the payload, then fails on its class names
    assert marker.exists()


def test_only_the_projects_own_records_are_allow_listed(seed1d_checkpoint, tmp_path):
    """Checkpoints of the previous version held FeatureConfig records: they load; anything else is refused."""
    from ser_lightning.data.features import FeatureConfig

    checkpoint = torch.load(seed1d_checkpoint, weights_only=True)
    checkpoint["datamodule_hyper_parameters"]["feature"] = FeatureConfig(name="logmel")
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    assert EmotionRecognizer.from_checkpoint(old).feature == FeatureConfig(name="logmel")
    checkpoint["datamodule_hyper_parameters"]["feature"] = pickle.Pickler  # any other global
    torch.save(checkpoint, tmp_path / "other.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=r"contains _?pickle\.Pickler"):
        read_checkpoint(tmp_path / "other.ckpt")


@pytest.mark.parametrize("extra", [
    [],
    ["--data.feature.pitch=true", "--data.normalization=speaker", "--model.statistics_head=logistic"],
    ["--model.arch=zhang2d", "--data.feature.name=spectrogram", "--model.width=0.125"],
    ["--data.feature.name=loudness_contour", "--data.normalization=none"],
], ids=["seed1d-logmel", "seed1d-logmel-pitch-speaker", "zhang2d-spectrogram", "seed1d-loudness_contour"])
def test_checkpoints_written_by_fit_load_with_the_safe_loader(extra, tiny_corpus, feature_cache, tmp_path):
    main(["fit", *tiny_args(tiny_corpus, tmp_path, "--test_after_fit=false", "--trainer.limit_train_batches=1",
                            "--trainer.limit_val_batches=1", "--figures.every_n_epochs=0", cache=feature_cache), *extra])
    for path in (tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt"):
        torch.load(path, weights_only=True)  # plain types and tensors only: no allow-list needed
        recognizer = EmotionRecognizer.from_checkpoint(path)
        assert recognizer.module.hparams.num_features == recognizer.feature.num_features


def test_no_unrestricted_load_outside_the_trusted_path():
    source = Path(__file__).resolve().parents[1] / "ser_lightning"
    hits = [(p.relative_to(source), line) for p in source.rglob("*.py") for line in p.read_text().splitlines()
            if "weights_only=False" in line or "weights_only=not trusted" in line]
    assert [str(p) for p, _ in hits] == ["checkpoints.py"], hits
