"""Did the fine-tune work? Answers generated for held-out conversations, scored against the reference answers.

For every eval conversation the prompt is every turn before its last assistant turn, exactly the tokens training
rendered (taken from the prepared samples: the last trained span is that turn), and the model generates the turn::

    prompts, skipped = prompts_from_samples(prepared.eval, tokenizer, stop_ids=stops, context=4096)
    result = evaluate_generation(model, tokenizer, prompts, stop_ids=stops, compare_base=True, out_dir="run/eval")
    result.summary["tuned"]["exact_match"], result.summary["base"]["rouge_l"]

Scores per sample (and their means): exact match after normalising whitespace and case, token F1 and ROUGE-L
(Google's ``rouge-score``) over lowercase word tokens, the answer's length in tokens, and whether generation stopped
on an end-of-turn id (rather than running into the token limit); plus any ``(prediction, reference) -> float``
function the user gives. With ``compare_base`` the same prompts also go through the base model: the LoRA layers
switched off in the same model (:func:`phitune.lora.disable_adapters`), batch by batch, so an interrupted run has
both answers for every sample it wrote.

Generation is batched: left-padded prompts, one KV cache, each row stopping on its own end-of-turn id or token limit.
Greedy answers equal one-prompt-at-a-time answers token for token (tests/evals/test_generation_eval.py);
``benchmarks/generate_throughput.py`` measures what batching buys.

Not named ``evaluate.py``: ``phitune.evaluate`` is run.py's function (the public API), and a submodule of that name
would replace it as the package attribute as soon as it is imported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import math
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from . import report
from ..data import prepare_data
from ..errors import ConfigError, DataError
from ..training.fast import attention as fast_attention
from ..training.fast import varlen
from ..generation.generate import GenerationSettings, context_length
from ..data.labels import IGNORE_INDEX
from ..lora import disable_adapters

EVAL_DIR = "eval"
SAMPLES_FILE = "samples.jsonl"
REPORT_FILE = "report.html"

MetricFn = Callable[[str, str], float]


# --- scores ---------------------------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+", re.UNICODE)


def normalize_text(text: str) -> str:
    """Lowercase, whitespace runs collapsed to one space, ends stripped (what exact match compares)."""
    return " ".join(text.lower().split())


def word_tokens(text: str) -> list[str]:
    """Lowercase runs of word characters: the tokens of token F1 and ROUGE-L. Unicode-aware, unlike rouge-score's
    default tokenizer, which keeps only ``[a-z0-9]`` and so scores every non-Latin answer 0."""
    return _WORD.findall(text.lower())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the texts are equal after :func:`normalize_text`, else 0.0."""
    return float(normalize_text(prediction) == normalize_text(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of precision and recall of the word tokens shared (as a multiset), as SQuAD scores answers."""
    pred, ref = word_tokens(prediction), word_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class _WordTokenizer:
    """rouge-score's tokenizer interface over :func:`word_tokens`."""

    def tokenize(self, text: str) -> list[str]:
        return word_tokens(text)


_ROUGE = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of word tokens), computed by Google's ``rouge-score``."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())
    return float(_ROUGE.score(reference, prediction)["rougeL"].fmeasure)


BUILTIN_SCORES = ("exact_match", "token_f1", "rouge_l")


def load_metric(spec: str | MetricFn | tuple[str, MetricFn]) -> tuple[str, MetricFn]:
    """``(name, function)`` for a custom metric: a callable, ``"module:function"`` (a module importable from the
    current folder or the installed packages), ``"path/to/file.py:function"``, or a ``(name, function)`` pair."""
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and callable(spec[1]):
        return spec
    if callable(spec):
        return getattr(spec, "__name__", "metric"), spec
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigError(f"--metric {spec!r}: expected module:function (e.g. my_metrics:score) or "
                          "path/to/file.py:function, a function (prediction, reference) -> float")
    where, name = spec.split(":")
    try:
        if where.endswith(".py") or os.sep in where or "/" in where:
            path = Path(where).expanduser()
            if not path.is_file():
                raise ConfigError(f"--metric {spec!r}: no file {path}")
            module_spec = importlib.util.spec_from_file_location(f"phitune_metric_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            # The CLI entry point does not put the current folder on sys.path; a metric next to the data should load.
            added = os.getcwd() not in sys.path
            if added:
                sys.path.insert(0, os.getcwd())
            try:
                module = importlib.import_module(where)
            finally:
                if added:
                    sys.path.remove(os.getcwd())
    except ConfigError:
        raise
    except Exception as exc:  # ImportError, or the module's own code failing
        raise ConfigError(f"--metric {spec!r}: cannot import {where} ({type(exc).__name__}: {exc})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"--metric {spec!r}: {where} has no function {name!r}")
    if name in BUILTIN_SCORES or name in ("answer_tokens", "stopped"):
        raise ConfigError(f"--metric {spec!r}: {name!r} is the name of a built-in score; rename the function")
    return name, fn


def score_answer(prediction: str, reference: str, metrics: Sequence[tuple[str, MetricFn]] = ()) -> dict[str, float]:
    """Every score of one answer: the built-in ones, then each custom metric (which must return a number)."""
    scores = {"exact_match": exact_match(prediction, reference), "token_f1": token_f1(prediction, reference),
              "rouge_l": rouge_l(prediction, reference)}
    for name, fn in metrics:
        value = fn(prediction, reference)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
            raise ConfigError(f"metric {name!r} returned {value!r} (for the prediction {prediction[:60]!r}); it must "
                              "return a finite number")
        scores[name] = float(value)
    return scores


# --- prompts ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Prompt:
    """One held-out conversation to answer: ``ids`` are its tokens before the last assistant turn (ending with the
    assistant header), ``reference`` that turn's text; ``index`` its position in the eval samples."""

    index: int
    ids: list[int]
    reference: str
    text: str = ""  # the prompt as rendered (special tokens shown), for the report


@dataclasses.dataclass
class Skipped:
    """Prompts left out, counted by reason (each reason says what to change)."""

    counts: Counter = dataclasses.field(default_factory=Counter)

    def add(self, reason: str) -> None:
        self.counts[reason] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        return "; ".join(f"{n} {reason}" for reason, n in self.counts.most_common())


def generation_data_config(data_cfg):
    """The data settings whose samples mark the last assistant turn as their last trained span: the run's own when
    it trains on assistant turns; with ``train_on: all`` the same rendering and truncation with ``last_assistant``."""
    if data_cfg.train_on == "all":
        return dataclasses.replace(data_cfg, train_on="last_assistant")
    return data_cfg


def generation_samples(prepared, data_cfg, tokenizer, split: str):
    """The tokenized ``split`` ("train" or "eval") of ``prepared`` (made with ``data_cfg``) as generation needs it:
    the same samples, or, for ``train_on: all``, the same data prepared again with the last assistant turn marked.
    A clear error for data without assistant turns."""
    gen_cfg = generation_data_config(data_cfg)
    if gen_cfg is not data_cfg:
        prepared = prepare_data(gen_cfg, tokenizer)
    check_chat_format(prepared.stats, split)
    return getattr(prepared, split)


def check_chat_format(stats: dict, split: str) -> None:
    """A clear error when the data has no assistant turns to compare with (plain ``text`` records)."""
    fmt = (stats.get(split) or {}).get("format")
    if fmt == "text":
        raise DataError(f"the {split} data is plain text (format 'text'): there is no assistant turn to compare a "
                        "generated answer with. Generation-based evaluation needs chat records (messages, "
                        "conversations, instruction/output or prompt/completion)")


def prompts_from_samples(samples, tokenizer, *, stop_ids: Sequence[int], context: int | None = None,
                         max_new_tokens: int = 1, max_samples: int | None = None) -> tuple[list[Prompt], Skipped]:
    """The prompts and references of tokenized samples whose last trained span is the last assistant turn (see
    :func:`generation_data_config`), with what was skipped and why.

    Skipped: a sample whose answer ends without an end-of-turn token (cut by ``data.max_seq_length``: the reference
    would be incomplete) and a prompt that leaves no room in the model's ``context`` for even one new token.
    ``max_samples`` stops after that many prompts.
    """
    stops = set(stop_ids)
    bos = getattr(tokenizer, "bos_token_id", None)
    prompts: list[Prompt] = []
    skipped = Skipped()
    for i in range(len(samples)):
        if max_samples is not None and len(prompts) >= max_samples:
            break
        ids, labels = samples.arrays(i)
        trained = np.flatnonzero(labels != IGNORE_INDEX)
        if not len(trained):
            skipped.add("without an assistant turn")
            continue
        end = int(trained[-1]) + 1
        start = end - 1
        while start > 0 and labels[start - 1] != IGNORE_INDEX:
            start -= 1
        if int(ids[end - 1]) not in stops:
            skipped.add("whose answer was cut by data.max_seq_length (raise it to score them)")
            continue
        if context is not None and start + 1 > context:
            skipped.add(f"with a prompt longer than the model's context of {context} tokens")
            continue
        prompt = [int(t) for t in ids[:start]]
        reference = tokenizer.decode([int(t) for t in ids[start:end]], skip_special_tokens=True).strip()
        shown = prompt[1:] if prompt and prompt[0] == bos else prompt
        prompts.append(Prompt(index=i, ids=prompt, reference=reference,
                              text=tokenizer.decode(shown, skip_special_tokens=False)))
    return prompts, skipped


# --- batched generation -----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Generation:
    """One generated answer: its token ids (without the end-of-turn token) and whether it ended on one."""

    ids: list[int]
    stopped: bool


def _pick(logits: torch.Tensor, settings: GenerationSettings, generator) -> torch.Tensor:
    if not settings.sampling:
        return logits.argmax(-1)
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(settings.temperature)(None, logits)
    if settings.top_p < 1.0:
        scores = TopPLogitsWarper(settings.top_p)(None, scores)
    return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()  # not inference_mode: during training, tensors a module caches here are used again by backward
def generate_batch(model, prompts: Sequence[Sequence[int]], *, stop_ids: Sequence[int], pad_id: int,
                   max_new_tokens: int | Sequence[int], settings: GenerationSettings | None = None,
                   generator: torch.Generator | None = None) -> list[Generation]:
    """Answers to a batch of prompts: left-padded into one batch, one KV cache, each row ending on its first stop
    id or at its own token limit (``max_new_tokens``: one for all, or one per prompt). Greedy unless ``settings``
    samples. The model's train/eval mode is restored afterwards."""
    settings = settings or GenerationSettings(greedy=True)
    n = len(prompts)
    limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if n == 0:
        return []
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[row, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)  # each row counts from its first real token
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    limit = torch.tensor(limits, dtype=torch.long, device=device)
    finished = limit < 1
    ended = torch.zeros(n, dtype=torch.bool, device=device)
    produced = torch.zeros(n, dtype=torch.long, device=device)
    tokens: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        step_ids, step_pos, cache = ids, positions, {}
        for _ in range(max(limits)):
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True,
                        logits_to_keep=1, **cache)
            cache = _cache_kwarg(model, out)
            token = _pick(out.logits[:, -1, :].float(), settings, generator)
            token = torch.where(finished, torch.full_like(token, pad_id), token)
            tokens.append(token)
            is_stop = torch.isin(token, stops) & ~finished
            ended |= is_stop
            produced += (~finished).long()
            finished = finished | is_stop | (produced >= limit)
            if bool(finished.all()):
                break
            step_ids = token[:, None]
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, mask.new_ones((n, 1))], dim=1)
    finally:
        model.train(was_training)
    rows = torch.stack(tokens, 1).tolist() if tokens else [[] for _ in range(n)]
    result = []
    for row, count, stopped in zip(rows, produced.tolist(), ended.tolist()):
        answer = row[:count]
        result.append(Generation(ids=answer[:-1] if stopped else answer, stopped=bool(stopped)))
    return result


def _cache_kwarg(model, out) -> dict:
    """The KV cache of ``out`` as the keyword the model's forward takes: transformers 5.x renamed
    ``past_key_values`` to ``cache`` (the old name is deprecated, to be removed in 5.40)."""
    if "cache" in inspect.signature(model.forward).parameters:
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}


@contextlib.contextmanager
def generation_mode(model) -> Iterator[None]:
    """The model as generation needs it: a training model's packed-sample attention kernel (phitune's varlen one
    on CUDA, which ignores padding masks and the KV cache) is swapped for sdpa meanwhile."""
    switched = fast_attention.implementation(model) == varlen.NAME and fast_attention.switch(model, "sdpa")
    try:
        yield
    finally:
        if switched:
            fast_attention.switch(model, varlen.NAME)


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


def verdict(tuned: dict, base: dict, primary: Sequence[str]) -> str:
    """"better", "worse" or "same" for the tuned answer against the base one, on the ``primary`` scores in order."""
    for key in primary:
        a, b = round(tuned[key], 9), round(base[key], 9)
        if a != b:
            return "better" if a > b else "worse"
    return "same"


def primary_scores(metric_names: Sequence[str]) -> list[str]:
    """What decides better/worse/same: the custom metrics first, then exact match, then ROUGE-L."""
    return list(metric_names) + ["exact_match", "rouge_l"]


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

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else list(stop_ids)[0]
    device = next(model.parameters()).device
    generator = None
    if settings.sampling:
        generator = torch.Generator(device=device)
        generator.manual_seed(settings.seed if settings.seed is not None else 0)
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
