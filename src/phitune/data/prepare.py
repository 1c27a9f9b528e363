"""prepare_data: sources -> validated records -> tokens and labels on disk (cached) -> PreparedData.

Two streaming passes, memory flat in the number of records: pass 1 parses and validates every record (one flag
per record kept); pass 2 reads the valid ones again in tasks of ~1k records, renders, tokenizes, masks and truncates
them (in forked worker processes, one per core, for large data sets; at most 2 tasks per worker in flight) and
appends each task's samples, in order, to the store's files (read back with pread, see store.py)."""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import tempfile
from collections import Counter, deque
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from ..errors import DataError
from ..models.chat_template import resolve_chat_template
from ..runs.atomic import atomic_folder
from .batching import packing_efficiency
from .config import DataConfig
from .formats import detect_format, normalize
from .render import DROP_REASONS, Renderer
from .sources import Problem, open_source
from .store import SampleWriter, TokenizedSamples, remove_orphans

# bump when tokenization, masking or the cache layout change, to invalidate caches (3: sources.jsonl; 4: turn ends)
PIPELINE_VERSION = 4
CHUNK = 512  # records per encode_batch call: big enough for the Rust tokenizer's threads, small for flat memory
WORKER_CHUNK = 1024  # records per task of a worker process (it tokenizes single-threaded)
PARALLEL_MIN_RECORDS = 20_000  # fewer valid records: tokenize in this process (a pool's start is not worth it)
# DataConfig fields that do not change the tokens (batching/caching only)
_NOT_IN_KEY = {"packing", "cache", "cache_dir", "max_errors_shown"}


@dataclass
class PreparedData:
    """Tokenized train and eval samples and the statistics of how they were made."""

    train: TokenizedSamples
    eval: TokenizedSamples | None
    stats: dict
    tokenizer: Any = None
    config: DataConfig | None = None
    kind: str = "chats"  # or "pairs": preference pairs, chosen and rejected as samples 2k and 2k+1 (data.preference)


def default_cache_dir() -> str:
    return os.environ.get("PHITUNE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "phitune", "data")


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides a tokenizer's ids: its class, whole pipeline, special tokens and chat template (Phi-3's files as a
    rebuilt LlamaTokenizer and as tokenizer.json differ in both: issue 22's old caches are never read back)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer)).encode())
    h.update(repr(sorted((getattr(tokenizer, "special_tokens_map", {}) or {}).items())).encode())
    h.update(repr(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()


def cache_key(cfg: DataConfig, tokenizer, sources: dict) -> str:
    """The data cache's key: every data option that changes the samples, the tokenizer and the sources' contents."""
    opts = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in _NOT_IN_KEY | {"train", "eval"}}
    opts["chat_template"] = resolve_chat_template(cfg.chat_template)  # a file's text, not its name
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([PIPELINE_VERSION, opts, tokenizer_fingerprint(tokenizer),
                         {k: s.fingerprint() for k, s in sources.items()}], sort_keys=True, default=str).encode())
    return h.hexdigest()


class Collector:
    """Bad-record bookkeeping: counts by reason and the first N messages."""

    def __init__(self, n_shown: int):
        self.n_shown = n_shown
        self.by_reason: Counter = Counter()
        self.shown: list[str] = []

    def add(self, where: str, p: Problem) -> None:
        self.by_reason[p.reason] += 1
        if len(self.shown) < self.n_shown:
            self.shown.append(p.message(where))

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())


def _validate(source, cfg: DataConfig, fmt: str | None, require_alternation: bool, role: str):
    """Pass 1: parse and validate every record (no tokenizing). Returns (format, ok flags, collector)."""
    bad = Collector(cfg.max_errors_shown)
    ok = bytearray()
    for where, rec in source:
        if fmt is None and not isinstance(rec, Problem):
            fmt = detect_format(rec, cfg, where)
        if fmt is None:  # a parse problem before any record told us the format
            p = rec
        else:
            p = normalize(rec, fmt, cfg, require_alternation=require_alternation)
        if isinstance(p, Problem):
            bad.add(where, p)
            ok.append(0)
        else:
            ok.append(1)
    if not ok:
        raise DataError(f"{source.name}: no records (the file/dataset is empty). Fix: point data.{role} at data "
                        "with at least one record")
    if fmt is None:
        fmt = "messages"
    return fmt, np.frombuffer(bytes(ok), dtype=np.uint8).astype(bool), bad


def raise_bad(name: str, bad: Collector, n: int) -> None:
    """The DataError listing a source's bad records (file:line, problem, fix) and their count by reason."""
    reasons = ", ".join(f"{r}: {c}" for r, c in bad.by_reason.most_common())
    more = f"\n  ... and {bad.total - len(bad.shown)} more" if bad.total > len(bad.shown) else ""
    raise DataError(
        f"{name}: {bad.total} bad record(s) of {n} (first {len(bad.shown)} shown):\n  " + "\n  ".join(bad.shown)
        + more + f"\nBy reason: {reasons}\nFix the records, or set data.on_bad_record: skip to drop them "
        "(the count and reasons are then reported)."
    )


def _tasks(source, ok: np.ndarray, route: np.ndarray | None, size: int):
    """Pass 2's work list: the valid records, read again in order, in tasks of ``size`` records:
    ``(decode, units, to_eval)`` (see Source.units; to_eval: a flag per record, True where it goes to eval)."""
    n = len(ok)
    k = 0
    cur, units, dests = None, [], []
    for decode, unit in source.units():
        if k >= n:
            raise DataError(f"{source.name}: more records than when it was validated; the data changed while "
                            "being prepared. Fix: run again once it stops changing")
        good = ok[k]
        d = bool(route[k]) if route is not None else False
        k += 1
        if not good:
            continue
        if units and (decode is not cur or len(units) >= size):
            yield cur, units, dests
            units, dests = [], []
        cur = decode
        units.append(unit)
        dests.append(d)
    if units:
        yield cur, units, dests


def _encode_task(renderer: Renderer, cfg: DataConfig, task) -> tuple:
    """Normalize, render, tokenize, mask and truncate one task's records (in this process or a worker). Returns
    ``(ids, trained, lengths, to_eval, sources, counters, untruncated)``: the kept samples concatenated (int32 ids,
    uint8 trained flags), their lengths, destinations and records (file:line), the truncation/drop counters by
    destination (with the first ``max_errors_shown`` dropped or too long samples as "where (N tokens): reason"), and
    the untruncated length and destination of every sample, dropped ones included."""
    decode, units, dests = task
    pairs = units if decode is None else decode(units)
    items = [normalize(rec, renderer.fmt, cfg, require_alternation=renderer.require_alternation)
             for _, rec in pairs]
    wheres = [w for w, _ in pairs]
    del pairs, units
    counters: dict = {}
    examples: dict = {}
    ids, trained, lens, to_eval, sources = [], [], [], [], []
    encoded = renderer.encode_chunk(items, wheres)
    for e, d, where in zip(encoded, dests, wheres):
        c = counters.get(d)
        if c is None:
            c = counters[d] = Counter()
            examples[d] = []
        if e.original_length > cfg.max_seq_length:
            c["over_max_seq_length"] += 1
        if e.dropped is not None:
            c["dropped:" + e.dropped] += 1
            if len(examples[d]) < cfg.max_errors_shown:
                examples[d].append(f"{where} ({e.original_length} tokens): {DROP_REASONS[e.dropped]}")
            continue
        if e.turns_dropped or e.prompt_tokens_cut or e.answer_tokens_cut:
            c["truncated"] += 1
            c["turns_truncated"] += bool(e.turns_dropped)
            c["prompt_truncated"] += bool(e.prompt_tokens_cut)
            c["answer_truncated"] += bool(e.answer_tokens_cut)
            c["tags_truncated"] += bool(e.tag_tokens_cut)
            c["turns_dropped"] += e.turns_dropped
            c["prompt_tokens_cut"] += e.prompt_tokens_cut
            c["answer_tokens_cut"] += e.answer_tokens_cut
            c["tag_tokens_cut"] += e.tag_tokens_cut
        ids.append(e.ids)
        trained.append(e.trained)
        lens.append(len(e.ids))
        to_eval.append(d)
        sources.append(where)
    if ids:
        ids_a = np.concatenate(ids).astype(np.int32, copy=False)
        tr_a = np.concatenate(trained).astype(np.uint8, copy=False)
    else:
        ids_a, tr_a = np.zeros(0, np.int32), np.zeros(0, np.uint8)
    untruncated = (np.array([e.original_length for e in encoded], dtype=np.int64), np.array(dests, dtype=bool))
    return (ids_a, tr_a, np.array(lens, dtype=np.int64), np.array(to_eval, dtype=bool),
            np.array(sources, dtype=object), counters, (examples, *untruncated))


# -- worker processes ------------------------------------------------------------------------------------------------
_WORKER_STATE = None  # (renderer, cfg), set before the pool forks; each worker holds its own copy (and tokenizer)


def _worker_run(task) -> tuple:
    renderer, cfg = _WORKER_STATE
    return _encode_task(renderer, cfg, task)


def num_workers(n_records: int) -> int:
    """Worker processes for pass 2: $PHITUNE_DATA_WORKERS when set (0 or 1: none), else one per available core
    (at most 8) once there are PARALLEL_MIN_RECORDS valid records; 0 where fork is unavailable."""
    env = os.environ.get("PHITUNE_DATA_WORKERS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise DataError(f"PHITUNE_DATA_WORKERS={env!r}: not an integer. Fix: set it to a worker count "
                            "(0 = tokenize in the main process)") from None
    elif n_records < PARALLEL_MIN_RECORDS:
        return 0
    else:
        n = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1), 8)
    if n < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return 0
    return n


def _results(tasks, renderer: Renderer, cfg: DataConfig, workers: int):
    """Results of the tasks, in task order: here, or from ``workers`` forked processes with a bounded number of
    tasks in flight (memory stays flat however many records there are)."""
    global _WORKER_STATE
    if not workers:
        for t in tasks:
            yield _encode_task(renderer, cfg, t)
        return
    _WORKER_STATE = (renderer, cfg)
    # Each worker tokenizes single-threaded (the workers are the parallelism). Set while forking, so the children
    # inherit it and `tokenizers` does not warn about forking after its thread pool was used; restored after.
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = multiprocessing.get_context("fork").Pool(workers)
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old
    try:
        pending: deque = deque()
        for t in tasks:
            pending.append(pool.apply_async(_worker_run, (t,)))
            if len(pending) > 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
        _WORKER_STATE = None


def _tokenize(source, ok: np.ndarray, renderer: Renderer, cfg: DataConfig, writers: dict, route: np.ndarray | None,
              name: str = "train"):
    """Pass 2: normalize, render, tokenize, mask, truncate; stream into the writers. Returns per-split stats."""
    st = {k: Counter() for k in writers}
    examples = {k: [] for k in writers}
    untruncated = {k: [] for k in writers}
    workers = num_workers(int(ok.sum()))
    tasks = _tasks(source, ok, route, WORKER_CHUNK if workers else CHUNK)
    for ids, trained, lens, to_eval, wheres, counters, (ex, full, full_eval) in _results(tasks, renderer, cfg,
                                                                                       workers):
        for d, c in counters.items():
            split = "eval" if d else name
            st[split].update(c)
            examples[split] += ex[d][:max(0, cfg.max_errors_shown - len(examples[split]))]
        for d, part in ((False, full[~full_eval]), (True, full[full_eval])):
            if len(part):
                untruncated["eval" if d else name].append(part)
        if not to_eval.any():
            writers[name].add_many(ids, trained, lens, wheres)
        elif to_eval.all():
            writers["eval"].add_many(ids, trained, lens, wheres)
        else:
            tok_eval = np.repeat(to_eval, lens)
            writers[name].add_many(ids[~tok_eval], trained[~tok_eval], lens[~to_eval], wheres[~to_eval])
            writers["eval"].add_many(ids[tok_eval], trained[tok_eval], lens[to_eval], wheres[to_eval])
    return {k: (st[k], examples[k], np.concatenate(untruncated[k]) if untruncated[k] else np.zeros(0, np.int64))
            for k in writers}


def fitting_length(lengths: np.ndarray, share: float) -> int:
    """The smallest max_seq_length that holds ``share`` of samples with these (untruncated) lengths whole."""
    if not len(lengths):
        return 0
    ordered = np.sort(lengths)
    return int(ordered[max(math.ceil(share * len(ordered)) - 1, 0)])


def split_stats(n_records, bad: Collector, tokenized: tuple, samples: TokenizedSamples, fmt: str,
                cfg: DataConfig) -> dict:
    """A split's stats.json entry: records, bad records, lengths, truncation and drops (``tokenized``: the
    (counters, examples, untruncated lengths) of its tokenizing), packing efficiency when packed."""
    arr = np.asarray(samples.lengths, dtype=np.int64)
    counters, examples, untruncated = tokenized
    pct = {f"p{q}": int(np.percentile(arr, q)) for q in (5, 50, 90, 95, 99)} if len(arr) else {}
    if len(arr):
        pct.update(max=int(arr.max()), mean=float(arr.mean()))
    out = {
        "format": fmt, "records": int(n_records),
        "bad_records": bad.total if bad else 0,
        "bad_by_reason": dict(bad.by_reason) if bad else {},
        "bad_examples": list(bad.shown) if bad else [],
        "samples": len(samples),
        "tokens": int(samples.num_tokens),
        "supervised_tokens": int(samples.num_trained_tokens),
        "supervised_share": float(samples.num_trained_tokens / samples.num_tokens) if samples.num_tokens else 0.0,
        "length_percentiles": pct,
        "truncated": int(counters["truncated"]),
        "turns_dropped": int(counters["turns_dropped"]),
        "prompt_tokens_cut": int(counters["prompt_tokens_cut"]),
        "answer_truncated": int(counters["answer_truncated"]),
        "answer_tokens_cut": int(counters["answer_tokens_cut"]),
        "tag_tokens_cut": int(counters["tag_tokens_cut"]),
        # samples that lost each part (one sample can lose several)
        "truncated_parts": {"older turns": int(counters["turns_truncated"]),
                            "prompt": int(counters["prompt_truncated"]),
                            "answer": int(counters["answer_truncated"]), "role tags": int(counters["tags_truncated"])},
        "dropped_no_supervised": int(counters["dropped:no_supervised"]),
        "dropped": {r: int(counters["dropped:" + r]) for r in DROP_REASONS if counters["dropped:" + r]},
        "dropped_examples": examples,
        "over_max_seq_length": int(counters["over_max_seq_length"]),
        "fit_max_seq_length": {"95%": fitting_length(untruncated, 0.95), "100%": fitting_length(untruncated, 1.0)},
    }
    if cfg.packing and len(samples):
        pk = packing_efficiency(samples, cfg.max_seq_length, cfg.seed)
        out["packing"] = {"max_seq_length": cfg.max_seq_length, **pk}
    return out


def _dropped_text(split: dict) -> str:
    return ", ".join(f"{DROP_REASONS[r]}: {n}" for r, n in split["dropped"].items()) or "none dropped"


def _check_truncation(stats: dict, cfg: DataConfig) -> None:
    """data.truncation: error: any sample longer than max_seq_length stops here, before any weights load."""
    if cfg.truncation != "error":
        return
    over = {k: v for k, v in stats.items() if isinstance(v, dict) and v.get("over_max_seq_length")}
    if not over:
        return
    lines = []
    for name, s in over.items():
        fit = s["fit_max_seq_length"]
        lines.append(f"data.{name}: {s['over_max_seq_length']} of {s['samples'] + sum(s['dropped'].values())} "
                     f"samples are longer than data.max_seq_length={cfg.max_seq_length} (max_seq_length "
                     f"{fit['95%']} fits 95% of them, {fit['100%']} all):")
        lines += [f"  {e}" for e in s["dropped_examples"]]
    raise DataError("\n".join(lines) + "\nFix: raise data.max_seq_length, shorten those records, or set "
                    "data.truncation: auto (or drop)")


def eval_route(ok: np.ndarray, eval_split, seed: int) -> np.ndarray:
    """Which records go to eval: a deterministic (seeded) choice among the valid ones."""
    valid = np.flatnonzero(ok)
    n = len(valid)
    k = int(round(eval_split * n)) if isinstance(eval_split, float) else int(eval_split)
    if k < 1 or k >= n:
        raise DataError(f"data.eval_split={eval_split} leaves {k} of {n} valid records for eval. Fix: choose a "
                        "fraction/count that leaves at least one record on each side")
    route = np.zeros(len(ok), dtype=bool)
    route[valid[np.random.default_rng(seed).permutation(n)[:k]]] = True
    return route


def prepare_data(cfg: DataConfig | dict | Any, tokenizer) -> PreparedData:
    """Load, validate, render, tokenize, mask and truncate train (and eval) data, cached on disk.

    Every record is validated before any tokenizing. With ``on_bad_record: error`` a DataError lists the bad
    records (file:line, problem, fix); with ``skip`` they are dropped and counted in ``stats``.
    """
    cfg = DataConfig.from_any(cfg)
    if cfg.train is None:
        raise DataError("data.train: no training data given. Fix: set data.train to a file, folder or Hub dataset")
    sources = {"train": open_source(cfg.train, split=cfg.hub_train_split, hub_config=cfg.hub_config, role="train")}
    if cfg.eval is not None:
        sources["eval"] = open_source(cfg.eval, split=cfg.hub_eval_split or cfg.hub_train_split,
                                      hub_config=cfg.hub_config, role="eval")
    key = cache_key(cfg, tokenizer, sources)
    root = cfg.cache_dir or default_cache_dir()
    folder = os.path.join(root, key)
    if cfg.cache and os.path.exists(os.path.join(folder, "stats.json")):
        return load_prepared(folder, cfg, tokenizer, hit=True)

    fmt = None if cfg.format == "auto" else cfg.format
    # A renderer for template checks (alternation) before validation; its format is fixed after detection.
    need_alt = False
    if fmt != "text":
        try:
            need_alt = Renderer(tokenizer, cfg, fmt or "messages").require_alternation
        except DataError:  # no chat template: fine for text data; reported once the format is known
            pass
    checked = {}
    for name, src in sources.items():
        f2, ok, bad = _validate(src, cfg, fmt, need_alt, name)
        checked[name] = (f2, ok, bad)
    if cfg.on_bad_record == "error":
        for name, (f2, ok, bad) in checked.items():
            if bad.total:
                raise_bad(sources[name].name, bad, len(ok))
    for name, (f2, ok, bad) in checked.items():
        if not ok.any():
            raise DataError(f"{sources[name].name}: all {len(ok)} records are bad ({dict(bad.by_reason)}); "
                            "nothing left to train on")

    os.makedirs(root, exist_ok=True)
    remove_orphans(root)
    if cfg.cache:
        with atomic_folder(folder, "the data cache", fix="free space or set data.cache_dir elsewhere") as tmp:
            _write_prepared(str(tmp), sources, checked, cfg, tokenizer, key)
        return load_prepared(folder, cfg, tokenizer, hit=False)
    # cache: false: the samples are read from this scratch folder while the process uses them; removed at exit
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=root)
    try:
        _write_prepared(tmp, sources, checked, cfg, tokenizer, key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atexit.register(shutil.rmtree, tmp, True)
    return load_prepared(tmp, cfg, tokenizer, hit=False)


def _write_prepared(tmp: str, sources: dict, checked: dict, cfg: DataConfig, tokenizer, key: str) -> None:
    """Tokenize the checked records into ``tmp``: one sample store per split and stats.json."""
    stats: dict = {"cache": {"key": key}}
    f_train, ok_train, bad_train = checked["train"]
    renderer = Renderer(tokenizer, cfg, f_train)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if "eval" in sources:
        w = {"train": SampleWriter(os.path.join(tmp, "train"))}
        st = _tokenize(sources["train"], ok_train, renderer, cfg, w, None)
        f_eval, ok_eval, bad_eval = checked["eval"]
        r_eval = renderer if f_eval == f_train else Renderer(tokenizer, cfg, f_eval)
        w["eval"] = SampleWriter(os.path.join(tmp, "eval"))
        st.update(_tokenize(sources["eval"], ok_eval, r_eval, cfg, {"eval": w["eval"]}, None, "eval"))
        n_rec = {"train": len(ok_train), "eval": len(ok_eval)}
        bads = {"train": bad_train, "eval": bad_eval}
        fmts = {"train": f_train, "eval": f_eval}
    else:
        route = eval_route(ok_train, cfg.eval_split, cfg.seed) if cfg.eval_split is not None else None
        w = {"train": SampleWriter(os.path.join(tmp, "train"))}
        if route is not None:
            w["eval"] = SampleWriter(os.path.join(tmp, "eval"))
        st = _tokenize(sources["train"], ok_train, renderer, cfg, w, route)
        n_rec = {"train": len(ok_train)} if route is None else {"train": int((~route).sum()), "eval": int(route.sum())}
        bads = {"train": bad_train, "eval": None}
        fmts = {"train": f_train, "eval": f_train}
    for name, wr in w.items():
        wr.close(pad_token_id=pad)
        s = TokenizedSamples(os.path.join(tmp, name))
        stats[name] = split_stats(n_rec[name], bads[name], st[name], s, fmts[name], cfg)
    _check_truncation(stats, cfg)
    for name in w:
        if stats[name]["samples"] == 0:
            sn = stats[name]
            raise DataError(f"data.{name}: no sample is left to train on ({_dropped_text(sn)}). Fix: raise "
                            f"data.max_seq_length ({sn['fit_max_seq_length']['100%']} fits every sample), or "
                            "check data.train_on")
    stats["options"] = {"max_seq_length": cfg.max_seq_length, "train_on": cfg.train_on,
                        "packing": cfg.packing, "on_bad_record": cfg.on_bad_record,
                        "bos": renderer.bos_id is not None, "require_alternation": renderer.require_alternation}
    with open(os.path.join(tmp, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)


def load_prepared(folder: str, cfg: DataConfig, tokenizer, hit: bool, kind: str = "chats") -> PreparedData:
    """The prepared data in ``folder`` (a cache entry or a scratch folder): chats, or pairs (data.preference)."""
    with open(os.path.join(folder, "stats.json")) as f:
        stats = json.load(f)
    stats["cache"] = {"key": stats.get("cache", {}).get("key"), "path": folder, "hit": hit}
    train = TokenizedSamples(os.path.join(folder, "train"))
    ev = TokenizedSamples(os.path.join(folder, "eval")) if os.path.exists(os.path.join(folder, "eval")) else None
    return PreparedData(train=train, eval=ev, stats=stats, tokenizer=tokenizer, config=cfg, kind=kind)
