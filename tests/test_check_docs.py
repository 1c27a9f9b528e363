"""scripts/check_docs.py: the names the docs quote exist in the code, and the import rules hold (run by make lint)."""

import importlib.util
import subprocess
import sys

import pytest

from helpers import ROOT

SCRIPT = ROOT / "scripts" / "check_docs.py"


@pytest.fixture(scope="module")
def check_docs():
    spec = importlib.util.spec_from_file_location("check_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_docs"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checker(check_docs):
    return check_docs.Checker(check_docs.read_package(), check_docs.config_keys())


def test_readme_and_architecture_quote_only_names_that_exist_and_the_import_rules_hold():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("span", [
    "step.batch_maker", "training.step.batch_maker(model, tokenizer, dc, fast)", "phitune.lora.disable_adapters",
    "lora.Linear4bit", "adapt.merge_checked(model, input_ids)", "TrainState.micro", "Renderer._fit",
    "fast.fused.install", "data.max_seq_length", "model.quantization.type", "training_config.fast_path: auto",
    "training/step.py", "scripts/sync_readme.py", "train.py", "meta.json", "phitune.lock", "torch.load(x)",
    "model.generate", "batch_plan",
])
def test_names_that_exist_or_are_not_phitune_names_pass(checker, span):
    assert checker.problem(span) is None


@pytest.mark.parametrize("span, why", [
    ("train.batch_maker", "phitune.training.train has no batch_maker"),  # imported there, defined in step.py
    ("run_folder.open_run", "run_folder is not a phitune module"),
    ("outdir.lock_output_dir(folder)", "outdir is not a phitune module"),
    ("phitune.training.nothing", "phitune.training has no nothing"),
    ("data.no_such_key", "phitune.data has no no_such_key"),
    ("training_config.no_such_key", "no config key training_config.no_such_key"),
    ("model.load_kwargs(...)", "phitune.config.model has no load_kwargs"),
    ("TrainState.no_field", "class TrainState has no attribute no_field"),
    ("run_folder.py", "no file run_folder.py"),
    ("training/nothing.py", "no file training/nothing.py"),
])
def test_stale_names_are_reported_with_what_is_missing(checker, span, why):
    assert why in (checker.problem(span) or "")


def test_a_document_is_checked_in_backticks_and_plain_fenced_blocks_with_file_and_line(check_docs, checker,
                                                                                       tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("ok `step.batch_maker`, stale `train.batch_maker`\n"
                   "```\n"
                   "loop: training.step.train_step -> training.step.no_step -> config.yaml, e.g. prose\n"
                   "```\n"
                   "```python\n"
                   "training.step.only_an_example()\n"
                   "```\n")
    problems = check_docs.check([doc], checker)
    assert [p.split(": ")[0].rsplit(":", 1)[-1] for p in problems] == ["1", "3"]
    assert "`train.batch_maker`" in problems[0] and "`training.step.no_step`" in problems[1]


def test_an_import_that_the_rules_do_not_allow_is_reported(check_docs, tmp_path):
    src = tmp_path / "phitune"
    for name in ("__init__.py", "errors.py", "data/__init__.py", "data/render.py", "training/__init__.py",
                 "training/train.py", "tools.py"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text("")
    (src / "data" / "render.py").write_text("from ..errors import PhituneError\n\n\ndef f():\n"
                                            "    from ..training.train import x\n")
    (src / "training" / "train.py").write_text("from ..data.render import f\nfrom .. import tools\n")
    rules = {"data": set(), "training": {"data", "evals"}}
    assert check_docs.import_problems(rules, src) == [
        "data.render -> training.train: not in the 'data' row of the import rules (nothing)",
        "the import rules name evals, which is not a phitune module or subpackage",
        "training.train -> tools: not in the 'training' row of the import rules (data, evals)",
    ]


def test_the_import_rules_table_is_read_from_the_architecture_doc(check_docs):
    rules = check_docs.import_rules(ROOT / "docs" / "architecture.md")
    assert rules["lora"] == set() and "lora" in rules["adapt"] and "training" not in rules["data"]
    assert {"adapt", "config", "data", "models", "training", "runs", "cli"} <= set(rules)


def test_the_layout_lists_every_module_and_only_modules_that_exist(check_docs, tmp_path):
    src = tmp_path / "src" / "phitune"
    for name in ("__init__.py", "cli.py", "data/__init__.py", "data/render.py", "data/new.py"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text("")
    doc = tmp_path / "architecture.md"
    doc.write_text("# map\n\n## Layout (one line per module)\n```\nsrc/phitune/\n"
                   "  __init__.py      the API\n  cli.py           the CLI, not data/new.py\n"
                   "  data/            the pipeline\n    render.py      messages -> tokens\n"
                   "    gone.py        removed\ntests/           mirrors it\n  gone.py\n```\n\n## Import rules\n")
    assert check_docs.layout_problems(doc, src) == [
        "architecture.md Layout lists src/phitune/data/gone.py, which does not exist",
        "architecture.md Layout does not list src/phitune/data/new.py (one line per module: add it with what it owns)",
    ]
