"""Micro-batches: which samples go together, row by row (batch_plan), and the tensors the model gets (collate).

Packing puts several samples in one row. Position ids restart at each sample, and with ``sdpa``/``eager`` the
attention mask is 4-D (B, 1, T, T) block-diagonal causal: transformers 5 passes a 4-D mask to the attention kernel
unchanged (``masking_utils._preprocess_mask_arguments`` returns early), so no token sees another sample. ``sdpa``
gets a bool mask (True = may attend); ``eager`` adds the mask to the attention scores, so it gets an additive float
mask (0 / dtype min). ``flash_attention_*`` and ``flex_attention`` get no mask: transformers derives the sample
boundaries from the restarting position ids (FA2 varlen; flex only when the forward runs with ``use_cache=False``).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import DataError
from .labels import IGNORE_INDEX

_OPEN_BINS = 128  # best-fit looks at this many open rows; more barely improves the fill (measured: <0.5%)


def _lengths(samples) -> np.ndarray:
    if hasattr(samples, "lengths"):
        return np.asarray(samples.lengths, dtype=np.int64)
    return np.array([len(s["input_ids"]) for s in samples], dtype=np.int64)


def _arrays(samples, i: int) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(samples, "arrays"):
        return samples.arrays(i)
    s = samples[i]
    return np.asarray(s["input_ids"], dtype=np.int64), np.asarray(s["labels"], dtype=np.int64)


def pack_rows(lengths: Sequence[int], max_seq_length: int) -> list[list[int]]:
    """Next-fit: positions (into ``lengths``) grouped into rows of at most max_seq_length tokens, in order."""
    rows: list[list[int]] = []
    used = max_seq_length + 1
    for k, n in enumerate(lengths):
        if n > max_seq_length:
            raise DataError(f"a sample has {n} tokens, more than max_seq_length={max_seq_length}. Fix: prepare the "
                            "data with the same data.max_seq_length the batches use")
        if used + n > max_seq_length:
            rows.append([])
            used = 0
        rows[-1].append(k)
        used += n
    return rows


def _best_fit(order: np.ndarray, lengths: np.ndarray, max_seq_length: int, keep: bool):
    """Best-fit packing (see pack_bins): the rows' sample lists when ``keep``, else only how many rows."""
    bins: list[list[int]] = []
    n_rows = 0
    open_: list[tuple[int, int, int]] = []  # (free tokens, row index = order opened, row index), sorted
    lens = np.asarray(lengths, dtype=np.int64)[np.asarray(order, dtype=np.int64)].tolist()
    for i, n in zip(np.asarray(order).tolist(), lens):
        j = bisect_left(open_, (n, -1, -1))
        if j < len(open_):
            free, seq, b = open_.pop(j)
            if keep:
                bins[b].append(i)
            insort(open_, (free - n, seq, b))
            continue
        if len(open_) >= _OPEN_BINS:  # close the fullest open row
            del open_[0]
        if keep:
            bins.append([i])
        insort(open_, (max_seq_length - n, n_rows, n_rows))
        n_rows += 1
    return bins if keep else n_rows


def pack_bins(order: np.ndarray, lengths: np.ndarray, max_seq_length: int) -> list[list[int]]:
    """Best-fit packing of samples (in ``order``) into rows, looking at the most recent open rows.

    A sample goes to the open row with the least free room that still fits it (ties: the row opened first), else
    to a new row; at ``_OPEN_BINS`` open rows, the fullest (ties: opened first) is closed before a new one opens.
    The open rows are kept as a sorted list of (free, opened, row), so each choice is a bisect, not a scan."""
    return _best_fit(order, lengths, max_seq_length, keep=True)


def batch_plan(samples, batch_size: int, max_seq_length: int, packing: bool = True, seed: int = 0,
               epoch: int = 0) -> list[list[list[int]]]:
    """The micro-batches, deterministic in (seed, epoch): each a list of at most ``batch_size`` rows, each row the
    sample indices it holds (best-fit packing of at most ``max_seq_length`` tokens; one sample per row without
    packing). :func:`collate` and ``distributed.sharder`` take the rows as they are."""
    n = len(samples)
    if n == 0:
        return []
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    if not packing:
        return [[[i] for i in order[k:k + batch_size].tolist()] for k in range(0, n, batch_size)]
    lengths = _lengths(samples)
    rows = pack_bins(order, lengths, max_seq_length)
    ll = lengths.tolist()
    for row in rows:  # longest first: a fixed order within a row, whatever order best-fit filled it in
        row.sort(key=lambda i: -ll[i])
    plan = [rows[k:k + batch_size] for k in range(0, len(rows), batch_size)]
    perm = rng.permutation(len(plan))
    return [plan[p] for p in perm]


def packing_efficiency(samples, max_seq_length: int, seed: int = 0) -> dict:
    """Rows used by packing and the share of their tokens that are real (not padding)."""
    lengths = _lengths(samples)
    if len(lengths) == 0:
        return {"rows": 0, "efficiency": 0.0}
    order = np.random.default_rng([seed, 0]).permutation(len(lengths))
    rows = _best_fit(order, lengths, max_seq_length, keep=False)
    return {"rows": rows, "efficiency": float(lengths.sum() / (rows * max_seq_length))}


def _uses_4d_mask(attn_implementation: str | None) -> bool:
    impl = (attn_implementation or "sdpa").lower()
    # flash/flex and phitune's varlen kernel (phitune.training.fast.varlen) read sample boundaries from position_ids
    return not ("flash" in impl or "flex" in impl or "varlen" in impl)


def _entry_rows(plan_entry: Sequence, arrays: list, max_seq_length: int, packing: bool) -> list[list[int]]:
    """Rows as positions into ``arrays``: a plan entry's rows as they are, or a flat list of samples packed
    next-fit in order (one per row without packing)."""
    if plan_entry and isinstance(plan_entry[0], (list, tuple)):
        rows, k = [], 0
        for row in plan_entry:
            rows.append(list(range(k, k + len(row))))
            k += len(row)
    elif packing:
        return pack_rows([len(a[0]) for a in arrays], max_seq_length)
    else:
        rows = [[k] for k in range(len(arrays))]
    for row in rows:
        n = sum(len(arrays[k][0]) for k in row)
        if n > max_seq_length or (len(row) > 1 and not packing):
            raise DataError(f"a row of {n} tokens ({len(row)} samples) does not fit max_seq_length={max_seq_length}"
                            f"{'' if packing else ' without packing'}. Fix: batch with the batch_plan of the same "
                            "data.max_seq_length and data.packing the data was prepared with")
    return rows


def collate(samples, plan_entry: Sequence, max_seq_length: int, packing: bool = True,
            attn_implementation: str | None = "sdpa", *, pad_token_id: int | None = None,
            mask_dtype: torch.dtype = torch.float32, sliding_window: int | None = None,
            position_masks: bool = False) -> dict[str, Any]:
    """Tensors for one micro-batch: input_ids, labels (unshifted, -100 = no loss), position_ids, attention_mask.

    ``plan_entry``: rows of sample indices (an entry of :func:`batch_plan`), or a flat list of sample indices
    (packed next-fit in order). Packed: position ids restarting per sample, the first token of each sample
    unlabelled, and a (B, 1, T, T) block-diagonal causal mask for sdpa (bool) / eager (additive, in ``mask_dtype``;
    pass the model's dtype), None for flash/flex attention. ``position_masks=True`` (the model's attention derives
    sample boundaries from position_ids, ``phitune.training.fast.attention.position_masks``) builds no dense mask
    either,
    except for rows longer than ``sliding_window`` (Phi-3-mini: 2047), which position_ids cannot express; the
    window is added to the 4-D mask, which transformers would otherwise skip for custom masks.
    Not packed: right padding to the longest sample, a (B, T) padding mask.
    """
    if pad_token_id is None:
        pad_token_id = getattr(samples, "pad_token_id", 0) or 0
    flat = [i for row in plan_entry for i in row] if plan_entry and isinstance(plan_entry[0], (list, tuple)) \
        else plan_entry
    arrays = [_arrays(samples, int(i)) for i in flat]
    if not arrays:
        raise DataError("collate: empty plan entry")
    rows = _entry_rows(plan_entry, arrays, max_seq_length, packing)
    B = len(rows)
    T = max(sum(len(arrays[k][0]) for k in row) for row in rows)
    input_ids = np.full((B, T), pad_token_id, dtype=np.int64)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((B, T), dtype=np.int64)
    segment = np.full((B, T), -1, dtype=np.int64)
    for b, row in enumerate(rows):
        t = 0
        for s, k in enumerate(row):
            ids, lab = arrays[k]
            n = len(ids)
            input_ids[b, t:t + n] = ids
            labels[b, t:t + n] = lab
            labels[b, t] = IGNORE_INDEX  # no label crosses a sample boundary
            position_ids[b, t:t + n] = np.arange(n)
            segment[b, t:t + n] = s
            t += n
        position_ids[b, t:] = np.arange(T - t)  # padding: its own segment, so no row of the mask is empty
    out = {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
    }
    if not packing:
        out["attention_mask"] = torch.from_numpy((segment >= 0).astype(np.int64))
        return out
    windowed = sliding_window is not None and T > sliding_window
    if not _uses_4d_mask(attn_implementation) or (position_masks and not windowed):
        out["attention_mask"] = None
        return out
    seg = torch.from_numpy(segment)
    allowed = (seg[:, :, None] == seg[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    if sliding_window is not None:
        q = torch.arange(T)
        allowed &= (q[None, :] > q[:, None] - sliding_window)
    allowed = allowed[:, None, :, :]
    if (attn_implementation or "sdpa").lower() == "eager":
        mask = torch.zeros(allowed.shape, dtype=mask_dtype)
        mask.masked_fill_(~allowed, torch.finfo(mask_dtype).min)
        out["attention_mask"] = mask
    else:
        out["attention_mask"] = allowed
    return out
