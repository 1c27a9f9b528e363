"""phitune::rms_norm and phitune::rms_norm_backward: the Triton kernels (Triton's interpreter on a CPU, the GPU when
there is one) against the plain torch reference, the autograd function on a tiny model, the ops as phitune plan
records them, and the fake implementations.

Tolerances: the kernels repeat the reference's arithmetic step for step, except (a) the order of the two row sums
(float32, a relative error of at most (n + 4) eps32 for a row of n, the 4 for the division, sqrt and reciprocal)
and (b) on a CPU, Triton's interpreter truncates float32 -> bfloat16 where a GPU and torch round to nearest (its
``cast_impl``): one unit in the last place, at most eps(dtype) x |value|, per rounding step of the output dtype.
"""

from __future__ import annotations

import os

import torch


import pytest  # noqa: E402

pytest.importorskip("triton")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from transformers import GemmaConfig, GemmaForCausalLM, Phi3Config, Phi3ForCausalLM  # noqa: E402

from helpers import child_json  # noqa: E402

from phitune.adapt import add_lora  # noqa: E402
from phitune.config import load_config  # noqa: E402
from phitune.plan.simulate import simulate_step  # noqa: E402
from phitune.training.fast import fused, norm_rope  # noqa: E402
from phitune.training.fast.kernels import force_triton  # noqa: E402
from phitune.training.fast.kernels import rms_norm as K  # noqa: E402
from phitune.training.loss import forward_loss  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS32 = torch.finfo(torch.float32).eps
NORM_EPS = 1e-5

# (rows, width): widths of the model zoo's norms, rows scaled down and not a multiple of a program's rows.
SHAPES = [
    pytest.param(7, 3072, id="phi3-mini-and-phi4-mini-hidden"),
    pytest.param(3, 5120, id="phi3-medium-hidden"),
    pytest.param(5, 4096, id="llama-mistral-hidden"),
    pytest.param(13, 896, id="qwen2-0.5b-hidden"),
    pytest.param(37, 128, id="qwen3-head-norm-128"),
    pytest.param(9, 96, id="width-96"),
    pytest.param(11, 200, id="width-200"),
    pytest.param(2, 8192, id="widest-kernel-row"),
]
DTYPES = [  # (x, weight): y is in their promoted dtype
    pytest.param(torch.float32, torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-x-fp32-weight"),
]


def inputs(rows, width, x_dtype, w_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(rows, width, generator=g)).to(DEVICE, x_dtype)
    w = (1 + 0.5 * torch.randn(width, generator=g)).to(DEVICE, w_dtype)
    grad = torch.randn(rows, width, generator=g).to(DEVICE, torch.promote_types(x_dtype, w_dtype))
    return x, w, grad


def eps_of(*dtypes):
    return max(torch.finfo(d).eps for d in dtypes)


def exact_rstd(x):
    x64 = x.double()
    return torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + NORM_EPS)


def forward_bound(x, w, y_dtype):
    """|y - y_ref| <= |w| |x| rstd ((n + 4) eps32 + 2 eps): the rstd's sums, then one ulp at each of the two
    roundings (x·rstd to x's dtype, the product to y's)."""
    n = x.shape[-1]
    magnitude = w.double().abs() * x.double().abs() * exact_rstd(x)
    return magnitude * ((n + 4) * EPS32 + 2 * eps_of(x.dtype, y_dtype))


def backward_bound(g, x, w, rstd):
    """|gx - gx_ref| <= rstd (|gw| + |xhat| mean|gw xhat|) ((n + 4) eps32 + 2 eps), gw = g·w: the dot's sum; one
    ulp of gw (rounded to promote(g, w)) and one of gx (rounded to x's dtype)."""
    n = x.shape[-1]
    rstd64 = rstd.double()
    gw = g.double() * w.double()
    xhat = x.double() * rstd64
    magnitude = rstd64 * (gw.abs() + xhat.abs() * (gw * xhat).abs().mean(-1, keepdim=True))
    return magnitude * ((n + 4) * EPS32 + 2 * eps_of(x.dtype, torch.promote_types(g.dtype, w.dtype)))


def assert_within(got, want, bound, what):
    err = (got.double() - want.double()).abs()
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (f"{what}: |error| {err.flatten()[worst]:.3g} > bound "
                                        f"{bound.flatten()[worst]:.3g} at {worst}")


@pytest.mark.parametrize("x_dtype,w_dtype", DTYPES)
@pytest.mark.parametrize("rows,width", SHAPES)
def test_triton_kernels_equal_the_reference_within_the_rounding_bound(rows, width, x_dtype, w_dtype):
    x, w, g = inputs(rows, width, x_dtype, w_dtype)
    y_ref, rstd_ref = K.rms_norm_reference(x, w, NORM_EPS)
    gx_ref = K.rms_norm_backward_reference(g, x, w, rstd_ref)
    with force_triton():
        y, rstd = K.rms_norm(x, w, NORM_EPS)
        gx = K.rms_norm_backward(g, x, w, rstd_ref)  # the same rstd: the backward kernel's own error only
    assert (y.dtype, y.shape, rstd.dtype, rstd.shape) == (y_ref.dtype, y_ref.shape, rstd_ref.dtype, rstd_ref.shape)
    assert (gx.dtype, gx.shape) == (gx_ref.dtype, gx_ref.shape) == (x_dtype, x.shape)
    assert_within(rstd, rstd_ref, rstd_ref.double() * (width + 4) * EPS32, "rstd")
    assert_within(y, y_ref, forward_bound(x, w, y.dtype), "y")
    assert_within(gx, gx_ref, backward_bound(g, x, w, rstd_ref), "gx")


def test_kernel_handles_3d_and_non_contiguous_inputs():
    x, w, g = inputs(6 * 5, 200, torch.float32, torch.float32)
    x = x.view(5, 6, 200).transpose(0, 1)  # (6, 5, 200), not contiguous
    g = g.view(6, 5, 200)
    y_ref, rstd_ref = K.rms_norm_reference(x, w, NORM_EPS)
    with force_triton():
        y, rstd = K.rms_norm(x, w, NORM_EPS)
        gx = K.rms_norm_backward(g, x, w, rstd_ref)
    assert y.shape == (6, 5, 200) and rstd.shape == (6, 5, 1)
    assert_within(y, y_ref, forward_bound(x, w, y.dtype), "y")
    assert_within(gx, K.rms_norm_backward_reference(g, x, w, rstd_ref), backward_bound(g, x, w, rstd_ref), "gx")


def test_rows_wider_than_a_kernel_block_run_the_reference(monkeypatch):
    from phitune.training.fast.kernels import rms_norm_triton

    def refuse(*args):
        raise AssertionError("the kernel was launched for a row wider than MAX_KERNEL_WIDTH")

    monkeypatch.setattr(rms_norm_triton, "rms_norm_forward", refuse)
    monkeypatch.setattr(rms_norm_triton, "rms_norm_backward", refuse)
    x, w, g = inputs(2, K.MAX_KERNEL_WIDTH + 8, torch.float32, torch.float32)
    y_ref, rstd_ref = K.rms_norm_reference(x, w, NORM_EPS)
    with force_triton():
        y, rstd = K.rms_norm(x, w, NORM_EPS)
        gx = K.rms_norm_backward(g, x, w, rstd)
    assert torch.equal(y, y_ref) and torch.equal(rstd, rstd_ref)
    assert torch.equal(gx, K.rms_norm_backward_reference(g, x, w, rstd_ref))


def test_weight_gradient_is_the_sum_over_rows_of_g_times_xhat():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: norm_rope.RMSNormFn.apply(x, w, 1e-6), (x, w))
    assert torch.autograd.gradcheck(lambda w: norm_rope.RMSNormFn.apply(x.detach(), w, 1e-6), (w,))


def tiny_phi3_with_lora():
    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, pad_token_id=0, use_cache=False)
    model = Phi3ForCausalLM._from_config(cfg, attn_implementation="sdpa").to(DEVICE)
    add_lora(model, {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"})
    for name, p in model.named_parameters():  # non-zero B: every LoRA factor gets a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def loss_and_lora_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = forward_loss(model, batch, fused_loss=False)
    out.loss_sum.backward()
    return out.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_model_with_triton_norms_keeps_the_plain_loss_and_lora_gradients():
    model = tiny_phi3_with_lora()
    ids = torch.randint(1, 101, (2, 12), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    batch = {"input_ids": ids, "labels": ids.clone()}
    ref_loss, ref = loss_and_lora_grads(model, batch)
    counts = fused.install(model, lora_layers=False, mlp=False, attention=False)
    assert counts["rms_norm"] == 5  # 2 per layer + the final norm: the only change from the plain path
    with force_triton():
        loss, got = loss_and_lora_grads(model, batch)
    fused.uninstall(model)
    # each of the 5 norms perturbs its output by at most (n + 4) eps32 + 2 eps32 relative (see the module docstring)
    tol = 5 * (64 + 4 + 2) * EPS32
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=0)
    assert got.keys() == ref.keys() and all("lora_" in n for n in ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=tol, atol=tol * ref[name].abs().max().item(), msg=name)


def test_gemma_norm_keeps_its_own_one_plus_weight_formula():
    torch.manual_seed(0)
    cfg = GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, pad_token_id=0, use_cache=False)
    model = GemmaForCausalLM(cfg)
    assert fused.install(model, lora_layers=False, mlp=False, attention=False)["rms_norm"] == 0
    assert not any("phitune" in type(m).__module__ for m in model.modules())


@pytest.mark.parametrize("x_dtype,w_dtype,shape", [
    (torch.float32, torch.float32, (3, 5, 96)), (torch.bfloat16, torch.bfloat16, (7, 3072)),
    (torch.bfloat16, torch.float32, (2, 3, 64)), (torch.float16, torch.float32, (4, 200)),
    (torch.float64, torch.float64, (2, 8)),
])
def test_fake_implementations_give_the_real_shapes_and_dtypes(x_dtype, w_dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(x_dtype)
    w = torch.randn(shape[-1], generator=g).to(w_dtype)
    y, rstd = K.rms_norm(x, w, NORM_EPS)
    gx = K.rms_norm_backward(y, x, w, rstd)
    with FakeTensorMode() as mode:
        fx, fw, fy, frstd = (mode.from_tensor(t) for t in (x, w, y, rstd))
        y_fake, rstd_fake = K.rms_norm(fx, fw, NORM_EPS)
        gx_fake = K.rms_norm_backward(fy, fx, fw, frstd)
    for real, fake in ((y, y_fake), (rstd, rstd_fake), (gx, gx_fake)):
        assert (fake.shape, fake.dtype, fake.device) == (real.shape, real.dtype, real.device)
    torch.library.opcheck(torch.ops.phitune.rms_norm, (x, w, NORM_EPS), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.phitune.rms_norm_backward, (y, x, w, rstd),
                          test_utils=("test_schema", "test_faketensor"))


def plan_config():
    return load_config({"model": {"name_or_path": "tiny", "dtype": "bfloat16"},
                        "data": {"train": "unused.jsonl", "max_seq_length": 64, "packing": True},
                        "training_config": {"per_device_train_batch_size": 2, "max_steps": 10, "bf16": True},
                        "peft_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}})


def tiny_plan_shape():
    return Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=512, max_position_embeddings=256, pad_token_id=0)


def norm_ops(ops):
    """(count, FLOPs) of each custom op, and the names of all ops recorded."""
    found = {}
    for op in ops:
        if op.name in ("rms_norm", "rms_norm_backward"):
            count, flops = found.get(op.name, (0, 0))
            found[op.name] = (count + 1, flops + op.flops)
    return found, {op.name for op in ops}


def check_recorded(found, names, elements):
    # 5 norms of 2 x 64 tokens x 64 features. Phi-3's decoder layer fuses the residual stream into its norms
    # (test_add_rms_norm.py): post_attention_layernorm runs as add_rms_norm and the input norms' backward as
    # add_rms_norm_backward, so rms_norm is left with the 2 input norms and the final one, and rms_norm_backward
    # with the final one.
    assert found["rms_norm"] == (3, 3 * K.FORWARD_FLOPS_PER_ELEMENT * elements)
    assert found["rms_norm_backward"] == (1, 1 * K.BACKWARD_FLOPS_PER_ELEMENT * elements)
    assert not names & {"rsqrt", "pow", "mean"}, names & {"rsqrt", "pow", "mean"}  # the plain norm's ops are gone


def test_plan_records_the_norm_as_two_custom_ops_with_flops():
    sim = simulate_step(plan_config(), tiny_plan_shape(), 2, device="cpu")
    found, names = norm_ops(sim.ops)
    check_recorded(found, names, 2 * 64 * 64)
    nbytes = {op.nbytes for op in sim.ops if op.name == "rms_norm"}
    # x (bf16) in, weight (bf16) in, y (bf16) out, rstd (fp32) out: one read and one write each
    assert nbytes == {2 * 64 * 64 * 2 + 64 * 2 + 2 * 64 * 64 * 2 + 2 * 64 * 4}


SIMULATE_ON_FAKE_CUDA = """
import json, sys
sys.path[:0] = {paths!r}
import test_rms_norm as t
from phitune.plan.simulate import simulate_step
sim = simulate_step(t.plan_config(), t.tiny_plan_shape(), 2, device="cuda")
found, names = t.norm_ops(sim.ops)
print(json.dumps({{"found": found, "names": sorted(names)}}))
"""


@pytest.mark.slow  # a child process with the fake CUDA runtime, importing torch and transformers: ~10-20 s
def test_plan_on_fake_cuda_records_the_norm_as_two_custom_ops_with_flops(tmp_path):
    from phitune.plan import fakegpu

    here = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "simulate.py"
    script.write_text(SIMULATE_ON_FAKE_CUDA.format(paths=[here, os.path.join(here, "..", "..", "..")]))
    result = child_json(fakegpu.worker_command("", fakegpu.ensure_shim(), script=str(script)), timeout=300)
    found = {name: tuple(v) for name, v in result["found"].items()}
    check_recorded(found, set(result["names"]), 2 * 64 * 64)
