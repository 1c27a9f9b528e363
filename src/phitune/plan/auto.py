"""``per_device_train_batch_size: auto`` (and ``gradient_checkpointing: auto``): the largest micro-batch whose
predicted peak fits the GPU, chosen before any weight loads.

Peak memory grows linearly with the micro-batch (activations are per token; weights and optimizer state are not),
so the plan at 1 and 2 rows gives the line, the line the largest micro-batch that fits with the plan's margin, and
that size is planned to confirm it (with its neighbours, until the largest that fits is found). The effective batch
(rows per optimizer step per device) is ``auto_batch_target``, or the largest micro-batch that fits x
gradient_accumulation_steps; the chosen micro-batch divides it and ``gradient_accumulation_steps`` makes up the
rest. Without checkpointing is preferred whenever it reaches the same effective batch (recomputing costs about a
third of a step's compute).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from ..config import RunConfig
from ..errors import PhituneError
from .gpus import MARGIN_FRACTION, MARGIN_GIB, fits

MAX_ROWS = 256  # no micro-batch beyond this is tried: a step that large is never what memory limits


def with_batch(cfg: RunConfig, rows: int, checkpointing: bool, accumulation: int | None = None) -> RunConfig:
    """``cfg`` with the micro-batch, checkpointing and (if given) accumulation decided."""
    tc = cfg.training_config
    changes = {"per_device_train_batch_size": rows, "gradient_checkpointing": checkpointing,
               "auto_batch_target": None}
    if accumulation is not None:
        changes["gradient_accumulation_steps"] = accumulation
    return dataclasses.replace(cfg, training_config=dataclasses.replace(tc, **changes))


def largest_fitting(cfg: RunConfig, checkpointing: bool, memory_gib: float, peak_gib: Callable[[RunConfig], float],
                    cap: int) -> tuple[int, float]:
    """(largest micro-batch <= ``cap`` that fits, its predicted peak); (0, peak at 1 row) when none does."""
    one = peak_gib(with_batch(cfg, 1, checkpointing))
    if not fits(one, memory_gib)[0] or cap == 1:
        return (1, one) if fits(one, memory_gib)[0] else (0, one)
    two = peak_gib(with_batch(cfg, 2, checkpointing))
    per_row = max(two - one, 1e-9)
    usable = (memory_gib - MARGIN_GIB) / (1 + MARGIN_FRACTION)
    if not fits(two, memory_gib)[0]:
        return 1, one
    rows = max(2, min(cap, int((usable - one) / per_row) + 1))
    peaks = {1: one, 2: two}

    def peak_at(n: int) -> float:
        if n not in peaks:
            peaks[n] = peak_gib(with_batch(cfg, n, checkpointing))
        return peaks[n]

    # the line is close but not exact (a step's peak moment can move with the batch): walk down to a fitting
    # size, then up while the next one fits
    while rows > 2 and not fits(peak_at(rows), memory_gib)[0]:
        rows -= max(1, rows // 8)
    for _ in range(8):
        if rows >= cap or not fits(peak_at(rows + 1), memory_gib)[0]:
            break
        rows += 1
    return rows, peak_at(rows)


def choose(cfg: RunConfig, memory_gib: float, peak_gib: Callable[[RunConfig], float]) -> tuple[RunConfig, dict]:
    """(the config with micro-batch, checkpointing and accumulation decided, the choice as data) for a GPU of
    ``memory_gib``; ``peak_gib(cfg)`` is the predicted peak of a config (``phitune.plan``)."""
    tc = cfg.training_config
    options = [False, True] if tc.gradient_checkpointing == "auto" else [bool(tc.gradient_checkpointing)]
    cap = min(tc.auto_batch_target or MAX_ROWS, MAX_ROWS)
    found = {ckpt: largest_fitting(cfg, ckpt, memory_gib, peak_gib, cap) for ckpt in options}
    if all(rows == 0 for rows, _ in found.values()):
        smallest = min(peak for _, peak in found.values())
        raise PhituneError(
            f"training_config.per_device_train_batch_size: auto: even one row of {cfg.data.max_seq_length} tokens "
            f"needs {smallest:.1f} GiB (predicted, + the margin) on this {memory_gib:.1f} GiB GPU"
            f"{'' if True in found else '; try gradient_checkpointing: auto'}, or a shorter data.max_seq_length, "
            "model.load_in_4bit: true, or FSDP over several GPUs")
    target = tc.auto_batch_target or max(rows for rows, _ in found.values()) * tc.gradient_accumulation_steps
    for ckpt in options:
        limit, peak = found[ckpt]
        if limit == 0:
            continue
        rows = max(d for d in range(1, limit + 1) if target % d == 0)
        if rows != limit:
            peak = peak_gib(with_batch(cfg, rows, ckpt))
        choice = {"per_device_train_batch_size": rows, "gradient_accumulation_steps": target // rows,
                  "gradient_checkpointing": ckpt, "predicted_peak_gib": round(peak, 2), "gpu_memory_gib":
                  round(memory_gib, 1), "rows_per_step": target}
        return with_batch(cfg, rows, ckpt, target // rows), choice
    raise AssertionError("unreachable: some option fits")
