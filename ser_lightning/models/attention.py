"""Attention pooling layer: learnable parameters around `ser_lightning.ops.attention_pool`."""

from typing import Literal

import torch
from torch import Tensor, nn

from ser_lightning.ops import attention_pool

Backend = Literal["auto", "fused", "reference"]
BACKENDS = ("auto", "fused", "reference")
Pooling = Literal["mean", "mean_std"]
POOLINGS = ("mean", "mean_std")
SPREAD_FLOOR = 1e-5
"""Floor of the attended variance before its square root (a constant annotation has no spread, and no gradient there)."""


class AttentionPool(nn.Module):
    """Pools (B, L, C) annotations into a (B, C) context with softmax(lam * u . tanh(W a + b)) weights.

    Args:
        channels: C, the size of each annotation vector.
        dim: D, the size of the attention projection (default C).
        lam: the softmax sharpness lambda (> 0).
        backend: "fused" (the compiled operator; error if not built), "reference" (pure PyTorch)
            or "auto" (fused when available for the input's device, else reference).
        pooling: "mean" (the context is the attention-weighted mean) or "mean_std" (attentive statistics
            pooling, Okabe et al. 2018: the weighted mean and the weighted standard deviation, (B, 2C)).
    """

    def __init__(self, channels: int, dim: int | None = None, lam: float = 1.0, backend: Backend = "auto",
                 pooling: Pooling = "mean") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"attention pooling: must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        dim = channels if dim is None else dim
        self.lam = float(lam)
        self.backend = backend
        self.pooling = pooling
        self.weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(dim, channels)))
        self.bias = nn.Parameter(torch.zeros(dim))
        # small u: attention starts close to uniform pooling and sharpens as u grows
        self.u = nn.Parameter(nn.init.normal_(torch.empty(dim), std=0.1))

    @property
    def out_features(self) -> int:
        """Size of the context: C, or 2C with ``mean_std``."""
        channels = self.weight.shape[1]
        return 2 * channels if self.pooling == "mean_std" else channels

    def forward(self, a: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """a: (B, L, C), lengths: (B,) valid positions (a prefix of each row) -> (context (B, C or 2C), alpha (B, L))."""
        # under mixed precision the annotations arrive in half/bfloat16: compute in their dtype, as nn.Linear does
        weight, bias, u = (p.to(a.dtype) for p in (self.weight, self.bias, self.u))
        mean, alpha = attention_pool(a, weight, bias, u, self.lam, lengths, backend=self.backend)
        if self.pooling == "mean":
            return mean, alpha
        # alpha is exactly 0 past each row's length, so padded positions add nothing to the second moment
        second = torch.bmm(alpha.unsqueeze(1), a * a).squeeze(1)
        spread = (second - mean * mean).clamp_min(SPREAD_FLOOR).sqrt()
        return torch.cat([mean, spread], dim=1), alpha

    def extra_repr(self) -> str:
        dim, channels = self.weight.shape
        return f"channels={channels}, dim={dim}, lam={self.lam}, backend={self.backend!r}, pooling={self.pooling!r}"
