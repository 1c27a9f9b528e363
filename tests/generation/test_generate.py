"""phitune.generation.generate: prompt ids, stop ids, streamed decoding, greedy replies (tiny random Phi-3, CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from phitune.errors import ConfigError
from phitune.generation.generate import GenerationSettings, IncrementalDecoder, build_prompt_ids, generate_reply
from phitune.generation.loop import TRANSFORMERS_DECODING_DEFAULTS
from phitune.generation.stops import stop_token_ids


@pytest.fixture(scope="module")
def tok(small_tok):
    return small_tok


@pytest.fixture(scope="module")
def model(tok):
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, intermediate_size=64, max_position_embeddings=256,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return Phi3ForCausalLM(cfg).eval()


def test_prompt_ends_with_assistant_header(tok):
    ids = build_prompt_ids(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assistant = tok.convert_tokens_to_ids("<|assistant|>")
    assert ids[-1] == assistant
    assert tok.decode(ids) == "<s><|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>"


def test_prompt_without_template_is_a_clear_error(tok):
    import copy

    plain = copy.deepcopy(tok)
    plain.chat_template = None
    with pytest.raises(ConfigError, match="chat template"):
        build_prompt_ids(plain, [{"role": "user", "content": "Hi"}])


def test_stop_ids_read_every_end_of_turn_id(tok, tmp_path):
    eot = [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|assistant|>", "<|end|>")]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eot}))
    assert stop_token_ids(tok, run_dir=tmp_path) == sorted(eot)
    # No file: eos plus Phi-3's end-of-turn tokens (<|end|>, which is not its eos, and <|assistant|>).
    assert stop_token_ids(tok, run_dir=tmp_path / "nothing") == sorted(eot)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="generation_config.json"):
        stop_token_ids(tok, run_dir=tmp_path)


def test_incremental_decoder_matches_full_decode(tok):
    text = "Hello there, héllo wörld! 42 times."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)  # split UTF-8 characters are held back, never printed broken


def test_incremental_decoder_skips_stop_ids(tok):
    end = tok.convert_tokens_to_ids("<|end|>")
    dec = IncrementalDecoder(tok, skip_ids=[end])
    ids = tok("ok", add_special_tokens=False)["input_ids"]
    out = "".join(dec.push(i) for i in ids + [end])
    assert out == "ok"


def test_greedy_reply_matches_manual_argmax_and_streams(tok, model):
    messages = [{"role": "user", "content": "Hello there"}]
    stops = stop_token_ids(tok)
    pieces: list[str] = []
    answer = generate_reply(model, tok, messages, GenerationSettings(greedy=True, max_new_tokens=12),
                            stop_ids=stops, on_text=pieces.append)
    # Reference: plain argmax loop without cache.
    ids = build_prompt_ids(tok, messages)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(12):
            logits = model(torch.tensor([ids + new])).logits[0, -1]
            nxt = int(logits.argmax())
            if nxt in stops:
                break
            new.append(nxt)
    assert answer == tok.decode(new, skip_special_tokens=True).strip()
    assert "".join(pieces).strip() == answer


def test_generation_stops_on_an_end_of_turn_id(tok, model):
    messages = [{"role": "user", "content": "Hello there"}]
    # Declaring the first greedy token a stop id gives an empty answer.
    ids = build_prompt_ids(tok, messages)
    with torch.no_grad():
        top = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    assert generate_reply(model, tok, messages, GenerationSettings(greedy=True, max_new_tokens=8),
                          stop_ids=[top]) == ""


def test_sampling_is_reproducible_with_a_seed(tok, model):
    messages = [{"role": "user", "content": "Hi"}]
    s = GenerationSettings(temperature=1.0, top_p=0.95, seed=3, max_new_tokens=8)
    assert generate_reply(model, tok, messages, s) == generate_reply(model, tok, messages, s)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
])
def test_settings_are_checked(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        GenerationSettings(**kwargs)


def test_chat_prompt_is_the_prefix_the_model_was_trained_on(tok):
    # Training renders conversations through the data pipeline (exactly one BOS); a chat prompt must be the same
    # token ids up to the assistant header, or the tuned model sees a prefix it never saw in training.
    from phitune.data import DataConfig, prepare_data

    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Ironbrook?"},
            {"role": "assistant", "content": "In the north."}]
    prepared = prepare_data(DataConfig(train=[{"messages": conv}], cache=False), tok)
    trained_ids = list(prepared.train[0]["input_ids"])
    prompt = build_prompt_ids(tok, conv[:2])
    assert prompt.count(tok.bos_token_id) == 1 and prompt[0] == tok.bos_token_id
    assert trained_ids[: len(prompt)] == prompt


def test_chat_reply_is_the_batched_loop_with_one_prompt(tok, model):
    from phitune.generation.loop import generate_batch

    messages = [{"role": "user", "content": "Hello there"}]
    stops = [10**6]  # nothing stops: every one of the 10 tokens is compared
    reply = generate_reply(model, tok, messages, GenerationSettings(greedy=True, max_new_tokens=10), stop_ids=stops)
    [batched] = generate_batch(model, [build_prompt_ids(tok, messages)], stop_ids=stops, pad_id=tok.pad_token_id,
                               max_new_tokens=10)
    assert len(batched.ids) == 10 and reply == tok.decode(batched.ids, skip_special_tokens=True).strip()


def test_the_loop_restores_train_mode_even_when_a_forward_fails(tok, model):
    from phitune.generation.loop import generate_batch

    class Boom(RuntimeError):
        pass

    def fail(*args, **kwargs):
        raise Boom

    model.train()
    handle = model.model.layers[0].register_forward_pre_hook(lambda module, args: fail())
    try:
        with pytest.raises(Boom):
            generate_batch(model, [[1, 2, 3]], stop_ids=[0], pad_id=0, max_new_tokens=2)
        assert model.training
    finally:
        handle.remove()
        model.eval()


def test_pad_id_rule_is_the_tokenizers_pad_else_the_first_stop_id(tok):
    import copy

    from phitune.generation.loop import pad_token_id

    assert pad_token_id(tok, [7, 9]) == tok.pad_token_id
    nopad = copy.deepcopy(tok)
    nopad.pad_token = None
    assert pad_token_id(nopad, [7, 9]) == 7 and pad_token_id(nopad, []) == 0


def _decoding(s: GenerationSettings) -> tuple:
    return (s.sampling, s.temperature, s.top_p, s.top_k, s.repetition_penalty) if s.sampling else \
        (False, s.repetition_penalty)


@pytest.mark.parametrize("config, expected", [
    ({}, (False, 1.0)),  # Phi-3's generation_config.json sets no sampling: greedy, as model.generate
    ({"eos_token_id": [1, 2], "do_sample": False, "temperature": 0.6}, (False, 1.0)),
    ({"do_sample": True}, (True, 1.0, 1.0, 50, 1.0)),  # transformers' defaults for the rest
    ({"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 0, "repetition_penalty": 1.1},
     (True, 0.6, 0.95, 0, 1.1)),
    ({"repetition_penalty": 1.2, "top_p": None}, (False, 1.2)),  # a null field is unset
])
def test_settings_decode_as_the_generation_config_says(config, expected):
    assert _decoding(GenerationSettings.from_generation_config(config)) == expected


def test_settings_take_a_transformers_generation_config():
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=True, temperature=0.5, top_k=10)
    assert _decoding(GenerationSettings.from_generation_config(config)) == (True, 0.5, 1.0, 10, 1.0)
    assert _decoding(GenerationSettings.from_generation_config(GenerationConfig())) == (False, 1.0)


@pytest.mark.parametrize("config, kwargs, expected", [
    ({}, {"temperature": 0.7, "top_p": 0.9}, (True, 0.7, 0.9, 50, 1.0)),
    ({}, {"top_p": 0.8}, (True, 1.0, 0.8, 50, 1.0)),
    ({}, {"top_k": 5}, (True, 1.0, 1.0, 5, 1.0)),
    ({}, {"repetition_penalty": 1.3}, (False, 1.3)),  # a penalty alone does not switch sampling on
    ({"do_sample": True, "temperature": 0.9}, {"greedy": True}, (False, 1.0)),
    ({"do_sample": True, "temperature": 0.9}, {"temperature": 0}, (False, 1.0)),
    ({"do_sample": True, "temperature": 0.9, "top_p": 0.5}, {"temperature": 0.3}, (True, 0.3, 0.5, 50, 1.0)),
])
def test_arguments_override_the_generation_config(config, kwargs, expected):
    assert _decoding(GenerationSettings.from_generation_config(config, **kwargs)) == expected


def test_a_bad_value_in_the_generation_config_names_the_file_and_key():
    with pytest.raises(ConfigError, match=r"run/generation_config.json \(top_p: 0\).*top_p must be in"):
        GenerationSettings.from_generation_config({"do_sample": True, "top_p": 0}, where="run/generation_config.json")
    with pytest.raises(ConfigError, match="top_k"):
        GenerationSettings.from_generation_config({"top_k": "many"})
    # An override that fixes the bad value is enough; a bad override is blamed on itself, not on the file.
    assert GenerationSettings.from_generation_config({"top_p": 0}, top_p=0.5).top_p == 0.5
    with pytest.raises(ConfigError, match=r"^top_p must be in"):
        GenerationSettings.from_generation_config({}, top_p=1.5)


def test_unset_fields_default_as_transformers_does():
    from transformers import GenerationConfig

    defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
    if defaults is None:  # transformers 4.x kept its defaults on GenerationConfig() itself
        fresh = GenerationConfig()
        assert {k: getattr(fresh, k) for k in TRANSFORMERS_DECODING_DEFAULTS} == TRANSFORMERS_DECODING_DEFAULTS
    else:
        assert {k: defaults()[k] for k in TRANSFORMERS_DECODING_DEFAULTS} == TRANSFORMERS_DECODING_DEFAULTS


def test_sampled_reply_equals_model_generate_with_the_same_config(tok, model):
    # The run's file says only do_sample: model.generate fills in the rest (top_k 50 included) and must draw the
    # same tokens as generate_reply with the settings resolved from that file.
    from transformers import GenerationConfig

    messages = [{"role": "user", "content": "Hello there"}]
    settings = GenerationSettings.from_generation_config({"do_sample": True}, max_new_tokens=12, seed=5)
    ids = build_prompt_ids(tok, messages)
    torch.manual_seed(5)
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         generation_config=GenerationConfig(do_sample=True, max_new_tokens=12, eos_token_id=[0],
                                                            pad_token_id=0))
    expected = tok.decode([t for t in out[0, len(ids):].tolist() if t != 0], skip_special_tokens=True).strip()
    assert expected and generate_reply(model, tok, messages, settings, stop_ids=[0]) == expected


@pytest.mark.parametrize("settings, text", [
    (GenerationSettings(greedy=True), "greedy"),
    (GenerationSettings(greedy=True, repetition_penalty=1.1), "greedy (repetition penalty 1.1)"),
    (GenerationSettings(temperature=0.7, top_p=0.9), "sampling (temperature 0.7, top-p 0.9)"),
    (GenerationSettings(temperature=1.0, top_p=1.0, top_k=50), "sampling (temperature 1, top-p 1, top-k 50)"),
])
def test_settings_describe_themselves(settings, text):
    assert settings.describe() == text
