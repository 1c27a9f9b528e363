"""phitune.lora layers against the loralib 0.1.2 spec (loralib 0.1.2's documented behaviour and its known bugs)."""

import math

import loralib
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import phitune.lora as lora


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _randomize_B(layer):
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


# --- 12.1 / 12.2 Linear -------------------------------------------------------------------------------------------

def test_linear_params_init_and_scaling():
    layer = lora.Linear(10, 6, r=4)
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias", "lora_A", "lora_B"]
    assert layer.lora_A.shape == (4, 10) and layer.lora_B.shape == (6, 4)
    assert torch.all(layer.lora_B == 0)
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(10)
    assert layer.scaling == 0.25
    assert not layer.weight.requires_grad and layer.bias.requires_grad
    x = torch.randn(2, 3, 10)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=0)
    assert lora.Linear(4, 4, r=8, lora_alpha=16).scaling == 2.0


def test_linear_forward_and_grads():
    layer = _randomize_B(lora.Linear(10, 6, r=4))
    x = torch.randn(2, 3, 10)
    expected = x @ layer.weight.T + layer.bias + (x @ layer.lora_A.T @ layer.lora_B.T) * layer.scaling
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    fresh = lora.Linear(10, 6, r=4)
    fresh(x).sum().backward()
    assert fresh.weight.grad is None
    assert torch.all(fresh.lora_A.grad == 0) and fresh.lora_B.grad.abs().sum() > 0


def test_same_seed_same_weights_and_outputs_as_loralib():
    for make in (lambda m: m.Linear(10, 6, r=4), lambda m: m.MergedLinear(8, 12, r=2, enable_lora=[True, False, True]),
                 lambda m: m.Embedding(20, 8, r=4), lambda m: m.Conv2d(3, 6, 3, r=2, padding=1)):
        torch.manual_seed(1)
        ours = make(lora)
        torch.manual_seed(1)
        theirs = make(loralib)
        ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
        theirs_sd = {k.replace("conv.", ""): v for k, v in theirs_sd.items()}
        assert ours_sd.keys() == theirs_sd.keys()
        for k in ours_sd:
            assert torch.equal(ours_sd[k], theirs_sd[k]), k


# --- 12.3 / 12.4 merge on eval ------------------------------------------------------------------------------------

def test_eval_merges_train_unmerges_and_both_return_the_layer():
    layer = _randomize_B(lora.Linear(10, 6, r=4))
    w0 = layer.weight.detach().clone()
    x = torch.randn(2, 3, 10)
    y = layer(x)
    assert layer.eval() is layer and layer.merged
    torch.testing.assert_close(layer.weight, w0 + layer.lora_B @ layer.lora_A * layer.scaling)
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=0)
    merged = layer.weight.detach().clone()
    layer.eval()
    assert torch.equal(layer.weight, merged)
    assert layer.train() is layer and not layer.merged
    assert torch.equal(layer.weight, w0)
    seq = nn.Sequential(layer)
    assert seq.eval() is seq and layer.merged
    seq.train()
    assert not layer.merged


def test_merge_weights_false_keeps_lora_live_in_eval():
    layer = _randomize_B(lora.Linear(10, 6, r=4, merge_weights=False))
    w0 = layer.weight.detach().clone()
    x = torch.randn(4, 10)
    y = layer(x)
    layer.eval()
    assert torch.equal(layer.weight, w0) and not layer.merged
    torch.testing.assert_close(layer(x), y)
    layer(x).sum().backward()
    assert layer.lora_B.grad is not None


def test_explicit_merge_unmerge_and_delta_weight():
    layer = _randomize_B(lora.Linear(10, 6, r=4, lora_alpha=8))
    w0 = layer.weight.detach().clone()
    delta = layer.delta_weight()
    assert delta.dtype == torch.float32 and delta.shape == w0.shape
    torch.testing.assert_close(delta, layer.lora_B @ layer.lora_A * 2.0)
    layer.merge()
    layer.merge()
    assert layer.merged and layer.training
    torch.testing.assert_close(layer.weight, w0 + delta)
    layer.unmerge()
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


# --- 12.5 fan_in_fan_out ------------------------------------------------------------------------------------------

def test_fan_in_fan_out():
    layer = _randomize_B(lora.Linear(10, 6, r=4, fan_in_fan_out=True))
    assert layer.weight.shape == (10, 6)
    x = torch.randn(3, 10)
    expected = x @ layer.weight + layer.bias + (x @ layer.lora_A.T @ layer.lora_B.T) * layer.scaling
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    w0 = layer.weight.detach().clone()
    torch.testing.assert_close(layer.delta_weight(), (layer.lora_B @ layer.lora_A).T * layer.scaling)
    layer.eval()
    torch.testing.assert_close(layer.weight, w0 + (layer.lora_B @ layer.lora_A).T * layer.scaling)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


# --- 12.6 dropout -------------------------------------------------------------------------------------------------

def test_dropout_only_on_lora_branch():
    layer = lora.Linear(10, 6, r=4, lora_dropout=0.9)
    x = torch.randn(8, 10)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    _randomize_B(layer)
    assert not torch.allclose(layer(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    assert isinstance(layer.lora_dropout, nn.Dropout)
    # p == 0: a picklable nn.Identity instead of loralib's lambda (section 14 fix)
    assert isinstance(lora.Linear(10, 6, r=4).lora_dropout, nn.Identity)


# --- 12.7 Embedding -----------------------------------------------------------------------------------------------

def test_embedding():
    layer = lora.Embedding(20, 8, r=4, lora_alpha=8, padding_idx=0)
    assert layer.lora_A.shape == (4, 20) and torch.all(layer.lora_A == 0)
    assert layer.lora_B.shape == (8, 4) and 0.6 < layer.lora_B.std() < 1.4
    assert layer.scaling == 2
    idx = torch.tensor([[0, 3, 5], [7, 0, 19]])
    torch.testing.assert_close(layer(idx), layer.weight[idx])
    layer(idx).sum().backward()
    assert torch.all(layer.lora_B.grad == 0)
    assert torch.all(layer.lora_A.grad[:, 0] == 0) and layer.lora_A.grad[:, 3].abs().sum() > 0
    with torch.no_grad():
        layer.lora_A.normal_()
    expected = layer.weight[idx] + (layer.lora_A.T[idx] @ layer.lora_B.T) * 2
    torch.testing.assert_close(layer(idx), expected, atol=1e-5, rtol=0)
    w0 = layer.weight.detach().clone()
    layer.eval()
    torch.testing.assert_close(layer.weight, w0 + (layer.lora_B @ layer.lora_A).T * 2)
    torch.testing.assert_close(layer(idx), expected, atol=1e-5, rtol=0)
    with pytest.raises(TypeError):
        lora.Embedding(20, 8, r=4, lora_dropout=0.1)


# --- 12.8 / 12.9 MergedLinear -------------------------------------------------------------------------------------

def _dense_delta(layer):
    """ΔW (out, in) built group by group (test oracle only), without scaling."""
    dense = torch.zeros(layer.out_features, layer.in_features)
    r, row, k, start = layer.r, 0, 0, 0
    for size, on in zip(layer.out_splits, layer.enable_lora):
        if on:
            dense[start:start + size] = layer.lora_B[row:row + size] @ layer.lora_A[k * r:(k + 1) * r]
            row, k = row + size, k + 1
        start += size
    return dense


def _merged_reference(layer, x):
    w = layer.weight.T if layer.fan_in_fan_out else layer.weight
    return F.linear(x, w, layer.bias) + x @ _dense_delta(layer).T * layer.scaling


def test_merged_linear_equal_groups():
    layer = _randomize_B(lora.MergedLinear(8, 12, r=2, lora_alpha=4, enable_lora=[True, False, True]))
    assert layer.lora_A.shape == (4, 8) and layer.lora_B.shape == (8, 2)
    assert layer.lora_ind.tolist() == [True] * 4 + [False] * 4 + [True] * 4
    assert "lora_ind" not in layer.state_dict()
    x = torch.randn(5, 8)
    expected = _merged_reference(layer, x)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    assert layer(torch.randn(2, 3, 8)).shape == (2, 3, 12)
    w0 = layer.weight.detach().clone()
    layer.eval()
    assert torch.equal(layer.weight[4:8], w0[4:8])
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    # the real loralib, same weights
    theirs = loralib.MergedLinear(8, 12, r=2, lora_alpha=4, enable_lora=[True, False, True])
    theirs.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer.train()(x), theirs(x), atol=1e-5, rtol=0)


def test_merged_linear_fan_in_fan_out_same_in_train_and_eval():
    layer = _randomize_B(lora.MergedLinear(8, 12, r=2, enable_lora=[True, False, True], fan_in_fan_out=True))
    assert layer.weight.shape == (8, 12)
    x = torch.randn(5, 8)
    y = layer(x)
    torch.testing.assert_close(y, _merged_reference(layer, x), atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.delta_weight(), _dense_delta(layer).T * layer.scaling)
    layer.eval()
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=0)


def test_merged_linear_unequal_groups_phi3_medium_layout():
    # Phi-3-medium's fused qkv at a toy scale: q/k/v = 20/5/5, LoRA on q and v
    layer = _randomize_B(lora.MergedLinear(6, 30, r=2, enable_lora=[True, False, True], out_splits=[20, 5, 5]))
    assert layer.lora_A.shape == (4, 6) and layer.lora_B.shape == (25, 2)
    assert layer.lora_ind.tolist() == [True] * 20 + [False] * 5 + [True] * 5
    x = torch.randn(3, 4, 6)
    y = layer(x)
    torch.testing.assert_close(y, _merged_reference(layer, x), atol=1e-5, rtol=0)
    w0 = layer.weight.detach().clone()
    delta = layer.delta_weight()
    assert torch.all(delta[20:25] == 0)
    torch.testing.assert_close(delta[25:], layer.lora_B[20:] @ layer.lora_A[2:] * layer.scaling)
    layer.eval()
    assert torch.equal(layer.weight[20:25], w0[20:25])
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=0)
    layer.train()
    assert torch.equal(layer.weight, w0)


class _AllocatedShapes(TorchDispatchMode):
    """Records the shape of every tensor an op allocates (views excluded)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.shapes += [tuple(o.shape) for o in (out if isinstance(out, (tuple, list)) else [out])
                            if isinstance(o, torch.Tensor)]
        return out


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merged_linear_forward_and_backward_never_build_a_dense_delta(fan_in_fan_out):
    layer = _randomize_B(lora.MergedLinear(16, 48, r=2, enable_lora=[True, False, True],
                                           fan_in_fan_out=fan_in_fan_out))
    x = torch.randn(2, 4, 16, requires_grad=True)
    with _AllocatedShapes() as seen:
        layer(x).sum().backward()
    assert seen.shapes and not {(48, 16), (16, 48)} & set(seen.shapes)
    assert layer.lora_A.grad.abs().sum() > 0 and x.grad is not None


def test_merged_linear_without_enabled_group_is_a_plain_linear():
    layer = lora.MergedLinear(8, 12, r=2)
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"] and layer.weight.requires_grad
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))  # loralib: AttributeError
    layer.eval()
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


# --- 12.10 convolutions -------------------------------------------------------------------------------------------

def test_conv2d_loralib_shapes_forward_and_merge():
    layer = lora.Conv2d(3, 6, 3, r=2, lora_alpha=4, padding=1)
    assert isinstance(layer, nn.Conv2d)
    assert layer.lora_A.shape == (6, 9) and layer.lora_B.shape == (18, 6) and torch.all(layer.lora_B == 0)
    assert list(layer.state_dict()) == ["weight", "bias", "lora_A", "lora_B"]
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, layer.bias, padding=1))
    _randomize_B(layer)
    expected = F.conv2d(x, layer.weight + (layer.lora_B @ layer.lora_A).view(layer.weight.shape) * 2,
                        layer.bias, padding=1)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    w0 = layer.weight.detach().clone()
    layer.eval()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    layer.train()
    assert torch.equal(layer.weight, w0)
    assert lora.Conv2d(4, 8, 3, r=2, groups=2).lora_B.shape == (12, 6)


@pytest.mark.parametrize("cls,dims", [(lora.Conv1d, 1), (lora.Conv2d, 2), (lora.Conv3d, 3)])
@pytest.mark.parametrize("kernel,groups", [(1, 1), (3, 1), (3, 2), ("tuple", 2)])
def test_conv_any_kernel_and_groups(cls, dims, kernel, groups):
    kernel = (3, 1, 2)[:dims] if kernel == "tuple" else kernel
    layer = _randomize_B(cls(4, 6, kernel, r=2, lora_alpha=2, groups=groups, padding=1))
    assert isinstance(layer, cls.__mro__[-3])  # nn.ConvNd
    x = torch.randn(1, 4, *(5,) * dims)
    conv = getattr(F, f"conv{dims}d")
    delta = layer.delta_weight()
    assert delta.shape == layer.weight.shape
    expected = conv(x, layer.weight + delta, layer.bias, padding=1, groups=groups)
    y = layer(x)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)
    w0 = layer.weight.detach().clone()
    layer.eval()
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=0)
    layer.train()
    assert torch.equal(layer.weight, w0)


def test_conv_loads_a_plain_conv_checkpoint():
    plain = nn.Conv2d(3, 6, 3)
    layer = lora.Conv2d(3, 6, 3, r=2)
    result = layer.load_state_dict(plain.state_dict(), strict=False)
    assert result.missing_keys == ["lora_A", "lora_B"] and not result.unexpected_keys
    assert torch.equal(layer.weight, plain.weight) and torch.equal(layer.bias, plain.bias)


def test_conv_dropout_is_applied_to_the_lora_branch():
    layer = _randomize_B(lora.Conv2d(3, 6, 3, r=2, lora_dropout=0.5))
    x = torch.randn(2, 3, 6, 6)
    base = F.conv2d(x, layer.weight, layer.bias)
    assert not torch.allclose(layer(x), layer(x))
    lora_part = lambda y: y - base  # noqa: E731
    # each output is base + conv(dropout(x), ΔW): equal to the no-dropout branch on average, never ignored
    torch.manual_seed(3)
    mean = torch.stack([lora_part(layer(x)) for _ in range(200)]).mean(0)
    torch.testing.assert_close(mean, F.conv2d(x, layer.delta_weight()), atol=0.3, rtol=0.1)
    layer.eval()
    torch.testing.assert_close(layer(x), base + F.conv2d(x, layer.delta_weight()), atol=1e-5, rtol=0)


# --- 12.15 / 14 dtypes --------------------------------------------------------------------------------------------

def test_same_dtype_as_base_by_default():
    layer = lora.Linear(16, 16, r=4, dtype=torch.bfloat16)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
    with pytest.raises(RuntimeError):
        layer(torch.randn(2, 16))  # fp32 input into a bf16 base, as in loralib and nn.Linear


def test_float32_lora_on_bf16_base_without_autocast():
    layer = _randomize_B(lora.Linear(16, 12, r=4, dtype=torch.bfloat16, lora_dtype=torch.float32))
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x.float(), layer.weight.float(), layer.bias.float()) + \
        x.float() @ layer.lora_A.T @ layer.lora_B.T * layer.scaling
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.02)
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0
    w0 = layer.weight.detach().clone()
    layer.eval()
    torch.testing.assert_close(layer.weight, (w0.float() + layer.delta_weight()).bfloat16(), atol=0, rtol=0)
    torch.testing.assert_close(layer(x).float(), ref, atol=0.1, rtol=0.02)
    layer.train()
    assert torch.equal(layer.weight, w0)


def test_float32_lora_on_bf16_base_for_every_layer_type():
    bf16, fp32 = torch.bfloat16, torch.float32
    cases = [
        (lora.MergedLinear(8, 12, r=2, enable_lora=[True, False, True], dtype=bf16, lora_dtype=fp32),
         torch.randn(3, 8, dtype=bf16)),
        (lora.Embedding(10, 8, r=2, dtype=bf16, lora_dtype=fp32), torch.tensor([1, 2, 3])),
        (lora.Conv2d(3, 4, 3, r=2, dtype=bf16, lora_dtype=fp32), torch.randn(1, 3, 5, 5, dtype=bf16)),
    ]
    for layer, x in cases:
        with torch.no_grad():
            layer.lora_A.normal_()
            layer.lora_B.normal_()
        y = layer(x)
        assert y.dtype == bf16 and layer.lora_A.dtype == fp32
        w0 = layer.weight.detach().clone()
        layer.eval()
        torch.testing.assert_close(layer(x).float(), y.float(), atol=0.15, rtol=0.05)
        layer.train()
        assert torch.equal(layer.weight, w0)


def test_rslora_scaling():
    assert lora.Linear(8, 8, r=16, lora_alpha=32, use_rslora=True).scaling == 32 / 4
    assert lora.MergedLinear(8, 12, r=4, lora_alpha=8, enable_lora=[True] * 3, use_rslora=True).scaling == 4.0
    assert lora.Embedding(8, 8, r=9, lora_alpha=3, use_rslora=True).scaling == 1.0
    assert lora.Conv1d(2, 2, 1, r=4, lora_alpha=4, use_rslora=True).scaling == 2.0
    assert lora.Linear(8, 8, r=16, lora_alpha=32).scaling == 2.0


# --- r = 0 --------------------------------------------------------------------------------------------------------

def test_r0_is_the_plain_layer():
    for layer, plain, x in [
        (lora.Linear(6, 4), nn.Linear(6, 4), torch.randn(2, 6)),
        (lora.Embedding(6, 4), nn.Embedding(6, 4), torch.tensor([0, 5])),
        (lora.Conv2d(2, 3, 3), nn.Conv2d(2, 3, 3), torch.randn(1, 2, 5, 5)),
    ]:
        assert [n for n, _ in layer.named_parameters()] == [n for n, _ in plain.named_parameters()]
        assert all(p.requires_grad for p in layer.parameters())
        plain.load_state_dict(layer.state_dict())
        torch.testing.assert_close(layer(x), plain(x))
        layer.eval()
        torch.testing.assert_close(layer(x), plain(x))
        assert torch.equal(layer.delta_weight(), torch.zeros_like(layer.weight))


# --- from_linear --------------------------------------------------------------------------------------------------

def test_from_linear_wraps_without_copy_or_init():
    base = nn.Linear(10, 6)
    w, b = base.weight, base.bias
    state = torch.get_rng_state()
    layer = lora.Linear.from_linear(base, r=4, lora_alpha=8, lora_dropout=0.1)
    assert layer.weight is w and layer.bias is b and torch.equal(layer.weight, w)
    assert not w.requires_grad and layer.lora_A.device == w.device
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(10) and torch.all(layer.lora_B == 0)
    assert layer.scaling == 2.0 and isinstance(layer, nn.Linear)
    torch.set_rng_state(state)
    x = torch.randn(3, 10)
    torch.testing.assert_close(layer.eval()(x), base(x))
    assert list(layer.state_dict()) == ["weight", "bias", "lora_A", "lora_B"]


def test_from_linear_keeps_mode_and_supports_merged_groups():
    base = nn.Linear(6, 30, bias=False).eval()
    layer = _randomize_B(lora.MergedLinear.from_linear(base, r=2, enable_lora=[True, False, True],
                                                       out_splits=[20, 5, 5], lora_dtype=torch.float64))
    assert not layer.training and not layer.merged and layer.bias is None and layer.weight is base.weight
    assert layer.lora_A.shape == (4, 6) and layer.lora_B.shape == (25, 2) and layer.lora_A.dtype == torch.float64
    x = torch.randn(2, 6)
    torch.testing.assert_close(layer(x), base(x) + (x @ layer.delta_weight().T), atol=1e-5, rtol=0)


def test_from_linear_fan_in_fan_out_takes_the_weight_as_stored():
    conv1d_like = nn.Module()
    conv1d_like.weight = nn.Parameter(torch.randn(10, 6))  # GPT-2 Conv1D layout (in, out)
    conv1d_like.bias = nn.Parameter(torch.zeros(6))
    layer = lora.Linear.from_linear(conv1d_like, r=2, fan_in_fan_out=True)
    assert (layer.in_features, layer.out_features) == (10, 6)
    x = torch.randn(3, 10)
    torch.testing.assert_close(layer(x), x @ conv1d_like.weight + conv1d_like.bias)


# --- argument validation (before anything is created or frozen) ---------------------------------------------------

@pytest.mark.parametrize("make,names", [
    (lambda: lora.Linear(4, 4, r=-1), "r"),
    (lambda: lora.Linear(4, 4, r=2.5), "r"),
    (lambda: lora.Linear(4, 4, r=2, lora_dropout=1.0), "lora_dropout"),
    (lambda: lora.Linear(4, 4, r=2, lora_dropout=-0.1), "lora_dropout"),
    (lambda: lora.Linear(4, 4, r=2, lora_dtype=torch.int8), "lora_dtype"),
    (lambda: lora.Embedding(4, 4, r=-2), "r"),
    (lambda: lora.MergedLinear(8, 10, r=2, enable_lora=[True, False, True]), "enable_lora"),
    (lambda: lora.MergedLinear(8, 12, r=2, enable_lora=[]), "enable_lora"),
    (lambda: lora.MergedLinear(8, 12, r=2, enable_lora="TFT"), "enable_lora"),
    (lambda: lora.MergedLinear(8, 12, r=2, enable_lora=[True, True], out_splits=[10, 3]), "out_splits"),
    (lambda: lora.MergedLinear(8, 12, r=2, enable_lora=[True, True], out_splits=[12]), "out_splits"),
    (lambda: lora.MergedLinear(8, 12, r=2, enable_lora=[True, True], out_splits=[13, -1]), "out_splits"),
    (lambda: lora.Conv2d(3, 6, (3, 3, 3), r=2), "kernel_size"),
    (lambda: lora.Conv1d(3, 6, 0, r=2), "kernel_size"),
    (lambda: lora.Conv2d(3, 6, 3, r=2, groups=2), "groups"),
    (lambda: lora.Conv3d(4, 6, 3, r=2, groups=4), "groups"),
    (lambda: lora.Linear.from_linear(nn.Linear(4, 4), r=-1), "r"),
    (lambda: lora.MergedLinear.from_linear(nn.Linear(4, 9), r=2, enable_lora=[True, False]), "enable_lora"),
])
def test_bad_arguments_raise_value_error_naming_the_argument(make, names):
    with pytest.raises(ValueError, match=names):
        make()


def test_bad_from_linear_arguments_leave_the_base_untouched():
    base = nn.Linear(4, 9)
    with pytest.raises(ValueError):
        lora.MergedLinear.from_linear(base, r=2, enable_lora=[True, False])
    assert base.weight.requires_grad


def test_public_surface():
    assert {"LoRALayer", "Linear", "Embedding", "MergedLinear", "Conv1d", "Conv2d", "Conv3d",
            "mark_only_lora_as_trainable", "lora_state_dict"} <= set(lora.__all__)
    assert all(hasattr(lora, name) for name in lora.__all__)
    assert not hasattr(lora, "torch") and not hasattr(lora, "nn")
    for cls in (lora.Linear, lora.MergedLinear, lora.Embedding, lora.Conv1d, lora.Conv2d, lora.Conv3d):
        assert issubclass(cls, lora.LoRALayer)
