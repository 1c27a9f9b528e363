"""The training loss, computed without materialising the full (B, T, V) logits.

``forward_loss(model, batch)`` returns the SUM of token cross-entropies of ``logits[:, :-1]`` against
``labels[:, 1:]`` (labels are -100 where a token is not trained) and the number of supervised tokens, so the trainer
can divide by the supervised tokens of a whole optimizer step. ``apply_fast_path(model, training_config)`` turns on
the speed-ups of ``phitune.fast`` that help on the model's device; both are what ``train.py`` calls.

Why not ``model(...).logits``: for Phi-3 (V = 32,064) the float32 logits of one 4 x 2048 micro-batch are 1 GiB, and
the loss's log-softmax and its gradient add two more copies. Here the model body runs to hidden states, only the
positions that carry a label go through ``lm_head``, in chunks, and the gradient of each chunk is formed while its
logits are alive (``phitune.fast.cross_entropy``), so nothing of size (tokens, V) outlives a chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    """Sum of token cross-entropies, supervised token count, and (optionally) correctly predicted tokens."""

    loss_sum: torch.Tensor
    n_tokens: torch.Tensor
    n_correct: torch.Tensor | None = None

    def __iter__(self):  # allows ``loss_sum, n_tokens, n_correct = forward_loss(...)``
        return iter((self.loss_sum, self.n_tokens, self.n_correct))


def forward_loss(model, batch: dict, with_accuracy: bool = False, *, chunk_tokens: int | None = None,
                 fused_loss: bool | None = None) -> LossOutput:
    """Run ``model`` on ``batch`` and return the summed next-token cross-entropy over supervised tokens.

    ``batch`` holds ``input_ids`` and ``labels`` (B, T), and optionally ``position_ids`` and ``attention_mask``
    (as ``phitune.data.collate`` builds them). ``fused_loss=False`` forces the plain ``model(...).logits`` path
    (the reference the tests compare against); None follows ``apply_fast_path`` (on unless it was turned off).
    ``chunk_tokens`` overrides the number of positions per lm_head chunk.
    """
    if fused_loss is None:
        fused_loss = getattr(model, "_phitune_fused_loss", True)
    from .fast import attention, cross_entropy

    labels = batch["labels"]
    inputs = attention.model_inputs(model, batch)
    # labels[:, 1:] aligned with positions [:, :-1]; the last position of each row predicts nothing.
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)

    head = model.get_output_embeddings() if fused_loss and hasattr(model, "get_output_embeddings") else None
    body = cross_entropy.decoder_of(model) if head is not None else None
    if body is None or not cross_entropy.head_is_plain(model, head):
        logits = model(**inputs).logits
        return cross_entropy.loss_from_logits(logits, shifted, with_accuracy)

    hidden = body(**inputs).last_hidden_state
    return cross_entropy.head_loss(hidden, head, shifted, with_accuracy, chunk_tokens=chunk_tokens)


def apply_fast_path(model, training_config=None) -> list[str]:
    """Enable the speed-ups that help for ``model`` on its device; return one note per thing enabled.

    Call after ``add_lora``. Everything here keeps the plain path's semantics (loss and LoRA gradients equal within
    the dtype's tolerance) and falls back silently when a package or device is missing. See ``phitune.fast``.
    """
    from .fast import apply

    return apply(model, training_config)
