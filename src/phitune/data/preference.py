"""Preference pairs: records -> (prompt, chosen, rejected) messages -> two samples per pair, rendered as SFT renders.

    prepared = prepare_preference_data(DataConfig(train="pairs.jsonl", max_seq_length=1024), tokenizer)
    plan = pair_plan(prepared.train, pairs_per_batch=4, seed=0, epoch=0)
    batch = collate(prepared.train, plan[0], 1024, packing=False)   # rows: chosen 0, rejected 0, chosen 1, ...

The record forms (TRL's names; ``data.columns`` renames ``prompt``/``chosen``/``rejected``/``role``/``content``):
  explicit prompt   {"prompt": "...", "chosen": "...", "rejected": "..."}
  conversational    {"prompt": [messages], "chosen": [{"role": "assistant", ...}], "rejected": [...]}
  implicit prompt   {"chosen": [messages], "rejected": [messages]}  (everything but the last message is the
                    prompt, and must be the same on both sides: Anthropic HH, UltraFeedback-binarized)
Each side is ``prompt + [reply]`` rendered by ``data.render.Renderer`` (the chat template, exactly one BOS, the reply
closed with its end-of-turn token) with the loss on the reply alone (``train_on: last_assistant``). Pair k is stored
as samples 2k (chosen) and 2k+1 (rejected) of a ``TokenizedSamples``, so a micro-batch of pairs is ``collate`` of
their rows without packing (packing is off for pairs by design: the two sides share a prompt, not a row).

Truncation is SFT's rule applied to the pair: the shared prompt is cut from the left (after the BOS) to
``max_prompt_length``, then further until the longer side fits ``data.max_seq_length``; a cut that would reach the
assistant header or remove the last user turn's content drops the pair instead; what is still too long loses the end
of its reply. Every cut and drop is counted in the stats as for SFT (per pair).
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter

import numpy as np

from ..errors import DataError
from ..runs.atomic import atomic_folder
from .config import DataConfig
from .formats import alternation_problem, chat_messages
from .prepare import (Collector, PreparedData, cache_key, default_cache_dir, eval_route, load_prepared, prepare_data,
                      raise_bad, split_stats)
from .render import DROP_REASONS, Encoded, Renderer
from .sources import Problem, open_source
from .store import SampleWriter, TokenizedSamples, remove_orphans

PAIR_FORMATS = ("explicit prompt", "conversational", "implicit prompt")
_VERSION = 1  # bump when pair rendering changes, to invalidate caches


@dataclasses.dataclass
class Pair:
    """One preference record in normal form: the prompt messages and the two replies (assistant messages)."""

    prompt: list
    chosen: dict
    rejected: dict


def pair_format(rec, cfg: DataConfig) -> str | None:
    """The form of a preference record, from its keys and value types (None when it is not a pair)."""
    if not isinstance(rec, dict) or cfg.column("chosen") not in rec or cfg.column("rejected") not in rec:
        return None
    prompt = rec.get(cfg.column("prompt"))
    if prompt is None:
        return "implicit prompt"
    return "conversational" if isinstance(prompt, list) else "explicit prompt"


def _messages(value, cfg: DataConfig, what: str) -> list | Problem:
    """A list of messages checked by the chat formats' rules (roles, string content)."""
    if isinstance(value, str):  # CSV/Parquet cells often hold the list as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return Problem("not a list", f"field {what!r} is a string that is not a JSON list of messages",
                           "store the messages as a list of {role, content} objects")
    if not isinstance(value, list) or not value:
        return Problem("not a list", f"field {what!r} is {'an empty list' if value == [] else type(value).__name__}",
                       "store the messages as a non-empty list of {role, content} objects")
    msgs = chat_messages({cfg.column("messages"): value}, cfg, "messages")
    if isinstance(msgs, Problem):
        return Problem(msgs.reason, f"field {what!r}: {msgs.detail}", msgs.fix)
    return msgs


def _reply(value, cfg: DataConfig, what: str) -> dict | Problem:
    """A side of a pair with an explicit prompt: a string, or a list holding the one assistant message."""
    if isinstance(value, str):
        if not value.strip():
            return Problem("empty content", f"field {what!r} is empty", "write the reply, or remove the pair")
        return {"role": "assistant", "content": value}
    msgs = _messages(value, cfg, what)
    if isinstance(msgs, Problem):
        return msgs
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        roles = [m["role"] for m in msgs]
        return Problem("not one reply", f"field {what!r} holds roles {roles}; a side of a pair is one assistant "
                       "message", "put the shared turns in 'prompt' and only the reply in chosen/rejected")
    return msgs[0]


def normalize_pair(rec, cfg: DataConfig, *, require_alternation: bool = False) -> Pair | Problem:
    """A preference record as a Pair, or the Problem that makes it unusable."""
    if isinstance(rec, Problem):
        return rec
    form = pair_format(rec, cfg)
    ck, rk, pk = cfg.column("chosen"), cfg.column("rejected"), cfg.column("prompt")
    if form is None:
        got = sorted(rec)[:10] if isinstance(rec, dict) else type(rec).__name__
        return Problem("not a pair", f"a preference record needs {ck!r} and {rk!r} (got {got})",
                       f"write {{{pk!r}: ..., {ck!r}: ..., {rk!r}: ...}}, or map your columns with data.columns")
    if form == "implicit prompt":
        chosen, rejected = _messages(rec[ck], cfg, ck), _messages(rec[rk], cfg, rk)
        for side in (chosen, rejected):
            if isinstance(side, Problem):
                return side
        for what, side in ((ck, chosen), (rk, rejected)):
            if side[-1]["role"] != "assistant" or len(side) < 2:
                return Problem("no reply", f"field {what!r} does not end with an assistant reply after a prompt",
                               "end each side with the assistant message, after the shared turns")
        if chosen[:-1] != rejected[:-1]:
            turn = next(i for i, (a, b) in enumerate(zip(chosen + [None], rejected + [None])) if a != b)
            return Problem("prompts differ", f"{ck!r} and {rk!r} differ at message {turn}, before their last "
                           "message; an implicit prompt is everything but the last message and must be shared",
                           f"make the turns before the replies identical, or give an explicit {pk!r}")
        pair = Pair(chosen[:-1], chosen[-1], rejected[-1])
    else:
        if form == "explicit prompt":
            prompt = rec[pk]
            if not isinstance(prompt, str) or not prompt.strip():
                got = "empty" if isinstance(prompt, str) else f"a {type(prompt).__name__}"
                return Problem("bad prompt", f"field {pk!r} is {got}", "write the prompt as a string or a list of "
                               "messages")
            prompt = [{"role": "user", "content": prompt}]
        else:
            prompt = _messages(rec[pk], cfg, pk)
            if isinstance(prompt, Problem):
                return prompt
        chosen, rejected = _reply(rec[ck], cfg, ck), _reply(rec[rk], cfg, rk)
        for side in (chosen, rejected):
            if isinstance(side, Problem):
                return side
        pair = Pair(prompt, chosen, rejected)
    if pair.prompt[-1]["role"] == "assistant":
        return Problem("prompt ends with the assistant", "the prompt's last message is an assistant turn, so the "
                       "replies would not answer it", "end the prompt with the user message the replies answer")
    if require_alternation:
        p = alternation_problem(pair.prompt + [pair.chosen])
        if p:
            return p
    return pair


# --- rendering --------------------------------------------------------------------------------------------------------


class PairRenderer:
    """Renders and tokenizes pairs with the SFT Renderer (loss on the last assistant turn) and cuts them to size."""

    def __init__(self, tokenizer, cfg: DataConfig, max_prompt_length: int | None = None):
        self.cfg = dataclasses.replace(cfg, train_on="last_assistant", packing=False)
        self.renderer = Renderer(tokenizer, self.cfg, "messages")
        self.max_prompt_length = max_prompt_length
        self.keep_head = 1 if self.renderer.bos_id is not None else 0

    @property
    def require_alternation(self) -> bool:
        return self.renderer.require_alternation

    def encode(self, pairs: list[Pair], wheres: list[str]) -> list[tuple[Encoded, Encoded] | Encoded]:
        """(chosen, rejected) Encoded of every pair, or one Encoded with ``dropped`` set for a pair not kept."""
        r = self.renderer
        convs = [c for p in pairs for c in (p.prompt + [p.chosen], p.prompt + [p.rejected])]
        texts, spans = [], []
        for k, m in enumerate(convs):
            text, sp = r.spans(m, wheres[k // 2])
            texts.append(text)
            spans.append(sp)
        encs = r.backend.encode_batch(texts, add_special_tokens=False)
        out = []
        for k in range(0, len(convs), 2):
            sides = []
            for j in (k, k + 1):
                raw = np.array(encs[j].ids, dtype=np.int32)
                ids, trained = r.finish(raw, r.trained_mask(encs[j].offsets, spans[j]))
                sides.append((ids, trained, len(ids) - len(raw)))
            out.append(self._fit(convs[k], texts[k], encs[k], sides))
        return out

    def _fit(self, chosen_msgs: list, text: str, enc, sides: list) -> tuple[Encoded, Encoded] | Encoded:
        (ci, ct, shift), (ri, rt, _) = sides
        longest = max(len(ci), len(ri))
        if not ct.any() or not rt.any():
            return Encoded(np.zeros(0, np.int32), np.zeros(0, bool), original_length=longest,
                           dropped="no_supervised")
        L = self.cfg.max_seq_length
        if longest > L and self.cfg.truncation != "auto":
            return Encoded(np.zeros(0, np.int32), np.zeros(0, bool), original_length=longest, dropped="too_long")
        prompt = min(int(np.argmax(ct)), int(np.argmax(rt)))  # tokens before the first trained one, header included
        cut = 0
        if self.max_prompt_length is not None and prompt > self.max_prompt_length:
            cut = prompt - self.max_prompt_length
        if longest - cut > L:  # prompt from the left first, as SFT
            cut = min(longest - L, prompt - self.keep_head)
        if cut:
            offsets = np.fromiter((o[0] for o in enc.offsets), dtype=np.int64, count=len(enc.offsets))
            lost = self.renderer.lost_part(chosen_msgs, text, ci, offsets, shift, self.keep_head + cut)
            if lost:
                return Encoded(np.zeros(0, np.int32), np.zeros(0, bool), original_length=longest, dropped=lost)
        return tuple(self.renderer.cut(Encoded(ids, trained, original_length=len(ids)), cut)
                     for ids, trained, _ in sides)


# --- prepare ----------------------------------------------------------------------------------------------------------


def _validate(source, cfg: DataConfig, require_alternation: bool, role: str):
    """Every record of a source checked: (pairs with their locations, bad-record collector, form, record count)."""
    bad = Collector(cfg.max_errors_shown)
    kept, forms, n = [], Counter(), 0
    for where, rec in source:
        n += 1
        p = normalize_pair(rec, cfg, require_alternation=require_alternation)
        if isinstance(p, Problem):
            bad.add(where, p)
        else:
            kept.append((where, p))
            forms[pair_format(rec, cfg)] += 1
    if n == 0:
        raise DataError(f"{source.name}: no records (the file/dataset is empty). Fix: point data.{role} at data "
                        "with at least one pair")
    return kept, bad, ", ".join(f for f, _ in forms.most_common()) or "preference", n


def _tokenize(kept: list, renderer: PairRenderer, writer: SampleWriter, cfg: DataConfig, chunk: int = 256):
    """Encode the pairs into ``writer`` (chosen then rejected); returns SFT-style (counters, examples, untruncated
    lengths) with counts per pair."""
    counters, examples, untruncated = Counter(), [], []
    for start in range(0, len(kept), chunk):
        part = kept[start:start + chunk]
        for (where, _), e in zip(part, renderer.encode([p for _, p in part], [w for w, _ in part])):
            sides = (e,) if isinstance(e, Encoded) else e
            longest = max(s.original_length for s in sides)
            untruncated.append(longest)
            if longest > cfg.max_seq_length:
                counters["over_max_seq_length"] += 1
            if isinstance(e, Encoded):
                counters["dropped:" + e.dropped] += 1
                if len(examples) < cfg.max_errors_shown:
                    examples.append(f"{where} ({longest} tokens): {DROP_REASONS[e.dropped]}")
                continue
            c, r = e
            if c.prompt_tokens_cut or c.answer_tokens_cut or r.answer_tokens_cut:
                counters["truncated"] += 1
                counters["prompt_truncated"] += bool(c.prompt_tokens_cut)
                counters["answer_truncated"] += bool(c.answer_tokens_cut or r.answer_tokens_cut)
                counters["tags_truncated"] += bool(c.tag_tokens_cut or r.tag_tokens_cut)
                counters["prompt_tokens_cut"] += c.prompt_tokens_cut
                counters["answer_tokens_cut"] += c.answer_tokens_cut + r.answer_tokens_cut
                counters["tag_tokens_cut"] += c.tag_tokens_cut + r.tag_tokens_cut
            for s in (c, r):
                writer.add(s.ids, s.trained, where)  # both sides of a pair come from its record (file:line)
    return counters, examples, np.asarray(untruncated, dtype=np.int64)


def _check_too_long(name: str, counters: Counter, examples: list, cfg: DataConfig) -> None:
    if cfg.truncation == "error" and counters["over_max_seq_length"]:
        raise DataError(f"data.{name}: {counters['over_max_seq_length']} pair(s) longer than data.max_seq_length="
                        f"{cfg.max_seq_length}:\n  " + "\n  ".join(examples) + "\nFix: raise data.max_seq_length, "
                        "shorten those pairs, or set data.truncation: auto (or drop)")


def prepare_preference_data(cfg: DataConfig | dict, tokenizer, max_prompt_length: int | None = None) -> PreparedData:
    """Load, validate, render, tokenize, mask and truncate preference pairs (train and eval), cached on disk.

    Every record is validated before any tokenizing (and before any weights load): with ``on_bad_record: error`` a
    DataError lists the bad records as file:line, problem and fix. Returns a PreparedData of kind ``"pairs"``."""
    cfg = DataConfig.from_any(cfg)
    if cfg.train is None:
        raise DataError("data.train: no training data given. Fix: set data.train to a file of preference pairs")
    if cfg.format != "auto":
        raise DataError(f"data.format: {cfg.format!r} is a chat format; preference runs (training_config.method "
                        "dpo/orpo) read pairs ({prompt, chosen, rejected} or {chosen, rejected}). Fix: set "
                        "data.format: auto")
    sources = {"train": open_source(cfg.train, split=cfg.hub_train_split, hub_config=cfg.hub_config, role="train")}
    if cfg.eval is not None:
        sources["eval"] = open_source(cfg.eval, split=cfg.hub_eval_split or cfg.hub_train_split,
                                      hub_config=cfg.hub_config, role="eval")
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps(["pairs", _VERSION, max_prompt_length, cache_key(cfg, tokenizer, sources)]).encode())
    root = cfg.cache_dir or default_cache_dir()
    folder = os.path.join(root, "pairs-" + h.hexdigest())
    if cfg.cache and os.path.exists(os.path.join(folder, "stats.json")):
        return _load(folder, cfg, tokenizer, hit=True)

    renderer = PairRenderer(tokenizer, cfg, max_prompt_length)
    checked = {name: _validate(src, cfg, renderer.require_alternation, name) for name, src in sources.items()}
    for name, (kept, bad, _, n) in checked.items():
        if bad.total and (cfg.on_bad_record == "error" or not kept):
            raise_bad(sources[name].name, bad, n)
    splits = {name: (kept, bad, form, n) for name, (kept, bad, form, n) in checked.items()}
    if "eval" not in sources and cfg.eval_split is not None:
        kept, bad, form, n = checked["train"]
        route = eval_route(np.ones(len(kept), dtype=bool), cfg.eval_split, cfg.seed)
        splits["train"] = ([k for k, e in zip(kept, route) if not e], bad, form, int((~route).sum()))
        splits["eval"] = ([k for k, e in zip(kept, route) if e], None, form, int(route.sum()))

    os.makedirs(root, exist_ok=True)
    remove_orphans(root)
    if cfg.cache:
        with atomic_folder(folder, "the data cache", fix="free space or set data.cache_dir elsewhere") as tmp:
            _write_pairs(str(tmp), splits, renderer, tokenizer, cfg, max_prompt_length, os.path.basename(folder))
        return _load(folder, cfg, tokenizer, hit=False)
    # cache: false: the pairs are read from this scratch folder while the process uses them; removed at exit
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=root)
    try:
        _write_pairs(tmp, splits, renderer, tokenizer, cfg, max_prompt_length, os.path.basename(folder))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atexit.register(shutil.rmtree, tmp, True)
    return _load(tmp, cfg, tokenizer, hit=False)


def _write_pairs(tmp: str, splits: dict, renderer, tokenizer, cfg: DataConfig, max_prompt_length, key: str) -> None:
    """Tokenize every split's pairs into ``tmp`` with their statistics (stats.json last)."""
    stats: dict = {"cache": {"key": key}, "kind": "pairs"}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for name, (kept, bad, form, n) in splits.items():
        writer = SampleWriter(os.path.join(tmp, name))
        counters, examples, untruncated = _tokenize(kept, renderer, writer, renderer.cfg)
        writer.close(pad_token_id=pad)
        _check_too_long(name, counters, examples, cfg)
        samples = TokenizedSamples(os.path.join(tmp, name))
        s = split_stats(n, bad, (counters, examples, untruncated), samples, form, renderer.cfg)
        s["pairs"] = len(samples) // 2
        if not s["pairs"]:
            raise DataError(f"data.{name}: no pair is left to train on ({s['dropped'] or 'none kept'}). Fix: raise "
                            f"data.max_seq_length ({s['fit_max_seq_length']['100%']} fits every pair) or "
                            "training_config.max_prompt_length")
        stats[name] = s
    stats["options"] = {"max_seq_length": cfg.max_seq_length, "train_on": "last_assistant", "packing": False,
                        "max_prompt_length": max_prompt_length, "on_bad_record": cfg.on_bad_record,
                        "bos": renderer.renderer.bos_id is not None,
                        "require_alternation": renderer.require_alternation}
    with open(os.path.join(tmp, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)


def _load(folder: str, cfg: DataConfig, tokenizer, hit: bool) -> PreparedData:
    return load_prepared(folder, cfg, tokenizer, hit, kind="pairs")


def prepare_run_data(data_cfg, tokenizer, training_config) -> PreparedData:
    """The data of a run as its ``training_config.method`` reads it: chats (sft) or preference pairs (dpo, orpo);
    what training, ``phitune preview`` and ``phitune eval`` all prepare."""
    if training_config.method == "sft":
        return prepare_data(data_cfg, tokenizer)
    return prepare_preference_data(data_cfg, tokenizer, training_config.max_prompt_length)


# --- batches ----------------------------------------------------------------------------------------------------------


def pair_plan(samples, pairs_per_batch: int, seed: int = 0, epoch: int = 0) -> list[list[list[int]]]:
    """Micro-batches of pairs, deterministic in (seed, epoch): each a list of rows ``[[2k], [2k + 1], ...]`` (chosen,
    rejected of pair k, in turn), so both sides of a pair are always in the same micro-batch."""
    n = len(samples) // 2
    order = np.random.default_rng([seed, epoch]).permutation(n).tolist()
    return [[[2 * k + side] for k in order[i:i + pairs_per_batch] for side in (0, 1)]
            for i in range(0, n, pairs_per_batch)]


class ChosenReplies:
    """The chosen side of every pair of a pair store, as a sequence of samples (``arrays(i)`` is pair i's chosen):
    what generation-based evaluation answers (prompt from the pair, the chosen reply as the reference)."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples) // 2

    def arrays(self, i: int):
        return self.samples.arrays(2 * i)
