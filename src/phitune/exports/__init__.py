"""A run, exported to where Phi-3 runs: llama.cpp/LM Studio (GGUF), Ollama, ONNX Runtime GenAI, vLLM.

    import phitune
    phitune.export("runs/phi3-lora", to="gguf", out="phi3.gguf.d", outtype="q8_0")
    phitune.export("runs/phi3-lora", to="ollama", out="phi3-ollama")      # then: ollama create NAME -f Modelfile
    phitune.export("runs/phi3-lora", to="onnx", out="phi3-onnx", precision="int4")
    phitune.export("runs/phi3-lora", to="vllm", out="phi3-vllm-adapter")  # prints the `vllm serve` command

The model targets (gguf, ollama, onnx) start from the merged model (:func:`phitune.runs.merge.merge`, float32, so a
QLoRA run is dequantized first); ``--adapter`` (gguf) and vllm start from the adapter. Every export is built in a
hidden folder next to ``out`` and swapped into place at the end (:func:`phitune.runs.atomic.atomic_folder`), so a
failure leaves nothing half-written. ``out`` follows the policy of every phitune output folder
(:func:`phitune.runs.ownership.check_output_folder`): new or empty, or (``force=True``) an earlier export (it holds
``phitune_export.json``); anything else is refused. Each target checks its result itself and reports it
(:attr:`ExportResult.parity`).

One file per target: to_gguf.py (the gguf package's writer: merged model, LoRA) with gguf_tokenizer.py (vocabulary,
special ids, chat template), to_ollama.py (Modelfile), to_onnx.py (onnxruntime-genai's model builder), to_vllm.py
(adapter with folded scales, the serve command).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from ..errors import ConfigError
from ..runs import ownership
from ..runs.atomic import atomic_folder, scratch_folder
from ..runs.folder import CONFIG_FILE, base_tokenizer_file, load_run_config, open_run
from ..runs.merge import merge
from .common import ExportError, Source
from .to_gguf import write_gguf_adapter, write_gguf_model
from .to_ollama import write_modelfile
from .to_onnx import check_precision, write_onnx
from .to_vllm import write_vllm

TARGETS = ("gguf", "ollama", "onnx", "vllm")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
MARKER = ownership.EXPORT_MARKER
INSTALL_HINT = 'pip install "phitune[export]"'


@dataclasses.dataclass
class ExportResult:
    """What :func:`export` wrote: the folder, its files and size, and the check it ran on them."""

    path: Path
    target: str
    files: list[str]
    size_bytes: int
    parity: str  # one line: what was compared and the measured figure
    details: dict = dataclasses.field(default_factory=dict)  # per-target extras (serve command, max_lora_rank, ...)

    def __str__(self) -> str:
        return f"{self.target} export -> {self.path} ({_human(self.size_bytes)}); {self.parity}"


def export(
    run_dir: str | os.PathLike,
    to: str,
    out: str | os.PathLike,
    *,
    outtype: str | None = None,
    adapter: bool = False,
    precision: str | None = None,
    execution_provider: str = "cpu",
    name: str | None = None,
    force: bool = False,
    device: str | None = None,
    verbose: bool = True,
    trust_remote_code: bool = False,
) -> ExportResult:
    """Export a run (or a merged model folder) ``to`` gguf, ollama, onnx or vllm, into the new folder ``out``.

    ``outtype`` (gguf/ollama): f32, f16 (default for models), bf16 or q8_0; an adapter defaults to f32.
    ``adapter`` (gguf): write the LoRA adapter as a GGUF LoRA instead of the merged model.
    ``precision`` (onnx): fp32 or int4 on the CPU (default fp32), fp16 or int4 with ``execution_provider`` cuda/dml.
    ``name``: the model's name in the GGUF metadata / the vLLM LoRA name (default: the run folder's name).
    ``force``: replace ``out`` if an earlier ``phitune export`` wrote it (never another non-empty folder).
    ``trust_remote_code``: allow the code of a run whose config asks for it
    (see ``phitune.runs.folder.load_run_config``).
    Prints where it wrote, the size, and the parity figure it measured; returns an :class:`ExportResult`.
    """
    if to not in TARGETS:
        raise ConfigError(f"--to {to!r}: choose one of {', '.join(TARGETS)}")
    if outtype is not None and outtype not in OUTTYPES:
        raise ConfigError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    if outtype is not None and to not in ("gguf", "ollama"):
        raise ConfigError(f"--outtype is for --to gguf/ollama; {to} takes {'--precision' if to == 'onnx' else 'none'}")
    if adapter and to != "gguf":
        raise ConfigError("--adapter is for --to gguf (a GGUF LoRA); --to vllm always exports the adapter")
    if precision is not None and to != "onnx":
        raise ConfigError("--precision is for --to onnx; use --outtype for gguf/ollama")
    out = Path(out).expanduser()
    source = _open_source(run_dir, trust_remote_code)
    if to == "vllm" or adapter:
        if source.run is None:
            raise ExportError(f"'{run_dir}' is a merged model folder, which has no adapter; pass the run folder "
                              f"(it holds {CONFIG_FILE} and adapter_config.json)")
    _check_out(out, source, force)
    if to in ("gguf", "ollama"):
        _require("gguf", "sentencepiece" if _needs_sentencepiece(source) else None)
    if to == "onnx":
        precision = check_precision(precision, execution_provider)
        _require("onnxruntime_genai", "onnx", "onnx_ir", "onnxruntime")

    started = time.time()
    with atomic_folder(out, f"the {to} export", fix="free space or choose another folder (--out DIR)") as staging:
        label = name or (source.run.root.name if source.run else source.model_dir.name)
        if to == "vllm":
            parity, details = write_vllm(source, staging, label, out.resolve())
        elif adapter:
            parity, details = write_gguf_adapter(source, staging / f"{_slug(label)}-lora.gguf", outtype or "f32", label)
        else:
            with scratch_folder(out, "merged") as work:  # the merged model, on the export's disk; never exported
                model_dir = _merged(source, work / "merged", device, trust_remote_code)
                if to == "onnx":
                    parity, details = write_onnx(model_dir, staging, precision, execution_provider, work / "cache")
                else:
                    gguf_path = staging / f"{_slug(label)}-{outtype or 'f16'}.gguf"
                    parity, details = write_gguf_model(model_dir, gguf_path, outtype or "f16", label)
                    if to == "ollama":
                        details.update(write_modelfile(model_dir, staging, gguf_path.name))
                        details["next_steps"] = [f"ollama: cd {out} && ollama create {_slug(label).lower()} -f "
                                                 f"Modelfile && ollama run {_slug(label).lower()}"]
        info = {"target": to, "source": str(source.run.adapter_dir if source.run else source.model_dir),
                "outtype": outtype, "adapter": adapter, "precision": precision, "parity": parity,
                "details": {k: v for k, v in details.items() if isinstance(v, (str, int, float, bool, list))}}
        (staging / MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    size = sum((out / f).stat().st_size for f in files)
    result = ExportResult(out, to, files, size, parity, details)
    if verbose:
        print(f"exported {to} -> {out} ({_human(size)}, {time.time() - started:.1f}s)")
        print(f"check: {parity}")
        for line in details.get("next_steps", []):
            print(line)
        for line in details.get("warnings", []):
            print(f"warning: {line}", file=sys.stderr)
    return result


# --- the source -----------------------------------------------------------------------------------------------------


def _open_source(run_dir, trust_remote_code: bool = False) -> Source:
    path = Path(run_dir).expanduser()
    if path.is_dir() and (path / "config.json").is_file() and not (path / CONFIG_FILE).is_file() \
            and any(path.glob("*.safetensors")):
        return Source(run=None, model_dir=path, config=None)  # already merged (e.g. by `phitune merge`)
    run = open_run(path)
    return Source(run=run, model_dir=None, config=load_run_config(run.root, trust_remote_code=trust_remote_code))


def _merged(source: Source, folder: Path, device: str | None, trust_remote_code: bool = False) -> Path:
    """A merged float32 model folder: the given one, or the run merged by :func:`phitune.runs.merge.merge` (a QLoRA
    run's
    4-bit base dequantized first, as the adapter was trained against it)."""
    if source.model_dir is not None:
        return source.model_dir
    merge(source.run.adapter_dir, folder, dtype="float32", device=device, verbose=False, dequantize=True,
          trust_remote_code=trust_remote_code)
    return folder


def _needs_sentencepiece(source: Source) -> bool:
    if source.model_dir is not None:
        return (source.model_dir / "tokenizer.model").is_file()

    return base_tokenizer_file(source.config.model, source.run.root, "tokenizer.model") is not None


def _require(*modules: str | None) -> None:
    missing = [m for m in modules if m and importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"this export needs the Python package{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(missing)}, which {'are' if len(missing) > 1 else 'is'} not installed: "
                          f"{INSTALL_HINT}")


# --- the output folder ----------------------------------------------------------------------------------------------


def _check_out(out: Path, source: Source, force: bool) -> None:
    inside = source.run.root if source.run else source.model_dir
    if out.resolve() == inside.resolve() or inside.resolve() in out.resolve().parents:
        raise ConfigError(f"--out '{out}' is inside the folder being exported; choose a folder outside it")
    ownership.check_output_folder(out, what="export --out", owned=ownership.is_export_folder, owner="phitune export",
                                  choose="choose a new or empty folder (--out DIR)", replace=force, create=False)


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-.")
    return keep or "model"


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


__all__ = ["export", "ExportResult", "ExportError", "TARGETS", "OUTTYPES"]
