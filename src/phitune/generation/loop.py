"""The one generation loop: chat (one prompt, streamed), ``phitune eval --generate`` and the training-time probe
(batches of prompts) all decode through :func:`generate_batch`.

Left-padded prompts, position ids counted from each row's first real token, one KV cache, ``logits_to_keep=1``;
each row ends on its first stop id (not part of its answer) or at its own token limit. Greedy answers equal
one-prompt-at-a-time answers and ``model.generate``'s token for token (tests/generation/test_loop.py);
``benchmarks/generate_throughput.py`` measures what batching buys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Callable, Iterator, Sequence

import torch

from ..errors import ConfigError
from ..training.fast import attention as fast_attention
from ..training.fast import varlen


@dataclasses.dataclass
class GenerationSettings:
    """How to sample an answer. ``greedy=True`` (or ``temperature=0``) picks the most likely token every step."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    greedy: bool = False
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def sampling(self) -> bool:
        return not self.greedy and self.temperature > 0


@dataclasses.dataclass
class Generation:
    """One generated answer: its token ids (without the end-of-turn token) and whether it ended on one."""

    ids: list[int]
    stopped: bool


def pad_token_id(tokenizer, stop_ids: Sequence[int]) -> int:
    """The id that fills the left of shorter prompts (masked out, never attended to): the tokenizer's pad, else its
    first stop id, else 0."""
    if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    return int(stop_ids[0]) if len(stop_ids) else 0


def seeded_generator(settings: GenerationSettings, device) -> torch.Generator | None:
    """A generator seeded with ``settings.seed`` when sampling with a seed; None (torch's global one) otherwise."""
    if not settings.sampling or settings.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(settings.seed)
    return generator


def _pick(logits: torch.Tensor, settings: GenerationSettings, generator) -> torch.Tensor:
    if not settings.sampling:
        return logits.argmax(-1)
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(settings.temperature)(None, logits)
    if settings.top_p < 1.0:
        scores = TopPLogitsWarper(settings.top_p)(None, scores)
    return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(-1)


StepCallback = Callable[[list[int], list[bool]], None]


@torch.no_grad()  # not inference_mode: during training, tensors a module caches here are used again by backward
def generate_batch(model, prompts: Sequence[Sequence[int]], *, stop_ids: Sequence[int], pad_id: int,
                   max_new_tokens: int | Sequence[int], settings: GenerationSettings | None = None,
                   generator: torch.Generator | None = None, on_step: StepCallback | None = None) -> list[Generation]:
    """Answers to a batch of prompts: left-padded into one batch, one KV cache, each row ending on its first stop
    id or at its own token limit (``max_new_tokens``: one for all, or one per prompt). Greedy unless ``settings``
    samples. ``on_step(tokens, live)``, when given, sees each step's token per row and which rows produced one
    (streaming). The model is in eval mode meanwhile; its train/eval mode is restored afterwards, also on error."""
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
            if on_step is not None:
                on_step(token.tolist(), (~finished).tolist())
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
