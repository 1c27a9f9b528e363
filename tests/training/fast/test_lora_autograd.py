"""lora_autograd's LoRA epilogue: the small K=r product is written first and the frozen matmul accumulates onto it
(beta=1, or beta=s), so on a GPU the LoRA term is read in the big GEMM's epilogue instead of a pass of its own."""

from collections import Counter

import pytest
import torch
from transformers import Phi3Config

from phitune.config import load_config
from phitune.plan.simulate import simulate_step
from phitune.training.fast import lora_autograd

torch.set_num_threads(1)
BF16_EPS = torch.finfo(torch.bfloat16).eps
F32_EPS = torch.finfo(torch.float32).eps


def bf16_inputs(n=24, d=80, out=72, r=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, W, A, B, b, gy = (torch.randn(*shape, generator=g).bfloat16()
                         for shape in [(n, d), (out, d), (r, d), (out, r), (out,), (n, out)])
    return x, W, A, B, b, gy


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_lora_term_first_keeps_bf16_output_and_input_grad_within_their_rounding_bounds(monkeypatch, with_bias, p):
    """Exact (float64) y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ and its x gradient from the same bf16 values. Bounds, per
    rounding of a bfloat16 result (eps relative to the sum of the absolute terms), the float32 accumulation of K
    terms adding K float32 eps: y rounds xa, xa Bᵀ (with the bias when there is one) and the final sum, so the LoRA
    term carries 3 bf16 roundings and x Wᵀ + b two (the bias is rounded into the first product, then the sum); gx
    likewise rounds g B, (g B) A and the sum. Independent of the summation order the epilogue chose."""
    x, W, A, B, b, gy = bf16_inputs()
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) >= p
    monkeypatch.setattr(lora_autograd, "_dropout_mask", lambda t, q: mask if q > 0 else None)
    bias = b if with_bias else None
    scaling = 2.0
    s = scaling / (1 - p)
    xr = x.clone().requires_grad_()
    y = lora_autograd.LoRALinearFn.apply(xr, W, bias, A, B, scaling, p)
    y.backward(gy)

    x64, W64, A64, B64, b64, gy64 = (v.double() for v in (x, W, A, B, b, gy))
    xd = x64 * mask
    y_exact = x64 @ W64.t() + s * (xd @ A64.t()) @ B64.t() + (b64 if with_bias else 0)
    gx_exact = gy64 @ W64 + s * ((gy64 @ B64) @ A64) * mask
    ax, aW, aA, aB, ag = (v.abs() for v in (x64, W64, A64, B64, gy64))
    base, lora_term = ax @ aW.t() + (b64.abs() if with_bias else 0), s * ((ax @ aA.t()) @ aB.t())
    y_tol = 2 * BF16_EPS * base + 3 * BF16_EPS * lora_term + F32_EPS * (x.shape[1] + A.shape[0]) * (base + lora_term)
    g_base, g_lora = ag @ aW, s * ((ag @ aB) @ aA)
    g_tol = 2 * BF16_EPS * g_base + 3 * BF16_EPS * g_lora + F32_EPS * (W.shape[0] + A.shape[0]) * (g_base + g_lora)
    assert y.dtype == xr.grad.dtype == torch.bfloat16
    assert bool(((y.double() - y_exact).abs() <= y_tol).all())
    assert bool(((xr.grad.double() - gx_exact).abs() <= g_tol).all())
    # the LoRA term matters at this size: dropping it would break the bound
    assert not bool(((x64 @ W64.t() + (b64 if with_bias else 0) - y_exact).abs() <= y_tol).all())


def test_plan_sees_the_frozen_matmuls_as_addmm_with_their_flops_and_no_separate_lora_pass():
    """phitune plan's OpRecorder: every LoRA linear's forward and input gradient is one addmm (the frozen GEMM with
    the LoRA term as its C, its 2·N·in·out FLOPs counted), and no addmm_ (the old memory-bound pass over (N, out),
    which torch's flop registry does not even count) is left."""
    cfg = load_config({"model": {"name_or_path": "tiny", "dtype": "float32"},
                       "data": {"train": "unused.jsonl", "max_seq_length": 64, "packing": True},
                       "training_config": {"per_device_train_batch_size": 2, "use_cpu": True, "max_steps": 10},
                       "peft_config": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}})
    hidden, inter = 64, 96
    shape = Phi3Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=512, max_position_embeddings=256, pad_token_id=0)
    sim = simulate_step(cfg, shape, 2, device="cpu")
    tokens = sim.batch_shape[0] * sim.batch_shape[1]
    names = Counter(o.name for o in sim.ops)
    assert names["addmm_"] == 0, names
    # (in, out) of qkv_proj, o_proj, gate_up_proj, down_proj: forward and input gradient in each of 2 layers
    linears = [(hidden, 3 * hidden), (hidden, hidden), (hidden, 2 * inter), (inter, hidden)]
    want = Counter()
    for i, o in linears:  # qkv and gate_up have the same FLOPs here: counted, not keyed
        want[2 * tokens * i * o] += 4
    want[2 * tokens * hidden * 3 * hidden] -= 1  # layer 0's qkv input gradient reaches only frozen embeddings: none
    assert Counter(o.flops for o in sim.ops if o.name == "addmm") == want
