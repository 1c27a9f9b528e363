"""The fast paths of prepare_data (quick Jinja renders, chunk-wide masks, worker processes) give exactly the output
of the reference path (Template.render, one mask per sample, one process): token ids, labels and statistics."""

import json
import random

import pytest

from phitune.data import DataConfig, prepare_data, render
from phitune.models.tokenizer import build_phi3_style_tokenizer

WORDS = ("the a of to and in is you that it for on with as are this be at have or from by one what all code "
         "train token loss model").split()
ODD = ["héllo wörld", "naïve café", "e\u0301 combining", "你好，世界", "こんにちは", "🙂🚀 emoji 👍🏽", "مرحبا بالعالم",
       "tab\there", "  leading and trailing spaces  ", "line\n\nbreaks\n", "ends with newline\n", "x",
       "literal <|end|> marker in the text", "<|user|> looks like a turn", "a\u00a0non-breaking space",
       "zero\u200bwidth", "\u2028line separator", "1234567890 3.14159", "```python\ndef f():\n    return 1\n```"]


def _text(rng: random.Random, lo: int, hi: int) -> str:
    parts = []
    for _ in range(rng.randint(lo, hi)):
        if rng.random() < 0.15:
            parts.append(rng.choice(ODD))
        else:
            parts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))).capitalize() + ".")
    return " ".join(parts)


def varied_records(n: int = 300, seed: int = 0) -> list:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": _text(rng, 1, 3)}] if rng.random() < 0.4 else []
        long = rng.random() < 0.1
        for _ in range(rng.randint(1, 6 if long else 3)):
            msgs.append({"role": "user", "content": _text(rng, 1, 8 if long else 3)})
            msgs.append({"role": "assistant", "content": _text(rng, 1, 30 if long else 6)})
        out.append({"messages": msgs})
    return out


def _dump(p):
    out = {}
    for split in ("train", "eval"):
        s = getattr(p, split)
        if s is not None:
            out[split] = [s[i] for i in range(len(s))]
    stats = {k: v for k, v in p.stats.items() if k != "cache"}
    return out, stats


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("fast") / "varied.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=bool(i % 2)) + "\n" for i, r in enumerate(varied_records())))
    return f


def _prepare(tok, tmp_path, tag, data, monkeypatch, *, fast: bool, workers: int, **kw):
    monkeypatch.setattr(render.Renderer, "fast", fast)
    monkeypatch.setenv("PHITUNE_DATA_WORKERS", str(workers))
    cfg = DataConfig(train=data, cache_dir=str(tmp_path / tag), **kw)
    return _dump(prepare_data(cfg, tok))


OPTIONS = [
    dict(max_seq_length=2048),
    dict(max_seq_length=96),  # many conversations truncated: turns dropped, prompt cut, answers cut
    dict(max_seq_length=160, train_on="all", eval_split=0.2),
    dict(max_seq_length=2048, train_on="last_assistant", eval_split=37),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_fast_paths_match_the_reference(tok, tmp_path, data_file, monkeypatch, opts):
    ref = _prepare(tok, tmp_path, "ref", str(data_file), monkeypatch, fast=False, workers=0, **opts)
    fast = _prepare(tok, tmp_path, "fast", str(data_file), monkeypatch, fast=True, workers=0, **opts)
    pooled = _prepare(tok, tmp_path, "pool", str(data_file), monkeypatch, fast=True, workers=2, **opts)
    assert len(ref[0]["train"]) > 100
    assert fast == ref
    assert pooled == ref
    if opts["max_seq_length"] == 96:
        assert ref[1]["train"]["truncated"] > 20 and ref[1]["train"]["turns_dropped"] > 0


def test_fast_paths_match_for_in_memory_records_and_text(tok, tmp_path, monkeypatch):
    recs = varied_records(120, seed=1)
    texts = [{"text": _text(random.Random(i), 1, 12)} for i in range(80)]
    for tag, data, kw in (("recs", recs, {"max_seq_length": 128}), ("text", texts, {"max_seq_length": 64})):
        ref = _prepare(tok, tmp_path, tag + "ref", data, monkeypatch, fast=False, workers=0, **kw)
        assert _prepare(tok, tmp_path, tag + "fast", data, monkeypatch, fast=True, workers=0, **kw) == ref
        assert _prepare(tok, tmp_path, tag + "pool", data, monkeypatch, fast=True, workers=2, **kw) == ref


def test_quick_render_matches_template_render(tok):
    r = render.Renderer(tok, DataConfig(train="x"), "messages")
    assert r._quick is not None
    for rec in varied_records(50, seed=2):
        m = rec["messages"]
        for gen in (False, True):
            assert r._quick(m, gen) == tok.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)


def test_worker_errors_reach_the_caller(tok, tmp_path, monkeypatch):
    """A record the template rejects fails with its location, from a worker process too."""
    t = build_phi3_style_tokenizer()
    t.chat_template = ("{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no boom') }}"
                       "{% endif %}{{ m['role'] + ': ' + m['content'] + '<|end|>\n' }}{% endfor %}")
    recs = varied_records(40, seed=3)
    recs[33]["messages"][-1]["content"] = "boom"
    from phitune.errors import DataError

    for workers in (0, 2):
        monkeypatch.setenv("PHITUNE_DATA_WORKERS", str(workers))
        with pytest.raises(DataError, match=r"data.train item 33: the chat template failed"):
            prepare_data(DataConfig(train=recs, cache_dir=str(tmp_path / f"e{workers}")), t)
