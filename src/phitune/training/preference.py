"""Preference losses on LoRA: DPO (sigmoid, ipo, hinge; optional RPO NLL term) and ORPO, with TRL's metrics.

The method changes the loss, not the loop: ``objective(tc, fast)`` gives ``train_step`` a forward that returns the
SUM of per-pair losses of a micro-batch (``PairOutput.loss_sum``) and counts pairs as the step's units, so gradient
accumulation divides by the pairs of the whole step, as SFT divides by its supervised tokens.

A micro-batch holds the rows chosen 0, rejected 0, chosen 1, ... (``data.preference.pair_plan``) and is run in one
forward. A side's log-prob is the sum of its reply tokens' log-probs, read from lm_head over the reply positions only,
in checkpointed chunks (no (B, T, V) logits). DPO's reference policy is the same model with its adapters off
(``phitune.lora.disable_adapters``): one no-grad forward per micro-batch, or once for all pairs before training
(``precompute_ref_log_probs``; the batch then carries them as ``ref_logps``).

Where TRL (1.16, the version the tests compare with) and the papers differ, phitune follows TRL:
- IPO divides each side's log-ratio by its reply tokens before the squared loss (TRL: "confirmed with the IPO
  authors"); the paper's Eq. 17 uses sums.
- ORPO's log-probs are per-token averages, and its NLL term covers the whole chosen sequence (prompt and reply, every
  non-padding token after the first), as TRL's ORPOTrainer computes it; the paper puts the NLL on the reply alone.
Two keys TRL 1.16 no longer has keep the meaning they had in TRL's DPOTrainer before its refactor:
- ``rpo_alpha``: adds alpha x the token-mean NLL of the chosen replies (TRL 1.16: loss_type [sigmoid, sft] with
  loss_weights [1, alpha]: the same number, checked by the tests);
- ``label_smoothing`` on the sigmoid loss: conservative DPO, -(1-e) logsig(b d) - e logsig(-b d) (TRL 1.16's sigmoid
  ignores it; its "robust" loss is a different estimator; the tests check the number as TRL 1.16's weighted sum
  2(1-e) x sigmoid - (1-2e) x robust, which equals it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import distributed
from ..data.labels import IGNORE_INDEX
from ..data.preference import pair_plan
from ..lora import disable_adapters
from .fast import FastPath, attention
from .fast.cross_entropy import decoder_of, default_chunk, head_is_plain, logits_dtype
from .step import batch_maker, to_device, without_labels

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


@dataclass
class PairOutput:
    """A micro-batch's summed per-pair loss, its pair count, and the sums over pairs of the METRICS (and
    ``preference_accuracy``: chosen's log-prob above rejected's; ORPO adds ``nll_loss``)."""

    loss_sum: torch.Tensor
    n_pairs: torch.Tensor
    sums: dict[str, torch.Tensor] = field(default_factory=dict)


def count_pairs(batch: dict) -> int:
    """Pairs of a micro-batch that carry a loss (both sides have reply tokens): the units of a preference step."""
    n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)
    return int(((n[0::2] > 0) & (n[1::2] > 0)).sum())


# --- log-probs --------------------------------------------------------------------------------------------------------


def _chunked_token_logps(rows: torch.Tensor, head, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """log p(target) of each row of hidden states through ``head``; one chunk's logits alive at a time, recomputed
    in backward (checkpoint), so memory is O(chunk x V), not O(tokens x V)."""

    def piece(h, t):
        return -F.cross_entropy(head(h).float(), t, reduction="none")

    out = []
    for start in range(0, rows.shape[0], chunk):
        h, t = rows[start:start + chunk], targets[start:start + chunk]
        out.append(checkpoint(piece, h, t, use_reentrant=False) if torch.is_grad_enabled() else piece(h, t))
    return torch.cat(out) if out else rows.new_zeros(0, dtype=torch.float32)


def token_logps(model, batch: dict, positions: torch.Tensor, fast: FastPath | None = None) -> torch.Tensor:
    """(R, T) float32: log p(input_ids[:, t+1] | ...) at ``positions`` (bool, (R, T)), 0 elsewhere. With the fast
    path's fused loss only those positions go through lm_head; otherwise from ``model(...).logits``."""
    fast = fast or FastPath()
    inputs = attention.model_inputs(model, batch, drop_redundant_mask=fast.position_masks)
    targets = F.pad(batch["input_ids"][:, 1:], (0, 1), value=0)
    head = model.get_output_embeddings() if fast.fused_loss and hasattr(model, "get_output_embeddings") else None
    body = decoder_of(model) if head is not None else None
    if body is None or not head_is_plain(model, head):
        logits = model(**inputs).logits.float()
        picked = torch.gather(logits.log_softmax(-1), -1, targets.unsqueeze(-1)).squeeze(-1)
        return picked * positions
    hidden = body(**inputs).last_hidden_state
    idx = positions.reshape(-1).nonzero().squeeze(1)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)
    picked = _chunked_token_logps(rows, head, targets.reshape(-1).index_select(0, idx),
                                  default_chunk(head.weight.shape[0], logits_dtype(rows), rows.device))
    flat = torch.zeros(positions.numel(), dtype=picked.dtype, device=picked.device)
    return flat.index_put((idx,), picked).reshape(positions.shape) + hidden.sum() * 0.0  # keeps an empty batch's graph


def reply_positions(batch: dict) -> torch.Tensor:
    """(R, T) bool: positions whose next token is a trained reply token (labels are unshifted)."""
    return F.pad(batch["labels"][:, 1:] != IGNORE_INDEX, (0, 1), value=False)


def reference_logps(model, batch: dict, fast: FastPath | None = None) -> torch.Tensor:
    """(R,) summed reply log-probs of the reference policy: the same model with its adapters off, no gradient."""
    if "ref_logps" in batch:
        return batch["ref_logps"]
    mask = reply_positions(batch)
    with torch.no_grad(), disable_adapters(model):
        return token_logps(model, batch, mask, fast).sum(1)


# --- losses (pure functions over per-pair log-probs; the tests compare them with TRL's) ------------------------------


def dpo_losses(chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected, *, beta: float,
               loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """(per-pair losses, chosen rewards, rejected rewards) of DPO from summed reply log-probs and reply lengths."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":  # per-token log-ratios: TRL's normalisation (see the module docstring)
        per_token = chosen_ratio / n_chosen.clamp(min=1) - rejected_ratio / n_rejected.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type {loss_type!r}: use sigmoid, ipo or hinge")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -log 2 (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_losses(chosen_mean, rejected_mean, *, beta: float):
    """(per-pair odds-ratio losses, chosen rewards, rejected rewards) of ORPO from per-token mean log-probs; the
    loss is -beta x log sigmoid(log odds(chosen) - log odds(rejected)), to which the NLL term is added."""
    log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
    return -beta * F.logsigmoid(log_odds), beta * chosen_mean.detach(), beta * rejected_mean.detach()


# --- the objective ----------------------------------------------------------------------------------------------------


def pair_loss(model, batch: dict, *, tc, fast: FastPath | None = None) -> PairOutput:
    """The preference loss of one micro-batch (rows chosen, rejected, chosen, ...), summed over its pairs."""
    reply = reply_positions(batch)
    nll_mask = None
    if tc.method == "orpo":  # TRL's ORPO NLL: every non-padding target of the chosen rows (see module docstring)
        real = batch.get("attention_mask")
        real = real.bool() if real is not None and real.dim() == 2 else torch.ones_like(reply)
        nll_mask = F.pad(real[:, 1:], (0, 1), value=False)
        nll_mask[1::2] = False
    elif tc.rpo_alpha is not None:
        nll_mask = reply.clone()
        nll_mask[1::2] = False
    positions = reply if nll_mask is None else reply | nll_mask
    lp = token_logps(model, batch, positions, fast)
    sums, counts = (lp * reply).sum(1), reply.sum(1)
    chosen, rejected, n_chosen, n_rejected = sums[0::2], sums[1::2], counts[0::2], counts[1::2]
    valid = ((n_chosen > 0) & (n_rejected > 0)).float()
    n_pairs = valid.sum()
    if tc.method == "orpo":
        chosen, rejected = chosen / n_chosen.clamp(min=1), rejected / n_rejected.clamp(min=1)
        losses, chosen_rewards, rejected_rewards = orpo_losses(chosen, rejected, beta=tc.beta)
    else:
        ref = reference_logps(model, batch, fast).to(sums.dtype)
        losses, chosen_rewards, rejected_rewards = dpo_losses(
            chosen, rejected, ref[0::2], ref[1::2], n_chosen, n_rejected, beta=tc.beta, loss_type=tc.loss_type,
            label_smoothing=tc.label_smoothing)
    loss_sum = (losses * valid).sum()
    out_sums = _metric_sums(chosen_rewards, rejected_rewards, chosen.detach(), rejected.detach(), valid)
    if nll_mask is not None:
        # TRL takes the token mean over the micro-batch; times its pairs, so the step's division by pairs gives it
        nll = -(lp * nll_mask).sum() / nll_mask.sum().clamp(min=1)
        weight = 1.0 if tc.method == "orpo" else tc.rpo_alpha
        loss_sum = loss_sum + weight * nll * n_pairs
        out_sums["nll_loss"] = nll.detach() * n_pairs
    return PairOutput(loss_sum, n_pairs.long(), out_sums)


def _metric_sums(chosen_rewards, rejected_rewards, chosen, rejected, valid) -> dict[str, torch.Tensor]:
    values = {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
              "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
              "rewards/margins": chosen_rewards - rejected_rewards, "logps/chosen": chosen,
              "logps/rejected": rejected, "preference_accuracy": (chosen > rejected).float()}
    return {k: (v.float() * valid).sum().detach() for k, v in values.items()}


def objective(tc, fast: FastPath | None = None):
    """``(forward, units)`` for ``step.train_step``: the method's loss and what the step divides it by."""

    def forward(model, batch):
        return pair_loss(model, batch, tc=tc, fast=fast)

    return forward, count_pairs


# --- batches, reference table, evaluation -----------------------------------------------------------------------------


def pair_batch_maker(model, tokenizer, data_cfg, fast: FastPath | None = None, reference: np.ndarray | None = None):
    """``make(samples, entry) -> batch`` for rows of pairs (never packed), with the precomputed reference log-probs
    of its rows as ``ref_logps`` when ``reference`` (one value per sample) is given."""
    make = batch_maker(model, tokenizer, dataclasses.replace(data_cfg, packing=False), fast)

    def make_pairs(samples, entry):
        batch = make(samples, entry)
        if reference is not None:
            rows = [i for row in entry for i in row]
            batch["ref_logps"] = torch.from_numpy(reference[rows].astype(np.float32))
        return batch

    return make_pairs


def pair_sharder():
    """``part(entry) -> this process's rows``: whole pairs, the r-th contiguous block of the entry's pairs."""
    world = distributed.world_size()
    if world == 1:
        return list

    def part(entry) -> list:
        pairs = [entry[k:k + 2] for k in range(0, len(entry), 2)]
        return [row for pair in distributed.split_evenly(pairs, distributed.rank(), world) for row in pair]

    return part


@torch.no_grad()
def reference_table(model, samples, data_cfg, batch_size: int, tokenizer=None, fast: FastPath | None = None
                    ) -> np.ndarray:
    """Summed reply log-probs of every sample under the reference policy (adapters off), float64, by sample index:
    what ``precompute_ref_log_probs`` computes once before training (each process computes all of them)."""
    make = pair_batch_maker(model, tokenizer, data_cfg, fast)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = np.zeros(len(samples), dtype=np.float64)
    for entry in pair_plan(samples, batch_size, data_cfg.seed, 0):
        batch = to_device(make(samples, entry), device)
        out[[i for row in entry for i in row]] = reference_logps(model, batch, fast).double().cpu().numpy()
    model.train(was_training)
    return out


@torch.no_grad()
def evaluate_pairs(model, samples, data_cfg, batch_size: int, tc, *, tokenizer=None, fast: FastPath | None = None,
                   reference: np.ndarray | None = None) -> dict[str, float]:
    """eval_loss (per pair) and the METRICS over the eval pairs (``eval_rewards/chosen``, ...), plus
    ``eval_preference_accuracy``: the share of pairs whose chosen reply has the higher log-prob."""
    make = pair_batch_maker(model, tokenizer, data_cfg, fast, reference)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    plan = pair_plan(samples, batch_size, data_cfg.seed, 0)
    loss_sum, n_pairs, sums = 0.0, 0, {}
    for entry in distributed.striped(plan):  # under torchrun: every world_size-th entry; None keeps in step
        batch = make(samples, entry) if entry is not None else without_labels(make(samples, plan[0]))
        out = pair_loss(model, to_device(batch, device), tc=tc, fast=fast)
        loss_sum += float(out.loss_sum)
        n_pairs += int(out.n_pairs)
        for k, v in out.sums.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    if distributed.active():
        keys = sorted(sums)
        loss_sum, n_pairs, *values = distributed.sum_floats(loss_sum, n_pairs, *(sums[k] for k in keys))
        sums = dict(zip(keys, values))
    model.train(was_training)
    n = max(int(n_pairs), 1)
    return {"eval_loss": loss_sum / n, **{f"eval_{k}": v / n for k, v in sums.items()}, "eval_pairs": int(n_pairs)}
