"""Folding adapters into base weights: ``merge_lora`` (in place, float32 math, one cast) and the checked variants.

A LoRA layer on 4-bit weights is never merged in place (``lora.quantized.MERGE_REFUSED`` says why and what to do);
``merge_checked`` merges such a model in 16/32-bit, on the dequantized base or a full-precision reload.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .. import lora
from ..errors import AdapterError
from ..lora import quantized as qlora
from .inject import clear_lora_state, lora_modules

log = logging.getLogger("phitune")


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (float32 math, one cast) and leave plain nn.Linear / nn.Embedding.

    Safe to call on a model that is already merged or has no LoRA (no-op). Returns the same model object.
    Refuses (AdapterError) a model whose LoRA sits on 4-bit weights: see :func:`merge_checked`.
    """
    _refuse_4bit(model)
    for name, m in lora_modules(model):
        if m.merged:
            m.unmerge()  # restores the base weight bit-exactly, then fold again in float32 below
        weight = nn.Parameter((m.weight.float() + m.delta_weight()).to(m.weight.dtype),
                              requires_grad=m.weight.requires_grad)
        if isinstance(m, lora.Embedding):
            plain = nn.Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx, max_norm=m.max_norm,
                                 norm_type=m.norm_type, scale_grad_by_freq=m.scale_grad_by_freq, sparse=m.sparse,
                                 device="meta")
        else:
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            if m.bias is not None:
                plain.bias = m.bias
        plain.weight = weight
        model.set_submodule(name, plain)
    clear_lora_state(model)
    return model


def _refuse_4bit(model: nn.Module) -> None:
    quantized = [n for n, m in lora_modules(model) if isinstance(m, qlora.Linear4bit)]
    if quantized:
        raise AdapterError(f"{quantized[0]}: {qlora.MERGE_REFUSED}")


@torch.no_grad()
def merge_lora_checked(model: nn.Module, input_ids: torch.Tensor) -> tuple[nn.Module, float]:
    """:func:`merge_lora`, plus the max absolute logit difference before vs after on ``input_ids``."""
    _refuse_4bit(model)
    was_training = model.training
    model.eval()
    before = model(input_ids=input_ids).logits.float()
    merge_lora(model)
    diff = (model(input_ids=input_ids).logits.float() - before).abs().max().item()
    model.train(was_training)
    return model, diff


def merge_checked(model, input_ids, *, dtype=None, full_precision=None):
    """Merge an adapter model (``merge_lora_checked`` for a 16/32-bit base) and return
    ``(merged_model, max_abs_logit_diff)``, the difference measured against the adapter model as given.

    For a 4-bit base the merge happens in ``dtype`` (a torch dtype or its name): by default on the NF4/FP4 weights
    dequantized, so the merged model computes what was trained; ``full_precision``, a callable returning the base
    reloaded from its original weights with ``model``'s adapter on it (``phitune.runs.merge.merge(dequantize=False)``),
    merges there instead (what most tools do; the difference then includes the quantization error the adapter was
    trained around). A LoRA layer on 4-bit weights is never merged in place.
    """
    if not qlora.is_quantized(model):
        return merge_lora_checked(model, input_ids)
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else getattr(torch, dtype)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        before = model(input_ids=input_ids).logits.float()
    if full_precision is None:
        merged = qlora.dequantize_model(model, dtype)
    else:
        merged = full_precision()
        del model
    merge_lora(merged)
    merged.eval()
    with torch.no_grad():
        diff = (merged(input_ids=input_ids.to(next(merged.parameters()).device)).logits.float().to(before.device)
                - before).abs().max().item()
    merged.train(was_training)
    log.info("merged into a %s base (%s): max |logit difference| vs the adapter on the 4-bit base %.3g",
             str(next(merged.parameters()).dtype).replace("torch.", ""),
             "dequantized from 4-bit" if full_precision is None else "original weights", diff)
    return merged, diff
