"""``phitune plan``: will a training config fit this GPU, and how long will a step take? Predicted on any machine.

    import phitune
    p = phitune.plan("examples/phi3-mini-lora.yaml", gpus=["H100", "L4"])
    p["peak_gib"]["total"], p["gpus"][0]["fits"], p["gpus"][0]["step_seconds"]

phitune's own training step (the functions ``phitune train`` runs) is run on a fake CUDA device: FakeTensorMode
tensors carry shapes and dtypes but no memory, torch's MemTracker counts what a GPU would hold, and every op's FLOPs
and bytes are recorded and priced with a roofline per GPU (``gpus.py``). No weights are loaded: the model's
config.json is enough (``shapes.py``). The model is simulated at 2 and 4 decoder layers and extrapolated
(``predict.py``); the simulation runs in a child process that loads a small C++ runtime before torch on a CPU-only
build (``fakegpu.py``). Every number is a prediction; ``benchmarks/plan_accuracy.py`` compares the same machinery
with real H200 measurements.

Files: fakegpu.py (the fake GPU, the C++ runtime fake_cuda_runtime.cpp, the fake process group), simulate.py (one
step), predict.py (depth extrapolation, parts, time), gpus.py (the GPU table, roofline, fits and its margin),
shapes.py (config.json), batch.py (``--data``: the largest real micro-batch), auto.py (``per_device_train_batch_size:
auto``), worker.py (the child process), report.py (the printed plan).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Sequence

import torch

from ..config import RunConfig, load_config
from ..errors import ConfigError, PhituneError
from ..training.preflight import checks_before_weights
from . import auto, fakegpu
from . import gpus as gpu_table
from .batch import longest_batch
from .shapes import model_shape

log = logging.getLogger("phitune")


def plan(config: str | Path | dict | RunConfig, *, gpus: Sequence[str] | None = None,
         gpu_memory: Sequence[float] | float | None = None, world_size: int = 1,
         overrides: Sequence[str] | None = None, data: bool = False) -> dict:
    """Predict the peak GPU memory (with its parts), whether it fits each GPU, tokens and FLOPs per step, and a
    step-time range per GPU for training ``config`` (what ``phitune train`` takes; ``overrides``: ``--set`` items).

    ``gpus``: names from the GPU table (default: all of them); ``gpu_memory``: GiB of GPUs not in the table (fits
    only); ``world_size``: processes under torchrun (per-device numbers; tokens per step for all); ``data``: plan
    the largest micro-batch of the config's training data (tokenizer and data loaded and checked as ``phitune
    train`` does) instead of the worst case of full rows. Returns plain data
    (the ``--json`` output). Raises ``PlanUnsupported`` (exit 2 from the CLI) when the step cannot be simulated."""
    cfg = load_config(config, overrides)
    if world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {world_size}")
    chosen = [gpu_table.gpu(name) for name in gpus or ()]  # an unknown name fails here, before the slow work
    memories = [gpu_memory] if isinstance(gpu_memory, (int, float)) else list(gpu_memory or ())
    hf_config, shape_from = model_shape(cfg.model)
    real = {}
    if data:
        if cfg.training_config.batch_is_auto:
            raise ConfigError("--data with per_device_train_batch_size: auto: give a number to plan the data's "
                              "largest batch of that size")
        _, prepared = checks_before_weights(cfg, True)
        samples, entry, about = longest_batch(prepared.train, cfg)
        real = {"samples": samples, "entry": entry}

    def planned(run_cfg: RunConfig) -> dict:
        result = run_worker({"config": run_cfg.to_dict(), "hf_config": hf_config.to_dict(),
                             "shape_from": shape_from, "gpus": list(gpus or ()), "gpu_memory": memories,
                             "world_size": world_size, **real})
        return {**result, "data_batch": about} if data else result

    if not cfg.training_config.batch_is_auto:
        return planned(cfg)
    sizes = [g.memory_gib for g in chosen] + memories
    if len(sizes) != 1:
        raise ConfigError("training_config.per_device_train_batch_size: auto is chosen for one GPU: give exactly "
                          "one --gpu NAME (or --gpu-memory GIB) to see the choice phitune train would make there")
    cfg, choice = auto.choose(cfg, sizes[0], lambda c: planned(c)["peak_gib"]["total"])
    return {**planned(cfg), "auto_batch": choice}


def resolve_auto_batch(cfg: RunConfig, device, world_size: int = 1) -> RunConfig:
    """``cfg`` with ``per_device_train_batch_size: auto`` (and ``gradient_checkpointing: auto``) decided for the
    CUDA GPU ``device`` before any weight loads, the choice logged; ``cfg`` itself when nothing is auto. On any
    other device a ConfigError: there is no GPU memory to size against."""
    if not cfg.training_config.batch_is_auto:
        return cfg
    if device.type != "cuda":
        raise ConfigError(f"training_config.per_device_train_batch_size: auto sizes the micro-batch for the CUDA "
                          f"GPU a run is on (from phitune plan); this run is on the {device.type}. Give a number "
                          "(e.g. 4), or see what a GPU would take: phitune plan CONFIG --gpu NAME")
    memory = torch.cuda.get_device_properties(device).total_memory / 2**30
    log.info("per_device_train_batch_size: auto: planning micro-batches for this %.1f GiB GPU (phitune plan, "
             "no weights loaded; about a minute)", memory)
    resolved, choice = auto.choose(cfg, memory, lambda c: plan(c, world_size=world_size, gpu_memory=memory)[
        "peak_gib"]["total"])
    log.info("auto batch: micro-batch %d x accumulation %d (%d rows per step), gradient checkpointing %s: "
             "predicted peak %.2f GiB of %.1f GiB", choice["per_device_train_batch_size"],
             choice["gradient_accumulation_steps"], choice["rows_per_step"],
             "on" if choice["gradient_checkpointing"] else "off", choice["predicted_peak_gib"], memory)
    return resolved


def run_worker(request: dict) -> dict:
    """Run ``request`` in the plan's child process (the fake CUDA runtime loaded first); its plan or its error."""
    command = fakegpu.worker_command("phitune.plan.worker", fakegpu.ensure_shim())
    done = subprocess.run(command, input=json.dumps(request), capture_output=True, text=True,
                          env=_child_env())
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    try:
        result = json.loads(last)
    except json.JSONDecodeError:
        raise PhituneError(f"phitune plan: the simulation process failed (exit {done.returncode}):\n"
                           f"{done.stderr[-3000:]}") from None
    if "error" in result:
        raise fakegpu.PlanUnsupported(f"phitune plan could not simulate this step: {result['error']}")
    return result


def _child_env() -> dict:
    """This process's environment, with phitune's own source first on the path (an uninstalled checkout too)."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class _CallablePackage(types.ModuleType):
    """``phitune.plan`` is both this package and the public function: importing a submodule makes Python set the
    attribute ``phitune.plan`` to the package, so the package itself answers a call with ``plan(...)``."""

    def __call__(self, *args, **kwargs):
        return plan(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
PlanUnsupported = fakegpu.PlanUnsupported
__all__ = ["PlanUnsupported", "plan", "resolve_auto_batch", "run_worker"]
