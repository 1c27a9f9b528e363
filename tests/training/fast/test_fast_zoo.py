"""The fast path keeps the plain path's loss and LoRA gradients on every family of the model zoo (issue 24, item 4).

For each zoo model (tests/zoo.py) with LoRA on all linear layers: the loss and every LoRA gradient of
``apply_fast_path`` equal those of ``training_config.fast_path: off`` within a tolerance derived from the dtype and
the sizes involved, on a packed batch (two samples per row, position_ids restarting) and a padded one, in float32
and under bfloat16 autocast, without dropout and with dropout through one fixed mask on both paths. Which fused
pieces each family gets is asserted too (Gemma's (1 + w) RMSNorm must not get Phi-3's). The same comparison runs
again under ``kernels.force_triton()``, so the Triton kernels behind the fast path's custom ops are checked across
the zoo (on a CPU through Triton's interpreter).
"""

import contextlib
import math
import re
from types import SimpleNamespace

import pytest
import torch


from helpers import FixedMask  # noqa: E402
from zoo import LONGROPE_ORIGINAL, VOCAB, ZOO, build  # noqa: E402

from phitune import lora  # noqa: E402
from phitune.adapt import add_lora  # noqa: E402
from phitune.training.fast import attention, kernels, lora_autograd, varlen  # noqa: E402
from phitune.training.loss import apply_fast_path, forward_loss  # noqa: E402
from phitune.training.step import batch_maker  # noqa: E402

torch.set_num_threads(1)

R, ALPHA, DROPOUT = 4, 8, 0.2

# The fused pieces each family must get (fused.install's counts, reported in FastPath.notes); absent = 0.
# 2 layers: Phi-3 adapts qkv, o, gate_up, down (4 per layer), the others q, k, v, o, gate, up, down (7 per layer);
# RMSNorm: 2 per layer + the final one, except Gemma's (1 + w) norm, which Phi-3's RMSNorm function would get wrong;
# Phi-3's decoder layers also fuse the residual stream into their norms (add_rms_norm: 1 per layer).
_PHI3 = {"lora_linear": 8, "swiglu_mlp": 2, "rms_norm": 5, "qkv_rope": 2, "add_rms_norm": 2}
_SPLIT = {"lora_linear": 14, "rms_norm": 5}
PIECES = {"phi3-mini": _PHI3, "phi3-medium": _PHI3, "phi3-longrope": _PHI3, "phi4-mini": _PHI3,
          "llama": _SPLIT, "qwen2": _SPLIT, "mistral": _SPLIT, "gemma": {"lora_linear": 14}}
assert PIECES.keys() == ZOO.keys()
KINDS = ("lora_linear", "lora_linear_4bit", "swiglu_mlp", "rms_norm", "qkv_rope", "add_rms_norm")

# Samples (token counts) of the two batches. Packed: rows [20 | 7] and [9 | 12] (position_ids restart at each
# sample; the 20-token sample is past phi3-longrope's original length, so its long factors are used, and past the
# sliding windows of phi3-medium and mistral). Padded: one sample per row, [11] and [6] padded to 11 (inside the
# original length: the short factors).
PACKED = ((20, 7), (9, 12))
PADDED = ((11,), (6,))
assert max(map(max, PACKED)) > LONGROPE_ORIGINAL >= max(map(max, PADDED))


def samples_and_entry(rows):
    """Random samples of the given token counts (the first two tokens unlabelled) and their plan entry (rows)."""
    g = torch.Generator().manual_seed(5)
    samples, entry = [], []
    for row in rows:
        entry.append([])
        for n in row:
            ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
            samples.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})  # a 2-token "prompt"
            entry[-1].append(len(samples) - 1)
    return samples, entry


def model_with_lora(name, dropout):
    """Zoo model ``name`` with LoRA on every linear layer (lm_head excepted) and a non-zero lora_B."""
    model = build(name)
    add_lora(model, {"r": R, "lora_alpha": ALPHA, "lora_dropout": dropout, "target_modules": "all-linear"})
    with torch.no_grad():  # a fresh lora_B is zero, which would leave lora_A without gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def loss_and_grads(model, fast, rows, autocast):
    """Loss and LoRA gradients of one forward/backward, on the batch phitune's batch maker builds for ``fast``."""
    packing = len(rows[0]) > 1
    samples, entry = samples_and_entry(rows)
    if not packing:  # a flat list of samples: one per row, right-padded
        entry = [i for row in entry for i in row]
    batch = batch_maker(model, None, SimpleNamespace(max_seq_length=32, packing=packing), fast)(samples, entry)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = forward_loss(model, batch, fast=fast)
        out.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss_sum.detach(), grads


def fused_counts(fast) -> dict[str, int]:
    """fused.install's counts as FastPath.notes reports them ("fused autograd functions: 8 lora_linear, ...")."""
    note = next((n for n in fast.notes if n.startswith("fused autograd functions:")), "")
    return {kind: int(count) for count, kind in re.findall(r"(\d+) (\w+)", note)}


def same_dropout_mask_on_plain_path(model, monkeypatch):
    """Both paths draw lora_dropout's mask from FixedMask (a pattern fixed by the input's shape), so with dropout on
    they do the same arithmetic: the fused functions call lora_autograd._dropout_mask, the plain layers'
    lora_dropout is replaced by x * mask / (1 - p) with that same mask."""
    FixedMask(monkeypatch)
    for m in model.modules():
        if isinstance(m, (lora.Linear, lora.MergedLinear)) and isinstance(m.lora_dropout, torch.nn.Dropout):
            p = m.lora_dropout.p
            monkeypatch.setattr(m.lora_dropout, "forward",
                                lambda x, p=p: x * lora_autograd._dropout_mask(x, p) / (1 - p))


def chain_length(config, rows) -> int:
    """How many rounded accumulations feed one LoRA gradient element, summed along the chain from the parameter to the
    loss and back: per layer the two norms' mean of squares and the q/k/v projection (hidden each), the attention
    scores (head_dim), probabilities times values (the row length), o_proj (heads x head_dim), gate/up (hidden) and
    down (intermediate); then the final norm, lm_head (hidden) and softmax's sum (vocab). Backward runs the transposed
    reductions, of about the same lengths, then sums over the batch's tokens for the factor's gradient."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    longest_row, tokens = max(map(sum, rows)), sum(map(sum, rows))
    layer = (3 * config.hidden_size + head_dim + longest_row + config.num_attention_heads * head_dim
             + config.hidden_size + config.intermediate_size)
    forward = config.num_hidden_layers * layer + 2 * config.hidden_size + config.vocab_size
    return 2 * forward + tokens


def tolerance(config, rows, bf16: bool, magnitude: float) -> float:
    """The largest difference two correct computations of a value of size ``magnitude`` may show.

    Each path's result carries rounding errors of about u * sqrt(n) * magnitude after n rounded steps (independent
    roundings add like a random walk; u = eps / 2), so two paths that round differently differ by up to
    eps * sqrt(n) * magnitude, with ``magnitude`` the largest element of the tensor (an element's error scales with
    the terms summed into it, not with the element itself, which may cancel to near zero).
    float32: the two paths may round every accumulation differently (fused functions, addmm vs mm + add, other
    kernels), so n is the whole chain (``chain_length``: about 2,500 for these models, sqrt 50).
    bfloat16 autocast: both paths accumulate in float32 inside the same matmuls (the term above, with float32's eps);
    what differs is where a product is rounded to bfloat16 (relative error eps_bf16 per value), and the longest
    reduction K (hidden, intermediate, vocabulary or row length: 128 here) sums K such values.
    """
    eps32 = torch.finfo(torch.float32).eps
    variance = eps32**2 * chain_length(config, rows)
    if bf16:
        longest = max(config.hidden_size, config.intermediate_size, config.vocab_size, max(map(sum, rows)))
        variance += torch.finfo(torch.bfloat16).eps ** 2 * longest
    return math.sqrt(variance) * magnitude


def compare(name, *, bf16, packed, dropout, monkeypatch, triton=False, varlen_attention=False):
    """The fast path's loss and LoRA gradients against the plain path's, on zoo model ``name``. ``varlen_attention``:
    switch attention to phitune's varlen implementation too (what ``apply`` picks on CUDA in half precision)."""
    model = model_with_lora(name, dropout)
    if dropout:
        same_dropout_mask_on_plain_path(model, monkeypatch)
    rows = PACKED if packed else PADDED
    plain = apply_fast_path(model, {"fast_path": "off"})
    assert not any(type(m).__name__.startswith("Fused") for m in model.modules())
    ref_loss, ref = loss_and_grads(model, plain, rows, bf16)

    fast = apply_fast_path(model, None)
    assert fused_counts(fast)["lora_linear"] == PIECES[name]["lora_linear"], fast.notes  # the fast path is on
    if varlen_attention:
        varlen.register()
        assert attention.switch(model, varlen.NAME)
    with kernels.force_triton() if triton else contextlib.nullcontext():
        loss, got = loss_and_grads(model, fast, rows, bf16)

    assert got.keys() == ref.keys() and len(ref) == 2 * PIECES[name]["lora_linear"]
    assert all("lora_" in n for n in ref)  # the base is frozen: only LoRA factors carry gradients
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=tolerance(model.config, rows, bf16, ref_loss.abs().item()))
    for n in ref:
        assert got[n].dtype == ref[n].dtype == torch.float32, n
        atol = tolerance(model.config, rows, bf16, ref[n].abs().max().item())
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=atol, msg=lambda m, n=n: f"{name} {n}: {m}")


@pytest.mark.parametrize("name", list(ZOO))
def test_each_family_gets_the_fused_pieces_its_modules_match(name):
    """Phi-3-style models get every fused function; split-projection ones the LoRA linear and RMSNorm; Gemma only the
    LoRA linear (its (1 + w) RMSNorm and GeGLU MLP are not what Phi-3's functions compute)."""
    fast = apply_fast_path(model_with_lora(name, 0.0), None)
    print(f"{name}: {'; '.join(fast.notes)}")
    counts = fused_counts(fast)
    assert {k: counts.get(k, 0) for k in KINDS} == {k: PIECES[name].get(k, 0) for k in KINDS}, fast.notes
    assert fast.fused_loss and fast.position_masks


@pytest.mark.parametrize("dropout", [0.0, DROPOUT], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("name", list(ZOO))
def test_fast_path_keeps_the_plain_loss_and_lora_gradients(name, bf16, packed, dropout, monkeypatch):
    compare(name, bf16=bf16, packed=packed, dropout=dropout, monkeypatch=monkeypatch)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("name", list(ZOO))
def test_varlen_attention_keeps_the_plain_loss_and_lora_gradients(name, packed, monkeypatch):
    """Sample boundaries from position_ids alone (cu_seqlens), sliding windows and GQA in the varlen attention
    function; on a CPU it runs its reference kernel (causal sdpa per sample), the CUDA kernel is checked in
    tests/training/test_fast.py on a GPU."""
    compare(name, bf16=False, packed=packed, dropout=0.0, monkeypatch=monkeypatch, varlen_attention=True)


# Under force_triton the Triton kernels of phitune.training.fast.kernels run in place of the torch references (on a
# CPU through Triton's interpreter, which is slow: all but two float32 families are marked slow). Without dropout
# only: a kernel that draws its dropout mask in-kernel (kernels.new_seed) cannot be fed FixedMask's pattern.
_FAST_TRITON = ("phi4-mini", "llama")  # partial rotary + GQA + tied embeddings; split projections with RMSNorm


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("bf16", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("name", [n if n in _FAST_TRITON else pytest.param(n, marks=pytest.mark.slow) for n in ZOO])
def test_fast_path_with_triton_kernels_keeps_the_plain_loss_and_lora_gradients(name, bf16, packed, monkeypatch):
    pytest.importorskip("triton")
    compare(name, bf16=bf16, packed=packed, dropout=0.0, monkeypatch=monkeypatch, triton=True)
