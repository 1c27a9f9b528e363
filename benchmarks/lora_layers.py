"""Forward+backward time of phitune.lora layers vs loralib 0.1.2 and peft, on identical weights and inputs.

    OMP_NUM_THREADS=2 python benchmarks/lora_layers.py [--in-features 3072 --out-features 9216 --r 16
                                                        --tokens 2048 --repeats 5 --dropout 0.0]

Each timed step is ``y = layer(x); y.backward(grad)`` with x requiring grad (as inside a network), the frozen base
weight and trainable lora_A/lora_B. Implementations run round-robin (so background load hits all alike), after a
warm-up, and the best of ``--repeats`` is reported. Outputs and LoRA gradients are checked to agree first.
Needs the bench extras: ``pip install loralib==0.1.2 peft``.
"""

from __future__ import annotations

import argparse
import time

import loralib
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model

import phitune.lora as lora


def _peft_linear(base: nn.Linear, r, alpha, dropout):
    """peft's LoRA Linear wrapping base (through get_peft_model on a one-layer module)."""
    wrapper = nn.Module()
    wrapper.proj = base
    model = get_peft_model(wrapper, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["proj"]))
    return model.base_model.model.proj


def build(args):
    torch.manual_seed(0)
    d_in, d_out, r, alpha, p = args.in_features, args.out_features, args.r, args.lora_alpha, args.dropout
    base = nn.Linear(d_in, d_out)
    A = torch.randn(r, d_in) / d_in ** 0.5
    B = torch.randn(d_out, r) / r ** 0.5
    groups = [True, False, True]
    n_on, size = sum(groups), d_out // len(groups)
    A_m = torch.randn(r * n_on, d_in) / d_in ** 0.5
    B_m = torch.randn(size * n_on, r) / r ** 0.5

    def load(layer, a, b):
        layer.weight.data.copy_(base.weight)
        layer.bias.data.copy_(base.bias)
        layer.lora_A.data.copy_(a)
        layer.lora_B.data.copy_(b)
        return layer

    peft = _peft_linear(nn.Linear(d_in, d_out), r, alpha, p)
    peft.base_layer.load_state_dict(base.state_dict())
    peft.lora_A["default"].weight.data.copy_(A)
    peft.lora_B["default"].weight.data.copy_(B)
    linear = {
        "phitune Linear": load(lora.Linear(d_in, d_out, r=r, lora_alpha=alpha, lora_dropout=p), A, B),
        "loralib Linear": load(loralib.Linear(d_in, d_out, r=r, lora_alpha=alpha, lora_dropout=p), A, B),
        "peft Linear": peft,
    }
    merged = {
        "phitune MergedLinear": load(lora.MergedLinear(d_in, d_out, r=r, lora_alpha=alpha, lora_dropout=p,
                                                       enable_lora=groups), A_m, B_m),
        "loralib MergedLinear": load(loralib.MergedLinear(d_in, d_out, r=r, lora_alpha=alpha, lora_dropout=p,
                                                          enable_lora=groups), A_m, B_m),
    }
    return linear, merged


def _lora_grads(layer):
    return [p.grad for n, p in layer.named_parameters() if "lora_" in n]


def check_agree(layers, x, grad, dropout):
    if dropout > 0:
        return  # dropout masks differ between implementations
    results = []
    for layer in layers.values():
        x.grad = None
        layer.zero_grad()
        y = layer(x)
        y.backward(grad)
        results.append((y.detach(), x.grad.clone(), [g.clone() for g in _lora_grads(layer)]))
    ref = results[0]
    for name, res in zip(list(layers)[1:], results[1:]):
        torch.testing.assert_close(res[0], ref[0], atol=1e-3, rtol=1e-3, msg=f"{name}: output differs")
        torch.testing.assert_close(res[1], ref[1], atol=1e-3, rtol=1e-3, msg=f"{name}: input grad differs")
        for g, g_ref in zip(res[2], ref[2]):
            torch.testing.assert_close(g, g_ref, atol=1e-2, rtol=1e-3, msg=f"{name}: LoRA grad differs")


def time_round_robin(layers, x, grad, warmup, repeats):
    best = {name: float("inf") for name in layers}
    for i in range(warmup + repeats):
        for name, layer in layers.items():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            start = time.perf_counter()
            layer(x).backward(grad)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                best[name] = min(best[name], elapsed)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--in-features", type=int, default=3072)
    ap.add_argument("--out-features", type=int, default=9216, help="divisible by 3 (MergedLinear's 3 groups)")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32)
    ap.add_argument("--dropout", type=float, default=0.0, help="lora_dropout for every implementation")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="smallest size, for CI: it runs; no result")
    args = ap.parse_args(argv)
    if args.smoke:  # explicit arguments still win
        ap.set_defaults(in_features=64, out_features=96, tokens=32, repeats=1)
        args = ap.parse_args(argv)

    linear, merged = build(args)
    x = torch.randn(args.tokens, args.in_features, requires_grad=True)
    grad = torch.randn(args.tokens, args.out_features)
    check_agree(linear, x, grad, args.dropout)
    check_agree(merged, x, grad, args.dropout)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, "
          f"{args.tokens} tokens x {args.in_features} -> {args.out_features}, r={args.r}, "
          f"lora_dropout={args.dropout}, forward+backward, best of {args.repeats}")
    times = {**time_round_robin(linear, x, grad, args.warmup, args.repeats),
             **time_round_robin(merged, x, grad, args.warmup, args.repeats)}
    for name, t in times.items():
        print(f"  {name:<22} {t * 1e3:9.1f} ms")
    ours, ours_m = times["phitune Linear"], times["phitune MergedLinear"]
    print(f"  Linear:       loralib/phitune = {times['loralib Linear'] / ours:.2f}, "
          f"peft/phitune = {times['peft Linear'] / ours:.2f}")
    print(f"  MergedLinear: loralib/phitune = {times['loralib MergedLinear'] / ours_m:.2f} "
          f"(enable_lora=[True, False, True])")


if __name__ == "__main__":
    main()
