"""phitune.training.fast: fused LoRA/SwiGLU/RMSNorm functions and apply_fast_path keep the plain path's loss and
gradients."""

import pytest
import torch
import torch.nn.functional as F
from transformers import Phi3Config, Phi3ForCausalLM

from phitune import lora
from phitune.adapt import adapter_state_dict, add_lora
from phitune.training.fast import fused, lora_autograd, norm_rope
from phitune.training.loss import apply_fast_path, forward_loss

torch.set_num_threads(1)


def model_with_lora(dropout=0.0, target="all-linear", vocab=101, **kw):
    torch.manual_seed(0)
    kw = {"num_key_value_heads": 4, **kw}
    cfg = Phi3Config(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, pad_token_id=0, use_cache=False, **kw)
    model = Phi3ForCausalLM._from_config(cfg, attn_implementation="sdpa")
    add_lora(model, {"r": 4, "lora_alpha": 8, "lora_dropout": dropout, "target_modules": target})
    for n, p in model.named_parameters():  # non-zero B so every LoRA path carries gradient
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return model


def batch(B=2, T=10, vocab=101):
    ids = torch.randint(1, vocab, (B, T), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "labels": labels}


def loss_and_grads(model, b, **kw):
    model.zero_grad(set_to_none=True)
    out = forward_loss(model, b, **kw)
    out.loss_sum.backward()
    return out.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class FixedMask:
    """Replaces the dropout mask generator with a fixed pattern, so dropout paths can be compared and grad-checked."""

    def __init__(self, monkeypatch):
        monkeypatch.setattr(lora_autograd, "_dropout_mask", self)  # fused_4bit's functions draw theirs there too

    def __call__(self, x, p):
        if p <= 0:
            return None
        g = torch.Generator().manual_seed(x.shape[-1])
        return (torch.rand(x.shape, generator=g) >= p).to(x.device)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_linear_gradcheck(monkeypatch, p):
    FixedMask(monkeypatch)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(7, 6, dtype=torch.float64, generator=g)
    b = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    A = torch.randn(3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    fn = lambda x, b, A, B: lora_autograd.LoRALinearFn.apply(x, W, b, A, B, 1.5, p)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, b, A, B))
    mask = lora_autograd._dropout_mask(x, p)
    xd = x if mask is None else x * mask / (1 - p)
    ref = F.linear(x, W, b) + 1.5 * (xd @ A.t()) @ B.t()
    torch.testing.assert_close(fn(x, b, A, B), ref)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_swiglu_down_gradcheck(monkeypatch, p):
    FixedMask(monkeypatch)
    g = torch.Generator().manual_seed(1)
    gu = torch.randn(5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(6, 4, dtype=torch.float64, generator=g)
    A = torch.randn(2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(6, 2, dtype=torch.float64, generator=g, requires_grad=True)
    fn = lambda gu, A, B: lora_autograd.SwiGLUDownFn.apply(gu, W, None, A, B, 2.0, p)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (gu, A, B))
    gate, up = gu.chunk(2, -1)
    h = F.silu(gate) * up
    mask = lora_autograd._dropout_mask(h, p)
    hd = h if mask is None else h * mask / (1 - p)
    torch.testing.assert_close(fn(gu, A, B), F.linear(h, W) + 2.0 * (hd @ A.t()) @ B.t())


@pytest.mark.parametrize("rotary", [8, 4])
def test_qkv_rope_gradcheck(rotary):
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 3, (2 + 2 * 1) * 8, dtype=torch.float64, generator=g, requires_grad=True)
    cos, sin = torch.randn(2, 3, rotary, dtype=torch.float64, generator=g), torch.randn(2, 3, rotary,
                                                                                       dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda t: norm_rope.QKVRopeFn.apply(t, cos, sin, 2, 1, 8), (qkv,))
    q, k, v = norm_rope.QKVRopeFn.apply(qkv, cos, sin, 2, 1, 8)
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb
    qr = qkv[..., :16].view(2, 3, 2, 8).transpose(1, 2)
    kr = qkv[..., 16:24].view(2, 3, 1, 8).transpose(1, 2)
    q_ref, k_ref = apply_rotary_pos_emb(qr, kr, cos, sin)
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(k, k_ref)
    torch.testing.assert_close(v, qkv[..., 24:].view(2, 3, 1, 8).transpose(1, 2))


def test_rms_norm_gradcheck():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: norm_rope.RMSNormFn.apply(x, w, 1e-6), (x, w))


@pytest.mark.parametrize("target,kw", [("all-linear", {}), (["q_proj", "v_proj", "down_proj"], {}),
                                       ("all-linear", {"num_key_value_heads": 2, "partial_rotary_factor": 0.5})])
def test_fast_path_equals_plain(target, kw):
    model = model_with_lora(target=target, **kw)
    b = batch()
    ref_loss, ref = loss_and_grads(model, b, fused_loss=False)
    names = sorted(n for n, _ in model.named_parameters())
    keys = sorted(adapter_state_dict(model))
    notes = apply_fast_path(model, None).notes
    assert any("fused" in n and "qkv_rope" in n and "swiglu_mlp" in n for n in notes), notes
    assert any(type(m) is fused.FusedLoRALinear or type(m) is fused.FusedLoRAMergedLinear for m in model.modules())
    assert all(isinstance(m, (lora.Linear, lora.MergedLinear)) for m in model.modules() if "Fused" in type(m).__name__
               and "LoRA" in type(m).__name__)
    assert sorted(n for n, _ in model.named_parameters()) == names and sorted(adapter_state_dict(model)) == keys
    loss, got = loss_and_grads(model, b)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert got.keys() == ref.keys() and ref
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)
    assert fused.uninstall(model) > 0
    assert not any("Fused" in type(m).__name__ for m in model.modules())


def test_fast_path_dropout_same_as_plain_with_same_mask(monkeypatch):
    """With dropout, the fused layers match the layers' own forward fed the same masked input."""
    FixedMask(monkeypatch)
    model = model_with_lora(dropout=0.2)
    model.train()
    b = batch()
    fused.install(model)
    loss, got = loss_and_grads(model, b)

    def masked_dropout(mod, inp):  # the plain path with the same fixed mask
        (x,) = inp
        m = lora_autograd._dropout_mask(x, 0.2)
        return x * m / 0.8

    fused.uninstall(model)
    for m in model.modules():
        if isinstance(m, (lora.Linear, lora.MergedLinear)):
            m.lora_dropout.forward = lambda x, _m=m: masked_dropout(_m, (x,))
    ref_loss, ref = loss_and_grads(model, b)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_eval_and_merged_layers_fall_back():
    model = model_with_lora(dropout=0.1)
    fused.install(model)
    model.eval()
    b = batch()
    with torch.no_grad():
        a = forward_loss(model, b).loss_sum
        for m in model.modules():
            if isinstance(m, (lora.Linear, lora.MergedLinear)):
                m.merge()
        merged = forward_loss(model, b).loss_sum
    torch.testing.assert_close(a, merged, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_close_to_plain():
    model = model_with_lora()
    b = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref = loss_and_grads(model, b, fused_loss=False)
    apply_fast_path(model, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, got = loss_and_grads(model, b)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    for n in ref:
        assert got[n].dtype == ref[n].dtype, n
        torch.testing.assert_close(got[n], ref[n], rtol=5e-2, atol=5e-2 * ref[n].abs().max().item(), msg=n)


def test_fast_path_off():
    model = model_with_lora()
    fast = apply_fast_path(model, {"fast_path": "off"})
    assert fast.notes == ()
    assert not any("Fused" in type(m).__name__ for m in model.modules())
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    forward_loss(model, batch(), fast=fast)
    assert calls  # the plain path: model(...).logits


def packed_batch(vocab=101):
    """Two rows: [5, 3, 4 (pad)] and [7, 5] tokens, collated by phitune.data as for sdpa (4-D mask)."""
    from phitune.data import collate

    g = torch.Generator().manual_seed(5)
    samples = []
    for n in (5, 3, 7, 5):
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        samples.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return collate(samples, [0, 1, 2, 3], 12, True, "sdpa", mask_dtype=torch.float32)


def test_varlen_attention_equals_dense_mask():
    from phitune.training.fast import attention, varlen

    model = model_with_lora()
    b = packed_batch()
    assert b["attention_mask"].dim() == 4
    ref_loss, ref = loss_and_grads(model, b, fused_loss=False)
    varlen.register()
    assert attention.switch(model, varlen.NAME)
    inputs = attention.model_inputs(model, b)
    assert "attention_mask" not in inputs and inputs["cu_seq_lens_q"].tolist() == [0, 5, 8, 12, 19, 24]
    loss, got = loss_and_grads(model, b)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_torch_compile_note_only_when_asked():
    model = model_with_lora()
    assert not any("compile" in n for n in apply_fast_path(model, {}).notes)
    for mode in ("off", "auto"):  # compiled with or without the fast path (the compile itself runs on first call)
        model = model_with_lora()
        notes = apply_fast_path(model, {"fast_path": mode, "torch_compile": True}).notes
        assert [n for n in notes if "compile" in n] == ["torch.compile: 2 decoder layers"], notes
        assert all(layer._compiled_call_impl is not None for layer in model.model.layers)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
def test_gpu_fast_path_bf16_equals_plain():
    """On CUDA in bf16: varlen attention + fused functions + chunked loss against the plain sdpa/dense-mask path."""
    model = model_with_lora().to("cuda", torch.bfloat16)
    b = {k: v.cuda() for k, v in packed_batch().items()}
    ref_loss, ref = loss_and_grads(model, b, fused_loss=False)
    notes = apply_fast_path(model, {}).notes
    assert any("varlen" in n for n in notes), notes
    loss, got = loss_and_grads(model, b)
    torch.testing.assert_close(loss.float(), ref_loss.float(), rtol=2e-2, atol=2e-2)
    for n in ref:
        scale = ref[n].float().abs().max().item()
        torch.testing.assert_close(got[n].float(), ref[n].float(), rtol=5e-2, atol=5e-2 * scale, msg=n)


@pytest.mark.gpu
@cuda
def test_gpu_varlen_kernel_matches_sdpa():
    from phitune.training.fast import varlen

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4, 24, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]], device="cuda")
    out, _ = varlen.attention(None, q, k, v, None, scaling=0.125, position_ids=pos)
    cu, _ = varlen.boundaries(pos)
    ref = varlen._per_sample_sdpa(*(t.transpose(1, 2).reshape(24, 4, 64) for t in (q, k, v)), cu.cpu(), 0.125, None)
    torch.testing.assert_close(out.reshape(24, 4, 64), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_cpu_keep_mask_rate_and_seeding(p):
    torch.manual_seed(0)
    m = lora_autograd.keep_mask_cpu((1001, 999), p)  # odd element count: the last 64-bit draw is half used
    assert m.dtype == torch.bool and m.shape == (1001, 999)
    n = m.numel()
    rate = m.double().mean().item()
    assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5  # within 5 standard deviations
    halves = m.flatten()[: n - 1].view(-1, 2).double().mean(0)  # both halves of each draw are Bernoulli(1-p)
    assert (halves - (1 - p)).abs().max().item() < 5 * (p * (1 - p) / (n // 2)) ** 0.5
    torch.manual_seed(0)
    assert torch.equal(lora_autograd.keep_mask_cpu((1001, 999), p), m)
    assert not torch.equal(lora_autograd.keep_mask_cpu((1001, 999), p), m)
    x = torch.ones(3, 4)
    assert lora_autograd._dropout_mask(x, 0.0) is None and lora_autograd._dropout_mask(x, 0.3).shape == (3, 4)
