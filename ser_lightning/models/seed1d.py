"""The 1-D fully convolutional network of the "Emotion in Motion" course project (``seed1d``), with
attention over the time positions of one utterance."""

from torch import Tensor, nn

from ser_lightning.models.attention import AttentionPool, Backend, Pooling
from ser_lightning.models.layers import MaskedStack, ModelOutput, check_lengths, pad_to_min_length


CHANNELS = (5, 10, 20, 30)
"""The course project's conv channels (width 1.0)."""


class Seed1D(nn.Module):
    """Conv 5/10/20/30 channels times ``width`` (kernels 11, 5, 3, 3; strides 4, 1, 1, 1; valid padding;
    ReLU; max-pool 3/2 after convs 1, 2, 4), attention over time positions (``pooling``: the weighted mean, or
    mean and spread), dropout and a linear classifier on the context.

    Input features (B, F, N) are read with the F feature rows as input channels.
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        lam: float = 0.8,
        attention_dim: int | None = None,
        width: float = 1.0,
        dropout: float = 0.0,
        backend: Backend = "auto",
        pooling: Pooling = "mean",
    ) -> None:
        super().__init__()
        c1, c2, c3, c4 = (max(1, round(channels * width)) for channels in CHANNELS)
        self.stack = MaskedStack(
            [
                nn.Conv1d(num_features, c1, kernel_size=11, stride=4),
                nn.ReLU(),
                nn.MaxPool1d(3, 2),
                nn.Conv1d(c1, c2, kernel_size=5),
                nn.ReLU(),
                nn.MaxPool1d(3, 2),
                nn.Conv1d(c2, c3, kernel_size=3),
                nn.ReLU(),
                nn.Conv1d(c3, c4, kernel_size=3),
                nn.ReLU(),
                nn.MaxPool1d(3, 2),
            ]
        )
        self.attention = AttentionPool(c4, attention_dim, lam=lam, backend=backend, pooling=pooling)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.attention.out_features, num_classes)

    @property
    def min_input_frames(self) -> int:
        """Shortest input (frames) that leaves one position; shorter clips are padded with silence."""
        return self.stack.min_input_length

    def forward(self, features: Tensor, lengths: Tensor | None = None) -> ModelOutput:
        """features: (B, F, N) zero-padded in time; lengths: (B,) valid frames (default: all)."""
        lengths = check_lengths(features, lengths)
        features, lengths = pad_to_min_length(features, lengths, self.min_input_frames)
        maps, positions = self.stack(features, lengths)  # (B, C, T'), (B,)
        context, alpha = self.attention(maps.transpose(1, 2), positions)
        return ModelOutput(self.classifier(self.dropout(context)), alpha, positions)
