"""``phitune merge``: a run's adapter folded into its base, written as a plain Hugging Face model folder and checked
(logits of the merged model against the adapter on the base).

    phitune.merge("runs/phi3-lora", "runs/phi3-merged")
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path

import torch

from ..adapt import adapter_state_dict, add_lora, load_adapter_state_dict, merge_checked, merge_lora_checked
from ..adapt.inject import lora_state
from ..errors import ConfigError
from ..generation.generate import build_prompt_ids
from ..generation.stops import stop_token_ids
from ..models.loading import load_model_and_tokenizer
from ..runs import ownership as outdir
from ..runs.atomic import atomic_folder
from ..runs.folder import copy_base_tokenizer_files, load_run_config, load_run_model, open_run

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
    outdir.check_output_folder(out, what="merge --out", owned=outdir.is_merge_folder, owner="phitune merge",
                               choose="choose a new or empty folder for the merged model (--out DIR)",
                               replace=force, create=False)

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
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, run_dir=run.root, model=model)
    model.config.use_cache = True
    weights_dtype = str(next(model.parameters()).dtype).replace("torch.", "")

    # Built next to ``out`` and swapped in whole: a crash mid-save never leaves a half-written model, and shards of
    # an earlier merge never mix with the new ones.
    with atomic_folder(out, "the merged model", fix="free space or choose another folder (--out DIR)") as staging:
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
        (staging / outdir.MERGE_MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
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
