"""Every chat family end to end (issue 22, items 1 and 5): tiny models with each family's real special tokens and
published chat template (tests/helpers.py CHAT_FAMILIES), through preview (its tokens, from the Python API), and the
CLI's train (with the eval_generate probe), eval --generate --compare-base, chat --prompt and export --to gguf, all
under the one turn-end rule (phitune/models/chat_template.py).

Gemma's base tokenizer is saved without a chat template: its template comes from data.chat_template (a file), and
train, eval, chat and export all use it from there.
"""

from __future__ import annotations

import json

import pytest
from helpers import CHAT_FAMILIES, family_model, family_tokenizer

import phitune
from phitune.cli import main

WORDS = ["apple", "river", "stone", "cloud"]
CHATS = [[{"role": "user", "content": f"Reverse: {w}"}, {"role": "assistant", "content": w[::-1]}] for w in WORDS]
FROM_DATA_CONFIG = "gemma"  # the family whose template comes from data.chat_template


def _config(root, family: str, out) -> dict:
    data = {"train": str(root / "chats.jsonl"), "eval": str(root / "chats.jsonl"), "max_seq_length": 96,
            "packing": False, "cache_dir": str(root / "cache")}
    if family == FROM_DATA_CONFIG:
        data["chat_template"] = str(root / "template.jinja")
    return {"model": {"name_or_path": str(root / "base")}, "data": data,
            "training_config": {"output_dir": str(out), "learning_rate": 1e-2, "per_device_train_batch_size": 4,
                                "per_device_eval_batch_size": 4, "max_steps": 40, "logging_steps": 20,
                                "eval_strategy": "steps", "eval_steps": 40, "eval_generate": 2, "seed": 0,
                                "disable_tqdm": True, "save_strategy": "no"},
            "peft_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}}


@pytest.fixture(scope="module", params=list(CHAT_FAMILIES))
def family(request, tmp_path_factory):
    """A family's base model folder, its chat data and a run trained on it (memorizing the four answers)."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    tok = family_tokenizer(name)
    family_model(name, tok).save_pretrained(root / "base")
    template = tok.chat_template
    if name == FROM_DATA_CONFIG:
        (root / "template.jinja").write_text(template, encoding="utf-8")
        tok.chat_template = None
    tok.save_pretrained(root / "base")
    tok.chat_template = template
    (root / "chats.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    config = _config(root, name, root / "run")
    path = root / "config.yaml"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML
    assert main(["train", str(path)]) == 0
    return {"name": name, "root": root, "tok": tok, "config": str(path), "run": root / "run",
            "spec": CHAT_FAMILIES[name]}


@pytest.mark.slow
def test_preview_trains_each_answer_through_its_end_of_turn_token(family, capsys):
    tok = family["tok"]
    prepared = phitune.preview(family["config"], n=1)
    assert len(prepared.train) == len(CHATS)
    for i, chat in enumerate(CHATS):
        ids, labels = prepared.train.arrays(i)
        trained = [int(t) for t, label in zip(ids, labels) if label != -100]
        # the answer, its end-of-turn token, and (Phi-3) the eos closing the conversation; never the newline after
        assert tok.decode(trained, skip_special_tokens=False) == chat[1]["content"] + family["spec"]["turn_end"]


@pytest.mark.slow
def test_train_saves_the_template_and_stops_on_the_end_of_turn_token(family):
    from transformers import AutoTokenizer

    run, tok = family["run"], family["tok"]
    saved = AutoTokenizer.from_pretrained(run)
    assert saved.chat_template == tok.chat_template  # Gemma: the data.chat_template file's text
    end = tok.convert_tokens_to_ids(family["spec"]["turn_end"].split(">")[0] + ">")
    stops = json.loads((run / "generation_config.json").read_text())["eos_token_id"]
    assert end in stops and tok.eos_token_id in stops
    probes = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
              if "generations" in line]
    assert probes and len(probes[-1]["generations"]) == 2  # the eval_generate probe found its prompts


@pytest.mark.slow
def test_eval_generate_compare_base_scores_every_answer(family, capsys):
    capsys.readouterr()
    assert main(["eval", str(family["run"]), "--generate", "--compare-base", "--max-new-tokens", "12", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["gen_samples"] == len(CHATS) and metrics["gen_skipped"] == 0
    assert metrics["gen_stopped"] == 1.0 and metrics["gen_exact_match"] == 1.0  # memorized, each turn ended


@pytest.mark.slow
def test_chat_prompt_stops_at_the_end_of_the_turn(family, capsys):
    capsys.readouterr()
    assert main(["chat", str(family["run"]), "--prompt", CHATS[0][0]["content"], "--greedy",
                 "--max-new-tokens", "12"]) == 0
    # the streamed answer and nothing after it: a turn that ran on would print the next header's text
    assert capsys.readouterr().out == CHATS[0][1]["content"] + "\n"


@pytest.mark.slow
def test_gguf_chat_template_and_stop_tokens_render_what_training_saw(family, tmp_path):
    gguf = pytest.importorskip("gguf", reason="the export extra (gguf) is not installed")
    tok, end = family["tok"], family["spec"]["turn_end"]
    assert main(["export", str(family["run"]), "--to", "gguf", "--out", str(tmp_path / "g"), "--outtype", "f32"]) == 0
    (path,) = (tmp_path / "g").glob("*.gguf")
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tokens = fields["tokenizer.ggml.tokens"]
    assert tokens[fields["tokenizer.ggml.eot_token_id"]] == end.split(">")[0] + ">"
    assert tokens[fields["tokenizer.ggml.eos_token_id"]] == tok.eos_token
    # The GGUF's template, rendered as llama.cpp's Jinja mode does (plus its BOS when add_bos_token), gives the
    # ids training used for the whole conversation, and the prompt eval and chat generate from.
    template = fields["tokenizer.chat_template"]
    bos = [tok.bos_token_id] if fields["tokenizer.ggml.add_bos_token"] else []
    prepared = phitune.preview(family["config"], n=0)
    for i, chat in enumerate(CHATS):
        text = tok.apply_chat_template(chat, chat_template=template, tokenize=False)
        assert bos + tok(text, add_special_tokens=False)["input_ids"] == prepared.train[i]["input_ids"]
        prompt = tok.apply_chat_template(chat[:1], chat_template=template, tokenize=False, add_generation_prompt=True)
        ids, labels = prepared.train.arrays(i)
        first_trained = next(k for k, label in enumerate(labels) if label != -100)
        assert bos + tok(prompt, add_special_tokens=False)["input_ids"] == [int(t) for t in ids[:first_trained]]


# Llama 3's, Mistral's and Gemma's templates write the BOS Ollama adds, and Qwen2's adds a default system turn: the
# exporter refuses those (a Modelfile TEMPLATE cannot be derived); Phi-3's and Phi-4's wrap each message.
@pytest.mark.parametrize("name", ["phi3", "phi4"])
def test_ollama_modelfile_stops_on_the_families_end_of_turn_token(name, tmp_path):
    pytest.importorskip("gguf", reason="the export extra (gguf) is not installed")
    from phitune.exports.to_ollama import write_modelfile
    from phitune.models.chat_template import turn_end

    tok = family_tokenizer(name)
    family_model(name, tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    details = write_modelfile(tmp_path, tmp_path, "model.gguf")
    modelfile = (tmp_path / "Modelfile").read_text()
    assert turn_end(tok).token in details["stops"] and tok.eos_token in details["stops"]
    assert f'PARAMETER stop "{turn_end(tok).token}"' in modelfile
