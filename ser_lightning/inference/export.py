"""ONNX export of a trained model, checked against PyTorch with onnxruntime.

The exported graph maps ``features`` (B, F, N) float32 (raw features, zero-padded in time) and
``lengths`` (B,) int64 (valid frames) to ``probabilities`` (B, K) and ``alpha`` (B, L) (attention
weights, zero past each row's valid positions); B and N are dynamic. It contains the model's own
normalisation (training-split statistics) and the attention in its pure-PyTorch reference form.

Feature extraction is not in the graph: compute features in Python with
``ser_lightning.data.features.FeatureExtractor`` (torchaudio), configured as in training
(``EmotionRecognizer.from_checkpoint(...).extractor``). Inputs need at least ``min_input_frames``
frames (stored with the class names and the feature configuration in the ONNX metadata): the
PyTorch model zero-pads shorter clips itself, the graph does not. With the ``ssl`` front end
(``data.feature.name: ssl``) the self-supervised speech model stays in PyTorch as well: the graph is
the classification head only, taking that model's hidden states (F = its width, one frame per 20 ms)
as ``features``.

The graph is produced by the dynamo-based ``torch.onnx.export`` (``torch.export`` with dynamic
shapes). Max pooling is traced as ``unfold`` + ``amax``, which computes exactly the same maxima:
the max-pool shape rules otherwise add parity guards that pin the time axis to the example's length.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ser_lightning.functionals import speaker_stats_width
from ser_lightning.errors import DataError
from ser_lightning.models.attention import AttentionPool
from ser_lightning.outputs import atomic_path
from ser_lightning.padding import length_mask

INPUT_NAMES = ["features", "lengths"]
OUTPUT_NAMES = ["probabilities", "alpha"]


class UnfoldMaxPool(nn.Module):
    """Max pooling over the last one or two axes as unfold + amax (no padding, no dilation)."""

    def __init__(self, pool: nn.MaxPool1d | nn.MaxPool2d) -> None:
        super().__init__()
        dims = 1 if isinstance(pool, nn.MaxPool1d) else 2

        def pair(value: Any) -> tuple[int, ...]:
            return (value,) * dims if isinstance(value, int) else tuple(value)

        if any(pair(pool.padding)) or any(d != 1 for d in pair(pool.dilation)) or pool.ceil_mode:
            raise ValueError(f"export: {pool} has padding, dilation or ceil_mode, which the rewrite does not handle")
        self.kernel, self.stride = pair(pool.kernel_size), pair(pool.stride or pool.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        first = x.dim() - len(self.kernel)
        # unfolding appends each window as a new trailing axis, so the pooled axes keep their indices
        for i, (kernel, stride) in enumerate(zip(self.kernel, self.stride)):
            x = x.unfold(first + i, kernel, stride)
        return x.amax(dim=tuple(range(-len(self.kernel), 0)))


class ExportWrapper(nn.Module):
    """SERModule -> (probabilities, alpha): the exported signature."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, features: Tensor, lengths: Tensor, speaker_stats: Tensor | None = None) -> tuple[Tensor, Tensor]:
        output = self.module(features, lengths, speaker_stats)
        return output.logits.softmax(dim=1), output.alpha


def _speaker_input(module: nn.Module) -> bool:
    """Whether the exported model takes each utterance's speaker statistics as a third input."""
    return module.hparams["normalization"] == "speaker"


def _speaker_width(module: nn.Module) -> int:
    """W of the (B, 2, W) speaker statistics: the feature rows, then the prosodic functionals with the pitch rows."""
    return speaker_stats_width(module.hparams["num_features"], bool(module.hparams.get("pitch_rows", False)))


def exportable(module: nn.Module) -> ExportWrapper:
    """An eval-mode copy of ``module`` with the reference attention and export-friendly pooling."""
    module = copy.deepcopy(module).cpu().float().eval()
    for child in module.modules():
        if isinstance(child, AttentionPool):
            child.backend = "reference"
        for name, grandchild in child.named_children():
            if isinstance(grandchild, (nn.MaxPool1d, nn.MaxPool2d)):
                setattr(child, name, UnfoldMaxPool(grandchild))
    return ExportWrapper(module).eval()


@dataclasses.dataclass
class ParityCase:
    """One onnxruntime-vs-PyTorch comparison."""

    batch: int
    frames: int
    lengths: list[int]
    probabilities_diff: float
    alpha_diff: float

    @property
    def max_diff(self) -> float:
        return max(self.probabilities_diff, self.alpha_diff)


@dataclasses.dataclass
class ExportReport:
    """What ``export_onnx`` wrote and how closely onnxruntime reproduces PyTorch."""

    path: Path
    cases: list[ParityCase]
    tolerance: float

    @property
    def max_diff(self) -> float:
        return max(case.max_diff for case in self.cases)

    def __str__(self) -> str:
        lines = [f"wrote {self.path}"]
        for c in self.cases:
            lines.append(
                f"  batch {c.batch}, frames {c.frames}, lengths {c.lengths}: max |diff| probabilities "
                f"{c.probabilities_diff:.2e}, alpha {c.alpha_diff:.2e}"
            )
        lines.append(f"onnxruntime vs PyTorch: max abs diff {self.max_diff:.2e} (tolerance {self.tolerance:.0e})")
        return "\n".join(lines)


def _export_min_frames(module: nn.Module) -> int:
    """Shortest input the exporter traces symbolically: it assumes every dynamic size is at least 2."""
    n = module.model.min_input_frames
    while module.model.stack.output_length(n) < 2:
        n += 1
    return n


def _parity_inputs(module: nn.Module, export_min: int) -> list[tuple[Tensor, Tensor]]:
    """Feature batches of varying sizes, drawn around the training-split statistics (fixed seed)."""
    generator = torch.Generator().manual_seed(0)
    min_frames = module.model.min_input_frames
    cases = [
        (1, [min_frames]),
        (3, [export_min + 150, min_frames, export_min + 7]),
        (2, [export_min + 613, 3 * export_min]),
    ]
    inputs = []
    for batch, sizes in cases:
        lengths, frames = torch.tensor(sizes, dtype=torch.int64), max(sizes)
        noise = torch.randn(batch, module.hparams.num_features, frames, generator=generator)
        features = module.feature_mean[None, :, None].cpu() + module.feature_std[None, :, None].cpu() * noise
        case = (features * length_mask(lengths, frames)[:, None, :], lengths)
        if _speaker_input(module):  # speakers near the training statistics; functionals around a unit z-score
            mean = module.feature_mean.cpu() + 0.1 * torch.randn(batch, module.hparams.num_features, generator=generator)
            std = module.feature_std.cpu() * (1 + 0.1 * torch.rand(batch, module.hparams.num_features, generator=generator))
            extra = _speaker_width(module) - module.hparams.num_features
            mean = torch.cat([mean, torch.randn(batch, extra, generator=generator)], dim=1)
            std = torch.cat([std, 1 + torch.rand(batch, extra, generator=generator)], dim=1)
            case += (torch.stack([mean, std], dim=1),)
        inputs.append(case)
    return inputs


def _metadata(module: nn.Module, feature: Any) -> dict[str, str]:
    hparams = module.hparams
    data = {
        "arch": hparams["arch"],
        "class_names": json.dumps(list(hparams["class_names"])),
        "num_features": str(hparams["num_features"]),
        "min_input_frames": str(module.model.min_input_frames),
        "inputs": "features (B, F, N) float32 raw features zero-padded in time; lengths (B,) int64 valid frames"
        + (f"; speaker_stats (B, 2, {_speaker_width(module)}) float32 mean and std of each utterance's speaker "
           "(its feature rows, then its prosodic functionals)" if _speaker_input(module) else ""),
        "outputs": "probabilities (B, K); alpha (B, L) attention weights",
    }
    if feature is not None:
        data["feature"] = json.dumps(dataclasses.asdict(feature))
    return data


def export_onnx(module: nn.Module, path: str | Path, *, feature: Any = None, tolerance: float = 1e-4) -> ExportReport:
    """Export a SERModule to ONNX at ``path`` and compare onnxruntime's outputs with PyTorch's.

    ``feature``: the FeatureConfig to record in the ONNX metadata. The file is written and checked
    under a temporary name and renamed to ``path`` only when it passes: a failure leaves the old file
    (or none). Raises ``ExportMismatchError`` when the largest absolute difference exceeds ``tolerance``.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        report = _export_and_check(module, tmp, feature, tolerance)
    return dataclasses.replace(report, path=path)


class ExportMismatchError(DataError, RuntimeError):
    """onnxruntime's outputs differ from PyTorch's by more than the tolerance."""


def _export_and_check(module: nn.Module, path: Path, feature: Any, tolerance: float) -> ExportReport:
    import onnx
    import onnxruntime

    wrapper = exportable(module)
    export_min = _export_min_frames(wrapper.module)
    num_features = wrapper.module.hparams.num_features
    example = (
        torch.zeros(2, num_features, export_min + 11),
        torch.tensor([export_min + 11, export_min], dtype=torch.int64),
    )
    batch, frames = torch.export.Dim("batch", min=1), torch.export.Dim("frames", min=export_min)
    dynamic = {"features": {0: batch, 2: frames}, "lengths": {0: batch}}
    input_names = list(INPUT_NAMES)
    if _speaker_input(wrapper.module):
        width = _speaker_width(wrapper.module)
        example += (torch.stack([torch.zeros(2, width), torch.ones(2, width)], dim=1),)
        dynamic["speaker_stats"] = {0: batch}
        input_names.append("speaker_stats")
    with warnings.catch_warnings():  # the inputs share the batch axis, which the exporter remarks on
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used", category=UserWarning)
        program = torch.onnx.export(
            wrapper, example, input_names=input_names, output_names=OUTPUT_NAMES, dynamic_shapes=dynamic,
            dynamo=True, verbose=False,
        )
    program.save(str(path), external_data=False)
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, _metadata(wrapper.module, feature))
    onnx.save(model, str(path))

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    original = ExportWrapper(module).eval()  # compared with the model as trained, not the rewritten copy
    device = next(module.parameters()).device
    cases = []
    with torch.no_grad():
        for case in _parity_inputs(wrapper.module, export_min):
            features, lengths = case[0], case[1]
            probabilities, alpha = (t.float().cpu() for t in original(*(t.to(device) for t in case)))
            feeds = {name: tensor.numpy() for name, tensor in zip(input_names, case)}
            ort_probabilities, ort_alpha = session.run(OUTPUT_NAMES, feeds)
            cases.append(ParityCase(
                features.shape[0], features.shape[-1], lengths.tolist(),
                float(np.abs(ort_probabilities - probabilities.numpy()).max()),
                float(np.abs(ort_alpha - alpha.numpy()).max()),
            ))
    report = ExportReport(path, cases, tolerance)
    if not report.max_diff <= tolerance:
        raise ExportMismatchError(f"{report}\nonnxruntime differs from PyTorch by more than {tolerance:.0e}")
    return report
