"""Chat generation for a fine-tuned model: prompt building and streamed decoding over the one generation loop
(:func:`phitune.generation.loop.generate_batch`, also the loop of ``phitune eval --generate``).

Pure helpers used by :func:`phitune.generation.chat.chat`; they take a loaded model and tokenizer, so they also work
on a model you built yourself::

    from phitune.generation.generate import GenerationSettings, generate_reply
    text = generate_reply(model, tokenizer, [{"role": "user", "content": "Hi"}], GenerationSettings(greedy=True))
"""

from __future__ import annotations

from typing import Callable, Sequence

from jinja2.exceptions import TemplateError

from ..errors import ConfigError
from .loop import GenerationSettings, generate_batch, generation_mode, pad_token_id, seeded_generator
from .stops import stop_token_ids

__all__ = ["GenerationSettings", "IncrementalDecoder", "build_prompt_ids", "context_length", "generate_reply"]

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


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
            "or use a run folder written by `phitune train`, which saves it (and data.chat_template, if set)"
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


def generate_reply(
    model,
    tokenizer,
    messages: Sequence[Message],
    settings: GenerationSettings | None = None,
    *,
    stop_ids: Sequence[int] | None = None,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """The assistant's answer to ``messages`` (a chat so far, last turn the user's), decoded by
    :func:`~phitune.generation.loop.generate_batch` as a batch of one.

    ``on_text`` receives the answer piece by piece as it is generated (streaming); the full answer is returned,
    without the end-of-turn token. ``stop_ids``: default :func:`~phitune.generation.stops.stop_token_ids`.
    """
    settings = settings or GenerationSettings()
    stop_ids = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer, model=model)
    prompt = build_prompt_ids(tokenizer, messages)
    on_step = None
    if on_text is not None:
        decoder = IncrementalDecoder(tokenizer, skip_ids=stop_ids)

        def on_step(tokens: list[int], live: list[bool]) -> None:
            piece = decoder.push(tokens[0]) if live[0] else ""
            if piece:
                on_text(piece)

    device = next(model.parameters()).device
    with generation_mode(model):
        [answer] = generate_batch(model, [prompt], stop_ids=stop_ids, pad_id=pad_token_id(tokenizer, stop_ids),
                                  max_new_tokens=settings.max_new_tokens, settings=settings,
                                  generator=seeded_generator(settings, device), on_step=on_step)
    if on_text is not None:
        piece = decoder.flush()
        if piece:
            on_text(piece)
    return tokenizer.decode(answer.ids, skip_special_tokens=True).strip()
