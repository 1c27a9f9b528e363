"""phitune.generation.loop: the one batched generation loop (left padding, one KV cache, per-row stops), on the
shared tiny Phi-3 run folder (tests/conftest.py run_dir)."""

from __future__ import annotations

import pytest
import torch

from phitune.generation.generate import build_prompt_ids
from phitune.generation.loop import GenerationSettings, generate_batch
from phitune.generation.stops import stop_token_ids


@pytest.fixture(scope="module")
def tok(run_dir):
    return run_dir["tokenizer"]


def _prompts(tok):
    texts = ["What is 1 plus 2?", "Hi", "Tell me a long story about seven numbers and their friends, please.",
             "And 2 plus 2?", "Why?", "What is 0 plus 3? Answer in words, not digits.", "ok", "Count to three."]
    return [build_prompt_ids(tok, [{"role": "user", "content": t}]) for t in texts]


def test_batched_greedy_generation_equals_one_prompt_at_a_time(tok, run_dir):
    model, stops = run_dir["model"], stop_token_ids(tok, run_dir=run_dir["run"])
    prompts = _prompts(tok)
    assert len({len(p) for p in prompts}) > 3  # left padding really differs between rows
    batched = generate_batch(model, prompts, stop_ids=stops, pad_id=tok.pad_token_id, max_new_tokens=20)
    single = [generate_batch(model, [p], stop_ids=stops, pad_id=tok.pad_token_id, max_new_tokens=20)[0]
              for p in prompts]
    assert [g.ids for g in batched] == [g.ids for g in single]
    assert [g.stopped for g in batched] == [g.stopped for g in single]


def test_greedy_generation_equals_transformers_generate(tok, run_dir):
    model, stops = run_dir["model"], stop_token_ids(tok, run_dir=run_dir["run"])
    for p in _prompts(tok)[:4]:
        mine = generate_batch(model, [p], stop_ids=stops, pad_id=tok.pad_token_id, max_new_tokens=16)[0]
        out = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=16, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)
        ref = out[0, len(p):].tolist()
        expected = mine.ids + ([ref[len(mine.ids)]] if mine.stopped else [])
        assert ref[:len(expected)] == expected


def test_each_row_stops_on_its_own_stop_id_or_limit(tok, run_dir):
    model = run_dir["model"]
    prompts = _prompts(tok)[:3]
    free = generate_batch(model, prompts, stop_ids=[10**6], pad_id=tok.pad_token_id, max_new_tokens=6)
    assert all(len(g.ids) == 6 and not g.stopped for g in free)
    # Row 1's third token as the only stop id: row 1 ends there (without it), the others run to their own limits.
    stop = free[1].ids[2]
    got = generate_batch(model, prompts, stop_ids=[stop], pad_id=tok.pad_token_id, max_new_tokens=[6, 6, 2])
    assert got[1].stopped and got[1].ids == free[1].ids[:free[1].ids.index(stop)]
    assert got[2].ids == free[2].ids[:2] and not got[2].stopped
    first = free[0].ids.index(stop) if stop in free[0].ids else None
    assert got[0].ids == (free[0].ids[:first] if first is not None else free[0].ids)


def test_sampling_is_reproducible_with_a_seeded_generator(tok, run_dir):
    model = run_dir["model"]
    settings = GenerationSettings(max_new_tokens=8, temperature=1.0, top_p=0.9)

    def draw():
        g = torch.Generator().manual_seed(3)
        return [x.ids for x in generate_batch(model, _prompts(tok)[:3], stop_ids=[10**6], pad_id=tok.pad_token_id,
                                              max_new_tokens=8, settings=settings, generator=g)]

    assert draw() == draw()
