"""kernels/rope.py: the qkv split + RoPE custom ops, their Triton kernels (on a CPU through Triton's interpreter)
against the torch reference and float64, QKVRopeFn on the kernels against the plain model, and phitune plan seeing
one op per direction."""


import pytest
import torch

pytest.importorskip("triton")

from transformers import Phi3Config, Phi3ForCausalLM  # noqa: E402
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding  # noqa: E402

from helpers import child_json  # noqa: E402

from phitune.adapt import add_lora  # noqa: E402
from phitune.training.fast import fused  # noqa: E402
from phitune.training.fast.kernels import force_triton, rope  # noqa: E402
from phitune.training.loss import forward_loss  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (n_q, n_kv, head_dim, partial_rotary_factor) of the model zoo, rows scaled down; longrope: Phi-3-mini-128k's
# rotary embedding (cos, sin scaled by its attention factor, long factors past the original context).
ZOO = {
    "phi3-mini": (32, 32, 96, 1.0),
    "phi3-medium": (40, 10, 128, 1.0),
    "phi3-longrope": (32, 32, 96, 1.0),
    "phi4-mini-partial": (24, 8, 128, 0.75),
    "llama3-8b": (32, 8, 128, 1.0),
    "qwen2-0.5b": (14, 2, 64, 1.0),
    "mistral-7b": (32, 8, 128, 1.0),
    "gemma-2b": (8, 1, 256, 1.0),
    "odd-widths": (3, 1, 40, 0.6),  # head_dim 40, rotary 24: neither a power of two
}


def cos_sin(name, n_q, head_dim, partial, B, T, dtype):
    """cos, sin (B, T, rotary) from Phi-3's own rotary embedding for that shape."""
    kw = {}
    if name == "phi3-longrope":
        rotary = head_dim // 2
        kw = {"max_position_embeddings": 4096, "original_max_position_embeddings": 64,
              "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                  "long_factor": [1.0 + i / 8 for i in range(rotary)],
                                  "short_factor": [1.0 + i / 80 for i in range(rotary)]}}
    cfg = Phi3Config(hidden_size=n_q * head_dim, num_attention_heads=n_q, partial_rotary_factor=partial, **kw)
    emb = Phi3RotaryEmbedding(cfg)
    positions = (torch.arange(T) + 100).expand(B, T)  # past the original 64: longrope's long factors
    x = torch.zeros(1, dtype=dtype)
    return emb(x, positions)


def rope64(qkv, cos, sin, n_q, n_kv, D):
    """An independent float64 reference: rotate_half as in the Llama/Phi-3 modelling code."""
    q, k, v = (t.double() for t in rope.qkv_views(qkv, n_q, n_kv, D))
    c, s = cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    R = c.shape[-1]

    def rotate(x):
        x1, x2 = x[..., : R // 2], x[..., R // 2: R]
        return torch.cat((x[..., :R] * c + torch.cat((-x2, x1), -1) * s, x[..., R:]), -1)

    return rotate(q), rotate(k), v


def magnitude(x, cos, sin):
    """|x|·|cos| + |rotation partner of x|·|sin| on the rotary features, |x| beyond: the size of the sum each
    output element is, so that its rounding error is a few eps times this."""
    R = cos.shape[-1]
    h = R // 2
    c, s = cos.double().abs().unsqueeze(1), sin.double().abs().unsqueeze(1)
    a = x.double().abs()
    partner = torch.cat((a[..., h:R], a[..., :h]), -1)
    return torch.cat((a[..., :R] * c + partner * s, a[..., R:]), -1)


def back_magnitude(g, cos, sin):
    """The same for the backward: out[d] = g[d]·cos[d] ± g[partner]·sin[partner]."""
    R = cos.shape[-1]
    h = R // 2
    s = sin.double().abs().unsqueeze(1)
    return magnitude(g, cos, torch.cat((s[..., h:], s[..., :h]), -1).squeeze(1))


def assert_within(got, want, mag, dtype, what):
    """|got - want| <= 2 eps(dtype) x magnitude: one rounding of the result on each side, plus the reference's
    rounding of its intermediate product (it rounds x·cos to the output dtype before the addcmul)."""
    eps = torch.finfo(dtype).eps
    err = (got.double() - want.double()).abs()
    bound = 2 * eps * mag + torch.finfo(dtype).tiny
    worst = (err - bound).max()
    assert worst <= 0, f"{what}: error {err.max():.3g} over the bound 2 eps x magnitude (eps {eps:.3g})"


DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
          # a float32 model under bf16 autocast: bf16 qkv, float32 cos/sin, so q and k come out float32
          "bf16-autocast": (torch.bfloat16, torch.float32)}
CASES = [(name, dt) for name in ZOO for dt in DTYPES
         if dt != "bf16-autocast" or name in ("phi3-mini", "phi4-mini-partial", "odd-widths")]


@pytest.mark.parametrize("name,dtypes", CASES, ids=[f"{n}-{d}" for n, d in CASES])
def test_triton_kernels_equal_the_reference_forward_and_backward(name, dtypes):
    qkv_dtype, cos_dtype = DTYPES[dtypes]
    n_q, n_kv, D, partial = ZOO[name]
    B, T = 2, 7  # 14 token rows: not a multiple of the kernel's 8-row tile
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, T, (n_q + 2 * n_kv) * D, generator=g).to(qkv_dtype).to(DEVICE)
    cos, sin = (t.to(DEVICE) for t in cos_sin(name, n_q, D, partial, B, T, cos_dtype))
    ref = rope.qkv_rope_reference(qkv, cos, sin, n_q, n_kv, D)
    with force_triton():
        got = rope.qkv_rope(qkv, cos, sin, n_q, n_kv, D)
    exact = rope64(qkv, cos, sin, n_q, n_kv, D)
    views = rope.qkv_views(qkv, n_q, n_kv, D)
    for part, r, o, e, x in zip("qkv", ref, got, exact, views):
        assert o.dtype == r.dtype and o.shape == r.shape and o.stride() == r.stride(), part
        mag = magnitude(x, cos, sin) if part != "v" else x.double().abs()
        assert_within(o, r, mag, o.dtype, f"{name} {part} vs reference")
        assert_within(o, e, mag, o.dtype, f"{name} {part} vs float64")
    assert torch.equal(got[2], views[2])  # v: a copy

    grads = [torch.randn(t.shape, generator=g).to(t.dtype).to(DEVICE) for t in ref]
    ref_g = rope.qkv_rope_backward_reference(*grads, cos, sin, n_q, n_kv, D)
    with force_triton():
        got_g = rope.qkv_rope_backward(*grads, cos, sin, n_q, n_kv, D)
    assert got_g.dtype == ref_g.dtype == qkv_dtype and got_g.shape == qkv.shape
    # float64 transpose of the rotation, by autograd through rope64
    x64 = qkv.double().requires_grad_()
    torch.autograd.backward(rope64(x64, cos, sin, n_q, n_kv, D), [t.double() for t in grads])
    mags = [back_magnitude(t, cos, sin) for t in grads[:2]] + [grads[2].double().abs()]
    mag = torch.cat([m.transpose(1, 2).reshape(B, T, -1) for m in mags], -1)
    assert_within(got_g, ref_g, mag, qkv_dtype, f"{name} grad vs reference")
    assert_within(got_g, x64.grad, mag, qkv_dtype, f"{name} grad vs float64")


def test_backward_kernel_reads_gradients_of_any_layout_and_a_broadcast_cos():
    """Attention kernels hand back (B, H, T, D) gradients either contiguous (sdpa) or as views of (B, T, H, D)
    (varlen); one position_ids row for the whole batch gives cos and sin of batch 1."""
    n_q, n_kv, D = 4, 2, 16
    g = torch.Generator().manual_seed(1)
    cos, sin = (torch.randn(1, 9, 8, generator=g).to(DEVICE) for _ in range(2))
    grads = [torch.randn(2, h, 9, D, generator=g).to(DEVICE) for h in (n_q, n_kv, n_kv)]
    ref = rope.qkv_rope_backward_reference(*grads, cos, sin, n_q, n_kv, D)
    mags = [back_magnitude(t, cos, sin) for t in grads[:2]] + [grads[2].double().abs()]
    mag = torch.cat([m.transpose(1, 2).reshape(2, 9, -1) for m in mags], -1)
    for layout in ("contiguous", "varlen"):
        given = grads if layout == "contiguous" else [t.transpose(1, 2).contiguous().transpose(1, 2) for t in grads]
        with force_triton():
            got = rope.qkv_rope_backward(*given, cos, sin, n_q, n_kv, D)
        assert_within(got, ref, mag, torch.float32, layout)


def test_shapes_that_do_not_fit_are_refused_before_any_kernel():
    qkv = torch.randn(2, 5, (4 + 2 * 2) * 16)
    cos = torch.randn(2, 4, 16)  # 4 positions for 5 tokens
    with pytest.raises(ValueError, match="cos and sin"), force_triton():
        rope.qkv_rope(qkv, cos, cos, 4, 2, 16)
    with pytest.raises(ValueError, match="n_q=4, n_kv=1"):
        rope.qkv_rope(qkv, torch.randn(2, 5, 16), torch.randn(2, 5, 16), 4, 1, 16)


def tiny_model(**kw):
    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     pad_token_id=0, use_cache=False, **kw)
    model = Phi3ForCausalLM._from_config(cfg, attn_implementation="sdpa").to(DEVICE)
    add_lora(model, {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"})
    for n, p in model.named_parameters():  # non-zero B so every LoRA path carries gradient
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return model


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = forward_loss(model, batch, fused_loss=False)
    out.loss_sum.backward()
    return out.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kw", [{"num_key_value_heads": 4},
                                {"num_key_value_heads": 2, "partial_rotary_factor": 0.5},
                                {"num_key_value_heads": 4, "max_position_embeddings": 512,
                                 "original_max_position_embeddings": 8,
                                 "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                                     "long_factor": [1.0 + i / 4 for i in range(8)],
                                                     "short_factor": [1.0 + i / 40 for i in range(8)]}}],
                         ids=["phi3", "gqa-partial-rotary", "longrope"])
def test_attention_on_the_kernels_keeps_the_plain_loss_and_lora_gradients(kw):
    model = tiny_model(**kw)
    ids = torch.randint(1, 101, (2, 12), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    batch = {"input_ids": ids, "labels": ids}
    ref_loss, ref = loss_and_grads(model, batch)
    assert fused.install(model, lora_layers=False, mlp=False, norms=False)["qkv_rope"] == 2
    with force_triton():
        loss, got = loss_and_grads(model, batch)
    # float32 throughout; the plain path's rotate_half + cat and the kernel round differently by a few eps per
    # element, carried through 2 layers of O(1) activations: rtol 1e-5 is ~100 eps
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert any("lora_" in n for n in ref) and got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_implementations_give_the_real_shapes_dtypes_and_strides(dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    n_q, n_kv, D = 3, 1, 12
    qkv = torch.randn(2, 5, (n_q + 2 * n_kv) * D).to(dtype)
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)  # float32: q and k promote, v stays
    real = rope.qkv_rope(qkv, cos, sin, n_q, n_kv, D)
    real_g = rope.qkv_rope_backward(*[torch.randn_like(t) for t in real], cos, sin, n_q, n_kv, D)
    with FakeTensorMode() as mode:
        fake_in = [mode.from_tensor(t) for t in (qkv, cos, sin)]
        fake = rope.qkv_rope(*fake_in, n_q, n_kv, D)
        fake_g = rope.qkv_rope_backward(*[torch.empty_like(t) for t in fake], *fake_in[1:], n_q, n_kv, D)
    for r, f in zip((*real, real_g), (*fake, fake_g)):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())
    assert [t.dtype for t in real] == [torch.float32, torch.float32, dtype]
    torch.library.opcheck(torch.ops.phitune.qkv_rope.default, (qkv, cos, sin, n_q, n_kv, D))
    torch.library.opcheck(torch.ops.phitune.qkv_rope_backward.default, (*real, cos, sin, n_q, n_kv, D))


def test_plan_records_one_op_per_direction_with_its_flops():
    from phitune.config import load_config
    from phitune.plan.simulate import simulate_step

    cfg = load_config({"model": {"name_or_path": "tiny", "dtype": "float32"},
                       "data": {"train": "unused.jsonl", "max_seq_length": 32, "packing": True},
                       "training_config": {"per_device_train_batch_size": 2, "use_cpu": True, "max_steps": 10},
                       "peft_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}})
    hf = Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, partial_rotary_factor=0.5, vocab_size=128, max_position_embeddings=64,
                    pad_token_id=0)
    sim = simulate_step(cfg, hf, 2, device="cpu")
    names = [o.name for o in sim.ops]
    assert names.count("qkv_rope") == 2 and names.count("qkv_rope_backward") == 2
    rows = 2 * 32
    rotated = rows * (4 + 2) * 8  # (n_q + n_kv) heads x 8 rotary features of head_dim 16
    for op in (o for o in sim.ops if o.name.startswith("qkv_rope")):
        assert op.flops == 3 * rotated and op.nbytes > 0


def test_the_autograd_function_moves_data_only_in_its_two_ops():
    """Under the plan's recorder, QKVRopeFn forward + backward is qkv_rope and qkv_rope_backward and nothing that
    moves data (no mul/addcmul_/copy_ per half as before)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from phitune.plan.simulate import OpRecorder
    from phitune.training.fast.norm_rope import QKVRopeFn

    with FakeTensorMode():
        qkv = torch.randn(2, 16, (4 + 2 * 2) * 16, dtype=torch.bfloat16, requires_grad=True)
        cos, sin = torch.randn(2, 16, 8, dtype=torch.bfloat16), torch.randn(2, 16, 8, dtype=torch.bfloat16)
        with OpRecorder() as recorder:
            q, k, v = QKVRopeFn.apply(qkv, cos, sin, 4, 2, 16)
            torch.autograd.backward((q, k, v), (torch.ones_like(q), torch.ones_like(k), torch.ones_like(v)))
    moving = [o for o in recorder.ops if not o.no_move and o.name != "ones_like"]
    assert [o.name for o in moving] == ["qkv_rope", "qkv_rope_backward"]
    element = 2  # bytes of bf16
    assert moving[0].nbytes == element * (2 * qkv.numel() + 2 * cos.numel())  # qkv, cos, sin in; q, k, v out
    assert moving[0].flops == 3 * 2 * 16 * (4 + 2) * 8


def test_varlen_attention_takes_q_k_v_without_a_copy():
    """q, k, v come out laid out as (B, T, H, D): the varlen wrapper's (B*T, H, D) reshape is a view, not a clone."""
    n_q, n_kv, D = 4, 2, 16
    qkv = torch.randn(2, 5, (n_q + 2 * n_kv) * D)
    cos, sin = torch.randn(2, 5, D), torch.randn(2, 5, D)
    for t in rope.qkv_rope(qkv, cos, sin, n_q, n_kv, D):
        B, H, T, _ = t.shape
        flat = t.transpose(1, 2).reshape(B * T, H, D)  # as varlen.attention does
        assert flat.data_ptr() == t.data_ptr() and flat.is_contiguous()


FAKE_CUDA_STEP = '''
import collections, json, sys
from phitune.plan import fakegpu
fakegpu.reexec_on_fake_cuda(__file__, sys.argv[1:])
from transformers import Phi3Config
from phitune.config import load_config
from phitune.plan.simulate import simulate_step
cfg = load_config({"model": {"name_or_path": "tiny"},
                   "data": {"train": "unused.jsonl", "max_seq_length": 64, "packing": True},
                   "training_config": {"per_device_train_batch_size": 2, "bf16": True, "max_steps": 10},
                   "peft_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}})
hf = Phi3Config(hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, partial_rotary_factor=0.75, vocab_size=128, max_position_embeddings=128,
                pad_token_id=0, eos_token_id=1, bos_token_id=1)
sim = simulate_step(cfg, hf, 2, "cuda")
print(json.dumps({"ops": [[o.name, o.flops, o.nbytes] for o in sim.ops if o.name.startswith("qkv_rope")],
                  "counts": collections.Counter(o.name for o in sim.ops), "notes": sim.fast_path}))
'''


@pytest.mark.slow  # a child process on phitune plan's fake CUDA device (and the runtime shim built once): ~20 s
def test_plan_on_fake_cuda_records_the_ops_and_no_varlen_copies(tmp_path):
    import sys

    script = tmp_path / "step.py"
    script.write_text(FAKE_CUDA_STEP)
    result = child_json([sys.executable, str(script)])
    assert any("varlen" in note for note in result["notes"]), result["notes"]  # the packed CUDA attention
    rows, rotated = 2 * 64, 2 * 64 * (4 + 2) * 18  # head_dim 24, rotary 0.75 x 24 = 18
    ops = result["ops"]
    assert [name for name, _, _ in ops] == ["qkv_rope", "qkv_rope", "qkv_rope_backward", "qkv_rope_backward"]
    qkv_bytes = rows * (4 + 2 * 2) * 24 * 2  # bfloat16
    for name, flops, nbytes in ops:
        assert flops == 3 * rotated
        assert nbytes >= 2 * qkv_bytes  # in and out: qkv -> q, k, v (forward) or gq, gk, gv -> g (backward)
    assert result["counts"].get("clone", 0) == 0, result["counts"]  # varlen reshapes q, k, v without copies
