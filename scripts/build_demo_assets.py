"""Build the assets of `phitune demo`: a tiny pretrained Phi-3-architecture model, its tokenizer and a chat dataset.

Everything here is written for phitune and generated from a seed, so the assets can be rebuilt and checked:

    nice -n 5 .venv/bin/python scripts/build_demo_assets.py          # writes src/phitune/embedded/assets/ (~16 min
                                                                     # CPU-contended; weights reproduce bit for bit
                                                                     # with the default --threads 1)

The story the demo tells. A made-up village world: a few hundred invented people, each with a home town, a job and a
favourite colour. The base model is pretrained (here, on the CPU, in a few minutes) on plain prose about *all* of
them, never seeing a chat turn or a question. The bundled chat dataset asks questions about some of the people in
Phi-3's chat format; the held-out prompts ask about the others. The base model cannot answer in that format (it has
never seen ``<|user|>``, ``<|assistant|>`` or ``<|end|>``); after a LoRA fine-tune on the chat data it answers
questions about people it was never fine-tuned on, with facts it could only have read during pretraining.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "phitune" / "embedded" / "assets"
SEED = 20240607

# ---------------------------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------------------------
N_PEOPLE = 300
N_TUNE = 200  # people the chat dataset talks about; the others are held out

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "st", "th", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "m", "k"]
_SURNAME_ENDS = ["wick", "dale", "more", "ford", "ley", "ton", "ham", "by", "well", "stone"]

TOWNS = ["Ambervale", "Brindle", "Cobbleton", "Dunmere", "Elmsford", "Fernhollow", "Gullwater", "Hazelrun",
         "Ironbrook", "Juniper Bay", "Kestrel Point", "Larkspur", "Millhaven", "Nettlefield", "Oakhurst", "Pebbleford"]
JOBS = ["baker", "potter", "weaver", "sailor", "farmer", "painter", "miner", "tailor", "doctor", "teacher",
        "carpenter", "fisher", "singer", "gardener", "librarian", "brewer"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "pink", "grey", "brown", "silver"]

ATTRIBUTES = ("town", "job", "colour")


@dataclass(frozen=True)
class Person:
    name: str
    town: str
    job: str
    colour: str


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def make_world(seed: int = SEED, n: int = N_PEOPLE) -> list[Person]:
    """``n`` invented people with unique first names and uniformly drawn attributes (deterministic)."""
    rng = random.Random(seed)
    firsts: list[str] = []
    seen: set[str] = set()
    while len(firsts) < n:
        name = (_syllable(rng) + _syllable(rng)).capitalize()
        if name not in seen and 4 <= len(name) <= 9:
            seen.add(name)
            firsts.append(name)
    people = []
    for first in firsts:
        surname = (_syllable(rng) + rng.choice(_SURNAME_ENDS)).capitalize()
        people.append(Person(f"{first} {surname}", rng.choice(TOWNS), rng.choice(JOBS), rng.choice(COLOURS)))
    return people


# ---------------------------------------------------------------------------------------------------------------
# Pretraining prose: several phrasings per fact, facts in random order, so that what the model stores is the fact
# and not one sentence (knowledge stored from a single fixed phrasing is hard to extract with a new question).
# ---------------------------------------------------------------------------------------------------------------
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


FACT_SENTENCES = {
    "town": ["{name} lives in {town}.", "{name} has a house in {town}.", "The home of {name} is in {town}.",
             "{name} is from {town}.", "In {town} lives {name}."],
    "job": ["{name} works as {a_job}.", "{name} is {a_job} by trade.", "The job of {name} is {job}.",
            "{name} earns a living as {a_job}.", "By day {name} is {a_job}."],
    "colour": ["{name} likes the colour {colour}.", "The favourite colour of {name} is {colour}.",
               "{name} loves {colour} things.", "{name} always wears {colour}.", "{colour} is what {name} likes best."],
}


def _fill(template: str, p: Person) -> str:
    s = template.format(name=p.name, town=p.town, job=p.job, a_job=f"{_article(p.job)} {p.job}", colour=p.colour)
    return s[0].upper() + s[1:]


def bio(p: Person, rng: random.Random) -> str:
    facts = list(ATTRIBUTES)
    rng.shuffle(facts)
    return " ".join(_fill(rng.choice(FACT_SENTENCES[a]), p) for a in facts)


# ---------------------------------------------------------------------------------------------------------------
# Chat data
# ---------------------------------------------------------------------------------------------------------------
QUESTIONS = {
    "town": ["Where does {name} live?", "Which town is {name} from?", "In which town does {name} live?",
             "What is the home town of {name}?"],
    "job": ["What does {name} do for a living?", "What is the job of {name}?", "What is {name}'s job?",
            "How does {name} earn a living?"],
    "colour": ["What is the favourite colour of {name}?", "Which colour does {name} like?",
               "What colour does {name} like best?", "What is {name}'s favourite colour?"],
}
# Answers never start with the name: BPE spells a word differently at the start of a text ("Zothen" -> Z|o|the|n)
# than after a space (" Zothen" -> Zo|the|n), and a model cannot copy a name from the question in a spelling it has
# never copied in pretraining; measured: name-first answers reached 1% held-out exact match (the tuned model
# answered with names of people from the training conversations).
ANSWERS = {
    "town": "The home of {name} is in {town}.",
    "job": "The job of {name} is {job}.",
    "colour": "The favourite colour of {name} is {colour}.",
}
SYSTEM_PROMPTS = ["You answer questions about the people of the valley.",
                  "You are a helpful assistant. Answer in one sentence.",
                  "Answer briefly and truthfully."]


def question(p: Person, attr: str, rng: random.Random) -> str:
    return _fill(rng.choice(QUESTIONS[attr]), p)


def answer(p: Person, attr: str) -> str:
    return _fill(ANSWERS[attr], p)


def conversation(people: list[Person], rng: random.Random) -> dict:
    """One chat record: sometimes a system prompt, one to three question/answer turns (about one or two people)."""
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    n_turns = rng.choice([1, 1, 2, 3])
    who, asked = rng.choice(people), set()
    for _ in range(n_turns):
        if rng.random() < 0.25 or len(asked) == len(ATTRIBUTES):
            who, asked = rng.choice(people), set()
        attr = rng.choice([a for a in ATTRIBUTES if a not in asked])
        asked.add(attr)
        messages.append({"role": "user", "content": question(who, attr, rng)})
        messages.append({"role": "assistant", "content": answer(who, attr)})
    return {"messages": messages}


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and model
# ---------------------------------------------------------------------------------------------------------------
VOCAB_SIZE = 1024  # trained BPE entries; names split into 2-4 pieces, common words are one token
PRETRAIN_STEPS = 400
MODEL_SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=512)


def tokenizer_corpus(people: list[Person]) -> list[str]:
    rng = random.Random(SEED + 1)
    texts = [bio(p, rng) for p in people for _ in range(3)]
    texts += [_fill(q, p) for p in people for qs in QUESTIONS.values() for q in qs]
    return texts + SYSTEM_PROMPTS


def build_tokenizer(people: list[Person]):
    from phitune.models.tokenizer import build_phi3_style_tokenizer

    return build_phi3_style_tokenizer(tokenizer_corpus(people), VOCAB_SIZE)


def new_model(tokenizer, seed: int = SEED):
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    vocab = 64 * math.ceil(len(tokenizer) / 64)  # Phi-3 pads its embedding too (32011 tokens, 32064 rows)
    config = Phi3Config(
        vocab_size=vocab, **MODEL_SHAPE, original_max_position_embeddings=MODEL_SHAPE["max_position_embeddings"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, use_cache=True,
    )
    torch.manual_seed(seed)
    return Phi3ForCausalLM(config)


# ---------------------------------------------------------------------------------------------------------------
# Pretraining: plain next-token prediction on freshly phrased biographies of every person
# ---------------------------------------------------------------------------------------------------------------
def pretrain_batch(people, tokenizer, rng: random.Random, batch_size: int, seq_len: int):
    """``batch_size`` rows of ``seq_len`` tokens: <s> then biographies (one per line) in random order."""
    import torch

    rows = []
    nl = tokenizer("\n", add_special_tokens=False)["input_ids"]
    while len(rows) < batch_size:
        ids = [tokenizer.bos_token_id]
        while len(ids) < seq_len + 1:
            ids += tokenizer(bio(rng.choice(people), rng), add_special_tokens=False)["input_ids"] + nl
        rows.append(ids[: seq_len + 1])
    return torch.tensor(rows)


def pretrain(model, tokenizer, people, *, steps: int, batch_size: int = 32, seq_len: int = 128, lr: float = 3e-3,
             warmup: int = 50, seed: int = SEED, log_every: int = 50, probe=None):
    import torch

    rng = random.Random(seed)
    torch.manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )
    model.train()
    t0, n_tok = time.time(), 0
    for step in range(1, steps + 1):
        batch = pretrain_batch(people, tokenizer, rng, batch_size, seq_len)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        n_tok += batch[:, 1:].numel()
        if step % log_every == 0 or step == steps:
            el = time.time() - t0
            msg = (f"step {step}/{steps} loss {loss.item():.3f} lr {sched.get_last_lr()[0]:.2e} "
                   f"{n_tok / el:.0f} tok/s {el:.0f}s")
            if probe is not None:
                msg += " " + probe(model)
            print(msg, flush=True)
    model.eval()
    return model


def prose_recall(model, tokenizer, people, attrs=ATTRIBUTES) -> float:
    """Fraction of (person, attribute) facts the model completes from a prose prefix ("X lives in" -> town)."""
    import torch

    prefixes = {"town": "{name} lives in", "job": "{name} works as", "colour": "The favourite colour of {name} is"}
    ok = n = 0
    model.eval()
    with torch.no_grad():
        for p in people:
            for a in attrs:
                prompt = _fill(prefixes[a], p)
                target = " " + (f"{_article(p.job)} {p.job}" if a == "job" else getattr(p, a))
                ids = tokenizer(prompt)["input_ids"]
                tgt = tokenizer(target, add_special_tokens=False)["input_ids"]
                x = torch.tensor([ids + tgt])
                pred = model(input_ids=x).logits[0, len(ids) - 1 : -1].argmax(-1).tolist()
                ok += pred == tgt
                n += 1
    model.train()
    return ok / n


# ---------------------------------------------------------------------------------------------------------------
# The files
# ---------------------------------------------------------------------------------------------------------------
N_TRAIN_CONVERSATIONS = 400
N_EVAL_CONVERSATIONS = 40


def held_out_questions(people: list[Person], rng: random.Random) -> list[dict]:
    """One single-turn question per held-out person (a quarter with a system prompt), with the expected answer."""
    rows = []
    for p in people:
        attr = rng.choice(ATTRIBUTES)
        messages = []
        if rng.random() < 0.25:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        messages.append({"role": "user", "content": question(p, attr, rng)})
        text = answer(p, attr)
        value = {"town": p.town, "job": p.job, "colour": p.colour}[attr]
        # prefix + completion: the same fact as plain prose, to show that the base model knows it
        rows.append({"messages": messages, "answer": text, "person": p.name, "attribute": attr,
                     "prefix": text[: text.rindex(value)].rstrip(), "completion": " " + value + "."})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_data(out: Path, people: list[Person]) -> dict:
    """train.jsonl (tune people), eval.jsonl and held_out.jsonl (held-out people), world.json; returns counts."""
    tune, held = people[:N_TUNE], people[N_TUNE:]
    rng = random.Random(SEED + 2)
    train = [conversation(tune, rng) for _ in range(N_TRAIN_CONVERSATIONS)]
    evals = [conversation(held, rng) for _ in range(N_EVAL_CONVERSATIONS)]
    questions = held_out_questions(held, rng)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", evals)
    write_jsonl(out / "held_out.jsonl", questions)
    world = {"seed": SEED, "tune": [p.__dict__ for p in tune], "held_out": [p.__dict__ for p in held]}
    (out / "world.json").write_text(json.dumps(world, indent=0) + "\n", encoding="utf-8")
    return {"train": len(train), "eval": len(evals), "held_out": len(questions)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="asset folder (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=PRETRAIN_STEPS, help="pretraining steps (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default: %(default)s, which the committed weights were built with)")
    ap.add_argument("--data-only", action="store_true", help="rewrite the JSONL files only, keep the model")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    people = make_world()
    counts = write_data(out, people)
    print(f"data: {counts} -> {out}", flush=True)
    if args.data_only:
        return 0

    t0 = time.time()
    tokenizer = build_tokenizer(people)
    model = new_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: Phi3ForCausalLM {MODEL_SHAPE}, vocab {model.config.vocab_size}, {n_params / 1e6:.2f}M params",
          flush=True)
    pretrain(model, tokenizer, people, steps=args.steps)
    recall_tune = prose_recall(model, tokenizer, people[:N_TUNE])
    recall_held = prose_recall(model, tokenizer, people[N_TUNE:])
    print(f"prose recall after pretraining: tune people {recall_tune:.1%}, held-out people {recall_held:.1%}")

    model_dir = out / "model"
    model.config.use_cache = True
    model.generation_config.eos_token_id = tokenizer.eos_token_id  # a base LM: it only knows end-of-text
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    stats = {"seed": SEED, "pretrain_steps": args.steps, "threads": args.threads,
             "build_seconds": round(time.time() - t0, 1), "parameters": n_params,
             "prose_recall_tune_people": round(recall_tune, 4), "prose_recall_held_out_people": round(recall_held, 4),
             "torch": torch.__version__, **counts}
    (out / "build_info.json").write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {model_dir} in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
