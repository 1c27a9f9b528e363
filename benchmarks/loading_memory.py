"""Host memory of loading the base model for FSDP on one node: peak RSS of each process and of the node (the sum),
2 processes (CPU, gloo) against 1.

A Phi-3-shaped model with random float32 weights is written by save_pretrained, then loaded the way `phitune
train` loads it (``phitune.training.train._model_with_lora``: weights, LoRA, FSDP2 sharding) in:

- ``single``: 1 process (transformers' from_pretrained; the reference);
- ``before``: 2 processes with ``fsdp_config.cpu_ram_efficient_loading: false``, every process reading the whole
  model with from_pretrained (the path phitune took before issue 26);
- ``after``: 2 processes, the default: all build the model on the meta device, rank 0 alone reads the safetensors
  one tensor at a time and sends each process its shard;
- ``ddp``: 2 processes without FSDP, each loading the whole model memory-mapped (from_pretrained).

A process's peak is its VmHWM (peak resident set, file-mapped pages included) from just before loading to just
after, minus its VmRSS just before (torch, transformers, the tokenizer and a first empty model build, the same in
every mode): the memory loading adds. The node's peak is the sum of its processes' peaks, an upper bound (they
need not peak at once). RSS counts a page of the memory-mapped file in every process that reads it, so the
node PSS column (each process's proportional set size after reading its weights, minus before loading; shared
pages divided among their readers) is the one that shows what ``ddp``'s processes share.
Targets (issue 26): node peak with 2 processes <= 1.3 x the single-process peak; each process that does not read
the files below half the model's size.

    python benchmarks/loading_memory.py             # ~430 MB model (float32)
    python benchmarks/loading_memory.py --smoke     # ~180 MB, < 30 s (what tests/training/test_loading_memory.py runs)
    python benchmarks/loading_memory.py --json      # one JSON object on the last line
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

MB = 1e6
# (hidden, intermediate, layers, vocab): the embedding and lm_head about 4% of the weights, as in Phi-3-mini (5%),
# since the lm_head stays whole on every process (phitune.training.fsdp.shard_model)
SIZES = {
    "full": (1024, 2816, 8, 2048),  # 107 M parameters, 0.43 GB in float32
    "smoke": (768, 2048, 6, 2048),  # 45 M parameters, 0.18 GB
}


def _pss() -> int:
    """Proportional set size in bytes: shared pages (a memory-mapped file several processes read) divided among
    them, so the processes' sum is the node's memory."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no Pss in /proc/self/smaps_rollup (Linux 4.14+)")


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def write_model(folder: Path, size: str) -> int:
    """A random float32 Phi-3-shaped model and a small Phi-3-style tokenizer in ``folder``; returns the weights'
    bytes."""
    from transformers import Phi3Config, Phi3ForCausalLM

    from phitune.models.tokenizer import build_phi3_style_tokenizer

    hidden, inter, layers, vocab = SIZES[size]
    tok = build_phi3_style_tokenizer(vocab_size=400)
    cfg = Phi3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                     num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=512,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Phi3ForCausalLM(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    (folder / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                 {"role": "assistant", "content": "hello"}]}) + "\n")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run_config(folder: Path, efficient: bool, fsdp: bool = True) -> dict:
    tc = {"output_dir": str(folder / "out"), "use_cpu": True, "max_steps": 1}
    if fsdp:
        tc.update(fsdp="full_shard", fsdp_config={"transformer_layer_cls_to_wrap": ["Phi3DecoderLayer"],
                                                  "cpu_ram_efficient_loading": efficient})
    return {"model": {"name_or_path": str(folder), "dtype": "float32"},
            "data": {"train": str(folder / "train.jsonl"), "cache": False},
            "training_config": tc, "peft_config": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}}


def _import_what_loading_uses() -> None:
    """Import before measuring what the loading code imports on first use (their code pages are not loading)."""
    import safetensors.torch  # noqa: F401
    import torch.distributed.checkpoint.state_dict  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import transformers.models.phi3.modeling_phi3  # noqa: F401

    import phitune.adapt.inject  # noqa: F401
    import phitune.config  # noqa: F401
    import phitune.models.loading  # noqa: F401
    import phitune.training.train  # noqa: F401


def _read_every_weight(model) -> None:
    """Read each tensor this process holds once, as step 1's forward does: transformers maps the safetensors file,
    and a page counts in RSS only once it is read."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            float((t.to_local() if isinstance(t, DTensor) else t).float().sum())


def _load(rank: int, world: int, port: int, cfg_dict: dict, result: str) -> None:
    """One process: join the group, load the tokenizer, then measure loading the model as `phitune train` does."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    code = 0
    try:
        from phitune.config import load_config
        from phitune.models.loading import load_model_and_tokenizer, load_tokenizer
        from phitune.training import distributed, train
        from phitune.training.metrics import setup_logging

        setup_logging("warning")
        cfg = load_config(cfg_dict)
        created = distributed.init(cfg.training_config)
        tokenizer = load_tokenizer(cfg.model)
        # what a first model build loads once (model classes, caches: 9 MB), the same in every mode: not loading
        load_model_and_tokenizer(cfg.model, device="cpu", tokenizer=tokenizer, weights=False)
        distributed.barrier()
        before, pss_before = _status("VmRSS"), _pss()
        Path("/proc/self/clear_refs").write_text("5")  # restart VmHWM (the peak) from the current RSS
        started = time.perf_counter()
        model, *_ = train._model_with_lora(cfg, torch.device("cpu"), tokenizer)
        seconds = time.perf_counter() - started
        _read_every_weight(model)
        peak = _status("VmHWM")
        distributed.barrier()  # every process has read its weights: the shared pages are shared now
        pss = _pss() - pss_before
        Path(result).write_text(json.dumps({"rank": rank, "rss_before": before, "peak": peak,
                                            "loading_peak": peak - before, "pss_after": pss, "seconds": seconds}))
        distributed.finish(created)
    except BaseException:  # noqa: BLE001 - the parent sees the exit code
        __import__("traceback").print_exc()
        code = 1
    os._exit(code)


def measure(folder: Path, world: int, efficient: bool, fsdp: bool = True) -> list[dict]:
    """Per-process results of loading ``folder`` in ``world`` forked processes."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    results = [str(folder / f"result-{world}-{efficient}-{fsdp}-{r}.json") for r in range(world)]
    procs = [ctx.Process(target=_load, args=(r, world, port, run_config(folder, efficient, fsdp), results[r]))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"a loading process failed: exit codes {[p.exitcode for p in procs]}")
    return [json.loads(Path(r).read_text()) for r in results]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a ~180 MB model (< 30 s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _import_what_loading_uses()  # once, here: the forked loaders share these pages and skip the imports
        # written in a child, so the forked loaders do not inherit the writer's pages
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        writer = ctx.Process(target=lambda: queue.put(write_model(folder, "smoke" if args.smoke else "full")))
        writer.start()
        model_bytes = queue.get()
        writer.join()
        runs = {"single": measure(folder, 1, False), "before": measure(folder, 2, False),
                "after": measure(folder, 2, True), "ddp": measure(folder, 2, False, fsdp=False)}
    single = runs["single"][0]["loading_peak"]
    report = {"model_bytes": model_bytes, "single_peak": single}
    print(f"model: {model_bytes / MB:.0f} MB of float32 weights (save_pretrained, random); peak RSS added by loading:")
    print(f"  {'mode':<8}{'process peaks (MB)':<26}{'node peak (MB)':>15}{'x single':>10}{'node PSS (MB)':>15}"
          f"{'seconds':>9}")
    for mode, results in runs.items():
        peaks = [r["loading_peak"] for r in results]
        node, pss = sum(peaks), sum(r["pss_after"] for r in results)
        report[mode] = {"process_peaks": peaks, "node_peak": node, "ratio": node / single, "node_pss": pss,
                        "seconds": max(r["seconds"] for r in results)}
        print(f"  {mode:<8}{' + '.join(f'{p / MB:.0f}' for p in peaks):<26}{node / MB:>15.0f}"
              f"{node / single:>10.2f}{pss / MB:>15.0f}{report[mode]['seconds']:>9.1f}")
    after = report["after"]
    others = after["process_peaks"][1:]
    print(f"targets: node peak after {after['ratio']:.2f}x single (<= 1.3); non-reading process "
          f"{max(others) / model_bytes:.2f}x the model (< 0.5)")
    if args.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
