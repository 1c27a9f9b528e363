"""vLLM: the adapter folder as vLLM reads it, and the ``vllm serve`` command for it.

vLLM reads phitune's fused ``qkv_proj``/``gate_up_proj`` layout as it is, but applies one scaling, lora_alpha / r,
to every module and checks only the global ``r`` against ``--max-lora-rank``, while a fused module with n slices has
rank r x n and rank_pattern/alpha_pattern/rsLoRA give modules their own scale. So the export folds each module's
scale into its B, and writes lora_alpha equal to r for every module (peft's rank_pattern/alpha_pattern say the same,
so peft and phitune still load the folder exactly): scaling 1 everywhere, whatever a loader reads. ``--max-lora-rank``
is the smallest value vLLM accepts that holds the largest module rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..adapt import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME, read_adapter
from .common import Source
from .to_gguf import lora_scale

# The values vLLM accepts for --max-lora-rank.
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def write_vllm(source: Source, out: Path, label: str, final: Path) -> tuple[str, dict]:
    """Write the folded adapter to ``out`` (moved to ``final`` afterwards) with a README holding the serve command;
    returns (parity, details)."""
    from safetensors.torch import save_file

    cfg, tensors, _ = read_adapter(source.run.adapter_dir)
    warnings = []
    if cfg.modules_to_save:
        warnings.append(f"modules_to_save {cfg.modules_to_save}: vLLM refuses adapters with fully trained modules; "
                        "serve the merged model instead (phitune merge, then vllm serve MERGED_DIR)")
    if cfg.bias != "none":
        warnings.append(f"bias={cfg.bias!r}: vLLM does not apply trained biases of an adapter; serve the merged model")
    if any(".lora_embedding_" in k for k in tensors):
        warnings.append("LoRA on the token embedding: recent vLLM versions do not load it; serve the merged model")
    if source.quantized:
        warnings.append("this is a QLoRA run: vLLM serves the adapter on the 16-bit base, not on the 4-bit weights it "
                        "was trained against (usually a small difference; `phitune eval` the merged model to check)")

    pairs = _folded(cfg, tensors)
    ranks = {m: int(a.shape[0]) for m, (a, _) in pairs.items()}
    top = max(ranks.values())
    out_tensors, worst, largest = {}, 0.0, 0.0
    for module, (a, b) in pairs.items():
        key = PEFT_PREFIX + module
        out_tensors[f"{key}.lora_A.weight"] = a.to(tensors[f"{key}.lora_A.weight"].dtype).contiguous()
        out_tensors[f"{key}.lora_B.weight"] = b.to(tensors[f"{key}.lora_B.weight"].dtype).contiguous()
        want = b.float() @ a.float()  # folded in float32 from the run's tensors
        got = out_tensors[f"{key}.lora_B.weight"].float() @ out_tensors[f"{key}.lora_A.weight"].float()
        worst = max(worst, float((got - want).abs().max()))
        largest = max(largest, float(want.abs().max()))
    for key, value in tensors.items():  # biases, modules_to_save, embeddings: unchanged
        if ".lora_A." not in key and ".lora_B." not in key:
            out_tensors[key] = value.contiguous()
    save_file(out_tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})

    config = json.loads((source.run.adapter_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    config.update({"r": top, "lora_alpha": top, "use_rslora": False,
                   "rank_pattern": {m: r for m, r in ranks.items() if r != top},
                   "alpha_pattern": {m: r for m, r in ranks.items() if r != top}})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    max_rank = next((v for v in VLLM_MAX_LORA_RANKS if v >= top), None)
    if max_rank is None:
        warnings.append(f"the adapter's largest module rank is {top}; vLLM serves ranks up to "
                        f"{VLLM_MAX_LORA_RANKS[-1]}: serve the merged model instead")
        max_rank = top
    base = source.config.model.name_or_path
    command = f"vllm serve {base} --enable-lora --lora-modules {label}={final} --max-lora-rank {max_rank}"
    details = {"base_model": base, "max_lora_rank": max_rank, "largest_module_rank": top, "warnings": warnings,
               "serve_command": command, "next_steps": [f"vllm: {command}"]}
    parity = (f"folded adapter (scaling 1 for every module) vs the run's scaled deltas over {len(pairs)} modules: "
              f"max |difference| {worst:.3g} (largest delta entry {largest:.3g})")
    (out / "README.md").write_text(_readme(label, command, max_rank, top, warnings), encoding="utf-8")
    return parity, details


def _folded(cfg, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A, B * scale)}`` in float32 (what vLLM refuses is a warning here, not an error as for llama.cpp)."""
    pairs = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            pairs[module] = (a.float(), b.float() * lora_scale(cfg, module, a.shape[0]))
    return pairs


def _readme(label: str, command: str, max_rank: int, top: int, warnings: list[str]) -> str:
    lines = [f"# {label}: LoRA adapter for vLLM (written by `phitune export --to vllm`)", "",
             "Serve it on its base model:", "", "```bash", command,
             "```", "",
             f"`--max-lora-rank {max_rank}`: the adapter's largest module has rank {top} (a fused Phi-3 module with n "
             "adapted slices has rank r x n); vLLM checks only the config's r and fails when the adapter is first "
             "used if the flag is lower.", "",
             "Each module's LoRA scale is folded into its lora_B and lora_alpha equals r everywhere (scaling 1), so "
             "vLLM, peft and phitune all apply exactly the trained delta.", ""]
    if warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    return "\n".join(lines)
