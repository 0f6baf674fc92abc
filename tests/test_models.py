"""Models: length arithmetic, shapes, minimum length, batch independence, attention pooling."""

import pytest
import torch
from torch import nn

from ser_lightning.models.attention import AttentionPool
from ser_lightning.models.layers import MaskedStack, conv_output_length
from ser_lightning.models.seed1d import Seed1D
from ser_lightning.models.zhang2d import Zhang2D
from ser_lightning.padding import pad_last
from ser_lightning.ops.reference import attention_pool_reference


def small_zhang(num_features: int = 70, **kwargs) -> Zhang2D:
    return Zhang2D(num_features, 4, width=0.1, **kwargs)


def run_stack_unmasked(stack: MaskedStack, x: torch.Tensor) -> torch.Tensor:
    """The plain layers, no masking: the ground truth for output sizes."""
    return stack.layers(x)


# ----------------------------------------------------------------------------- length arithmetic
@pytest.mark.parametrize(
    "n, kernel, stride, padding, dilation",
    [(259, 11, 4, 0, 1), (63, 3, 2, 0, 1), (100, 5, 1, 2, 1), (17, 3, 2, 1, 2), (11, 11, 4, 2, 1)],
)
def test_conv_output_length_matches_torch(n, kernel, stride, padding, dilation):
    conv = nn.Conv1d(1, 1, kernel, stride=stride, padding=padding, dilation=dilation)
    assert conv_output_length(n, kernel, stride, padding, dilation) == conv(torch.zeros(1, 1, n)).shape[-1]
    lengths = torch.tensor([n, n + 7])
    expected = torch.tensor([conv_output_length(n, kernel, stride, padding, dilation),
                             conv_output_length(n + 7, kernel, stride, padding, dilation)])
    assert torch.equal(conv_output_length(lengths, kernel, stride, padding, dilation), expected)


@pytest.mark.parametrize("frames", [163, 164, 200, 259, 301, 517])
def test_seed1d_stack_lengths_match_actual_sizes(frames):
    model = Seed1D(3, 4)
    out = run_stack_unmasked(model.stack, torch.randn(1, 3, frames))
    assert model.stack.output_length(frames) == out.shape[-1]
    _, lengths = model.stack(torch.randn(1, 3, frames), torch.tensor([frames]))
    assert int(lengths) == out.shape[-1]


@pytest.mark.parametrize("frames", [63, 64, 90, 127, 200, 333])
def test_zhang2d_stack_lengths_match_actual_sizes(frames):
    model = small_zhang(num_features=100)
    out = run_stack_unmasked(model.stack, torch.randn(1, 1, 100, frames))
    assert model.stack.output_length(frames) == out.shape[-1]
    assert model.freq_positions == out.shape[-2]


def test_loudness_contour_shape_is_four_positions_of_thirty_channels():
    model = Seed1D(1, 4)
    maps, lengths = model.stack(torch.randn(2, 1, 259), torch.tensor([259, 259]))
    assert maps.shape == (2, 30, 4)
    output = model(torch.randn(2, 1, 259))
    assert output.logits.shape == (2, 4)
    assert output.alpha.shape == (2, 4)
    assert output.positions.tolist() == [4, 4]
    assert output.grid is None


def test_zhang2d_output_shapes_and_time_major_grid():
    model = small_zhang(num_features=200).eval()
    lengths = torch.tensor([300, 120])
    output = model(torch.randn(2, 200, 300), lengths)
    freq, time = output.grid
    assert freq == model.freq_positions == 5
    assert time == model.stack.output_length(300)
    assert output.logits.shape == (2, 4)
    assert output.alpha.shape == (2, freq * time)
    assert output.positions.tolist() == [freq * model.stack.output_length(300), freq * model.stack.output_length(120)]
    assert output.positions.dtype == torch.int64


def test_min_input_frames_is_the_shortest_input_with_one_position():
    for model in (Seed1D(1, 4), small_zhang()):
        n = model.min_input_frames
        assert model.stack.output_length(n) == 1
        assert model.stack.output_length(n - 1) < 1
    assert Seed1D(64, 4).min_input_frames == 163
    assert small_zhang().min_input_frames == 63


@pytest.mark.parametrize("make", [lambda: Seed1D(2, 4), lambda: small_zhang()], ids=["seed1d", "zhang2d"])
def test_short_clip_is_padded_with_silence_not_dropped(make):
    torch.manual_seed(0)
    model = make().eval()
    num_features = 2 if isinstance(model, Seed1D) else 70
    short = torch.randn(1, num_features, 20)
    with torch.no_grad():
        output = model(short, torch.tensor([20]))
        padded = model(nn.functional.pad(short, (0, model.min_input_frames - 20)))
    assert torch.isfinite(output.logits).all()
    torch.testing.assert_close(output.logits, padded.logits, rtol=0, atol=1e-6)
    assert int(output.positions) >= 1


@pytest.mark.parametrize("lengths", [[200, 201], [0, 200], [-5, 10]])
def test_lengths_outside_the_padded_frames_are_an_error(lengths):
    """Options are checked where the configuration enters (SERModule); the models check their tensors."""
    with pytest.raises(ValueError, match="lengths must lie in 1..200"):
        Seed1D(1, 4)(torch.randn(2, 1, 200), torch.tensor(lengths))
    with pytest.raises(ValueError, match="zhang2d needs at least"):
        Zhang2D(40, 4, width=0.1)


def test_lengths_check_also_holds_under_torch_compile():
    model = torch.compile(Seed1D(1, 4).eval(), backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 200), torch.tensor([200, 150])).logits.shape == (2, 4)
        with pytest.raises(RuntimeError, match="lengths must lie in 1..200"):
            model(torch.randn(2, 1, 200), torch.tensor([200, 0]))


def test_seed1d_width_and_dropout():
    model = Seed1D(64, 4, width=4.0, dropout=0.3)
    convs = [layer for layer in model.stack.layers if isinstance(layer, nn.Conv1d)]
    assert [conv.out_channels for conv in convs] == [20, 40, 80, 120]
    assert model.classifier.in_features == 120 and model.dropout.p == 0.3
    assert [conv.out_channels for conv in Seed1D(64, 4).stack.layers if isinstance(conv, nn.Conv1d)] == [5, 10, 20, 30]


def test_zhang2d_width_rounds_channels_to_at_least_one():
    model = Zhang2D(70, 3, width=0.001, lrn=False)
    convs = [layer for layer in model.stack.layers if isinstance(layer, nn.Conv2d)]
    assert [conv.out_channels for conv in convs] == [1, 1, 1, 1, 1]
    assert not any(isinstance(layer, nn.LocalResponseNorm) for layer in model.stack.layers)
    assert model(torch.randn(2, 70, 80)).logits.shape == (2, 3)


# ----------------------------------------------------------------------------- batch independence
def padded_batch(samples: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_last(samples)


@pytest.mark.parametrize(
    "make, num_features",
    [(lambda: Seed1D(3, 4), 3), (lambda: small_zhang(num_features=70), 70)],
    ids=["seed1d", "zhang2d"],
)
def test_sample_alone_equals_sample_in_padded_batch(make, num_features):
    torch.manual_seed(1)
    model = make().eval()
    # lengths include one shorter than the receptive field and ones that stop mid-stride
    samples = [torch.randn(num_features, n) + 3.0 for n in (301, 170, 40, 233, 258)]
    batch, lengths = padded_batch(samples)
    with torch.no_grad():
        together = model(batch, lengths)
        for i, sample in enumerate(samples):
            alone = model(sample.unsqueeze(0), torch.tensor([sample.shape[-1]]))
            torch.testing.assert_close(together.logits[i], alone.logits[0], rtol=0, atol=1e-5)
            n = int(alone.positions)
            assert int(together.positions[i]) == n
            torch.testing.assert_close(together.alpha[i, :n], alone.alpha[0, :n], rtol=0, atol=1e-5)
            assert torch.all(together.alpha[i, n:] == 0)


# ----------------------------------------------------------------------------- attention pooling
def attention_loop(a, weight, bias, u, lam, lengths):
    """Direct per-utterance implementation in float64 with an explicit max-shifted softmax."""
    contexts, alphas = [], []
    for b in range(a.shape[0]):
        n = int(lengths[b])
        valid = a[b, :n].double()
        scores = []
        for i in range(n):
            scores.append(lam * torch.dot(u.double(), torch.tanh(weight.double() @ valid[i] + bias.double())))
        scores = torch.stack(scores)
        weights = torch.exp(scores - scores.max())
        weights = weights / weights.sum()
        alpha = torch.zeros(a.shape[1], dtype=torch.float64)
        alpha[:n] = weights
        contexts.append((weights[:, None] * valid).sum(dim=0))
        alphas.append(alpha)
    return torch.stack(contexts), torch.stack(alphas)


@pytest.mark.parametrize(
    "batch, positions, channels, dim, lam, lengths",
    [
        (3, 7, 5, 4, 0.8, [7, 3, 1]),  # masked rows, one with a single valid position
        (2, 1, 6, 3, 0.3, [1, 1]),  # L = 1
        (4, 9, 8, 8, 100.0, [9, 2, 5, 9]),  # large lam: scores far beyond exp's range
        (2, 5, 3, 6, 1.0, None),  # no lengths: every position valid
    ],
)
def test_reference_attention_matches_per_sample_loop(batch, positions, channels, dim, lam, lengths):
    torch.manual_seed(2)
    a = torch.randn(batch, positions, channels) * 3
    weight, bias, u = torch.randn(dim, channels), torch.randn(dim), torch.randn(dim) * 2
    length_tensor = None if lengths is None else torch.tensor(lengths)
    context, alpha = attention_pool_reference(a, weight, bias, u, lam, length_tensor)
    expected_context, expected_alpha = attention_loop(
        a, weight, bias, u, lam, length_tensor if lengths is not None else torch.full((batch,), positions)
    )
    assert torch.isfinite(context).all() and torch.isfinite(alpha).all()
    torch.testing.assert_close(alpha.double(), expected_alpha, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(context.double(), expected_context, rtol=1e-5, atol=1e-5)
    if lengths is not None:
        for b, n in enumerate(lengths):
            assert torch.all(alpha[b, n:] == 0)
    torch.testing.assert_close(alpha.sum(dim=1), torch.ones(batch))


@pytest.mark.parametrize("pooling, size", [("mean", 8), ("mean_std", 16)])
def test_attention_pool_module_gradients(pooling, size):
    pool = AttentionPool(8, dim=5, lam=0.8, backend="reference", pooling=pooling)
    assert pool.weight.shape == (5, 8) and pool.bias.shape == (5,) and pool.u.shape == (5,)
    assert pool.out_features == size
    a = torch.randn(3, 6, 8, requires_grad=True)
    context, alpha = pool(a, torch.tensor([6, 2, 4]))
    assert context.shape == (3, size) and alpha.shape == (3, 6)
    context.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in pool.parameters())
    assert torch.all(a.grad[1, 2:] == 0)  # padded positions get no gradient


def test_attentive_statistics_are_the_weighted_mean_and_spread_of_the_valid_positions():
    pool = AttentionPool(4, lam=0.8, backend="reference", pooling="mean_std")
    a = torch.randn(2, 7, 4, dtype=torch.float64)
    pool.double()
    lengths = torch.tensor([7, 3])
    context, alpha = pool(a, lengths)
    for b, n in enumerate(lengths.tolist()):
        w = alpha[b, :n].unsqueeze(1)
        mean = (w * a[b, :n]).sum(0)
        std = (w * (a[b, :n] - mean) ** 2).sum(0).sqrt()
        torch.testing.assert_close(context[b], torch.cat([mean, std]))
    padded = a.clone()
    padded[1, 3:] = 100.0  # what lies past a row's length changes nothing
    torch.testing.assert_close(pool(padded, lengths)[0], context)
    with pytest.raises(ValueError, match="attention pooling"):
        AttentionPool(4, pooling="max")
    from ser_lightning.models.module import SERModule

    with pytest.raises(ValueError, match=r"model\.attention_pooling must be one of \('mean', 'mean_std'\), got 'max'"):
        SERModule(attention_pooling="max")
    assert SERModule(attention_pooling="mean_std").model.classifier.in_features == 60  # 30 channels, mean and spread


def test_attention_pool_follows_the_annotation_dtype_under_mixed_precision():
    pool = AttentionPool(8, lam=0.8, backend="reference")
    a = torch.randn(2, 5, 8)
    context, alpha = pool(a.bfloat16(), torch.tensor([5, 3]))
    assert context.dtype == alpha.dtype == torch.bfloat16
    expected, _ = pool(a, torch.tensor([5, 3]))
    torch.testing.assert_close(context.float(), expected, rtol=0.05, atol=0.05)
    context.float().sum().backward()
    assert pool.weight.grad.dtype == torch.float32 and torch.isfinite(pool.weight.grad).all()


# ----------------------------------------------------------------------------- pretrained AlexNet
TORCHVISION_ALEXNET_SHAPES = {
    "features.0": (64, 3, 11, 11),
    "features.3": (192, 64, 5, 5),
    "features.6": (384, 192, 3, 3),
    "features.8": (256, 384, 3, 3),
    "features.10": (256, 256, 3, 3),
}


def test_zhang2d_loads_torchvision_alexnet_state_dict(tmp_path):
    torch.manual_seed(3)
    state = {}
    for key, shape in TORCHVISION_ALEXNET_SHAPES.items():
        state[f"{key}.weight"] = torch.randn(shape)
        state[f"{key}.bias"] = torch.randn(shape[0])
    state["classifier.1.weight"] = torch.randn(10, 9216)  # ignored: only the conv stack is reused
    path = tmp_path / "alexnet.pth"
    torch.save(state, path)
    model = Zhang2D(200, 4, pretrained_alexnet=str(path))
    convs = [layer for layer in model.stack.layers if isinstance(layer, nn.Conv2d)]
    torch.testing.assert_close(convs[0].weight, state["features.0.weight"].sum(dim=1, keepdim=True))
    torch.testing.assert_close(convs[4].weight, state["features.10.weight"])
    torch.testing.assert_close(convs[2].bias, state["features.6.bias"])

    with pytest.raises(FileNotFoundError, match="model.pretrained_alexnet"):
        Zhang2D(200, 4, pretrained_alexnet=str(tmp_path / "missing.pth"))
    torch.save({"features.0.weight": torch.randn(2, 3, 3, 3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an AlexNet state dict"):
        Zhang2D(200, 4, pretrained_alexnet=str(tmp_path / "other.pth"))
