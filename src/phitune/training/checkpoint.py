"""Checkpoints that survive a kill at any moment, and exact resume.

A checkpoint is a folder ``OUTPUT_DIR/checkpoints/checkpoint-STEP/`` holding

    adapter_config.json, adapter_model.safetensors   the adapter at that step (PEFT layout; `phitune eval` reads it)
    trainable.safetensors                            every trainable parameter under its model name (for resume)
    training_state.pt                                optimizer, scheduler, grad scaler, RNG states (one per
                                                     process under torchrun), data position (global)
    meta.json                                        step, config hash and the hashed settings, written last

It is written by :func:`phitune.runs.atomic.atomic_folder`: into ``checkpoints/.tmp-checkpoint-STEP-PID-TOKEN/``,
every file fsynced, then renamed into place (``os.replace``, atomic on POSIX; a step saved again after a resume is
swapped in by one ``renameat2(RENAME_EXCHANGE)`` on Linux) and ``checkpoints/`` fsynced. ``meta.json`` is written
last and :func:`list_checkpoints` counts only folders named ``checkpoint-STEP`` that hold it, so a checkpoint listed is
always complete: a SIGKILL leaves at worst a ``.tmp-*`` folder, which the next save deletes. Rotation renames a
folder away before deleting it (:func:`phitune.runs.atomic.remove_folder`), so no half-deleted folder keeps the
name either.

Under torchrun only rank 0 writes (phitune.training.train calls this through ``distributed.on_main``). The data position
counts micro-batches of the global plan (per-device batch x processes), so a run resumes on any number of processes
with the same per-device batch x processes.

``training_state.pt`` holds only tensors and plain Python values, so it loads with ``torch.load(weights_only=True)``
(no pickled code); weights go through safetensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..adapt import save_adapter
from ..config.training_args import METHOD_KEYS
from ..errors import CheckpointError
from ..runs.atomic import atomic_folder, remove_folder
from ..runs.storage import readable_like_the_rest

log = logging.getLogger("phitune")

CHECKPOINTS = "checkpoints"
PREFIX = "checkpoint-"
STATE_NAME = "training_state.pt"
TRAINABLE_NAME = "trainable.safetensors"
META_NAME = "meta.json"
# Settings that must match for a resumed run to continue the same run (changing epochs/max_steps is allowed).
RESUME_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "seed")
# Kill-test hook (see _test_slow_save): sleep after the files are written, before the rename.
_SLOW_SAVE_ENV = "PHITUNE_TEST_SLOW_SAVE"


# --- what must match --------------------------------------------------------------------------------------------------


def resume_settings(config, world_size: int = 1) -> dict[str, Any]:
    """The parts of a RunConfig a checkpoint depends on: model, data, peft_config, batch/accumulation/seed (and the
    number of processes, when more than one: what must match is per-device batch x processes)."""
    run = config.to_dict()
    training = run["training_config"]
    model = {k: run["model"][k] for k in ("name_or_path", "revision", "tokenizer")}
    training = {k: training[k] for k in RESUME_KEYS}
    if run["training_config"].get("method", "sft") != "sft":  # absent for SFT, so older SFT checkpoints still match
        training.update({k: v for k, v in run["training_config"].items() if k == "method" or k in METHOD_KEYS})
    if world_size > 1:
        training["world_size"] = world_size
    return {
        "model": model,
        "data": run["data"],
        "peft_config": run["peft_config"],
        "training_config": training,
    }


def _global_batch(settings: dict[str, Any]) -> int | None:
    training = settings.get("training_config", {})
    if "per_device_train_batch_size" not in training:
        return None
    return training["per_device_train_batch_size"] * training.get("world_size", 1)


def config_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def check_compatible(checkpoint: Path, settings: dict[str, Any]) -> None:
    """Raise CheckpointError naming every setting that differs from the checkpoint's."""
    meta = read_meta(checkpoint)
    if meta.get("config_hash") == config_hash(settings):
        return
    diffs = _differences(meta.get("settings", {}), settings)
    # Cache/report-only data keys never change the samples; ignore them if they are the only differences.
    diffs = [d for d in diffs if not d.startswith(("data.cache", "data.max_errors_shown"))]
    old_batch, new_batch = _global_batch(meta.get("settings", {})), _global_batch(settings)
    if old_batch == new_batch:  # other process count, same micro-batches: the same run
        diffs = [d for d in diffs if not d.startswith(("training_config.per_device_train_batch_size",
                                                       "training_config.world_size"))]
    if not diffs:
        return
    hint = ""
    if any(d.startswith(("training_config.per_device_train_batch_size", "training_config.world_size"))
           for d in diffs) and old_batch is not None:
        hint = (f" (per_device_train_batch_size x processes was {old_batch}, is {new_batch}; any process count "
                "keeping that product resumes)")
    raise CheckpointError(
        f"cannot resume from {checkpoint}: it was written with a different config ("
        + "; ".join(diffs[:8]) + ("; ..." if len(diffs) > 8 else "")
        + f"){hint}. Resume with the original settings, or start a fresh run (another output_dir, or "
          "overwrite_output_dir: true without resume_from_checkpoint)."
    )


# --- RNG states as plain data (weights_only-safe) ---------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- write ------------------------------------------------------------------------------------------------------------


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINTS


def save_checkpoint(output_dir, step: int, *, model, optimizer, scheduler, data_position: dict, settings: dict,
                    base_model_name_or_path: str | None = None, scaler=None, extra: dict | None = None,
                    rng_per_process: list | None = None) -> Path:
    """Write ``checkpoints/checkpoint-STEP`` atomically and return its path (``rng_per_process``: every process's
    ``rng_state()`` under torchrun, so each resumes its own dropout stream). A file-system failure (disk full,
    read-only) is a StorageError naming the path; the earlier checkpoints are untouched."""
    final = checkpoints_dir(output_dir) / f"{PREFIX}{step}"
    with atomic_folder(final, f"checkpoint {step}", keeps="Earlier checkpoints are intact.",
                       before_swap=lambda: _test_slow_save(step)) as tmp:
        _write_checkpoint_files(tmp, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                data_position=data_position, settings=settings, scaler=scaler, extra=extra,
                                rng_per_process=rng_per_process, base_model_name_or_path=base_model_name_or_path)
    return final


def _write_checkpoint_files(tmp: Path, step: int, *, model, optimizer, scheduler, data_position, settings, scaler,
                            extra, rng_per_process, base_model_name_or_path) -> None:
    save_adapter(model, tmp, base_model_name_or_path=base_model_name_or_path)
    trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / TRAINABLE_NAME))
    readable_like_the_rest(tmp / TRAINABLE_NAME)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": rng_state(),
        "data_position": dict(data_position),
        "extra": extra or {},
    }
    if rng_per_process is not None:
        state["rng_per_process"] = list(rng_per_process)
    torch.save(state, tmp / STATE_NAME)
    meta = {"step": step, "config_hash": config_hash(settings), "settings": settings,
            "data_position": dict(data_position), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "files": {f.name: file_record(f) for f in sorted(tmp.iterdir())}}
    # last: a folder with meta.json holds every other file (atomic_folder fsyncs them all before the rename)
    (tmp / META_NAME).write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")


def _test_slow_save(step: int) -> None:
    """Kill-test hook: PHITUNE_TEST_SLOW_SAVE="SECONDS" or "STEP:SECONDS" sleeps between writing and renaming."""
    value = os.environ.get(_SLOW_SAVE_ENV)
    if not value:
        return
    at, _, seconds = value.rpartition(":")
    if not at or int(at) == step:
        time.sleep(float(seconds))


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit() and (p / META_NAME).is_file():
            found.append((int(p.name[len(PREFIX):]), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def file_record(path: Path) -> dict[str, Any]:
    """Size and BLAKE2b hash of a checkpoint file, kept in meta.json to find a file cut off or damaged later."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "blake2b": h.hexdigest()}


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint folder (its meta.json, step, every file's size and hash), or None. Checkpoints
    written before the files were recorded are checked for their step and the files' presence only."""
    try:
        meta = json.loads((checkpoint / META_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{META_NAME} is unreadable ({exc})"
    name_step = checkpoint.name[len(PREFIX):]
    if not isinstance(meta, dict) or str(meta.get("step")) != name_step:
        return f"{META_NAME} says step {meta.get('step') if isinstance(meta, dict) else '?'}, the folder {name_step}"
    files = meta.get("files") or {n: None for n in (STATE_NAME, TRAINABLE_NAME)}
    for name, want in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if want is None:
            continue
        if path.stat().st_size != want["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {want['bytes']} were written"
        if file_record(path)["blake2b"] != want["blake2b"]:
            return f"{name} differs from what was written (hash mismatch)"
    return None


def usable_checkpoint(output_dir, warn=None) -> Path | None:
    """The newest checkpoint of a run that passes checkpoint_problem; each damaged newer one is reported through
    ``warn`` (a callable taking a message) and skipped."""
    for ckpt in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        if warn is not None:
            warn(f"{ckpt} is damaged ({problem}); falling back to the previous complete checkpoint")
    return None


def rotate_checkpoints(output_dir, save_total_limit: int | None, keep: Path | None = None) -> list[Path]:
    """Delete the oldest checkpoints beyond ``save_total_limit``; never the newest, nor ``keep``. Returns deleted."""
    if not save_total_limit:
        return []
    ckpts = list_checkpoints(output_dir)
    deletable = [p for p in ckpts[:-1] if keep is None or p.resolve() != Path(keep).resolve()]
    excess = len(ckpts) - save_total_limit
    deleted = []
    for p in deletable[:max(excess, 0)]:
        remove_folder(p)  # renamed away first: a kill mid-delete never leaves a half-deleted folder that looks complete
        deleted.append(p)
    return deleted


# --- read -------------------------------------------------------------------------------------------------------------


def read_meta(checkpoint: str | os.PathLike) -> dict[str, Any]:
    path = Path(checkpoint) / META_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{checkpoint}: not a phitune checkpoint (cannot read {META_NAME}: {exc})") from exc


def resolve_resume(resume_from_checkpoint, output_dir) -> Path | None:
    """The checkpoint to resume from: ``auto`` (latest, or none), ``true`` (latest, must exist), or a path."""
    value = resume_from_checkpoint
    if value is None or value is False:
        return None
    if value is True or (isinstance(value, str) and value.lower() in ("auto", "true", "latest")):
        found = usable_checkpoint(output_dir, warn=log.warning)
        if found is None and list_checkpoints(output_dir):
            raise CheckpointError(f"resume_from_checkpoint: every checkpoint in {checkpoints_dir(output_dir)} is "
                                  "damaged (see the warnings above). Fix: delete them and set "
                                  "overwrite_output_dir: true to start over")
        if found is None and not (isinstance(value, str) and value.lower() == "auto"):
            raise CheckpointError(f"resume_from_checkpoint: no checkpoint in {checkpoints_dir(output_dir)}; "
                                  "use auto to start fresh when there is none")
        return found
    path = Path(value)
    if (path / META_NAME).is_file():
        problem = checkpoint_problem(path)
        if problem is not None:
            raise CheckpointError(f"resume_from_checkpoint: {path} is damaged ({problem}). Fix: name an earlier "
                                  "checkpoint, or use auto to take the newest complete one")
        return path
    found = usable_checkpoint(path, warn=log.warning)  # a run folder
    if found is None:
        raise CheckpointError(f"resume_from_checkpoint: {path} is neither a checkpoint folder (with {META_NAME}) "
                              f"nor a run folder with checkpoints/")
    return found


def load_checkpoint(checkpoint: str | os.PathLike, *, model, optimizer, scheduler, scaler=None, rank: int = 0,
                    world_size: int = 1) -> dict[str, Any]:
    """Restore trainable weights, optimizer, scheduler, scaler and RNG states; return the training state dict.

    Under torchrun (``world_size`` > 1) process ``rank`` takes its own saved RNG state when the checkpoint has one
    per process for the same count; otherwise a seed derived from the step and the rank (reproducible, not equal).
    """
    checkpoint = Path(checkpoint)
    try:
        tensors = load_file(str(checkpoint / TRAINABLE_NAME))
        state = torch.load(checkpoint / STATE_NAME, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file means a broken checkpoint
        raise CheckpointError(f"{checkpoint}: cannot read the checkpoint ({exc})") from None
    meta_step = read_meta(checkpoint).get("step")
    if state.get("step") != meta_step:
        raise CheckpointError(f"{checkpoint}: {STATE_NAME} is from step {state.get('step')}, but {META_NAME} says "
                              f"step {meta_step}; a file was copied in from another checkpoint. Fix: resume from "
                              "another checkpoint")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(tensors):
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise CheckpointError(f"{checkpoint}: trainable parameters differ from the model's (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}); was it written with another peft_config?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.device, p.dtype))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    if world_size > 1:
        per_process = state.get("rng_per_process") or []
        if len(per_process) == world_size:
            set_rng_state(per_process[rank])
        else:
            torch.manual_seed(int(state["step"]) * 1_000_003 + rank)
    return state
