"""phitune::add_rms_norm and phitune::add_rms_norm_backward (a decoder layer's residual add fused with the norm after
it): the Triton kernels (Triton's interpreter on a CPU, the GPU when there is one) against the plain torch reference,
Phi-3's swapped decoder layer against the plain model, uninstall, the ops as phitune plan records them, and the fake
implementations.

Tolerances: as in test_rms_norm.py (the kernels repeat the reference's roundings; they differ in the order of the row
sums, (n + 4) eps32 relative, and Triton's interpreter truncates to bfloat16 where torch rounds to nearest: one ulp,
eps(dtype) x |value|, per rounding to a half dtype). New here: s = x + residual is one rounding (exact in float32 on
both sides, one ulp of a half dtype under the interpreter), which moves rstd by at most eps(s) relative and y by
eps(s) |w| |s| rstd more; backward adds g_s to the rounded norm gradient and rounds once more: eps(s) (|gx| + |g_s|).
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import torch


import pytest  # noqa: E402

pytest.importorskip("triton")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from transformers import Phi3Config  # noqa: E402
from zoo import VOCAB, build  # noqa: E402

from helpers import child_json  # noqa: E402

from phitune.adapt import add_lora  # noqa: E402
from phitune.config import load_config  # noqa: E402
from phitune.plan.simulate import simulate_step  # noqa: E402
from phitune.training.fast import fused, norm_rope  # noqa: E402
from phitune.training.fast.kernels import force_triton  # noqa: E402
from phitune.training.fast.kernels import rms_norm as K  # noqa: E402
from phitune.training.loss import apply_fast_path, forward_loss  # noqa: E402
from phitune.training.step import batch_maker  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS32 = torch.finfo(torch.float32).eps
NORM_EPS = 1e-5

# (rows, width): hidden sizes of the model zoo (the residual stream), rows scaled down and not a multiple of a
# program's rows.
SHAPES = [
    pytest.param(7, 3072, id="phi3-mini-and-phi4-mini-hidden"),
    pytest.param(3, 5120, id="phi3-medium-hidden"),
    pytest.param(5, 4096, id="llama-mistral-hidden"),
    pytest.param(13, 896, id="qwen2-0.5b-hidden"),
    pytest.param(11, 200, id="width-200"),
    pytest.param(9, 96, id="width-96"),
]
DTYPES = [  # (x, residual, weight): x is the attention output, residual the stream (float32 under autocast)
    pytest.param(torch.float32, torch.float32, torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, torch.bfloat16, torch.bfloat16, id="bf16"),
    pytest.param(torch.bfloat16, torch.float32, torch.float32, id="bf16-x-fp32-residual-autocast"),
]


def eps_of(*dtypes):
    return max(torch.finfo(d).eps for d in dtypes)


def inputs(rows, width, x_dtype, r_dtype, w_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g).to(DEVICE, x_dtype)
    residual = (3 * torch.randn(rows, width, generator=g)).to(DEVICE, r_dtype)
    w = (1 + 0.5 * torch.randn(width, generator=g)).to(DEVICE, w_dtype)
    s_dtype = torch.promote_types(x_dtype, r_dtype)
    g_y = torch.randn(rows, width, generator=g).to(DEVICE, torch.promote_types(s_dtype, w_dtype))
    g_s = torch.randn(rows, width, generator=g).to(DEVICE, s_dtype)
    return x, residual, w, g_y, g_s


def assert_within(got, want, bound, what):
    err = (got.double() - want.double()).abs()
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (f"{what}: |error| {err.flatten()[worst]:.3g} > bound "
                                        f"{bound.flatten()[worst]:.3g} at {worst}")


@pytest.mark.parametrize("x_dtype,r_dtype,w_dtype", DTYPES)
@pytest.mark.parametrize("rows,width", SHAPES)
def test_triton_kernels_equal_the_reference_within_the_rounding_bound(rows, width, x_dtype, r_dtype, w_dtype):
    x, residual, w, g_y, g_s = inputs(rows, width, x_dtype, r_dtype, w_dtype)
    s_ref, y_ref, rstd_ref = K.add_rms_norm_reference(x, residual, w, NORM_EPS)
    g_ref = K.add_rms_norm_backward_reference(g_y, g_s, s_ref, w, rstd_ref)
    with force_triton():
        s, y, rstd = K.add_rms_norm(x, residual, w, NORM_EPS)
        g = K.add_rms_norm_backward(g_y, g_s, s_ref, w, rstd_ref)  # the reference's s, rstd: backward's own error
    for got, want in ((s, s_ref), (y, y_ref), (rstd, rstd_ref), (g, g_ref)):
        assert (got.dtype, got.shape) == (want.dtype, want.shape)
    assert g.dtype == s.dtype == torch.promote_types(x_dtype, r_dtype)

    n, eps_s, eps_y = width, eps_of(s.dtype), eps_of(s.dtype, y.dtype)
    sums = (n + 4) * EPS32
    s64, w64, rstd64 = s_ref.double(), w.double(), rstd_ref.double()
    assert_within(s, s_ref, eps_s * s64.abs(), "s")
    assert_within(rstd, rstd_ref, rstd64 * (sums + eps_s), "rstd")
    # the norm's two roundings (x·rstd, then · w) plus s's own ulp
    assert_within(y, y_ref, w64.abs() * s64.abs() * rstd64 * (sums + 2 * eps_y + 2 * eps_s), "y")
    gw = g_y.double() * w64
    xhat = s64 * rstd64
    norm_grad = rstd64 * (gw.abs() + xhat.abs() * (gw * xhat).abs().mean(-1, keepdim=True))
    gx_bound = norm_grad * (sums + 2 * eps_of(s.dtype, torch.promote_types(g_y.dtype, w.dtype)))
    assert_within(g, g_ref, gx_bound + eps_s * (norm_grad + g_s.double().abs()), "g")


def test_kernel_handles_3d_and_non_contiguous_inputs():
    x, residual, w, g_y, g_s = inputs(6 * 5, 200, torch.float32, torch.float32, torch.float32)
    x = x.view(5, 6, 200).transpose(0, 1)  # (6, 5, 200), not contiguous
    residual, g_y, g_s = (t.view(6, 5, 200) for t in (residual, g_y, g_s))
    s_ref, y_ref, rstd_ref = K.add_rms_norm_reference(x, residual, w, NORM_EPS)
    with force_triton():
        s, y, rstd = K.add_rms_norm(x, residual, w, NORM_EPS)
        g = K.add_rms_norm_backward(g_y, g_s, s_ref, w, rstd_ref)
    assert s.shape == y.shape == (6, 5, 200) and rstd.shape == (6, 5, 1)
    assert torch.equal(s, s_ref)  # one float32 add on both sides
    bound = (200 + 8) * EPS32
    torch.testing.assert_close(y, y_ref, rtol=bound, atol=bound * y_ref.abs().max().item())
    g_ref = K.add_rms_norm_backward_reference(g_y, g_s, s_ref, w, rstd_ref)
    torch.testing.assert_close(g, g_ref, rtol=bound, atol=bound * g_ref.abs().max().item())


def test_autograd_functions_pass_gradcheck():
    gen = torch.Generator().manual_seed(2)
    x, r, h = (torch.randn(2, 3, 6, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3))
    w = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, r, w: norm_rope.AddRMSNormFn.apply(x, r, w, 1e-6), (x, r, w))
    assert torch.autograd.gradcheck(lambda h, w: norm_rope.ResidualRMSNormFn.apply(h, w, 1e-6), (h, w))


# --- Phi-3's decoder layer swapped: the same loss and LoRA gradients as the plain model -------------------------------

PACKED = ((20, 7), (9, 12))  # two samples per row, position_ids restarting
PADDED = ((11,), (6,))


def phi3_with_lora():
    model = build("phi3-mini")
    add_lora(model, {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"})
    with torch.no_grad():  # non-zero lora_B: every LoRA factor gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.to(DEVICE)


def loss_and_lora_grads(model, rows, fast, autocast):
    gen = torch.Generator().manual_seed(5)
    samples, entry = [], []
    for row in rows:
        entry.append([])
        for n in row:
            ids = torch.randint(3, VOCAB, (n,), generator=gen).tolist()
            samples.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
            entry[-1].append(len(samples) - 1)
    packing = len(rows[0]) > 1
    if not packing:
        entry = [i for row in entry for i in row]
    batch = batch_maker(model, None, SimpleNamespace(max_seq_length=32, packing=packing), fast)(samples, entry)
    batch = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        out = forward_loss(model, batch, fast=fast)
        out.loss_sum.backward()
    return out.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def tolerance(config, bf16: bool, magnitude: float) -> float:
    """As tests/training/fast/test_fast_zoo.py derives it, for the norms alone: float32, the 5 norms' row sums
    ((hidden + 4) eps32 each) along the forward chain and back; bfloat16 autocast, where a norm's output is rounded
    to bfloat16 for the next matmul, one ulp (eps_bf16) on each of the K values the longest reduction sums, adding like
    a random walk (sqrt K)."""
    chain = 2 * 5 * (config.hidden_size + 4)
    variance = EPS32**2 * chain
    if bf16:
        variance += torch.finfo(torch.bfloat16).eps ** 2 * max(config.hidden_size, config.intermediate_size, VOCAB)
    return math.sqrt(variance) * magnitude


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_swapped_decoder_layer_keeps_the_plain_loss_and_lora_gradients(bf16, packed):
    model = phi3_with_lora()
    rows = PACKED if packed else PADDED
    plain = apply_fast_path(model, {"fast_path": "off"})
    ref_loss, ref = loss_and_lora_grads(model, rows, plain, bf16)
    counts = fused.install(model, lora_layers=False, mlp=False, attention=False)
    assert counts["add_rms_norm"] == 2 and counts["rms_norm"] == 5
    with force_triton():
        loss, got = loss_and_lora_grads(model, rows, plain, bf16)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=tolerance(model.config, bf16, ref_loss.abs().item()))
    assert got.keys() == ref.keys() and len(ref) == 16 and all("lora_" in n for n in ref)
    for name in ref:
        atol = tolerance(model.config, bf16, ref[name].abs().max().item())
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=atol, msg=name)


def test_swapped_decoder_layer_under_gradient_checkpointing_keeps_the_plain_gradients(monkeypatch):
    """transformers wraps a decoder layer subclass's forward for checkpointing: the fused forward is what is
    recomputed in backward, with the same results."""
    model = phi3_with_lora()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    plain = apply_fast_path(model, {"fast_path": "off"})
    ref_loss, ref = loss_and_lora_grads(model, PACKED, plain, False)
    assert fused.install(model, lora_layers=False, mlp=False, attention=False)["add_rms_norm"] == 2
    calls = []
    original = norm_rope.AddRMSNormFn.forward

    def counted(ctx, *args):
        calls.append(1)
        return original(ctx, *args)

    monkeypatch.setattr(norm_rope.AddRMSNormFn, "forward", staticmethod(counted))
    with force_triton():
        loss, got = loss_and_lora_grads(model, PACKED, plain, False)
    assert len(calls) == 4  # 2 layers, each run again in backward
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=tolerance(model.config, False, ref_loss.abs().item()))
    for name in ref:
        atol = tolerance(model.config, False, ref[name].abs().max().item())
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=atol, msg=name)


def test_uninstall_restores_the_decoder_layer_class():
    model = phi3_with_lora()
    before = [type(m) for m in model.modules()]
    fused.install(model)
    layer = model.model.layers[0]
    # transformers wraps every decoder layer subclass's forward for gradient checkpointing (functools.wraps)
    forward = getattr(type(layer).forward, "__wrapped__", type(layer).forward)
    assert type(layer).__name__ == "FusedPhi3DecoderLayer" and forward is fused._decoder_layer_forward
    fused.uninstall(model)
    assert [type(m) for m in model.modules()] == before


def test_residual_dropout_keeps_the_original_decoder_layer():
    model = build("phi3-mini", resid_pdrop=0.1)
    counts = fused.install(model, lora_layers=False, mlp=False, attention=False)
    assert counts["add_rms_norm"] == 0 and counts["rms_norm"] == 5
    assert all(type(layer).__name__ == "Phi3DecoderLayer" for layer in model.model.layers)


def test_a_norm_switched_to_another_kernel_takes_the_original_forward(monkeypatch):
    model = phi3_with_lora()
    fused.install(model, lora_layers=False, mlp=False, attention=False)
    layer = model.model.layers[0]
    called = []
    monkeypatch.setattr(norm_rope.AddRMSNormFn, "apply", lambda *a: called.append(a) or (_ for _ in ()).throw(
        AssertionError("fused with a norm that is not phitune's")))
    # what use_liger does on CUDA: the norm's class is switched to one whose forward is another kernel
    norm = layer.post_attention_layernorm
    norm.__class__ = fused._fused_subclass(type(norm)._phitune_original_class, lambda self, x: x * self.weight, "t")
    hidden = torch.randn(1, 5, 64, device=DEVICE)
    pos = torch.arange(5, device=DEVICE)[None]
    out = layer(hidden, position_ids=pos, position_embeddings=model.model.rotary_emb(hidden, pos))
    assert out.shape == hidden.shape and not called


@pytest.mark.parametrize("x_dtype,r_dtype,shape", [
    (torch.float32, torch.float32, (3, 5, 96)), (torch.bfloat16, torch.bfloat16, (7, 3072)),
    (torch.bfloat16, torch.float32, (2, 3, 64)), (torch.float64, torch.float64, (2, 8)),
])
def test_fake_implementations_give_the_real_shapes_and_dtypes(x_dtype, r_dtype, shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(x_dtype)
    residual = torch.randn(shape, generator=gen).to(r_dtype)
    w = torch.randn(shape[-1], generator=gen).to(r_dtype)
    s, y, rstd = K.add_rms_norm(x, residual, w, NORM_EPS)
    g = K.add_rms_norm_backward(y, s, s, w, rstd)
    with FakeTensorMode() as mode:
        fx, fr, fw, fs, fy, frstd = (mode.from_tensor(t) for t in (x, residual, w, s, y, rstd))
        fakes = (*K.add_rms_norm(fx, fr, fw, NORM_EPS), K.add_rms_norm_backward(fy, fs, fs, fw, frstd))
    for real, fake in zip((s, y, rstd, g), fakes):
        assert (fake.shape, fake.dtype, fake.device) == (real.shape, real.dtype, real.device)
    torch.library.opcheck(torch.ops.phitune.add_rms_norm, (x, residual, w, NORM_EPS),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.phitune.add_rms_norm_backward, (y, s, s, w, rstd),
                          test_utils=("test_schema", "test_faketensor"))


def plan_config():
    return load_config({"model": {"name_or_path": "tiny", "dtype": "bfloat16"},
                        "data": {"train": "unused.jsonl", "max_seq_length": 64, "packing": True},
                        "training_config": {"per_device_train_batch_size": 2, "max_steps": 10, "bf16": True},
                        "peft_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}})


def tiny_plan_shape():
    return Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=512, max_position_embeddings=256, pad_token_id=0)


ELEMENTS = 2 * 64 * 64  # the plan's batch: 2 rows x 64 tokens x hidden 64


def recorded(ops):
    """(count, FLOPs) per op name, and the byte counts of the residual stream's plain adds (bf16: 2 reads, 1 write)."""
    found = {}
    for op in ops:
        count, flops = found.get(op.name, (0, 0))
        found[op.name] = (count + 1, flops + op.flops)
    stream_adds = [op.nbytes for op in ops if op.name == "add" and op.nbytes == 3 * 2 * ELEMENTS]
    return found, stream_adds


def check_recorded(found, stream_adds):
    # forward: post_attention_layernorm with the residual add, per layer
    assert tuple(found["add_rms_norm"]) == (2, 2 * K.ADD_FORWARD_FLOPS_PER_ELEMENT * ELEMENTS)
    # backward: post_attention_layernorm per layer, and layer 1's input_layernorm (layer 0's input, the frozen
    # embedding, needs no gradient)
    assert tuple(found["add_rms_norm_backward"]) == (3, 3 * K.ADD_BACKWARD_FLOPS_PER_ELEMENT * ELEMENTS)
    # the plain norm ops stay for the input norms (forward) and the final norm (both directions)
    assert found["rms_norm"][0] == 3 and found["rms_norm_backward"][0] == 1
    # what is left of the residual stream's adds: the add after each MLP (no gradient sums in backward)
    assert len(stream_adds) == 2, stream_adds


def test_plan_records_the_fused_residual_norms_as_custom_ops_with_flops():
    sim = simulate_step(plan_config(), tiny_plan_shape(), 2, device="cpu")
    check_recorded(*recorded(sim.ops))


SIMULATE_ON_FAKE_CUDA = """
import json, sys
sys.path[:0] = {paths!r}
import test_add_rms_norm as t
from phitune.plan.simulate import simulate_step
sim = simulate_step(t.plan_config(), t.tiny_plan_shape(), 2, device="cuda")
found, stream_adds = t.recorded(sim.ops)
print(json.dumps({{"found": found, "stream_adds": stream_adds}}))
"""


@pytest.mark.slow  # a child process with the fake CUDA runtime, importing torch and transformers: ~10-20 s
def test_plan_on_fake_cuda_records_the_fused_residual_norms_with_flops(tmp_path):
    from phitune.plan import fakegpu

    here = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "simulate.py"
    script.write_text(SIMULATE_ON_FAKE_CUDA.format(paths=[here, os.path.join(here, "..", "..", "..")]))
    result = child_json(fakegpu.worker_command("", fakegpu.ensure_shim(), script=str(script)), timeout=300)
    check_recorded(result["found"], result["stream_adds"])
