"""The Phi-3-style tokenizer: special tokens, ids, chat template, BOS behaviour, save/load."""

from phitune.generation.stops import stop_token_ids
from phitune.models.tokenizer import (
    CHAT_SPECIAL_TOKENS,
    PHI3_CHAT_TEMPLATE,
    build_phi3_style_tokenizer,
)

CHAT = [
    {"role": "system", "content": "Be nice."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi! How are you?"},
]


def test_special_tokens_and_ids(tok):
    assert tok.unk_token_id == 0 and tok.bos_token_id == 1 and tok.convert_tokens_to_ids("</s>") == 2
    ids = tok.convert_tokens_to_ids(CHAT_SPECIAL_TOKENS)
    assert ids == list(range(ids[0], ids[0] + 11))
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == ids[0]
    assert tok.pad_token == "<unk>" and tok.padding_side == "right"
    assert stop_token_ids(tok) == [ids[0], ids[1], ids[7]]  # Phi-3: 32000, 32001, 32007


def test_chat_template_is_phi3(tok):
    assert tok.chat_template == PHI3_CHAT_TEMPLATE
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text == (
        "<|system|>\nBe nice.<|end|>\n<|user|>\nHello there<|end|>\n"
        "<|assistant|>\nHi! How are you?<|end|>\n<|endoftext|>"
    )
    gen = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert gen.endswith("<|user|>\nHello there<|end|>\n<|assistant|>\n")


def test_bos_and_rstrip(tok):
    text = tok.apply_chat_template(CHAT, tokenize=False)
    plain = tok(text)["input_ids"]
    assert plain[0] == 1 and plain.count(1) == 1  # tokenizer(text) adds one <s>
    templ = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert templ == plain[1:]  # apply_chat_template encodes without special tokens: no <s>
    end, user = tok.convert_tokens_to_ids(["<|end|>", "<|user|>"])
    i = plain.index(end)
    assert plain[i + 1] == user  # the "\n" after <|end|> is absorbed (Phi-3's rstrip=True added tokens)
    assert build_phi3_style_tokenizer(add_bos_token=False)(text)["input_ids"][0] != 1


def test_phi3_ids_layout():
    t = build_phi3_style_tokenizer(phi3_ids=True)
    assert t.convert_tokens_to_ids(CHAT_SPECIAL_TOKENS) == list(range(32000, 32011))
    assert len(t) == 32011


def test_save_load_roundtrip(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    t2 = AutoTokenizer.from_pretrained(tmp_path)
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert t2(text)["input_ids"] == tok(text)["input_ids"]
    assert t2.chat_template == PHI3_CHAT_TEMPLATE and t2.pad_token == "<unk>" and t2.eos_token == "<|endoftext|>"
