"""phitune.models.chat_template: the one turn-end rule on every family's template, data.chat_template (string or
file), and the errors for templates phitune cannot find the end of a turn in."""

from __future__ import annotations

import pytest
from helpers import CHAT_FAMILIES, family_tokenizer

from phitune.data import prepare_data
from phitune.data.config import DataConfig
from phitune.errors import ConfigError, PhituneError
from phitune.evals.prompts import prompts_from_samples
from phitune.generation.stops import stop_token_ids
from phitune.models.chat_template import resolve_chat_template, turn_end, with_chat_template
from phitune.models.tokenizer import PHI3_CHAT_TEMPLATE

CHATS = [[{"role": "user", "content": "Reverse: apple"}, {"role": "assistant", "content": "elppa"},
          {"role": "user", "content": "And river?"}, {"role": "assistant", "content": "revir"}]]
SEPARATORS = {"phi3": "\n", "phi4": "", "chatml": "\n", "llama3": "", "mistral": "", "gemma": "\n"}


@pytest.fixture(scope="module", params=list(CHAT_FAMILIES))
def family(request):
    return request.param, family_tokenizer(request.param)


def _prepared(tok, tmp_path, **data):
    cfg = DataConfig.from_any({"train": [{"messages": m} for m in CHATS], "max_seq_length": 96,
                               "cache_dir": str(tmp_path / "cache"), **data})
    return prepare_data(cfg, tok)


def test_turn_end_is_the_families_end_of_turn_token_and_the_whitespace_after_it(family):
    name, tok = family
    end = turn_end(tok)
    assert end.token == CHAT_FAMILIES[name]["turn_end"].split(">")[0] + ">"
    assert end.token_id == tok.convert_tokens_to_ids(end.token) and end.separator == SEPARATORS[name]


def test_every_trained_turn_ends_on_its_end_of_turn_token_never_on_the_newline_after_it(family, tmp_path):
    name, tok = family
    ids, labels = _prepared(tok, tmp_path).train.arrays(0)
    trained = [int(t) for t, label in zip(ids, labels) if label != -100]
    end = turn_end(tok).token
    # two assistant turns, each the answer and its end-of-turn token (Phi-3: the last one also its closing eos)
    assert tok.decode(trained, skip_special_tokens=False) == "elppa" + end + "revir" + \
        CHAT_FAMILIES[name]["turn_end"]


def test_eval_prompts_answer_the_last_turn_and_skip_nothing_that_fits(family, tmp_path):
    name, tok = family
    samples = _prepared(tok, tmp_path).train
    prompts, skipped = prompts_from_samples(samples, tok, stop_ids=stop_token_ids(tok), context=256)
    assert skipped.total == 0 and [p.reference for p in prompts] == ["revir"]
    ids, labels = samples.arrays(0)
    first = max(k for k in range(len(labels)) if labels[k] != -100 and labels[k - 1] == -100)
    assert prompts[0].ids == [int(t) for t in ids[:first]]  # everything before the answer: the assistant header


def test_stop_ids_hold_the_templates_end_of_turn_token_and_eos(family):
    name, tok = family
    stops = stop_token_ids(tok)
    assert turn_end(tok).token_id in stops and tok.eos_token_id in stops and stops == sorted(stops)


def test_a_template_whose_turns_end_in_plain_text_is_refused_naming_data_chat_template(tmp_path):
    tok = family_tokenizer("chatml")
    tok.chat_template = ("{% for m in messages %}{{ '### ' + m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '### assistant: ' }}{% endif %}")
    with pytest.raises(ConfigError, match=r"ends an assistant turn with '\\n### user.*data\.chat_template"):
        turn_end(tok)
    with pytest.raises(PhituneError, match="data.chat_template"):  # before any record is tokenized
        _prepared(tok, tmp_path)
    # the same data with a template given in data.chat_template trains
    fixed = tok.chat_template.replace("'\n'", "'<|im_end|>\n'")
    assert "<|im_end|>" in fixed
    assert len(_prepared(tok, tmp_path, chat_template=fixed).train) == 1


def test_no_template_at_all_names_data_chat_template(tmp_path):
    tok = family_tokenizer("gemma")
    tok.chat_template = None
    with pytest.raises(PhituneError, match="data.chat_template"):
        _prepared(tok, tmp_path)
    with pytest.raises(ConfigError, match="data.chat_template"):
        turn_end(tok)


def test_data_chat_template_is_a_jinja_string_a_file_or_phi3(tmp_path):
    path = tmp_path / "gemma.jinja"
    path.write_text(CHAT_FAMILIES["gemma"]["template"], encoding="utf-8")
    assert resolve_chat_template(str(path)) == CHAT_FAMILIES["gemma"]["template"]
    assert resolve_chat_template(CHAT_FAMILIES["llama3"]["template"]) == CHAT_FAMILIES["llama3"]["template"]
    assert resolve_chat_template("phi3") == PHI3_CHAT_TEMPLATE and resolve_chat_template(None) is None
    with pytest.raises(ConfigError, match=r"data\.chat_template: 'nope\.jinja' is neither a Jinja template"):
        resolve_chat_template("nope.jinja")
    tok = family_tokenizer("gemma")
    tok.chat_template = None
    assert with_chat_template(tok, str(path)).chat_template == CHAT_FAMILIES["gemma"]["template"]


def test_the_cache_key_follows_the_template_files_text_not_its_name(tmp_path):
    from phitune.data.prepare import cache_key

    tok = family_tokenizer("gemma")
    path = tmp_path / "t.jinja"
    path.write_text(CHAT_FAMILIES["gemma"]["template"], encoding="utf-8")
    cfg = DataConfig.from_any({"train": "x.jsonl", "chat_template": str(path)})
    before = cache_key(cfg, tok, {})
    path.write_text(CHAT_FAMILIES["gemma"]["template"].replace("model", "bot"), encoding="utf-8")
    assert cache_key(cfg, tok, {}) != before


def test_microsofts_phi3_tokenizer_ends_turns_on_end_and_stops_on_its_three_ids():
    from helpers import ROOT
    from transformers import AutoTokenizer

    # ../shared/tokenizers beside the repository (or beside the folder of worktrees)
    folder = next((d / "shared" / "tokenizers" / "phi-3-mini" for d in (ROOT.parent, ROOT.parent.parent)
                   if (d / "shared" / "tokenizers" / "phi-3-mini" / "tokenizer.json").is_file()), ROOT / "missing")
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"no {folder} (the real Phi-3 tokenizer files; see the project README)")
    tok = AutoTokenizer.from_pretrained(folder)
    end = turn_end(tok)
    assert (end.token, end.token_id, end.closing) == ("<|end|>", 32007, "\n<|endoftext|>")
    assert stop_token_ids(tok) == [32000, 32001, 32007]  # Microsoft's generation_config.json
