"""Zhang et al. (2018): AlexNet's conv stack over the spectrogram, attention over its F' x T' positions."""

from pathlib import Path

import torch
from torch import Tensor, nn

from ser_lightning.models.attention import AttentionPool, Backend, Pooling
from ser_lightning.models.layers import MaskedStack, ModelOutput, check_lengths, pad_to_min_length

PAPER_CHANNELS = (96, 256, 384, 384, 256)  # the original AlexNet, as in the paper
TORCHVISION_CHANNELS = (64, 192, 384, 256, 256)  # torchvision's AlexNet, whose ImageNet weights can be loaded


class Zhang2D(nn.Module):
    """AlexNet-style 2-D FCN (conv 11/4, 5, 3, 3, 3; max-pool 3/2 after convs 1, 2, 5; ReLU; optional LRN after
    convs 1 and 2), attention over the last map's positions, dropout and a linear classifier.

    Input features (B, F, N) are read as a one-channel F x N image. The last map's positions are
    flattened time-major (index t * F' + f), so the valid positions of a padded row form a prefix.

    Args:
        num_features: F, the number of frequency bins (at least `min_input_frames`).
        num_classes: K.
        width: channel multiplier (channels are rounded, at least 1); < 1 makes the model CPU-sized.
        lam: attention softmax sharpness lambda.
        lrn: LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2) after convs 1 and 2.
        dropout: dropout probability before the classifier.
        attention_dim: attention projection size (default: the last map's channels).
        pretrained_alexnet: path of a local torchvision AlexNet state dict (e.g. the ImageNet weights
            file torchvision downloads, ``alexnet-owt-*.pth``). The conv stack then takes torchvision's
            channel counts (64, 192, 384, 256, 256) so the weights fit, and conv 1's RGB filters are
            summed into one input channel. Requires width 1.0. Nothing is ever downloaded.
        backend: attention backend ("auto", "fused", "reference").
        pooling: the attention's context: "mean" (weighted mean) or "mean_std" (weighted mean and spread).
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        width: float = 1.0,
        lam: float = 0.3,
        lrn: bool = True,
        dropout: float = 0.5,
        attention_dim: int | None = None,
        pretrained_alexnet: str | Path | None = None,
        backend: Backend = "auto",
        pooling: Pooling = "mean",
    ) -> None:
        super().__init__()
        base = PAPER_CHANNELS if pretrained_alexnet is None else TORCHVISION_CHANNELS
        c1, c2, c3, c4, c5 = (max(1, round(c * width)) for c in base)

        def norm() -> list[nn.Module]:
            return [nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)] if lrn else []

        self.stack = MaskedStack(
            [
                nn.Conv2d(1, c1, kernel_size=11, stride=4, padding=2),
                nn.ReLU(),
                *norm(),
                nn.MaxPool2d(3, 2),
                nn.Conv2d(c1, c2, kernel_size=5, padding=2),
                nn.ReLU(),
                *norm(),
                nn.MaxPool2d(3, 2),
                nn.Conv2d(c2, c3, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.Conv2d(c3, c4, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.Conv2d(c4, c5, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(3, 2),
            ]
        )
        # every kernel is square, so the frequency axis follows the same arithmetic as time
        if num_features < self.stack.min_input_length:
            raise ValueError(
                f"zhang2d needs at least {self.stack.min_input_length} frequency bins (feature rows), got {num_features}"
            )
        self.freq_positions = int(self.stack.output_length(num_features))
        self.attention = AttentionPool(c5, attention_dim, lam=lam, backend=backend, pooling=pooling)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.attention.out_features, num_classes)
        if pretrained_alexnet is not None:
            self.load_alexnet(pretrained_alexnet)

    @property
    def min_input_frames(self) -> int:
        """Shortest input (frames) that leaves one time position; shorter clips are padded with silence."""
        return self.stack.min_input_length

    def load_alexnet(self, path: str | Path) -> None:
        """Initialise the conv stack from a torchvision AlexNet state dict file (RGB filters summed to one channel)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model.pretrained_alexnet: no such file: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"model.pretrained_alexnet: cannot read {path} as a state dict: {error}") from error
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        conv_keys = [k for k in state if k.startswith("features.") and k.endswith(".weight")]
        conv_indices = sorted(int(k.split(".")[1]) for k in conv_keys)
        convs = [layer for layer in self.stack.layers if isinstance(layer, nn.Conv2d)]
        if len(conv_indices) != len(convs):
            raise ValueError(
                f"model.pretrained_alexnet: {path} is not an AlexNet state dict "
                f"(expected {len(convs)} 'features.<i>.weight' conv entries, found {len(conv_indices)})"
            )
        with torch.no_grad():
            for i, (index, conv) in enumerate(zip(conv_indices, convs)):
                weight, bias = state[f"features.{index}.weight"], state[f"features.{index}.bias"]
                if i == 0:
                    weight = weight.sum(dim=1, keepdim=True)
                if weight.shape != conv.weight.shape or bias.shape != conv.bias.shape:
                    raise ValueError(
                        f"model.pretrained_alexnet: conv {i + 1} in {path} has shape {tuple(weight.shape)}, "
                        f"the model expects {tuple(conv.weight.shape)}"
                    )
                conv.weight.copy_(weight)
                conv.bias.copy_(bias)

    def forward(self, features: Tensor, lengths: Tensor | None = None) -> ModelOutput:
        """features: (B, F, N) zero-padded in time; lengths: (B,) valid frames (default: all)."""
        lengths = check_lengths(features, lengths)
        features, lengths = pad_to_min_length(features, lengths, self.min_input_frames)
        maps, time_lengths = self.stack(features.unsqueeze(1), lengths)  # (B, C, F', T'), (B,)
        batch, channels, freq, time = maps.shape
        annotations = maps.permute(0, 3, 2, 1).reshape(batch, time * freq, channels)  # time-major
        positions = time_lengths * freq
        context, alpha = self.attention(annotations, positions)
        return ModelOutput(self.classifier(self.dropout(context)), alpha, positions, (freq, time))
