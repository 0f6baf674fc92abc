"""Length arithmetic for conv stacks over zero-padded, variable-length batches.

Time is the last axis of every tensor here. A batch holds utterances of different lengths,
zero-padded at the end; after every conv or pool layer the positions past each utterance's valid
length are set back to zero, so a padded layer never sees anything but the silence it would see
alone (its own zero padding). This is what makes per-sample outputs independent of the batch.
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ser_lightning.padding import length_mask

TimeGeometry = tuple[int, int, int, int]  # kernel, stride, padding, dilation along time


class ModelOutput(NamedTuple):
    """What every model returns.

    logits: (B, K); alpha: (B, L) attention weights, zero past positions[b]; positions: (B,) int64
    valid attention positions (a prefix of each row); grid: (F', T') of the 2-D model's last feature
    map, alpha[b, t * F' + f] being the weight of frequency f at time t; None for 1-D models. parts: (B, H, K)
    each head's own logits when a model has several (``SERModule``'s evaluation steps), else None.
    """

    logits: Tensor
    alpha: Tensor
    positions: Tensor
    grid: tuple[int, int] | None = None
    parts: Tensor | None = None


def conv_output_length(n: int | Tensor, kernel: int, stride: int, padding: int = 0, dilation: int = 1) -> int | Tensor:
    """Output length of a conv/pool layer (PyTorch's formula, floor mode) for input length n."""
    return (n + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def time_geometry(layer: nn.Module) -> TimeGeometry | None:
    """Kernel, stride, padding and dilation of a conv/max-pool layer along time; None for other layers."""
    if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.MaxPool1d, nn.MaxPool2d)):
        return None
    if isinstance(layer, (nn.MaxPool1d, nn.MaxPool2d)) and layer.ceil_mode:
        raise ValueError(f"{layer}: ceil_mode pooling is not supported by the length arithmetic")
    if isinstance(layer.padding, str):
        raise ValueError(f"{layer}: give padding as integers, not {layer.padding!r}")

    def last(value: int | Sequence[int]) -> int:
        return value if isinstance(value, int) else value[-1]

    return last(layer.kernel_size), last(layer.stride), last(layer.padding), last(layer.dilation)


def mask_time(x: Tensor, lengths: Tensor) -> Tensor:
    """Zero every time position t >= lengths[b] of row b (time is the last axis)."""
    valid = length_mask(lengths, x.shape[-1]).view(x.shape[0], *([1] * (x.dim() - 2)), x.shape[-1])
    return x * valid.to(x.dtype)


class MaskedStack(nn.Module):
    """A sequential conv/pool/activation stack that carries the valid time length of each row.

    Activations and normalisations used here (ReLU, LocalResponseNorm, Dropout) map 0 to 0 and do not
    mix time positions, so only conv and pool layers change lengths and need re-masking.
    """

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.geometries = [time_geometry(layer) for layer in self.layers]
        self.min_input_length = self._min_input_length()

    def output_length(self, n: int | Tensor) -> int | Tensor:
        """Length along time after the whole stack for input length n (int or int64 tensor)."""
        for geometry in self.geometries:
            if geometry is not None:
                n = conv_output_length(n, *geometry)
        return n

    def _min_input_length(self) -> int:
        n = 1
        while self.output_length(n) < 1:
            n += 1
        return n

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Run the stack; returns the masked output and the valid output lengths. A batch without padding (every row
        full, as the windows of streams) has nothing to mask at any layer, so its masks are skipped."""
        if _unpadded(lengths, x.shape[-1]):  # every row stays full: its length is the output's
            x = self.layers(x)
            return x, torch.full_like(lengths, x.shape[-1])
        x = mask_time(x, lengths)
        for layer, geometry in zip(self.layers, self.geometries):
            x = layer(x)
            if geometry is not None:
                lengths = conv_output_length(lengths, *geometry)
                x = mask_time(x, lengths)
        return x, lengths


def _unpadded(lengths: Tensor, frames: int) -> bool:
    """Whether every row is ``frames`` long, when that is known without waiting for a device or tracing a graph (eager
    CPU only; elsewhere False: the masks are applied, which changes nothing)."""
    if lengths.device.type != "cpu" or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return bool((lengths == frames).all())


def pad_to_min_length(features: Tensor, lengths: Tensor, min_length: int) -> tuple[Tensor, Tensor]:
    """Zero-pad the time axis to at least min_length and clamp lengths up to it.

    Clips shorter than the stack's receptive field are treated as if followed by silence: they are
    padded, never dropped.
    """
    if features.shape[-1] < min_length:
        features = nn.functional.pad(features, (0, min_length - features.shape[-1]))
    return features, lengths.clamp(min=min_length)


def check_lengths(features: Tensor, lengths: Tensor | None) -> Tensor:
    """Validate lengths against (B, ..., N) features; None means every row is full.

    Lengths outside 1..N are an error on every device. On the CPU the check is eager (ValueError);
    on a GPU and under torch.compile or tracing it is an asynchronous assertion, so the forward
    never waits for the device (the error then surfaces at the next synchronisation).
    """
    batch, frames = features.shape[0], features.shape[-1]
    if lengths is None:
        return torch.full((batch,), frames, dtype=torch.int64, device=features.device)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
    lengths = lengths.to(device=features.device, dtype=torch.int64)
    message = f"lengths must lie in 1..{frames} (the padded number of frames)"
    eager = lengths.device.type == "cpu" and not (torch.compiler.is_compiling() or torch.jit.is_tracing())
    if eager:
        if bool(((lengths < 1) | (lengths > frames)).any()):
            raise ValueError(f"{message}, got {lengths.tolist()}")
    elif not torch.jit.is_tracing():
        torch._assert_async(((lengths >= 1) & (lengths <= frames)).all(), message)
    return lengths
