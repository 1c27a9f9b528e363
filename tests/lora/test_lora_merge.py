"""Merge/unmerge exactness, state_dict while merged, pickling and deepcopy (spec section 14 fixes)."""

import copy
import io

import pytest
import torch
import torch.nn as nn

import phitune.lora as lora


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _randomize(layer, scale=0.3):
    with torch.no_grad():
        layer.lora_A.normal_(0, scale)
        layer.lora_B.normal_(0, scale)
    return layer


def _layers(dtype, dropout=0.0):
    return {
        "linear": (lora.Linear(32, 24, r=4, lora_alpha=8, lora_dropout=dropout, dtype=dtype), torch.randn(3, 32)),
        "fan_in_fan_out": (lora.Linear(32, 24, r=4, lora_dropout=dropout, fan_in_fan_out=True, dtype=dtype),
                           torch.randn(3, 32)),
        "merged": (lora.MergedLinear(16, 30, r=2, lora_dropout=dropout, enable_lora=[True, False, True],
                                     out_splits=[20, 5, 5], dtype=dtype), torch.randn(3, 16)),
        "embedding": (lora.Embedding(20, 12, r=4, dtype=dtype), torch.tensor([1, 4, 7])),
        "conv2d": (lora.Conv2d(3, 6, 3, r=2, lora_dropout=dropout, dtype=dtype), torch.randn(1, 3, 6, 6)),
        "conv3d": (lora.Conv3d(2, 4, (3, 1, 2), r=2, lora_dropout=dropout, dtype=dtype), torch.randn(1, 2, 4, 4, 4)),
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name", list(_layers(torch.float32)))
def test_merge_unmerge_is_bit_exact_after_many_cycles(dtype, name):
    layer, _ = _layers(dtype)[name]
    _randomize(layer)
    w0 = layer.weight.detach().clone()
    for _ in range(50):
        layer.eval()
        assert not torch.equal(layer.weight, w0)
        layer.train()
        assert torch.equal(layer.weight, w0)
    for _ in range(5):
        layer.merge()
        layer.unmerge()
    assert torch.equal(layer.weight, w0)


def test_bf16_merge_is_one_rounding_of_the_float32_sum():
    layer = _randomize(lora.Linear(32, 24, r=4, dtype=torch.bfloat16))
    expected = (layer.weight.float() + layer.delta_weight()).bfloat16()
    layer.merge()
    assert torch.equal(layer.weight, expected)


def test_lora_state_dict_loaded_while_merged_takes_effect():
    model = nn.Sequential(_randomize(lora.Linear(8, 6, r=2)), _randomize(lora.MergedLinear(6, 9, r=2,
                                                                                          enable_lora=[True] * 3)))
    other = copy.deepcopy(model)
    _randomize(other[0]), _randomize(other[1])
    x = torch.randn(4, 8)
    expected = other.eval()(x)
    base_weights = [m.weight.detach().clone() for m in model]
    model.eval()
    model.load_state_dict(lora.lora_state_dict(other), strict=False)  # loralib: silently ignored
    torch.testing.assert_close(model(x), expected)
    model.train()
    assert all(torch.equal(m.weight, w) for m, w in zip(model, base_weights))  # loralib: corrupted W
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("load_mode", ["train", "eval"])
def test_full_state_dict_taken_while_merged_never_applies_delta_twice(load_mode):
    model = nn.Sequential(_randomize(lora.Linear(8, 6, r=2)), nn.ReLU(), _randomize(lora.Conv1d(1, 1, 3, r=1)))
    x = torch.randn(4, 1, 8)
    expected = model(x)
    w0 = model[0].weight.detach().clone()
    model.eval()
    state = model.state_dict()
    assert torch.equal(state["0.weight"], w0)  # the unmerged weight is what gets saved
    fresh = nn.Sequential(lora.Linear(8, 6, r=2), nn.ReLU(), lora.Conv1d(1, 1, 3, r=1))
    fresh.train(load_mode == "train")
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x), expected, atol=1e-5, rtol=0)
    fresh.train()
    assert torch.equal(fresh[0].weight, w0)
    torch.testing.assert_close(fresh(x), expected, atol=1e-5, rtol=0)


def test_merge_copy_is_not_saved_and_follows_to():
    layer = _randomize(lora.Linear(8, 6, r=2)).eval()
    assert list(layer.state_dict()) == ["weight", "bias", "lora_A", "lora_B"]
    layer.to(torch.float64)
    layer.train()
    assert layer.weight.dtype == torch.float64 and not layer.merged


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("name", list(_layers(torch.float32)))
def test_pickle_and_deepcopy(name, dropout):
    layer, x = _layers(torch.float32, dropout)[name]
    _randomize(layer)
    w0 = layer.weight.detach().clone()
    layer.eval()
    buffer = io.BytesIO()
    torch.save(layer, buffer)  # loralib: fails with lora_dropout=0 (a lambda)
    buffer.seek(0)
    for clone in (torch.load(buffer, weights_only=False), copy.deepcopy(layer)):
        assert clone.merged and torch.equal(clone(x), layer(x))
        clone.train()
        assert torch.equal(clone.weight, w0)


def test_state_dict_round_trip_between_fresh_models():
    model = nn.Sequential(lora.Embedding(10, 8, r=2), _randomize(lora.Linear(8, 8, r=2)),
                          _randomize(lora.MergedLinear(8, 12, r=2, enable_lora=[False, True, True])))
    x = torch.tensor([[1, 2, 3]])
    expected = model(x)
    fresh = nn.Sequential(lora.Embedding(10, 8, r=2), lora.Linear(8, 8, r=2),
                          lora.MergedLinear(8, 12, r=2, enable_lora=[False, True, True]))
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), expected)
