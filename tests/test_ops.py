"""Fused attention operator: parity with the reference, gradients, registration, errors, backends.

CPU tests always run (the extension is part of the install). GPU tests have "cuda" in their names
and skip without a GPU: `pytest tests/test_ops.py -k cuda` runs exactly them.

Tolerances. float32 results are compared with the float64 reference, relative to the largest
magnitude of each compared tensor: |fused - ref| <= max(1e-4 * max|ref|, 2 * |ref32 - ref|) +
1e-6 for outputs and gradients, where ref32 is the reference run in float32 (at lam = 50 the
parameter gradients are ill-conditioned and float32 itself is off by up to ~4e-3 relative).
float64 results must match to 1e-10. On CUDA, float16
and bfloat16 results are compared with the float32 reference on the same (rounded) inputs:
2e-2 (float16) and 6e-2 (bfloat16) relative to the largest magnitude.
"""

import warnings

import pytest
import torch

import ser_lightning.ops as ops
from ser_lightning.ops import attention_pool, attention_pool_reference, fused, fused_available

HAS_CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# (B, L, C, D): L=1, C=1, D != C, batch of 1, short L (several utterances per CPU tile),
# long L (several tiles per utterance on CPU and CUDA), C and D not multiples of the CUDA tiles.
SHAPES = [
    (1, 1, 1, 1),
    (2, 1, 3, 5),
    (3, 7, 1, 4),
    (1, 9, 6, 2),
    (5, 33, 16, 24),
    (6, 50, 12, 70),
    (2, 130, 5, 7),
    (3, 300, 19, 9),
]


def make_inputs(shape, dtype=torch.float64, device="cpu", lengths="ragged", seed=0, noncontiguous=False):
    """Random (a, weight, bias, u, lengths); grad-requiring bases, optionally seen through strided views."""
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
        u = torch.randn(D, generator=g, dtype=torch.float64)
    if lengths == "ragged":
        lens = torch.randint(1, L + 1, (B,), generator=g)
        lens[0] = L
        if B > 1:
            lens[-1] = 1
    else:
        lens = None
    tensors = [t.to(device=device, dtype=dtype) for t in (a, weight, bias, u)]
    return (*tensors, None if lens is None else lens.to(device))


def forward_backward(fn, a, weight, bias, u, lam, lengths, seed=1):
    """Outputs and the gradients of a random linear function of both outputs w.r.t. a, weight, bias, u."""
    leaves = [t.detach().requires_grad_() for t in (a, weight, bias, u)]  # keeps strides
    context, alpha = fn(*leaves, lam, lengths)
    g = torch.Generator().manual_seed(seed)
    grad_context = torch.randn(context.shape, generator=g).to(context)
    grad_alpha = torch.randn(alpha.shape, generator=g).to(alpha)
    grads = torch.autograd.grad((context * grad_context).sum() + (alpha * grad_alpha).sum(), leaves)
    return [context.detach(), alpha.detach(), *grads]


def fused_fn(*args):
    return attention_pool(*args, backend="fused")


NAMES = ("context", "alpha", "grad_a", "grad_weight", "grad_bias", "grad_u")


def assert_close_scaled(actual, expected, rel, baseline=None):
    """max|actual - expected| <= max(rel * max|expected|, 2 * max|baseline - expected|) + 1e-6, per tensor."""
    for k, (name, x, y) in enumerate(zip(NAMES, actual, expected)):
        y = y.to(x.dtype)
        allowed = rel * y.abs().max().item()
        if baseline is not None:
            allowed = max(allowed, 2 * (baseline[k].to(x.dtype) - y).abs().max().item())
        err = (x - y).abs().max().item()
        assert err <= allowed + 1e-6, f"{name}: max error {err:.3g} > allowed {allowed:.3g}"


def test_fused_cpu_is_built():
    assert fused.LOAD_ERROR is None, fused.LOAD_ERROR
    assert fused_available("cpu")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("lengths", ["ragged", None])
@pytest.mark.parametrize("lam", [0.3, 50.0])
def test_parity_float32(shape, lengths, lam):
    inputs = make_inputs(shape, torch.float32, lengths=lengths, seed=hash((shape, lam)) % 1000)
    expected = forward_backward(attention_pool_reference, *[t.double() for t in inputs[:4]], lam, inputs[4])
    actual = forward_backward(fused_fn, *inputs[:4], lam, inputs[4])
    baseline = forward_backward(attention_pool_reference, *inputs[:4], lam, inputs[4])
    assert_close_scaled(actual, expected, rel=1e-4, baseline=baseline)


@pytest.mark.parametrize("shape", [(4, 9, 6, 3), (3, 300, 19, 9)], ids=["short", "long"])
def test_parity_float64_noncontiguous(shape):
    a, weight, bias, u, lengths = make_inputs(shape, noncontiguous=True, seed=3)
    assert not (a.is_contiguous() or weight.is_contiguous() or u.is_contiguous() or bias.is_contiguous())
    actual = forward_backward(fused_fn, a, weight, bias, u, 0.8, lengths)
    expected = forward_backward(attention_pool_reference, a, weight, bias, u, 0.8, lengths)
    for x, y in zip(actual, expected):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def test_padding_is_exactly_zero():
    a, weight, bias, u, lengths = make_inputs((4, 20, 5, 6), torch.float32)
    context, alpha, grad_a, *_ = forward_backward(fused_fn, a, weight, bias, u, 0.8, lengths)
    for b, n in enumerate(lengths.tolist()):
        assert torch.all(alpha[b, n:] == 0) and torch.all(grad_a[b, n:] == 0)
        torch.testing.assert_close(alpha[b, :n].sum(), torch.tensor(1.0))


@pytest.mark.parametrize("lengths", ["ragged", None])
def test_gradcheck_float64(lengths):
    a, weight, bias, u, lens = make_inputs((3, 6, 4, 5), lengths=lengths, seed=7)
    leaves = [t.requires_grad_() for t in (a, weight, bias, u)]
    assert torch.autograd.gradcheck(lambda *x: attention_pool(*x, 1.7, lens, backend="fused"), leaves)


def test_opcheck_forward_and_backward():
    a, weight, bias, u, lengths = make_inputs((3, 5, 4, 6), torch.float32)
    for requires_grad in (False, True):
        args = [t.clone().requires_grad_(requires_grad) for t in (a, weight, bias, u)]
        torch.library.opcheck(torch.ops.ser_lightning.attention_pool.default, (*args, 0.8, lengths))
    context, alpha = torch.ops.ser_lightning.attention_pool(a, weight, bias, u, 0.8, lengths)
    torch.library.opcheck(
        torch.ops.ser_lightning.attention_pool_backward.default,
        (torch.randn_like(context), torch.randn_like(alpha), a, weight, bias, u, alpha, 0.8, lengths),
    )


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    a, weight, bias, u, lengths = make_inputs((3, 7, 4, 5), torch.float32)

    def pooled_loss(a, weight, bias, u, lengths):
        context, alpha = attention_pool(a, weight, bias, u, 0.8, lengths, backend="fused")
        return context.square().sum() + alpha[:, 0].sum()

    compiled = torch.compile(pooled_loss, fullgraph=True, backend="aot_eager")
    for lens in (lengths, None):
        results = []
        for fn in (pooled_loss, compiled):
            leaves = [t.clone().requires_grad_() for t in (a, weight, bias, u)]
            loss = fn(*leaves, lens)
            results.append([loss.detach(), *torch.autograd.grad(loss, leaves)])
        for x, y in zip(*results):
            torch.testing.assert_close(x, y)


def test_compile_inductor_fullgraph_matches_eager():
    torch._dynamo.reset()
    a, weight, bias, u, lengths = make_inputs((3, 7, 4, 5), torch.float32)
    fn = torch.compile(lambda *x: attention_pool(*x, backend="fused"), fullgraph=True)
    for x, y in zip(forward_backward(fn, a, weight, bias, u, 0.8, lengths),
                    forward_backward(fused_fn, a, weight, bias, u, 0.8, lengths)):
        torch.testing.assert_close(x, y)


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
        ("lengths_zero", with_(5, torch.tensor([0, 5])), "`lengths`"),
        ("lengths_above_L", with_(5, torch.tensor([6, 5])), "`lengths`"),
        ("lengths_dtype", with_(5, torch.tensor([5, 5], dtype=torch.int32)), "`lengths`"),
        ("lengths_shape", with_(5, torch.tensor([5, 5, 5])), "`lengths`"),
    ]


@pytest.mark.parametrize("name,mutate,argument", bad_inputs(), ids=[c[0] for c in bad_inputs()])
def test_bad_inputs_name_the_argument(name, mutate, argument):
    args = [torch.randn(2, 5, 4), torch.randn(6, 4), torch.randn(6), torch.randn(6), 0.8, torch.tensor([5, 2])]
    args = mutate(args)
    with pytest.raises(ValueError, match=argument):
        attention_pool(*args, backend="fused")
    with pytest.raises(RuntimeError, match=argument):  # the operator checks on its own too
        torch.ops.ser_lightning.attention_pool(*args)


def test_raw_operator_rejects_unsupported_dtype():
    a, weight, bias, u, lengths = make_inputs((2, 3, 4, 5), torch.float16, lengths=None)
    with pytest.raises(RuntimeError, match="float32 and float64 `a`"):
        torch.ops.ser_lightning.attention_pool(a, weight, bias, u, 0.8, torch.tensor([3, 3]))


def test_backward_operator_checks_gradient_shapes():
    a, weight, bias, u, lengths = make_inputs((2, 3, 4, 5), torch.float32)
    context, alpha = torch.ops.ser_lightning.attention_pool(a, weight, bias, u, 0.8, lengths)
    with pytest.raises(RuntimeError, match="`grad_context`"):
        torch.ops.ser_lightning.attention_pool_backward(context[:1], alpha, a, weight, bias, u, alpha, 0.8, lengths)
    with pytest.raises(RuntimeError, match="`alpha`"):
        torch.ops.ser_lightning.attention_pool_backward(context, alpha, a, weight, bias, u, alpha.t(), 0.8, lengths)


def test_unknown_backend_is_an_error():
    a, weight, bias, u, lengths = make_inputs((2, 3, 4, 5), torch.float32)
    with pytest.raises(ValueError, match="`backend`"):
        attention_pool(a, weight, bias, u, 0.8, lengths, backend="triton")


def test_reference_backend_is_the_reference():
    inputs = make_inputs((2, 3, 4, 5), torch.float32)
    for x, y in zip(attention_pool(*inputs[:4], 0.8, inputs[4], backend="reference"),
                    attention_pool_reference(*inputs[:4], 0.8, inputs[4])):
        assert torch.equal(x, y)


def test_fused_unavailable_is_an_error_and_auto_warns_once(monkeypatch):
    monkeypatch.setattr(ops, "_warned", set())
    a, weight, bias, u, lengths = make_inputs((2, 3, 4, 5), torch.bfloat16)
    with pytest.raises(RuntimeError, match="does not support torch.bfloat16"):
        attention_pool(a, weight, bias, u, 0.8, lengths, backend="fused")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            out = attention_pool(a, weight, bias, u, 0.8, lengths)
    assert len(caught) == 1 and "reference implementation" in str(caught[0].message)
    for x, y in zip(out, attention_pool_reference(a, weight, bias, u, 0.8, lengths)):
        assert torch.equal(x, y)


def test_missing_extension_falls_back(monkeypatch):
    monkeypatch.setattr(ops, "_warned", set())
    monkeypatch.setattr(fused, "LOAD_ERROR", "the compiled extension ser_lightning._C could not be loaded (test)")
    assert not fused_available("cpu")
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


# --------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)

CUDA_SHAPES = [(1, 1, 1, 1), (3, 7, 1, 4), (5, 33, 16, 24), (4, 200, 70, 130), (2, 5000, 40, 24)]


@cuda_only
def test_fused_cuda_is_built():
    assert fused_available("cuda"), "the extension was built without its CUDA kernels"


@cuda_only
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("lengths", ["ragged", None])
@pytest.mark.parametrize("lam", [0.3, 50.0])
def test_cuda_parity_float32(shape, lengths, lam):
    inputs = make_inputs(shape, torch.float64, lengths=lengths, seed=11)
    expected = forward_backward(attention_pool_reference, *inputs[:4], lam, inputs[4])
    cuda_inputs = [t.float().cuda() for t in inputs[:4]]
    actual = forward_backward(fused_fn, *cuda_inputs, lam, None if inputs[4] is None else inputs[4].cuda())
    baseline = forward_backward(attention_pool_reference, *[t.float() for t in inputs[:4]], lam, inputs[4])
    assert_close_scaled([t.cpu() for t in actual], expected, rel=1e-4, baseline=baseline)


@cuda_only
def test_cuda_parity_noncontiguous():
    a, weight, bias, u, lengths = make_inputs((3, 100, 12, 9), noncontiguous=True, seed=5)
    expected = forward_backward(attention_pool_reference, a, weight, bias, u, 0.8, lengths)
    cuda = [t.float().cuda() for t in (a, weight, bias, u)]
    assert not cuda[0].is_contiguous()
    actual = forward_backward(fused_fn, *cuda, 0.8, lengths.cuda())
    assert_close_scaled([t.cpu() for t in actual], expected, rel=1e-4)


@cuda_only
@pytest.mark.parametrize("dtype,rel", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(4, 70, 30, 30), (2, 700, 256, 128)], ids=["small", "wide"])
def test_cuda_parity_half_precision(dtype, rel, shape):
    inputs = make_inputs(shape, dtype, device="cuda", seed=13)
    actual = forward_backward(fused_fn, *inputs[:4], 0.8, inputs[4])
    rounded = [t.float() for t in inputs[:4]]  # the same (rounded) inputs, in float32
    expected = forward_backward(attention_pool_reference, *rounded, 0.8, inputs[4])
    assert all(t.dtype == dtype for t in actual)
    assert_close_scaled([t.float() for t in actual], expected, rel=rel)


@cuda_only
def test_cuda_opcheck():
    a, weight, bias, u, lengths = make_inputs((3, 70, 4, 6), torch.float32, device="cuda")
    for requires_grad in (False, True):
        args = [t.clone().requires_grad_(requires_grad) for t in (a, weight, bias, u)]
        torch.library.opcheck(torch.ops.ser_lightning.attention_pool.default, (*args, 0.8, lengths))
    context, alpha = torch.ops.ser_lightning.attention_pool(a, weight, bias, u, 0.8, lengths)
    torch.library.opcheck(
        torch.ops.ser_lightning.attention_pool_backward.default,
        (torch.randn_like(context), torch.randn_like(alpha), a, weight, bias, u, alpha, 0.8, lengths),
    )


@cuda_only
def test_cuda_float64_uses_reference(monkeypatch):
    """float64 has no CUDA kernel (float32 accumulation): gradcheck runs on CPU; CUDA falls back."""
    monkeypatch.setattr(ops, "_warned", set())
    a, weight, bias, u, lengths = make_inputs((2, 3, 4, 5), torch.float64, device="cuda")
    with pytest.raises(RuntimeError, match="does not support torch.float64"):
        attention_pool(a, weight, bias, u, 0.8, lengths, backend="fused")
    with pytest.warns(UserWarning, match="reference implementation"):
        attention_pool(a, weight, bias, u, 0.8, lengths)


@cuda_only
def test_cuda_devices_must_match():
    a, weight, bias, u, lengths = make_inputs((2, 3, 4, 5), torch.float32, device="cuda")
    with pytest.raises(ValueError, match="`weight`"):
        attention_pool(a, weight.cpu(), bias, u, 0.8, lengths, backend="fused")
    with pytest.raises(RuntimeError, match="`lengths`"):
        torch.ops.ser_lightning.attention_pool(a, weight, bias, u, 0.8, lengths.cpu())


@cuda_only
def test_cuda_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    a, weight, bias, u, lengths = make_inputs((3, 90, 16, 8), torch.float32, device="cuda")
    fn = torch.compile(lambda *x: attention_pool(*x, backend="fused"), fullgraph=True)
    for x, y in zip(forward_backward(fn, a, weight, bias, u, 0.8, lengths),
                    forward_backward(fused_fn, a, weight, bias, u, 0.8, lengths)):
        torch.testing.assert_close(x, y)
