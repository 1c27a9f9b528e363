"""Record formats -> one normal form (a list of {role, content} messages, or a plain string for ``text``), with
every validation rule the pipeline applies before tokenizing. Each rule returns a :class:`Problem`."""

from __future__ import annotations

import json
from typing import Any

from ..errors import DataError
from .config import DataConfig
from .sources import Problem

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}


def detect_format(rec: Any, cfg: DataConfig, where: str) -> str:
    """The format of a dataset, from its first record's keys (data.format: auto)."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a record is a {type(rec).__name__}, not an object with named fields; cannot "
                        "detect the format. Fix: each record must be a JSON object / table row")
    c = cfg.column
    if c("messages") in rec:
        return "messages"
    if c("conversations") in rec:
        return "conversations"
    if c("instruction") in rec and c("output") in rec:
        return "alpaca"
    if c("prompt") in rec and c("completion") in rec:
        return "prompt_completion"
    if c("text") in rec:
        return "text"
    raise DataError(
        f"{where}: cannot detect the record format from its keys {sorted(rec)[:12]}. Fix: use one of the formats "
        f"messages ({c('messages')!r}), ShareGPT ({c('conversations')!r}), Alpaca ({c('instruction')!r}+"
        f"{c('output')!r}), prompt/completion ({c('prompt')!r}+{c('completion')!r}) or text ({c('text')!r}); "
        "or name your columns with data.columns and set data.format")


def _missing(key: str, rec: dict, fmt: str) -> Problem:
    return Problem("missing field", f"no {key!r} field (format {fmt}; the record has {sorted(rec)[:10]})",
                   f"add {key!r}, or map your column to it with data.columns")


def _content_problem(content: Any, i: int) -> Problem | None:
    if not isinstance(content, str):
        return Problem("non-string content", f"message {i} has content of type {type(content).__name__}",
                       "make every content a string (join multimodal parts into text)")
    if not content.strip():
        return Problem("empty content", f"message {i} has empty content", "remove the message or fill it in")
    return None


def chat_messages(rec: dict, cfg: DataConfig, fmt: str) -> list | Problem:
    """The messages of a ``messages``/``conversations`` record (roles mapped, contents checked), or its Problem."""
    key = cfg.column("messages" if fmt == "messages" else "conversations")
    if key not in rec:
        return _missing(key, rec, fmt)
    msgs = rec[key]
    if isinstance(msgs, str):  # CSV/Parquet cells often hold the list as a JSON string
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError as e:
            return Problem("invalid JSON", f"field {key!r} is a string that is not a JSON list ({e.msg})",
                           "store the messages as a list of {role, content} objects")
    if not isinstance(msgs, list):
        return Problem("not a list", f"field {key!r} is a {type(msgs).__name__}",
                       "store the conversation as a list of messages")
    if not msgs:
        return Problem("empty conversation", f"field {key!r} is an empty list", "remove the record")
    if fmt == "messages":
        rk, ck, table = cfg.column("role"), cfg.column("content"), {r: r for r in ROLES}
    else:
        rk, ck, table = cfg.column("from"), cfg.column("value"), dict(SHAREGPT_ROLES)
        if msgs and isinstance(msgs[0], dict) and rk not in msgs[0] and "role" in msgs[0]:
            rk, ck, table = "role", "content", {r: r for r in ROLES}
    table.update(cfg.role_map)
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or rk not in m or ck not in m:
            got = sorted(m) if isinstance(m, dict) else type(m).__name__
            return Problem("bad message", f"message {i} is not an object with {rk!r} and {ck!r} (got {got})",
                           f"write each message as {{{rk!r}: ..., {ck!r}: ...}} or set data.columns")
        role = table.get(m[rk]) if isinstance(m[rk], str) else None
        if role is None:
            known = ", ".join(sorted(table))
            return Problem("unknown role", f"message {i} has role {m[rk]!r}; known roles: {known}",
                           "rename the role, or map it with data.role_map (e.g. {bot: assistant})")
        p = _content_problem(m[ck], i)
        if p:
            return p
        out.append({"role": role, "content": m[ck]})
    return out


def _alpaca(rec: dict, cfg: DataConfig) -> list | Problem:
    ik, xk, ok, sk = cfg.column("instruction"), cfg.column("input"), cfg.column("output"), cfg.column("system")
    for k in (ik, ok):
        if k not in rec:
            return _missing(k, rec, "alpaca")
    for n, k in ((0, ik), (1, ok)):
        p = _content_problem(rec[k], n)
        if p:
            return Problem(p.reason, f"field {k!r}: " + p.detail.split(" has ", 1)[1], p.fix)
    extra = rec.get(xk)
    if extra is not None and not isinstance(extra, str):
        return Problem("non-string content", f"field {xk!r} is a {type(extra).__name__}", "make it a string")
    user = rec[ik] + ("\n\n" + extra if extra and extra.strip() else "")
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": rec[ok]}]
    sysmsg = rec.get(sk)
    if isinstance(sysmsg, str) and sysmsg.strip():
        msgs.insert(0, {"role": "system", "content": sysmsg})
    return msgs


def _prompt_completion(rec: dict, cfg: DataConfig) -> list | Problem:
    pk, ck = cfg.column("prompt"), cfg.column("completion")
    for k in (pk, ck):
        if k not in rec:
            return _missing(k, rec, "prompt_completion")
    prompt, completion = rec[pk], rec[ck]
    if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt/completion
        return chat_messages({"messages": prompt + completion}, DataConfig(role_map=cfg.role_map), "messages")
    for n, (k, v) in enumerate(((pk, prompt), (ck, completion))):
        p = _content_problem(v, n)
        if p:
            return Problem(p.reason, f"field {k!r}: " + p.detail.split(" has ", 1)[1], p.fix)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def normalize(rec: Any, fmt: str, cfg: DataConfig, *, require_alternation: bool = False) -> list | str | Problem:
    """A record in normal form, or the Problem that makes it unusable."""
    if isinstance(rec, Problem):
        return rec
    if not isinstance(rec, dict):
        return Problem("not an object", f"the record is a {type(rec).__name__}", "write each record as an object")
    if fmt == "text":
        k = cfg.column("text")
        if k not in rec:
            return _missing(k, rec, "text")
        t = rec[k]
        if not isinstance(t, str):
            return Problem("non-string content", f"field {k!r} is a {type(t).__name__}", "make it a string")
        if not t.strip():
            return Problem("empty content", f"field {k!r} is empty", "remove the record")
        return t
    if fmt in ("messages", "conversations"):
        msgs = chat_messages(rec, cfg, fmt)
    elif fmt == "alpaca":
        msgs = _alpaca(rec, cfg)
    else:
        msgs = _prompt_completion(rec, cfg)
    if isinstance(msgs, Problem):
        return msgs
    if cfg.train_on != "all" and not any(m["role"] == "assistant" for m in msgs):
        return Problem("no assistant turn", "the conversation has no assistant message, so nothing would be "
                       "trained", "add the assistant's reply, or set data.train_on: all")
    if require_alternation:
        p = alternation_problem(msgs)
        if p:
            return p
    return msgs


def alternation_problem(msgs: list) -> Problem | None:
    """user/assistant must alternate after an optional leading system message, starting with user."""
    body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            idx = i + (len(msgs) - len(body))
            return Problem("roles do not alternate", f"message {idx} is {m['role']!r} where the chat template "
                           f"requires {want!r} (system first, then user/assistant alternating)",
                           "merge consecutive messages of the same role, or drop the extra ones")
    return None
