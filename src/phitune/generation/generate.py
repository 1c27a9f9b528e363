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


def stop_token_ids(run_dir: str | Path | None, tokenizer) -> list[int]:
    """Every id that ends an assistant turn (``tokenizer.end_of_turn_ids``): those of the folder's
    ``generation_config.json`` (``eos_token_id``, an int or a list), the tokenizer's eos, and ``<|end|>``."""
    configured = None
    if run_dir is not None:
        path = Path(run_dir) / "generation_config.json"
        if path.is_file():
            try:
                configured = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}: not valid JSON ({exc}); delete it or fix it") from exc
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
        gen_kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    else:
        gen_kwargs.update(do_sample=False)
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
