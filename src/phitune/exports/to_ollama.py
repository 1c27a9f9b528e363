"""Ollama: the GGUF plus a Modelfile whose TEMPLATE renders the prompt training saw, and the stop tokens.

Ollama renders prompts with Go's text/template, not Jinja, so the Modelfile's template is derived from the run's
chat template: each role's text before and after the message content is found by rendering the Jinja template on
marker messages, and the result is checked to rebuild the template's own rendering of a whole conversation (a
template that does more than wrap each message, e.g. one that numbers turns, is refused rather than approximated).
Ollama adds the BOS itself (the GGUF's add_bos_token), so the template writes none: one BOS, as in training.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..generation.stops import stop_token_ids
from .common import ExportError
from .gguf_tokenizer import folder_tokenizer, template_writes_bos

_NOT_PER_MESSAGE = ("the chat template does more than wrap each message in fixed text, so a Modelfile TEMPLATE cannot "
                    "be derived from it; write the TEMPLATE yourself")
_MARK = "PHITUNE_CONTENT_MARK"
# Ollama keeps the whole context window in memory; a 128k Phi-3 would ask for tens of GB by default.
MAX_NUM_CTX = 4096


def role_pieces(tokenizer) -> tuple[dict[str, tuple[str, str]], str]:
    """``({role: (text before content, text after content)}, generation prompt)`` of the tokenizer's chat template,
    checked to reproduce the template on a system/user/assistant/user conversation."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ExportError("the tokenizer has no chat template, so there is no prompt format to give Ollama; train "
                          "with one (phitune saves it in the run folder) or write the Modelfile's TEMPLATE yourself")
    if template_writes_bos(tokenizer):
        raise ExportError("the chat template writes the BOS token itself, and Ollama adds one: write the Modelfile's "
                          "TEMPLATE yourself without it")

    def render(messages, generation=True) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    m0, m1, m2, m3 = (f"{_MARK}{i}" for i in range(4))

    def parts(messages) -> list[str]:
        """The rendering cut at each message's content (contents are markers)."""
        text = render(messages)
        cuts = []
        for m in messages:
            before, found, text = text.partition(m["content"])
            if not found:
                raise ExportError(_NOT_PER_MESSAGE)
            cuts.append(before)
        return cuts + [text]

    def strip_end(text: str, end: str) -> str:
        if not text.endswith(end):
            raise ExportError(_NOT_PER_MESSAGE)
        return text[:len(text) - len(end)]

    def strip_start(text: str, start: str) -> str:
        if not text.startswith(start):
            raise ExportError(_NOT_PER_MESSAGE)
        return text[len(start):]

    user, assistant = (lambda c: {"role": "user", "content": c}), (lambda c: {"role": "assistant", "content": c})
    # Three turns: P_user m1 (S_user P_assistant) m2 (S_assistant P_user) m3 (S_user G); G = generation prompt.
    p_user, s_user_p_assistant, s_assistant_p_user, s_user_g = parts([user(m1), assistant(m2), user(m3)])
    s_assistant = strip_end(s_assistant_p_user, p_user)
    _, _, s_assistant_g = parts([user(m1), assistant(m2)])
    generation = strip_start(s_assistant_g, s_assistant)
    s_user = strip_end(s_user_g, generation)
    pieces = {"user": (p_user, s_user), "assistant": (strip_start(s_user_p_assistant, s_user), s_assistant)}
    try:
        p_system, s_system_p_user, _ = parts([{"role": "system", "content": m0}, user(m1)])
        pieces["system"] = (p_system, strip_end(s_system_p_user, p_user))
    except Exception:  # noqa: BLE001 - a template without system messages
        pass
    conversation = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}]
    if "system" in pieces:
        conversation.insert(0, {"role": "system", "content": "s"})
        pieces = {"system": pieces["system"], "user": pieces["user"], "assistant": pieces["assistant"]}
    expected = render(conversation)
    rebuilt = "".join(pieces[m["role"]][0] + m["content"] + pieces[m["role"]][1] for m in conversation) + generation
    if rebuilt != expected:
        raise ExportError("the chat template does more than wrap each message in fixed text (rendered "
                          f"{expected!r}, per-message pieces give {rebuilt!r}); write the Modelfile's TEMPLATE "
                          "yourself")
    return pieces, generation


def go_template(pieces: dict[str, tuple[str, str]], generation: str) -> str:
    """An Ollama (Go text/template) TEMPLATE writing each message as the chat template does, then the generation
    prompt. No whitespace-trimming actions: the newlines in the pieces are part of the prompt."""
    for text in [generation, *(p for pair in pieces.values() for p in pair)]:
        if "{{" in text or '"""' in text:
            raise ExportError(f"the chat template's text {text!r} contains '{{{{' or '\"\"\"', which a Modelfile "
                              "TEMPLATE cannot hold verbatim; write the TEMPLATE yourself")
    branches = []
    for i, (role, (before, after)) in enumerate(pieces.items()):
        keyword = "if" if i == 0 else "else if"
        branches.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{before}{{{{ .Content }}}}{after}')
    return "{{ range .Messages }}" + "".join(branches) + "{{ end }}{{ end }}" + generation


def write_modelfile(model_dir: Path, out: Path, gguf_name: str) -> dict:
    """Write ``out/Modelfile`` next to the GGUF: FROM, TEMPLATE, every stop token, num_ctx."""
    tokenizer = folder_tokenizer(model_dir)
    pieces, generation = role_pieces(tokenizer)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer, run_dir=model_dir)]
    num_ctx = min(config.get("max_position_embeddings") or MAX_NUM_CTX, MAX_NUM_CTX)
    lines = ["# Written by `phitune export --to ollama`. Create the model with: ollama create NAME -f Modelfile",
             f"FROM ./{gguf_name}",
             f'TEMPLATE """{go_template(pieces, generation)}"""']
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    (out / "Modelfile").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"modelfile": "Modelfile", "stops": stops, "num_ctx": num_ctx}
