"""The chat template and the one rule for where an assistant turn ends.

The rule, used by training's loss mask (``data/render.py``), the stop ids (``generation/stops.py``), the prompts of
``phitune eval --generate`` and of the ``eval_generate`` probe (``evals/prompts.py``, and so the report) and the
exports' end-of-turn token (``exports/to_gguf.py``):

- an assistant turn ends with its **end-of-turn token**: the first token the template writes after the turn's
  content, which must be a special (added) token: Phi-3 ``<|end|>``, Phi-4 and ChatML/Qwen2 ``<|im_end|>``,
  Llama 3 ``<|eot_id|>``, Mistral ``</s>``, Gemma ``<end_of_turn>``;
- the whitespace the template writes right after that token (ChatML's and Gemma's ``"\\n"``) separates turns: it is
  template text, never trained and never generated (generation stops on the token; the template writes the newline
  when it renders the next turn). Phi-3's ``<|end|>`` swallows its newline itself (an ``rstrip`` added token);
- what the template writes to close the whole conversation after the last turn's end-of-turn token, other than
  whitespace (Phi-3's eos ``<|endoftext|>``), is trained with the last turn.

A template without such a token (turns ending in plain text such as ``"### End"``), or no template at all, cannot
say where an answer ends: :func:`turn_end` refuses it with an error naming ``data.chat_template``, where a template
can be given as a Jinja string or a file (:func:`resolve_chat_template`); phitune then saves it with the run's
tokenizer, so eval, chat and export use it too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import ConfigError
from .tokenizer import PHI3_CHAT_TEMPLATE

NAMED_TEMPLATES = {"phi3": PHI3_CHAT_TEMPLATE}
_USER, _REPLY, _NEXT = "PHITUNEQUESTION", "PHITUNEREPLY", "PHITUNENEXT"

TEMPLATE_NEEDS = (
    "Set data.chat_template to a Jinja chat template (the template string, or the path of a .jinja file) that "
    "renders messages[i]['role'] and ['content'] and ends every assistant turn with one special token of the "
    "tokenizer (e.g. <|im_end|>, <|eot_id|>, <end_of_turn>, <|end|>, </s>), and writes the assistant header when "
    "add_generation_prompt is true; phitune saves it with the run's tokenizer for eval, chat and export"
)


def resolve_chat_template(value: str | None, key: str = "data.chat_template") -> str | None:
    """The Jinja text of a ``data.chat_template`` value: None stays None, ``"phi3"`` is Phi-3's template, a string
    with Jinja tags is the template itself, anything else is the path of a file holding it."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: expected a Jinja template string or a file path, got {value!r}")
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not is_local_path(path, file=True):
        raise ConfigError(f"{key}: {value!r} is neither a Jinja template (no {{{{ }}}} or {{% %}} tags) nor an "
                          f"existing file. Give the template text, the path of a .jinja file, or 'phi3'")
    text = path.read_text(encoding="utf-8")
    if "{{" not in text and "{%" not in text:
        raise ConfigError(f"{key}: {path} holds no Jinja tags; it must be a chat template")
    return text


def looks_like_path(value) -> bool:
    """False for what cannot be a file name (a Jinja template: tags, newlines); paths are tried as they are."""
    text = str(value)
    return "{{" not in text and "{%" not in text and "\n" not in text


def is_local_path(value, *, file: bool = False) -> bool:
    """Whether ``value`` names an existing file (``file``) or file or folder; never raises (a name too long for the
    file system is no path)."""
    if not looks_like_path(value):
        return False
    try:
        path = Path(value)
        return path.is_file() if file else path.exists()
    except OSError:
        return False


def with_chat_template(tokenizer, value: str | None):
    """``tokenizer`` with ``data.chat_template`` (see :func:`resolve_chat_template`) as its chat template, when
    given; ``save_pretrained`` then writes it into the run folder. Returns the tokenizer."""
    template = resolve_chat_template(value)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


@dataclasses.dataclass(frozen=True)
class TurnEnd:
    """Where an assistant turn of a template ends: the end-of-turn token (``token``, ``token_id``), the whitespace
    the template writes after it between turns (``separator``) and after it at the end of the conversation
    (``closing``, e.g. Phi-3's ``"\\n<|endoftext|>"``, with the newline its token swallows)."""

    token: str
    token_id: int
    separator: str
    closing: str


def _render(tokenizer, template: str, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)


def _special_ids(tokenizer) -> set[int]:
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(getattr(tokenizer, "all_special_ids", []) or []) | set(decoder)


def turn_end(tokenizer, template: str | None = None) -> TurnEnd:
    """The end of an assistant turn in ``template`` (default: the tokenizer's chat template), found by rendering
    a short conversation with marker contents; a ConfigError naming ``data.chat_template`` when there is no
    template or its assistant turns do not end with a special token."""
    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    template = template or getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise ConfigError(f"{name} has no chat template, so phitune cannot tell where an assistant turn starts and "
                          f"ends. {TEMPLATE_NEEDS}")
    user, reply, nxt = ({"role": "user", "content": _USER}, {"role": "assistant", "content": _REPLY},
                        {"role": "user", "content": _NEXT})
    try:
        middle, last = _render(tokenizer, template, [user, reply, nxt]), _render(tokenizer, template, [user, reply])
    except Exception as exc:  # any template error (TemplateError, raise_exception, a missing variable)
        raise ConfigError(f"the chat template of {name} cannot render a user/assistant/user conversation "
                          f"({type(exc).__name__}: {exc}). {TEMPLATE_NEEDS}") from None
    if _REPLY not in middle or _REPLY not in last:
        raise ConfigError(f"the chat template of {name} does not write the assistant's message content. "
                          f"{TEMPLATE_NEEDS}")
    after = middle.split(_REPLY, 1)[1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    if not ids or ids[0] not in _special_ids(tokenizer):
        shown = after[:40] if after else "nothing"
        raise ConfigError(f"the chat template of {name} ends an assistant turn with {shown!r}, not with a special "
                          f"token phitune can stop generation on. {TEMPLATE_NEEDS}")
    token = tokenizer.convert_ids_to_tokens(ids[0])
    if not after.startswith(token):
        raise ConfigError(f"the chat template of {name} writes {after[:40]!r} after an assistant turn, which does "
                          f"not start with its first token {token!r}. {TEMPLATE_NEEDS}")
    rest = after[len(token):]
    separator = rest[:len(rest) - len(rest.lstrip())]
    closing = last.split(_REPLY, 1)[1]
    return TurnEnd(token=token, token_id=int(ids[0]), separator=separator,
                   closing=closing[len(token):] if closing.startswith(token) else closing)


def end_of_turn_id(tokenizer) -> int | None:
    """The end-of-turn token id of the tokenizer's chat template, or None where :func:`turn_end` finds none (no
    template: plain-text training). Never raises: stop lists are written for every run."""
    try:
        return turn_end(tokenizer).token_id
    except ConfigError:
        return None


def trained_end(text: str, start: int, end: int) -> int:
    """Where the trained text of a turn spanning ``text[start:end]`` ends under the rule: before the whitespace
    the template writes after the end-of-turn token (or after the eos that closes a conversation)."""
    while end > start and text[end - 1].isspace():
        end -= 1
    return end
