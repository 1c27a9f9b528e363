"""How exactly phitune tokenizes as a model's own tokenizer.json defines (issue 22), on Phi-3-mini's real files:
for a folder without and with a config.json, the class AutoTokenizer picks and the one phitune uses, llama.cpp's
46 Phi-3 reference texts tokenized as in its .out file, and the tokens phitune trains on for 5 chats against
tokenizer.json's ids (tokens that differ, and how many of those are trained). Runs in seconds on a CPU.

    python benchmarks/tokenizer_fidelity.py [--tokenizers ../shared/tokenizers]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHATS = [
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"},
     {"role": "user", "content": "Times 4?"}, {"role": "assistant", "content": "20"}],
    [{"role": "user", "content": " leading spaces and\ttabs"}, {"role": "assistant", "content": "  Noted.\n- one"}],
    [{"role": "user", "content": "Äpfel und 🦙?"}, {"role": "assistant", "content": "Ja: 3333 Äpfel."}],
]


def find_tokenizers(given: str | None) -> Path:
    candidates = [Path(given)] if given else []
    candidates += [ROOT.parent / "shared" / "tokenizers", ROOT.parents[1] / "shared" / "tokenizers"]
    for c in candidates:
        if (c / "phi-3-mini" / "tokenizer.json").is_file():
            return c
    raise SystemExit("no ../shared/tokenizers/phi-3-mini/tokenizer.json here; pass --tokenizers DIR")


def reference_agreement(tokenizer, shared: Path) -> tuple[int, int]:
    ref = shared / "llama.cpp-phi-3" / "ggml-vocab-phi-3.gguf"
    texts = ref.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    want = [[int(i) for i in line.split()] for line in ref.with_suffix(".gguf.out").read_text().split("\n")[:-1]]
    equal = sum(tokenizer(t, add_special_tokens=False)["input_ids"] == w for t, w in zip(texts, want))
    return equal, len(texts)


def trained_differences(tokenizer, folder: Path, work: Path) -> tuple[int, int, int]:
    """(tokens not in tokenizer.json's ids of the rendered chat, of them trained, all tokens) over CHATS, as
    phitune's data pipeline tokenizes them with ``tokenizer``; the two id lists aligned with difflib (a missing "▁"
    can merge or split pieces, so the lengths may differ)."""
    import difflib
    import json

    from tokenizers import Tokenizer

    from phitune.data import DataConfig, prepare_data

    shipped = Tokenizer.from_file(str(folder / "tokenizer.json"))
    data = work / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS), encoding="utf-8")
    prepared = prepare_data(DataConfig(train=str(data), max_seq_length=512, cache=False), tokenizer)
    differ = trained = total = 0
    for sample, messages in zip(prepared.train, CHATS):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        want = [tokenizer.bos_token_id] + shipped.encode(text, add_special_tokens=False).ids
        got, labels = sample["input_ids"], sample["labels"]
        for op, a, b, _, _ in difflib.SequenceMatcher(None, got, want, autojunk=False).get_opcodes():
            if op != "equal":
                differ += b - a
                trained += sum(label != -100 for label in labels[a:b])
        total += len(got)
    return differ, trained, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizers", help="the shared tokenizers folder (default: ../shared/tokenizers)")
    parser.add_argument("--smoke", action="store_true", help="the same run: it takes seconds already (CI runs this)")
    args = parser.parse_args()
    shared = find_tokenizers(args.tokenizers)
    logging.getLogger("phitune").setLevel(logging.WARNING)
    from transformers import AutoTokenizer, Phi3Config

    from phitune.config import build_model_config
    from phitune.models.loading import load_tokenizer

    work = Path(tempfile.mkdtemp(prefix="phitune-tokfid-"))
    os.environ.setdefault("PHITUNE_CACHE_DIR", str(work / "cache"))
    try:
        for layout in ("tokenizer-only", "with-config.json"):
            folder = work / layout
            shutil.copytree(shared / "phi-3-mini", folder)
            if layout == "with-config.json":
                Phi3Config().save_pretrained(folder)
            auto = AutoTokenizer.from_pretrained(folder)
            ours = load_tokenizer(build_model_config(str(folder)))
            print(f"{layout}: AutoTokenizer picks {type(auto).__name__}, phitune uses {type(ours).__name__}")
            for name, tok in (("AutoTokenizer", auto), ("phitune", ours)):
                equal, n = reference_agreement(tok, shared)
                differ, trained, total = trained_differences(tok, folder, work)
                user_hello = tok("<|user|>\nHello", add_special_tokens=False)["input_ids"]
                print(f"  {name:13s} llama.cpp reference texts equal: {equal}/{n}; 5 chats: {differ} of {total} "
                      f"tokens differ from tokenizer.json ({trained} trained); <|user|>\\nHello -> {user_hello}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
