"""kernels/swiglu.py: the SwiGLU Triton kernels equal the torch reference (on a CPU through Triton's interpreter),
SwiGLUDownFn on them keeps the plain path's numbers, and phitune plan sees them as single ops with FLOPs."""

import contextlib
import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from transformers import Phi3Config  # noqa: E402

from helpers import child_json, compiled_for_sm90  # noqa: E402

from phitune.config import load_config  # noqa: E402
from phitune.plan.simulate import simulate_step  # noqa: E402
from phitune.training.fast import lora_autograd  # noqa: E402
from phitune.training.fast.kernels import force_triton, new_seed  # noqa: E402
from phitune.training.fast.kernels import dropout  # noqa: E402
from phitune.training.fast.kernels import swiglu as ops  # noqa: E402

torch.set_num_threads(1)  # tiny matmuls: a second thread only adds waiting on a shared machine (as test_fast.py)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROWS = 2  # the model zoo's widths at a few rows: the interpreter runs each program in numpy
# intermediate sizes I (h has I columns, gu 2I): Phi-3-mini and Phi-4-mini 8192, Phi-3-medium 17920, Llama-3-8B and
# Mistral-7B 14336, Qwen2-7B 18944 (not multiples of the 1024-column block), and a small odd width. Gemma's MLP is
# GeGLU (gelu), which the fused MLP does not take.
WIDTHS = [8192, 17920, 14336, 18944, 100]
# the interpreter runs Philox in numpy: seconds per call at the full widths. 99: rows that do not start at a multiple
# of 4 (the kernels' one-Philox-call-per-element path)
DROPOUT_WIDTHS = [17920, 100, 99]
DTYPES = [torch.float32, torch.bfloat16]
F32_EPS = torch.finfo(torch.float32).eps


def eps(dtype):
    """Per rounding step: the dtype's eps, plus a few float32 ulps for the kernels' float32 sigmoid (exp)."""
    return torch.finfo(dtype).eps + 4 * F32_EPS


def inputs(width, dtype, seed=0, rows=ROWS):
    g = torch.Generator().manual_seed(seed)
    gu = (2 * torch.randn(rows, 2 * width, generator=g)).to(DEVICE, dtype)  # gate over sigmoid's bends and tails
    gh, t = (torch.randn(rows, width, generator=g).to(DEVICE, dtype) for _ in range(2))
    return gu, gh, t


def factors(width, dtype, seed=0, rows=ROWS):
    """gbr (rows, r) and A (r, width) of a LoRA term t = gbr A: r = 16 (Phi-3's recipe), 5 at the small widths (the
    kernel pads r to tl.dot's 16 with zeros)."""
    g = torch.Generator().manual_seed(seed + 100)
    rank = 5 if width <= 100 else 16
    return (torch.randn(rows, rank, generator=g).to(DEVICE, dtype),
            (torch.randn(rank, width, generator=g) / rank**0.5).to(DEVICE, dtype))


def t_size(gbr, A):
    """|gbr||A| (float64): bounds |gbr A| and sizes its rounding."""
    return gbr.double().abs() @ A.double().abs()


def h_size(gu):
    """Exact (float64) |silu(gate)·up|."""
    gate, up = (c.double() for c in gu.chunk(2, dim=-1))
    return (gate * torch.sigmoid(gate) * up).abs()


def magnitudes(gu, gh, t, s):
    """Exact (float64) |h| and the sizes of the terms each gradient is summed from, for the rounding bounds."""
    gate, up = (c.double() for c in gu.chunk(2, dim=-1))
    sig = torch.sigmoid(gate)
    gh_size = gh.double().abs() + (0 if t is None else s * t.double().abs())
    return {"h": (gate * sig * up).abs(), "up": gh_size * (gate * sig).abs(),
            "gate": gh_size * up.abs() * sig * (1 + gate.abs())}


def assert_within(got, want, size, steps, dtype, what):
    """|got - want| <= steps roundings of ``dtype`` relative to the size of the terms (``size``)."""
    err = (got.double().cpu() - want.double().cpu()).abs()
    tol = steps * eps(dtype) * size.cpu()
    worst = (err / tol.clamp_min(1e-300)).max().item()
    assert bool((err <= tol).all()), f"{what}: error up to {worst:.2f}x the {steps}-rounding bound"


# The reference rounds after every op (silu, product: 2 steps; the kernel once more); backward rounds gh + s·t,
# sigmoid, silu and the product (up: 4 + 1), and the gate's chain 1-sig, ·gate, +1, ·sig, gh·up, product (8, with
# the bracket's error relative to 1 + |gate|, which ``magnitudes`` carries).
H_STEPS, UP_STEPS, GATE_STEPS = 3, 5, 8
# With the LoRA factors the kernel keeps t = gbr A in float32 where the reference rounds it once to the dtype, and
# each side sums r = 16 float32 products (16 float32 eps, under 4 of ``eps``'s steps): 5 more steps relative to
# s·|gbr||A|, which ``magnitudes`` counts in the gradient's size.
T_STEPS = 5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", WIDTHS)
def test_forward_kernel_equals_reference(width, dtype):
    gu, gh, t = inputs(width, dtype)
    with force_triton():
        h = ops.swiglu(gu)
    assert h.dtype == dtype and h.shape == (ROWS, width)
    assert_within(h, ops.swiglu_reference(gu), magnitudes(gu, gh, t, 1.0)["h"], H_STEPS, dtype, "h")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", DROPOUT_WIDTHS)
def test_dropout_forward_masks_h_with_the_seeds_mask_at_rate_p(width, dtype):
    p, seed = 0.3, 1234
    gu, _, _ = inputs(width, dtype)
    with force_triton():
        h, hd = ops.swiglu_dropout(gu, p, seed)
        plain = ops.swiglu(gu)
    keep = dropout.philox_keep_mask(seed, h.shape, p, DEVICE)
    assert torch.equal(h, plain)  # the same float32 arithmetic with or without dropout
    assert torch.equal(hd, torch.where(keep, h, 0))
    n = keep.numel()
    assert abs(keep.double().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5  # within 5 standard deviations
    other = dropout.philox_keep_mask(seed + 1, h.shape, p, DEVICE)
    assert not torch.equal(keep, other)
    with force_triton():  # one dropout rule: LoRA dropout's kernel drops the same elements of h for the same seed
        assert torch.equal(hd, dropout.lora_dropout(h, seed, p))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width,p", [(w, 0.0) for w in WIDTHS] + [(w, 0.3) for w in DROPOUT_WIDTHS])
def test_backward_kernel_equals_reference(width, dtype, p):
    s, seed = 2.0 / (1 - p), 99
    gu, gh, _ = inputs(width, dtype, seed=1)
    gbr, A = factors(width, dtype, seed=1)
    keep = dropout.philox_keep_mask(seed, gh.shape, p, DEVICE) if p > 0 else None
    with force_triton():
        ggu, hd = ops.swiglu_backward(gu, gh, gbr, A, s, p, seed, True)
        ggu_no_h, empty = ops.swiglu_backward(gu, gh, gbr, A, s, p, seed, False)
    ref, ref_hd = ops.swiglu_backward_reference(gu, gh, torch.mm(gbr, A), s, keep, True)
    assert torch.equal(ref, ops.swiglu_backward(gu, gh, gbr, A, s, p, seed, True)[0])  # the op's torch path
    size = magnitudes(gu, gh, t_size(gbr, A), s)
    assert ggu.dtype == hd.dtype == dtype and ggu.shape == gu.shape and empty.numel() == 0
    assert_within(ggu[:, width:], ref[:, width:], size["up"], UP_STEPS + T_STEPS, dtype, "grad of up")
    assert_within(ggu[:, :width], ref[:, :width], size["gate"], GATE_STEPS + T_STEPS, dtype, "grad of gate")
    assert_within(hd, ref_hd, size["h"], H_STEPS, dtype, "drop(h)")
    assert torch.equal(ggu, ggu_no_h)
    if p > 0:  # the mask drawn again in backward is forward's: the same drop(h), bit for bit
        with force_triton():
            assert torch.equal(hd, ops.swiglu_dropout(gu, p, seed)[1])


# swiglu_lora_forward: (rows, I, r, p). Phi-3-mini's I = 8192 without dropout; 4100 (a multiple of 4, not of the
# kernel's 256-column tile) and 99 (I % 4 != 0: the one-Philox-call-per-element mask) with dropout; r = 16 (the
# recipe) and 5 (zero-padded to tl.dot's 16); 18 rows: a second, mostly empty 16-row program.
LORA_FORWARD_CASES = [(ROWS, 8192, 16, 0.0), (ROWS, 4100, 16, 0.3), (ROWS, 99, 5, 0.3), (18, 100, 5, 0.0),
                      (ROWS, 1000, 128, 0.3)]  # r = 128: a narrower tile (see swiglu_triton._L_A_TILE)


def lora_forward_inputs(rows, width, rank, dtype):
    g = torch.Generator().manual_seed(width + rank)
    gu = (2 * torch.randn(rows, 2 * width, generator=g)).to(DEVICE, dtype)
    return gu, (torch.randn(rank, width, generator=g) / rank**0.5).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,width,rank,p", LORA_FORWARD_CASES)
def test_lora_forward_kernel_forms_xa_from_the_masked_h(rows, width, rank, p, dtype):
    """h is swiglu's kernel's, bit for bit (one h for the frozen GEMM whichever op made it); xa is drop(h) Aᵀ with
    the seed's mask. Bounds on xa (relative to |h||A|): against the exact product of the kernel's own rounded h,
    the float32 sum of I products (I float32 eps) and xa's rounding to the dtype (1 step); against the torch
    reference, also the reference's own sum and rounding, and h's H_STEPS roundings that separate the two."""
    seed = 4321
    gu, A = lora_forward_inputs(rows, width, rank, dtype)
    with force_triton():
        h, xa = ops.swiglu_lora_forward(gu, A, p, seed)
        plain_h = ops.swiglu(gu)
        xa_no_drop = ops.swiglu_lora_forward(gu, A, 0.0, seed)[1]
    assert h.dtype == xa.dtype == dtype and h.shape == (rows, width) and xa.shape == (rows, rank)
    assert torch.equal(h, plain_h)
    keep = dropout.philox_keep_mask(seed, h.shape, p, DEVICE) if p > 0 else torch.ones_like(h, dtype=torch.bool)
    hd = torch.where(keep, h, 0).double().cpu()
    sum_steps = width * F32_EPS / eps(dtype)
    size = hd.abs() @ A.double().abs().t().cpu()
    assert_within(xa, hd @ A.double().t().cpu(), size, 1 + sum_steps, dtype, "xa against its h")
    ref_h, ref_xa = ops.swiglu_lora_forward_reference(gu, A, p, seed)
    assert torch.equal(ref_h, ops.swiglu_reference(gu))
    assert_within(h, ref_h, h_size(gu), H_STEPS, dtype, "h")
    size = torch.where(keep.cpu(), h_size(gu), 0) @ A.double().abs().t().cpu()
    assert_within(xa, ref_xa, size, H_STEPS + 2 + 2 * sum_steps, dtype, "xa against the reference")
    if p > 0:  # dropout did act, and with the mask LoRA dropout's kernel draws for the same seed over h
        assert not torch.equal(xa, xa_no_drop)
        with force_triton():
            assert torch.equal(torch.where(keep, h, 0), dropout.lora_dropout(h, seed, p))


def test_lora_forward_fake_implementation_gives_the_real_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for dtype in DTYPES:
        for p in (0.0, 0.1):
            gu, A = lora_forward_inputs(3, 100, 5, dtype)
            real = ops.swiglu_lora_forward(gu, A, p, 3)
            with FakeTensorMode(allow_non_fake_inputs=True):
                fake = ops.swiglu_lora_forward(gu, A, p, 3)
            assert [(f.shape, f.dtype, f.device) for f in fake] == [(r.shape, r.dtype, r.device) for r in real]
    torch.library.opcheck(ops.swiglu_lora_forward, lora_forward_inputs(3, 100, 5, torch.float32) + (0.1, 3),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_kernel_without_lora_term(dtype):
    """No dropout: the LoRA term is already in gh (added by the matmul), t is None."""
    gu, gh, _ = inputs(8192, dtype, seed=2)
    with force_triton():
        ggu, h = ops.swiglu_backward(gu, gh, None, None, 1.0, 0.0, 0, True)
    ref, ref_h = ops.swiglu_backward_reference(gu, gh, None, 1.0, None, True)
    size = magnitudes(gu, gh, None, 1.0)
    assert_within(ggu[:, 8192:], ref[:, 8192:], size["up"], UP_STEPS, dtype, "grad of up")
    assert_within(ggu[:, :8192], ref[:, :8192], size["gate"], GATE_STEPS, dtype, "grad of gate")
    assert_within(h, ref_h, size["h"], H_STEPS, dtype, "h")


def test_fake_implementations_give_the_real_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for dtype in DTYPES:
        gu, gh, _ = inputs(100, dtype)
        gbr, A = factors(100, dtype)
        real = [ops.swiglu(gu), *ops.swiglu_dropout(gu, 0.1, 3),
                *ops.swiglu_backward(gu, gh, gbr, A, 1.0, 0.1, 3, True),
                *ops.swiglu_backward(gu, gh, None, None, 1.0, 0.0, 0, False)]
        with FakeTensorMode(allow_non_fake_inputs=True):
            fake = [ops.swiglu(gu), *ops.swiglu_dropout(gu, 0.1, 3),
                    *ops.swiglu_backward(gu, gh, gbr, A, 1.0, 0.1, 3, True),
                    *ops.swiglu_backward(gu, gh, None, None, 1.0, 0.0, 0, False)]
        assert [(f.shape, f.dtype, f.device) for f in fake] == [(r.shape, r.dtype, r.device) for r in real]
    gu, gh, _ = inputs(100, torch.float32)
    gbr, A = factors(100, torch.float32)
    for op, args in [(ops.swiglu, (gu,)), (ops.swiglu_dropout, (gu, 0.1, 3)),
                     (ops.swiglu_backward, (gu, gh, gbr, A, 1.0, 0.1, 3, True))]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


# --- SwiGLUDownFn on the kernels --------------------------------------------------------------------------------


@contextlib.contextmanager
def kernels_on(on: bool):
    """The Triton kernels forced on, or off: the torch references, on CUDA too (PHITUNE_TRITON=0)."""
    if on:
        with force_triton():
            yield
        return
    before = os.environ.get("PHITUNE_TRITON")
    os.environ["PHITUNE_TRITON"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["PHITUNE_TRITON"]
        else:
            os.environ["PHITUNE_TRITON"] = before


def down_fn(gu, W, A, B, gy, p, kernels: bool):
    """y and the gradients of gu, A, B from SwiGLUDownFn, with the dropout seed drawn after manual_seed(7)."""
    gu, A, B = (v.detach().clone().to(DEVICE).requires_grad_() for v in (gu, A, B))
    W, gy = W.to(DEVICE), gy.to(DEVICE)
    torch.manual_seed(7)
    with kernels_on(kernels):
        y = lora_autograd.SwiGLUDownFn.apply(gu, W, None, A, B, 2.0, p)
        (y * gy).sum().backward()
    return y.detach(), gu.grad, A.grad, B.grad


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_swiglu_down_on_kernels_gives_the_reference_output_and_gradients(monkeypatch, p):
    """float32; with dropout, the reference is fed the kernels' mask (the seed the function draws after the same
    manual_seed). Bounds: the kernels' h is within H_STEPS roundings of the reference's; y and the LoRA gradients are
    sums of products with h, each side rounding its sums of K terms by up to K eps (relative to the sums of absolute
    values); the matmuls feeding the gradient of gu see identical inputs on both sides."""
    rows, width, out, r = 5, 100, 24, 4
    g = torch.Generator().manual_seed(3)
    gu = 2 * torch.randn(rows, 2 * width, generator=g)
    W, A, B = torch.randn(out, width, generator=g), torch.randn(r, width, generator=g), torch.randn(out, r, generator=g)
    gy = torch.randn(rows, out, generator=g)
    if p > 0:
        torch.manual_seed(7)
        seed = new_seed()
        monkeypatch.setattr(lora_autograd, "_dropout_mask",
                            lambda x, q: dropout.philox_keep_mask(seed, x.shape, q, x.device))
    y, g_gu, g_A, g_B = down_fn(gu, W, A, B, gy, p, kernels=True)
    y_ref, g_gu_ref, g_A_ref, g_B_ref = down_fn(gu, W, A, B, gy, p, kernels=False)
    assert p == 0 or not torch.equal(g_A, down_fn(gu, W, A, B, gy, 0.0, kernels=True)[2])  # dropout did act
    s = 2.0 / (1 - p)
    h = h_size(gu)
    absW, absA, absB, absgy = (v.double().abs() for v in (W, A, B, gy))
    xa = h @ absA.t()
    assert_within(y, y_ref, h @ absW.t() + s * xa @ absB.t(), H_STEPS + 2 * (width + r), torch.float32, "y")
    assert_within(g_A, g_A_ref, s * (absgy @ absB).t() @ h, H_STEPS + 2 * (rows + out), torch.float32, "grad of A")
    assert_within(g_B, g_B_ref, s * absgy.t() @ xa, H_STEPS + 2 * (rows + width), torch.float32, "grad of B")
    size = magnitudes(gu, gy @ W, gy @ B @ A, s)
    assert_within(g_gu[:, width:], g_gu_ref[:, width:], size["up"], UP_STEPS, torch.float32, "grad of up")
    assert_within(g_gu[:, :width], g_gu_ref[:, :width], size["gate"], GATE_STEPS, torch.float32, "grad of gate")


@pytest.mark.parametrize("kernels", [True, False])
def test_lora_grads_without_a_gradient_for_gu_redraw_forwards_mask(kernels):
    """A frozen gate_up with a frozen input: backward recomputes drop(h) for grad_A alone, with forward's mask."""
    g = torch.Generator().manual_seed(4)
    gu = torch.randn(6, 2 * 100, generator=g).to(DEVICE)
    W, A, B = (torch.randn(*shape, generator=g).to(DEVICE) for shape in ((24, 100), (4, 100), (24, 4)))
    gy = torch.randn(6, 24, generator=g).to(DEVICE)
    grads = []
    for gu_grad in (True, False):
        x, a, b = gu.clone().requires_grad_(gu_grad), A.clone().requires_grad_(), B.clone().requires_grad_()
        torch.manual_seed(9)
        with kernels_on(kernels):
            (lora_autograd.SwiGLUDownFn.apply(x, W, None, a, b, 2.0, 0.3) * gy).sum().backward()
        grads.append((a.grad, b.grad))
    assert torch.equal(grads[0][1], grads[1][1])  # grad_B needs only forward's saved product
    if kernels:  # both backward kernels compute h with the forward kernel's float32 arithmetic
        assert torch.equal(grads[0][0], grads[1][0])
    else:  # the reference recomputes h as gate·sigmoid(gate)·up, forward as silu(gate)·up: a rounding apart
        size = 2.0 / 0.7 * (gy.double().abs() @ B.double().abs()).t().cpu() @ h_size(gu.cpu())
        assert_within(grads[0][0], grads[1][0], size, H_STEPS + 2 * 6, torch.float32, "grad of A")


def tiny_model(dropout: float):
    from transformers import Phi3ForCausalLM

    from phitune.adapt import add_lora

    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=101, hidden_size=64, intermediate_size=100, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, pad_token_id=0, use_cache=False)
    model = Phi3ForCausalLM._from_config(cfg, attn_implementation="sdpa")
    add_lora(model, {"r": 4, "lora_alpha": 8, "lora_dropout": dropout, "target_modules": "all-linear"})
    for n, prm in model.named_parameters():  # non-zero B so every LoRA path carries gradient
        if "lora_B" in n:
            torch.nn.init.normal_(prm, std=0.05)
    return model.to(DEVICE)


def test_tiny_model_on_kernels_has_the_reference_loss_and_lora_gradients():
    """The fast path with the kernels forced against the same fast path on the torch references (float32, no
    dropout). Bound: each elementwise result is within GATE_STEPS roundings; every loss and gradient is a chain of sums
    of at most K = 100 terms (the intermediate width) per layer, each side rounding them by K eps: 2 layers, forward
    and backward, give (GATE_STEPS + 2 K) x 4 eps of the largest gradient entry."""
    from phitune.training.loss import apply_fast_path, forward_loss

    ids = torch.randint(1, 101, (2, 10), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    batch = {"input_ids": ids, "labels": ids.clone()}
    results = []
    for kernels in (False, True):
        model = tiny_model(0.0)
        apply_fast_path(model, None)
        with kernels_on(kernels):
            out = forward_loss(model, batch)
            out.loss_sum.backward()
        results.append((out.loss_sum.detach(), {n: q.grad for n, q in model.named_parameters() if q.grad is not None}))
    (loss_ref, ref), (loss, got) = results
    steps = (GATE_STEPS + 2 * 100) * 4
    assert got.keys() == ref.keys() and any("mlp.down_proj.lora_A" in n for n in ref)
    assert_within(loss, loss_ref, loss_ref.abs(), steps, torch.float32, "loss")
    for n in ref:
        assert_within(got[n], ref[n], ref[n].abs().max().expand_as(ref[n]), steps, torch.float32, n)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_recompute_draws_the_same_dropout_seed(reentrant):
    """Checkpointing recomputes forward in backward: the seed (from the CPU generator, whose state checkpointing
    restores) must be forward's, or the gradient would belong to another mask. With dropout and the kernels forced,
    the checkpointed step gives the plain step's gradients bit for bit (the same ops on the same values)."""
    from phitune.models.loading import enable_checkpointing
    from phitune.training.loss import apply_fast_path, forward_loss

    ids = torch.randint(1, 101, (2, 10), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    batch = {"input_ids": ids, "labels": ids.clone()}
    grads = []
    for checkpointed in (False, True):
        model = tiny_model(0.3)
        if checkpointed:
            enable_checkpointing(model, {"use_reentrant": reentrant})
        apply_fast_path(model, None)
        model.train()
        torch.manual_seed(11)
        with force_triton():
            forward_loss(model, batch).loss_sum.backward()
        grads.append({n: q.grad for n, q in model.named_parameters() if q.grad is not None})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and any("mlp.down_proj.lora_A" in n for n in plain)
    for n in plain:
        assert torch.equal(plain[n], checkpointed[n]), n
    torch.manual_seed(12)  # and the seed matters: another one gives down_proj's A another gradient
    model = tiny_model(0.3)
    apply_fast_path(model, None)
    model.train()
    with force_triton():
        forward_loss(model, batch).loss_sum.backward()
    name = "model.layers.0.mlp.down_proj.lora_A"
    assert not torch.equal(model.get_parameter(name).grad, plain[name])


def plan_config(dropout: float, **model):
    return load_config({"model": {"name_or_path": "tiny", "dtype": "float32", **model},
                        "data": {"train": "unused.jsonl", "max_seq_length": 64, "packing": True},
                        "training_config": {"per_device_train_batch_size": 2, "use_cpu": True, "max_steps": 10,
                                            **({"bf16": True} if model else {})},
                        "peft_config": {"r": 4, "lora_alpha": 8, "lora_dropout": dropout,
                                        "target_modules": "all-linear"}})


def plan_shape():
    return Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=512, max_position_embeddings=256, pad_token_id=0)


def swiglu_ops_in(sim, tokens: int, width: int, dropout: bool, rank: int = 4):
    ops_by_name = {}
    for o in sim.ops:
        ops_by_name.setdefault(o.name, []).append(o)
    forward = ops_by_name.get("swiglu_lora_forward", [])
    backward = ops_by_name.get("swiglu_backward", [])
    assert len(forward) == len(backward) == 2, sorted(ops_by_name)  # one each per layer
    assert "swiglu_dropout" not in ops_by_name and "swiglu" not in ops_by_name  # the forward forms xa itself
    elements = tokens * width
    assert all(o.flops == ((6 if dropout else 5) + 2 * rank) * elements for o in forward)
    assert all(o.flops == (15 + 2 * rank if dropout else 12) * elements and o.nbytes > 0 for o in backward)
    # the forward moves gu (N, 2I), A (r, I) in and h (N, I), xa (N, r) out: drop(h) is never written
    size = forward[0].nbytes // (3 * elements + rank * width + tokens * rank)
    assert size in (2, 4) and all(o.nbytes == (3 * elements + rank * width + tokens * rank) * size for o in forward)
    if dropout:  # gu, gh, gbr (N, r), A (r, I) in; grad of gu and drop(h) out: no (N, I) LoRA product t
        assert all(o.nbytes == (6 * elements + rank * tokens + rank * width) * size for o in backward)
    # no separate (N, I) @ (I, r) matmul for xa: those left of that size are backward's, per layer grad_A and (no
    # dropout: the kernel does not form it then) the input gradient's t = gbr A
    xa_sized = [o for o in ops_by_name.get("mm", []) if o.flops == 2 * tokens * width * rank]
    assert len(xa_sized) == (1 if dropout else 2) * 2, len(xa_sized)
    assert "silu" not in ops_by_name and "sigmoid" not in ops_by_name  # the old elementwise ops are gone
    return ops_by_name


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_plan_records_the_swiglu_ops_with_their_flops(dropout):
    """phitune plan's OpRecorder on a fake device (the CPU one here, with the kernels forced on as on CUDA)."""
    with force_triton():
        sim = simulate_step(plan_config(dropout), plan_shape(), 2, device="cpu")
    swiglu_ops_in(sim, sim.batch_shape[0] * sim.batch_shape[1], 96, dropout > 0)


def test_plan_of_a_4bit_base_on_its_simulated_gpu_uses_the_seeded_swiglu():
    """The QLoRA simulation runs on meta tensors standing for the GPU: SwiGLU keeps a seed there, no bool mask."""
    pytest.importorskip("bitsandbytes")
    sim = simulate_step(plan_config(0.1, load_in_4bit=True), plan_shape(), 2, device="cuda")
    swiglu_ops_in(sim, sim.batch_shape[0] * sim.batch_shape[1], 96, dropout=True)


FAKE_CUDA_SCRIPT = """
import json, sys
from pathlib import Path
from phitune.plan import fakegpu
fakegpu.reexec_on_fake_cuda(str(Path(__file__).resolve()), sys.argv[1:])
from transformers import Phi3Config
from phitune.config import load_config
from phitune.plan.simulate import simulate_step
cfg = load_config({"model": {"name_or_path": "tiny"}, "data": {"train": "unused.jsonl", "max_seq_length": 64},
                   "training_config": {"per_device_train_batch_size": 2, "bf16": True, "max_steps": 10},
                   "peft_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": "all-linear"}})
shape = Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=512, max_position_embeddings=256, pad_token_id=0)
sim = simulate_step(cfg, shape, 2, device="cuda")
print(json.dumps({"batch": list(sim.batch_shape), "ops": [[o.name, o.flops, o.nbytes] for o in sim.ops]}))
"""


@pytest.mark.slow  # a child process on phitune plan's fake CUDA runtime: ~10-20 s on 2 shared cores
def test_plan_on_the_fake_cuda_device_records_the_seeded_swiglu_ops(tmp_path):
    """Without forcing anything: a CUDA tensor (fake) takes the kernels' ops, the dropout mask is a seed."""
    import sys

    script = tmp_path / "simulate.py"
    script.write_text(FAKE_CUDA_SCRIPT)
    result = child_json([sys.executable, str(script)])
    recorded = [SimpleNamespace(name=name, flops=flops, nbytes=nbytes) for name, flops, nbytes in result["ops"]]
    rows, length = result["batch"]
    swiglu_ops_in(SimpleNamespace(ops=recorded), rows * length, 96, dropout=True)


SM90_COMPILE_SCRIPT = """
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from phitune.training.fast.kernels import swiglu_triton as st
aligned = [["tt.divisibility", 16]]  # what a launch on 16-byte-aligned tensors with sizes % 16 == 0 specializes
report = {}
for dtype in ("bf16", "fp32"):
    signature = {n: f"*{dtype}" for n in ("gu_ptr", "gh_ptr", "gbr_ptr", "a_ptr", "ggu_ptr", "h_ptr")}
    signature.update({"n_rows": "i32", "n_cols": "i32", "gu_row_stride": "i32", "rank": "i32", "s": "fp32",
                      "p": "fp32", "seed": "i32"})
    constexprs = {"HAS_T": True, "DROP": True, "WANT_H": True, "ALIGNED": True, "UPCAST_DOT": False, "R": 16,
                  "ROWS": st._T_ROWS, "COLS": st._T_COLS}
    signature.update({k: "constexpr" for k in constexprs})
    src = ASTSource(fn=st._swiglu_backward, signature=signature, constexprs=constexprs,
                    attrs={(i,): aligned for i in range(10)})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": st._WARPS})
    report[dtype] = {"cubin": len(k.asm["cubin"]), "shared": k.metadata.shared,
                     "access": sorted(set(re.findall(r"(?:ld|st)\\.global[.\\w]*", k.asm["ptx"])))}
print(json.dumps(report))
"""


@pytest.mark.slow  # a child process (Triton compiled, not interpreted): ~5-10 s on 2 shared cores
def test_backward_kernel_with_the_lora_factors_compiles_for_an_h100():
    """No GPU here, but Triton compiles for sm_90 without one (its bundled ptxas): the backward kernel with its K=r
    tl.dot lowers in bfloat16 (tensor cores; the interpreter runs that product in float32) and float32, with shared
    memory only for the product's operand tiles and 16-byte stores."""
    report = compiled_for_sm90(SM90_COMPILE_SCRIPT)
    for dtype, size in (("bf16", 2), ("fp32", 4)):
        k = report[dtype]
        assert k["cubin"] > 0 and 0 < k["shared"] <= (16 + 128) * 16 * size, (dtype, k)
        assert k["access"][-1] == "st.global.v4.b32" and "ld.global.v4.b32" in k["access"], (dtype, k)


H100_SHARED_PER_BLOCK = 227 * 1024  # sm_90's opt-in maximum of shared memory per thread block (CUDA guide)
SM90_LORA_FORWARD_SCRIPT = """
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from phitune.training.fast.kernels import swiglu_triton as st
report = {}
for dtype, R in (("bf16", 16), ("fp32", 16), ("bf16", 128), ("fp32", 128)):
    signature = {n: f"*{dtype}" for n in ("gu_ptr", "a_ptr", "h_ptr", "xa_ptr")}
    signature.update({"n_rows": "i32", "n_cols": "i32", "gu_row_stride": "i32", "rank": "i32", "p": "fp32",
                      "seed": "i32"})
    constexprs = {"DROP": True, "ALIGNED": True, "UPCAST_DOT": False, "R": R, "ROWS": st._L_ROWS,
                  "COLS": min(st._L_COLS, st._L_A_TILE // R)}  # the launcher's tile
    signature.update({k: "constexpr" for k in constexprs})
    src = ASTSource(fn=st._swiglu_lora_forward, signature=signature, constexprs=constexprs,
                    attrs={(i,): [["tt.divisibility", 16]] for i in range(7)})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": st._WARPS})
    ptx = k.asm["ptx"]
    report[f"{dtype}/{R}"] = {"shared": k.metadata.shared, "stages": k.metadata.num_stages,
                     "mma": sorted(set(re.findall(r"mma\\.sync[.\\w]*", ptx))), "async": "cp.async" in ptx}
print(json.dumps(report))
"""


@pytest.mark.slow  # a child process (Triton compiled, not interpreted): ~5-10 s on 2 shared cores
def test_lora_forward_kernel_compiles_for_an_h100():
    """The forward kernel with its loop-carried K=r tl.dot lowers for sm_90 (Triton's bundled ptxas, no GPU
    needed): bfloat16 on the tensor cores (the interpreter runs that product in float32), the loop's loads
    pipelined through shared memory, which holds at most the pipeline's stages of one gate, up and A tile."""
    report = compiled_for_sm90(SM90_LORA_FORWARD_SCRIPT)
    from phitune.training.fast.kernels import swiglu_triton as st

    for dtype, size in (("bf16", 2), ("fp32", 4)):
        for rank in (16, 128):  # r = 16, the recipe; 128, a large rank on its narrower tile
            k, cols = report[f"{dtype}/{rank}"], min(st._L_COLS, st._L_A_TILE // rank)
            tiles = (2 * st._L_ROWS * cols + cols * rank) * size
            assert k["async"] and 0 < k["shared"] <= k["stages"] * tiles, (dtype, rank, k)
            assert k["shared"] <= H100_SHARED_PER_BLOCK, (dtype, rank, k)  # the launch would fail above it
            assert dtype == "fp32" or any("bf16.bf16.f32" in m for m in k["mma"]), (dtype, rank, k)
