"""An output folder of ``phitune train`` ("run dir") reopened: evaluate, chat, merge; and preview a config's data.

A run dir describes itself (docs/architecture.md, "Output folder"): the adapter, the resolved config naming the base
model, the tokenizer with its chat template and the generation config. Every function here needs nothing else::

    import phitune
    metrics = phitune.evaluate("runs/phi3-lora")                       # {"eval_loss": ..., "eval_perplexity": ...}
    answer = phitune.chat("runs/phi3-lora", prompt="Hello!", greedy=True)
    phitune.merge("runs/phi3-lora", "runs/phi3-merged")                # a plain Hugging Face model folder
    phitune.preview("config.yaml", n=3)                                # data stats and samples, no model weights

A checkpoint folder (``RUN/checkpoints/checkpoint-STEP``) works wherever a run dir does: its adapter is used with
the run's config and tokenizer.
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

from . import outdir
from .config import run_status
from .errors import ConfigError, DataError

CONFIG_FILE = "phitune_config.yaml"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


# --- the run folder -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunFolder:
    """Where a run's pieces are: ``root`` holds the config, tokenizer and generation config; ``adapter_dir`` the
    adapter (``root`` itself, or one of its checkpoints)."""

    root: Path
    adapter_dir: Path

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE


def open_run(run_dir: str | os.PathLike) -> RunFolder:
    """Check that ``run_dir`` is a run folder (or a checkpoint of one) before anything slow is loaded."""
    path = Path(run_dir).expanduser()
    if not path.exists():
        raise ConfigError(
            f"run folder '{path}' does not exist: pass the training_config.output_dir of a `phitune train` run "
            f"(a folder holding {CONFIG_FILE} and {ADAPTER_FILES[0]})"
        )
    if not path.is_dir():
        raise ConfigError(f"'{path}' is a file, not a run folder: pass the folder `phitune train` wrote")
    root = path
    # A checkpoint: RUN/checkpoints/checkpoint-STEP (adapter only; config and tokenizer live in RUN).
    if not (path / CONFIG_FILE).is_file() and path.parent.name == "checkpoints":
        root = path.parent.parent
    if not (root / CONFIG_FILE).is_file():
        raise ConfigError(f"'{path}' is not a phitune run folder: {CONFIG_FILE} is missing. {_hint(path)}")
    unfinished = path == root and run_status(root / CONFIG_FILE) == "incomplete"
    missing = [name for name in ADAPTER_FILES if not (path / name).is_file()]
    if unfinished or (missing and path == root):
        # training has not finished (or was stopped): its newest complete checkpoint stands in for the final adapter
        from .checkpoint import checkpoint_problem  # torch: imported only for a run that needs it

        usable = [c for c in reversed(_checkpoints(root))
                  if all((c / n).is_file() for n in ADAPTER_FILES) and checkpoint_problem(c) is None]
        if usable:
            print(f"{root}: training has not finished; using its latest checkpoint, {usable[0]}", file=sys.stderr)
            return RunFolder(root=root, adapter_dir=usable[0])
        if unfinished and not missing:
            raise ConfigError(f"run folder '{root}' is unfinished (training has not written its final adapter, and "
                              "the adapter there is from an earlier run) and has no checkpoint yet. Fix: resume "
                              "training with training_config.resume_from_checkpoint=auto")
    if missing:
        hint = ""
        ckpts = _checkpoints(root)
        if ckpts:
            hint = f" The run has checkpoints; the latest is '{ckpts[-1]}' (pass it instead, or resume training)."
        else:
            hint = " Training may not have finished: rerun it with training_config.resume_from_checkpoint=auto."
        raise ConfigError(f"run folder '{path}' has no final adapter ({', '.join(missing)} missing).{hint}")
    return RunFolder(root=root, adapter_dir=path)


def _checkpoints(root: Path) -> list[Path]:
    from .checkpoint import list_checkpoints

    return list_checkpoints(root)


def _hint(path: Path) -> str:
    if (path / "config.json").is_file():
        return "It looks like a full model folder (config.json); load it with AutoModelForCausalLM instead."
    return f"Pass the output folder of `phitune train` (it holds {CONFIG_FILE}, the adapter and the tokenizer)."


def load_run_config(run_dir: str | os.PathLike, *, trust_remote_code: bool = False):
    """The resolved :class:`phitune.config.RunConfig` a run was trained with.

    Every command that opens a run folder reads its config here, so this is where the folder's own request to run
    code is refused: ``model.trust_remote_code: true`` in a run folder (data someone may have sent you) only takes
    effect with ``trust_remote_code=True`` from the caller (``--trust-remote-code`` on the command line).
    """
    from .config import load_config

    run = open_run(run_dir)
    config = load_config(str(run.config_path))
    if config.model.trust_remote_code and not trust_remote_code:
        raise ConfigError(
            f"run folder '{run.root}' asks to run the Python code that comes with its model "
            f"(model.trust_remote_code: true in {run.config_path}, model.name_or_path: "
            f"'{config.model.name_or_path}'). phitune never runs code because a run folder asks for it: if you "
            "trust that code, pass --trust-remote-code (trust_remote_code=True in Python)"
        )
    return _rebase_paths(config, run)


def _training_cwd(config, run: RunFolder) -> Path | None:
    """The folder training ran in, recovered from a relative ``output_dir`` (``runs/x`` in /home/me/proj -> proj)."""
    out = Path(config.training_config.output_dir)
    if out.is_absolute():
        return None
    root = run.root.resolve()
    parts = [p for p in out.parts if p not in (".", "")]
    if ".." in parts or not parts or list(root.parts[-len(parts):]) != parts:
        return None
    return Path(*root.parts[: len(root.parts) - len(parts)])


def _rebase_paths(config, run: RunFolder):
    """Relative local paths in the saved config (base model, tokenizer, data files) were relative to the folder
    training ran in; make them work from anywhere."""
    origin = _training_cwd(config, run)
    if origin is None or origin.resolve() == Path.cwd().resolve():
        return config

    def fix(value):
        if not isinstance(value, str) or not value or Path(value).is_absolute() or Path(value).exists():
            return value
        candidate = origin / value
        return str(candidate) if candidate.exists() else value

    model = dataclasses.replace(config.model, name_or_path=fix(config.model.name_or_path),
                                tokenizer=fix(config.model.tokenizer))
    data = config.data
    changes = {k: fix(getattr(data, k)) for k in ("train", "eval", "cache_dir") if hasattr(data, k)}
    if changes.get("cache_dir") is not None and not Path(changes["cache_dir"]).is_absolute():
        changes["cache_dir"] = str(origin / changes["cache_dir"])
    data = dataclasses.replace(data, **changes)
    return dataclasses.replace(config, model=model, data=data)


def load_run_tokenizer(run_dir: str | os.PathLike, config=None, *, trust_remote_code: bool = False):
    """The tokenizer saved in the run folder (with its chat template); the base model's if the run saved none.
    ``config``: the run's, from :func:`load_run_config` (read here when None)."""
    from .model import load_tokenizer, set_pad_token

    run = open_run(run_dir)
    config = config if config is not None else load_run_config(run.root, trust_remote_code=trust_remote_code)
    if (run.root / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        try:  # trust_remote_code explicit: never transformers' interactive prompt, never the folder's say-so
            tokenizer = AutoTokenizer.from_pretrained(str(run.root),
                                                      trust_remote_code=config.model.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{run.root}: the saved tokenizer cannot be loaded ({exc})") from exc
        set_pad_token(tokenizer)
        return tokenizer
    return load_tokenizer(config.model)


def load_run_model(run_dir: str | os.PathLike, *, device: str | None = None, dtype: str | None = None,
                   trust_remote_code: bool = False):
    """A run's base model with its adapter (eval mode, use_cache on), the run's tokenizer and its config:
    ``(model, tokenizer, config)``. ``dtype``: "auto", "float32", "bfloat16", "float16" (None: the run's).
    ``trust_remote_code``: see :func:`load_run_config`."""
    from .adapt import load_adapter
    from .model import load_model_and_tokenizer, resolve_device

    run = open_run(run_dir)
    config = load_run_config(run.root, trust_remote_code=trust_remote_code)
    tokenizer = load_run_tokenizer(run.root, config)
    model_cfg = config.model if dtype is None else dataclasses.replace(config.model, dtype=dtype)
    model, _ = load_model_and_tokenizer(model_cfg, device=resolve_device(device=device))
    load_adapter(model, run.adapter_dir)
    model.config.use_cache = True  # training turned it off; generation wants it
    model.eval()
    return model, tokenizer, config


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
    from .data import prepare_data

    tokenizer = load_run_tokenizer(run.root, config)
    prepared = prepare_data(data_cfg, tokenizer)
    samples = prepared.train if data is not None else prepared.eval
    if generate:  # the prompts: the prepared conversations up to their last assistant turn
        from .gen_eval import generation_samples

        gen_samples = generation_samples(prepared, data_cfg, tokenizer, "train" if data is not None else "eval")
    if samples is not None and max_samples is not None and max_samples < len(samples):
        samples = samples[:max_samples]
    if samples is None or len(samples) == 0:
        raise DataError(f"no samples to evaluate on ({'the given data' if data is not None else 'the eval data'} "
                        "is empty after preparation)")
    batch_size = batch_size or config.training_config.per_device_eval_batch_size

    from .train import autocast_context, evaluate_samples

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

    from .gen_eval import EVAL_DIR, evaluate_samples_by_generation, flat_metrics
    from .generate import stop_token_ids
    from .lora import disable_adapters
    from .metrics import METRICS_NAME, read_metrics

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
    from .gen_eval import load_metric
    from .generate import GenerationSettings

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
    from .generate import GenerationSettings, context_length, generate_reply, stop_token_ids

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
    from .generate import build_prompt_ids

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

    import torch

    from .adapt import merge_lora_checked
    from .generate import build_prompt_ids, stop_token_ids

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
        from .adapt import merge_checked

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


# Files transformers 5 no longer writes with save_pretrained, which converters still need: llama.cpp's converter stops
# without tokenizer.model on a SentencePiece vocabulary (Phi-3), and reads the special tokens from the other two.
BASE_TOKENIZER_FILES = ("tokenizer.model", "special_tokens_map.json", "added_tokens.json")


def base_tokenizer_file(model_cfg, run_root: Path, name: str) -> Path | None:
    """``name`` from the run folder, else from the base model's tokenizer (local folder or Hub cache); None if
    neither has it."""
    if (run_root / name).is_file():
        return run_root / name
    source = model_cfg.tokenizer or model_cfg.name_or_path
    if Path(source).is_dir():
        return Path(source) / name if (Path(source) / name).is_file() else None
    try:
        from transformers.utils import cached_file

        found = cached_file(source, name, revision=model_cfg.revision, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):
        return None
    return Path(found) if found else None


def copy_base_tokenizer_files(model_cfg, run_root: Path, out: Path, tokenizer) -> list[str]:
    """Copy :data:`BASE_TOKENIZER_FILES` the saved tokenizer lacks into ``out``; special_tokens_map.json gets the
    run tokenizer's special tokens (its pad may differ from the base's). Returns the names copied."""
    copied = []
    for name in BASE_TOKENIZER_FILES:
        source = None if (out / name).exists() else base_tokenizer_file(model_cfg, run_root, name)
        if source is None:
            continue
        shutil.copyfile(source, out / name)
        copied.append(name)
    if "special_tokens_map.json" in copied:
        path = out / "special_tokens_map.json"
        data = json.loads(path.read_text(encoding="utf-8"))
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = getattr(tokenizer, key, None)
            if isinstance(value, str):
                data[key] = value
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return copied


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
    from .config import load_config
    from .data import format_stats, prepare_data, preview_text
    from .model import load_tokenizer
    from .preflight import check_data_paths, check_model_source

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
    from .adapt import add_lora, adapter_state_dict, load_adapter_state_dict
    from .adapt.inject import lora_state
    from .model import load_model_and_tokenizer

    state = lora_state(model)
    tensors = {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}
    dtype_name = str(dtype).replace("torch.", "") if dtype is not None else model_cfg.dtype
    cfg = dataclasses.replace(model_cfg, load_in_4bit=False, dtype=dtype_name)
    full, _ = load_model_and_tokenizer(cfg, device=device)
    add_lora(full, state.config)
    load_adapter_state_dict(full, tensors, source="the 4-bit model's adapter")
    return full
