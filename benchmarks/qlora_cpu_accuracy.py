"""phitune's 4-bit forward against bitsandbytes' own on this CPU, both against x @ dequant(W).T in float64.

    python benchmarks/qlora_cpu_accuracy.py [--smoke]     (--smoke: only the 64 x 96 layer)

On CPUs with AVX512-BF16, bitsandbytes runs a Linear4bit in eval mode without grad through a bfloat16 kernel
(README, "Tested with"); phitune's 4-bit LoRA layers always dequantize and multiply in the compute dtype.
"""

import argparse

import torch
from torch import nn

from phitune import lora
from phitune.lora.quantized import dequantize_weight


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="smallest size, for CI: it runs; no result")
    a = p.parse_args(argv)
    import bitsandbytes as bnb

    torch.set_num_threads(1)
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    print("avx512_bf16:", "avx512_bf16" in flags, " amx_bf16:", "amx_bf16" in flags)
    for qt in ("nf4", "fp4"):
        for fan_in, fan_out in [(64, 96)] + ([] if a.smoke else [(3072, 3072)]):
            torch.manual_seed(0)
            dense = nn.Linear(fan_in, fan_out)
            q = bnb.nn.Linear4bit(fan_in, fan_out, compute_dtype=torch.float32, quant_type=qt)
            q.load_state_dict(dense.state_dict())
            q = q.to("cpu")
            w = dequantize_weight(q).double()
            x = torch.randn(8, fan_in)
            ref = x.double() @ w.T + q.bias.double()
            ours = lora.Linear4bit.from_linear(q, r=0)
            with torch.no_grad():
                y_ours = ours(x).double()
            q.eval()
            with torch.no_grad():
                y_bnb = q(x).double()  # eval + no grad: bitsandbytes' packed CPU path where it has one
            scale = (x.double().abs() @ w.abs().T).max().item()
            bound = torch.finfo(torch.float32).eps * fan_in * scale
            print(f"{qt} {fan_in}x{fan_out}: max|err| vs float64 x@dequant(W).T: "
                  f"phitune {(y_ours - ref).abs().max():.3e}  bitsandbytes(eval) {(y_bnb - ref).abs().max():.3e}  "
                  f"(float32 eps*K*max sum|x||W| {bound:.3e})")


if __name__ == "__main__":
    main()
