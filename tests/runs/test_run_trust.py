"""A run folder is data: its phitune_config.yaml cannot make chat, eval or merge run the Python code of a model
folder (auto_map + a .py file); only --trust-remote-code on the command line (trust_remote_code=True) can."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

import phitune
from phitune.errors import ConfigError

from helpers import ROOT

_MODELING = """
from pathlib import Path
Path({marker!r}).write_text("the model folder's code ran")
from transformers import Phi3ForCausalLM


class PlantedForCausalLM(Phi3ForCausalLM):
    pass
"""


@pytest.fixture
def planted(run_dir, tmp_path):
    """A copy of the run whose config asks for remote code, pointing at a model folder whose code leaves a marker."""
    marker = tmp_path / "code-ran"
    model = tmp_path / "model-with-code"
    shutil.copytree(run_dir["base"], model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_planted.PlantedForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_planted.py").write_text(_MODELING.format(marker=str(marker)))
    run = tmp_path / "received-run"
    shutil.copytree(run_dir["run"], run)
    saved = yaml.safe_load((run / "phitune_config.yaml").read_text())
    saved["model"].update(name_or_path=str(model), trust_remote_code=True)
    (run / "phitune_config.yaml").write_text(yaml.safe_dump(saved))
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf-modules"), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return {"run": run, "marker": marker, "env": env, "tmp": tmp_path}


def _phitune(args, env):
    return subprocess.run([sys.executable, "-m", "phitune", *args], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("command", [["chat", "{run}", "--prompt", "hi", "--max-new-tokens", "2"],
                                     ["eval", "{run}"],
                                     ["merge", "{run}", "--out", "{tmp}/merged"],
                                     ["export", "{run}", "--to", "vllm", "--out", "{tmp}/exported"]])
def test_a_run_folder_cannot_enable_remote_code_by_itself(command, planted):
    args = [a.format(run=planted["run"], tmp=planted["tmp"]) for a in command]
    proc = _phitune(args, planted["env"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.trust_remote_code: true" in proc.stderr and "--trust-remote-code" in proc.stderr
    assert "model-with-code" in proc.stderr and "Traceback" not in proc.stderr  # the request is shown
    assert not planted["marker"].exists()
    assert not (planted["tmp"] / "hf-modules").exists()  # transformers never even copied the code


def test_the_python_functions_refuse_it_too(planted):
    for call in (lambda: phitune.chat(planted["run"], prompt="hi", stream=False),
                 lambda: phitune.evaluate(planted["run"], verbose=False),
                 lambda: phitune.merge(planted["run"], planted["tmp"] / "merged"),
                 lambda: phitune.export(planted["run"], "gguf", planted["tmp"] / "exported")):
        with pytest.raises(ConfigError, match=r"trust_remote_code: true.*trust_remote_code=True in Python"):
            call()
    assert not planted["marker"].exists()


def test_with_the_flag_the_code_runs(planted):
    proc = _phitune(["chat", str(planted["run"]), "--prompt", "hi", "--max-new-tokens", "2", "--greedy",
                     "--trust-remote-code"], planted["env"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert planted["marker"].exists()
