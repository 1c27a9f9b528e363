"""One optimizer step: a plan entry becomes this process's micro-batch (``batch_maker``, ``process_batch``), then
forward/backward over the step's micro-batches, clip, update (``train_step``)."""

from __future__ import annotations

import logging
import math

import torch

from . import distributed
from ..config import TrainingConfig
from ..data import collate
from .fast import FastPath
from .fast.attention import position_masks
from ..data.labels import IGNORE_INDEX

log = logging.getLogger("phitune")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def supervised_tokens(batch: dict) -> int:
    """Tokens that carry a loss: labels[:, 1:] != -100 (labels are unshifted)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _input_tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return batch["input_ids"].numel()


def train_step(model, batches: list[dict], optimizer, scheduler, scaler, tc: TrainingConfig, device, autocast,
               forward_loss, units=supervised_tokens) -> dict[str, float]:
    """Forward/backward every micro-batch, clip, step. Each micro-batch's summed loss is divided by the ``units``
    (supervised tokens; pairs for preference methods) of the WHOLE step, so the accumulated gradient equals that of
    one batch holding all of them. ``sums`` in the result: the step's sums of the metrics the forward reports
    (``out.sums``, e.g. rewards/chosen of training.preference), over all processes."""
    n_tokens, input_tokens = distributed.sum_ints(sum(units(b) for b in batches),
                                                  sum(_input_tokens(b) for b in batches))  # over all processes
    divisor = max(n_tokens, 1)
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    sums: dict[str, torch.Tensor] = {}
    for batch in batches:
        batch = to_device(batch, device)
        with autocast:
            out = forward_loss(model, batch)
        scaler.scale(out.loss_sum.float() / divisor).backward()
        loss_sum += out.loss_sum.detach().float()
        for key, value in getattr(out, "sums", {}).items():
            sums[key] = sums.get(key, 0.0) + value.detach().float()

    params = [p for g in optimizer.param_groups for p in g["params"]]
    distributed.sum_gradients(params)  # one all-reduce after accumulation (nothing in one process)
    distributed.sum_(loss_sum)
    for value in sums.values():
        distributed.sum_(value)
    scaler.unscale_(optimizer)
    max_norm = tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    lr = optimizer.param_groups[0]["lr"]
    loss = (loss_sum / divisor).item()
    grad_norm = float(grad_norm)
    if n_tokens == 0:  # cannot happen with packed data (samples without supervised tokens are dropped), but say so
        log.warning("an optimizer step had no supervised tokens in any of its micro-batches; its update was skipped")
    if math.isfinite(loss) and (math.isfinite(grad_norm) or scaler.is_enabled()) and n_tokens > 0:
        scaler.step(optimizer)  # with fp16 loss scaling, a step with overflowed gradients is skipped
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    if scaler.is_enabled() and not math.isfinite(grad_norm):
        grad_norm = 0.0  # an fp16 overflow that the scaler handled, not a divergence
    return {"loss": loss, "loss_sum": float(loss_sum), "tokens": n_tokens, "grad_norm": grad_norm, "lr": lr,
            "input_tokens": input_tokens, "sums": {k: float(v) for k, v in sums.items()}}


def process_batch(make_batch, samples, entry: list[int], part=list) -> dict:
    """This process's micro-batch of plan ``entry`` (``part``: phitune.training.distributed.sharder). An empty part
    (end of
    an epoch, more processes than rows) becomes a batch without labels: no loss, but the process still takes part
    in the step's collectives."""
    mine = part(entry)
    return make_batch(samples, mine) if mine else without_labels(make_batch(samples, entry[:1]))


def without_labels(batch: dict) -> dict:
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    return batch


def batch_maker(model, tokenizer, data_cfg, fast: FastPath | None = None):
    """``make(samples, plan_entry) -> batch`` with the model's attention kernel, mask dtype and sliding window.
    Whether packed rows need a dense 4-D mask is decided here, once per model (``fast``: what apply_fast_path
    turned on)."""
    attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
    kwargs = {"mask_dtype": model.dtype, "sliding_window": getattr(model.config, "sliding_window", None),
              "position_masks": position_masks(model, (fast or FastPath()).position_masks)}
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id

    def make(samples, entry):
        return collate(samples, entry, data_cfg.max_seq_length, data_cfg.packing, attn, **kwargs)

    return make
