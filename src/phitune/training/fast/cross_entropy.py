"""Cross-entropy through the output layer in chunks, with no (tokens, V) tensor alive past one chunk.

``HeadCrossEntropy`` forms each chunk's logits, its loss and (when a gradient is wanted) the chunk's gradient with
respect to the hidden states and the head weight right away, while the logits are still in cache, so backward is
one multiply by the incoming scalar. This is the "fused linear cross-entropy" idea (Wijmans et al. 2024, "Cut Your
Losses in Large-Vocabulary Language Models"; Liger's FusedLinearCrossEntropy); the code here is our own.
Only positions with a label are fed to the head, so prompt tokens and padding cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...data.labels import IGNORE_INDEX

# Config keys of Hugging Face models whose forward changes the logits after lm_head (soft-capping, scaling): for those
# forward_loss uses model(...).logits, which applies them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                     "logit_softcapping", "mup_width_multiplier", "lm_head_multiplier")

# 2**26 float32 logits per chunk: 256 MiB, about 2,000 positions at Phi-3's 32,064 vocabulary.
_CHUNK_ELEMENTS = 2**26
# bfloat16/float16 logits on a CPU: 2**23, rounded down to a multiple of 64 positions (256 at Phi-3's vocabulary).
# With bfloat16 matrix hardware the lm_head matmuls run ~3x faster than in float32, so the chunk's passes over its
# float32 logits (max, exp, sum, softmax, the cast back) weigh more, and they run faster on chunks nearer cache size;
# oneDNN's bf16 kernels take rows in blocks, and a ragged chunk pays for a partial block in each (261 rows: 916 ms
# against 844 at 256 in one run).
# Measured (benchmarks/loss_chunks.py: 1,022 positions, forward + backward, one thread, AVX512-BF16): bf16 822 ms at
# 256 rows, 811 at 512, 874 at 128, 956 at 2,092 (the float32 default); float32 1,547 ms at 2,092, 1,630 at 256.
_CPU_HALF_CHUNK_ELEMENTS = 2**23


@dataclass
class LossOutput:
    """Sum of token cross-entropies, supervised token count, and (optionally) correctly predicted tokens."""

    loss_sum: torch.Tensor
    n_tokens: torch.Tensor
    n_correct: torch.Tensor | None = None

    def __iter__(self):  # allows ``loss_sum, n_tokens, n_correct = forward_loss(...)``
        return iter((self.loss_sum, self.n_tokens, self.n_correct))


def decoder_of(model):
    """The model body that returns ``last_hidden_state`` (``model.model`` for Phi-3), or None if there is none."""
    prefix = getattr(model, "base_model_prefix", None)
    body = getattr(model, prefix, None) if prefix else None
    if body is None or body is model or not isinstance(body, torch.nn.Module):
        return None
    return body


def head_is_plain(model, head) -> bool:
    """True when ``logits = head(hidden)`` is all the model's forward does after its body."""
    if not isinstance(head, torch.nn.Module):
        return False
    config = getattr(model, "config", None)
    for key in _LOGIT_TRANSFORMS:
        value = getattr(config, key, None)
        if value not in (None, 0, 1, 1.0, False):
            return False
    return True


def _is_plain_linear(head) -> bool:
    return type(head) is torch.nn.Linear


def default_chunk(vocab: int, dtype: torch.dtype | None = None, device: torch.device | None = None) -> int:
    """Positions per lm_head chunk for logits of ``dtype`` on ``device`` (see _CPU_HALF_CHUNK_ELEMENTS)."""
    if device is not None and device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return max(128, _CPU_HALF_CHUNK_ELEMENTS // max(vocab, 1) // 64 * 64)
    return max(128, _CHUNK_ELEMENTS // max(vocab, 1))


def logits_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype ``lm_head(hidden)`` computes in: the autocast dtype where autocast is on, else the hidden states'."""
    dev = hidden.device.type
    if dev != "meta" and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return hidden.dtype


class HeadCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ W^T + b, target_i) and the number of argmax hits; gradients formed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, grad_hidden: bool, grad_weight: bool):
        n = hidden.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        g_hidden = torch.empty_like(hidden) if grad_hidden else None
        g_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight else None
        g_bias = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                  if grad_weight and bias is not None else None)
        for start in range(0, n, chunk):
            h = hidden[start:start + chunk]
            t = targets[start:start + chunk]
            # Same rounding as the plain path: logits in the model's dtype, softmax in float32.
            logits = F.linear(h, weight, bias).float()
            # One max pass gives the stabiliser and the argmax; exp in place; one sum: 4 passes over (rows, V).
            top, arg = logits.max(dim=-1)
            picked = logits.gather(1, t[:, None]).squeeze(1)
            correct += (arg == t).sum()
            probs = logits.sub_(top[:, None]).exp_()
            total = probs.sum(-1)
            loss += (total.log() + top - picked).sum()
            if grad_hidden or grad_weight:
                probs.div_(total[:, None])  # softmax, in place of the logits
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                g = probs.to(hidden.dtype)
                if grad_hidden:
                    torch.matmul(g, weight, out=g_hidden[start:start + chunk])
                if grad_weight:
                    g_weight.addmm_(g.t().float() if g.dtype != torch.float32 else g.t(), h.float())
                    if g_bias is not None:
                        g_bias += probs.sum(0)
        ctx.save_for_backward(g_hidden, g_weight, g_bias)
        ctx.has = (grad_hidden, grad_weight, bias is not None)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        g_hidden, g_weight, g_bias = ctx.saved_tensors
        has_h, has_w, has_b = ctx.has
        dh = dw = db = None
        if has_h and ctx.needs_input_grad[0]:
            dh = g_hidden * grad_loss.to(g_hidden.dtype)
        if has_w and ctx.needs_input_grad[1]:
            dw = (g_weight * grad_loss).to(ctx.dtypes[0])
        if has_w and has_b and ctx.needs_input_grad[2]:
            db = (g_bias * grad_loss).to(ctx.dtypes[1])
        return dh, dw, db, None, None, None, None


def _chunked_module_loss(hidden, head, targets, chunk):
    """Any output module (e.g. an adapted lm_head): one checkpointed chunk at a time."""
    from torch.utils.checkpoint import checkpoint

    def piece(h, t):
        logits = head(h).float()
        return F.cross_entropy(logits, t, reduction="sum"), (logits.argmax(-1) == t).sum()

    loss = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        if torch.is_grad_enabled():
            piece_loss, piece_correct = checkpoint(piece, h, t, use_reentrant=False)
        else:
            piece_loss, piece_correct = piece(h, t)
        loss = loss + piece_loss
        correct += piece_correct
    return loss, correct


def head_loss(hidden, head, shifted_labels, with_accuracy: bool = False, *, chunk_tokens: int | None = None):
    """Loss of ``head(hidden)`` against ``shifted_labels`` (already aligned: position i predicts label i)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    labels = shifted_labels.reshape(-1).to(flat.device)
    keep = labels != IGNORE_INDEX
    idx = keep.nonzero().squeeze(1)
    n_tokens = idx.numel()
    if n_tokens == flat.shape[0]:
        rows, targets = flat, labels
    else:
        rows, targets = flat.index_select(0, idx), labels.index_select(0, idx)
    n = torch.tensor(n_tokens, device=flat.device)
    if n_tokens == 0:  # keep the graph connected so backward() still works
        zero = flat.sum() * 0.0
        return LossOutput(zero.float(), n, torch.zeros((), dtype=torch.long, device=flat.device)
                          if with_accuracy else None)
    weight = getattr(head, "weight", None)
    vocab = weight.shape[0] if weight is not None else getattr(head, "out_features", 32000)
    chunk = chunk_tokens or default_chunk(vocab, logits_dtype(rows), rows.device)
    if _is_plain_linear(head):
        grad = torch.is_grad_enabled()
        loss, correct = HeadCrossEntropy.apply(rows, head.weight, head.bias, targets, chunk,
                                               grad and rows.requires_grad, grad and head.weight.requires_grad)
    else:
        loss, correct = _chunked_module_loss(rows, head, targets, chunk)
    return LossOutput(loss, n, correct if with_accuracy else None)


def loss_from_logits(logits, shifted_labels, with_accuracy: bool = False):
    """The plain path: full logits from the model, summed cross-entropy over supervised positions."""
    labels = shifted_labels.to(logits.device)
    flat = logits.reshape(-1, logits.shape[-1]).float()
    loss = F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    mask = labels != IGNORE_INDEX
    n = mask.sum()
    correct = None
    if with_accuracy:
        correct = ((logits.argmax(-1) == labels) & mask).sum()
    return LossOutput(loss, n, correct)
