"""Time to prepare one very long conversation that must be truncated: linear in its number of turns.

    python benchmarks/truncation_scaling.py 200 1600 10000
    python benchmarks/truncation_scaling.py --smoke      (20 and 80 turns, for CI)
"""

import argparse
import time

from phitune.data import DataConfig, prepare_data
from phitune.models.tokenizer import build_phi3_style_tokenizer


def main(turns: list[int]) -> None:
    tok = build_phi3_style_tokenizer()
    for n in turns:
        msgs = []
        for k in range(n // 2):
            msgs += [{"role": "user", "content": f"question number {k} about things"},
                     {"role": "assistant", "content": f"answer {k}."}]
        t = time.perf_counter()
        p = prepare_data(DataConfig(train=[{"messages": msgs}], max_seq_length=256, cache=False), tok)
        stats = p.stats["train"]
        print(f"{n} turns: {time.perf_counter() - t:.2f} s, {stats['turns_dropped']} turns dropped, "
              f"{len(p.train[0]['input_ids'])} tokens kept, max_seq_length to fit: {stats['fit_max_seq_length']}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("turns", type=int, nargs="*", default=[200, 1600, 10000])
    ap.add_argument("--smoke", action="store_true", help="smallest size, for CI: it runs; no result")
    args = ap.parse_args()
    main(args.turns if not args.smoke or args.turns != [200, 1600, 10000] else [20, 80])
