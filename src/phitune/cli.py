"""The ``phitune`` command: a thin argparse layer over phitune's Python functions.

Each sub-command calls one importable function (``phitune.finetune``, ``phitune.evaluate``, ``phitune.chat``,
``phitune.merge``, ``phitune.export``, ``phitune.preview``, ``phitune.demo``, ``phitune.plan``) and does nothing
else. Exit codes: 0 success, 2 a usage or configuration error (the message, no traceback), 1 anything else (with
the traceback, so it can be reported), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM); training first saves a
checkpoint and prints the resume command.

Past 500 lines on purpose: it is one idea, the command line, and ``build_parser`` lists every command's flags in one
place, which ``--help``, the README's CLI section and tests/test_cli.py read together.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import traceback
from typing import Sequence

from . import __version__
from .config import config_fields, config_sections, load_config
from .errors import PhituneError
from .training.interrupt import Interrupted

PROG = "phitune"

_MAIN_EPILOG = """\
examples:
  phitune demo                                   # tiny bundled model + data, no network, under a minute on 2 CPU cores
  phitune preview examples/phi3-mini-lora.yaml   # check the data: stats and samples, trained tokens highlighted
  phitune train examples/phi3-mini-lora.yaml --set training_config.learning_rate=1e-4
  phitune plan examples/phi3-mini-lora.yaml --gpu L4  # will it fit? how fast? (predicted, no GPU needed)
  phitune eval runs/phi3-lora
  phitune chat runs/phi3-lora
  phitune merge runs/phi3-lora --out runs/phi3-merged
  phitune export runs/phi3-lora --to ollama --out phi3-ollama

Every command is also a Python function: phitune.finetune, phitune.evaluate, phitune.chat, phitune.merge,
phitune.export, phitune.preview, phitune.demo, phitune.plan. Run `phitune COMMAND --help` for a command's options.
"""

_TRUST_HELP = ("allow the Python code of the run's base model to run, when the run's phitune_config.yaml asks for it "
               "(model.trust_remote_code: true); without this flag such a run is refused: a run folder never "
               "enables code on its own")

_SET_HELP = (
    "override one config value, KEY a dotted path into the YAML (section.key), VALUE parsed as YAML "
    "(1e-4, true, [a, b], null); repeat for several"
)

_TRAIN_EPILOG = """\
The config file has four sections: model, data, training_config (transformers TrainingArguments key names,
the cookbook's legacy keys accepted) and peft_config (PEFT LoraConfig keys). The run writes everything to
training_config.output_dir: the adapter (PEFT layout), tokenizer and chat template, generation_config.json,
phitune_config.yaml (the resolved config), metrics.jsonl, loss_curve.png, README.md and checkpoints/.

examples:
  phitune train config.yaml
  phitune train config.yaml --set training_config.max_steps=200 --set peft_config.r=8
  phitune train config.yaml --set training_config.resume_from_checkpoint=auto   # continue a stopped run
  phitune train --help-config                                                    # every config key, documented
"""

_PLAN_EPILOG = """\
Runs phitune's own training step on a fake CUDA device (shapes only: no GPU, no memory, no weights; the model's
config.json is enough) and prints the predicted peak memory with its parts, whether it fits each GPU (after a
margin for the CUDA context and the allocator), tokens and FLOPs per step, and a step-time range per GPU. The worst
case micro-batch is planned: per_device_train_batch_size rows of max_seq_length tokens. Takes seconds; on a
CPU-only PyTorch the first plan builds a small C++ library (cached).

examples:
  phitune plan examples/phi3-mini-lora.yaml --gpu L4 --gpu A100-80GB
  phitune plan examples/phi3-mini-lora.yaml --set training_config.per_device_train_batch_size=8 --json
  phitune plan config.yaml --gpu-memory 32 --world-size 8
"""

_EVAL_EPILOG = """\
Reports loss, perplexity and token accuracy (over the trained tokens only: assistant turns, by default) with the
run's data settings (chat template, max_seq_length, train_on). Without --data it uses the run's eval data (the
data.eval source, or the held-out split of the training data).

With --generate the model also answers each conversation's last assistant turn from the turns before it (rendered
as in training; greedy unless --temperature/--top-p), scored against that turn: exact match (whitespace and case
normalised), token F1, ROUGE-L, answer length, whether it ended its turn, and any --metric. --compare-base asks the
base model too (the LoRA layers switched off, same model). Writes RUN_DIR/eval/report.html (metrics, loss curve,
every answer side by side, filterable) and RUN_DIR/eval/samples.jsonl; Ctrl-C writes the samples done so far.

examples:
  phitune eval runs/phi3-lora
  phitune eval runs/phi3-lora --data data/test.jsonl --json
  phitune eval runs/phi3-lora/checkpoints/checkpoint-200     # a checkpoint of the run
  phitune eval runs/phi3-lora --generate --compare-base --max-samples 200 --max-new-tokens 128
  phitune eval runs/phi3-lora --generate --metric my_metrics:score   # def score(prediction, reference) -> float
"""

_CHAT_EPILOG = """\
Interactive: type a message, the answer streams back; the conversation is kept as context.
Commands inside the chat: /reset (forget the conversation), /system TEXT (set the system prompt and reset),
/exit or Ctrl-D (quit). Generation stops on every end-of-turn id of the run's generation_config.json and
decodes as that file says (do_sample, temperature, top_p, top_k, repetition_penalty; greedy when it sets no
sampling, as transformers and Phi-3's own file do); the options below override it.

examples:
  phitune chat runs/phi3-lora
  phitune chat runs/phi3-lora --prompt "Write a haiku about LoRA." --greedy
  phitune chat runs/phi3-lora --system "You answer in French." --temperature 0.3 --max-new-tokens 128
"""

_MERGE_EPILOG = """\
Loads the base model named in the run's phitune_config.yaml, applies the adapter, folds it into the weights and
saves a plain Hugging Face model (safetensors) with the tokenizer, chat template and generation_config.json, which
AutoModelForCausalLM.from_pretrained loads without phitune or peft. Prints the largest logit difference between the
merged model and the adapter model on a sample input.

examples:
  phitune merge runs/phi3-lora --out runs/phi3-merged
  phitune merge runs/phi3-lora --out runs/phi3-merged --dtype float32 --force
"""

_EXPORT_EPILOG = """\
Writes the run where Phi-3 runs, into a new or empty folder (built next to it, swapped in at the end), and checks it:
  gguf    the merged model as one GGUF file (llama.cpp, LM Studio), tokenizer and chat template inside;
          --adapter: the LoRA adapter as a GGUF LoRA instead (each module's scale folded in, exact in llama.cpp)
  ollama  the GGUF plus a Modelfile (template, stop tokens): `ollama create NAME -f Modelfile` is the last step
  onnx    an ONNX Runtime GenAI folder built by onnxruntime-genai's model builder
  vllm    the adapter folder as vLLM reads it, and the `vllm serve` command it needs
gguf, ollama and onnx need the optional packages: pip install "phitune[export]".

examples:
  phitune export runs/phi3-lora --to gguf --out phi3-gguf --outtype q8_0
  phitune export runs/phi3-lora --to gguf --adapter --out phi3-lora-gguf
  phitune export runs/phi3-lora --to ollama --out phi3-ollama
  phitune export runs/phi3-lora --to onnx --out phi3-onnx --precision int4
  phitune export runs/phi3-lora --to vllm --out phi3-vllm
"""

_PREVIEW_EPILOG = """\
Loads the config and the tokenizer only (no model weights), prepares the data exactly as training would, and prints
the data statistics and N rendered samples with the trained tokens highlighted. Use it before spending GPU hours.
With --json: one JSON object per sample and line on stdout ({"split", "index", "source": "file:line", "input_ids",
"labels"}, labels -100 where no loss is taken), the statistics on stderr, to diff phitune's tokens against any tool.

examples:
  phitune preview config.yaml
  phitune preview config.yaml -n 5 --no-color | less
  phitune preview config.yaml --set data.train_on=all
  phitune preview config.yaml --json > samples.jsonl
"""

_DEMO_EPILOG = """\
Fine-tunes the tiny Phi-3-architecture model shipped inside phitune on the bundled chat dataset (no network, CPU is
enough, under a minute on 2 cores), then prints the held-out metric and answers before and after fine-tuning
(the base model is the tuned one with its LoRA layers switched off) and writes them to RUN/eval/report.html.

examples:
  phitune demo
  phitune demo --out runs/demo
  phitune demo --max-steps 50 --set training_config.learning_rate=3e-3
  phitune demo --preference                      # then DPO from the chat-tuned model (minutes on a CPU)
"""


def _override(text: str) -> str:
    key, sep, _ = text.partition("=")
    if not sep or not key.strip() or key.strip() != key or key.startswith(".") or key.endswith("."):
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE with KEY a dotted config path (e.g. training_config.learning_rate=1e-4), got {text!r}"
        )
    return text


def _number_at_least(kind: type, minimum: int):
    """An argparse ``type``: ``kind`` (int or float) parsed from the text, at least ``minimum``."""
    what = "a whole number" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _number_at_least(int, 1)
_non_negative_int = _number_at_least(int, 0)
_non_negative_float = _number_at_least(float, 0)
_positive_float = _number_at_least(float, 1)


def build_parser() -> argparse.ArgumentParser:
    """The ``phitune`` argument parser (exposed for tests and documentation)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="LoRA fine-tuning of Phi-3 (and other Hugging Face causal LMs) on chat data.",
        epilog=_MAIN_EPILOG,
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "train", help="fine-tune a model with LoRA from a YAML config", epilog=_TRAIN_EPILOG, formatter_class=fmt,
        description="Fine-tune a model with LoRA as the YAML config says (phitune.finetune).",
    )
    p.add_argument("config", metavar="CONFIG", nargs="?", help="YAML file with model, data, training_config, "
                   "peft_config sections")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[], type=_override,
                   help=_SET_HELP)
    p.add_argument("--help-config", action="store_true", help="print every config key with its default and doc, "
                   "then exit")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "plan", help="predict peak GPU memory and step time of a training config (no GPU, no weights)",
        epilog=_PLAN_EPILOG, formatter_class=fmt,
        description="Predict, on any machine, whether `phitune train CONFIG` fits a GPU and how long a step takes "
                    "(phitune.plan).",
    )
    p.add_argument("config", metavar="CONFIG", help="the YAML file `phitune train` takes")
    p.add_argument("--gpu", dest="gpus", metavar="NAME", action="append", default=[],
                   help="a GPU from the table (H200, H100, A100-80GB, A100-40GB, L40S, L4, A10G, RTX4090, RTX3090, "
                   "T4); repeat for several; default: all")
    p.add_argument("--gpu-memory", metavar="GIB", type=_positive_float, action="append", default=[],
                   help="a GPU not in the table, by its memory in GiB (fits or not; no step time)")
    p.add_argument("--world-size", metavar="N", type=_positive_int, default=1,
                   help="processes under torchrun (per-device memory and time; tokens per step for all)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[], type=_override,
                   help=_SET_HELP)
    p.add_argument("--data", action="store_true",
                   help="plan the largest micro-batch the config's training data makes (tokenizer and data loaded "
                   "and checked as train does) instead of the worst case of full rows")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser(
        "eval", help="evaluate a run's adapter: loss, perplexity, token accuracy; --generate: its answers",
        epilog=_EVAL_EPILOG,
        formatter_class=fmt, description="Evaluate a fine-tuned run (phitune.evaluate).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="output folder of `phitune train` (or one of its checkpoints)")
    p.add_argument("--data", metavar="SOURCE", help="data to evaluate on instead of the run's eval data: a JSONL/JSON/"
                   "CSV/Parquet file or a Hub dataset id, in the run's data format")
    p.add_argument("--batch-size", type=_positive_int, metavar="N",
                   help="sequences per batch (default: the run's per_device_eval_batch_size)")
    p.add_argument("--max-samples", type=_positive_int, metavar="N", help="evaluate on the first N samples only")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda when available, else cpu)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument("--trust-remote-code", action="store_true", help=_TRUST_HELP)
    g = p.add_argument_group("generation (answers scored against the references)")
    g.add_argument("--generate", action="store_true", help="generate each conversation's last assistant turn and "
                   "score it; writes RUN_DIR/eval/report.html and eval/samples.jsonl")
    g.add_argument("--compare-base", action="store_true", help="also answer with the base model (LoRA off) and "
                   "show base, tuned and the difference")
    g.add_argument("--max-new-tokens", type=_positive_int, default=256, metavar="N",
                   help="longest answer in tokens (default: 256)")
    g.add_argument("--temperature", type=_non_negative_float, metavar="T",
                   help="sample with this temperature instead of greedy decoding (0: greedy)")
    g.add_argument("--top-p", type=float, metavar="P", help="sample with this nucleus threshold (with --temperature, "
                   "or at temperature 1)")
    g.add_argument("--seed", type=int, help="random seed for sampling (reproducible answers)")
    g.add_argument("--metric", action="append", metavar="MODULE:FUNCTION",
                   help="a custom score, a Python function (prediction, reference) -> float; a module in the current "
                   "folder or installed, or path/to/file.py:function; repeat for several")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "chat", help="chat with a fine-tuned run (streaming), or answer one --prompt", epilog=_CHAT_EPILOG,
        formatter_class=fmt, description="Chat with a fine-tuned run (phitune.chat).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="output folder of `phitune train` (or one of its checkpoints)")
    p.add_argument("--prompt", metavar="TEXT", help="answer this one message, print the answer and exit")
    p.add_argument("--system", metavar="TEXT", help="system prompt put before the conversation")
    p.add_argument("--max-new-tokens", type=_positive_int, default=256, metavar="N",
                   help="longest answer in tokens (default: 256)")
    p.add_argument("--temperature", type=_non_negative_float, metavar="T",
                   help="sample at this temperature; 0 means greedy (default: the run's generation_config.json)")
    p.add_argument("--top-p", type=float, metavar="P", help="sample with this nucleus threshold (default: the run's "
                   "generation_config.json, else 1.0)")
    p.add_argument("--top-k", type=_non_negative_int, metavar="K", help="sample from the K most likely tokens; 0: no "
                   "cut (default: the run's generation_config.json, else 50, as transformers)")
    p.add_argument("--repetition-penalty", type=float, metavar="R", help="penalise tokens already in the text; 1.0: "
                   "off (default: the run's generation_config.json, else 1.0)")
    p.add_argument("--greedy", action="store_true", help="always pick the most likely token (deterministic; the "
                   "default when generation_config.json sets no sampling, as Phi-3's)")
    p.add_argument("--seed", type=int, help="random seed for sampling (reproducible answers)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda when available, else cpu)")
    p.add_argument("--trust-remote-code", action="store_true", help=_TRUST_HELP)
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser(
        "merge", help="fold the adapter into the base model and save a plain HF model", epilog=_MERGE_EPILOG,
        formatter_class=fmt, description="Merge a run's adapter into its base model (phitune.merge).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="output folder of `phitune train` (or one of its checkpoints)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the merged model to")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="dtype of the saved weights (default: auto = the dtype the base model was published in, e.g. "
                   "bfloat16 for Phi-3; float32 if it says nothing)")
    p.add_argument("--force", action="store_true", help="replace an earlier merged model in --out (a folder "
                   "phitune merge did not write is never overwritten)")
    p.add_argument("--device", help="device to merge on (default: cpu)")
    p.add_argument("--no-dequantize", dest="dequantize", action="store_false",
                   help="QLoRA runs: merge into the original 16/32-bit base weights instead of the dequantized 4-bit "
                   "ones the adapter was trained against (default: dequantize, so the merged model matches training)")
    p.add_argument("--trust-remote-code", action="store_true", help=_TRUST_HELP)
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser(
        "export", help="export to GGUF (llama.cpp), Ollama, ONNX Runtime GenAI or vLLM", epilog=_EXPORT_EPILOG,
        formatter_class=fmt, description="Export a run to another runtime (phitune.export).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="output folder of `phitune train` (or one of its checkpoints, "
                   "or a folder `phitune merge` wrote)")
    p.add_argument("--to", required=True, choices=["gguf", "ollama", "onnx", "vllm"], help="the target runtime")
    p.add_argument("--out", required=True, metavar="DIR", help="new or empty folder to write the export to")
    p.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0"],
                   help="gguf/ollama: tensor type of the weights (default: f16; f32 for --adapter)")
    p.add_argument("--adapter", action="store_true", help="gguf: write the LoRA adapter as a GGUF LoRA instead of "
                   "the merged model")
    p.add_argument("--precision", choices=["fp32", "fp16", "int4"],
                   help="onnx: fp32 or int4 on the CPU (default fp32), fp16 or int4 for cuda/dml")
    p.add_argument("--execution-provider", choices=["cpu", "cuda", "dml"], default="cpu",
                   help="onnx: where the model will run (default: cpu)")
    p.add_argument("--name", help="the model's name in the GGUF / the LoRA name for vLLM (default: the run "
                   "folder's name)")
    p.add_argument("--force", action="store_true", help="replace --out if an earlier `phitune export` wrote it")
    p.add_argument("--device", help="device to merge on (default: cpu)")
    p.add_argument("--trust-remote-code", action="store_true", help=_TRUST_HELP)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "preview", help="show data stats and samples, trained tokens highlighted (no model weights)",
        epilog=_PREVIEW_EPILOG, formatter_class=fmt,
        description="Preview the training data as the model will see it (phitune.preview).",
    )
    p.add_argument("config", metavar="CONFIG", help="YAML config file (as for `phitune train`)")
    p.add_argument("-n", "--num-samples", type=_non_negative_int, default=None, metavar="N",
                   help="samples to print (default: 3, with --json every sample; 0: the statistics only)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per sample on stdout: split, index, source (file:line), input_ids, labels")
    color = p.add_mutually_exclusive_group()
    color.add_argument("--color", dest="color", action="store_true", default=None,
                       help="highlight trained tokens with terminal colours (default: when stdout is a terminal)")
    color.add_argument("--no-color", dest="color", action="store_false",
                       help="mark trained tokens with [[ ]] instead of colours")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[], type=_override,
                   help=_SET_HELP)
    p.set_defaults(func=_cmd_preview)

    p = sub.add_parser(
        "demo", help="fine-tune the bundled tiny model on the bundled data (offline, CPU)", epilog=_DEMO_EPILOG,
        formatter_class=fmt, description="The embedded demo (phitune.demo).",
    )
    p.add_argument("--out", metavar="DIR", help="run folder (default: ./phitune-demo; an earlier demo there is "
                   "replaced, any other non-empty folder refused)")
    p.add_argument("--max-steps", type=_positive_int, metavar="N", help="train fewer steps (a quicker, weaker demo)")
    p.add_argument("--preference", action="store_true",
                   help="preference tuning: SFT as the demo does, merge, then DPO towards exclaimed answers; prints "
                        "preference accuracy and exact match on held-out pairs before and after "
                        "(phitune.embedded.preference_demo; default --out ./phitune-demo-preference)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[], type=_override,
                   help=_SET_HELP + " (applied to the demo's config; with --preference, to the DPO run)")
    p.set_defaults(func=_cmd_demo)
    return parser


# --- commands: each one calls the public function and prints its result ---------------------------------------------


def _cmd_train(args) -> int:
    if args.help_config:
        print(config_help())
        return 0
    if args.config is None:
        raise _Usage("train: the CONFIG argument is required (a YAML file; see `phitune train --help`)")
    config = load_config(args.config, args.overrides)  # config errors before importing torch-heavy modules
    from .training.train import finetune  # lazy: torch and transformers load only when a command runs

    result = finetune(config)
    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 reports
        return 0
    print(f"\nrun saved to {result.output_dir}")
    if getattr(result, "metrics", None):
        print("final metrics:")
        print(_format_metrics(result.metrics))
    print(f"next: phitune eval {result.output_dir}  |  phitune chat {result.output_dir}")
    return 0


def _cmd_plan(args) -> int:
    from .plan import plan  # lazy: torch and transformers load only when a command runs
    from .plan.report import format_plan

    result = plan(args.config, gpus=args.gpus, gpu_memory=args.gpu_memory, world_size=args.world_size,
                  overrides=args.overrides, data=args.data)
    print(json.dumps(result) if args.json else format_plan(result))
    return 0


def _cmd_eval(args) -> int:
    from .evals.evaluate import evaluate  # lazy: torch and transformers load only when a command runs

    metrics = evaluate(args.run_dir, data=args.data, batch_size=args.batch_size, max_samples=args.max_samples,
                       device=args.device, verbose=not args.json, trust_remote_code=args.trust_remote_code,
                       generate=args.generate, compare_base=args.compare_base, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, seed=args.seed, metric=args.metric)
    print(json.dumps(metrics) if args.json else _format_metrics(metrics))
    return 0


def _cmd_chat(args) -> int:
    from .generation.chat import chat  # lazy: torch and transformers load only when a command runs

    chat(args.run_dir, prompt=args.prompt, system=args.system, max_new_tokens=args.max_new_tokens,
         temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
         repetition_penalty=args.repetition_penalty, greedy=args.greedy, seed=args.seed, device=args.device,
         trust_remote_code=args.trust_remote_code)
    return 0


def _cmd_merge(args) -> int:
    from .runs.merge import merge  # lazy: torch and transformers load only when a command runs

    merge(args.run_dir, args.out, dtype=args.dtype, force=args.force, device=args.device, dequantize=args.dequantize,
          trust_remote_code=args.trust_remote_code)
    return 0


def _cmd_export(args) -> int:
    from .exports import export  # lazy: torch and transformers load only when a command runs

    export(args.run_dir, args.to, args.out, outtype=args.outtype, adapter=args.adapter, precision=args.precision,
           execution_provider=args.execution_provider, name=args.name, force=args.force, device=args.device,
           trust_remote_code=args.trust_remote_code)
    return 0


def _cmd_preview(args) -> int:
    from .training.preview import preview  # lazy: torch and transformers load only when a command runs

    preview(args.config, n=args.num_samples, color=args.color, overrides=args.overrides, json=args.json)
    return 0


def _cmd_demo(args) -> int:
    if args.preference:
        from .embedded.preference_demo import preference_demo  # lazy, as below

        preference_demo(args.out, max_steps=args.max_steps, overrides=args.overrides)
        return 0
    from .embedded.demo import demo  # lazy: torch and transformers load only when a command runs

    demo(args.out, max_steps=args.max_steps, overrides=args.overrides)
    return 0


def config_help() -> str:
    """Every config key of every section with its default and one-line doc (``phitune train --help-config``)."""
    lines = []
    for section, cls in config_sections():
        rows = config_fields(cls)
        width = max((len(key) for key, _, _ in rows), default=0)
        lines.append(f"{section}:")
        for key, default, doc in rows:
            if dataclasses.is_dataclass(default):
                default = dataclasses.asdict(default)
            shown = json.dumps(default) if isinstance(default, (str, bool, type(None), list, dict)) else repr(default)
            lines.append(f"  {key:<{width}}  {doc} [default: {shown}]")
        lines.append("")
    return "\n".join(lines).rstrip()


def _format_metrics(metrics: dict) -> str:
    width = max((len(k) for k in metrics), default=0)
    lines = []
    for key, value in metrics.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"  {key:<{width}}  {shown}")
    return "\n".join(lines)


def resume_command(argv: Sequence[str]) -> str:
    """The command line that continues an interrupted ``train``/``demo`` run: the same arguments with
    ``--set training_config.resume_from_checkpoint=auto`` (replacing any earlier resume setting)."""
    resume = "training_config.resume_from_checkpoint"
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--set" and i + 1 < len(argv) and argv[i + 1].startswith(resume + "="):
            skip = True
            continue
        if arg.startswith("--set=" + resume + "="):
            continue
        kept.append(arg)
    return shlex.join([PROG, *kept, "--set", f"{resume}=auto"])


class _Usage(PhituneError):
    """A command-line usage error found after parsing."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version (0) or a usage error (2)
        return int(exc.code or 0)
    try:
        return int(args.func(args) or 0)
    except PhituneError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `phitune ... | head`: the reader left; stay quiet
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except Interrupted as exc:  # training stopped on SIGINT/SIGTERM with a checkpoint (phitune.training.interrupt)
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        if args.command in ("train", "demo") and os.environ.get("RANK", "0") == "0":
            print(f"resume with: {resume_command(argv)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception:  # a bug or an environment problem: keep the traceback so it can be reported
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
