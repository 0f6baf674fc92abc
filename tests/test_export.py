"""`python -m ser_lightning export --format onnx`: dynamic shapes and onnxruntime parity with PyTorch."""

import json
import re

import numpy as np
import onnx
import onnxruntime
import pytest
import soundfile as sf
import torch
from conftest import failing_command
from torch import nn

from ser_lightning import EmotionRecognizer
from ser_lightning.cli import main
from ser_lightning.inference.export import UnfoldMaxPool
from ser_lightning.padding import pad_last

TOLERANCE = 1e-4


@pytest.mark.parametrize("pool", [nn.MaxPool1d(3, 2), nn.MaxPool2d(3, 2), nn.MaxPool1d(5, 3)])
def test_unfold_max_pool_equals_max_pool(pool):
    shape = (2, 3, 41) if isinstance(pool, nn.MaxPool1d) else (2, 3, 17, 40)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(UnfoldMaxPool(pool)(x), pool(x))


@pytest.mark.parametrize("kind", ["zhang2d", "speaker"])
def test_onnx_export_matches_pytorch_on_real_features(kind, request, tiny_corpus, tmp_path, capsys):
    """zhang2d, and seed1d with speaker normalisation, pitch rows, the statistics head and a calibration (a plain
    seed1d is that graph without its extra input and head)."""
    checkpoint = request.getfixturevalue(f"{kind}_checkpoint")
    if kind == "speaker":  # with a temperature and a network share, as fit stores them: the file must carry both
        from ser_lightning.checkpoints import load_module
        from ser_lightning.run.training import store_calibration

        calibrated = tmp_path / "calibrated.ckpt"
        calibrated.write_bytes(checkpoint.read_bytes())
        store_calibration(load_module(calibrated), str(calibrated), 2.5, 0.5)
        checkpoint = calibrated
    arch = "zhang2d" if kind == "zhang2d" else "seed1d"
    out = tmp_path / f"{kind}.onnx"
    main(["export", "--ckpt_path", str(checkpoint), "--format", "onnx", str(out)])
    printed = capsys.readouterr().out
    reported = float(re.search(r"max abs diff (\S+)", printed).group(1))
    assert reported <= TOLERANCE

    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata["arch"] == arch
    assert json.loads(metadata["class_names"]) == ["neutral", "happy", "sad", "angry"]
    assert json.loads(metadata["feature"])["name"] == ("logmel" if arch == "seed1d" else "spectrogram")

    # independent check on real features: utterances of different lengths, batched with padding
    recognizer = EmotionRecognizer.from_checkpoint(checkpoint)
    calibration = (float(recognizer.module.temperature), float(recognizer.module.network_weight))
    assert calibration == ((2.5, 0.5) if kind == "speaker" else (1.0, 1.0))
    waves = [torch.from_numpy(sf.read(p, dtype="float32")[0]) for p in sorted(tiny_corpus.rglob("*.wav"))[:3]]
    waves.append(torch.cat(waves))  # a longer one, so lengths vary a lot
    batch, lengths = pad_last([recognizer.extractor(w) for w in waves])
    stats = recognizer.speaker_statistics(waves).expand(len(waves), 2, -1) if kind == "speaker" else None
    with torch.no_grad():
        output = recognizer.module(batch, lengths, stats)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["features", "lengths"] + (["speaker_stats"] if stats is not None else [])
    for rows in ([0], [1, 2], [0, 1, 2, 3]):  # dynamic batch and length axes
        n = int(lengths[rows].max())
        feeds = {"features": batch[rows, :, :n].numpy(), "lengths": lengths[rows].numpy()}
        if stats is not None:
            feeds["speaker_stats"] = stats[rows].contiguous().numpy()
        probabilities, alpha = session.run(None, feeds)
        torch_alpha = output.alpha[rows]
        assert probabilities.shape == (len(rows), 4)
        np.testing.assert_allclose(probabilities, output.logits[rows].softmax(dim=1).numpy(), atol=TOLERANCE, rtol=0)
        width = alpha.shape[1]  # the batch padded to fewer frames has fewer attention positions
        assert bool((torch_alpha[:, width:] == 0).all())
        np.testing.assert_allclose(alpha, torch_alpha[:, :width].numpy(), atol=TOLERANCE, rtol=0)


def test_export_rejects_a_missing_checkpoint(tmp_path, capsys):
    args = ["export", "--ckpt_path", str(tmp_path / "none.ckpt"), "--format", "onnx", str(tmp_path / "m.onnx")]
    assert failing_command(args, capsys) == (1, f"error: checkpoint {tmp_path / 'none.ckpt'}: no such file\n")
