"""The tokenizer of a GGUF file: vocabulary, merges or scores, token types, special ids, chat template and the flags
llama.cpp tokenizes with, each as llama.cpp's own loader expects (learned from its convert_hf_to_gguf.py).

- SentencePiece ("llama") from tokenizer.model, or byte-level BPE ("gpt2") from tokenizer.json; the vocabulary padded
  to the embedding's rows with unused tokens; special ids (bos, eos, end-of-turn, unk, pad); one BOS added by the
  runtime and none by the chat template, as phitune trains (``generate.build_prompt_ids``); for SentencePiece,
  llama.cpp's ``add_space_prefix`` as the tokenizer treats text after a chat token
  (:func:`_space_after_special_token`).
- ``general.name`` contains "Phi-3" for a Phi-3 whose chat tokens eat the whitespace after them: llama.cpp gives its
  special tokens that behaviour only for a model named phi3/phi-3, and tokenizes the chat wrongly otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..models.chat_template import end_of_turn_id
from ..models.loading import open_tokenizer
from .common import ExportError

# Pre-tokenizer regexes of byte-level BPE tokenizers, by the name llama.cpp gives their pre-tokenizer.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
     r"|\s*[\r\n]+|\s+(?!\S)|\s+"):
        "llama-bpe",
    _GPT2_REGEX: "gpt-2",
}


def folder_tokenizer(folder: Path):
    """The tokenizer saved in ``folder``, as its tokenizer.json defines (models.loading.open_tokenizer)."""
    try:
        return open_tokenizer(str(folder))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{folder}: the tokenizer cannot be loaded ({exc})") from exc


def model_name(label: str, config: dict, tokenizer) -> str:
    """``general.name``: ``label``, "Phi-3" put in front for a Phi-3 whose chat tokens eat the whitespace after them."""
    name = label
    if config.get("model_type") == "phi3" and _chat_tokens_eat_whitespace(tokenizer):
        lowered = name.lower()
        if "phi3" not in lowered and "phi-3" not in lowered:
            name = f"Phi-3 {name}"
    return name


def _chat_tokens_eat_whitespace(tokenizer) -> bool:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return any(getattr(tok, "rstrip", False) for tok in added.values())


def add_tokenizer(writer, folder: Path, tokenizer, config: dict) -> dict:
    """Vocabulary, special ids and chat template of ``tokenizer`` (saved in ``folder``) as GGUF metadata."""
    n_vocab = config["vocab_size"]
    if (folder / "tokenizer.model").is_file():
        tokens, scores, types = _sentencepiece_vocab(folder / "tokenizer.model", tokenizer, n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(_space_after_special_token(tokenizer))
    else:
        tokens, types, merges, pre = _bpe_vocab(folder, tokenizer, n_vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
    ids = special_ids(tokenizer, folder)
    for kind, value in ids.items():
        if value is not None and value < len(tokens):
            getattr(writer, f"add_{kind}_token_id")(value)
    template = getattr(tokenizer, "chat_template", None)
    add_bos = tokenizer.bos_token_id is not None and not template_writes_bos(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)
    if template:
        writer.add_chat_template(template)
    return ids


def _space_after_special_token(tokenizer) -> bool:
    """Whether ``tokenizer`` starts the text after a special token with SentencePiece's dummy-prefix "▁".

    llama.cpp prefixes a space to every piece of text that follows a special token when the GGUF's
    ``add_space_prefix`` is true (its default for SentencePiece), and to none when it is false. Phi-3's own
    tokenizer.json prepends "▁" to each piece of text between special tokens (a ``Prepend("▁")`` normalizer), so a
    Phi-3 tokenized as its files define (``models.loading.open_tokenizer``) exports with the default:
    ``<|user|>\nWho`` is "▁Who" in training and in llama.cpp. A tokenizer built from tokenizer.model alone follows
    tokenizer_config.json's ``legacy`` flag in transformers 5: legacy prefixes every piece, non-legacy only the text
    at the very start (false here; plain text at the very start of a prompt without a chat token then lacks its "▁"
    in llama.cpp, which it cannot express). A chat prompt starts with a special token, so asking the tokenizer what
    follows one makes llama.cpp tokenize every chat turn as training did."""
    marker = tokenizer.eos_token or tokenizer.bos_token
    if not marker:
        return True  # llama.cpp's default for SentencePiece
    ids = tokenizer(marker + "a", add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    return len(pieces) > 1 and pieces[1].startswith("\u2581")


def special_ids(tokenizer, folder: Path) -> dict[str, int | None]:
    """bos, eos, eot, unk and pad ids. eot is the end-of-turn token of the chat template by phitune's one turn-end
    rule (``models/chat_template.py``: ``<|end|>`` on Phi-3, ``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``),
    so llama.cpp stops where training ended each answer; none when the tokenizer has no such template."""
    return {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "eot": end_of_turn_id(tokenizer),
            "unk": tokenizer.unk_token_id, "pad": tokenizer.pad_token_id}


def template_writes_bos(tokenizer) -> bool:
    """Whether the chat template itself starts with the BOS token (then the runtime must not add one)."""
    template, bos = getattr(tokenizer, "chat_template", None), tokenizer.bos_token
    if not template or not bos:
        return False
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    return text.startswith(bos)


def _token_flags(tokenizer) -> dict[int, tuple[str, bool]]:
    return {i: (t.content, bool(t.special)) for i, t in tokenizer.added_tokens_decoder.items()}


def _sentencepiece_vocab(path: Path, tokenizer, n_vocab: int):
    import gguf
    from sentencepiece import SentencePieceProcessor

    T = gguf.TokenType
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(path))
    size = max(n_vocab, sp.vocab_size())
    tokens = [f"[PAD{i}]".encode() for i in range(size)]
    scores = [-10000.0] * size
    types = [T.UNUSED] * size
    for i in range(sp.vocab_size()):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = (T.UNKNOWN if sp.IsUnknown(i) else T.CONTROL if sp.IsControl(i) else T.UNUSED if sp.IsUnused(i)
                    else T.BYTE if sp.IsByte(i) else T.NORMAL)
    for i, (content, special) in _token_flags(tokenizer).items():
        if i >= size or i < sp.vocab_size() and content == sp.IdToPiece(i):
            continue  # the SentencePiece model's own <unk>/<s>/</s> keep their types
        tokens[i], scores[i], types[i] = content.encode("utf-8"), -1000.0, T.CONTROL if special else T.USER_DEFINED
    return tokens[:size], scores[:size], [int(t) for t in types[:size]]


def _bpe_vocab(folder: Path, tokenizer, n_vocab: int):
    import gguf

    T = gguf.TokenType
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{folder}: neither tokenizer.model (SentencePiece) nor tokenizer.json (BPE) is there; "
                          "copy the base model's tokenizer.model into the run folder")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model", {})
    pre = _pre_tokenizer_name(data)
    if model.get("type") != "BPE" or pre is None:
        raise ExportError(f"{path}: phitune writes byte-level BPE tokenizers (GPT-2, Qwen2, Llama-3 pre-tokenizers) "
                          "and SentencePiece ones (tokenizer.model); this one is neither. "
                          "For a SentencePiece vocabulary copy the base model's tokenizer.model next to tokenizer.json")
    vocab = dict(model["vocab"])
    flags = _token_flags(tokenizer)
    size = max(n_vocab, len(tokenizer))
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(T.UNUSED)] * size
    for text, i in vocab.items():
        if i < size:
            tokens[i], types[i] = text, int(T.NORMAL)
    for i, (content, special) in flags.items():
        if i < size:
            tokens[i], types[i] = content, int(T.CONTROL if special else T.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges, pre


def _pre_tokenizer_name(data: dict) -> str | None:
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regex = None
    for step in steps:
        if step.get("type") == "Split":
            regex = (step.get("pattern") or {}).get("Regex")
        elif step.get("type") == "ByteLevel" and step.get("use_regex", True):
            regex = regex or _GPT2_REGEX
    if not any(step.get("type") == "ByteLevel" for step in steps):
        return None
    return _PRE_TOKENIZERS.get(regex)
