"""Prompts from prepared samples: for every held-out conversation, the tokens before its last assistant turn
(exactly what training rendered, truncation included) and that turn's text as the reference answer.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Sequence

import numpy as np

from ..data import prepare_data
from ..data.labels import IGNORE_INDEX
from ..errors import DataError


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
        # The answer ends at the first end-of-turn token of the span (models/chat_template.py: what follows it in
        # the trained span, such as Phi-3's closing eos, is not part of the answer); none: the answer was cut.
        ends = [k for k in range(start, end) if int(ids[k]) in stops]
        if not ends:
            skipped.add("whose answer was cut by data.max_seq_length (raise it to score them)")
            continue
        end = ends[0]
        if context is not None and start + 1 > context:
            skipped.add(f"with a prompt longer than the model's context of {context} tokens")
            continue
        prompt = [int(t) for t in ids[:start]]
        reference = tokenizer.decode([int(t) for t in ids[start:end]], skip_special_tokens=True).strip()
        shown = prompt[1:] if prompt and prompt[0] == bos else prompt
        prompts.append(Prompt(index=i, ids=prompt, reference=reference,
                              text=tokenizer.decode(shown, skip_special_tokens=False)))
    return prompts, skipped
