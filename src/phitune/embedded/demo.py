"""The embedded default: ``phitune demo`` fine-tunes a tiny bundled Phi-3 on bundled chat data, offline, on the CPU.

Everything it needs ships inside the package (``phitune/embedded/assets/``, built by ``scripts/build_demo_assets.py``):

- ``model/``: a 4-layer ``Phi3ForCausalLM`` (about a million parameters) with a tokenizer that has Phi-3's special
  tokens and chat template. It was pretrained on plain prose about a few hundred invented people (home town, job,
  favourite colour), never on a chat turn.
- ``train.jsonl`` / ``eval.jsonl``: chat conversations (some with a system prompt, some multi-turn) asking about
  some of those people.
- ``held_out.jsonl``: questions about the *other* people, with the expected answers.
- ``demo.yaml``: the run settings (the same as ``examples/demo.yaml``).

The demo fine-tunes the base model with LoRA through :func:`phitune.finetune` (the path ``phitune train`` takes),
then asks the held-out questions to the base model (the LoRA layers switched off) and to the fine-tuned one, through
phitune.evals.generation (the path of ``phitune eval --generate --compare-base``), which writes ``eval/report.html``.
The base model cannot answer: it has never seen ``<|user|>``, ``<|assistant|>`` or ``<|end|>``. The tuned one
answers questions about people it was never fine-tuned on, with facts it can only have read in pretraining: LoRA
taught it the chat format and how to retrieve what it knew.

The answers are scored greedy (the demo's headline figure) and sampled at temperature 0.7, top-p 0.9 with five seeds
(how a chat user may decode): a model right but unsure passes the first and fails the second. The LoRA targets
include ``lm_head`` for that reason (issue 28; demo.yaml gives the numbers): the base's output layer alone caps
``<|end|>`` at 0.024 and the answers' first token at 0.56, whatever the layers below it learn.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..runs import ownership as outdir
from ..config import load_config
from ..data import prepare_data
from ..errors import PhituneError
from ..evals import report
from ..evals.generation import EVAL_DIR, REPORT_FILE, SAMPLES_FILE, evaluate_samples_by_generation
from ..generation.generate import GenerationSettings
from ..lora import disable_adapters
from ..training.metrics import METRICS_NAME, read_metrics
from ..generation.stops import stop_token_ids
from ..models.loading import load_model_and_tokenizer
from ..training.train import finetune

ASSETS = Path(__file__).resolve().parent / "assets"
MODEL_DIR = ASSETS / "model"
CONFIG_FILE = ASSETS / "demo.yaml"
TRAIN_FILE = ASSETS / "train.jsonl"
EVAL_FILE = ASSETS / "eval.jsonl"
HELD_OUT_FILE = ASSETS / "held_out.jsonl"
DEFAULT_OUTPUT_DIR = "phitune-demo"
# How the demo also samples the held-out answers (once per seed), besides greedy decoding: the settings
# `phitune chat` sampled with by default before issue 28, a common choice for chat models.
SAMPLED = GenerationSettings(temperature=0.7, top_p=0.9)
SAMPLED_SEEDS = 5


@dataclass
class DemoResult:
    """What :func:`demo` measured. ``before``/``after``: exact-match accuracy on the held-out questions (greedy);
    ``after_sampled``/``ended_sampled``: the tuned model's exact match and share of answers that ended their turn,
    sampled at temperature 0.7, top-p 0.9 (mean of 5 seeds)."""

    output_dir: Path
    before: float
    after: float
    n_questions: int
    wall_s: float
    peak_rss_mb: float
    base_prose_recall: float = 0.0
    after_sampled: float = 0.0
    ended_sampled: float = 0.0
    answers: list[dict] = field(default_factory=list, repr=False)
    train_metrics: dict[str, Any] = field(default_factory=dict, repr=False)
    report: Path | None = None


def demo(output_dir: str | os.PathLike | None = None, *, max_steps: int | None = None,
         max_questions: int | None = None, show: int = 5, overrides: Sequence[str] | None = None,
         out=None) -> DemoResult:
    """Fine-tune the bundled tiny Phi-3 on the bundled chat data and print held-out answers before and after.

    ``output_dir``: the run folder (default ``./phitune-demo``; an earlier demo run there is replaced, any other
    non-empty folder is refused).
    ``max_steps`` shortens training and ``max_questions`` the evaluation (tests use both); ``overrides`` are
    ``section.key=value`` strings as for ``phitune train --set``. Returns a :class:`DemoResult`.
    """
    started = time.perf_counter()
    out = out or sys.stdout
    say = lambda *a: print(*a, file=out, flush=True)  # noqa: E731
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on a network
    _check_assets()

    import torch

    output_dir = Path(output_dir if output_dir is not None else DEFAULT_OUTPUT_DIR)
    # The demo's config starts over in its folder (overwrite_output_dir): only ever in an earlier demo's.
    outdir.check_output_folder(output_dir, what="demo --out", owned=outdir.is_demo_folder, owner="phitune demo",
                               choose="choose another folder: phitune demo --out NEW_DIR (demo(output_dir=...))")
    (output_dir / outdir.DEMO_MARKER).write_text(json.dumps({"written_by": "phitune demo"}) + "\n", encoding="utf-8")
    settings = [f"model.name_or_path={MODEL_DIR}", f"data.train={TRAIN_FILE}", f"data.eval={EVAL_FILE}",
                f"training_config.output_dir={output_dir}",
                # phitune.data's scratch space inside the run folder, so the demo leaves nothing in ~/.cache
                f"data.cache_dir={output_dir / 'data_cache'}"]
    if max_steps is not None:
        settings.append(f"training_config.max_steps={max_steps}")
    config = load_config(CONFIG_FILE, settings + list(overrides or []))
    questions = read_held_out(HELD_OUT_FILE)[:max_questions]

    model, tokenizer = load_model_and_tokenizer(config.model, device="cpu")
    n_params = sum(p.numel() for p in model.parameters())
    n_train = _count_lines(TRAIN_FILE)
    mc = model.config
    say("phitune demo: LoRA fine-tuning of a tiny Phi-3 on the CPU, offline, with everything bundled in the package.")
    say(f"  base model  {mc.num_hidden_layers}-layer Phi3ForCausalLM (hidden {mc.hidden_size}, "
        f"{n_params / 1e6:.1f}M parameters, vocabulary {len(tokenizer)}), pretrained by "
        "scripts/build_demo_assets.py on prose about invented people; it has never seen a chat turn")
    say(f"  chat data   {n_train} conversations about some of those people; {len(questions)} held-out questions "
        "about the others")
    pc = config.peft_config
    tc = config.training_config
    say(f"  LoRA        r={pc.r}, lora_alpha={pc.lora_alpha}, target_modules={pc.target_modules}; "
        f"lr {tc.learning_rate:g}, {tc.num_train_epochs:g} epochs" if tc.max_steps < 0 else
        f"  LoRA        r={pc.r}, lora_alpha={pc.lora_alpha}, target_modules={pc.target_modules}; "
        f"lr {tc.learning_rate:g}, {tc.max_steps} steps")
    say("")
    del model  # finetune loads its own; the base model is that one with the LoRA layers switched off

    t = time.perf_counter()
    say(f"[1/2] LoRA fine-tuning with phitune.finetune (settings: examples/demo.yaml) -> {output_dir}")
    result = finetune(config)
    timings = {"finetune_s": time.perf_counter() - t}
    t = time.perf_counter()
    say(f"[2/2] the base model (LoRA switched off) and the fine-tuned one answer the {len(questions)} held-out "
        f"questions -> {Path(result.output_dir) / EVAL_DIR / REPORT_FILE}")
    model = result.model
    with disable_adapters(model):
        knows = prose_recall(model, tokenizer, questions)
    gen = held_out_eval(model, tokenizer, config, questions, Path(result.output_dir), result.metrics)
    timings["answers_s"] = time.perf_counter() - t

    rows = [{"question": questions[s["index"]]["messages"][-1]["content"], "expected": s["reference"],
             "base": s["base"]["answer"], "tuned": s["tuned"]["answer"], "base_ok": bool(s["base"]["exact_match"]),
             "tuned_ok": bool(s["tuned"]["exact_match"])} for s in gen.samples]
    em_before, em_after = gen.summary["base"]["exact_match"], gen.summary["tuned"]["exact_match"]
    sampled = gen.summary["sampled"]
    wall = time.perf_counter() - started
    peak = peak_rss_mb()
    demo_result = DemoResult(output_dir=result.output_dir, before=em_before, after=em_after,
                             n_questions=len(questions), wall_s=wall, peak_rss_mb=peak, base_prose_recall=knows,
                             after_sampled=sampled["exact_match"], ended_sampled=sampled["stopped"],
                             answers=rows, train_metrics=dict(result.metrics), report=gen.report_path)
    (Path(result.output_dir) / "demo_answers.json").write_text(
        json.dumps({"exact_match_before": em_before, "exact_match_after": em_after,
                    "exact_match_after_sampled": sampled["exact_match"], "ended_turn_sampled": sampled["stopped"],
                    "sampled": sampled, "base_prose_recall": knows,
                    "wall_s": round(wall, 1), **{k: round(v, 1) for k, v in timings.items()},
                    "peak_rss_mb": round(peak), "answers": rows}, indent=1), encoding="utf-8")

    say("")
    for row in rows[:show]:
        say(f"  Q: {row['question']}")
        say(f"     base model : {_clip(row['base'])!s:<60} {'ok' if row['base_ok'] else 'wrong'}")
        say(f"     fine-tuned : {_clip(row['tuned'])!s:<60} {'ok' if row['tuned_ok'] else 'wrong'}")
    say("")
    say(f"exact match on {len(questions)} held-out questions (people never seen in the chat data): "
        f"base {em_before:.0%} -> fine-tuned {em_after:.0%} greedy, {sampled['exact_match']:.0%} sampled")
    say(f"(sampled: temperature {sampled['temperature']:g}, top-p {sampled['top_p']:g}, {sampled['seeds']} seeds; "
        f"{sampled['stopped']:.0%} of those answers ended their turn with an end-of-turn token)")
    say(f"(the base model did know the facts: as plain text, e.g. '{questions[0]['prefix']} ...', it completes "
        f"{knows:.0%} of them; it could not answer a chat question)")
    if "eval_loss" in result.metrics:
        say(f"eval loss {result.metrics['eval_loss']:.3f}, token accuracy {result.metrics['eval_token_accuracy']:.1%}")
    say(f"wall time {wall:.0f} s (fine-tuning {timings['finetune_s']:.0f} s, base and tuned answers "
        f"{timings['answers_s']:.0f} s), peak memory {peak:.0f} MB (RSS), {torch.get_num_threads()} CPU threads")
    say(f"run folder: {result.output_dir}   (next: phitune chat {result.output_dir})")
    say(f"report: {gen.report_path}   (every answer side by side; samples.jsonl next to it)")
    return demo_result


# --- held-out questions ---------------------------------------------------------------------------------------------


def read_held_out(path: str | os.PathLike = HELD_OUT_FILE) -> list[dict]:
    """The held-out questions: ``{"messages": [...], "answer": str}`` per line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def held_out_records(questions: Sequence[dict]) -> list[dict]:
    """The held-out questions as chat records ending with the expected answer (the turn generation is scored on)."""
    return [{"messages": list(q["messages"]) + [{"role": "assistant", "content": q["answer"]}]} for q in questions]


def held_out_eval(model, tokenizer, config, questions: Sequence[dict], run_dir: Path, eval_metrics: dict | None = None,
                  *, max_new_tokens: int = 32, batch_size: int = 64, sampled_seeds: int = SAMPLED_SEEDS):
    """Greedy answers of the tuned model and of its base (LoRA off) to the held-out questions, scored by
    phitune.evals.generation (the path `phitune eval --generate --compare-base` takes), plus the tuned model's
    sampled answers (:func:`sampled_held_out`, ``summary["sampled"]``), written to ``run_dir/eval`` (report.html,
    samples.jsonl). Returns the GenerationResult of the greedy answers."""
    data_cfg = dataclasses.replace(config.data, train=held_out_records(questions), eval=None, eval_split=None)
    samples = prepare_data(data_cfg, tokenizer).train
    stops = stop_token_ids(tokenizer, model=model)
    result = evaluate_samples_by_generation(
        model, tokenizer, samples, stop_ids=stops, settings=GenerationSettings(max_new_tokens=max_new_tokens,
                                                                               greedy=True),
        batch_size=batch_size, compare_base=True, eval_metrics=eval_metrics, progress=False)
    if sampled_seeds:
        result.summary["sampled"] = sampled_held_out(model, tokenizer, samples, stops, seeds=sampled_seeds,
                                                     max_new_tokens=max_new_tokens, batch_size=batch_size)
    out = run_dir / EVAL_DIR
    out.mkdir(parents=True, exist_ok=True)
    result.samples_path = report.write_samples(out / SAMPLES_FILE, result.samples)
    result.report_path = report.write_report(out / REPORT_FILE, result.summary, result.samples,
                                             train_records=read_metrics(run_dir / METRICS_NAME),
                                             title="phitune demo, held-out questions")
    return result


def sampled_held_out(model, tokenizer, samples, stop_ids: Sequence[int], *, seeds: int = SAMPLED_SEEDS,
                     max_new_tokens: int = 32, batch_size: int = 64) -> dict:
    """The tuned model's answers to the held-out ``samples`` sampled at :data:`SAMPLED` (temperature 0.7, top-p
    0.9), once with each seed 0..seeds-1: the mean exact match and share of answers that ended their turn (with
    an end-of-turn id, not at ``max_new_tokens``), and both per seed."""
    per_seed = []
    for seed in range(seeds):
        settings = dataclasses.replace(SAMPLED, max_new_tokens=max_new_tokens, seed=seed)
        tuned = evaluate_samples_by_generation(model, tokenizer, samples, stop_ids=stop_ids, settings=settings,
                                               batch_size=batch_size, progress=False).summary["tuned"]
        per_seed.append({"seed": seed, "exact_match": tuned["exact_match"], "stopped": tuned["stopped"]})
    mean = lambda key: sum(r[key] for r in per_seed) / max(len(per_seed), 1)  # noqa: E731
    return {"temperature": SAMPLED.temperature, "top_p": SAMPLED.top_p, "seeds": seeds,
            "exact_match": mean("exact_match"), "stopped": mean("stopped"), "per_seed": per_seed}


def prose_recall(model, tokenizer, questions: Sequence[dict]) -> float:
    """Fraction of held-out facts the model completes as plain text: ``prefix`` -> greedy ``completion``
    (e.g. "The home of X is in" -> " Ironbrook."). One forward pass per question, no chat format."""
    import torch

    ok = 0
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for q in questions:
            ids = tokenizer(q["prefix"])["input_ids"]  # with <s>, as in pretraining
            target = tokenizer(q["completion"], add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([ids + target])).logits[0, len(ids) - 1:-1]
            ok += logits.argmax(-1).tolist() == target
    model.train(was_training)
    return ok / max(len(questions), 1)


# --- helpers ----------------------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _check_assets() -> None:
    missing = [p for p in (MODEL_DIR / "config.json", MODEL_DIR / "model.safetensors", CONFIG_FILE, TRAIN_FILE,
                           EVAL_FILE, HELD_OUT_FILE) if not p.exists()]
    if missing:
        raise PhituneError(f"the demo assets are missing ({', '.join(str(p) for p in missing)}): reinstall phitune, "
                           "or rebuild them with `python scripts/build_demo_assets.py` in a source checkout")


def _count_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def _clip(text: str, width: int = 58) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 3] + "..."
