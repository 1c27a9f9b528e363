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

Files: fakegpu.py (the fake GPU, the C++ runtime), simulate.py (one step), predict.py (depth extrapolation, parts,
fits, time), gpus.py (the GPU table and roofline), shapes.py (config.json), worker.py (the child process),
report.py (the printed plan).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Sequence

from ..config import RunConfig, load_config
from ..errors import ConfigError, PhituneError
from . import fakegpu
from . import gpus as gpu_table
from .shapes import model_shape


def plan(config: str | Path | dict | RunConfig, *, gpus: Sequence[str] | None = None,
         gpu_memory: Sequence[float] | float | None = None, world_size: int = 1,
         overrides: Sequence[str] | None = None) -> dict:
    """Predict the peak GPU memory (with its parts), whether it fits each GPU, tokens and FLOPs per step, and a
    step-time range per GPU for training ``config`` (what ``phitune train`` takes; ``overrides``: ``--set`` items).

    ``gpus``: names from the GPU table (default: all of them); ``gpu_memory``: GiB of GPUs not in the table (fits
    only); ``world_size``: processes under torchrun (per-device numbers; tokens per step for all). Returns plain data
    (the ``--json`` output). Raises ``PlanUnsupported`` (exit 2 from the CLI) when the step cannot be simulated."""
    cfg = load_config(config, overrides)
    if world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {world_size}")
    for name in gpus or ():
        gpu_table.gpu(name)  # an unknown name fails here, before the slow work
    memories = [gpu_memory] if isinstance(gpu_memory, (int, float)) else list(gpu_memory or ())
    hf_config, shape_from = model_shape(cfg.model)
    request = {"config": cfg.to_dict(), "hf_config": hf_config.to_dict(), "shape_from": shape_from,
               "gpus": list(gpus or ()), "gpu_memory": memories, "world_size": world_size}
    return run_worker(request)


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
__all__ = ["PlanUnsupported", "plan", "run_worker"]
