"""GGUF (llama.cpp, Ollama, LM Studio): the merged model or the LoRA adapter, written with the ``gguf`` package.

Layout decisions, each what llama.cpp's own loader expects (learned from its convert_hf_to_gguf.py):
- Tensor names come from ``gguf.get_tensor_name_map``. Phi-3 keeps its fused ``qkv_proj`` (``attn_qkv``) and
  ``gate_up_proj`` (``ffn_up``, gate rows first: llama.cpp's SwiGLU splits it in half the way Phi-3 does).
- Llama's q/k rows are reordered from Hugging Face's rotate-half RoPE layout to llama.cpp's interleaved one
  (:func:`_rope_interleave`); Phi-3 and Qwen2 use the rotate-half ("neox") kernel in llama.cpp and stay as they are.
- 1-D tensors (norms, biases, RoPE factors) stay float32 whatever the outtype; q8_0 falls back to f16 for a matrix
  whose rows do not split into 32-value blocks.
- Phi-3's LongRoPE (128k models): ``rope_factors_long``/``rope_factors_short`` tensors and the attention factor
  sqrt(1 + ln(s) / ln(original context)), s = context / original context, unless the config gives one.
- Tokenizer: SentencePiece ("llama") from tokenizer.model, or byte-level BPE ("gpt2") from tokenizer.json; the
  vocabulary padded to the embedding's rows with unused tokens; special ids (bos, eos, end-of-turn, unk, pad); one BOS
  added by the runtime and none by the chat template, as phitune trains (``generate.build_prompt_ids``); for
  SentencePiece, llama.cpp's ``add_space_prefix`` as the tokenizer treats text after a chat token
  (:func:`_space_after_special_token`).
- ``general.name`` contains "Phi-3" for a Phi-3 whose chat tokens eat the whitespace after them: llama.cpp gives its
  special tokens that behaviour only for a model named phi3/phi-3, and tokenizes the chat wrongly otherwise.
- LoRA: each module's scale (alpha/r, alpha/sqrt(r) with rsLoRA, per-module r and alpha) is folded into B and the
  file's ``adapter.lora.alpha`` is 0, which llama.cpp reads as "scale 1": it applies one alpha per file and divides by
  each tensor's rank, so any other setting would be wrong for some module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..adapt import PEFT_PREFIX, read_adapter
from ..errors import AdapterError
from ..models.chat_template import end_of_turn_id
from .common import ExportError, Source

# HF model_type -> (gguf architecture name, q/k rows to reorder for llama.cpp's interleaved RoPE)
ARCHITECTURES = {"phi3": ("PHI3", False), "llama": ("LLAMA", True), "mistral": ("LLAMA", True),
                 "qwen2": ("QWEN2", False)}
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


# --- the merged model -----------------------------------------------------------------------------------------------


def write_gguf_model(model_dir: Path, path: Path, outtype: str, label: str) -> tuple[str, dict]:
    """Write the model folder ``model_dir`` (a merged HF model) as one GGUF file; check it by reading it back."""
    import gguf

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    arch_name, interleave = _architecture(config)
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    tokenizer = _load_tokenizer(model_dir)
    n_layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(arch, n_layers)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    name = _model_name(label, config, tokenizer)
    writer.add_name(name)
    writer.add_file_type(_FILE_TYPES[outtype](gguf))
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    extra = _hyperparameters(writer, config, arch_name)
    add_tokenizer(writer, model_dir, tokenizer, config)

    expected: dict[str, np.ndarray] = {}
    for hf_name, tensor in _weights(model_dir):
        if hf_name.endswith(".rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # llama.cpp reuses token_embd when there is no output tensor
        base, suffix = hf_name.rsplit(".", 1)
        gguf_base = names.get_name(base)
        if gguf_base is None:
            raise ExportError(f"{model_dir}: tensor '{hf_name}' has no GGUF name for {arch_name.lower()}; "
                              "this checkpoint has a layer llama.cpp's architecture does not")
        data = tensor.float().numpy()
        if interleave and suffix in ("weight", "bias") and base.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            heads = config["num_attention_heads"] if base.endswith("q_proj") else _kv_heads(config)
            data = _rope_interleave(data, heads)
        key = f"{gguf_base}.{suffix}"
        expected[key] = data
        _add(writer, gguf, key, data, outtype)
    for key, data in extra.items():
        expected[key] = data
        writer.add_tensor(key, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    parity, worst = _check_tensors(path, expected, outtype)
    return parity, {"gguf": path.name, "general.name": name, "max_abs_diff": worst,
                    "next_steps": [f"llama.cpp: llama-cli -m {path.name} -cnv   (chat with the template inside)"]}


def _architecture(config: dict) -> tuple[str, bool]:
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ExportError(f"config.json: model_type {model_type!r} is not one phitune writes as GGUF (it writes "
                          f"{', '.join(sorted(ARCHITECTURES))}); run `phitune merge` and convert the merged folder "
                          "with llama.cpp's convert_hf_to_gguf.py")
    return ARCHITECTURES[model_type]


def _kv_heads(config: dict) -> int:
    return config.get("num_key_value_heads") or config["num_attention_heads"]


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _rope(config: dict) -> dict:
    """RoPE settings from a transformers 5 (rope_parameters) or 4 (rope_theta + rope_scaling) config.json."""
    params = dict(config.get("rope_parameters") or {})
    if not params:
        params = dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params["type"]
    params.setdefault("rope_type", "default")
    params.setdefault("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    return params


def _hyperparameters(writer, config: dict, arch_name: str) -> dict[str, np.ndarray]:
    """The architecture's metadata; returns extra tensors (Phi-3's LongRoPE factors)."""
    import gguf

    rope = _rope(config)
    head_dim = _head_dim(config)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(_kv_heads(config))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(int(rope["partial_rotary_factor"] * head_dim))
    if head_dim != config["hidden_size"] // config["num_attention_heads"]:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    extra: dict[str, np.ndarray] = {}
    kind = rope["rope_type"]
    if arch_name == "PHI3":
        original = config.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") \
            or config["max_position_embeddings"]
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_sliding_window(config.get("sliding_window") or 0)
        if kind in ("longrope", "su"):
            long, short = rope.get("long_factor"), rope.get("short_factor")
            half = int(rope["partial_rotary_factor"] * head_dim) // 2
            if not long or not short or len(long) != half or len(short) != half:
                raise ExportError(f"config.json: rope long_factor/short_factor must both have {half} values "
                                  "(half the rotary dimension)")
            scale = config["max_position_embeddings"] / original
            factor = rope.get("attention_factor")
            if factor is None:
                factor = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
            writer.add_rope_scaling_attn_factors(float(factor))
            extra["rope_factors_long.weight"] = np.asarray(long, dtype=np.float32)
            extra["rope_factors_short.weight"] = np.asarray(short, dtype=np.float32)
        elif kind != "default":
            raise ExportError(f"config.json: Phi-3 with rope_type {kind!r}: phitune writes default and longrope only")
    elif kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind != "default":
        raise ExportError(f"config.json: rope_type {kind!r} is not written by phitune's GGUF export (default and "
                          "linear are); convert the merged folder with llama.cpp's convert_hf_to_gguf.py")
    return extra


def _rope_interleave(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head reordered from (first halves..., second halves...) to (pairs...): HF's rotate-half RoPE
    pairs dimension i with i + d/2, llama.cpp's normal RoPE pairs 2i with 2i+1."""
    shape = w.shape
    return w.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _rope_deinterleave(w: np.ndarray, heads: int) -> np.ndarray:
    shape = w.shape
    return w.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the safetensors files, one at a time (no whole state dict in memory)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir}: no .safetensors weights")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield key, f.get_tensor(key)


_FILE_TYPES = {"f32": lambda g: g.LlamaFileType.ALL_F32, "f16": lambda g: g.LlamaFileType.MOSTLY_F16,
               "bf16": lambda g: g.LlamaFileType.MOSTLY_BF16, "q8_0": lambda g: g.LlamaFileType.MOSTLY_Q8_0}


def _add(writer, gguf, key: str, data: np.ndarray, outtype: str) -> None:
    kind = _stored_type(data, outtype)
    if kind == "f32":
        writer.add_tensor(key, data.astype(np.float32))
    elif kind == "f16":
        writer.add_tensor(key, data.astype(np.float16))
    else:
        qtype = gguf.GGMLQuantizationType.BF16 if kind == "bf16" else gguf.GGMLQuantizationType.Q8_0
        packed = gguf.quants.quantize(data.astype(np.float32), qtype)
        writer.add_tensor(key, packed, raw_shape=packed.shape, raw_dtype=qtype)


def _stored_type(data: np.ndarray, outtype: str) -> str:
    if data.ndim < 2 or outtype == "f32":
        return "f32"
    if outtype == "q8_0" and data.shape[-1] % 32:
        return "f16"
    return outtype


def _tolerance(data: np.ndarray, kind: str) -> float:
    """The largest error storing ``data`` as ``kind`` may make (round to nearest)."""
    amax = float(np.abs(data).max()) if data.size else 0.0
    if kind == "f32":
        return 0.0
    if kind == "f16":  # half an ulp (2^-11 relative), or the subnormal step 2^-25
        return max(amax * 2.0 ** -11, 2.0 ** -25)
    if kind == "bf16":
        return amax * 2.0 ** -8
    # q8_0: per block of 32, q = round(x / d) with d = amax_block / 127 stored as f16: |error| <= d/2 + 127 |d - d16|
    d = amax / 127
    return d * (0.5 + 127 * 2.0 ** -11) + 2.0 ** -24


def read_tensor(reader_tensor) -> np.ndarray:
    """A tensor of a GGUFReader as float32, in its logical (row-major) shape."""
    import gguf

    data = gguf.quants.dequantize(reader_tensor.data, reader_tensor.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape(tuple(int(n) for n in reversed(reader_tensor.shape)))


def _check_tensors(path: Path, expected: dict[str, np.ndarray], outtype: str,
                   what: str = "the merged weights") -> tuple[str, float]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    found = {t.name: t for t in reader.tensors}
    if set(found) != set(expected):
        raise ExportError(f"{path}: read back {len(found)} tensors, wrote {len(expected)}: "
                          f"{sorted(set(found) ^ set(expected))[:5]}")
    worst, ratio = 0.0, 0.0
    for key, want in expected.items():
        got = read_tensor(found[key])
        if got.shape != want.shape:
            raise ExportError(f"{path}: tensor {key} reads back as {got.shape}, wrote {want.shape}")
        diff = float(np.abs(got - want).max()) if want.size else 0.0
        allowed = _tolerance(want, _stored_type(want, outtype))
        if diff > allowed:
            raise ExportError(f"{path}: tensor {key} reads back {diff:.3g} away from the merged weights, more than "
                              f"{outtype} rounding allows ({allowed:.3g}); please report this")
        worst = max(worst, diff)
        ratio = max(ratio, diff / allowed if allowed else 0.0)
    text = "bit-exact" if worst == 0 else f"max |difference| {worst:.3g}, at most {ratio:.0%} of {outtype} rounding"
    return f"{len(expected)} tensors read back with gguf.GGUFReader equal {what} ({text})", worst


# --- the tokenizer --------------------------------------------------------------------------------------------------


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{folder}: the tokenizer cannot be loaded ({exc})") from exc


def _model_name(label: str, config: dict, tokenizer) -> str:
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
    ``add_space_prefix`` is true, and to none when it is false. transformers 5 rebuilds a Llama-style tokenizer from
    tokenizer_config.json's ``legacy`` flag: legacy prefixes every piece, non-legacy (Phi-3's own setting) only the
    text at the very start, so after ``<|user|>`` it writes "Who" where llama.cpp's default writes "▁Who" (a tiny
    SentencePiece Phi-3 measured 3 of 3 chat prompts tokenized differently). A chat prompt starts with a special token,
    so asking the tokenizer what follows one makes llama.cpp tokenize every chat turn as training did; only plain text
    at the very start of a non-chat prompt then differs (no leading "▁"), which llama.cpp cannot express."""
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


# --- the LoRA adapter -----------------------------------------------------------------------------------------------


def folded_lora(source: Source) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], object]:
    """``{module name: (A, B * scale)}`` of a run's adapter (float32), each module's own scale folded into B, and
    the adapter's LoraConfig. Refuses what a plain A/B pair cannot carry."""

    cfg, tensors, path = read_adapter(source.run.adapter_dir)
    if cfg.modules_to_save:
        raise ExportError(f"{path}: modules_to_save {cfg.modules_to_save} are trained in full, which a LoRA adapter "
                          "file for llama.cpp cannot hold; export the merged model instead (drop --adapter)")
    if cfg.bias != "none":
        raise ExportError(f"{path}: bias={cfg.bias!r} trains biases, which a llama.cpp LoRA cannot hold; export the "
                          "merged model instead (drop --adapter)")
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in tensors.items():
        if ".lora_embedding_" in key:
            raise ExportError(f"{path}: {key}: LoRA on the token embedding is not written as a llama.cpp LoRA; "
                              "export the merged model instead (drop --adapter)")
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        pairs[module] = (a.float(), b.float() * lora_scale(cfg, module, a.shape[0]))
    if not pairs:
        raise AdapterError(f"{path}: no LoRA A/B tensors")
    return pairs, cfg


def lora_scale(cfg, module: str, rank: int) -> float:
    """peft's scaling of ``module``: alpha (alpha_pattern or lora_alpha) / r, or / sqrt(r) with rsLoRA; ``rank`` is
    the module's own (rank_pattern's, or r x slices for a fused Phi-3 module)."""
    import re

    alpha = cfg.lora_alpha
    for key, value in cfg.alpha_pattern.items():  # peft: the first key matching (.*\.)?(key)$
        if re.match(rf"(.*\.)?({key})$", module):
            alpha = value
            break
    return alpha / math.sqrt(rank) if cfg.use_rslora else alpha / rank


def write_gguf_adapter(source: Source, path: Path, outtype: str, label: str) -> tuple[str, dict]:
    """The run's adapter as a llama.cpp LoRA GGUF (scales folded into B, alpha 0); checked by reading it back."""
    import gguf

    pairs, _ = folded_lora(source)
    base = _base_config(source)
    arch_name, interleave = _architecture(base)
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    names = gguf.get_tensor_name_map(arch, base["num_hidden_layers"])
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(label)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # llama.cpp: alpha 0 = scale 1; the scales are in B
    writer.add_file_type(_FILE_TYPES[outtype](gguf))
    expected: dict[str, np.ndarray] = {}
    deltas: dict[str, tuple[np.ndarray, str, str]] = {}
    for module, (a, b) in sorted(pairs.items()):
        gguf_base = names.get_name(module)
        if gguf_base is None:
            raise ExportError(f"adapter module '{module}' has no llama.cpp tensor for {arch_name.lower()}")
        b_np = b.numpy()
        if interleave and module.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            heads = base["num_attention_heads"] if module.endswith("q_proj") else _kv_heads(base)
            b_np = _rope_interleave(b_np, heads)
        ka, kb = f"{gguf_base}.weight.lora_a", f"{gguf_base}.weight.lora_b"
        expected[ka], expected[kb] = a.numpy(), b_np
        deltas[module] = (b_np @ a.numpy(), ka, kb)
        _add(writer, gguf, ka, a.numpy(), outtype)
        _add(writer, gguf, kb, b_np, outtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors_parity, _ = _check_tensors(path, expected, outtype, "the adapter's (scale folded into B)")
    # The product llama.cpp adds (scale 1) against the run's scale * B @ A.
    reader = gguf.GGUFReader(str(path))
    found = {t.name: t for t in reader.tensors}
    worst, total = 0.0, 0.0
    for module, (want, ka, kb) in deltas.items():
        got = read_tensor(found[kb]) @ read_tensor(found[ka])
        worst = max(worst, float(np.abs(got - want).max()))
        total = max(total, float(np.abs(want).max()))
    rank = max(a.shape[0] for a, _ in pairs.values())
    parity = (f"{tensors_parity}; llama.cpp's delta B@A (alpha 0 = scale 1) vs the run's scaled delta over "
              f"{len(deltas)} modules: max |difference| {worst:.3g} (largest delta entry {total:.3g})")
    return parity, {"gguf": path.name, "modules": len(pairs), "max_rank": rank, "max_abs_delta_diff": worst,
                    "next_steps": [f"llama.cpp: llama-cli -m BASE.gguf --lora {path.name}   (BASE.gguf: the base "
                                   f"model {source.config.model.name_or_path} as GGUF)"]}


def _base_config(source: Source) -> dict:
    from transformers import AutoConfig

    model = source.config.model
    try:
        cfg = AutoConfig.from_pretrained(model.name_or_path, revision=model.revision, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ExportError(f"model.name_or_path: cannot read the base model's config ({exc})") from exc
    return cfg.to_dict()
