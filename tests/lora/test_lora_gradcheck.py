"""torch.autograd.gradcheck in float64 for every layer type, w.r.t. the input and lora_A/lora_B."""

import pytest
import torch
from torch.func import functional_call

import phitune.lora as lora

f64 = torch.float64

CASES = {
    "linear": (lambda: lora.Linear(5, 4, r=2, lora_alpha=3, dtype=f64), (2, 5)),
    "fan_in_fan_out": (lambda: lora.Linear(5, 4, r=2, fan_in_fan_out=True, dtype=f64), (2, 3, 5)),
    "merged_equal": (lambda: lora.MergedLinear(4, 6, r=2, enable_lora=[True, False, True], dtype=f64), (3, 4)),
    "merged_unequal": (lambda: lora.MergedLinear(4, 7, r=1, enable_lora=[True, True, False], out_splits=[4, 2, 1],
                                                 fan_in_fan_out=True, use_rslora=True, dtype=f64), (2, 2, 4)),
    "embedding": (lambda: lora.Embedding(7, 4, r=2, padding_idx=0, dtype=f64), None),
    "conv1d": (lambda: lora.Conv1d(4, 2, 3, r=2, groups=2, padding=1, dtype=f64), (1, 4, 5)),
    "conv2d": (lambda: lora.Conv2d(2, 4, (3, 2), r=1, groups=2, dtype=f64), (1, 2, 4, 4)),
    "conv3d": (lambda: lora.Conv3d(2, 2, 3, r=1, padding=1, dtype=f64), (1, 2, 3, 3, 3)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck(name):
    torch.manual_seed(0)
    make, x_shape = CASES[name]
    layer = make()
    params = {k: v.detach() for k, v in layer.named_parameters()}
    A = torch.randn_like(params.pop("lora_A")).requires_grad_()
    B = torch.randn_like(params.pop("lora_B")).requires_grad_()

    if x_shape is None:  # embedding: differentiate w.r.t. A and B only
        idx = torch.tensor([[5, 3, 6], [1, 1, 2]])  # the pad row gets no gradient by design (loralib)
        inputs = (A, B)
        fn = lambda A, B: functional_call(layer, {**params, "lora_A": A, "lora_B": B}, (idx,))  # noqa: E731
    else:
        x = torch.randn(x_shape, dtype=f64, requires_grad=True)
        inputs = (x, A, B)
        fn = lambda x, A, B: functional_call(layer, {**params, "lora_A": A, "lora_B": B}, (x,))  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)
