"""kernels/dropout: LoRA dropout drawn from a seed. The Triton kernels (Triton's interpreter on a CPU, the GPU where
there is one) against the torch reference; the fused LoRA functions on the seeded path against the plain path with
the same mask; phitune plan seeing the custom ops."""

import json
import math
import os

import torch


import pytest  # noqa: E402

pytest.importorskip("triton")

from transformers import Phi3Config, Phi3ForCausalLM  # noqa: E402

from helpers import child_json, compiled_for_sm90  # noqa: E402

from phitune import lora  # noqa: E402
from phitune.adapt import add_lora  # noqa: E402
from phitune.config import load_config  # noqa: E402
from phitune.plan.simulate import simulate_step  # noqa: E402
from phitune.training.fast import fused, kernels, lora_autograd  # noqa: E402
from phitune.training.fast.kernels import dropout, dropout_triton  # noqa: E402
from phitune.training.loss import forward_loss  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
# (rows, width): LoRA input widths of the model zoo with rows scaled down; non-powers of two and element counts
# that are not a multiple of the kernels' 2048-element block.
SHAPES = [
    pytest.param((5, 3072), id="phi3-mini-hidden"),  # also Phi-4-mini's hidden size and Phi-3 mini's o_proj input
    pytest.param((3, 5120), id="phi3-medium-hidden"),
    pytest.param((2, 4096), id="llama-mistral-hidden"),
    pytest.param((7, 896), id="qwen2-0.5b-hidden"),
    pytest.param((3, 2304), id="gemma2-2b-hidden"),
    pytest.param((4, 1000), id="odd-width"),
    pytest.param((1, 3), id="tiny"),
]


def randn(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_kernel_equals_the_torch_reference_bit_for_bit(shape, dtype):
    x = randn(shape, dtype, 0)
    ref = dropout.lora_dropout(x, 1234, 0.3)
    with kernels.force_triton():
        got = dropout.lora_dropout(x, 1234, 0.3)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, ref)  # a select: no arithmetic, so no tolerance
    keep = dropout.philox_keep_mask(1234, shape, 0.3, DEVICE)
    assert torch.equal(ref, torch.where(keep, x, 0))


def test_the_mask_is_tritons_philox():
    """philox_randint4x is tl.randint4x: the reference is the kernels' own random stream, not a look-alike."""
    from phitune.training.fast.kernels import dropout_triton

    triton, tl = dropout_triton.triton, dropout_triton.tl

    @triton.jit
    def words(out_ptr, seed, BLOCK: tl.constexpr):
        q = tl.arange(0, BLOCK)
        r0, r1, r2, r3 = tl.randint4x(seed, q)
        tl.store(out_ptr + 4 * q, r0.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 4 * q + 1, r1.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 4 * q + 2, r2.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 4 * q + 3, r3.to(tl.int64) & 0xFFFFFFFF)

    out = torch.empty(4 * 64, dtype=torch.int64, device=DEVICE)
    words[(1,)](out, 987654321, BLOCK=64)
    ref = torch.stack(dropout.philox_randint4x(987654321, torch.arange(64, device=DEVICE)), dim=1).reshape(-1)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("shape", SHAPES[:1] + SHAPES[3:])
@pytest.mark.parametrize("rank", [16, 5])  # 5: the kernel pads the K=r product to tl.dot's 16 with zeros
def test_backward_kernel_equals_the_torch_reference(shape, dtype, with_base, rank):
    gbr, A = randn((shape[0], rank), dtype, 1), randn((rank, shape[1]), dtype, 3)
    base = randn(shape, dtype, 2) if with_base else None
    scale = 2.0 / (1 - 0.1)
    ref = dropout.lora_dropout_backward(gbr, A, base, 77, 0.1, scale)
    with kernels.force_triton():
        got = dropout.lora_dropout_backward(gbr, A, base, 77, 0.1, scale)
    assert got.dtype == dtype and got.shape == shape
    # The reference rounds t = gbr A, scale·t and the sum once each in the dtype, the kernel only the sum (t stays
    # float32); each is within eps/2 of a term bounded by |base| + scale·|gbr||A|, so the two differ by at most
    # 2·eps times that, plus each side's float32 accumulation of r products (r float32 eps of scale·|gbr||A|).
    t_size = scale * (gbr.double().abs() @ A.double().abs())
    bound = 2 * torch.finfo(dtype).eps * (t_size + (0 if base is None else base.double().abs()))
    bound += 2 * rank * torch.finfo(torch.float32).eps * t_size
    err = (got.double() - ref.double()).abs()
    assert bool((err <= bound).all()), err.max()
    keep = dropout.philox_keep_mask(77, shape, 0.1, DEVICE)
    assert bool((got[~keep] == (0 if base is None else base[~keep])).all())  # dropped: the base gradient only


def test_fake_implementations_give_the_real_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for dtype in DTYPES:
        t, base = randn((3, 50), dtype, 0), randn((3, 50), dtype, 1)
        gbr, A = randn((3, 4), dtype, 2), randn((4, 50), dtype, 3)
        real = [dropout.lora_dropout(t, 1, 0.5), dropout.lora_dropout_backward(gbr, A, base, 1, 0.5, 2.0),
                dropout.lora_dropout_backward(gbr, A, None, 1, 0.5, 2.0)]
        with FakeTensorMode() as mode:
            ft, fb, fg, fa = (mode.from_tensor(v) for v in (t, base, gbr, A))
            fake = [dropout.lora_dropout(ft, 1, 0.5), dropout.lora_dropout_backward(fg, fa, fb, 1, 0.5, 2.0),
                    dropout.lora_dropout_backward(fg, fa, None, 1, 0.5, 2.0)]
        for r, f in zip(real, fake):
            assert (f.shape, f.dtype, f.stride(), f.device) == (r.shape, r.dtype, r.stride(), r.device)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_keep_rate_is_within_a_binomial_bound(p):
    n = 97 * 1013  # about 10^5 elements, 48 blocks
    with kernels.force_triton():
        y = dropout.lora_dropout(torch.ones(97, 1013, device=DEVICE), 31, p)
    rate = (y != 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 5 * sigma, (rate, 1 - p, sigma)  # 5 sigma: fails by chance about once in 2·10^6
    other = dropout.philox_keep_mask(32, (97, 1013), p, DEVICE)  # another seed: another mask, the same rate
    agree = ((y != 0) == other).double().mean().item()
    expected = p * p + (1 - p) * (1 - p)  # two independent masks agree this often
    assert abs(agree - expected) < 5 * math.sqrt(expected * (1 - expected) / n)


def test_backward_draws_the_mask_forward_drew():
    x = torch.ones(9, 700, device=DEVICE)
    with kernels.force_triton():
        y = dropout.lora_dropout(x, 5, 0.4)
        gx = dropout.lora_dropout_backward(torch.ones(9, 1, device=DEVICE), torch.ones(1, 700, device=DEVICE), None,
                                           5, 0.4, 1.0)
    assert torch.equal(gx != 0, y != 0) and 0 < int((y == 0).sum()) < x.numel()


def test_seed_comes_from_torch_manual_seed():
    torch.manual_seed(3)
    a = kernels.new_seed()
    torch.manual_seed(3)
    assert kernels.new_seed() == a


def lora_inputs(dtype, rows=6, width=40, out=24, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)

    def make(*shape, grad=True):
        return (torch.randn(shape, generator=g) * 0.5).to(DEVICE, dtype).requires_grad_(grad)

    return make(rows, width), make(out, width, grad=False), make(r, width), make(out, r), make(rows, out, grad=False)


def float32_reference(fn, x, W, A, B, g):
    """fn's output and gradients (x, A, B) in float32, and the same on |inputs| and |g|: the sums of |terms| that
    bound each result's rounding error."""
    results = []
    for take in (lambda t: t.detach().float(), lambda t: t.detach().float().abs()):
        x2, A2, B2 = (take(t).requires_grad_() for t in (x, A, B))
        y = fn(x2, take(W), A2, B2)
        y.backward(take(g))
        results.append((y.detach(), x2.grad, A2.grad, B2.grad))
    return results


def assert_within_rounding(got, ref, magnitude, dtype, length, name):
    """|got - ref| <= 2·eps·length·(sum of |terms|): a chain of matmuls accumulating ``length`` products in ``dtype``
    (each partial sum rounded with relative error eps/2) against a float32 reference."""
    err = (got.float() - ref).abs()
    bound = 2 * torch.finfo(dtype).eps * length * magnitude + 1e-30
    assert bool((err <= bound).all()), (name, (err / bound).max().item())


@pytest.mark.parametrize("input_saved", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear_on_the_seeded_path_is_the_plain_formula_with_the_kernels_mask(dtype, input_saved):
    x, W, A, B, g = lora_inputs(dtype)
    p, scaling = 0.25, 2.0
    torch.manual_seed(11)
    seed = kernels.new_seed()  # the seed the function will draw after the same manual_seed
    torch.manual_seed(11)
    with kernels.force_triton():
        y = lora_autograd.LoRALinearFn.apply(x, W, None, A, B, scaling, p, input_saved)
        y.backward(g)
    keep = dropout.philox_keep_mask(seed, x.shape, p, DEVICE)
    s = scaling / (1 - p)
    ref, magnitude = float32_reference(lambda x, W, A, B: x @ W.t() + s * ((x * keep) @ A.t()) @ B.t(), x, W, A, B, g)
    length = 40 + 4 + 24  # width + r + out: the longest chain of accumulations (forward, then backward)
    for name, got, r, m in zip("yxAB", (y, x.grad, A.grad, B.grad), ref, magnitude):
        assert_within_rounding(got, r, m, dtype, length, name)
    assert torch.equal(x.grad[~keep], torch.mm(g, W)[~keep])  # dropped inputs: the base's gradient alone


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_branch_on_the_seeded_path_is_the_plain_formula_with_the_kernels_mask(dtype):
    x, W, A, B, g = lora_inputs(dtype, seed=1)
    p, scaling = 0.1, 1.5
    torch.manual_seed(12)
    seed = kernels.new_seed()
    torch.manual_seed(12)
    with kernels.force_triton():
        y = lora_autograd.LoRABranchFn.apply(x, A, B, scaling, p)
        y.backward(g)
    keep = dropout.philox_keep_mask(seed, x.shape, p, DEVICE)
    s = scaling / (1 - p)
    ref, magnitude = float32_reference(lambda x, W, A, B: s * ((x * keep) @ A.t()) @ B.t(), x, W, A, B, g)
    for name, got, r, m in zip("yxAB", (y, x.grad, A.grad, B.grad), ref, magnitude):
        assert_within_rounding(got, r, m, dtype, 40 + 4 + 24, name)
    assert bool((x.grad[~keep] == 0).all())  # dropped inputs get no gradient from the branch


def test_zero_dropout_draws_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr(dropout, "lora_dropout", lambda *a: calls.append(a))
    x, W, A, B, g = lora_inputs(torch.float32)
    with kernels.force_triton():
        y = lora_autograd.LoRALinearFn.apply(x, W, None, A, B, 2.0, 0.0)
        y.backward(g)
    assert not calls
    torch.testing.assert_close(y, x @ W.t() + 2.0 * (x @ A.t()) @ B.t())


def test_cpu_path_keeps_its_saved_mask():
    x = torch.randn(4, 8)
    assert lora_autograd._draw_dropout(x, 0.2)[0].dtype == torch.bool  # the mask, no seed, outside force_triton
    assert lora_autograd._draw_dropout(x, 0.0) == (None, None)
    with kernels.force_triton():
        mask, seed = lora_autograd._draw_dropout(x, 0.2)
    assert mask is None and isinstance(seed, int)


def tiny_model(dropout_p, layers=2):
    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, use_cache=False)
    model = Phi3ForCausalLM._from_config(cfg, attn_implementation="sdpa")
    # down_proj's dropout belongs to the SwiGLU function (its own mask); every other LoRA input takes the seeded path
    add_lora(model, {"r": 4, "lora_alpha": 8, "lora_dropout": dropout_p,
                     "target_modules": ["qkv_proj", "o_proj", "gate_up_proj"]})
    for n, prm in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(prm, std=0.05)
    return model.train()


def loss_and_grads(model, b):
    model.zero_grad(set_to_none=True)
    out = forward_loss(model, b)
    out.loss_sum.backward()
    return out.loss_sum.detach(), {n: prm.grad.clone() for n, prm in model.named_parameters() if prm.grad is not None}


def test_fused_model_on_the_seeded_path_equals_the_plain_path_with_the_same_masks(monkeypatch):
    model = tiny_model(0.2)
    ids = torch.randint(1, 101, (2, 10), generator=torch.Generator().manual_seed(2))
    b = {"input_ids": ids, "labels": ids.clone()}
    seeds = []
    original = dropout.lora_dropout

    def recording(x, seed, p):
        seeds.append((seed, p))
        return original(x, seed, p)

    monkeypatch.setattr(dropout, "lora_dropout", recording)
    fused.install(model)
    with kernels.force_triton():
        loss, got = loss_and_grads(model, b)
    fused.uninstall(model)
    assert len(seeds) == 6  # qkv, o, gate_up in each of 2 layers, forward only (o_proj: sdpa, drop(x) saved)

    drawn = iter(seeds)

    def same_mask(x):  # the layer's own forward, with the kernels' mask of the seed the fused call drew
        seed, p = next(drawn)
        return x * dropout.philox_keep_mask(seed, x.shape, p, x.device) / (1 - p)

    for m in model.modules():
        if isinstance(m, (lora.Linear, lora.MergedLinear)):
            m.lora_dropout.forward = same_mask
    ref_loss, ref = loss_and_grads(model, b)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert got.keys() == ref.keys() and any("lora_A" in n for n in ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointed_recompute_draws_the_same_seeds(use_reentrant):
    """Gradient checkpointing runs each layer's forward again in backward: torch.utils.checkpoint restores the CPU
    generator new_seed draws from, so the recomputed drop(x) (and so the gradients) are those of the first forward."""
    from phitune.models.loading import enable_checkpointing

    ids = torch.randint(1, 101, (2, 10), generator=torch.Generator().manual_seed(2))
    b = {"input_ids": ids, "labels": ids.clone()}
    results = []
    for checkpointing in (False, True):
        model = tiny_model(0.3, layers=1)
        if checkpointing:
            enable_checkpointing(model, {"use_reentrant": use_reentrant})
        fused.install(model)
        torch.manual_seed(7)
        with kernels.force_triton():
            results.append(loss_and_grads(model, b))
    (loss, got), (ck_loss, ck) = results
    torch.testing.assert_close(ck_loss, loss, rtol=0, atol=0)
    assert ck.keys() == got.keys() and any("lora_A" in n for n in got)
    for n in got:  # the same arithmetic in the same order: equal, not merely close
        torch.testing.assert_close(ck[n], got[n], rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("fn", ["LoRALinearFn", "LoRABranchFn"])
def test_meta_tensors_take_the_seeded_ops_as_cuda_would(fn):
    """phitune plan simulates QLoRA on the meta device in CUDA's place: it must record the kernels CUDA runs."""
    from phitune.plan.simulate import OpRecorder

    x, W, A, B, g = (t.detach().to("meta").requires_grad_(t.requires_grad) for t in lora_inputs(torch.bfloat16))
    recorder = OpRecorder()
    with recorder:
        if fn == "LoRALinearFn":
            y = lora_autograd.LoRALinearFn.apply(x, W, None, A, B, 2.0, 0.1)
        else:
            y = lora_autograd.LoRABranchFn.apply(x, A, B, 2.0, 0.1)
        y.backward(g)
    names = [o.name for o in recorder.ops]
    assert names.count("lora_dropout") == 1 and names.count("lora_dropout_backward") == 1
    assert "bernoulli_" not in names and "where" not in names


def test_plan_records_the_custom_ops_with_their_flops():
    cfg = load_config({"model": {"name_or_path": "tiny", "dtype": "float32"},
                       "data": {"train": "unused.jsonl", "max_seq_length": 64, "packing": True},
                       "training_config": {"per_device_train_batch_size": 2, "use_cpu": True, "max_steps": 1},
                       "peft_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
                                       "target_modules": ["qkv_proj", "o_proj", "gate_up_proj"]}})
    hf = Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, vocab_size=512, max_position_embeddings=256, pad_token_id=0)
    plain = simulate_step(cfg, hf, 2, device="cpu")
    with kernels.force_triton():
        seeded = simulate_step(cfg, hf, 2, device="cpu")
    names = [o.name for o in seeded.ops]
    # backward: 5, as layer 0's qkv input (a frozen norm of frozen embeddings) needs no gradient
    assert names.count("lora_dropout") == 6 and names.count("lora_dropout_backward") == 5
    n_rows = 2 * 64
    fwd = [o for o in seeded.ops if o.name == "lora_dropout"]
    bwd = [o for o in seeded.ops if o.name == "lora_dropout_backward"]
    widths = sorted(o.flops // (dropout.FWD_FLOPS_PER_ELEMENT * n_rows) for o in fwd)
    assert widths == [64] * 6  # qkv, o, gate_up inputs: all hidden-wide; FLOPs = 4 per element
    assert all(o.flops == (2 * 8 + dropout.BWD_FLOPS_PER_ELEMENT) * n_rows * 64 for o in bwd)  # r = 8
    assert all(o.nbytes == 2 * n_rows * 64 * 4 for o in fwd)  # read x, write drop(x): nothing else moves
    # read gbr (N, r), A (r, in) and the base gradient, write the sum: the (N, in) product t is never in memory
    assert all(o.nbytes == (n_rows * 8 + 8 * 64 + 2 * n_rows * 64) * 4 for o in bwd)
    # the mask draws and their where/add_ passes are gone from the plain path's op list
    assert "lora_dropout" not in [o.name for o in plain.ops]
    assert names.count("where") == [o.name for o in plain.ops].count("where") - 11
    assert seeded.peak["Total"] < plain.peak["Total"]  # no 1-byte masks kept


FAKE_CUDA_SCRIPT = """
import json, sys
from transformers import Phi3Config
from phitune.config import load_config
from phitune.plan.simulate import simulate_step
cfg = load_config(json.loads(sys.argv[1]))
hf = Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=512, max_position_embeddings=256, pad_token_id=0)
sim = simulate_step(cfg, hf, 2, device="cuda")
ops = [o for o in sim.ops if o.name.startswith("lora_dropout") or o.name in ("bernoulli_", "where")]
print(json.dumps([[o.name, o.flops, o.nbytes] for o in ops]))
"""


@pytest.mark.slow  # a child process on phitune plan's fake CUDA device: ~30 s on 2 shared cores
def test_plan_on_the_fake_cuda_device_sees_the_custom_ops_not_the_masks(tmp_path):
    from phitune.plan import fakegpu

    script = tmp_path / "simulate.py"
    script.write_text(FAKE_CUDA_SCRIPT)
    cfg = {"model": {"name_or_path": "tiny", "dtype": "auto"},
           "data": {"train": "unused.jsonl", "max_seq_length": 64, "packing": True},
           "training_config": {"per_device_train_batch_size": 2, "bf16": True, "max_steps": 1},
           "peft_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
                           "target_modules": ["qkv_proj", "o_proj", "gate_up_proj"]}}
    command = fakegpu.worker_command("", fakegpu.ensure_shim(), script=str(script), args=[json.dumps(cfg)])
    env = {**os.environ, "PHITUNE_FAKE_CUDA": "1"}
    env.pop("TRITON_INTERPRET", None)  # use_triton holds on (fake) CUDA by itself
    ops = child_json(command, env=env, timeout=300)
    names = [name for name, _, _ in ops]
    # 6 forward, and 2 in backward: o_proj saves the varlen attention output and draws drop(x) again for grad_A
    assert names.count("lora_dropout") == 8 and names.count("lora_dropout_backward") == 5
    assert "bernoulli_" not in names  # no mask drawn on CUDA for these layers
    rows, r = 2 * 64, 8
    n = rows * 64  # elements of one LoRA input (rows x hidden), bf16
    for name, flops, nbytes in ops:
        if name == "lora_dropout":
            assert (flops, nbytes) == (dropout.FWD_FLOPS_PER_ELEMENT * n, 2 * n * 2)
        elif name == "lora_dropout_backward":  # gbr (rows, r) and A (r, 64) in, not the (rows, 64) product
            assert (flops, nbytes) == ((2 * r + dropout.BWD_FLOPS_PER_ELEMENT) * n, (rows * r + r * 64 + 2 * n) * 2)


SM90_COMPILE_SCRIPT = """
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from phitune.training.fast.kernels import dropout_triton as dt
aligned = [["tt.divisibility", 16]]  # what a launch on 16-byte-aligned tensors with n % 16 == 0 specializes
report = {}
for dtype in ("bf16", "fp32"):
    sources = {
        "fwd": ASTSource(fn=dt._dropout_fwd, signature={"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "n": "i64",
                         "seed": "i32", "p": "fp32", "BLOCK": "constexpr"}, constexprs={"BLOCK": dt.BLOCK},
                         attrs={(0,): aligned, (1,): aligned, (2,): aligned}),
        "bwd": ASTSource(fn=dt._dropout_bwd, signature={"gbr_ptr": f"*{dtype}", "a_ptr": f"*{dtype}",
                         "base_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "n_rows": "i32", "n_cols": "i32",
                         "rank": "i32", "seed": "i32", "p": "fp32", "scale": "fp32", "HAS_BASE": "constexpr",
                         "ALIGNED": "constexpr", "UPCAST_DOT": "constexpr", "R": "constexpr", "BM": "constexpr",
                         "BN": "constexpr"},
                         constexprs={"HAS_BASE": True, "ALIGNED": True, "UPCAST_DOT": False, "R": 16,
                                     "BM": dt.BWD_ROWS, "BN": dt.BWD_COLS},
                         attrs={(i,): aligned for i in range(7)}),
    }
    for name, src in sources.items():
        warps = dt.NUM_WARPS if name == "fwd" else dt.BWD_NUM_WARPS
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        ptx = k.asm["ptx"]
        report[f"{dtype} {name}"] = {"cubin": len(k.asm["cubin"]), "shared": k.metadata.shared,
                                     "access": sorted(set(re.findall(r"(?:ld|st)\\.global[.\\w]*", ptx)))}
print(json.dumps(report))
"""


@pytest.mark.slow  # a child process (Triton compiled, not interpreted): ~5-10 s on 2 shared cores
def test_kernels_compile_for_an_h100_with_16_byte_accesses_and_no_shared_memory():
    """No GPU here, but Triton compiles for sm_90 without one (its bundled ptxas): the kernels lower, and on aligned
    tensors each thread moves 16 bytes per access with no shuffle through shared memory (the mask's join+reshape
    stays in registers; backward's K=r product stages only its operand tiles in shared memory)."""
    report = compiled_for_sm90(SM90_COMPILE_SCRIPT)
    assert len(report) == 4
    for name, k in report.items():
        assert k["cubin"] > 0, (name, k)
        if name.endswith("fwd"):
            assert k["shared"] == 0 and k["access"] == ["ld.global.v4.b32", "st.global.v4.b32"], (name, k)
        else:  # shared memory holds only the K=r product's two operand tiles (BM x 16 and 16 x BN); the base
            # gradient is read and the result written 16 bytes at a time (gbr's 16-element rows may load narrower)
            size = 2 if name.startswith("bf16") else 4
            assert k["shared"] <= (dropout_triton.BWD_ROWS + dropout_triton.BWD_COLS) * 16 * size, (name, k)
            assert "ld.global.v4.b32" in k["access"] and "st.global.v4.b32" in k["access"], (name, k)
            assert all(a.startswith("ld") for a in k["access"] if a != "st.global.v4.b32"), (name, k)
