"""Chat generation for a fine-tuned model: prompt building, stop ids, streamed decoding.

Pure helpers used by :func:`phitune.generation.chat.chat`; they take a loaded model and tokenizer, so they also work
on a model
you built yourself::

    from phitune.generation.generate import GenerationSettings, generate_reply
    text = generate_reply(model, tokenizer, [{"role": "user", "content": "Hi"}], GenerationSettings(greedy=True))
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Sequence

import torch
from jinja2.exceptions import TemplateError
from transformers import GenerationConfig

from ..errors import ConfigError
from ..models.tokenizer import end_of_turn_ids

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


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
    def from_generation_config(cls, generation_config: GenerationConfig | dict | None, *, greedy: bool = False,
                               temperature: float | None = None, top_p: float | None = None,
                               top_k: int | None = None, repetition_penalty: float | None = None,
                               max_new_tokens: int = 256, seed: int | None = None,
                               where: str = "generation_config.json") -> GenerationSettings:
        """The decoding a model's generation config asks for, as ``model.generate`` would do it (greedy unless it
        sets ``do_sample: true``; transformers' defaults for what it leaves unset), with the arguments given here
        overriding it: ``greedy=True`` or ``temperature=0`` decode greedily, any other ``temperature``, ``top_p``
        or ``top_k`` samples. ``where`` names the config in errors."""
        if isinstance(generation_config, GenerationConfig):
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


def read_generation_config(run_dir: str | Path | None) -> dict:
    """The folder's ``generation_config.json`` as a dict (empty when there is none)."""
    if run_dir is None:
        return {}
    path = Path(run_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); delete it or fix it") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}; delete it or fix it")
    return data


def stop_token_ids(run_dir: str | Path | None, tokenizer) -> list[int]:
    """Every id that ends an assistant turn (``tokenizer.end_of_turn_ids``): those of the folder's
    ``generation_config.json`` (``eos_token_id``, an int or a list), the tokenizer's eos, and ``<|end|>``."""
    configured = read_generation_config(run_dir).get("eos_token_id")
    return end_of_turn_ids(tokenizer, configured, tokens=("<|end|>",))


def context_length(model, tokenizer) -> int:
    """Tokens the model can attend over: its ``max_position_embeddings`` (4096 when it says nothing), or the
    tokenizer's ``model_max_length`` when that is smaller (tokenizers without a limit report a huge number)."""
    limit = getattr(model.config, "max_position_embeddings", None) or 4096
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < limit:
        limit = tok_limit
    return limit


def build_prompt_ids(tokenizer, messages: Sequence[Message]) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's chat template, ending with the assistant header."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "the tokenizer has no chat template; save one with the tokenizer (tokenizer.chat_template = ...) "
            "or use a run folder written by `phitune train`, which saves it"
        )
    try:
        ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    except (TemplateError, ValueError) as exc:  # SecurityError (the sandbox refused it) is a TemplateError
        raise ConfigError(f"the chat template of {getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'} "
                          f"cannot render this conversation ({type(exc).__name__}: {exc}). Fix: correct the "
                          "template (tokenizer_config.json / chat_template.jinja in the run folder)") from None
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    ids = list(ids)
    # Exactly one BOS, as the data pipeline trains with (data.add_bos: null): chat templates differ in whether they
    # write one, and apply_chat_template never adds one itself.
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        while ids and ids[0] == bos:
            ids.pop(0)
        ids.insert(0, bos)
    return ids


class IncrementalDecoder:
    """Turns token ids, arriving one at a time, into text pieces.

    Decoding token by token breaks SentencePiece spaces and multi-byte characters, so it decodes everything generated
    so far and emits the new suffix; text ending in U+FFFD (a character cut in half) is held back until the rest
    arrives.
    """

    def __init__(self, tokenizer, skip_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.skip_ids = set(skip_ids)
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        if token_id in self.skip_ids:
            return ""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return piece

    def flush(self) -> str:
        """Whatever was held back (an incomplete character at the very end)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return piece


class _Streamer:
    """The object ``model.generate(streamer=...)`` pushes tokens to (the first push is the prompt, skipped)."""

    def __init__(self, decoder: IncrementalDecoder, on_text: Callable[[str], None]):
        self.decoder = decoder
        self.on_text = on_text
        self.seen_prompt = False

    def put(self, value: torch.Tensor):
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        for token_id in value.reshape(-1).tolist():
            piece = self.decoder.push(token_id)
            if piece:
                self.on_text(piece)

    def end(self):
        piece = self.decoder.flush()
        if piece:
            self.on_text(piece)


@torch.inference_mode()
def generate_reply(
    model,
    tokenizer,
    messages: Sequence[Message],
    settings: GenerationSettings | None = None,
    *,
    stop_ids: Sequence[int] | None = None,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """The assistant's answer to ``messages`` (a chat so far, last turn the user's).

    ``on_text`` receives the answer piece by piece as it is generated (streaming); the full answer is returned,
    without the end-of-turn token.
    """
    settings = settings or GenerationSettings()
    stop_ids = list(stop_ids) if stop_ids is not None else stop_token_ids(None, tokenizer)
    prompt = build_prompt_ids(tokenizer, messages)
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt], dtype=torch.long, device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids[0] if stop_ids else 0)
    # A fresh GenerationConfig, so nothing is inherited from the base model's file (e.g. a single eos id).
    gen_kwargs = dict(max_new_tokens=settings.max_new_tokens, eos_token_id=stop_ids or None, pad_token_id=pad_id)
    if settings.sampling:
        gen_kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    else:
        gen_kwargs.update(do_sample=False)
    if settings.repetition_penalty != 1.0:
        gen_kwargs.update(repetition_penalty=settings.repetition_penalty)
    generation_config = GenerationConfig(**gen_kwargs)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    decoder = IncrementalDecoder(tokenizer, skip_ids=stop_ids)
    streamer = _Streamer(decoder, on_text) if on_text is not None else None
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=generation_config,
            streamer=streamer,
        )
    finally:
        model.train(was_training)
    new_ids = out[0, len(prompt):].tolist()
    answer_ids = []
    for token_id in new_ids:
        if token_id in stop_ids:
            break
        answer_ids.append(token_id)
    return tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
