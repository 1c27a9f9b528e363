"""How a generated answer is scored against the reference: exact match after normalising whitespace and case,
token F1 and ROUGE-L (Google's ``rouge-score``) over lowercase word tokens, plus any ``(prediction, reference) ->
float`` function the user gives; and which scores decide whether the tuned answer beat the base one.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import ConfigError

MetricFn = Callable[[str, str], float]

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
