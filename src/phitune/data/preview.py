"""What the model will see: samples with their trained tokens highlighted, and the data statistics."""

from __future__ import annotations

import io
import os
import sys

import numpy as np

from .labels import IGNORE_INDEX
from .render import DROP_REASONS


def _runs(labels: np.ndarray):
    """(start, end, trained) runs of consecutive tokens with the same trained status."""
    trained = labels != IGNORE_INDEX
    start = 0
    for i in range(1, len(trained) + 1):
        if i == len(trained) or trained[i] != trained[start]:
            yield start, i, bool(trained[start])
            start = i


def _want_color(color: bool | None) -> bool:
    if color is not None:
        return color
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def preview_text(prepared, tokenizer=None, n: int = 3, color: bool | None = None, split: str = "train",
                 max_tokens: int = 400) -> str:
    """N samples as text and as tokens; trained tokens are green (color) or wrapped in [[...]] (plain text)."""
    tokenizer = tokenizer or prepared.tokenizer
    samples = prepared.train if split == "train" else prepared.eval
    color = _want_color(color)
    if color:
        from rich.console import Console
        from rich.text import Text

        buf = io.StringIO()
        console = Console(file=buf, force_terminal=True, color_system="standard", width=120, soft_wrap=True)
    parts = []
    pairs = getattr(prepared, "kind", "chats") == "pairs"  # samples 2k, 2k+1: chosen and rejected of pair k
    for i in range(min(2 * n if pairs else n, len(samples))):
        ids, labels = samples.arrays(i)
        n_tr = int((labels != IGNORE_INDEX).sum())
        what = f"pair {i // 2}, {('chosen', 'rejected')[i % 2]}" if pairs else f"sample {i}"
        head = f"=== {split} {what}: {len(ids)} tokens, {n_tr} trained ==="
        pieces = [(tokenizer.decode(ids[a:b].tolist(), skip_special_tokens=False), tr) for a, b, tr in _runs(labels)]
        shown = ids[:max_tokens]
        toks = tokenizer.convert_ids_to_tokens(shown.tolist())
        tok_items = [(f"{t}({int(d)})", labels[k] != IGNORE_INDEX) for k, (t, d) in enumerate(zip(toks, shown))]
        more = f" ... (+{len(ids) - max_tokens} tokens)" if len(ids) > max_tokens else ""
        if color:
            console.print(Text(head, style="bold"))
            txt = Text()
            for s, tr in pieces:
                txt.append(s, style="bold green" if tr else "dim")
            console.print(txt)
            console.print(Text("--- tokens ---", style="bold"))
            tt = Text()
            for s, tr in tok_items:
                tt.append(s + " ", style="bold green" if tr else "dim")
            tt.append(more)
            console.print(tt)
            console.print()
        else:
            text = "".join(f"[[{s}]]" if tr else s for s, tr in pieces)
            tokens = " ".join(f"[[{s}]]" if tr else s for s, tr in tok_items) + more
            parts.append(f"{head}\n{text}\n--- tokens ---\n{tokens}\n")
    if color:
        return buf.getvalue()
    legend = "(trained tokens are shown as [[...]])\n"
    return legend + "\n".join(parts)


def sample_records(prepared, splits: tuple[str, ...] = ("train", "eval"), n: int | None = None):
    """Each sample as training sees it, one dict a sample: ``split``, ``index`` (in that split), ``source`` (its
    record: ``file:line``), ``input_ids`` and ``labels`` (-100 where no loss is taken), train first, then eval;
    ``n``: at most that many per split. What ``phitune preview --json`` prints, to diff against any other tool."""
    for split in splits:
        samples = prepared.train if split == "train" else prepared.eval
        if samples is None:
            continue
        for i, source in zip(range(len(samples) if n is None else min(n, len(samples))), samples.sources()):
            ids, labels = samples.arrays(i)
            yield {"split": split, "index": i, "source": source, "input_ids": ids.tolist(), "labels": labels.tolist()}


def data_warnings(split: str, s: dict, examples: int = 3) -> list[str]:
    """What the data preparation changed or left out in one split, in words: bad records skipped (by reason),
    samples truncated (which part) and dropped (why), with the max_seq_length that would fit them. Printed before
    training starts and by preview."""
    lines = []
    if s.get("bad_records"):
        reasons = ", ".join(f"{r}: {c}" for r, c in sorted(s["bad_by_reason"].items(), key=lambda x: -x[1]))
        lines.append(f"data.{split}: {s['bad_records']} bad record(s) skipped ({reasons})")
        lines += [f"  {m}" for m in s.get("bad_examples", [])[:examples]]
    fit = s.get("fit_max_seq_length") or {}
    unit = "pairs" if "pairs" in s else "samples"  # preference data counts cuts and drops per pair
    fits = f"max_seq_length {fit.get('95%')} fits 95% of the {unit} whole, {fit.get('100%')} all of them"
    n = s.get("pairs", s["samples"]) + sum((s.get("dropped") or {}).values())
    if s.get("truncated"):
        parts = ", ".join(f"{k} {v}" for k, v in (s.get("truncated_parts") or {}).items() if v)
        lines.append(f"data.{split}: {s['truncated']} of {n} {unit} truncated to fit max_seq_length ({unit} "
                     f"that lost: {parts}); {fits}")
    if s.get("dropped"):
        why = ", ".join(f"{DROP_REASONS.get(r, r)}: {c}" for r, c in s["dropped"].items())
        lines.append(f"data.{split}: {sum(s['dropped'].values())} of {n} {unit} dropped, not trained on ({why})"
                     + (f"; {fits}" if s.get("over_max_seq_length") else ""))
        lines += [f"  {m}" for m in s.get("dropped_examples", [])[:examples]]
    return lines


def format_stats(stats: dict) -> str:
    """The data statistics as a short human-readable report."""
    lines = []
    for split in ("train", "eval"):
        s = stats.get(split)
        if not s:
            continue
        pairs = f" = {s['pairs']} pairs (chosen + rejected)" if "pairs" in s else ""
        lines.append(f"{split}: {s['records']} records ({s['format']}), {s['samples']} samples{pairs}, "
                     f"{s['tokens']} tokens")
        lines.append(f"  supervised tokens: {s['supervised_tokens']} ({100 * s['supervised_share']:.1f}%)")
        p = s.get("length_percentiles") or {}
        if p:
            lines.append("  tokens per sample: " + ", ".join(
                f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in p.items()))
        lines += [f"  {line}" for line in data_warnings(split, s, examples=5)]
        if not s.get("truncated"):
            lines.append("  truncated: 0")
        if not s.get("dropped"):
            lines.append("  dropped: 0")
        if s.get("packing"):
            pk = s["packing"]
            lines.append(f"  packing: {pk['rows']} rows of {pk['max_seq_length']} tokens, "
                         f"{100 * pk['efficiency']:.1f}% filled")
    c = stats.get("cache") or {}
    if c:
        lines.append(f"cache: {'reused' if c.get('hit') else 'written'} {c.get('path', '')}")
    return "\n".join(lines)
