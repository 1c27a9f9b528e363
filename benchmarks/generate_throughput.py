"""Generation throughput of phitune.generation.loop: batched (left-padded, one KV cache) vs one prompt at a time.

    OMP_NUM_THREADS=2 python benchmarks/generate_throughput.py [--prompts 32 --batch 8 --max-new-tokens 32
                                                               --repeats 3 --stops]

The demo's base model (the tiny Phi-3 shipped in phitune/embedded/assets) answers the demo's held-out questions, greedy,
on the CPU. Without ``--stops`` no token ends a row, so every answer is exactly ``--max-new-tokens`` long and both
ways do the same work (with ``--stops``, rows end on ``<|end|>``; the untuned base model rarely emits it). The
answers of both ways are checked to be equal token for token first; then each way runs ``--repeats`` times,
alternating (background load hits both alike), and the best time of each is reported as generated tokens/s.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from phitune.embedded.demo import HELD_OUT_FILE, MODEL_DIR, read_held_out
from phitune.generation.loop import generate_batch
from phitune.generation.stops import stop_token_ids
from phitune.generation.generate import build_prompt_ids
from phitune.models.loading import load_model_and_tokenizer


def run(model, prompts, batch, max_new, stops, pad):
    out = []
    for at in range(0, len(prompts), batch):
        out += generate_batch(model, prompts[at:at + batch], stop_ids=stops, pad_id=pad, max_new_tokens=max_new)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stops", action="store_true", help="rows end on an end-of-turn id (default: none ends)")
    ap.add_argument("--smoke", action="store_true", help="smallest size, for CI: it runs; no result")
    args = ap.parse_args(argv)
    if args.smoke:  # explicit arguments still win
        ap.set_defaults(prompts=4, batch=2, max_new_tokens=4, repeats=1)
        args = ap.parse_args(argv)

    model, tok = load_model_and_tokenizer({"name_or_path": str(MODEL_DIR), "dtype": "float32"}, device="cpu")
    model.eval()
    questions = (read_held_out(HELD_OUT_FILE) * ((args.prompts + 99) // 100))[:args.prompts]
    prompts = [build_prompt_ids(tok, q["messages"]) for q in questions]
    stops = stop_token_ids(tok, model=model) if args.stops else [len(tok) + 10**6]  # an id no row ever produces
    pad = tok.pad_token_id

    batched = run(model, prompts, args.batch, args.max_new_tokens, stops, pad)
    single = run(model, prompts, 1, args.max_new_tokens, stops, pad)
    assert [g.ids for g in batched] == [g.ids for g in single], "batched and one-at-a-time answers differ"
    tokens = sum(len(g.ids) + g.stopped for g in batched)

    best = {"one at a time": float("inf"), f"batch {args.batch}": float("inf")}
    for _ in range(args.repeats):
        for name, size in ((f"batch {args.batch}", args.batch), ("one at a time", 1)):
            t = time.perf_counter()
            run(model, prompts, size, args.max_new_tokens, stops, pad)
            best[name] = min(best[name], time.perf_counter() - t)
    print(f"demo model ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), {len(prompts)} prompts "
          f"({min(map(len, prompts))}-{max(map(len, prompts))} tokens), {tokens} generated tokens, greedy, "
          f"{'stopping on end-of-turn ids' if args.stops else 'no stop id'}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), "
          f"best of {args.repeats}")
    for name, seconds in best.items():
        print(f"  {name:<14} {seconds:7.2f} s  {tokens / seconds:8.0f} tokens/s")
    one, many = best["one at a time"], best[f"batch {args.batch}"]
    print(f"  batched / one at a time: {one / many:.2f}x tokens/s; answers identical token for token")


if __name__ == "__main__":
    main()
