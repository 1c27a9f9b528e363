"""Checks that need no weights, run before any weights load: the model folder or Hub id, and the data paths.

The training story calls them in the order a user fixes things: config (phitune.config), model folder or id, data
paths, then the tokenizer and chat template and every record (phitune.data.prepare_data) and the data statistics;
only then are weights read. A mistake in any of them costs seconds, not a model load.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from . import distributed
from ..config import ModelConfig
from ..data.preference import prepare_run_data
from ..data.preview import data_warnings
from ..data.sources import check_local_path
from ..errors import ConfigError
from ..models.chat_template import with_chat_template
from ..models.loading import load_tokenizer

# what the Hub accepts as a repo id ("name" or "namespace/name")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}(/[\w.\-]{1,96})?$")

log = logging.getLogger("phitune")


def looks_local(value: str) -> bool:
    """True when ``value`` can only be a local path (it cannot be a Hub repo id)."""
    return value.startswith((".", "/", "~")) or "\\" in value or not _REPO_ID.match(value)


def check_model_source(model_cfg: ModelConfig, weights: bool = True) -> None:
    """A local model (or tokenizer) folder exists and holds what loading needs (``weights``: the .safetensors too;
    preview needs only the tokenizer); a Hub id is left to the Hub."""
    for key in ("name_or_path", "tokenizer"):
        value = getattr(model_cfg, key)
        if value is None:
            continue
        path = Path(os.path.expanduser(str(value)))
        if path.is_dir():
            if key == "name_or_path" and weights:
                _check_model_folder(path)
            continue
        if path.exists():
            raise ConfigError(f"model.{key}: {value} is a file, not a model folder. Fix: give the folder that "
                              "save_pretrained wrote (config.json, *.safetensors, tokenizer files) or a Hub id",
                              key=f"model.{key}")
        if looks_local(str(value)):
            raise ConfigError(f"model.{key}: local folder not found: {value} (looked for {path.absolute()}). Fix: "
                              "check the path (relative paths are from the current directory), or give a Hub id "
                              "such as microsoft/Phi-3-mini-4k-instruct, or phitune:demo for the shipped tiny model",
                              key=f"model.{key}")


def _check_model_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.name_or_path: {path} has no config.json, so it is not a model folder written by "
                          "save_pretrained. Fix: point it at the folder that holds config.json and the weights",
                          key="model.name_or_path")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.glob("*.bin"))
        hint = (f" It holds {', '.join(pickled[:3])}: phitune does not load pickled weights (they can run code); "
                "convert them with model.save_pretrained(dir, safe_serialization=True).") if pickled else ""
        raise ConfigError(f"model.name_or_path: {path} has no .safetensors weights.{hint}", key="model.name_or_path")


def check_data_paths(data_cfg) -> None:
    """Every local data path of data.train and data.eval exists (Hub names are checked when opened)."""
    for role in ("train", "eval"):
        spec = getattr(data_cfg, role)
        for item in spec if isinstance(spec, (list, tuple)) else [spec]:
            if isinstance(item, (str, os.PathLike)):
                check_local_path(os.fspath(item), role)


def checks_before_weights(cfg, main: bool):
    """Everything after the config that needs no weights, in the order a user fixes things: model folder or id,
    data paths, tokenizer and chat template, every record, the data statistics (their warnings printed here).
    Returns (tokenizer, prepared data)."""
    cfg.peft_config.check_targets()
    check_model_source(cfg.model)
    check_data_paths(cfg.data)
    tokenizer = with_chat_template(load_tokenizer(cfg.model), cfg.data.chat_template)
    with distributed.local_main_first():  # one process per node writes the data cache, the others read it
        prepared = prepare_run_data(cfg.data, tokenizer, cfg.training_config)
    if main:
        for split in ("train", "eval"):
            for line in data_warnings(split, prepared.stats[split]) if prepared.stats.get(split) else []:
                log.warning("%s", line)
    return tokenizer, prepared
