"""The training loss, computed without materialising the full (B, T, V) logits.

``forward_loss(model, batch, fast=...)`` returns the SUM of token cross-entropies of ``logits[:, :-1]`` against
``labels[:, 1:]`` (labels are -100 where a token is not trained) and the number of supervised tokens, so the trainer
can divide by the supervised tokens of a whole optimizer step. ``apply_fast_path(model, training_config)`` turns on
the speed-ups of ``phitune.training.fast`` that help on the model's device and returns what it turned on (a
``FastPath``),
which ``forward_loss`` takes; both are what ``train.py`` calls.

Why not ``model(...).logits``: for Phi-3 (V = 32,064) the float32 logits of one 4 x 2048 micro-batch are 1 GiB, and
the loss's log-softmax and its gradient add two more copies. Here the model body runs to hidden states, only the
positions that carry a label go through ``lm_head``, in chunks, and the gradient of each chunk is formed while its
logits are alive (``phitune.training.fast.cross_entropy``), so nothing of size (tokens, V) outlives a chunk.
"""

from __future__ import annotations

import torch

from . import fast as fast_path
from .fast import FastPath, Pieces, attention, cross_entropy
from .fast.cross_entropy import LossOutput
from ..data.labels import IGNORE_INDEX

__all__ = ["FastPath", "LossOutput", "Pieces", "apply_fast_path", "forward_loss"]


def forward_loss(model, batch: dict, with_accuracy: bool = False, *, fast: FastPath | None = None,
                 chunk_tokens: int | None = None, fused_loss: bool | None = None) -> LossOutput:
    """Run ``model`` on ``batch`` and return the summed next-token cross-entropy over supervised tokens.

    ``batch`` holds ``input_ids`` and ``labels`` (B, T), and optionally ``position_ids`` and ``attention_mask``
    (as ``phitune.data.collate`` builds them). ``fast`` is what ``apply_fast_path`` returned for this model (None:
    the defaults of ``FastPath``, chunked loss on). ``fused_loss=False`` forces the plain ``model(...).logits`` path
    (the reference the tests compare against). ``chunk_tokens`` overrides the number of positions per lm_head chunk.
    """
    fast = fast or FastPath()
    if fused_loss is None:
        fused_loss = fast.fused_loss
    labels = batch["labels"]
    inputs = attention.model_inputs(model, batch, drop_redundant_mask=fast.position_masks)
    # labels[:, 1:] aligned with positions [:, :-1]; the last position of each row predicts nothing.
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)

    head = model.get_output_embeddings() if fused_loss and hasattr(model, "get_output_embeddings") else None
    body = cross_entropy.decoder_of(model) if head is not None else None
    if body is None or not cross_entropy.head_is_plain(model, head):
        logits = model(**inputs).logits
        return cross_entropy.loss_from_logits(logits, shifted, with_accuracy)

    hidden = body(**inputs).last_hidden_state
    return cross_entropy.head_loss(hidden, head, shifted, with_accuracy, chunk_tokens=chunk_tokens)


def apply_fast_path(model, training_config=None, pieces: Pieces | None = None) -> FastPath:
    """Enable the speed-ups that help for ``model`` on its device; return what was enabled, with one note per piece.

    Call after ``add_lora``; pass the result to ``forward_loss`` and ``train.batch_maker``. ``training_config`` is a
    TrainingConfig (or a dict of its keys ``fast_path``, ``torch_compile``, ``use_liger_kernel``); ``pieces`` turns
    single pieces off. Everything here keeps the plain path's semantics (loss and LoRA gradients equal within the
    dtype's tolerance) and falls back silently when a package or device is missing. See ``phitune.training.fast``.
    """
    return fast_path.apply(model, training_config, pieces)
