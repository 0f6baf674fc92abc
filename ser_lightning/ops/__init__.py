"""Attention pooling: the fused C++/CUDA operator with a pure-PyTorch reference and fallback.

Contracts shared by every backend and device:

- `lam` is a fixed hyper-parameter, a finite Python number > 0. A tensor `lam` is rejected
  (TypeError) rather than losing its gradient in the fused operator.
- `lengths`, when given, lie in 1..L. A violation is an error on every device, and no call reads a
  CUDA tensor back to the host to check it: on CPU it raises at once (ValueError from this module,
  RuntimeError from the raw operator or from compiled code); on CUDA it raises a device-side
  assertion, which surfaces as a RuntimeError at the next synchronisation (and leaves the CUDA
  context unusable, as PyTorch's own index checks do). Validate lengths where they enter (the
  collate function builds them from the real frame counts) to keep errors early.

The CPU kernels exist once per instruction set (`cpu_capabilities()`); the best one the CPU
supports runs unless SER_LIGHTNING_CPU_CAPABILITY (avx512, avx2 or default; read at import) or
`set_cpu_capability` names another.
"""

import warnings

import torch
from torch import Tensor

from ser_lightning.ops import fused
from ser_lightning.ops.fused import compiled_cpu_capabilities, cpu_capabilities, cpu_capability
from ser_lightning.ops.reference import attention_pool_reference, check_attention_inputs, check_lam

__all__ = ["attention_pool", "attention_pool_reference", "compiled_cpu_capabilities", "cpu_capabilities",
           "cpu_capability", "fused_available", "set_cpu_capability"]

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


class set_cpu_capability:
    """Run the CPU kernels on the instruction-set path `name` (one of `cpu_capabilities()`).

    Takes effect at once; used as a context manager it restores the previous path on exit:

        with set_cpu_capability("avx2"):
            ...
    """

    def __init__(self, name: str) -> None:
        supported = cpu_capabilities()
        if name not in supported:
            compiled = compiled_cpu_capabilities()
            why = "this CPU does not support it" if name in compiled else "it is not a compiled path"
            raise ValueError(f"set_cpu_capability: `name` {name!r} is unavailable ({why}); "
                             f"this CPU runs {supported or 'none (the extension is not loaded)'}")
        self.previous = cpu_capability()
        torch.ops.ser_lightning._set_cpu_capability(name)

    def __enter__(self) -> "set_cpu_capability":
        return self

    def __exit__(self, *exc_info: object) -> None:
        torch.ops.ser_lightning._set_cpu_capability(self.previous)


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
    check_lam(lam)
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
    # at small shapes: there it only runs when the operator fails, to raise a ValueError naming the
    # problem. Elsewhere it checks shapes, dtypes and devices; the operator checks the lengths values.
    if a.device.type != "cpu" or a.dim() != 3 or torch.compiler.is_compiling():
        check_attention_inputs(a, weight, bias, u, lam, lengths, values=False)
    if lengths is None:
        lengths = torch.full((a.shape[0],), a.shape[1], dtype=torch.int64, device=a.device)
    try:
        return torch.ops.ser_lightning.attention_pool(a, weight, bias, u, float(lam), lengths)
    except RuntimeError:
        if a.device.type == "cpu":
            check_attention_inputs(a, weight, bias, u, lam, lengths)
        raise
