"""Attention pooling: the fused C++/CUDA operator with a pure-PyTorch reference and fallback."""

import warnings

import torch
from torch import Tensor

from ser_lightning.ops import fused
from ser_lightning.ops.reference import attention_pool_reference, check_attention_inputs

__all__ = ["attention_pool", "attention_pool_reference", "fused_available"]

BACKENDS = ("auto", "fused", "reference")
SUPPORTED_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}
_warned: set[str] = set()


def fused_available(device: torch.device | str) -> bool:
    """Whether the fused operator has a kernel for this device (built and, for CUDA, a GPU present)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return False
    return fused.has_kernel(device.type)


def _unavailable_reason(a: Tensor) -> str | None:
    """Why the fused kernel cannot take `a`, or None when it can."""
    if fused.LOAD_ERROR is not None:
        return fused.LOAD_ERROR
    if not fused_available(a.device):
        return f"the extension has no fused kernel for {a.device.type} (built without it, or no device present)"
    supported = SUPPORTED_DTYPES[a.device.type]
    if a.dtype not in supported:
        names = ", ".join(str(d).removeprefix("torch.") for d in supported)
        return f"the fused {a.device.type} kernel does not support {a.dtype} (supported: {names})"
    return None


def attention_pool(
    a: Tensor, weight: Tensor, bias: Tensor, u: Tensor, lam: float, lengths: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Attention pooling (see `attention_pool_reference`); `backend` is "auto", "fused" or "reference".

    "auto" uses the fused operator when it supports the device and dtype, else the reference with a
    warning given once per reason; "fused" raises RuntimeError when the fused operator is unavailable.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention_pool: unknown `backend` {backend!r}, expected one of {BACKENDS}")
    if backend == "reference":
        return attention_pool_reference(a, weight, bias, u, lam, lengths)
    reason = _unavailable_reason(a)
    if reason is not None:
        if backend == "fused":
            raise RuntimeError(f"attention_pool: backend='fused' is unavailable: {reason}")
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"attention_pool: using the reference implementation because {reason}", stacklevel=2)
        return attention_pool_reference(a, weight, bias, u, lam, lengths)
    # The CPU operator checks all its inputs itself, and the Python check costs as much as the kernel
    # at small shapes: there it only runs when the operator fails, to raise a ValueError naming the problem.
    if a.device.type != "cpu" or a.dim() != 3 or torch.compiler.is_compiling():
        check_attention_inputs(a, weight, bias, u, lam, lengths)
    if lengths is None:
        lengths = torch.full((a.shape[0],), a.shape[1], dtype=torch.int64, device=a.device)
    try:
        return torch.ops.ser_lightning.attention_pool(a, weight, bias, u, float(lam), lengths)
    except RuntimeError:
        check_attention_inputs(a, weight, bias, u, lam, lengths)
        raise
