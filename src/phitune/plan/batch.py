"""The micro-batch a plan simulates: by default the worst case of the config (every row full), with ``--data`` the
largest one the run's prepared training data really makes (``longest_batch``)."""

from __future__ import annotations

from ..config import RunConfig
from ..data import batch_plan


def _length(sample) -> int:
    return len(sample["input_ids"])


def longest_batch(samples, cfg: RunConfig) -> tuple[list[dict], list[list[int]], dict]:
    """(the samples of the largest micro-batch of epoch 0, its rows as indices into them, what it holds).

    Largest = the most positions after padding (rows x the longest row): what the activations scale with; ties go to
    the one with more real tokens. The batch plan is the one ``phitune train`` builds (same seed and packing)."""
    tc, dc = cfg.training_config, cfg.data
    plan = batch_plan(samples, tc.per_device_train_batch_size, dc.max_seq_length, dc.packing, dc.seed, 0)

    def size(entry):
        rows = [sum(_length(samples[i]) for i in row) for row in entry]
        return len(rows) * min(max(rows), dc.max_seq_length), sum(rows)

    entry = max(plan, key=size)
    used = sorted({i for row in entry for i in row})
    where = {i: k for k, i in enumerate(used)}
    chosen = [{"input_ids": [int(t) for t in samples[i]["input_ids"]],
               "labels": [int(t) for t in samples[i]["labels"]]} for i in used]
    padded, real = size(entry)
    return chosen, [[where[i] for i in row] for row in entry], {
        "batches_in_epoch": len(plan), "rows": len(entry), "samples": len(used), "padded_tokens": padded,
        "real_tokens": real}
