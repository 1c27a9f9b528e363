"""Did the fine-tune work? Answers generated for held-out conversations, scored against the reference answers.

For every eval conversation the prompt is every turn before its last assistant turn, exactly the tokens training
rendered (:mod:`phitune.evals.prompts`), and the model generates the turn through the one generation loop
(:func:`phitune.generation.loop.generate_batch`, batched: left-padded prompts, one KV cache)::

    prompts, skipped = prompts_from_samples(prepared.eval, tokenizer, stop_ids=stops, context=4096)
    result = evaluate_generation(model, tokenizer, prompts, stop_ids=stops, compare_base=True, out_dir="run/eval")
    result.summary["tuned"]["exact_match"], result.summary["base"]["rouge_l"]

Scores per sample (:mod:`phitune.evals.scores`, and their means): exact match, token F1, ROUGE-L, the answer's
length in tokens, and whether generation stopped on an end-of-turn id (rather than running into the token limit);
plus any custom metric. With ``compare_base`` the same prompts also go through the base model: the LoRA layers
switched off in the same model (:func:`phitune.lora.disable_adapters`), batch by batch, so an interrupted run has
both answers for every sample it wrote.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

from . import report
from ..errors import DataError
from ..generation.generate import context_length
from ..generation.loop import (Generation, GenerationSettings, generate_batch, generation_mode, pad_token_id,
                              seeded_generator)
from ..lora import disable_adapters
from .prompts import Prompt, Skipped, prompts_from_samples
from .scores import BUILTIN_SCORES, MetricFn, load_metric, primary_scores, score_answer, verdict

EVAL_DIR = "eval"
SAMPLES_FILE = "samples.jsonl"
REPORT_FILE = "report.html"


# --- the evaluation -----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GenerationResult:
    """What :func:`evaluate_generation` produced: ``summary`` (means per model, deltas, counts), ``samples`` (one
    dict per prompt done), and the files written (None when ``out_dir`` was not given)."""

    summary: dict[str, Any]
    samples: list[dict]
    samples_path: Path | None = None
    report_path: Path | None = None
    interrupted: bool = False


def _answer_record(tokenizer, gen: Generation, reference: str, metrics) -> dict:
    text = tokenizer.decode(gen.ids, skip_special_tokens=True).strip()
    return {"answer": text, **score_answer(text, reference, metrics), "answer_tokens": len(gen.ids),
            "stopped": gen.stopped}


# likelihood-based eval numbers the summary and report show next to the generation scores (preference runs: the
# share of eval pairs whose chosen reply the model finds more likely than the rejected one)
CARRIED_EVAL_METRICS = ("eval_loss", "eval_perplexity", "eval_preference_accuracy")


def summarize(samples: list[dict], *, compare_base: bool, metric_names: Sequence[str], skipped: Skipped,
              eval_metrics: dict | None = None, base_eval_metrics: dict | None = None) -> dict[str, Any]:
    """Means of every score per model, tuned minus base, better/worse/same counts, skipped prompts by reason."""
    keys = list(BUILTIN_SCORES) + list(metric_names) + ["answer_tokens", "stopped"]

    def means(which: str) -> dict[str, float]:
        rows = [s[which] for s in samples]
        return {k: (sum(float(r[k]) for r in rows) / len(rows) if rows else float("nan")) for k in keys}

    summary: dict[str, Any] = {"samples": len(samples), "skipped": skipped.total,
                               "skipped_by_reason": dict(skipped.counts), "tuned": means("tuned")}
    if eval_metrics:
        summary["tuned"].update({k: v for k, v in eval_metrics.items() if k in CARRIED_EVAL_METRICS})
    if compare_base:
        summary["base"] = means("base")
        if base_eval_metrics:
            summary["base"].update({k: v for k, v in base_eval_metrics.items() if k in CARRIED_EVAL_METRICS})
        summary["delta"] = {k: summary["tuned"][k] - summary["base"][k] for k in summary["tuned"]
                            if k in summary["base"]}
        summary["verdicts"] = dict(Counter(s["verdict"] for s in samples))
        for k in ("better", "worse", "same"):
            summary["verdicts"].setdefault(k, 0)
    return summary


def generate_answers(model, tokenizer, prompts: Sequence[Prompt], *, stop_ids: Sequence[int],
                     settings: GenerationSettings, batch_size: int, context: int | None = None,
                     compare_base: bool = False, progress: bool = True) -> Iterator[list[tuple[Prompt, Generation,
                                                                                                 Generation | None]]]:
    """``(prompt, tuned answer, base answer or None)`` batch by batch (longest prompts first, so a batch that does
    not fit in memory fails at once), with a progress bar showing samples/s and generated tokens/s."""
    from tqdm.auto import tqdm

    pad_id = pad_token_id(tokenizer, list(stop_ids))
    device = next(model.parameters()).device
    # Sampled eval answers are reproducible by default (seed 0): two evals of one run compare like for like.
    generator = seeded_generator(dataclasses.replace(settings, seed=settings.seed or 0), device)
    order = sorted(prompts, key=lambda p: -len(p.ids))
    bar = tqdm(total=len(order), disable=not progress, desc="generate", unit="sample", dynamic_ncols=True,
               file=sys.stderr)
    started, n_tokens = time.perf_counter(), 0
    try:
        with generation_mode(model):
            for at in range(0, len(order), batch_size):
                batch = order[at:at + batch_size]
                ids = [p.ids for p in batch]
                limits = [min(settings.max_new_tokens, context - len(i)) if context else settings.max_new_tokens
                          for i in ids]
                tuned = generate_batch(model, ids, stop_ids=stop_ids, pad_id=pad_id, max_new_tokens=limits,
                                       settings=settings, generator=generator)
                base: list = [None] * len(batch)
                if compare_base:
                    with disable_adapters(model):
                        base = generate_batch(model, ids, stop_ids=stop_ids, pad_id=pad_id, max_new_tokens=limits,
                                              settings=settings, generator=generator)
                n_tokens += sum(len(g.ids) + g.stopped for g in tuned + [b for b in base if b is not None])
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.update(len(batch))
                bar.set_postfix(samples_s=f"{bar.n / elapsed:.2f}", tokens_s=f"{n_tokens / elapsed:.0f}",
                                refresh=False)
                yield list(zip(batch, tuned, base))
    finally:
        bar.close()


def evaluate_generation(model, tokenizer, prompts: Sequence[Prompt], *, stop_ids: Sequence[int],
                        settings: GenerationSettings | None = None, batch_size: int = 8, context: int | None = None,
                        compare_base: bool = False, metrics: Sequence[str | MetricFn] = (),
                        skipped: Skipped | None = None, eval_metrics: dict | None = None,
                        base_eval_metrics: dict | None = None, out_dir: str | os.PathLike | None = None,
                        train_records: Sequence[dict] = (), title: str = "", progress: bool = True) -> GenerationResult:
    """Generate an answer to every prompt (and, with ``compare_base``, the base model's answer too), score each
    against its reference and, with ``out_dir``, write ``samples.jsonl`` and ``report.html`` there.

    Ctrl-C (KeyboardInterrupt) stops generation; the samples done so far are scored and written, then the
    interrupt is raised again. ``eval_metrics``/``base_eval_metrics`` (eval loss, perplexity) and
    ``train_records`` (metrics.jsonl, for the loss curve and the answers logged during training) go into the report.
    """
    settings = settings or GenerationSettings(greedy=True)
    named = [load_metric(m) for m in metrics]
    names = [n for n, _ in named]
    primary = primary_scores(names)
    skipped = skipped or Skipped()
    done: list[dict] = []
    interrupted = False
    try:
        for batch in generate_answers(model, tokenizer, prompts, stop_ids=stop_ids, settings=settings,
                                      batch_size=batch_size, context=context, compare_base=compare_base,
                                      progress=progress):
            for prompt, tuned, base in batch:
                row = {"index": prompt.index, "prompt": prompt.text, "reference": prompt.reference,
                       "tuned": _answer_record(tokenizer, tuned, prompt.reference, named)}
                if base is not None:
                    row["base"] = _answer_record(tokenizer, base, prompt.reference, named)
                    row["verdict"] = verdict(row["tuned"], row["base"], primary)
                done.append(row)
    except KeyboardInterrupt:
        interrupted = True
    done.sort(key=lambda r: r["index"])
    summary = summarize(done, compare_base=compare_base, metric_names=names, skipped=skipped,
                        eval_metrics=eval_metrics, base_eval_metrics=base_eval_metrics)
    summary["prompts"] = len(prompts)
    summary["interrupted"] = interrupted
    summary["settings"] = {"max_new_tokens": settings.max_new_tokens, "greedy": not settings.sampling,
                           "temperature": settings.temperature if settings.sampling else 0.0,
                           "top_p": settings.top_p if settings.sampling else 1.0, "batch_size": batch_size,
                           "primary_scores": primary}
    result = GenerationResult(summary=summary, samples=done, interrupted=interrupted)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result.samples_path = report.write_samples(out / SAMPLES_FILE, done)
        result.report_path = report.write_report(out / REPORT_FILE, summary, done, train_records=train_records,
                                                 title=title)
    if interrupted:
        where = f"; written to {result.samples_path}" if result.samples_path else ""
        print(f"\ninterrupted: {len(done)} of {len(prompts)} samples generated{where}", file=sys.stderr)
        raise KeyboardInterrupt
    return result


def evaluate_samples_by_generation(model, tokenizer, samples, *, stop_ids: Sequence[int],
                                  settings: GenerationSettings | None = None, batch_size: int = 8,
                                  max_samples: int | None = None, **kwargs) -> GenerationResult:
    """:func:`evaluate_generation` on tokenized samples (see :func:`prompts_from_samples`): prompts that do not fit
    the model's context are skipped and counted. ``kwargs`` go to :func:`evaluate_generation`."""
    settings = settings or GenerationSettings(greedy=True)
    context = context_length(model, tokenizer)
    prompts, skipped = prompts_from_samples(samples, tokenizer, stop_ids=stop_ids, context=context,
                                            max_samples=max_samples)
    if not prompts:
        raise DataError(f"no conversation to answer: all {skipped.total} were skipped ({skipped})")
    return evaluate_generation(model, tokenizer, prompts, stop_ids=stop_ids, settings=settings,
                               batch_size=batch_size, context=context, skipped=skipped, **kwargs)


def flat_metrics(summary: dict) -> dict[str, float]:
    """The summary as one flat dict of numbers (``gen_*`` tuned, ``base_gen_*`` base), as ``evaluate`` returns."""
    out: dict[str, float] = {}
    for which, prefix in (("tuned", "gen_"), ("base", "base_gen_")):
        for k, v in (summary.get(which) or {}).items():
            if k in CARRIED_EVAL_METRICS:
                if which == "base":
                    out[f"base_{k}"] = v
                continue
            out[prefix + k] = v
    out["gen_samples"] = summary["samples"]
    out["gen_skipped"] = summary["skipped"]
    for k, v in (summary.get("verdicts") or {}).items():
        out[f"gen_tuned_{k}"] = v
    return out


# --- during training ------------------------------------------------------------------------------------------------


def training_probe(model, tokenizer, prompts: Sequence[Prompt], *, stop_ids: Sequence[int],
                   max_new_tokens: int = 256, batch_size: int = 8, context: int | None = None) -> dict[str, Any]:
    """Greedy answers to a few fixed eval prompts during training, for metrics.jsonl: the mean scores as
    ``gen_exact_match``, ``gen_token_f1``, ``gen_rouge_l`` and ``generations``, one ``{index, answer, exact_match,
    rouge_l, stopped}`` per prompt."""
    settings = GenerationSettings(max_new_tokens=max_new_tokens, greedy=True)
    rows = []
    for batch in generate_answers(model, tokenizer, prompts, stop_ids=stop_ids, settings=settings,
                                  batch_size=batch_size, context=context, progress=False):
        for prompt, gen, _ in batch:
            rec = _answer_record(tokenizer, gen, prompt.reference, ())
            rows.append({"index": prompt.index, "answer": rec["answer"], "exact_match": rec["exact_match"],
                         "rouge_l": round(rec["rouge_l"], 4), "stopped": rec["stopped"]})
    rows.sort(key=lambda r: r["index"])
    n = max(len(rows), 1)
    return {"gen_exact_match": sum(r["exact_match"] for r in rows) / n,
            "gen_rouge_l": sum(r["rouge_l"] for r in rows) / n,
            "gen_stopped": sum(r["stopped"] for r in rows) / n,
            "generations": rows}


def probe_prompts_record(prompts: Sequence[Prompt]) -> dict[str, Any]:
    """The fixed prompts of the training probe, logged with its first answers so the report can show them."""
    return {"generation_prompts": [{"index": p.index, "prompt": p.text, "reference": p.reference} for p in prompts]}
