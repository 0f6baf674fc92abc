"""Loads the compiled operators and registers their fake kernels with torch.library.

Autograd of `attention_pool` is registered in C++ (csrc/attention_pool.cpp, dispatch key
Autograd): a Python `register_autograd` costs more per call than the kernels at small shapes.
"""

import torch
from torch import Tensor

try:
    from ser_lightning import _C  # noqa: F401  (loading the library registers torch.ops.ser_lightning.*)

    LOAD_ERROR: str | None = None
except ImportError as err:  # not built, or built against another torch
    LOAD_ERROR = f"the compiled extension ser_lightning._C could not be loaded ({err})"


# Device types with a compiled kernel, read once from the dispatcher (fixed after loading).
KERNEL_DEVICES: frozenset[str] = frozenset(
    device
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key("ser_lightning::attention_pool", key)
)


def has_kernel(device_type: str) -> bool:
    """Whether the loaded extension has a kernel of the forward operator for this device type."""
    return LOAD_ERROR is None and device_type in KERNEL_DEVICES


def _fake_forward(a: Tensor, weight: Tensor, bias: Tensor, u: Tensor, lam: float, lengths: Tensor) -> tuple[Tensor, Tensor]:
    return a.new_empty(a.shape[0], a.shape[2]), a.new_empty(a.shape[0], a.shape[1])


def _fake_backward(
    grad_context: Tensor, grad_alpha: Tensor, a: Tensor, weight: Tensor, bias: Tensor, u: Tensor,
    alpha: Tensor, lam: float, lengths: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return a.new_empty(a.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape), u.new_empty(u.shape)


if LOAD_ERROR is None:
    torch.library.register_fake("ser_lightning::attention_pool")(_fake_forward)
    torch.library.register_fake("ser_lightning::attention_pool_backward")(_fake_backward)
