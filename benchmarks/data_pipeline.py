"""Throughput and memory of the chat-data pipeline (validate + render + tokenize + mask + truncate + pack).

    python benchmarks/data_pipeline.py                 # 50k and 200k synthetic conversations, one child each
    python benchmarks/data_pipeline.py --sizes 20000   # quicker

Each size runs in a fresh child process so its peak RSS (ru_maxrss) is its own. Pass 2 (render + tokenize + mask)
runs in worker processes (one per core) once a data set has 20k records (``PHITUNE_DATA_WORKERS`` overrides); their
peak RSS is reported apart (``worker_peak_rss_MB``: the largest worker, ru_maxrss of RUSAGE_CHILDREN). The machine
may be shared: the load average is printed with each result, and ``cpu_s`` (this process and its workers) gives the
throughput the same work would reach on idle cores (``tokens_per_cpu_s`` x cores) for comparison. The synthetic data:
1-4 rounds per
conversation, a system prompt half the time, English-like words, replies of 2-14 sentences
(about 450 tokens a conversation, ultrachat_200k averages more); the tokenizer is phitune's Phi-3-style BPE
(4096 entries) trained on 2000 of the generated conversations.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

WORDS = ("the a of to and in is you that it for on with as are this be at have or from by one what all "
         "were we when your can said there use an each which she do how their if will up other about out many "
         "then them these so some her would make like him into time has look two more write go see number no "
         "way could people my than first water been call who oil its now find long down day did get come made "
         "may part model python function data answer question explain example code train token loss").split()


def conversation(rng: random.Random) -> dict:
    def sent(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    msgs = [{"role": "system", "content": sent(5, 20)}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 4)):
        msgs.append({"role": "user", "content": " ".join(sent(4, 18) for _ in range(rng.randint(1, 3)))})
        msgs.append({"role": "assistant", "content": " ".join(sent(4, 18) for _ in range(rng.randint(2, 14)))})
    return {"messages": msgs}


def generate(path: str, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps(conversation(rng)) + "\n")


def _rss_mb() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                out[line.split(":")[0]] = int(line.split()[1]) // 1024
    return out


def _cpu_s() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def child(n: int, max_seq_length: int) -> dict:
    from phitune.data import DataConfig, batch_plan, collate, prepare_data
    from phitune.models.tokenizer import build_phi3_style_tokenizer

    tmp = tempfile.mkdtemp(prefix="phitune-bench-")
    path = os.path.join(tmp, "chats.jsonl")
    t0 = time.perf_counter()
    generate(path, n)
    gen_s = time.perf_counter() - t0
    rng = random.Random(1)
    corpus = ["\n".join(m["content"] for m in conversation(rng)["messages"]) for _ in range(2000)]
    tok = build_phi3_style_tokenizer(corpus, vocab_size=4096)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = DataConfig(train=path, max_seq_length=max_seq_length, cache_dir=os.path.join(tmp, "cache"))
    load0 = os.getloadavg()
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    prepared = prepare_data(cfg, tok)
    prep_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = batch_plan(prepared.train, 8, max_seq_length, packing=True, seed=0, epoch=0)
    plan_s = time.perf_counter() - t0
    cpu_s = _cpu_s() - cpu0
    load1 = os.getloadavg()
    rss_prepared = _rss_mb()
    t0 = time.perf_counter()
    for entry in plan[:50]:
        collate(prepared.train, entry, max_seq_length, True, "sdpa")
    collate_ms = (time.perf_counter() - t0) / min(50, len(plan)) * 1e3
    t0 = time.perf_counter()
    again = prepare_data(cfg, tok)
    cached_s = time.perf_counter() - t0
    st = prepared.stats["train"]
    tokens = st["tokens"]
    cache_mb = round(sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp) for f in fs
                         if "cache" in d) / 1e6, 1)
    jsonl_mb = round(os.path.getsize(path) / 1e6, 1)
    hit = again.stats["cache"]["hit"]
    del prepared, again, plan
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "conversations": n,
        "jsonl_MB": jsonl_mb,
        "generate_s": round(gen_s, 1),
        "samples": st["samples"],
        "tokens": tokens,
        "supervised_share": round(st["supervised_share"], 3),
        "truncated": st["truncated"],
        "p50_p99_max": [st["length_percentiles"][k] for k in ("p50", "p99", "max")],
        "prepare_s": round(prep_s, 1),
        "batch_plan_s": round(plan_s, 1),
        "end_to_end_tokens_per_s": int(tokens / (prep_s + plan_s)),
        "cpu_s(prepare+plan, incl. workers)": round(cpu_s, 1),
        "tokens_per_cpu_s": int(tokens / cpu_s),
        "load_avg_1m(start,end)": [round(load0[0], 2), round(load1[0], 2)],
        "workers": _workers(n),
        "packing_efficiency": round(st["packing"]["efficiency"], 4),
        "collate_ms_per_batch(8x2048, 4-D mask)": round(collate_ms, 1),
        "cached_reload_s": round(cached_s, 2),
        "cache_hit": hit,
        "rss_before_prepare_MB": rss_before // 1024,
        "peak_rss_after_prepare_and_plan_MB": rss_prepared["VmHWM"],
        "rss_after_prepare_and_plan_MB": rss_prepared["VmRSS"],
        "peak_rss_MB(incl. collate)": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "worker_peak_rss_MB": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024,
        "cache_MB": cache_mb,
    }


def _workers(n: int) -> int:
    from phitune.data.prepare import num_workers

    return num_workers(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000])
    ap.add_argument("--max-seq-length", type=int, default=2048)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="smallest size, for CI: it runs; no result")
    a = ap.parse_args()
    if a.smoke:  # explicit arguments still win
        ap.set_defaults(sizes=[200], max_seq_length=512)
        a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.max_seq_length)))
        return
    print(f"cpus available: {len(os.sched_getaffinity(0))}, python {sys.version.split()[0]}")
    for n in a.sizes:
        print(f"load average before {n}: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--max-seq-length",
                              str(a.max_seq_length)], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:])
            sys.exit(out.returncode)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(r, indent=1), flush=True)


if __name__ == "__main__":
    main()
