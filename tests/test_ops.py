"""Fused attention operator: parity with the reference, gradients, registration, contracts, backends.

Each check is one body, parametrised over targets: every CPU instruction-set path compiled into the
extension (ids cpu-avx512, cpu-avx2, cpu-default; a path this CPU lacks is skipped, naming it) for
parity and gradcheck, the active CPU path for the rest, and CUDA (marked `cuda`, skipped without a
GPU: `pytest -m cuda tests/test_ops.py` runs exactly those), plus cuda:1 when a second GPU exists.

Tests that can fail: lam stays where the softmax is not one-hot and every parity case asserts that
the reference's outputs and gradients are far above the tolerance, so a kernel returning zeros or
garbage fails. Cases reach the kernels' edges: L = 1, C = 1, D != C, N = 64 (the narrow path's
limit), C > 256 (the CUDA block), C = 1, 2, 3, 7, 12, 64 (every lane-group width, 1 to 32, of
the CUDA backward dot kernel), more than 256 tiles of 64 positions, a batch beyond grid.y's 65535,
ragged lengths (padding must be exactly 0 in alpha and grad_a), and small wave budgets that split
utterances across waves (CPU wide path and CUDA).

Tolerances. float32 results are compared with the float64 reference, relative to the largest
magnitude of each compared tensor: |fused - ref| <= max(1e-4 * max|ref|, 2 * |ref32 - ref|) + 1e-6,
where ref32 is the reference run in float32 on the same device. float64 must match to 1e-10. On
CUDA, float16 and bfloat16 are compared with the float32 reference on the same (rounded) inputs:
2e-2 (float16) and 6e-2 (bfloat16) relative to the largest magnitude.
"""

import functools
import os
import re
import subprocess
import sys
import textwrap
import warnings
from contextlib import nullcontext
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import ser_lightning.ops as ops
from ser_lightning.ops import (attention_pool, attention_pool_reference, compiled_cpu_capabilities, cpu_capabilities,
                               cpu_capability, fused, fused_available, set_cpu_capability)

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]
SECOND_GPU = pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs a second CUDA GPU")


def cpu_paths() -> list:
    """One target per compiled CPU path ("cpu:<path>"); paths this CPU cannot run are skipped."""
    supported = cpu_capabilities()
    return [pytest.param(f"cpu:{name}", id=f"cpu-{name}",
                         marks=pytest.mark.skipif(name not in supported, reason=f"this CPU cannot run the {name} path"))
            for name in compiled_cpu_capabilities() or ["default"]]


CPU_PATHS = cpu_paths()
CUDA_DEVICES = [pytest.param("cuda", marks=CUDA), pytest.param("cuda:1", marks=[*CUDA, SECOND_GPU])]
ALL_PATHS = CPU_PATHS + CUDA_DEVICES
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=CUDA)]


@pytest.fixture
def device(request):
    """The device of a target; a "cpu:<path>" target runs with that instruction-set path."""
    target = request.param
    scope = set_cpu_capability(target.split(":")[1]) if target.startswith("cpu:") else nullcontext()
    with scope:
        yield target.split(":")[0] if target.startswith("cpu") else target


@pytest.fixture
def wave_elements(request):
    """Caps the kernels' transient buffers (values) for the test; None keeps the defaults. Small caps
    mean hundreds of tiny GEMMs per call: one CPU thread keeps them from waiting on each other's
    scheduler slices when the machine is busy."""
    previous, threads = fused.set_wave_elements(request.param or 0), torch.get_num_threads()
    if request.param:
        torch.set_num_threads(1)
    yield request.param
    fused.set_wave_elements(previous)
    torch.set_num_threads(threads)


def make_inputs(shape, dtype=torch.float64, device="cpu", lengths="ragged", seed=0, noncontiguous=False):
    """Random (a, weight, bias, u, lengths); lengths are ragged (first row full, last row 1), a list, or None."""
    B, L, C, D = shape
    g = torch.Generator().manual_seed(seed)
    if noncontiguous:  # a from a (B, C, L) base, weight from a (C, D) base, u and bias sliced
        a = torch.randn(B, C, L, generator=g, dtype=torch.float64).transpose(1, 2)
        weight = (torch.randn(C, D, generator=g, dtype=torch.float64) / C**0.5).t()
        bias = (0.1 * torch.randn(2 * D, generator=g, dtype=torch.float64))[::2]
        u = torch.randn(D, 2, generator=g, dtype=torch.float64)[:, 1]
    else:
        a = torch.randn(B, L, C, generator=g, dtype=torch.float64)
        weight = torch.randn(D, C, generator=g, dtype=torch.float64) / C**0.5
        bias = 0.1 * torch.randn(D, generator=g, dtype=torch.float64)
        u = torch.randn(D, generator=g, dtype=torch.float64) / D**0.5
    if lengths == "ragged":
        lens = torch.randint(1, L + 1, (B,), generator=g)
        lens[0] = L
        if B > 1:
            lens[-1] = 1
    elif lengths is None:
        lens = None
    else:
        lens = torch.tensor(lengths)
    tensors = [t.to(device=device, dtype=dtype) for t in (a, weight, bias, u)]
    return (*tensors, None if lens is None else lens.to(device))


def forward_backward(fn, a, weight, bias, u, lam, lengths, seed=1):
    """Outputs and the gradients of a random linear function of both outputs w.r.t. a, weight, bias, u."""
    leaves = [t.detach().requires_grad_() for t in (a, weight, bias, u)]  # keeps strides
    context, alpha = fn(*leaves, lam, lengths)
    g = torch.Generator().manual_seed(seed)
    grad_context = torch.randn(context.shape, generator=g, dtype=torch.float64).to(context)
    grad_alpha = torch.randn(alpha.shape, generator=g, dtype=torch.float64).to(alpha)
    grads = torch.autograd.grad((context * grad_context).sum() + (alpha * grad_alpha).sum(), leaves)
    return [context.detach(), alpha.detach(), *grads]


def fused_fn(*args):
    return attention_pool(*args, backend="fused")


NAMES = ("context", "alpha", "grad_a", "grad_weight", "grad_bias", "grad_u")


def assert_close_scaled(actual, expected, rel, baseline=None):
    """max|actual - expected| <= max(rel * max|expected|, 2 * max|baseline - expected|) + 1e-6, per tensor."""
    for k, (name, x, y) in enumerate(zip(NAMES, actual, expected)):
        x, y = x.cpu().double(), y.cpu().double()
        allowed = rel * y.abs().max().item()
        if baseline is not None:
            allowed = max(allowed, 2 * (baseline[k].cpu().double() - y).abs().max().item())
        err = (x - y).abs().max().item()
        assert err <= allowed + 1e-6, f"{name}: max error {err:.3g} > allowed {allowed:.3g}"


def assert_informative(expected):
    """Every compared tensor is at least 100x the absolute tolerance (1e-6), so a wrong kernel fails."""
    for name, t in zip(NAMES, expected):
        assert t.abs().max().item() > 1e-4, f"{name} is ~0: the case checks nothing"


# --------------------------------------------------------------------------------------------
# Parity and gradients

# name: ((B, L, C, D), lengths, lam)
PARITY_CASES = {
    "L1-C1-D1": ((1, 1, 1, 1), "ragged", 0.3),
    "L1-D>C": ((2, 1, 3, 5), None, 2.0),
    "C1": ((3, 7, 1, 4), "ragged", 2.0),
    "C2": ((4, 90, 2, 3), "ragged", 2.0),
    "C7": ((5, 130, 7, 9), "ragged", 2.0),
    "narrow": ((5, 33, 16, 24), "ragged", 2.0),
    "narrow-N64": ((4, 40, 64, 63), "ragged", 3.0),
    "wide-D": ((6, 50, 12, 70), "ragged", 2.0),
    "wide-C>256": ((3, 70, 300, 20), "ragged", 2.0),
    "tiles>256": ((2, 16500, 3, 5), [16500, 9000], 3.0),
    "batch>65535": ((70000, 2, 3, 2), "ragged", 3.0),
}


@pytest.mark.parametrize("device", ALL_PATHS, indirect=True)
@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_parity_float32(device, case):
    shape, lengths, lam = PARITY_CASES[case]
    inputs = make_inputs(shape, lengths=lengths, seed=len(case))
    expected = forward_backward(attention_pool_reference, *inputs[:4], lam, inputs[4])
    if case not in ("L1-C1-D1", "L1-D>C"):  # a single position: alpha is 1 and has no gradient
        assert_informative(expected)
    on_device = [t.to(device, torch.float32) for t in inputs[:4]]
    lens = None if inputs[4] is None else inputs[4].to(device)
    actual = forward_backward(fused_fn, *on_device, lam, lens)
    baseline = forward_backward(attention_pool_reference, *on_device, lam, lens)
    assert all(t.device.type == torch.device(device).type and t.dtype == torch.float32 for t in actual)
    assert_close_scaled(actual, expected, rel=1e-4, baseline=baseline)


# Waves of 150 values split every utterance of this case on CUDA (forward and backward) and cut the
# CPU wide path into chunks of 2 rows, packed (short utterances) or direct (prefixes >= 128 rows).
@pytest.mark.parametrize("wave_elements", [150], indirect=True)
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_parity_across_waves(device, wave_elements):
    a, weight, bias, u, lengths = make_inputs((4, 300, 70, 9), lengths=[300, 200, 5, 1], seed=4)
    expected = forward_backward(attention_pool_reference, a, weight, bias, u, 2.0, lengths)
    on_device = [t.to(device, torch.float32) for t in (a, weight, bias, u)]
    actual = forward_backward(fused_fn, *on_device, 2.0, lengths.to(device))
    baseline = forward_backward(attention_pool_reference, *on_device, 2.0, lengths.to(device))
    assert_close_scaled(actual, expected, rel=1e-4, baseline=baseline)


@pytest.mark.parametrize("device", CPU_PATHS, indirect=True)
@pytest.mark.parametrize("shape", [(4, 9, 6, 3), (3, 300, 19, 9), (3, 20, 70, 5)], ids=["short", "long", "wide"])
def test_parity_float64_noncontiguous(device, shape):
    a, weight, bias, u, lengths = make_inputs(shape, noncontiguous=True, seed=3)
    assert not (a.is_contiguous() or weight.is_contiguous() or u.is_contiguous() or bias.is_contiguous())
    actual = forward_backward(fused_fn, a, weight, bias, u, 0.8, lengths)
    expected = forward_backward(attention_pool_reference, a, weight, bias, u, 0.8, lengths)
    for x, y in zip(actual, expected):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", CPU_PATHS, indirect=True)
@pytest.mark.parametrize("shape,lengths", [((3, 6, 4, 5), "ragged"), ((3, 6, 4, 5), None), ((2, 4, 3, 65), "ragged")],
                         ids=["narrow-ragged", "narrow-full", "wide-ragged"])
def test_gradcheck_float64(device, shape, lengths):
    """float64 runs on CPU only (the CUDA kernels accumulate in float32)."""
    a, weight, bias, u, lens = make_inputs(shape, lengths=lengths, seed=7)
    leaves = [t.requires_grad_() for t in (a, weight, bias, u)]
    assert torch.autograd.gradcheck(lambda *x: attention_pool(*x, 1.7, lens, backend="fused"), leaves)


@pytest.mark.parametrize("dtype,rel", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(4, 70, 30, 30), (2, 700, 256, 128)], ids=["narrow", "wide"])
@pytest.mark.parametrize("device", CUDA_DEVICES[:1], indirect=True)
def test_parity_half_precision(device, dtype, rel, shape):
    inputs = make_inputs(shape, dtype, device=device, seed=13)
    actual = forward_backward(fused_fn, *inputs[:4], 0.8, inputs[4])
    rounded = [t.float() for t in inputs[:4]]  # the same (rounded) inputs, in float32
    expected = forward_backward(attention_pool_reference, *rounded, 0.8, inputs[4])
    assert all(t.dtype == dtype for t in actual)
    assert_close_scaled(actual, expected, rel=rel)


@pytest.mark.parametrize("wave_elements", [None, 700], indirect=True, ids=["default-waves", "small-waves"])
@pytest.mark.parametrize("shape", [(4, 20, 5, 6), (4, 150, 70, 9)], ids=["narrow", "wide"])
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_padding_is_exactly_zero(device, shape, wave_elements):
    a, weight, bias, u, lengths = make_inputs(shape, torch.float32, device=device)
    context, alpha, grad_a, *_ = forward_backward(fused_fn, a, weight, bias, u, 0.8, lengths)
    for b, n in enumerate(lengths.tolist()):
        assert torch.all(alpha[b, n:] == 0) and torch.all(grad_a[b, n:] == 0)
        assert torch.all(alpha[b, :n] > 0) and torch.any(grad_a[b, :n] != 0)
        torch.testing.assert_close(alpha[b, :n].sum().cpu(), torch.tensor(1.0))


# --------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile

@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_opcheck_forward_and_backward(device):
    a, weight, bias, u, lengths = make_inputs((3, 70, 4, 6), torch.float32, device=device)
    for requires_grad in (False, True):
        args = [t.clone().requires_grad_(requires_grad) for t in (a, weight, bias, u)]
        torch.library.opcheck(torch.ops.ser_lightning.attention_pool.default, (*args, 0.8, lengths))
    context, alpha = torch.ops.ser_lightning.attention_pool(a, weight, bias, u, 0.8, lengths)
    torch.library.opcheck(
        torch.ops.ser_lightning.attention_pool_backward.default,
        (torch.randn_like(context), torch.randn_like(alpha), a, weight, bias, u, alpha, 0.8, lengths),
    )


FORWARD = {"a": (2, 5, 4), "weight": (6, 4), "bias": (6,), "u": (6,)}
WRONG_INPUTS = [
    # (operator, the inputs that differ from fitting ones, the start of the error naming the argument)
    ("forward", {"a": torch.empty(5, 4)}, "attention_pool: `a` must be (B, L, C), got shape (5, 4)"),
    ("forward", {"weight": torch.empty(6, 3)}, "attention_pool: `weight` must be (D, C=4), got shape (6, 3)"),
    ("forward", {"u": torch.empty(5)}, "attention_pool: `u` must be (D=6,), got shape (5,)"),
    ("forward", {"bias": torch.empty(6, dtype=torch.float64)},
     "attention_pool: `bias` has dtype torch.float64 but `a` has torch.float32"),
    ("forward", {"lengths": torch.ones(2, dtype=torch.int32)},
     "attention_pool: `lengths` must be int64 of shape (2,), got torch.int32 of shape (2,)"),
    ("backward", {"grad_alpha": torch.empty(2, 4)},
     "attention_pool_backward: `grad_alpha` must be (B, L)=(2, 5), got shape (2, 4)"),
    ("backward", {"grad_context": torch.empty(2, 4, dtype=torch.float64)},
     "attention_pool_backward: `grad_context` has dtype torch.float64 but `a` has torch.float32"),
]


@pytest.mark.parametrize("operator, wrong, message", WRONG_INPUTS, ids=[m.split(": ")[1] for _, _, m in WRONG_INPUTS])
def test_fake_kernels_refuse_wrong_shapes_and_dtypes_at_trace_time(operator, wrong, message):
    """Traced with fake tensors (no data, no kernel runs), a wrong input fails naming the argument, in the fake
    kernels' words (the compiled kernels word their shapes differently); fitting inputs give the outputs' shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fitting = {name: torch.empty(shape) for name, shape in FORWARD.items()} | {
            "lengths": torch.ones(2, dtype=torch.int64), "grad_context": torch.empty(2, 4),
            "grad_alpha": torch.empty(2, 5), "alpha": torch.empty(2, 5)}
        inputs = fitting | {name: mode.from_tensor(t) for name, t in wrong.items()}
        forward = [inputs[name] for name in ("a", "weight", "bias", "u")] + [0.8, inputs["lengths"]]
        backward = [inputs["grad_context"], inputs["grad_alpha"], *forward[:4], inputs["alpha"], *forward[4:]]
        op, args = ((torch.ops.ser_lightning.attention_pool, forward) if operator == "forward"
                    else (torch.ops.ser_lightning.attention_pool_backward, backward))
        with pytest.raises(RuntimeError, match="^" + re.escape(message)):
            op(*args)
        fitting_forward = [fitting[name] for name in ("a", "weight", "bias", "u")] + [0.8, fitting["lengths"]]
        context, alpha = torch.ops.ser_lightning.attention_pool(*fitting_forward)
        assert context.shape == (2, 4) and alpha.shape == (2, 5)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_compile_fullgraph_matches_eager(device, compile_backend):
    torch._dynamo.reset()
    a, weight, bias, u, lengths = make_inputs((3, 90, 16, 8), torch.float32, device=device)
    compiled = torch.compile(fused_fn, fullgraph=True, backend=compile_backend)
    # lengths=None adds torch.full to the graph, which costs inductor a C++ compile: aot_eager covers it.
    for lens in (lengths, None) if compile_backend == "aot_eager" else (lengths,):
        for x, y in zip(forward_backward(compiled, a, weight, bias, u, 0.8, lens),
                        forward_backward(fused_fn, a, weight, bias, u, 0.8, lens)):
            torch.testing.assert_close(x, y)


# --------------------------------------------------------------------------------------------
# Contracts: lengths, lam, no host synchronisation, streams

BAD_LENGTHS = {"zero": [0, 5], "negative": [-5, 2], "above_L": [6, 5]}


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("bad", list(BAD_LENGTHS))
def test_lengths_out_of_range_raise_on_cpu(bad, backend):
    """Eager raises ValueError naming `lengths`; the raw operator and compiled code raise RuntimeError."""
    a, weight, bias, u, _ = make_inputs((2, 5, 4, 6), torch.float32)
    lengths = torch.tensor(BAD_LENGTHS[bad])
    with pytest.raises(ValueError, match="`lengths` must lie in 1..L=5"):
        attention_pool(a, weight, bias, u, 0.8, lengths, backend=backend)
    with pytest.raises(RuntimeError, match="`lengths` must lie in 1..L=5"):
        torch.ops.ser_lightning.attention_pool(a, weight, bias, u, 0.8, lengths)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *x: attention_pool(*x, backend=backend), fullgraph=True, backend="aot_eager")
    compiled(a, weight, bias, u, 0.8, torch.tensor([5, 2]))
    with pytest.raises(RuntimeError, match="`lengths` must lie in 1..L=5"):
        compiled(a, weight, bias, u, 0.8, lengths)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_lengths_out_of_range_assert_on_cuda(backend):
    """CUDA checks lengths without a host sync: a device-side assertion, surfacing at the next sync.
    It leaves the CUDA context unusable, hence a subprocess."""
    script = textwrap.dedent(f"""
        import torch
        from ser_lightning.ops import attention_pool
        a, w, b, u = torch.randn(2, 5, 4, device="cuda"), torch.randn(6, 4, device="cuda"), torch.zeros(6, device="cuda"), torch.randn(6, device="cuda")
        try:
            attention_pool(a, w, b, u, 0.8, torch.tensor([0, 5], device="cuda"), backend="{backend}")
            torch.cuda.synchronize()
            print("NO ERROR")
        except RuntimeError as err:
            print("RAISED", err)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert "RAISED" in proc.stdout and "device-side assert" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_tensor_lam_is_rejected(backend):
    """lam is a fixed hyper-parameter: a tensor would lose its gradient in the fused operator."""
    a, weight, bias, u, lengths = make_inputs((2, 3, 4, 5), torch.float32)
    with pytest.raises(TypeError, match="`lam` must be a Python number"):
        attention_pool(a, weight, bias, u, torch.tensor(0.8, requires_grad=True), lengths, backend=backend)


@pytest.mark.parametrize("shape", [(4, 70, 30, 30), (2, 200, 80, 40)], ids=["narrow", "wide"])
@pytest.mark.parametrize("device", CUDA_DEVICES[:1], indirect=True)
def test_cuda_never_synchronises(device, shape):
    a, weight, bias, u, lengths = make_inputs(shape, torch.float32, device=device)
    leaves = [t.requires_grad_() for t in (a, weight, bias, u)]
    grad_context, grad_alpha = torch.randn(shape[0], shape[2], device=device), torch.randn(shape[:2], device=device)
    context, alpha = fused_fn(*leaves, 0.8, lengths)  # warm-up: library handles and workspaces
    torch.autograd.grad((context, alpha), leaves, (grad_context, grad_alpha))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
    try:
        for lens in (lengths, None):
            context, alpha = fused_fn(*leaves, 0.8, lens)
            torch.autograd.grad((context, alpha), leaves, (grad_context, grad_alpha))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("device", CUDA_DEVICES[:1], indirect=True)
def test_cuda_float32_ignores_the_global_tf32_setting(device):
    """The operator's float32 GEMMs (dW and da in the backward) run in IEEE float32 whatever
    torch.set_float32_matmul_precision says (an at::NoTF32Guard in the kernel): every output and
    gradient is bit-identical under "highest" and "high" (TF32), and the caller's setting is left as it
    was. The reference's own matmuls do change under "high" here, so TF32 was in effect."""
    if torch.cuda.get_device_capability(device) < (8, 0):
        pytest.skip("TF32 needs compute capability 8.0 or newer")
    a, weight, bias, u, lengths = make_inputs((3, 70, 300, 20), torch.float32, device=device)  # long GEMM sums
    previous = torch.get_float32_matmul_precision()
    results = {}
    try:
        for precision in ("highest", "high"):
            torch.set_float32_matmul_precision(precision)
            results[precision] = [forward_backward(fn, a, weight, bias, u, 0.8, lengths)
                                  for fn in (fused_fn, attention_pool_reference)]
            assert torch.get_float32_matmul_precision() == precision
    finally:
        torch.set_float32_matmul_precision(previous)
    (fused_ieee, reference_ieee), (fused_tf32, reference_tf32) = results["highest"], results["high"]
    assert not all(torch.equal(x, y) for x, y in zip(reference_ieee, reference_tf32)), "TF32 changed nothing"
    for name, x, y in zip(NAMES, fused_ieee, fused_tf32):
        assert torch.equal(x, y), f"{name} depends on the TF32 setting"


@pytest.mark.parametrize("device", CUDA_DEVICES, indirect=True)
def test_cuda_side_stream_matches_default_stream(device):
    a, weight, bias, u, lengths = make_inputs((3, 300, 40, 24), torch.float32, device=device)
    expected = forward_backward(fused_fn, a, weight, bias, u, 0.8, lengths)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        actual = forward_backward(fused_fn, a, weight, bias, u, 0.8, lengths)
    torch.cuda.current_stream(device).wait_stream(stream)
    for x, y in zip(actual, expected):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# The shared activation

TANH_CLAMP = np.float32(7.90531110763549805)
# tanh_rational's coefficients as the float32 constants of csrc/attention_pool.h, highest power of x^2 first.
TANH_P = tuple(np.float32(c) for c in (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
                                       5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
                                       4.89352455891786e-03))
TANH_Q = tuple(np.float32(c) for c in (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03,
                                       4.89352518554385e-03))

# Rounding bound of tanh_rational in float32, in ulps of the exact value R (csrc/attention_pool.h).
#
# Every evaluation computes x2 = fl(xc * xc) the same way (a lone product: nothing to contract), so R is
# xc P(x2) / Q(x2) in exact arithmetic at that x2, with the float32 coefficients (|x| < 4e-4 returns x
# exactly). Horner's rule for a degree-n polynomial, rounding each product and each sum, gives
# |P^ - P| <= gamma_2n sum_i |p_i| x2^i = gamma_2n kappa_P |P| (Higham, "Accuracy and Stability of
# Numerical Algorithms", 5.1; gamma_k = k u / (1 - k u), u = 2^-24); a fused multiply-add rounds once
# per step: gamma_n. P has degree 6 and kappa_P <= 1.024 for 0 <= x2 <= clamp^2 (mixed signs, but the
# positive low-order terms dominate; the test below checks it on its grid); Q has degree 3 and positive
# coefficients (kappa_Q = 1). Then xc * P^ and P^ / Q^ round once each (IEEE division: nvcc's default
# -prec-div=true). The relative error of the result is therefore below
#     no contraction (every CPU path, -ffp-contract=off):  12 kappa_P + 6 + 2 <= 20.3 u
#     every Horner step an FMA:                             6 kappa_P + 3 + 2 <= 11.2 u
# and between the two for any mix (second-order terms are below 1e-5 u). A relative error e |R| is less
# than e / u ulp(R), since ulp(R) = 2^(E-23) > u |R| for |R| in [2^E, 2^(E+1)). nvcc may contract any
# Horner step into an FMA and nothing else (no --use_fast_math), so the CUDA kernels stay within
# TANH_ULPS of R whatever it chooses. R is computed in float64 here (relative error ~1e-15, far below
# an ulp of float32).
TANH_ULPS = 21  # any contraction, none included
TANH_ULPS_FMA = 12  # every Horner step contracted
TANH_KAPPA_P = 1.024


def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fma(a, b, c), correctly rounded. The float32 product is exact in float64 (48 bits); the
    float64 sum is turned into its round-to-odd value (its exact error from TwoSum), and rounding that
    to float32 is then correct (Boldo and Melquiond, 2008: 53 >= 24 + 2 bits). A plain float64 sum
    rounded to float32 would round twice and miss some ties."""
    x = np.asarray(a, np.float64) * np.asarray(b, np.float64)
    y = np.broadcast_to(np.asarray(c, np.float64), x.shape)
    s = x + y
    y_part = s - x
    error = (x - (s - y_part)) + (y - y_part)  # x + y == s + error exactly
    even = (s.view(np.int64) & 1) == 0
    s = np.where((error != 0) & even, np.nextafter(s, np.where(error > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


def tanh_transcription(x: np.ndarray, fused: bool = False) -> np.ndarray:
    """tanh_rational of csrc/attention_pool.h, operation by operation in float32; fused=True contracts
    every Horner step into an FMA, as nvcc may."""
    step = fma32 if fused else (lambda a, b, c: a * b + c)
    xc = np.clip(x, -TANH_CLAMP, TANH_CLAMP)
    x2 = xc * xc
    p = step(x2, TANH_P[0], TANH_P[1])
    for c in TANH_P[2:]:
        p = step(x2, p, c)
    p = xc * p
    q = step(x2, TANH_Q[0], TANH_Q[1])
    for c in TANH_Q[2:]:
        q = step(x2, q, c)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.abs(x) < np.float32(4e-4), x, p / q)


def tanh_exact_rational(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(R, kappa_P): the rational at the float32 x2 in float64, and the condition number of P there."""
    xc = np.clip(x, -TANH_CLAMP, TANH_CLAMP)
    x2 = (xc * xc).astype(np.float64)
    p, q = np.zeros_like(x2), np.zeros_like(x2)
    magnitude = np.zeros_like(x2)
    for c in TANH_P:
        p, magnitude = p * x2 + np.float64(c), magnitude * x2 + abs(np.float64(c))
    for c in TANH_Q:
        q = q * x2 + np.float64(c)
    small = np.abs(x) < np.float32(4e-4)
    return np.where(small, x.astype(np.float64), xc * p / q), magnitude / np.abs(p)


def ulps_from(actual: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """|actual - exact| in ulps of float32 at |exact| (np.spacing of it rounded to float32)."""
    return np.abs(actual.astype(np.float64) - exact) / np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)


@functools.cache
def tanh_grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, R, kappa_P): every 128th float32 from 4e-4 to 8 (940 000 values, evenly spread over the
    binades), their negatives (tanh_rational is odd in every operation), and the edges (the |x| < 4e-4
    branch, the clamp, huge and tiny values)."""
    ladder = np.arange(np.float32(4e-4).view(np.int32), np.float32(8).view(np.int32), 128,
                       dtype=np.int32).view(np.float32)
    edges = np.float32([0, 4e-4, -4e-4, 3.9e-4, TANH_CLAMP, -TANH_CLAMP, -8, 10, 100, 1e30, 1e-30, -1e-38])
    x = np.concatenate([ladder, -ladder[::7], edges])
    return (x, *tanh_exact_rational(x))


def test_fma_emulation_is_correctly_rounded():
    """fma32 against exact rational arithmetic, including a tie that a float64 sum would break wrongly."""
    # a b = 4097 * 16773121 * 2^-60 = (2^36 + 1) 2^-60 exactly, so 1 + a b = 1 + 2^-24 + 2^-60: just above
    # the midpoint between 1 and 1 + 2^-23. The float64 sum drops 2^-60 and its float32 rounding is the
    # tie, rounded to even (1.0); the correctly rounded float32 is 1 + 2^-23.
    a, b, one = np.float32(4097 * 2.0**-36), np.float32(16773121 * 2.0**-24), np.float32(1)
    assert np.float32(np.float64(a) * np.float64(b) + 1.0) == one  # what double rounding gives
    assert fma32(np.array([a]), np.array([b]), one)[0] == np.float32(1 + 2.0**-23)
    g = np.random.default_rng(0)
    a, b, c = ((g.standard_normal(400) * 2.0 ** g.integers(-30, 30, 400)).astype(np.float32) for _ in range(3))
    for x, y, z, got in zip(a, b, c, fma32(a, b, c)):
        exact = Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))
        near = np.float32(float(exact))  # within one float32 of the correctly rounded value
        candidates = [np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.float32(np.inf))]
        best = min(candidates, key=lambda v: (abs(Fraction(float(v)) - exact), int(v.view(np.int32)) & 1))
        assert got == best, (x, y, z)


@pytest.mark.parametrize("fused,bound", [(False, TANH_ULPS), (True, TANH_ULPS_FMA)], ids=["no-fma", "fma"])
def test_tanh_rounding_bound_holds_with_and_without_fma(fused, bound):
    """The derived bound (comment above TANH_ULPS) on a dense grid: its premise kappa_P <= 1.024, and
    the float32 evaluation without FMAs (the CPU paths) and with every Horner step fused (what nvcc
    does by default) within their bounds of the exact rational."""
    x, exact, kappa = tanh_grid()
    assert kappa.max() <= TANH_KAPPA_P
    actual = tanh_transcription(x, fused)
    assert ulps_from(actual, exact).max() <= bound
    if fused:  # the emulation changes results, so the bound is tested on something
        assert np.mean(actual != tanh_transcription(x)) > 0.01


@pytest.mark.parametrize("device", CPU_PATHS + CUDA_DEVICES[:1], indirect=True)
def test_tanh_is_the_shared_rational_function(device):
    """The CPU paths and the CUDA kernels call the same function, sl_tanh in csrc/attention_pool.h
    (the CUDA activation() and the test op _tanh call it on the device). On CPU every path equals a
    float32 transcription of it bit for bit and stays within 7 ulp (4.1e-7) of the exact tanh; nvcc
    may contract it into FMAs, so CUDA is held to the derived rounding bound around the exact rational
    (TANH_ULPS, any contraction)."""
    x, exact, _ = tanh_grid()
    actual = torch.ops.ser_lightning._tanh(torch.from_numpy(x).to(device)).cpu().numpy()
    assert ulps_from(actual, exact).max() <= TANH_ULPS
    if device == "cpu":
        np.testing.assert_array_equal(actual.view(np.int32), tanh_transcription(x).view(np.int32))
        np.testing.assert_allclose(actual, np.tanh(x.astype(np.float64)), rtol=0, atol=4.2e-7)


# --------------------------------------------------------------------------------------------
# CPU paths

def test_cpu_capability_api():
    active = cpu_capability()
    assert active in cpu_capabilities() and set(cpu_capabilities()) <= set(compiled_cpu_capabilities())
    for name in cpu_capabilities():
        with set_cpu_capability(name):
            assert cpu_capability() == name
        assert cpu_capability() == active
    with pytest.raises(ValueError, match="`name` 'sse9' is unavailable"):
        set_cpu_capability("sse9")


def test_cpu_capability_environment_override():
    """SER_LIGHTNING_CPU_CAPABILITY picks the path at import; a value it cannot honour warns."""
    script = "import ser_lightning.ops as o; print('ACTIVE', o.cpu_capability(), o.cpu_capabilities()[0])"
    env = {**os.environ, "SER_LIGHTNING_CPU_CAPABILITY": "default", "PYTHONWARNINGS": "always"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert "ACTIVE default" in proc.stdout, proc.stdout + proc.stderr
    env["SER_LIGHTNING_CPU_CAPABILITY"] = "sse9"
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    best = proc.stdout.split()[-1]
    assert f"ACTIVE {best} {best}" in proc.stdout, proc.stdout + proc.stderr
    assert "SER_LIGHTNING_CPU_CAPABILITY=sse9 is not one of the compiled paths" in proc.stderr


# --------------------------------------------------------------------------------------------
# Errors and backend selection

def bad_inputs():
    """(name, mutate(args) -> args, argument named in the message)."""
    def with_(index, value):
        return lambda args: args[:index] + [value] + args[index + 1:]

    return [
        ("a_2d", with_(0, torch.zeros(2, 5)), "`a`"),
        ("weight_cols", with_(1, torch.zeros(6, 3)), "`weight`"),
        ("bias_shape", with_(2, torch.zeros(5)), "`bias`"),
        ("u_shape", with_(3, torch.zeros(2, 6)), "`u`"),
        ("weight_dtype", with_(1, torch.zeros(6, 4, dtype=torch.float64)), "`weight`"),
        ("lam_zero", with_(4, 0.0), "`lam`"),
        ("lam_negative", with_(4, -1.0), "`lam`"),
        ("lam_infinite", with_(4, float("inf")), "`lam`"),
        ("lengths_dtype", with_(5, torch.tensor([5, 5], dtype=torch.int32)), "`lengths`"),
        ("lengths_shape", with_(5, torch.tensor([5, 5, 5])), "`lengths`"),
    ]


@pytest.mark.parametrize("name,mutate,argument", bad_inputs(), ids=[c[0] for c in bad_inputs()])
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_bad_inputs_name_the_argument(device, name, mutate, argument):
    args = [torch.randn(2, 5, 4), torch.randn(6, 4), torch.randn(6), torch.randn(6), 0.8, torch.tensor([5, 2])]
    args = [t.to(device) if isinstance(t, torch.Tensor) else t for t in mutate(args)]
    with pytest.raises(ValueError, match=argument):
        attention_pool(*args, backend="fused")
    with pytest.raises(RuntimeError, match=argument):  # the operator checks on its own too
        torch.ops.ser_lightning.attention_pool(*args)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_backward_operator_checks_gradient_shapes(device):
    a, weight, bias, u, lengths = make_inputs((2, 3, 4, 5), torch.float32, device=device)
    context, alpha = torch.ops.ser_lightning.attention_pool(a, weight, bias, u, 0.8, lengths)
    with pytest.raises(RuntimeError, match="`grad_context`"):
        torch.ops.ser_lightning.attention_pool_backward(context[:1], alpha, a, weight, bias, u, alpha, 0.8, lengths)
    with pytest.raises(RuntimeError, match="`alpha`"):
        torch.ops.ser_lightning.attention_pool_backward(context, alpha, a, weight, bias, u, alpha.t(), 0.8, lengths)


@pytest.mark.parametrize("device,dtype,supported", [
    pytest.param("cpu", torch.bfloat16, "float32, float64", id="cpu-bfloat16"),
    pytest.param("cuda", torch.float64, "float32, float16, bfloat16", id="cuda-float64", marks=CUDA),
], indirect=["device"])
def test_unsupported_dtype_is_an_error_and_auto_warns_once(device, dtype, supported, monkeypatch):
    monkeypatch.setattr(ops, "_warned", set())
    a, weight, bias, u, lengths = make_inputs((2, 3, 4, 5), dtype, device=device)
    with pytest.raises(RuntimeError, match=f"does not support {dtype} \\(supported: {supported}\\)"):
        attention_pool(a, weight, bias, u, 0.8, lengths, backend="fused")
    with pytest.raises(RuntimeError, match="supports"):  # the raw operator refuses it too
        torch.ops.ser_lightning.attention_pool(a, weight, bias, u, 0.8, lengths)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            out = attention_pool(a, weight, bias, u, 0.8, lengths)
    assert len(caught) == 1 and "reference implementation" in str(caught[0].message)
    for x, y in zip(out, attention_pool_reference(a, weight, bias, u, 0.8, lengths)):
        assert torch.equal(x, y)


def test_fused_cpu_is_built():
    assert fused.LOAD_ERROR is None, fused.LOAD_ERROR
    assert fused_available("cpu")


@pytest.mark.parametrize("device", CUDA_DEVICES[:1], indirect=True)
def test_fused_cuda_is_built(device):
    assert fused_available(device), "the extension was built without its CUDA kernels"


def test_unknown_backend_is_an_error():
    a, weight, bias, u, lengths = make_inputs((2, 3, 4, 5), torch.float32)
    with pytest.raises(ValueError, match="`backend`"):
        attention_pool(a, weight, bias, u, 0.8, lengths, backend="triton")


def test_reference_backend_is_the_reference():
    inputs = make_inputs((2, 3, 4, 5), torch.float32)
    for x, y in zip(attention_pool(*inputs[:4], 0.8, inputs[4], backend="reference"),
                    attention_pool_reference(*inputs[:4], 0.8, inputs[4])):
        assert torch.equal(x, y)


def test_missing_extension_falls_back(monkeypatch):
    monkeypatch.setattr(ops, "_warned", set())
    monkeypatch.setattr(fused, "LOAD_ERROR", "the compiled extension ser_lightning._C could not be loaded (test)")
    assert not fused_available("cpu") and cpu_capability() is None and cpu_capabilities() == []
    a, weight, bias, u, lengths = make_inputs((2, 3, 4, 5), torch.float32)
    with pytest.raises(RuntimeError, match="could not be loaded"):
        attention_pool(a, weight, bias, u, 0.8, lengths, backend="fused")
    with pytest.warns(UserWarning, match="could not be loaded"):
        attention_pool(a, weight, bias, u, 0.8, lengths)


def test_no_kernel_for_other_devices():
    assert not fused_available("meta")
    a = torch.empty(2, 3, 4, device="meta")
    with pytest.raises(RuntimeError, match="no fused kernel for meta"):
        attention_pool(a, torch.empty(5, 4, device="meta"), torch.empty(5, device="meta"),
                       torch.empty(5, device="meta"), 0.8, backend="fused")
