"""The process a plan runs in: ``phitune.plan.plan`` starts it with the fake CUDA runtime loaded before torch
(``fakegpu.worker_command``), sends the request as JSON on stdin and reads the plan as one JSON line on stdout."""

from __future__ import annotations

import json
import os
import sys

from ..config import load_config
from ..errors import PhituneError
from . import gpus as gpu_table
from .predict import predict


def hf_config_from(data: dict):
    """A transformers config from its ``to_dict()``."""
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[data["model_type"]].from_dict(data)


def run(request: dict) -> dict:
    """The plan for one request (see ``phitune.plan.plan``); errors become {"error": ..., "unsupported": bool}."""
    chosen = [gpu_table.gpu(name) for name in request.get("gpus", [])]
    chosen += [gpu_table.custom_gpu(m) for m in request.get("gpu_memory", [])]
    try:
        cfg = load_config(request["config"])
        return predict(cfg, hf_config_from(request["hf_config"]), gpus=chosen or None,
                       world_size=request.get("world_size", 1), shape_from=request.get("shape_from", ""),
                       device=request.get("device", "cuda"),
                       batch=(request["samples"], request["entry"]) if request.get("samples") else None)
    except PhituneError as exc:
        return {"error": str(exc), "unsupported": True}
    except (NotImplementedError, ValueError, KeyError) as exc:
        # an op without a fake (meta) kernel, or a model transformers cannot build from this config: say which
        return {"error": f"{type(exc).__name__}: {exc}", "unsupported": True}


def main() -> None:
    result = run(json.loads(sys.stdin.read()))
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
    # Skip interpreter teardown: the fake device's autograd worker thread can outlive the fake runtime.
    os._exit(0)


if __name__ == "__main__":
    main()
