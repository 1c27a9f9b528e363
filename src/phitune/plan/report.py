"""The plan as ``phitune plan`` prints it (``--json``: the plan's data as it is)."""

from __future__ import annotations


def format_plan(p: dict) -> str:
    """Readable lines for a plan returned by ``phitune.plan.plan``; every number labelled as predicted."""
    rows, length = p["micro_batch"]
    pk = p["peak_gib"]
    world = p["world_size"]
    lines = [
        f"phitune plan (PREDICTED on a fake GPU, not measured): {p['model']}",
        f"  shape: {p['layers']} layers from {p['shape_from']}; simulated at {p['simulated_layers']} layers"
        + (" and extrapolated" if len(p["simulated_layers"]) > 1 else ""),
        f"  micro-batch {rows} x {length} tokens ("
        + (f"the largest of the training data's {p['data_batch']['batches_in_epoch']} batches: "
           f"{p['data_batch']['real_tokens']:,} real tokens" if p.get("data_batch") else "worst case: full rows")
        + f"), accumulation "
        f"{p['gradient_accumulation_steps']}, gradient checkpointing {'on' if p['gradient_checkpointing'] else 'off'}"
        f", {p['dtype']}" + (f", {world} processes" if world > 1 else ""),
        f"  predicted peak GPU memory per device (torch.cuda.max_memory_allocated terms): {pk['total']:.2f} GiB",
        f"    base weights {pk['weights']:.2f} | adapter + gradients + optimizer state "
        f"{pk['adapter_gradients_optimizer']:.2f} | activations {pk['activations']:.2f} | backward temporaries "
        f"{pk['backward_temporaries']:.2f}" + (f" | other {pk['other']:.2f}" if pk.get("other") else ""),
        f"  tokens per optimizer step {p['tokens_per_step']:,}; {p['flops_per_step'] / 1e12:,.1f} TFLOP per step "
        f"({p['flops_per_token'] / 1e9:.2f} GFLOP per token)",
        f"  per GPU ({p['margin']}):",
    ]
    for g in p["gpus"]:
        verdict = "REFUSED" if "refused" in g else "fits" if g["fits"] else "DOES NOT FIT"
        line = f"    {g['gpu']:<12} {g['memory_gib']:6.1f} GiB  {verdict:<12} ({g['headroom_gib']:+.1f} GiB left)"
        if "refused" in g:
            line += f"  {g['refused']}"
        elif "step_seconds" in g:
            lo, hi = g["step_seconds"]
            t_lo, t_hi = g["tokens_per_second_per_device"]
            line += f"  step {lo:.3g}-{hi:.3g} s, {t_lo:,}-{t_hi:,} tokens/s per device"
        lines.append(line)
    lines.append(f"  time: {p['time_model']}")
    if p.get("fast_path"):
        lines.append("  fast path: " + "; ".join(p["fast_path"]))
    lines.append("  not modelled:")
    lines += [f"    - {item}" for item in p["not_modelled"]]
    lines.append(f"  (planned in {p['plan_seconds']} s)")
    return "\n".join(lines)
