"""Pure-PyTorch attention pooling: the reference the fused operator is checked against."""

import math

import torch
from torch import Tensor

from ser_lightning.padding import length_mask


def check_lam(lam: float) -> None:
    """`lam` is a fixed hyper-parameter: a finite Python number > 0.

    A tensor is rejected rather than converted: the fused operator takes `lam` as a float, so a
    tensor's gradient would be lost silently (and reading a CUDA tensor would synchronise).
    """
    if isinstance(lam, Tensor):
        raise TypeError("attention_pool: `lam` must be a Python number (a fixed hyper-parameter), got a tensor; "
                        "its gradient is not supported (pass float(lam) to use its value)")
    if not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"attention_pool: `lam` must be finite and > 0, got {lam}")


def check_length_values(lengths: Tensor, positions: int) -> None:
    """The lengths contract, 1 <= lengths[b] <= L, without synchronising with a device.

    Host tensors in eager mode raise ValueError. CUDA tensors, and any tensor under torch.compile,
    get an asynchronous assertion (torch._assert_async): a violation raises RuntimeError at the next
    synchronisation (CUDA, a device-side assertion) or when the compiled code runs (CPU).
    """
    if lengths.device.type == "cpu" and not torch.compiler.is_compiling():
        low, high = int(lengths.min()), int(lengths.max())
        if low < 1 or high > positions:
            raise ValueError(f"attention_pool: `lengths` must lie in 1..L={positions}, got values in {low}..{high}")
        return
    valid = ((lengths >= 1) & (lengths <= positions)).all()
    torch._assert_async(valid, f"attention_pool: `lengths` must lie in 1..L={positions}")


def attention_input_problem(a: Tensor, weight: Tensor, bias: Tensor, u: Tensor, lengths: Tensor | None) -> str | None:
    """The first rule on the inputs' shapes, dtypes and devices that they break, as a message naming the argument;
    None when they fit. ``check_attention_inputs`` raises it (ValueError), the fake kernels give it to
    ``torch._check`` at trace time. Nothing here reads tensor values."""
    if a.dim() != 3:
        return f"attention_pool: `a` must be (B, L, C), got shape {tuple(a.shape)}"
    batch, positions, channels = a.shape
    if batch < 1 or positions < 1 or channels < 1:
        return f"attention_pool: `a` must have B, L, C >= 1, got shape {tuple(a.shape)}"
    if weight.dim() != 2 or weight.shape[1] != channels:
        return f"attention_pool: `weight` must be (D, C={channels}), got shape {tuple(weight.shape)}"
    dim = weight.shape[0]
    for name, t in (("bias", bias), ("u", u)):
        if t.shape != (dim,):
            return f"attention_pool: `{name}` must be (D={dim},), got shape {tuple(t.shape)}"
    for name, t in (("weight", weight), ("bias", bias), ("u", u)):
        if t.device != a.device:
            return f"attention_pool: `{name}` is on {t.device} but `a` is on {a.device}"
        if t.dtype != a.dtype:
            return f"attention_pool: `{name}` has dtype {t.dtype} but `a` has {a.dtype}"
    if lengths is not None:
        if lengths.shape != (batch,) or lengths.dtype != torch.int64:
            return (f"attention_pool: `lengths` must be int64 of shape ({batch},), "
                    f"got {lengths.dtype} of shape {tuple(lengths.shape)}")
        if lengths.device != a.device:
            return f"attention_pool: `lengths` is on {lengths.device} but `a` is on {a.device}"
    return None


def check_attention_inputs(
    a: Tensor, weight: Tensor, bias: Tensor, u: Tensor, lam: float, lengths: Tensor | None, values: bool = True
) -> None:
    """Raise naming the argument when shapes, devices or values do not fit.

    `values=False` leaves out the lengths contract (the fused operator checks it itself); nothing
    here reads a CUDA tensor back to the host.
    """
    check_lam(lam)
    problem = attention_input_problem(a, weight, bias, u, lengths)
    if problem is not None:
        raise ValueError(problem)
    if lengths is not None and values:
        check_length_values(lengths, a.shape[1])


def attention_pool_reference(
    a: Tensor, weight: Tensor, bias: Tensor, u: Tensor, lam: float, lengths: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Attention pooling over positions: returns (context (B, C), alpha (B, L)).

    e_i = u . tanh(weight @ a_i + bias); alpha = softmax(lam * e) over the first lengths[b]
    positions of row b (alpha is exactly 0 elsewhere); context = sum_i alpha_i a_i.
    """
    check_attention_inputs(a, weight, bias, u, lam, lengths)
    scores = lam * (torch.tanh(a @ weight.t() + bias) @ u)  # (B, L); |scores| <= lam * |u|_1
    if lengths is not None:
        scores = scores.masked_fill(~length_mask(lengths, a.shape[1]), float("-inf"))
    alpha = torch.softmax(scores, dim=1)
    context = torch.bmm(alpha.unsqueeze(1), a).squeeze(1)
    return context, alpha
