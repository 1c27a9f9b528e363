"""Messages -> token ids and a trained-token mask, through the tokenizer's own chat template.

How the mask is derived (no marker strings, no pad ids): the conversation is rendered once in full, and, for every
trained assistant turn i, the template is rendered again for ``messages[:i]`` with the generation prompt (where turn
i's reply starts) and for ``messages[:i+1]`` (where it ends: the longest common prefix with the full rendering, so the
turn's closing ``<|end|>`` is included, and the final eos when i is the last message), less the whitespace after
it (the one rule for the end of a turn: ``models/chat_template.py``; ChatML's ``<|im_end|>\n`` trains
``<|im_end|>``). Both renderings must be prefixes of the full one, or the template is rejected. Those character
spans are mapped onto tokens with the fast tokenizer's offsets, for a whole chunk of conversations in one batched
``encode_batch``.

Speed (the same output, checked against the reference path by tests/data/test_data_fast.py): renders go through the
compiled template with a prebuilt context (Jinja's ``Template.render`` rebuilds a dict of the environment's globals
from a ChainMap on every call); the offsets of a whole chunk become one numpy array, and the mask of the whole chunk
is one ``searchsorted`` (the spans of each conversation shifted by the characters of the ones before it).
``Renderer.fast = False`` selects the reference path (per-sample masks, ``Template.render``).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np

from ..errors import DataError
from ..models.chat_template import TEMPLATE_NEEDS, resolve_chat_template, trained_end, turn_end
from .config import DataConfig


def _lcp(a: str, b: str) -> int:
    """Length of the longest common prefix (binary search on C-level slice comparisons)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class Encoded:
    """One tokenized sample: ids, which tokens are trained, and what truncation did to it. ``dropped`` names the
    reason (a key of DROP_REASONS) when the sample is not trained on; its ids are then empty."""

    ids: np.ndarray
    trained: np.ndarray
    turns_dropped: int = 0
    prompt_tokens_cut: int = 0
    answer_tokens_cut: int = 0
    tag_tokens_cut: int = 0
    original_length: int = 0
    dropped: str | None = None


# Why a sample is not trained on (stats "dropped" keys -> what the console says)
DROP_REASONS = {
    "no_supervised": "no supervised token left",
    "lost_user_turn": "truncation would cut off its last user turn",
    "lost_assistant_header": "truncation would cut off the assistant header before the answer",
    "too_long": "longer than max_seq_length",
}
_EMPTY = np.zeros(0, dtype=np.int32)


def _dropped(reason: str, original_length: int) -> Encoded:
    return Encoded(_EMPTY, np.zeros(0, dtype=bool), original_length=original_length, dropped=reason)


class Renderer:
    """Renders and tokenizes conversations for one tokenizer and DataConfig."""

    fast = True  # False: the reference path (slower, same output)

    def __init__(self, tokenizer, cfg: DataConfig, fmt: str):
        self.tok = tokenizer
        self.cfg = cfg
        self.fmt = fmt
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        if self.backend is None or not getattr(tokenizer, "is_fast", True):
            raise DataError(f"data: the tokenizer ({type(tokenizer).__name__}) is not a fast (Rust) tokenizer; "
                            "phitune needs its offset mappings to place the loss mask. Fix: load it with "
                            "AutoTokenizer.from_pretrained(..., use_fast=True)")
        template = resolve_chat_template(cfg.chat_template) or getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default")
        self.template_str = template
        self.compiled = None
        if fmt != "text":
            if not template:
                raise DataError(
                    f"data: the tokenizer has no chat template, and the data (format '{fmt}') needs one to turn "
                    f"conversations into text. Fix: use the instruct model's tokenizer or format 'text'. "
                    f"{TEMPLATE_NEEDS}")
            if cfg.train_on != "all":  # where each trained answer ends (before any slow work)
                turn_end(tokenizer, template)
            self.compiled = self._compile(template)
        self.kwargs = dict(getattr(tokenizer, "special_tokens_map", {}) or {})
        self._quick = self._quick_renderer() if self.compiled is not None else None
        self.bos_id = tokenizer.bos_token_id if cfg.add_bos is not False else None
        if cfg.add_bos is True and self.bos_id is None:
            raise DataError("data.add_bos: true, but the tokenizer has no bos_token. Fix: set data.add_bos: null")
        self.eos_id = tokenizer.eos_token_id
        self.max_len = cfg.max_seq_length
        self.truncation = cfg.truncation
        # role tags: the template's special tokens (<|user|>, <|assistant|>, <|end|>, ...), counted apart when cut
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        tags = {i for i, t in decoder.items() if getattr(t, "special", False)}
        tags.update(getattr(tokenizer, "all_special_ids", []) or [])
        self.tag_ids = np.array(sorted(tags), dtype=np.int64)
        self.require_alternation = bool(cfg.require_alternation)
        if cfg.require_alternation is None and self.compiled is not None:
            self.require_alternation = self._template_demands_alternation()

    # -- template ------------------------------------------------------------------------------------------------
    def _compile(self, template: str):
        try:  # transformers' own compiled environment, so rendering matches apply_chat_template exactly
            from transformers.utils.chat_template_utils import _compile_jinja_template

            return _compile_jinja_template(template)
        except ImportError:  # pragma: no cover - older/newer transformers: fall back to the public API
            return None

    def _quick_renderer(self):
        """``render`` without Jinja's per-call rebuild of the globals (a ChainMap copied twice per call): the same
        Context the template would get (parent = globals updated by the variables, globals_keys = the globals'
        names), built from a plain-dict snapshot. Checked against ``Template.render`` on probes; None when it
        differs or the Jinja internals are not as expected."""
        c = self.compiled
        try:
            env = c.environment
            if getattr(env, "is_async", False):
                return None
            snapshot = dict(c.globals)
            base = dict(tools=None, documents=None, **self.kwargs)
            concat, context_class, root, name, blocks = env.concat, env.context_class, c.root_render_func, c.name, \
                c.blocks

            def quick(messages, add_generation_prompt):
                parent = dict(snapshot)
                parent.update(base)
                parent["messages"] = messages
                parent["add_generation_prompt"] = add_generation_prompt
                return concat(root(context_class(env, parent, name, blocks, globals=snapshot)))

            probes = [[{"role": "system", "content": "s"}, {"role": "user", "content": " u \n"},
                       {"role": "assistant", "content": "a\u00e9"}],
                      [{"role": "user", "content": "x"}]]
            for m in probes:
                for gen in (False, True):
                    try:
                        want = c.render(messages=m, add_generation_prompt=gen, tools=None, documents=None,
                                        **self.kwargs)
                    except Exception:
                        continue
                    if quick(m, gen) != want:
                        return None
            return quick
        except Exception:  # pragma: no cover - unexpected Jinja internals: use the public API
            return None

    def render(self, messages: list, add_generation_prompt: bool = False) -> str:
        if self._quick is not None and self.fast:
            try:
                return self._quick(messages, add_generation_prompt)
            except Exception:  # render again through the public API, for its exception (and traceback)
                pass
        if self.compiled is not None:
            return self.compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        tools=None, documents=None, **self.kwargs)
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                            chat_template=self.template_str)

    def _template_demands_alternation(self) -> bool:
        probe = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                 {"role": "assistant", "content": "c"}]
        try:
            self.render(probe)
        except Exception:
            return True
        return False

    # -- spans ---------------------------------------------------------------------------------------------------
    def render_full(self, messages: list, where: str = "") -> str:
        """The whole conversation as text; a template error becomes a DataError naming the record."""
        try:
            return self.render(messages)
        except Exception as e:
            if type(e).__name__ == "SecurityError":  # jinja2's sandbox: the template, not the record, is at fault
                raise DataError(f"the chat template does something the sandbox forbids ({e}), first seen on "
                                f"{where}. Fix: correct data.chat_template or the tokenizer's template") from None
            raise DataError(f"{where}: the chat template failed on this record: {e}. Fix: correct the record "
                            "(roles/order the template expects) or set data.on_bad_record: skip") from None

    def spans(self, messages: list, where: str = "", full: str | None = None) -> tuple[str, list[tuple[int, int, int]]]:
        """The full rendering and the spans that get a loss, as (start, end, limit) character positions: a token is
        trained when it starts in [start, end) and ends by ``limit``. ``end`` leaves out the whitespace after a
        turn (the next turn's); ``limit`` is where the rendering of ``messages[:i+1]`` stops agreeing with the
        full one, so a token that reaches into the next turn (``<|user|>``) is never trained, while an end-of-turn
        token that absorbs the newline after it (Phi-3's rstrip added tokens) is. ``full``: the rendering, if known."""
        if full is None:
            full = self.render_full(messages, where)
        mode = self.cfg.train_on
        if mode == "all":
            return full, [(0, len(full), len(full))]
        idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if mode == "last_assistant":
            idx = idx[-1:]
        spans = []
        last = len(messages) - 1
        for i in idx:
            start_text = self.render(messages[:i], add_generation_prompt=True)
            if not full.startswith(start_text):
                raise DataError(f"{where}: the chat template does not render conversations prefix-stably (the "
                                "prompt before an assistant turn is not a prefix of the whole conversation), so the "
                                "loss mask cannot be placed safely. Fix: use data.train_on: all or another template")
            start = len(start_text)
            limit = len(full) if i == last else _lcp(self.render(messages[: i + 1]), full)
            end = trained_end(full, start, limit)  # the turn-end rule: models/chat_template.py
            if end > start:
                spans.append((start, end, limit))
        return full, spans

    # -- tokenize ------------------------------------------------------------------------------------------------
    def finish(self, ids: np.ndarray, trained: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and trained mask with exactly one BOS first (when the model has one); the first token is never
        trained."""
        if self.bos_id is not None:
            n_bos = 0
            while n_bos < len(ids) and ids[n_bos] == self.bos_id:
                n_bos += 1
            if n_bos != 1:  # exactly one BOS, whether the template wrote none, one or several
                ids = np.concatenate([np.array([self.bos_id], dtype=np.int32), ids[n_bos:]])
                trained = np.concatenate([np.zeros(1, dtype=bool), trained[n_bos:]])
        if len(trained):
            trained[0] = False  # the first token is never a target
        return ids, trained

    @staticmethod
    def trained_mask(offsets, spans) -> np.ndarray:
        """Per token (character ``offsets`` of an encoding): whether it lies in one of the trained ``spans`` (start,
        end, limit) that ``spans()`` returns."""
        if not spans or not offsets:
            return np.zeros(len(offsets), dtype=bool)
        off = np.fromiter(chain.from_iterable(offsets), dtype=np.int64, count=2 * len(offsets)).reshape(-1, 2)
        sp = np.array(spans, dtype=np.int64).reshape(-1, 3)
        k = np.searchsorted(sp[:, 0], off[:, 0], side="right") - 1
        kk = np.maximum(k, 0)
        return (k >= 0) & (off[:, 0] < sp[kk, 1]) & (off[:, 1] <= sp[kk, 2])

    def _finished_length(self, ids) -> int:
        """len(ids) after finish (exactly one BOS), without building the array."""
        if self.bos_id is None:
            return len(ids)
        n_bos = 0
        while n_bos < len(ids) and ids[n_bos] == self.bos_id:
            n_bos += 1
        return len(ids) - n_bos + 1

    def encode_chunk(self, items: list, wheres: list) -> list:
        """Tokenize a chunk of normalized records (message lists or texts): a list of Encoded (``dropped`` set for
        the samples not trained on).

        Every conversation is rendered and tokenized once; only those that fit max_seq_length get their loss spans
        (one render per assistant turn) here. A longer one goes to ``_fit``, which never renders more than the part
        it keeps, so the work stays linear in the conversation's length (re-rendering the rest after each dropped
        turn took 239 s for one 1,600-turn conversation)."""
        L = self.max_len
        texts = items if self.fmt == "text" else [self.render_full(m, w) for m, w in zip(items, wheres)]
        encs = self.backend.encode_batch(texts, add_special_tokens=False)
        extra = 1 if self.fmt == "text" and self.eos_id is not None else 0
        lengths = [self._finished_length(e.ids) + extra for e in encs]
        if self.fmt == "text":
            spans = [[(0, len(t), len(t))] for t in texts]
        else:  # an overlong conversation gets its spans once it is cut to size (in _fit)
            spans = [self.spans(m, w, full=t)[1] if n <= L else []
                     for m, w, t, n in zip(items, wheres, texts, lengths)]
        if self.fast:
            pairs = self._chunk_masks(texts, spans, encs)
        else:
            pairs = [(np.fromiter(enc.ids, dtype=np.int32, count=len(enc.ids)),
                      self.trained_mask(enc.offsets, spans[k])) for k, enc in enumerate(encs)]
        del encs
        out = []
        for k, (ids, trained) in enumerate(pairs):
            n = lengths[k]
            if n > L and self.truncation != "auto":  # drop, or error (prepare_data raises after counting them all)
                out.append(_dropped("too_long", n))
                continue
            if n > L and self.fmt != "text":
                out.append(self._fit(items[k], wheres[k], n))
                continue
            if extra:
                ids = np.append(ids, np.int32(self.eos_id))
                trained = np.append(trained, True)
            ids, trained = self.finish(ids, trained)
            e = Encoded(ids, trained, original_length=n)
            if n > L:  # a text: it is all answer
                e = self.cut(e, 0)
            out.append(e if e.trained.any() else _dropped("no_supervised", n))
        return out

    def _chunk_masks(self, texts: list, spans: list, encs: list) -> list:
        """(ids, trained) of every encoding, as _mask computes them one by one, in one pass over the chunk: the
        character offsets of text k and its spans are shifted by the lengths (+1) of texts 0..k-1, so a token of text
        k can only fall into a span of text k (an earlier text's spans end before the shift, a later text's start
        after text k's last character), and one searchsorted serves all."""
        lens = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
        total = int(lens.sum())
        bounds = np.zeros(len(encs) + 1, dtype=np.int64)
        np.cumsum(lens, out=bounds[1:])
        ids = np.fromiter(chain.from_iterable(e.ids for e in encs), dtype=np.int32, count=total)
        off = np.fromiter(chain.from_iterable(chain.from_iterable(e.offsets for e in encs)), dtype=np.int64,
                          count=2 * total).reshape(-1, 2)
        shift = np.zeros(len(texts), dtype=np.int64)
        # one character of gap between texts: a zero-width token at the very end of text k stays below text k+1
        np.cumsum(np.fromiter((len(t) + 1 for t in texts), dtype=np.int64, count=len(texts))[:-1], out=shift[1:])
        n_sp = np.fromiter((len(s) for s in spans), dtype=np.int64, count=len(spans))
        sp = np.array(list(chain.from_iterable(spans)), dtype=np.int64).reshape(-1, 3)
        sp += np.repeat(shift, n_sp)[:, None]
        if len(sp) and not (np.diff(sp[:, 0]) >= 0).all():  # unsorted starts (odd template): one by one
            return [(ids[bounds[k]:bounds[k + 1]], self.trained_mask(e.offsets, spans[k])) for k, e in enumerate(encs)]
        if len(sp) and total:
            start = off[:, 0] + np.repeat(shift, lens)
            end = off[:, 1] + np.repeat(shift, lens)
            j = np.searchsorted(sp[:, 0], start, side="right") - 1
            jj = np.maximum(j, 0)
            trained = (j >= 0) & (start < sp[jj, 1]) & (end <= sp[jj, 2])
        else:
            trained = np.zeros(total, dtype=bool)
        return [(ids[bounds[k]:bounds[k + 1]], trained[bounds[k]:bounds[k + 1]]) for k in range(len(encs))]

    def _fit(self, msgs: list, where: str, n_full: int) -> Encoded:
        """An overlong conversation cut to max_seq_length: first the oldest turns are dropped (whole rounds from a
        user message on; a leading system message stays), then prompt tokens are cut from the left, up to the first
        trained token. A sample whose cut would reach its last user turn's content or the assistant header before
        the answer is dropped instead: an answer fragment without its question teaches nothing wanted."""
        L = self.max_len
        head = msgs[:1] if msgs[0]["role"] == "system" else []
        body = msgs[len(head):]
        last_reply = max((j for j, m in enumerate(body) if m["role"] == "assistant"), default=-1)
        # candidate starts of the kept body: 0 (everything) and every later user message with a reply after it
        starts = [0] + [j for j in range(1, last_reply) if body[j]["role"] == "user"]
        lengths = {0: n_full}

        def length(k: int) -> int:
            if k not in lengths:
                text = self.render_full(head + body[starts[k]:], where)
                lengths[k] = self._finished_length(self.backend.encode(text, add_special_tokens=False).ids)
            return lengths[k]

        # The fewest dropped rounds that fit (lengths shrink as rounds go): gallop back from the newest round, then
        # bisect, so only about twice what is kept is ever rendered, whatever the conversation's length.
        k = len(starts) - 1
        if k > 0 and length(k) <= L:
            step = 1
            while k - step > 0 and length(k - step) <= L:
                k, step = k - step, 2 * step
            bad = max(k - step, 0)
            while k - bad > 1:
                mid = (k + bad) // 2
                if length(mid) <= L:
                    k = mid
                else:
                    bad = mid
        kept = head + body[starts[k]:]
        text, spans = self.spans(kept, where)
        enc = self.backend.encode(text, add_special_tokens=False)
        raw = np.array(enc.ids, dtype=np.int32)
        ids, trained = self.finish(raw, self.trained_mask(enc.offsets, spans))
        e = Encoded(ids, trained, turns_dropped=starts[k], original_length=n_full)
        if len(ids) > L:
            first = int(np.argmax(trained)) if trained.any() else len(ids)
            keep_head = 1 if self.bos_id is not None else 0
            cut = max(0, min(len(ids) - L, first - keep_head))
            if cut and self.cfg.train_on != "all":
                offsets = np.fromiter((o[0] for o in enc.offsets), dtype=np.int64, count=len(enc.offsets))
                lost = self.lost_part(kept, text, ids, offsets, len(ids) - len(raw), keep_head + cut)
                if lost:
                    return _dropped(lost, n_full)
            e = self.cut(e, cut)
        return e if e.trained.any() else _dropped("no_supervised", n_full)

    def lost_part(self, kept: list, text: str, ids: np.ndarray, offsets: np.ndarray, shift: int,
                   cut_to: int) -> str | None:
        """Whether removing tokens before ``cut_to`` takes the assistant header of the first trained reply, or all
        of the content of the user turn before it: the DROP_REASONS key, or None."""
        replies = [j for j, m in enumerate(kept) if m["role"] == "assistant"]
        if not replies:
            return None
        i = replies[-1] if self.cfg.train_on == "last_assistant" else replies[0]

        def token_at(j: int) -> int:
            """The token where kept[j:] starts: the one holding the first character that the rendering of kept[:j]
            does not share with the whole (that common prefix may run into a tag, '<|' of '<|assistant|>')."""
            char = _lcp(self.render(kept[:j]), text) if j else 0
            return max(int(np.searchsorted(offsets, char, side="right")) - 1, 0) + shift

        header = token_at(i)
        if cut_to > header:
            return "lost_assistant_header"
        user = max((j for j in range(i) if kept[j]["role"] == "user"), default=None)
        if user is None:
            return None
        turn = ids[token_at(user):header]
        content = np.flatnonzero(~np.isin(turn, self.tag_ids))
        last = token_at(user) + (int(content[-1]) if len(content) else 0)
        return "lost_user_turn" if cut_to > last else None

    def cut(self, e: Encoded, prompt_cut: int) -> Encoded:
        """Remove ``prompt_cut`` tokens after the BOS, then the end beyond max_seq_length; counts what went."""
        L = self.max_len
        ids, trained = e.ids, e.trained
        keep_head = 1 if self.bos_id is not None else 0
        gone = [ids[keep_head:keep_head + prompt_cut]]
        if prompt_cut:
            ids = np.concatenate([ids[:keep_head], ids[keep_head + prompt_cut:]])
            trained = np.concatenate([trained[:keep_head], trained[keep_head + prompt_cut:]])
        answer_cut = max(0, len(ids) - L)
        if answer_cut:
            gone.append(ids[L:])
            ids, trained = ids[:L], trained[:L]
        if len(trained):
            trained[0] = False
        tags = sum(int(np.isin(g, self.tag_ids).sum()) for g in gone)
        return Encoded(ids, trained, e.turns_dropped, prompt_cut, answer_cut, tags, e.original_length)
