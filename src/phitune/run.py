"""An output folder of ``phitune train`` ("run dir") reopened: evaluate, chat, merge; and preview a config's data.

A run dir describes itself (docs/architecture.md, "Output folder"): the adapter, the resolved config naming the base
model, the tokenizer with its chat template and the generation config. Every function here needs nothing else::

    import phitune
    metrics = phitune.evaluate("runs/phi3-lora")                       # {"eval_loss": ..., "eval_perplexity": ...}
    answer = phitune.chat("runs/phi3-lora", prompt="Hello!", greedy=True)
    phitune.merge("runs/phi3-lora", "runs/phi3-merged")                # a plain Hugging Face model folder
    phitune.preview("config.yaml", n=3)                                # data stats and samples, no model weights

A checkpoint folder (``RUN/checkpoints/checkpoint-STEP``) works wherever a run dir does: its adapter is used with
the run's config and tokenizer. Opening the folder is ``phitune.run_folder``'s job.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import outdir
from .adapt import add_lora, adapter_state_dict, load_adapter_state_dict, merge_checked, merge_lora_checked
from .adapt.inject import lora_state
from .config import load_config
from .data import format_stats, prepare_data, preview_text
from .errors import ConfigError, DataError
from .evaluation import evaluate_samples
from .gen_eval import EVAL_DIR, evaluate_samples_by_generation, flat_metrics, generation_samples, load_metric
from .generate import GenerationSettings, build_prompt_ids, context_length, generate_reply, stop_token_ids
from .lora import disable_adapters
from .metrics import METRICS_NAME, read_metrics
from .model import load_model_and_tokenizer, load_tokenizer
from .optim import autocast_context
from .preflight import check_data_paths, check_model_source
from .run_folder import copy_base_tokenizer_files, load_run_config, load_run_model, load_run_tokenizer, open_run

# --- evaluate -------------------------------------------------------------------------------------------------------


def evaluate(
    run_dir: str | os.PathLike,
    data: Any = None,
    *,
    batch_size: int | None = None,
    max_samples: int | None = None,
    device: str | None = None,
    verbose: bool = True,
    trust_remote_code: bool = False,
    generate: bool = False,
    compare_base: bool = False,
    max_new_tokens: int = 256,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    metric: Any = None,
) -> dict[str, Any]:
    """Loss, perplexity and token accuracy of a run's adapter model; with ``generate``, its answers too.

    ``data``: None uses the run's eval data (``data.eval`` or the ``data.eval_split`` held out of train); otherwise a
    source as ``data.train`` accepts (file, folder, Hub name, list of records), prepared with the run's data settings
    (chat template, max_seq_length, train_on, packing). Only trained tokens count (assistant turns by default).
    Returns ``{"eval_loss", "eval_perplexity", "eval_token_accuracy", "eval_tokens", "eval_samples"}``.

    ``generate=True`` (phitune.evaluate): the model answers every conversation's last assistant turn from the turns
    before it (greedy; sampled when ``temperature`` or ``top_p`` is given), scored against it (exact match, token F1,
    ROUGE-L, length, ended its turn; ``metric``: custom ``(prediction, reference) -> float`` functions or
    ``"module:function"`` strings); ``compare_base=True`` also asks the base model (the LoRA layers switched off in
    the same model). Adds ``gen_*`` (and ``base_gen_*``, ``base_eval_loss``) numbers and the paths of
    ``RUN_DIR/eval/report.html`` and ``eval/samples.jsonl`` (``report``, ``samples_file``) to the result.
    ``trust_remote_code``: allow the code of a run whose config asks for it (see :func:`load_run_config`).
    """
    run = open_run(run_dir)  # before any slow import or load
    config = load_run_config(run.root, trust_remote_code=trust_remote_code)
    settings, metric_fns = _generation_options(config, generate, compare_base, max_new_tokens, temperature, top_p,
                                               seed, metric)
    data_cfg = config.data
    if data is not None:
        data_cfg = dataclasses.replace(data_cfg, train=data, eval=None, eval_split=None)
    elif data_cfg.eval is None and not data_cfg.eval_split:
        raise ConfigError(
            f"run '{run.root}' has no eval data (its config sets neither data.eval nor data.eval_split): "
            "pass a data source, e.g. `phitune eval RUN_DIR --data eval.jsonl` or evaluate(run_dir, data=...)"
        )

    tokenizer = load_run_tokenizer(run.root, config)
    prepared = prepare_data(data_cfg, tokenizer)
    samples = prepared.train if data is not None else prepared.eval
    if generate:  # the prompts: the prepared conversations up to their last assistant turn

        gen_samples = generation_samples(prepared, data_cfg, tokenizer, "train" if data is not None else "eval")
    if samples is not None and max_samples is not None and max_samples < len(samples):
        samples = samples[:max_samples]
    if samples is None or len(samples) == 0:
        raise DataError(f"no samples to evaluate on ({'the given data' if data is not None else 'the eval data'} "
                        "is empty after preparation)")
    batch_size = batch_size or config.training_config.per_device_eval_batch_size


    model, tokenizer, _ = load_run_model(run.adapter_dir, device=device, trust_remote_code=trust_remote_code)
    device_ = next(model.parameters()).device
    if verbose:
        print(f"evaluating {run.adapter_dir} on {len(samples)} samples "
              f"({'given data' if data is not None else 'the run eval data'})", file=sys.stderr)
    with autocast_context(config.training_config, device_):  # the precision training evaluated with
        metrics = evaluate_samples(model, samples, data_cfg, batch_size, tokenizer=tokenizer)
    metrics["eval_samples"] = len(samples)
    if not generate:
        return metrics


    base_metrics = None
    with autocast_context(config.training_config, device_):
        if compare_base:
            with disable_adapters(model):
                base_metrics = evaluate_samples(model, samples, data_cfg, batch_size, tokenizer=tokenizer)
        result = evaluate_samples_by_generation(
            model, tokenizer, gen_samples, stop_ids=stop_token_ids(run.root, tokenizer),
            settings=settings, batch_size=batch_size, max_samples=max_samples, compare_base=compare_base,
            metrics=metric_fns, eval_metrics=metrics, base_eval_metrics=base_metrics,
            out_dir=run.adapter_dir / EVAL_DIR, train_records=read_metrics(run.root / METRICS_NAME),
            title=str(run.adapter_dir), progress=verbose)
    metrics.update(flat_metrics(result.summary))
    metrics["report"] = str(result.report_path)
    metrics["samples_file"] = str(result.samples_path)
    return metrics


def _generation_options(config, generate: bool, compare_base: bool, max_new_tokens: int, temperature, top_p, seed,
                        metric):
    """The generation settings and custom metric functions, checked before anything slow (None when not
    generating; generation-only options without ``generate`` are an error)."""
    if not generate:
        given = [name for name, v in (("--compare-base", compare_base), ("--temperature", temperature),
                                      ("--top-p", top_p), ("--metric", metric)) if v]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply to generation: add --generate (generate=True)")
        return None, []

    sampling = temperature is not None or top_p is not None
    settings = GenerationSettings(max_new_tokens=max_new_tokens, greedy=not sampling,
                                  temperature=1.0 if temperature is None else temperature,
                                  top_p=1.0 if top_p is None else top_p, seed=seed)
    specs = [] if metric is None else [metric] if isinstance(metric, str) or callable(metric) else list(metric)
    metric_fns = [load_metric(m) for m in specs]
    pc = config.peft_config
    if compare_base and (pc.modules_to_save or pc.bias != "none"):
        what = "modules_to_save" if pc.modules_to_save else f"bias: {pc.bias}"
        raise ConfigError(f"--compare-base: this run trained weights of the base model itself (peft_config {what}), "
                          "so switching the LoRA layers off does not give the base model back; evaluate the base "
                          "model on its own instead")
    return settings, metric_fns


# --- chat -----------------------------------------------------------------------------------------------------------

_CHAT_HELP = "/reset forgets the conversation, /system TEXT sets the system prompt, /exit (or Ctrl-D) quits"


def chat(
    run_dir: str | os.PathLike,
    prompt: str | None = None,
    *,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    greedy: bool = False,
    seed: int | None = None,
    device: str | None = None,
    stream: bool = True,
    input_fn: Callable[[str], str] = input,
    output=None,
    trust_remote_code: bool = False,
):
    """Chat with a run's adapter model.

    With ``prompt``: answer it once (streamed to ``output``, default stdout, unless ``stream=False``) and return the
    answer. Without: an interactive loop reading lines with ``input_fn`` that keeps the conversation as context
    (oldest turns dropped when it outgrows the context window) and returns the conversation (list of messages).
    Generation stops on every end-of-turn id of the run's ``generation_config.json``. ``trust_remote_code``: allow
    the code of a run whose config asks for it (see :func:`load_run_config`).
    """

    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  greedy=greedy, seed=seed)
    run = open_run(run_dir)
    out = output if output is not None else sys.stdout
    model, tokenizer, config = load_run_model(run.adapter_dir, device=device, trust_remote_code=trust_remote_code)
    stops = stop_token_ids(run.root, tokenizer)
    limit = context_length(model, tokenizer)

    def reply(messages: list[dict]) -> str:
        messages = _fit_context(tokenizer, messages, limit - settings.max_new_tokens)
        on_text = None
        if stream:
            def on_text(piece: str) -> None:
                out.write(piece)
                out.flush()
        answer = generate_reply(model, tokenizer, messages, settings, stop_ids=stops, on_text=on_text)
        if stream:
            out.write("\n")
            out.flush()
        return answer

    head = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        return reply(head + [{"role": "user", "content": prompt}])

    if input_fn is input and sys.stdin.isatty():
        try:  # line editing and history (up arrow) for input(); absent on some platforms
            import readline  # noqa: F401
        except ImportError:
            pass
    print(f"chatting with {run.adapter_dir} (base {config.model.name_or_path}); {_CHAT_HELP}", file=out)
    history: list[dict] = []
    while True:
        try:
            line = input_fn("\nyou> ")
        except EOFError:
            print(file=out)
            break
        except KeyboardInterrupt:
            print(file=out)
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            print("(conversation cleared)", file=out)
            continue
        if text.startswith("/system"):
            new = text[len("/system"):].strip()
            head = [{"role": "system", "content": new}] if new else []
            history = []
            print(f"(system prompt {'set' if new else 'removed'}; conversation cleared)", file=out)
            continue
        if text.startswith("/") and text.split()[0] in ("/help", "/?"):
            print(_CHAT_HELP, file=out)
            continue
        history.append({"role": "user", "content": line})
        out.write("assistant> ")
        out.flush()
        try:
            answer = reply(head + history)
        except KeyboardInterrupt:
            out.write("\n(interrupted; the message was dropped)\n")
            history.pop()
            continue
        history.append({"role": "assistant", "content": answer})
    return head + history


def _fit_context(tokenizer, messages: list[dict], budget: int) -> list[dict]:
    """Drop the oldest turns (never the system prompt or the last user message) until the prompt fits ``budget``."""

    messages = list(messages)
    head = 1 if messages and messages[0]["role"] == "system" else 0
    while len(messages) - head > 1 and len(build_prompt_ids(tokenizer, messages)) > budget:
        del messages[head]
        # keep the conversation starting with a user turn
        while len(messages) - head > 1 and messages[head]["role"] != "user":
            del messages[head]
    if len(build_prompt_ids(tokenizer, messages)) > budget:
        raise ConfigError(f"the message is longer than the context window ({budget} tokens left after "
                          "max_new_tokens); shorten it or lower max_new_tokens")
    return messages


# --- merge ----------------------------------------------------------------------------------------------------------

_SAMPLE_CHAT = [{"role": "user", "content": "Hello! Explain in one sentence what a low-rank adapter is."}]


def merge(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "auto",
    force: bool = False,
    device: str | None = None,
    verbose: bool = True,
    dequantize: bool = True,
    trust_remote_code: bool = False,
) -> Path:
    """Fold a run's adapter into its base model and save a plain Hugging Face model folder; returns it.

    ``out_dir`` gets safetensors weights, config.json, the tokenizer with its chat template and the run's
    generation_config.json (every end-of-turn id), loadable with ``AutoModelForCausalLM.from_pretrained`` without
    phitune. ``dtype``: "auto" (as the run loads the base), "float32", "bfloat16" or "float16"; the merge itself is
    float32 math with one cast. A QLoRA run's 4-bit base is dequantized to ``dtype`` and merged there (the model that
    was trained), or with ``dequantize=False`` reloaded from its original weights; never merged into 4-bit weights.
    Refuses a non-empty ``out_dir`` that is not an earlier merge, and an earlier merge unless ``force``. Prints
    (and writes to ``phitune_merge.json``) the largest logit difference between the merged and the adapter model
    on a sample input. ``trust_remote_code``: allow the code of a run whose config asks for it (see
    :func:`load_run_config`).
    """
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    run = open_run(run_dir)
    out = Path(out_dir).expanduser()
    if out.resolve() in (run.root.resolve(), run.adapter_dir.resolve()):
        raise ConfigError(f"the output folder '{out}' is the run folder itself; choose a new folder for the merged "
                          "model")
    earlier = out.is_dir() and any(out.iterdir())
    outdir.check_output_folder(out, what="merge --out", owned=outdir.is_merge_folder, owner="phitune merge",
                               choose="choose a new or empty folder for the merged model (--out DIR)")
    if earlier and not force:
        raise ConfigError(f"merge --out: '{out}' holds an earlier merged model; pass --force (force=True) to replace "
                          "it, or choose a new or empty folder (--out DIR)")



    started = time.time()
    config = load_run_config(run.root, trust_remote_code=trust_remote_code)
    dtype = _merge_dtype(config, dtype)
    quantized = bool(getattr(config.model, "load_in_4bit", False))
    if device is None:  # a 4-bit (QLoRA) base is fastest on a GPU; bitsandbytes >= 0.45 also runs it on the CPU
        device = "cuda" if quantized and torch.cuda.is_available() else "cpu"
    model, tokenizer, config = load_run_model(run.adapter_dir, device=device, dtype=dtype,
                                              trust_remote_code=trust_remote_code)
    ids = build_prompt_ids(tokenizer, _SAMPLE_CHAT)[:64] if getattr(tokenizer, "chat_template", None) else \
        tokenizer("Hello! Explain what a low-rank adapter is.")["input_ids"][:64]
    input_ids = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    if quantized:  # QLoRA: dequantize the 4-bit base to ``dtype`` and merge there (adapt.merge_checked)

        full = None if dequantize else functools.partial(_full_precision_copy, model, config.model, dtype,
                                                         input_ids.device)
        model, max_diff = merge_checked(model, input_ids, dtype=dtype, full_precision=full)
    else:
        model, max_diff = merge_lora_checked(model, input_ids)

    from transformers import GenerationConfig

    if (run.root / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(run.root))
    # Every end-of-turn id (Phi-3: 32000, 32001, 32007): converters read the stops from this file.
    model.generation_config.eos_token_id = stop_token_ids(run.root, tokenizer)
    model.config.use_cache = True
    weights_dtype = str(next(model.parameters()).dtype).replace("torch.", "")

    # Write next to the target, then move in: a crash mid-save never leaves a half-written model in ``out``.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.phitune-merge-tmp"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        copy_base_tokenizer_files(config.model, run.root, staging, tokenizer)
        info = {
            "source_run": str(run.root.resolve()),
            "adapter": str(run.adapter_dir.resolve()),
            "base_model": config.model.name_or_path,
            "dtype": weights_dtype,
            "max_abs_logit_diff_vs_adapter": max_diff,
            "sample_input_tokens": len(ids),
            "quantized_base": quantized,
        }
        (staging / "phitune_merge.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        out.mkdir(parents=True, exist_ok=True)
        written = {p.name for p in staging.iterdir()}
        for stale in out.glob("model*.safetensors*"):  # shards of an earlier merge would mix with the new ones
            if stale.name not in written:
                stale.unlink()
        for p in staging.iterdir():
            target = out / p.name
            if target.is_dir() and not p.is_dir():
                shutil.rmtree(target)
            os.replace(p, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if verbose:
        print(f"merged {run.adapter_dir} into {config.model.name_or_path} -> {out} ({weights_dtype}, "
              f"{time.time() - started:.1f}s)")
        print(f"max |logit difference| merged vs adapter model on a {len(ids)}-token sample: {max_diff:.3g}")
    return out




def _merge_dtype(config, dtype: str) -> str:
    """``auto``: the dtype the base model was published in (config.json), so a bf16 base stays bf16 (Phi-3-mini:
    7.6 GB instead of 15 GB); float32 when it says nothing or something else."""
    if dtype != "auto":
        return dtype
    try:
        from transformers import AutoConfig

        base = AutoConfig.from_pretrained(config.model.name_or_path, revision=config.model.revision,
                                          trust_remote_code=config.model.trust_remote_code)
    except (OSError, ValueError):
        return "float32"
    saved = getattr(base, "dtype", None) or getattr(base, "torch_dtype", None)
    saved = str(saved).replace("torch.", "") if saved is not None else ""
    return saved if saved in ("bfloat16", "float16") else "float32"


# --- preview --------------------------------------------------------------------------------------------------------


def preview(config: Any, n: int = 3, color: bool | None = None, *, overrides: Sequence[str] | None = None,
            output=None):
    """Prepare a config's data as training would (tokenizer only, no model weights) and print the stats and ``n``
    samples with the trained tokens highlighted (``color``: None = when the output is a terminal). Returns the
    prepared data."""

    out = output if output is not None else sys.stdout
    run_config = load_config(config, overrides)
    if color is None:
        color = bool(getattr(out, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")
    check_model_source(run_config.model, weights=False)
    check_data_paths(run_config.data)
    tokenizer = load_tokenizer(run_config.model)
    prepared = prepare_data(run_config.data, tokenizer)
    print(format_stats(prepared.stats), file=out)
    print(file=out)
    print(preview_text(prepared, tokenizer, n, color), file=out)
    return prepared


def _full_precision_copy(model, model_cfg, dtype, device):
    """The base reloaded without quantization, carrying ``model``'s LoRA layers and weights (merge --no-dequantize)."""

    state = lora_state(model)
    tensors = {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}
    dtype_name = str(dtype).replace("torch.", "") if dtype is not None else model_cfg.dtype
    cfg = dataclasses.replace(model_cfg, load_in_4bit=False, dtype=dtype_name)
    full, _ = load_model_and_tokenizer(cfg, device=device)
    add_lora(full, state.config)
    load_adapter_state_dict(full, tensors, source="the 4-bit model's adapter")
    return full
