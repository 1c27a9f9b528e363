"""ONNX Runtime GenAI: the merged model through onnxruntime-genai's own model builder, checked by greedy decoding.

The builder is run as its documented command (``python -m onnxruntime_genai.models.builder``) in a subprocess: its
Python entry points change between releases, its command line does not. Afterwards genai_config.json gets every
stop id of the run (``generation.stops.stop_token_ids``; the builder copies only config.json's eos).
genai_config.json rejects keys it does not know, so the chat template travels as the builder saves it, next to it
(chat_template.jinja / tokenizer_config.json), where ``og.Tokenizer.apply_chat_template`` reads it. ORT GenAI's
tokenizer adds no BOS: prepend ``tokenizer.bos_token_id`` to the encoded prompt, as phitune trains (README, "Run
your model elsewhere").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ..errors import ConfigError
from ..generation.generate import build_prompt_ids
from ..generation.stops import stop_token_ids
from ..models.loading import open_tokenizer
from .common import ExportError

PRECISIONS = {"cpu": ("fp32", "int4"), "cuda": ("fp16", "int4", "fp32"), "dml": ("fp16", "int4")}
CHECK_TOKENS = 16
_PROMPT = [{"role": "user", "content": "Hello! Explain in one sentence what a low-rank adapter is."}]


def check_precision(precision: str | None, execution_provider: str) -> str:
    """The precision to build (default: fp32 on the CPU, fp16 on a GPU); refuses a pair the builder cannot make."""
    if execution_provider not in PRECISIONS:
        raise ConfigError(f"--execution-provider {execution_provider!r}: choose one of {', '.join(PRECISIONS)}")
    allowed = PRECISIONS[execution_provider]
    precision = precision or allowed[0]
    if precision not in allowed:
        raise ConfigError(f"--precision {precision} with --execution-provider {execution_provider}: choose one of "
                          f"{', '.join(allowed)}")
    return precision


def write_onnx(model_dir: Path, out: Path, precision: str, execution_provider: str, cache: Path) -> tuple[str, dict]:
    """Build the ONNX Runtime GenAI folder ``out`` from the merged model folder; returns (parity line, details)."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out),
           "-p", precision, "-e", execution_provider, "-c", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (out / "genai_config.json").is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise ExportError(f"onnxruntime-genai's model builder failed (exit {proc.returncode}):\n{tail}")
    stops = stop_token_ids(open_tokenizer(str(model_dir)), run_dir=model_dir)
    path = out / "genai_config.json"
    genai = json.loads(path.read_text(encoding="utf-8"))
    genai["model"]["eos_token_id"] = stops if len(stops) > 1 else stops[0]
    path.write_text(json.dumps(genai, indent=4) + "\n", encoding="utf-8")
    details = {"precision": precision, "execution_provider": execution_provider, "stop_ids": stops}
    if execution_provider != "cpu":
        return (f"greedy parity not measured: the model is built for {execution_provider}; this check runs on the CPU "
                "build only"), details
    same, total, first = greedy_parity(model_dir, out, stops)
    details.update({"greedy_tokens_equal": same, "greedy_tokens": total})
    where = "" if first is None else f", first difference at token {first}"
    return (f"greedy tokens of ONNX Runtime GenAI equal to transformers' on a chat prompt: {same}/{total}{where}",
            details)


def greedy_parity(model_dir: Path, onnx_dir: Path, stops: list[int]) -> tuple[int, int, int | None]:
    """Greedy continuation of a chat prompt by transformers (merged model, float32) and by ONNX Runtime GenAI:
    (equal tokens, compared tokens, index of the first difference or None). Both stop at the first stop id."""
    import onnxruntime_genai as og
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = open_tokenizer(str(model_dir))
    prompt = build_prompt_ids(tokenizer, _PROMPT)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, trust_remote_code=False)
    model.eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=CHECK_TOKENS, do_sample=False, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0])
    want = _until_stop(out[0, len(prompt):].tolist(), stops)
    del model

    ort_model = og.Model(str(onnx_dir))
    params = og.GeneratorParams(ort_model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + CHECK_TOKENS)
    generator = og.Generator(ort_model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    got = _until_stop([int(t) for t in generator.get_sequence(0)][len(prompt):], stops)
    total = max(len(want), len(got))
    first = next((i for i in range(total) if i >= len(want) or i >= len(got) or want[i] != got[i]), None)
    same = total if first is None else first
    return same, total, first


def _until_stop(ids: list[int], stops: list[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i + 1]
    return ids
