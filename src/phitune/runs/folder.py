"""The output folder of a run ("run dir"), written by training and reopened by eval, chat, merge and export.

A run dir describes itself (docs/architecture.md, "Output folder"): the adapter, the resolved config naming the base
model, the tokenizer with its chat template, the generation config, the metrics. Training claims the folder
(``prepare_output_dir``: never one phitune did not create, locked for the run) and writes it (``save_run``); every
other command opens it (``open_run``, ``load_run_config``, ``load_run_model``) and needs nothing else. A checkpoint
folder (``RUN/checkpoints/checkpoint-STEP``) opens wherever a run dir does: its adapter with the run's config and
tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from contextlib import ExitStack
from pathlib import Path

from ..training import checkpoint as ckpt
from . import ownership as outdir
from ..adapt import load_adapter, save_adapter
from ..config import RunConfig, TrainingConfig, load_config, run_status, save_config
from ..errors import ConfigError
from ..training.metrics import plot_loss_curve, read_metrics
from ..generation.stops import generation_config_for
from ..models.chat_template import is_local_path, looks_like_path, with_chat_template
from ..models.loading import load_model_and_tokenizer, load_tokenizer, open_tokenizer, resolve_device, set_pad_token

CONFIG_FILE = "phitune_config.yaml"
# Files transformers 5 no longer writes with save_pretrained, which converters still need: llama.cpp's converter stops
# without tokenizer.model on a SentencePiece vocabulary (Phi-3), and reads the special tokens from the other two.
BASE_TOKENIZER_FILES = ("tokenizer.model", "special_tokens_map.json", "added_tokens.json")


# --- written by training -----------------------------------------------------------------------------------------


def prepare_output_dir(out: Path, tc: TrainingConfig, settings: dict, run_scope: ExitStack) -> Path | None:
    """The checkpoint to resume from (checked against the config), or None for a fresh run; refuses to mix runs,
    to write into a folder phitune did not create, and to share the folder with a running run (the lock is held
    until ``run_scope`` closes)."""
    outdir.check_output_folder(out, what="training_config.output_dir", owned=outdir.is_run_folder,
                               choose="choose another folder (--set training_config.output_dir=NEW_DIR)")
    run_scope.enter_context(outdir.lock_output_dir(out))
    resume_from = ckpt.resolve_resume(tc.resume_from_checkpoint, out)
    if resume_from is not None:
        ckpt.check_compatible(resume_from, settings)
        out.mkdir(parents=True, exist_ok=True)
        return resume_from
    earlier = ckpt.list_checkpoints(out) or (out / "adapter_model.safetensors").exists()
    if earlier and tc.resume_from_checkpoint and finished_steps(out) is not None:
        return None  # a finished run: finetune says so once it knows the steps asked for
    if earlier:
        if not tc.overwrite_output_dir:
            raise ConfigError(
                f"training_config.output_dir: {out} already holds a run. Set resume_from_checkpoint: auto to continue "
                "it, overwrite_output_dir: true to start over, or choose another output_dir."
            )
        shutil.rmtree(ckpt.checkpoints_dir(out), ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return None


def save_run(out: Path, cfg: RunConfig, model, tokenizer, data_stats: dict, final: dict, report) -> None:
    """The final run folder: adapter, tokenizer + chat template, generation config, resolved config, metrics, README."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = with_absolute_paths(cfg)  # the folder must reopen from any working directory (eval/chat/merge)
    save_adapter(model, out, base_model_name_or_path=cfg.model.name_or_path)
    tokenizer.save_pretrained(out)
    generation_config_for(model, tokenizer).save_pretrained(out)
    save_config(cfg, out / "phitune_config.yaml", status="complete")
    (out / "data_stats.json").write_text(json.dumps(data_stats, indent=1, default=str), encoding="utf-8")
    (out / "final_metrics.json").write_text(json.dumps(final, indent=1), encoding="utf-8")
    records = read_metrics(out / "metrics.jsonl")
    plot_loss_curve(records, out / "loss_curve.png")
    (out / "README.md").write_text(run_readme(out, cfg, final, report, data_stats), encoding="utf-8")


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` whose local paths (base model, tokenizer, data files) are absolute; Hub ids stay as they
    are."""

    def absolute(value):
        if isinstance(value, (str, os.PathLike)) and is_local_path(value):
            return str(Path(value).resolve())
        return value

    model = dataclasses.replace(cfg.model, name_or_path=absolute(cfg.model.name_or_path),
                                tokenizer=absolute(cfg.model.tokenizer))
    data = dataclasses.replace(cfg.data, train=absolute(cfg.data.train), eval=absolute(cfg.data.eval),
                               chat_template=absolute(cfg.data.chat_template))
    return dataclasses.replace(cfg, model=model, data=data)


def run_readme(out: Path, cfg: RunConfig, final: dict, report, data_stats: dict) -> str:
    tc = cfg.training_config
    lines = [
        f"# {out.name}: LoRA fine-tune of `{cfg.model.name_or_path}`",
        "",
        f"Trained with phitune: {final['train_steps']} optimizer steps, learning rate {tc.learning_rate:g} "
        f"({tc.lr_scheduler_type}), {tc.per_device_train_batch_size} x {tc.gradient_accumulation_steps} "
        f"sequences per step, max_seq_length {cfg.data.max_seq_length}, packing {cfg.data.packing}.",
        "",
        f"- adapter: {report}",
        f"- peft_config: r={cfg.peft_config.r}, lora_alpha={cfg.peft_config.lora_alpha}, "
        f"lora_dropout={cfg.peft_config.lora_dropout}, target_modules={cfg.peft_config.target_modules}",
        "",
        "## Final metrics",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in final.items()]
    lines += [
        "",
        "## Files",
        "",
        "adapter_config.json + adapter_model.safetensors (PEFT layout), tokenizer files and chat template, "
        "generation_config.json (stops on every end-of-turn id), phitune_config.yaml (the resolved config), "
        "metrics.jsonl, loss_curve.png, data_stats.json, checkpoints/.",
        "",
        "## Use",
        "",
        "```",
        f"phitune chat {out}",
        f"phitune eval {out}",
        f"phitune merge {out} --out {out}-merged",
        "```",
        "",
        "With peft: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "
        f"\"{out}\")`.",
        "",
    ]
    if data_stats:
        lines += ["## Data", "", "```", json.dumps(data_stats, indent=1, default=str)[:3000], "```", ""]
    return "\n".join(lines)


def finished_steps(out: Path) -> int | None:
    """The steps a finished run in ``out`` trained (its final_metrics.json), or None when it did not finish (no
    final adapter, or its config still marked incomplete)."""
    if not (out / "adapter_model.safetensors").is_file() or run_status(out / "phitune_config.yaml") == "incomplete":
        return None
    try:
        return int(json.loads((out / "final_metrics.json").read_text())["train_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def logged_eval(metrics_path: Path, step: int) -> dict | None:
    """The evaluation already logged at ``step`` (the loop's last one), if any."""
    records = read_metrics(metrics_path)
    return next((r for r in reversed(records) if "eval_loss" in r and r["step"] == step), None)


# --- reopened by eval, chat, merge, export -------------------------------------------------------------------------


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


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
        usable = [c for c in reversed(_checkpoints(root))
                  if all((c / n).is_file() for n in ADAPTER_FILES) and ckpt.checkpoint_problem(c) is None]
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
    return ckpt.list_checkpoints(root)


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
        if not isinstance(value, str) or not value or Path(value).is_absolute() or not looks_like_path(value) \
                or Path(value).exists():
            return value
        candidate = origin / value
        return str(candidate) if candidate.exists() else value

    model = dataclasses.replace(config.model, name_or_path=fix(config.model.name_or_path),
                                tokenizer=fix(config.model.tokenizer))
    data = config.data
    changes = {k: fix(getattr(data, k)) for k in ("train", "eval", "cache_dir", "chat_template")
               if hasattr(data, k)}
    if changes.get("cache_dir") is not None and not Path(changes["cache_dir"]).is_absolute():
        changes["cache_dir"] = str(origin / changes["cache_dir"])
    data = dataclasses.replace(data, **changes)
    return dataclasses.replace(config, model=model, data=data)


def load_run_tokenizer(run_dir: str | os.PathLike, config=None, *, trust_remote_code: bool = False):
    """The tokenizer saved in the run folder (with its chat template); the base model's if the run saved none.
    ``config``: the run's, from :func:`load_run_config` (read here when None)."""
    run = open_run(run_dir)
    config = config if config is not None else load_run_config(run.root, trust_remote_code=trust_remote_code)
    if (run.root / "tokenizer_config.json").is_file():
        try:  # trust_remote_code explicit: never transformers' interactive prompt, never the folder's say-so
            tokenizer = open_tokenizer(str(run.root), trust_remote_code=config.model.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{run.root}: the saved tokenizer cannot be loaded ({exc})") from exc
        set_pad_token(tokenizer)
        return tokenizer
    return with_chat_template(load_tokenizer(config.model), config.data.chat_template)


def load_run_model(run_dir: str | os.PathLike, *, device: str | None = None, dtype: str | None = None,
                   trust_remote_code: bool = False):
    """A run's base model with its adapter (eval mode, use_cache on), the run's tokenizer and its config:
    ``(model, tokenizer, config)``. ``dtype``: "auto", "float32", "bfloat16", "float16" (None: the run's).
    ``trust_remote_code``: see :func:`load_run_config`."""
    run = open_run(run_dir)
    config = load_run_config(run.root, trust_remote_code=trust_remote_code)
    tokenizer = load_run_tokenizer(run.root, config)
    model_cfg = config.model if dtype is None else dataclasses.replace(config.model, dtype=dtype)
    model, _ = load_model_and_tokenizer(model_cfg, device=resolve_device(device=device))
    load_adapter(model, run.adapter_dir)
    model.config.use_cache = True  # training turned it off; generation wants it
    model.eval()
    return model, tokenizer, config


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
