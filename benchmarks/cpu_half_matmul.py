"""Half-precision matmuls on this CPU against float32, in the two layouts a linear layer uses in training:
forward x @ Wᵀ (W stored out x in) and the input gradient dY @ W. Why phitune trains in float32 on CPUs without
bfloat16/float16 matrix hardware (phitune.models.loading.cpu_has_fast_half), and warns when asked for half precision
there.

  OMP_NUM_THREADS=2 python benchmarks/cpu_half_matmul.py            # 512 tokens, Phi-3-mini's qkv_proj (3072 -> 9216)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def seconds(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--in-features", type=int, default=3072)
    p.add_argument("--out-features", type=int, default=9216)
    p.add_argument("--smoke", action="store_true", help="smallest size, for CI: it runs; no result")
    a = p.parse_args(argv)
    if a.smoke:  # explicit arguments still win
        p.set_defaults(tokens=16, in_features=64, out_features=96)
        a = p.parse_args(argv)
    from phitune.models.loading import cpu_has_fast_half

    print(json.dumps({"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                      "bf16_hardware": cpu_has_fast_half(torch.bfloat16)}), flush=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.tokens, a.in_features, generator=g)
    W = torch.randn(a.out_features, a.in_features, generator=g)
    dy = torch.randn(a.tokens, a.out_features, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        xc, Wc, dyc = x.to(dtype), W.to(dtype), dy.to(dtype)
        xc @ Wc[:64].t()  # warm-up
        row = {"dtype": str(dtype).replace("torch.", ""),
               "forward_x_Wt_s": round(seconds(lambda: xc @ Wc.t()), 3),
               "input_grad_dY_W_s": round(seconds(lambda: dyc @ Wc), 3)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
