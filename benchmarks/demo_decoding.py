"""Issue 28: is the demo's tuned model sure where it is right? Greedy against sampled answers, and what caps them.

    python benchmarks/demo_decoding.py [--set KEY=VALUE ...] [--smoke]
    python benchmarks/demo_decoding.py --set "peft_config.target_modules=all-linear"   # the demo before issue 28

Runs the demo (:func:`phitune.demo`, its config plus the ``--set`` overrides) in a temporary folder and prints:

- held-out exact match, greedy and sampled at temperature 0.7, top-p 0.9 with seeds 0-4 (both as the demo prints
  them), and the share of sampled answers that ended their turn (an end-of-turn id before the 32-token limit);
- the tuned model's probability of each answer's first token and of ``<|end|>`` right after a correct answer
  (teacher-forced, mean over the held-out questions);
- the ceiling the output layer puts on those two probabilities: the most that *any* final hidden state gives them
  through the model's final RMSNorm and ``lm_head`` (gradient ascent over the hidden state, 1500 Adam steps from a
  fixed start), for the frozen base ``lm_head`` and for the tuned model's (the same module unless ``lm_head`` is
  a LoRA target). LoRA on the layers below can move the hidden state anywhere, never past that ceiling.

``--smoke``: 2 training steps, 8 questions, 200 ascent steps (seconds; checks that the script runs).
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
from pathlib import Path

import torch

from phitune.embedded.demo import HELD_OUT_FILE, MODEL_DIR, demo, read_held_out
from phitune.generation.generate import build_prompt_ids
from phitune.lora import disable_adapters
from phitune.runs.folder import load_run_model


def ceiling(model, token_id: int, *, temperature: float = 1.0, steps: int = 1500) -> float:
    """The highest probability of ``token_id`` over all final hidden states (see the module docstring)."""
    norm, head = model.get_decoder().norm, model.get_output_embeddings()
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    x = torch.randn(model.config.hidden_size, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(steps):
        logp = torch.log_softmax(head(norm(x[None, None]))[0, 0] / temperature, -1)[token_id]
        opt.zero_grad()
        (-logp).backward()
        opt.step()
    return float(logp.detach().exp())


@torch.no_grad()
def answer_probabilities(model, tokenizer, questions) -> tuple[float, float]:
    """Mean probability of the answer's first token and of ``<|end|>`` after the full answer (teacher-forced)."""
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    first, last = [], []
    for q in questions:
        prompt = build_prompt_ids(tokenizer, q["messages"])
        answer = tokenizer(q["answer"], add_special_tokens=False)["input_ids"]
        probs = model(input_ids=torch.tensor([prompt + answer])).logits[0].softmax(-1)
        first.append(float(probs[len(prompt) - 1, answer[0]]))
        last.append(float(probs[-1, end]))
    return sum(first) / len(first), sum(last) / len(last)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a demo config override, as for `phitune demo --set` (repeatable)")
    ap.add_argument("--smoke", action="store_true", help="a tiny run that only checks the script works")
    args = ap.parse_args(argv)

    steps = 200 if args.smoke else 1500
    with tempfile.TemporaryDirectory() as tmp:
        out = io.StringIO()
        result = demo(Path(tmp) / "run", max_steps=2 if args.smoke else None, max_questions=8 if args.smoke else None,
                      overrides=args.overrides, out=out)
        model, tokenizer, _ = load_run_model(result.output_dir, device="cpu")
        per_seed = json.loads((result.output_dir / "demo_answers.json").read_text())["sampled"]["per_seed"]
    model.eval()
    questions = read_held_out(HELD_OUT_FILE)[:result.n_questions]
    correct = [q for q, row in zip(questions, result.answers) if row["tuned_ok"]] or questions
    p_first, _ = answer_probabilities(model, tokenizer, questions)
    _, p_end = answer_probabilities(model, tokenizer, correct)
    first_id = tokenizer(questions[0]["answer"], add_special_tokens=False)["input_ids"][0]
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    with disable_adapters(model):
        base_caps = [ceiling(model, t, steps=steps) for t in (first_id, end_id)]
    tuned_caps = [ceiling(model, t, steps=steps) for t in (first_id, end_id)]

    print(f"demo config overrides: {args.overrides or 'none'}; base model {MODEL_DIR.name}/, "
          f"{result.n_questions} held-out questions{' (smoke)' if args.smoke else ''}")
    print(f"held-out exact match: greedy {result.after:.1%}; sampled (temperature 0.7, top-p 0.9, 5 seeds) "
          f"{result.after_sampled:.1%}, answers that ended their turn {result.ended_sampled:.1%}")
    print("  per seed: " + ", ".join(f"{r['exact_match']:.0%} exact / {r['stopped']:.0%} ended" for r in per_seed))
    first = tokenizer.convert_ids_to_tokens(first_id)
    print(f"P(first token {first!r}) {p_first:.3f}, P(<|end|> after a correct answer) {p_end:.3f}")
    print(f"ceiling through the base lm_head:  {first!r} {base_caps[0]:.4f}, <|end|> {base_caps[1]:.4f}")
    print(f"ceiling through the tuned lm_head: {first!r} {tuned_caps[0]:.4f}, <|end|> {tuned_caps[1]:.4f}")
    print(f"demo wall time {result.wall_s:.0f} s, {torch.get_num_threads()} CPU threads (on a shared machine, "
          "wall time depends on the load)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
