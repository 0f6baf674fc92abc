"""Loads the compiled operators, registers their fake kernels and wraps the utility operators.

The fake kernels check the inputs' shapes, dtypes and devices with ``torch._check`` (the rules of
``reference.attention_input_problem``), so that torch.compile and torch.export report a wrong shape
while tracing, as the compiled kernels would when run.

Autograd of `attention_pool` is registered in C++ (csrc/attention_pool.cpp, dispatch key
Autograd): a Python `register_autograd` costs more per call than the kernels at small shapes.
"""

import torch
from torch import Tensor

from ser_lightning.ops.reference import attention_input_problem

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


def cpu_capability() -> str | None:
    """The instruction-set path the CPU kernels run ("avx512", "avx2", "default"); None without the extension."""
    return None if LOAD_ERROR is not None else torch.ops.ser_lightning._cpu_capability()


def cpu_capabilities() -> list[str]:
    """The compiled paths this CPU can run, best first (empty without the extension)."""
    return [] if LOAD_ERROR is not None else list(torch.ops.ser_lightning._cpu_capabilities())


def compiled_cpu_capabilities() -> list[str]:
    """Every path compiled into the extension, whether or not this CPU can run it."""
    return [] if LOAD_ERROR is not None else list(torch.ops.ser_lightning._compiled_cpu_capabilities())


def set_wave_elements(elements: int) -> int:
    """Tests: cap the kernels' transient buffers at `elements` values (0 = defaults); returns the previous cap."""
    return torch.ops.ser_lightning._set_wave_elements(elements)


def backward_input_problem(
    grad_context: Tensor, grad_alpha: Tensor, a: Tensor, weight: Tensor, bias: Tensor, u: Tensor, alpha: Tensor,
    lengths: Tensor,
) -> str | None:
    """The forward's rules, then those of the gradients and alpha (as ``csrc/attention_pool.cpp`` checks them)."""
    problem = attention_input_problem(a, weight, bias, u, lengths)
    if problem is not None:
        return problem
    batch, positions, channels = a.shape
    for name, t in (("grad_alpha", grad_alpha), ("alpha", alpha)):
        if t.shape != (batch, positions):
            return f"attention_pool_backward: `{name}` must be (B, L)=({batch}, {positions}), got shape {tuple(t.shape)}"
    if grad_context.shape != (batch, channels):
        return (f"attention_pool_backward: `grad_context` must be (B, C)=({batch}, {channels}), "
                f"got shape {tuple(grad_context.shape)}")
    for name, t in (("grad_context", grad_context), ("grad_alpha", grad_alpha), ("alpha", alpha)):
        if t.device != a.device:
            return f"attention_pool_backward: `{name}` is on {t.device} but `a` is on {a.device}"
        if t.dtype != a.dtype:
            return f"attention_pool_backward: `{name}` has dtype {t.dtype} but `a` has {a.dtype}"
    return None


def _fake_forward(a: Tensor, weight: Tensor, bias: Tensor, u: Tensor, lam: float, lengths: Tensor) -> tuple[Tensor, Tensor]:
    problem = attention_input_problem(a, weight, bias, u, lengths)
    torch._check(problem is None, lambda: problem)
    return a.new_empty(a.shape[0], a.shape[2]), a.new_empty(a.shape[0], a.shape[1])


def _fake_backward(
    grad_context: Tensor, grad_alpha: Tensor, a: Tensor, weight: Tensor, bias: Tensor, u: Tensor,
    alpha: Tensor, lam: float, lengths: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    problem = backward_input_problem(grad_context, grad_alpha, a, weight, bias, u, alpha, lengths)
    torch._check(problem is None, lambda: problem)
    return a.new_empty(a.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape), u.new_empty(u.shape)


if LOAD_ERROR is None:
    torch.library.register_fake("ser_lightning::attention_pool")(_fake_forward)
    torch.library.register_fake("ser_lightning::attention_pool_backward")(_fake_backward)
    torch.library.register_fake("ser_lightning::_tanh")(lambda x: torch.empty_like(x))
    cpu_capability()  # reads SER_LIGHTNING_CPU_CAPABILITY now (a warning names a value it cannot honour)
