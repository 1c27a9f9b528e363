"""Evaluation during training and by ``phitune eval``: loss, perplexity and token accuracy over supervised tokens
(``evaluate_samples``), and answers generated for a few eval prompts at each evaluation (``generation_probe``).
Generation-based scoring itself lives in ``phitune.evals``."""

from __future__ import annotations

import logging
import math

import torch

from . import distributed
from ..config import TrainingConfig
from ..data import batch_plan
from ..data.preference import ChosenReplies
from .fast import FastPath
from ..evals.generation import probe_prompts_record, training_probe
from ..evals.prompts import generation_samples, prompts_from_samples
from ..generation.generate import context_length
from .loss import forward_loss
from ..generation.stops import stop_token_ids
from .step import batch_maker, to_device, without_labels

log = logging.getLogger("phitune")


@torch.no_grad()
def evaluate_samples(model, samples, data_cfg, batch_size: int, *, tokenizer=None,
                     fast: FastPath | None = None) -> dict[str, float]:
    """Loss, perplexity and token accuracy over the supervised tokens of tokenized ``samples``."""
    make_batch = batch_maker(model, tokenizer, data_cfg, fast=fast)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, n_tokens, n_correct = 0.0, 0, 0
    plan = batch_plan(samples, batch_size, data_cfg.max_seq_length, data_cfg.packing, data_cfg.seed, 0)
    for entry in distributed.striped(plan):  # under torchrun: every world_size-th entry; None keeps in step
        batch = make_batch(samples, entry) if entry is not None else without_labels(make_batch(samples, plan[0]))
        out = forward_loss(model, to_device(batch, device), with_accuracy=True, fast=fast)
        loss_sum += float(out.loss_sum)
        n_tokens += int(out.n_tokens)
        n_correct += int(out.n_correct)
    if distributed.active():
        loss_sum, n_tokens, n_correct = distributed.sum_floats(loss_sum, n_tokens, n_correct)
        n_tokens, n_correct = int(n_tokens), int(n_correct)
    model.train(was_training)
    loss = loss_sum / max(n_tokens, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
            "eval_token_accuracy": n_correct / max(n_tokens, 1), "eval_tokens": n_tokens}


def generation_probe(model, tokenizer, prepared, data_cfg, tc: TrainingConfig):
    """``probe() -> dict``: with ``eval_generate: N``, greedy answers to the first N eval conversations and their
    scores (phitune.evals.generation.training_probe), the prompts added the first time; otherwise an empty dict. Every
    process generates (an FSDP-sharded model needs all of them in each forward); rank 0 logs. Preference data
    (``prepared.kind == "pairs"``): the prompts of the first N eval pairs, their chosen reply as the reference, as
    ``phitune eval --generate`` answers them."""
    if not tc.eval_generate:
        return dict
    if not prepared.eval:
        log.warning("training_config.eval_generate: there is no eval data to answer; set data.eval or "
                    "data.eval_split")
        return dict
    if prepared.kind == "pairs":  # rendered with the loss on the reply alone: the pair's chosen side is a chat sample
        samples = ChosenReplies(prepared.eval)
    else:
        with distributed.local_main_first():
            samples = generation_samples(prepared, data_cfg, tokenizer, "eval")
    stops, context = stop_token_ids(tokenizer, model=model), context_length(model, tokenizer)
    prompts, _ = prompts_from_samples(samples, tokenizer, stop_ids=stops, context=context,
                                      max_samples=tc.eval_generate)
    first = [True]

    def probe() -> dict:
        record = training_probe(model, tokenizer, prompts, stop_ids=stops, context=context,
                                batch_size=tc.per_device_eval_batch_size)
        if first[0]:
            record.update(probe_prompts_record(prompts))
            first[0] = False
        return record

    return probe
