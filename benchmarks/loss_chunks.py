"""The chunked lm_head loss (phitune.training.fast.cross_entropy.HeadCrossEntropy), forward + backward, at several
chunk sizes, in float32 and bfloat16: the measurement behind cross_entropy.default_chunk's CPU rule.

Timed as the thread's CPU time with one thread (best of --repeat), so a loaded shared machine changes little: the
neighbours take wall time, not this thread's CPU time. "default" marks the chunk default_chunk picks for that dtype
on this device. bfloat16 is skipped at full size on a CPU without bfloat16 matrix hardware (it would take minutes).

  python benchmarks/loss_chunks.py                       # 1,022 positions (small's 2 x 512 blocks), Phi-3's head
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from phitune.models.loading import cpu_has_fast_half  # noqa: E402
from phitune.training.fast.cross_entropy import HeadCrossEntropy, default_chunk  # noqa: E402


def cpu_seconds(step, repeat: int) -> float:
    """Best thread CPU time of ``repeat`` calls, after one warm-up call."""
    step()
    best = float("inf")
    for _ in range(repeat):
        t = time.thread_time()
        step()
        best = min(best, time.thread_time() - t)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--positions", type=int, default=1022)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32064)
    p.add_argument("--chunks", default="2092,1024,512,384,256,128", help="chunk sizes (positions) to time")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="smallest size, for CI: it runs; no result")
    a = p.parse_args(argv)
    if a.smoke:  # explicit arguments still win
        p.set_defaults(positions=64, hidden=64, vocab=512, chunks="64,16", repeat=1)
        a = p.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    print(json.dumps({"positions": a.positions, "hidden": a.hidden, "vocab": a.vocab, "threads": 1,
                      "bf16_hardware": cpu_has_fast_half(torch.bfloat16)}), flush=True)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(a.vocab, a.hidden, generator=g) * a.hidden**-0.5
    hidden = torch.randn(a.positions, a.hidden, generator=g)
    targets = torch.randint(0, a.vocab, (a.positions,), generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        if dtype != torch.float32 and not (a.smoke or cpu_has_fast_half(dtype)):
            print(json.dumps({"dtype": name, "skipped": "no bfloat16 matrix hardware on this CPU"}), flush=True)
            continue
        w, h = weight.to(dtype), hidden.to(dtype).requires_grad_()
        default = default_chunk(a.vocab, dtype, device)
        for chunk in sorted({int(c) for c in a.chunks.split(",")} | {default}, reverse=True):
            def step(chunk=chunk):
                loss, _ = HeadCrossEntropy.apply(h, w, None, targets, chunk, True, False)
                loss.backward()
                h.grad = None

            print(json.dumps({"dtype": name, "chunk": chunk, "default": chunk == default,
                              "cpu_ms": round(cpu_seconds(step, a.repeat) * 1e3, 1)}), flush=True)


if __name__ == "__main__":
    main()
