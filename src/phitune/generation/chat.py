"""``phitune chat``: talk to a run folder's model (one prompt, or an interactive loop), with its chat template.

    answer = phitune.chat("runs/phi3-lora", prompt="Hello!", greedy=True)

It decodes as the run's ``generation_config.json`` says, as ``model.generate`` would (Phi-3's and the demo's set no
sampling: greedy); ``greedy``/``temperature``/``top_p``/``top_k``/``repetition_penalty`` override it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from ..models.chat_template import turn_end
from ..runs.folder import load_run_model, load_run_tokenizer, open_run
from .generate import GenerationSettings, build_prompt_ids, context_length, generate_reply
from .stops import read_generation_config, stop_token_ids

# --- chat -----------------------------------------------------------------------------------------------------------

_CHAT_HELP = "/reset forgets the conversation, /system TEXT sets the system prompt, /exit (or Ctrl-D) quits"


def chat(
    run_dir: str | os.PathLike,
    prompt: str | None = None,
    *,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    greedy: bool = False,
    seed: int | None = None,
    device: str | None = None,
    stream: bool = True,
    input_fn: Callable[[str], str] = input,
    output=None,
    trust_remote_code: bool = False,
):
    """Chat with a run's adapter model.

    With ``prompt``: answer it once (streamed to ``output``, default stdout, unless ``stream=False``) and return the
    answer. Without: an interactive loop reading lines with ``input_fn`` that keeps the conversation as context
    (oldest turns dropped when it outgrows the context window) and returns the conversation (list of messages).
    Decoding follows the run's ``generation_config.json`` (greedy where it sets no sampling, as ``model.generate``);
    ``greedy=True`` or ``temperature=0`` force greedy decoding, any other ``temperature``/``top_p``/``top_k`` samples,
    and each given value replaces the file's (:meth:`GenerationSettings.from_generation_config`). Generation stops
    on every end-of-turn id of that file. ``trust_remote_code``: allow the code of a run whose config asks for it
    (see :func:`load_run_config`).
    """

    run = open_run(run_dir)
    gen_file = run.root / "generation_config.json"
    overrides = dict(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty)
    settings = GenerationSettings.from_generation_config(read_generation_config(run.root), greedy=greedy,
                                                         max_new_tokens=max_new_tokens, seed=seed, where=str(gen_file),
                                                         **overrides)
    out = output if output is not None else sys.stdout
    # Before the weights load: a template without an end-of-turn token could never stop (data.chat_template fixes it)
    turn_end(load_run_tokenizer(run.root, trust_remote_code=trust_remote_code))
    model, tokenizer, config = load_run_model(run.adapter_dir, device=device, trust_remote_code=trust_remote_code)
    stops = stop_token_ids(tokenizer, run_dir=run.root, model=model)
    limit = context_length(model, tokenizer)

    def reply(messages: list[dict]) -> str:
        messages = _fit_context(tokenizer, messages, limit - settings.max_new_tokens)
        on_text = None
        if stream:
            def on_text(piece: str) -> None:
                out.write(piece)
                out.flush()
        answer = generate_reply(model, tokenizer, messages, settings, stop_ids=stops, on_text=on_text)
        if stream:
            out.write("\n")
            out.flush()
        return answer

    head = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        return reply(head + [{"role": "user", "content": prompt}])

    if input_fn is input and sys.stdin.isatty():
        try:  # line editing and history (up arrow) for input(); absent on some platforms
            import readline  # noqa: F401
        except ImportError:
            pass
    print(f"chatting with {run.adapter_dir} (base {config.model.name_or_path}); {_CHAT_HELP}", file=out)
    print(decoding_banner(settings, gen_file, overridden=greedy or any(v is not None for v in overrides.values())),
          file=out)
    history: list[dict] = []
    while True:
        try:
            line = input_fn("\nyou> ")
        except EOFError:
            print(file=out)
            break
        except KeyboardInterrupt:
            print(file=out)
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            print("(conversation cleared)", file=out)
            continue
        if text.startswith("/system"):
            new = text[len("/system"):].strip()
            head = [{"role": "system", "content": new}] if new else []
            history = []
            print(f"(system prompt {'set' if new else 'removed'}; conversation cleared)", file=out)
            continue
        if text.startswith("/") and text.split()[0] in ("/help", "/?"):
            print(_CHAT_HELP, file=out)
            continue
        history.append({"role": "user", "content": line})
        out.write("assistant> ")
        out.flush()
        try:
            answer = reply(head + history)
        except KeyboardInterrupt:
            out.write("\n(interrupted; the message was dropped)\n")
            history.pop()
            continue
        history.append({"role": "assistant", "content": answer})
    return head + history


def decoding_banner(settings: GenerationSettings, gen_file, *, overridden: bool) -> str:
    """One line for the chat's banner: the decoding in use, where it comes from, and how to change it."""
    if overridden:
        origin = "as you asked (over the run's generation_config.json)"
    elif Path(gen_file).is_file():
        origin = f"as {gen_file} says" + ("" if settings.sampling else " (it sets no sampling)")
    else:
        origin = "transformers' default (the run has no generation_config.json)"
    change = ("--greedy for deterministic answers" if settings.sampling else
              "--temperature 0.7 --top-p 0.9 to sample instead")
    return f"decoding: {settings.describe()}, {origin}; {change} (or the same arguments of phitune.chat)"


def _fit_context(tokenizer, messages: list[dict], budget: int) -> list[dict]:
    """Drop the oldest turns (never the system prompt or the last user message) until the prompt fits ``budget``."""

    messages = list(messages)
    head = 1 if messages and messages[0]["role"] == "system" else 0
    while len(messages) - head > 1 and len(build_prompt_ids(tokenizer, messages)) > budget:
        del messages[head]
        # keep the conversation starting with a user turn
        while len(messages) - head > 1 and messages[head]["role"] != "user":
            del messages[head]
    if len(build_prompt_ids(tokenizer, messages)) > budget:
        raise ConfigError(f"the message is longer than the context window ({budget} tokens left after "
                          "max_new_tokens); shorten it or lower max_new_tokens")
    return messages
