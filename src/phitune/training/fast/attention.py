"""Attention for packed batches: let the attention kernel see sample boundaries instead of a dense 4-D mask.

``phitune.data.collate`` marks packed samples twice: ``position_ids`` restart at 0 for every sample, and (for sdpa or
eager) a dense (B, 1, T, T) block-diagonal causal mask. A dense mask costs T^2 memory per row and forces every kernel
to visit every (query, key) tile. Transformers (>= 5) recovers the same boundaries from ``position_ids`` when no mask
is given (``masking_utils.find_packed_sequence_indices``), and then:
  - sdpa without packing: no mask at all, so the kernel's causal path (half the tiles) runs;
  - flash_attention_2/3: variable-length kernels over the concatenated samples (no padding, no cross-sample tiles);
  - flex_attention: a block mask that skips every tile outside a sample.
So ``position_masks`` tells the batch maker (once per model) when no dense mask is needed, and ``choose`` picks the
fastest packed-aware implementation available on the model's device.
"""

from __future__ import annotations

import importlib.util

import torch

from . import varlen

# Implementations whose transformers mask builder (or kernel) derives sample boundaries from position_ids.
_POSITION_AWARE = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention", "phitune_varlen")


def implementation(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) id of the packed sample each position belongs to: a new sample wherever positions do not step by +1."""
    step = torch.diff(position_ids, dim=-1, prepend=position_ids[:, :1] - 1)
    return (step != 1).cumsum(-1)


def mask_matches_positions(mask: torch.Tensor, position_ids: torch.Tensor) -> bool:
    """True when a 4-D mask is exactly the block-diagonal causal mask that ``position_ids`` imply."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] != mask.shape[-2]:
        return False
    allowed = mask if mask.dtype == torch.bool else mask == 0
    seg = segment_ids(position_ids.to(mask.device))
    T = seg.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril_()
    expected = (seg[:, :, None] == seg[:, None, :]) & causal
    return bool(torch.equal(allowed[:, 0], expected.expand(allowed.shape[0], T, T)))


def position_masks(model, enabled: bool = True) -> bool:
    """Whether packed batches for ``model`` can go without a dense 4-D mask (decided once per model): its attention
    implementation derives sample boundaries from position_ids, and ``enabled`` (``FastPath.position_masks``)."""
    return enabled and implementation(model) in _POSITION_AWARE


def model_inputs(model, batch: dict, drop_redundant_mask: bool = True) -> dict:
    """The keyword arguments for the model (or its body) from a collated batch.

    phitune's own batches carry a dense 4-D mask only where one is needed (``position_masks``). A 4-D mask built
    elsewhere that says exactly what position_ids say is dropped (``drop_redundant_mask``), which costs one
    O(B * T^2) comparison per batch."""
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    position_ids = batch.get("position_ids")
    mask = batch.get("attention_mask")
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    if mask is not None and mask.dim() == 4 and position_ids is not None:
        if drop_redundant_mask and position_masks(model) and mask_matches_positions(mask, position_ids):
            mask = None
    if mask is not None and mask.dim() == 2 and bool(mask.all()):
        mask = None  # no padding: let sdpa take its causal path
    if implementation(model) == varlen.NAME and position_ids is not None:
        if mask is not None and mask.dim() == 2:
            mask = None  # right padding restarts position_ids, so padding is a sample of its own
        if mask is None:
            cu, longest = varlen.boundaries(position_ids)
            inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    if mask is not None:
        inputs["attention_mask"] = mask
    return inputs


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flex_attention_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def choose(model, device: torch.device) -> str | None:
    """The packed-aware attention implementation to switch to on ``device``, or None to keep the current one.

    On CUDA with half precision: PyTorch's own FlashAttention varlen (``varlen.NAME``, torch >= 2.9), else
    flash_attention_2 when flash-attn is installed; otherwise sdpa stays (flex attention would need a compile per
    shape; pass it as attn_implementation to use it). On CPU sdpa stays: its flash kernel takes the causal path once
    the dense mask is dropped.
    """
    if device.type not in ("cuda", "meta"):  # meta: phitune plan's stand-in for CUDA under a 4-bit base
        return None
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    if varlen.available(device):
        varlen.register()
        return varlen.NAME
    if flash_attn_available():
        return "flash_attention_2"
    return None


def switch(model, name: str) -> bool:
    """Switch the model's attention implementation in place; False (model unchanged) if transformers refuses."""
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        return False
    before = implementation(model)
    try:
        setter(name)
    except (ImportError, ValueError, RuntimeError, NotImplementedError):
        if before is not None and implementation(model) != before:
            setter(before)
        return False
    return implementation(model) == name
