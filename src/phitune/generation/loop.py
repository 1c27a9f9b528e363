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


# What transformers' generate() uses for a decoding field that generation_config.json leaves unset
# (GenerationConfig._get_default_generation_params in transformers 5.x; tests/generation checks they still agree).
TRANSFORMERS_DECODING_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50,
                                  "repetition_penalty": 1.0}


@dataclasses.dataclass
class GenerationSettings:
    """How to sample an answer. ``greedy=True`` (or ``temperature=0``) picks the most likely token every step."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    greedy: bool = False
    seed: int | None = None
    top_k: int = 0  # 0: no top-k cut
    repetition_penalty: float = 1.0  # 1.0: off; applies to greedy decoding too

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k must be a whole number >= 0 (0: no top-k cut), got {self.top_k!r}")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty must be > 0 (1.0: off), got {self.repetition_penalty}")

    @property
    def sampling(self) -> bool:
        return not self.greedy and self.temperature > 0

    @classmethod
    def from_generation_config(cls, generation_config, *, greedy: bool = False, temperature: float | None = None,
                               top_p: float | None = None, top_k: int | None = None,
                               repetition_penalty: float | None = None, max_new_tokens: int = 256,
                               seed: int | None = None, where: str = "generation_config.json") -> GenerationSettings:
        """The decoding a model's generation config (a GenerationConfig or its dict) asks for, as ``model.generate``
        would do it (greedy unless it sets ``do_sample: true``; transformers' defaults for what it leaves unset),
        with the arguments given here overriding it: ``greedy=True`` or ``temperature=0`` decode greedily, any other
        ``temperature``, ``top_p`` or ``top_k`` samples. ``where`` names the config in errors."""
        if hasattr(generation_config, "to_dict"):
            generation_config = generation_config.to_dict()
        given = {k: v for k, v in (generation_config or {}).items() if k in TRANSFORMERS_DECODING_DEFAULTS
                 and v is not None}
        file = {**TRANSFORMERS_DECODING_DEFAULTS, **given}
        asked = {k: v for k, v in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k),
                                   ("repetition_penalty", repetition_penalty)) if v is not None}
        sample = (not greedy and temperature != 0
                  and (bool(asked.keys() - {"repetition_penalty"}) or file["do_sample"] is True))
        value = {**file, **asked}
        try:
            return cls(max_new_tokens=max_new_tokens, greedy=not sample, seed=seed,
                       temperature=float(value["temperature"]), top_p=float(value["top_p"]),
                       top_k=value["top_k"], repetition_penalty=float(value["repetition_penalty"]))
        except (ConfigError, TypeError, ValueError) as exc:
            from_file = {k: v for k, v in given.items() if k not in asked and k != "do_sample"}
            if not from_file:
                raise
            sets = ", ".join(f"{k}: {v!r}" for k, v in from_file.items())
            raise ConfigError(f"{where} ({sets}): {exc}; fix the file, or override the value") from None

    def describe(self) -> str:
        """The decoding in words, e.g. ``greedy`` or ``sampling (temperature 0.7, top-p 0.9)``."""
        extra = f", repetition penalty {self.repetition_penalty:g}" if self.repetition_penalty != 1.0 else ""
        if not self.sampling:
            return f"greedy{' (' + extra[2:] + ')' if extra else ''}"
        top_k = f", top-k {self.top_k}" if self.top_k else ""
        return f"sampling (temperature {self.temperature:g}, top-p {self.top_p:g}{top_k}{extra})"


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


def _pick(logits: torch.Tensor, settings: GenerationSettings, generator, seen: torch.Tensor | None) -> torch.Tensor:
    """The next token per row, as ``model.generate`` picks it: repetition penalty over ``seen`` (the ids so far,
    prompt included), then greedy, or temperature, top-k and top-p (transformers' processors, its order) and a draw."""
    if settings.repetition_penalty != 1.0:
        from transformers import RepetitionPenaltyLogitsProcessor

        logits = RepetitionPenaltyLogitsProcessor(settings.repetition_penalty)(seen, logits)
    if not settings.sampling:
        return logits.argmax(-1)
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(settings.temperature)(None, logits)
    if settings.top_k:
        scores = TopKLogitsWarper(settings.top_k)(None, scores)
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
        seen = ids if settings.repetition_penalty != 1.0 else None  # the ids the penalty looks at
        for _ in range(max(limits)):
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True,
                        logits_to_keep=1, **cache)
            cache = _cache_kwarg(model, out)
            token = _pick(out.logits[:, -1, :].float(), settings, generator, seen)
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
            if seen is not None:
                seen = torch.cat([seen, step_ids], dim=1)
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
