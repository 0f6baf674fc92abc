"""Attention pooling layer: learnable parameters around `ser_lightning.ops.attention_pool`."""

from typing import Literal

import torch
from torch import Tensor, nn

from ser_lightning.ops import attention_pool

Backend = Literal["auto", "fused", "reference"]
BACKENDS = ("auto", "fused", "reference")


class AttentionPool(nn.Module):
    """Pools (B, L, C) annotations into a (B, C) context with softmax(lam * u . tanh(W a + b)) weights.

    Args:
        channels: C, the size of each annotation vector.
        dim: D, the size of the attention projection (default C).
        lam: the softmax sharpness lambda (> 0).
        backend: "fused" (the compiled operator; error if not built), "reference" (pure PyTorch)
            or "auto" (fused when available for the input's device, else reference).
    """

    def __init__(self, channels: int, dim: int | None = None, lam: float = 1.0, backend: Backend = "auto") -> None:
        super().__init__()
        dim = channels if dim is None else dim
        self.lam = float(lam)
        self.backend = backend
        self.weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(dim, channels)))
        self.bias = nn.Parameter(torch.zeros(dim))
        # small u: attention starts close to uniform pooling and sharpens as u grows
        self.u = nn.Parameter(nn.init.normal_(torch.empty(dim), std=0.1))

    def forward(self, a: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """a: (B, L, C), lengths: (B,) valid positions (a prefix of each row) -> (context (B, C), alpha (B, L))."""
        # under mixed precision the annotations arrive in half/bfloat16: compute in their dtype, as nn.Linear does
        weight, bias, u = (p.to(a.dtype) for p in (self.weight, self.bias, self.u))
        return attention_pool(a, weight, bias, u, self.lam, lengths, backend=self.backend)

    def extra_repr(self) -> str:
        dim, channels = self.weight.shape
        return f"channels={channels}, dim={dim}, lam={self.lam}, backend={self.backend!r}"
