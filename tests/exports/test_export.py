"""phitune.export: GGUF (model and LoRA), Ollama, ONNX Runtime GenAI and vLLM exports, read back and compared.

Runs are hand-built as in tests/runs/test_run_commands.py (the shipped demo model as base, a random adapter), so
nothing trains.
Tolerances come from the storage type: f16 rounds to 2^-11 relative, bf16 to 2^-8, q8_0 to half its block step
(block max / 127) plus the step's own f16 rounding.
"""

from __future__ import annotations

import copy
import errno
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import save_nonzero_adapter
import phitune
from phitune.errors import ConfigError, StorageError
from phitune.exports import ExportError, export

gguf = pytest.importorskip("gguf", reason="the export extra (gguf) is not installed")

DEMO = Path(phitune.__file__).parent / "embedded" / "assets" / "model"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Ada?"},
        {"role": "assistant", "content": "A person.\nShe codes."}, {"role": "user", "content": "And  Bob ?"}]


def _make_run(root: Path, peft: dict, seed: int = 0, base: Path = DEMO, tokenizer: Path | None = None) -> Path:
    from transformers import AutoModelForCausalLM

    from phitune.config import build_model_config, load_config
    from phitune.models.loading import load_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    model_section = {"name_or_path": str(base), "tokenizer": str(tokenizer) if tokenizer else None}
    tok = load_tokenizer(build_model_config(model_section))  # the tokenizer `phitune train` saves in the run
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    data = root / "chats.jsonl"
    data.write_text(json.dumps({"messages": CHAT[1:3]}) + "\n")
    run = root / "run"
    config = load_config({"model": model_section, "data": {"train": str(data)},
                          "training_config": {"output_dir": str(run)}, "peft_config": peft})
    run.mkdir(parents=True)
    (run / "phitune_config.yaml").write_text(config.to_yaml())
    tok.save_pretrained(run)
    stops = [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|assistant|>", "<|end|>")]
    (run / "generation_config.json").write_text(json.dumps({"eos_token_id": stops, "pad_token_id": tok.pad_token_id}))
    torch.manual_seed(seed)  # the adapter's draw (lora_A's init and lora_B), reproducible per run
    save_nonzero_adapter(model, run, base, peft, std=0.05)
    model.eval()
    return run, model


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run, model = _make_run(root, {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"})
    return {"root": root, "run": run, "model": model}


def _fields(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    from phitune.exports.to_gguf import read_tensor

    return fields, {t.name: read_tensor(t) for t in reader.tensors}


def _bound(x: np.ndarray, outtype: str) -> float:
    amax = float(np.abs(x).max())
    return {"f32": 0.0, "f16": amax * 2.0 ** -11 + 2.0 ** -25, "bf16": amax * 2.0 ** -8,
            "q8_0": amax / 127 * (0.5 + 127 * 2.0 ** -11) + 2.0 ** -24}[outtype]


def _interleaved(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for q/k, built row by row: dims (i, i + d/2) of each head become rows (2i, 2i+1)."""
    out = np.empty_like(w)
    d = w.shape[0] // heads
    for h in range(heads):
        for i in range(d // 2):
            out[h * d + 2 * i] = w[h * d + i]
            out[h * d + 2 * i + 1] = w[h * d + d // 2 + i]
    return out


# --- GGUF: the merged model -----------------------------------------------------------------------------------------


def test_gguf_of_a_run_holds_the_merged_model_tokenizer_and_chat_template(demo_run, tmp_path):
    from transformers import AutoTokenizer

    from phitune.adapt import merge_lora
    from phitune.generation.generate import build_prompt_ids

    result = export(demo_run["run"], "gguf", tmp_path / "g", outtype="f32", verbose=False)
    (path,) = (tmp_path / "g").glob("*.gguf")
    fields, tensors = _fields(path)
    assert fields["general.architecture"] == "phi3" and "phi-3" in fields["general.name"].lower()
    assert fields["phi3.block_count"] == 4 and fields["phi3.attention.head_count_kv"] == 4
    tok = AutoTokenizer.from_pretrained(demo_run["run"])
    vocab = {i: t for t, i in tok.get_vocab().items()}
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == 1088 and tokens[:len(vocab)] == [vocab[i] for i in range(len(vocab))]
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.token_type"][tok.convert_tokens_to_ids("<|end|>")] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.eos_token_id"] == tok.convert_tokens_to_ids("<|endoftext|>")
    assert fields["tokenizer.ggml.eot_token_id"] == tok.convert_tokens_to_ids("<|end|>")
    assert fields["tokenizer.ggml.bos_token_id"] == tok.bos_token_id and fields["tokenizer.ggml.add_bos_token"]
    assert fields["tokenizer.chat_template"] == tok.chat_template
    # one BOS: the runtime adds it, the template writes none
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"] == build_prompt_ids(tok, CHAT)

    merged = {k: v.float().numpy() for k, v in merge_lora(copy.deepcopy(demo_run["model"])).state_dict().items()}
    assert np.array_equal(tensors["blk.2.attn_qkv.weight"], merged["model.layers.2.self_attn.qkv_proj.weight"])
    assert np.array_equal(tensors["blk.0.ffn_up.weight"], merged["model.layers.0.mlp.gate_up_proj.weight"])
    assert np.array_equal(tensors["output.weight"], merged["lm_head.weight"])
    assert "bit-exact" in result.parity and (tmp_path / "g" / "phitune_export.json").is_file()


def _tiny(kind: str, tmp: Path) -> Path:
    """A random tiny model of ``kind`` with the demo tokenizer, saved as a merged model folder."""
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO)
    common = dict(vocab_size=1088, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, bos_token_id=1, eos_token_id=1024, pad_token_id=0)
    if kind == "phi3-mha":
        cfg = transformers.Phi3Config(num_key_value_heads=4, **common)
    elif kind == "phi3-gqa":
        cfg = transformers.Phi3Config(num_key_value_heads=2, **common)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(num_key_value_heads=2, **common)
    else:
        cfg = transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **common)
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # norms and biases away from their 1/0 init, so a mix-up shows
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.normal_(0, 1)
    folder = tmp / kind
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind,outtype", [("phi3-mha", "f16"), ("phi3-gqa", "q8_0"), ("llama", "bf16"),
                                          ("qwen2", "q8_0"), ("llama", "f32")])
def test_gguf_round_trip_names_shapes_and_values_within_the_outtypes_rounding(kind, outtype, tmp_path):
    from safetensors.torch import load_file

    folder = _tiny(kind, tmp_path)
    export(folder, "gguf", tmp_path / "out", outtype=outtype, verbose=False)
    (path,) = (tmp_path / "out").glob("*.gguf")
    fields, tensors = _fields(path)
    arch = {"phi3-mha": "phi3", "phi3-gqa": "phi3", "llama": "llama", "qwen2": "qwen2"}[kind]
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.attention.head_count_kv"] == (4 if kind == "phi3-mha" else 2)
    assert fields[f"{arch}.rope.dimension_count"] == 16 and fields[f"{arch}.context_length"] == 128
    state = {k: v.float().numpy() for k, v in load_file(str(folder / "model.safetensors")).items()}
    fused = {"phi3": {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"},
             "llama": {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                       "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up"}}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(2):
        parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.o_proj": "attn_output", "mlp.down_proj": "ffn_down", **fused.get(arch, fused["llama"])}
        for hf, g in parts.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{g}.weight"
        if arch == "qwen2":
            for p in ("q", "k", "v"):
                names[f"model.layers.{i}.self_attn.{p}_proj.bias"] = f"blk.{i}.attn_{p}.bias"
    if arch == "qwen2":
        del names["lm_head.weight"]  # tied: llama.cpp reuses token_embd
        assert "output.weight" not in tensors
    assert set(tensors) == set(names.values())
    for hf, g in names.items():
        want = state[hf]
        if arch == "llama" and re.search(r"\.(q|k)_proj\.", hf):
            want = _interleaved(want, 4 if ".q_proj" in hf else 2)
        assert tensors[g].shape == want.shape, g
        kind_ = "f32" if want.ndim == 1 else ("f16" if outtype == "q8_0" and want.shape[-1] % 32 else outtype)
        assert np.abs(tensors[g] - want).max() <= _bound(want, kind_), g


def test_gguf_of_a_longrope_phi3_carries_the_rope_factors_and_attention_factor(tmp_path):
    import math

    import transformers

    long, short = [1.0 + i / 10 for i in range(8)], [1.0 + i / 100 for i in range(8)]
    cfg = transformers.Phi3Config(vocab_size=1088, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                  original_max_position_embeddings=64, bos_token_id=1, eos_token_id=1024,
                                  pad_token_id=0,
                                  rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                   "long_factor": long, "short_factor": short})
    folder = tmp_path / "m"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(DEMO).save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    export(folder, "gguf", tmp_path / "out", outtype="f32", verbose=False)
    fields, tensors = _fields(next((tmp_path / "out").glob("*.gguf")))
    assert (np.allclose(tensors["rope_factors_long.weight"], long)
            and np.allclose(tensors["rope_factors_short.weight"], short))
    assert fields["phi3.rope.scaling.original_context_length"] == 64
    factor = saved.get("rope_parameters", {}).get("attention_factor") or math.sqrt(1 + math.log(4) / math.log(64))
    assert fields["phi3.rope.scaling.attn_factor"] == pytest.approx(factor, rel=1e-6)


def test_sentencepiece_vocabulary_keeps_pieces_scores_types_and_marks_added_tokens(tmp_path):
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece is not installed")
    import io

    from transformers import AutoTokenizer

    from phitune.exports.gguf_tokenizer import _sentencepiece_vocab
    from phitune.models.tokenizer import default_corpus

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(default_corpus(300)), model_writer=buf, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    chat_tok = AutoTokenizer.from_pretrained(DEMO)  # its added chat tokens sit at 1024..1034, past the 400 pieces
    tokens, scores, types = _sentencepiece_vocab(tmp_path / "tokenizer.model", chat_tok, 1088)
    T = gguf.TokenType
    assert len(tokens) == len(scores) == len(types) == 1088
    assert [t.decode() for t in tokens[:400]] == [sp.IdToPiece(i) for i in range(400)]
    assert scores[:400] == pytest.approx([sp.GetScore(i) for i in range(400)])
    assert types[0] == T.UNKNOWN and types[1] == T.CONTROL and types[sp.PieceToId("<0x41>")] == T.BYTE
    assert tokens[1031] == b"<|end|>" and types[1031] == T.CONTROL
    assert tokens[1087] == b"[PAD1087]" and types[1087] == T.UNUSED


# --- GGUF: the LoRA adapter -----------------------------------------------------------------------------------------


def test_gguf_lora_folds_each_modules_scale_for_mixed_slices_and_rslora(tmp_path):
    """q_proj+v_proj are two slices of qkv_proj (rank 2r), gate_proj one of gate_up_proj (rank r), o_proj its own
    alpha: llama.cpp's single alpha / each tensor's rank would be wrong for some module; folded, B@A is the delta."""
    peft = {"r": 4, "lora_alpha": 16, "use_rslora": True, "target_modules": ["q_proj", "v_proj", "gate_proj", "o_proj"],
            "alpha_pattern": {"o_proj": 3.0}}
    run, model = _make_run(tmp_path / "r", peft)
    result = export(run, "gguf", tmp_path / "lora", adapter=True, verbose=False)
    fields, tensors = _fields(next((tmp_path / "lora").glob("*.gguf")))
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 0.0  # llama.cpp: scale 1
    layers = dict(model.named_modules())
    checked = 0
    for i in range(4):
        for hf, g in (("self_attn.qkv_proj", "attn_qkv"), ("mlp.gate_up_proj", "ffn_up"),
                      ("self_attn.o_proj", "attn_output")):
            delta = layers[f"model.layers.{i}.{hf}"].delta_weight().numpy()  # the layer's own scaled delta
            got = tensors[f"blk.{i}.{g}.weight.lora_b"] @ tensors[f"blk.{i}.{g}.weight.lora_a"]
            assert np.abs(got - delta).max() <= 1e-6 * np.abs(delta).max() * 4 * 2, (i, hf)
            checked += 1
    assert checked == 12
    assert tensors["blk.0.attn_qkv.weight.lora_a"].shape[0] == 8 and tensors["blk.0.ffn_up.weight.lora_a"].shape[0] == 4
    assert "max |difference|" in result.parity


def test_gguf_lora_refuses_modules_to_save_with_the_reason(tmp_path):
    run, _ = _make_run(tmp_path / "r", {"r": 2, "lora_alpha": 4, "target_modules": ["o_proj"],
                                        "modules_to_save": ["lm_head"]})
    with pytest.raises(ExportError, match="modules_to_save.*merged model"):
        export(run, "gguf", tmp_path / "lora", adapter=True, verbose=False)
    assert not (tmp_path / "lora").exists() and not list(tmp_path.glob(".lora*"))


# --- Ollama ---------------------------------------------------------------------------------------------------------


def _render_go(template: str, messages: list[dict]) -> str:
    """Go text/template semantics for exactly the constructs the Modelfile uses (range .Messages; if/else if eq
    .Role "x"; .Content; end); anything else fails the test."""
    tokens = re.split(r"({{.*?}})", template)
    out = []
    body_start = tokens.index("{{ range .Messages }}")
    out.append("".join(tokens[:body_start]))
    end_range = len(tokens) - 1 - tokens[::-1].index("{{ end }}")
    body, tail = tokens[body_start + 1:end_range], tokens[end_range + 1:]
    for m in messages:
        active, done = False, False
        for t in body:
            cond = re.fullmatch(r'{{ (?:if|else if) eq \.Role "(\w+)" }}', t)
            if cond:
                active = not done and m["role"] == cond.group(1)
                done = done or active
            elif t == "{{ end }}":
                active = False
            elif t == "{{ .Content }}":
                out.append(m["content"] if active else "")
            elif t.startswith("{{"):
                raise AssertionError(f"unexpected Go template action {t}")
            elif active:
                out.append(t)
    assert all(not t.startswith("{{") for t in tail)
    return "".join(out) + "".join(tail)


def test_ollama_modelfile_template_renders_the_prompt_ids_training_uses(demo_run, tmp_path):
    from transformers import AutoTokenizer

    from phitune.generation.generate import build_prompt_ids

    export(demo_run["run"], "ollama", tmp_path / "o", outtype="q8_0", verbose=False)
    text = (tmp_path / "o" / "Modelfile").read_text()
    gguf_name = re.search(r"^FROM \./(.+)$", text, re.M).group(1)
    assert (tmp_path / "o" / gguf_name).is_file()
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    tok = AutoTokenizer.from_pretrained(demo_run["run"])
    for messages in (CHAT, CHAT[1:2], CHAT[1:]):
        prompt = _render_go(template, messages)
        # Ollama tokenizes with the GGUF's add_bos_token (true): one BOS in front
        assert ([tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
                == build_prompt_ids(tok, messages))
    stops = re.findall(r'^PARAMETER stop "(.+)"$', text, re.M)
    assert {"<|end|>", "<|endoftext|>"} <= set(stops)


# --- ONNX Runtime GenAI ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_onnx_runtime_genai_export_generates_transformers_greedy_tokens(demo_run, tmp_path):
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    pytest.importorskip("onnx_ir", reason="onnx-ir (needed by onnxruntime-genai's builder) is not installed")
    result = export(demo_run["run"], "onnx", tmp_path / "x", verbose=False)
    assert result.details["greedy_tokens"] >= 1
    assert result.details["greedy_tokens_equal"] == result.details["greedy_tokens"], result.parity
    genai = json.loads((tmp_path / "x" / "genai_config.json").read_text())
    assert sorted(genai["model"]["eos_token_id"]) == [1024, 1025, 1031]
    assert (tmp_path / "x" / "model.onnx").is_file()


def test_onnx_precision_is_checked_before_any_work(demo_run, tmp_path):
    with pytest.raises(ConfigError, match="--precision fp16 with --execution-provider cpu"):
        export(demo_run["run"], "onnx", tmp_path / "x", precision="fp16", verbose=False)


# --- vLLM -----------------------------------------------------------------------------------------------------------


def test_vllm_adapter_has_scale_one_everywhere_and_loads_to_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from phitune.adapt import load_adapter

    peft = {"r": 4, "lora_alpha": 16, "use_rslora": True, "target_modules": ["q_proj", "v_proj", "gate_proj", "o_proj"]}
    run, model = _make_run(tmp_path / "r", peft)
    result = export(run, "vllm", tmp_path / "v", name="tuned", verbose=False)
    config = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8 and not config["use_rslora"]
    assert all(config["alpha_pattern"][k] == v for k, v in config["rank_pattern"].items())
    assert result.details["max_lora_rank"] == 8
    assert ("--max-lora-rank 8" in result.details["serve_command"]
            and "--lora-modules tuned=" in result.details["serve_command"])
    fresh = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32)
    load_adapter(fresh, tmp_path / "v")
    fresh.eval()
    ids = torch.tensor([[1, 40, 50, 60, 1031, 1025]])
    with torch.no_grad():
        want, got = model(ids).logits, fresh(ids).logits
    assert (want - got).abs().max() <= 1e-5 * want.abs().max()
    peft_lib = pytest.importorskip("peft")
    base = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32)
    with torch.no_grad():
        theirs = peft_lib.PeftModel.from_pretrained(base, str(tmp_path / "v")).eval()(ids).logits
    assert (want - theirs).abs().max() <= 1e-5 * want.abs().max()


# --- the output folder and bad input --------------------------------------------------------------------------------


def test_export_refuses_a_folder_it_did_not_write_naming_out_and_force_replaces_only_an_earlier_export(
        demo_run, tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    for force in (False, True):  # as for every output folder: --force never touches what export did not write
        with pytest.raises(ConfigError, match=r"export --out: '.*/mine' is not empty and was not written by phitune "
                                              r"export .*keep\.txt.*--out DIR"):
            export(demo_run["run"], "vllm", other, force=force, verbose=False)
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    export(demo_run["run"], "vllm", tmp_path / "v", verbose=False)
    with pytest.raises(ConfigError, match=r"export --out: .* holds an earlier phitune export output; pass --force"):
        export(demo_run["run"], "vllm", tmp_path / "v", verbose=False)
    export(demo_run["run"], "vllm", tmp_path / "v", force=True, verbose=False)
    (tmp_path / "empty").mkdir()  # an empty folder is a new folder
    assert export(demo_run["run"], "vllm", tmp_path / "empty", verbose=False).path == tmp_path / "empty"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine", "v"]  # no staging folder left


def test_a_failed_export_leaves_the_earlier_export_intact(demo_run, tmp_path, monkeypatch):
    import phitune.exports as exports

    out = tmp_path / "v"
    export(demo_run["run"], "vllm", out, verbose=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(source, staging, *args):
        (staging / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(staging / "adapter_model.safetensors"))

    monkeypatch.setattr(exports, "write_vllm", full_disk)
    with pytest.raises(StorageError, match=r"cannot write the vllm export: the disk is full.*--out DIR"):
        export(demo_run["run"], "vllm", out, force=True, verbose=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]


def test_an_architecture_gguf_cannot_hold_is_refused_and_nothing_is_left(tmp_path):
    import transformers

    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=1088)
    folder = tmp_path / "gpt2"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(DEMO).save_pretrained(folder)
    with pytest.raises(ExportError, match="model_type 'gpt2'.*convert_hf_to_gguf"):
        export(folder, "gguf", tmp_path / "out", verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


def test_a_missing_optional_package_names_the_extra():
    from phitune.exports import _require

    with pytest.raises(ExportError, match=re.escape('pip install "phitune[export]"')):
        _require("gguf", "no_such_package_for_phitune_tests")


def test_cli_export_exits_2_with_the_message(demo_run, tmp_path, capsys):
    from phitune.cli import main

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert main(["export", str(demo_run["run"]), "--to", "vllm", "--out", str(tmp_path / "taken")]) == 2
    assert "not empty and was not written by phitune export" in capsys.readouterr().err


def test_merge_writes_every_stop_id_and_the_bases_tokenizer_files(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "base"
    AutoModelForCausalLM.from_pretrained(DEMO).save_pretrained(base)
    AutoTokenizer.from_pretrained(DEMO).save_pretrained(base)
    (base / "tokenizer.model").write_bytes(b"sentencepiece model bytes")
    (base / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "pad_token": "<|endoftext|>"}))
    run, _ = _make_run(tmp_path / "r", {"r": 2, "lora_alpha": 4, "target_modules": ["o_proj"]}, base=base)
    phitune.merge(run, tmp_path / "merged", verbose=False)
    merged = tmp_path / "merged"
    assert (merged / "tokenizer.model").read_bytes() == b"sentencepiece model bytes"
    assert json.loads((merged / "special_tokens_map.json").read_text())["pad_token"] == "<unk>"  # the run's pad
    assert sorted(json.loads((merged / "generation_config.json").read_text())["eos_token_id"]) == [1024, 1025, 1031]


# --- a real llama.cpp -----------------------------------------------------------------------------------------------
# Both runtimes compute in float32 (f32 weights, f32 KV cache), so the logits differ by rounding only. Estimate: an f32
# dot product of length n is off by about u * sqrt(n) relative (u = 2^-24, random-walk rounding); the steps of a layer
# reduce over hidden (qkv), head_dim (scores), the sequence (weighted values), hidden (o_proj, gate_up) and
# intermediate (down), lm_head over hidden; independent errors add in quadrature, and two implementations differ by
# sqrt(2) of one: sigma = sqrt(2) * u * sqrt(sum of the n) * rms(logits), about 1.2e-5 for the demo model. The issue's
# 1e-4 is then over 5 sigma (the largest of ~5e4 logits stays below 5 sigma but for a few percent); the tests check
# that relation, so a bigger model cannot turn 1e-4 into a figure tuned to what was observed.
LLAMA_CPP_TOL = 1e-4


def _llama_cpp_sigma(config: dict, logits: np.ndarray) -> float:
    import math

    hidden, inner = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    per_layer = 3 * hidden + head_dim + len(logits) + inner
    total = config["num_hidden_layers"] * per_layer + hidden
    return math.sqrt(2) * 2.0 ** -24 * math.sqrt(total) * float(np.sqrt((logits ** 2).mean()))


def _llama_cpp_logits(llama_cpp, gguf_path: Path, ids: list[int], lora: Path | None = None) -> np.ndarray:
    llm = llama_cpp.Llama(str(gguf_path), lora_path=str(lora) if lora else None, n_ctx=256, logits_all=True,
                          verbose=False, type_k=0, type_v=0, n_threads=2)  # 0 = GGML_TYPE_F32 KV cache
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)])
    finally:
        llm.close()


@pytest.mark.slow
def test_llama_cpp_runs_the_gguf_like_transformers(demo_run, tmp_path):
    """Logits within 1e-4 of transformers (f32 weights and KV cache), greedy tokens and chat tokenization equal,
    llama.cpp's own rendering of the GGUF's chat template equal to training's text."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (README: how to build it)",
                                    exc_type=ImportError)
    import ctypes

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phitune.generation.generate import build_prompt_ids

    export(demo_run["run"], "gguf", tmp_path / "g", outtype="f32", verbose=False)
    (path,) = (tmp_path / "g").glob("*.gguf")
    phitune.merge(demo_run["run"], tmp_path / "merged", dtype="float32", verbose=False)
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ids = build_prompt_ids(tok, CHAT)
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    theirs = _llama_cpp_logits(llama_cpp, path, ids)
    sigma = _llama_cpp_sigma(model.config.to_dict(), ours)
    assert LLAMA_CPP_TOL >= 5 * sigma, sigma
    assert np.abs(theirs - ours).max() <= LLAMA_CPP_TOL, (np.abs(theirs - ours).max(), sigma)

    out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=[1024, 1025, 1031],
                         pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    greedy = out.sequences[0, len(ids):].tolist()
    # a step whose top two logits are within twice the tolerance may legitimately go either way: compare up to it
    margins = [float(torch.topk(s[0], 2).values.diff().abs()) for s in out.scores]
    n = next((i for i, m in enumerate(margins) if m <= 2 * LLAMA_CPP_TOL), len(greedy))
    assert n > 0, margins
    llm = llama_cpp.Llama(str(path), n_ctx=256, verbose=False, type_k=0, type_v=0, n_threads=2)
    try:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids  # one BOS, chat tokens as trained
        got = []
        for token in llm.generate(ids, temp=0.0, top_k=1):
            got.append(token)
            if token in (1024, 1025, 1031) or len(got) == len(greedy):
                break
        assert got[:n] == greedy[:n], (got, greedy, margins)
        # llama-cli / llama-server without --jinja render the template with llama.cpp's built-in Phi-3 format
        messages = (llama_cpp.llama_chat_message * len(CHAT))(
            *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in CHAT])
        buf = ctypes.create_string_buffer(4096)
        size = llama_cpp.llama_chat_apply_template(llm.metadata["tokenizer.chat_template"].encode(), messages,
                                                   len(CHAT), True, buf, len(buf))
        assert buf.raw[:size].decode() == text
    finally:
        llm.close()


@pytest.mark.slow
def test_llama_cpp_applies_the_gguf_lora_like_the_runs_adapter(tmp_path):
    """The base model as GGUF plus ``--adapter``'s GGUF LoRA in llama.cpp give the run's logits (LoRA unmerged in
    transformers) within the same 1e-4, for mixed slices of fused modules, rsLoRA and an alpha_pattern, where
    llama.cpp's own alpha / rank would be off."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (README: how to build it)",
                                    exc_type=ImportError)
    from transformers import AutoTokenizer

    from phitune.generation.generate import build_prompt_ids

    peft = {"r": 4, "lora_alpha": 16, "use_rslora": True, "alpha_pattern": {"o_proj": 3.0},
            "target_modules": ["q_proj", "v_proj", "gate_proj", "o_proj", "down_proj"]}
    run, model = _make_run(tmp_path / "r", peft)
    export(DEMO, "gguf", tmp_path / "base", outtype="f32", verbose=False)
    export(run, "gguf", tmp_path / "lora", adapter=True, outtype="f32", verbose=False)
    (base,), (lora,) = (tmp_path / "base").glob("*.gguf"), (tmp_path / "lora").glob("*.gguf")
    ids = build_prompt_ids(AutoTokenizer.from_pretrained(run), CHAT)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    # the LoRA path adds x @ A^T @ B^T (rank <= 8) next to each matmul: rounding of the same order as the merged model
    assert LLAMA_CPP_TOL >= 5 * _llama_cpp_sigma(model.config.to_dict(), ours)
    with_lora = _llama_cpp_logits(llama_cpp, base, ids, lora=lora)
    assert np.abs(with_lora - ours).max() <= LLAMA_CPP_TOL, np.abs(with_lora - ours).max()
    without = _llama_cpp_logits(llama_cpp, base, ids)
    assert np.abs(without - ours).max() > 100 * LLAMA_CPP_TOL  # the adapter was applied, not a no-op


# --- a real llama.cpp: a SentencePiece Phi-3 -----------------------------------------------------------------------


# (tokenizer.json beside tokenizer.model, tokenizer_config.json's legacy flag, llama.cpp's add_space_prefix)
SENTENCEPIECE_LAYOUTS = {
    # Phi-3's own files: tokenizer.json prepends "▁" to every piece of text, chat turns included (llama.cpp's default)
    "phi3-files": (True, False, True),
    # tokenizer.model alone: transformers 5 builds the pipeline from the legacy flag; non-legacy: no "▁" after a chat
    # token, legacy: one
    "model-only-nonlegacy": (False, False, False),
    "model-only-legacy": (False, True, True),
}


def _sentencepiece_phi3(folder: Path, layout: str) -> Path:
    """A tiny random Phi-3 whose tokenizer is a real SentencePiece model laid out like Phi-3's: Llama's <unk> 0,
    <s> 1, </s> 2 and byte pieces 3..258 in tokenizer.model, the eleven chat tokens added right after its pieces in
    Phi-3's order (rstrip, as on the Hub), the embedding padded past them (32011 -> 32064 in Phi-3).
    ``layout``: a key of SENTENCEPIECE_LAYOUTS; with tokenizer.json, one written the way Phi-3's was (transformers'
    Llama conversion of tokenizer.model: BPE with byte fallback, a Prepend("▁") + Replace(" ", "▁") normalizer, no
    pre-tokenizer, the matching decoder)."""
    import io

    import sentencepiece as spm
    import transformers
    from tokenizers import Tokenizer, decoders, normalizers
    from transformers import AutoTokenizer

    from phitune.models.tokenizer import CHAT_SPECIAL_TOKENS, PHI3_CHAT_TEMPLATE, default_corpus

    tokenizer_json, legacy, _ = SENTENCEPIECE_LAYOUTS[layout]
    folder.mkdir(parents=True)
    corpus = default_corpus(300) + [m["content"] for m in CHAT] * 3
    buf = io.BytesIO()
    # Llama-2's normalizer settings: identity, a dummy prefix, spaces kept as they are, digits split, byte fallback
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=600, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, split_digits=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    n_pieces = spm.SentencePieceProcessor(model_proto=buf.getvalue()).vocab_size()
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": t == "</s>", "single_word": False,
                      "special": t != "</s>"} for i, t in enumerate(["<unk>", "<s>", "</s>"])}
    for k, t in enumerate(CHAT_SPECIAL_TOKENS):
        added[str(n_pieces + k)] = {"content": t, "lstrip": False, "normalized": False,
                                    "rstrip": t != "<|endoftext|>", "single_word": False, "special": True}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added, "bos_token": "<s>",
        "chat_template": PHI3_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>",
        "legacy": legacy, "model_max_length": 4096, "pad_token": "<unk>", "padding_side": "right",
        "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False}))
    tok = AutoTokenizer.from_pretrained(folder)  # from tokenizer.model: its vocabulary, merges and added tokens
    if tokenizer_json:
        backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        backend.pre_tokenizer = None
        backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
        backend.save(str(folder / "tokenizer.json"))
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    assert eos == n_pieces and len(tok) == n_pieces + len(CHAT_SPECIAL_TOKENS)
    cfg = transformers.Phi3Config(vocab_size=-(-len(tok) // 64) * 64, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                  max_position_embeddings=128, bos_token_id=1, eos_token_id=eos, pad_token_id=0)
    torch.manual_seed(2)
    transformers.Phi3ForCausalLM(cfg).save_pretrained(folder)
    stops = [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|assistant|>", "<|end|>")]
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": stops}))
    return folder


@pytest.mark.parametrize("layout", list(SENTENCEPIECE_LAYOUTS))
def test_gguf_space_prefix_follows_the_tokenizer_and_phi3s_own_files_get_llama_cpps_default(layout, tmp_path):
    """add_space_prefix says whether the run's tokenizer starts the text after a chat token with "▁"; with Phi-3's
    own files (tokenizer.json as shipped) it does, which is llama.cpp's default for a SentencePiece vocabulary. The
    run takes its tokenizer from a folder without the model's config.json (model.tokenizer), where transformers picks
    the class tokenizer_config.json names (a model folder's config.json makes it pick the generic one). The run
    folder's own tokenizer is reopened for the export: transformers 5 saves a legacy LlamaTokenizer without its
    ``legacy`` flag, so only its tokenizer.json still says how the run was tokenized."""
    pytest.importorskip("sentencepiece", reason="sentencepiece is not installed")
    import shutil

    from tokenizers import Tokenizer

    from phitune.runs.folder import load_run_tokenizer

    base = _sentencepiece_phi3(tmp_path / "base", layout)
    tokenizer_only = tmp_path / "tokenizer"
    tokenizer_only.mkdir()
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        if (base / name).is_file():
            shutil.copy(base / name, tokenizer_only)
    run, _ = _make_run(tmp_path / "r", {"r": 2, "lora_alpha": 4, "target_modules": ["qkv_proj"]}, base=base,
                       tokenizer=tokenizer_only)
    export(run, "gguf", tmp_path / "g", outtype="f32", verbose=False)
    (path,) = (tmp_path / "g").glob("*.gguf")
    fields, _ = _fields(path)
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"] is SENTENCEPIECE_LAYOUTS[layout][2]
    tok = load_run_tokenizer(run)
    pieces = tok.convert_ids_to_tokens(tok("<|user|>\nWho", add_special_tokens=False)["input_ids"])
    assert pieces[0] == "<|user|>" and pieces[1].startswith("\u2581") is SENTENCEPIECE_LAYOUTS[layout][2]
    if SENTENCEPIECE_LAYOUTS[layout][0]:  # the run trains on the ids the base's tokenizer.json defines
        text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        shipped = Tokenizer.from_file(str(base / "tokenizer.json"))
        assert tok(text, add_special_tokens=False)["input_ids"] == shipped.encode(text, add_special_tokens=False).ids


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(SENTENCEPIECE_LAYOUTS))
def test_llama_cpp_runs_a_sentencepiece_phi3_like_transformers(layout, tmp_path):
    """Phi-3's real tokenizer kind: tokenizer.model is written as a "llama" vocabulary, llama.cpp tokenizes the chat
    prompt to training's ids (one BOS, chat tokens as single ids, the whitespace around them as transformers puts it),
    and its logits and greedy tokens equal transformers' as for the demo model."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (README: how to build it)",
                                    exc_type=ImportError)
    pytest.importorskip("sentencepiece", reason="sentencepiece is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phitune.generation.generate import build_prompt_ids

    base = _sentencepiece_phi3(tmp_path / "base", layout)
    run, _ = _make_run(tmp_path / "r", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}, base=base)
    export(run, "gguf", tmp_path / "g", outtype="f32", verbose=False)
    (path,) = (tmp_path / "g").glob("*.gguf")
    fields, _ = _fields(path)
    assert fields["tokenizer.ggml.model"] == "llama" and "phi-3" in fields["general.name"].lower()
    # the "▁" after a chat token as the run's tokenizer puts it: Phi-3's own files always, tokenizer.model alone only
    # when legacy; llama.cpp follows this
    assert fields["tokenizer.ggml.add_space_prefix"] is SENTENCEPIECE_LAYOUTS[layout][2]
    phitune.merge(run, tmp_path / "merged", dtype="float32", verbose=False)
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    stops = [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|assistant|>", "<|end|>")]
    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, type_k=0, type_v=0, n_threads=2)
    try:
        for messages in (CHAT, CHAT[1:2], CHAT[1:]):
            ids = build_prompt_ids(tok, messages)
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            assert ids.count(1) == 1 and set(stops[1:]) <= set(ids)
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids, (
                tok.convert_ids_to_tokens(ids), [llm.detokenize([i], special=True) for i in
                                                 llm.tokenize(text.encode(), add_bos=True, special=True)])
        ids = build_prompt_ids(tok, CHAT)
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0].numpy()
        llm.eval(ids)
        theirs = np.array(llm.scores[:len(ids)])
        sigma = _llama_cpp_sigma(model.config.to_dict(), ours)
        assert LLAMA_CPP_TOL >= 5 * sigma, sigma
        assert np.abs(theirs - ours).max() <= LLAMA_CPP_TOL, (np.abs(theirs - ours).max(), sigma)
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=stops,
                             pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        greedy = out.sequences[0, len(ids):].tolist()
        margins = [float(torch.topk(s[0], 2).values.diff().abs()) for s in out.scores]
        n = next((i for i, m in enumerate(margins) if m <= 2 * LLAMA_CPP_TOL), len(greedy))
        assert n > 0, margins
        llm.reset()
        got = []
        for token in llm.generate(ids, temp=0.0, top_k=1):
            got.append(token)
            if token in stops or len(got) == len(greedy):
                break
        assert got[:n] == greedy[:n], (got, greedy, margins)
    finally:
        llm.close()


# --- a real llama.cpp: f16 and q8_0 ---------------------------------------------------------------------------------
# Rounded weights move the logits far more than float32 arithmetic, so these exports get their own estimate, in the
# same form as the one above. ggml's CPU matmul rounds both operands to the weight's type first (vec_dot_type: an f16
# weight takes f16 activations, a q8_0 weight q8_0 activations in blocks of 32), so each product w*x carries two
# independent roundings. With per-element bounds b_w, b_x, one output y = sum_j w_j x_j of a reduction of length n is
# off by about sqrt(n) * sqrt(rms(b_w)^2 rms(x)^2 + rms(w)^2 rms(b_x)^2), while |y| is about sqrt(n) rms(w) rms(x):
# the sqrt(n) cancels and the matmul's relative error is eps = sqrt(e_w^2 + e_x^2), e = rms(bound) / rms(value).
# f16: e = 2^-11 (half an ulp). q8_0: bound = d (0.5 + 127 * 2^-11) per block, d = block max / 127 (the block's step,
# plus 127 times the rounding of d itself to f16), e from the exported weights and from the activations transformers
# feeds each Linear. As above, relative errors of the matmuls (4 a layer, lm_head, and the embedding lookup with its
# weight rounding only) reach the logits at their size and add in quadrature:
# sigma = rms(logits) * sqrt(sum eps^2), the float32 sigma added in quadrature; tolerance 5 sigma as above. The bounds
# are maxima (a uniform rounding error's rms is bound / sqrt 3); measured on the demo run with llama-cpp-python 0.3.36
# built as in the README: f16 0.0102 = 1.5 sigma, q8_0 0.294 = 1.8 sigma.


def _rounding_bound_ratio(x: torch.Tensor, outtype: str) -> float:
    """rms of the rounding bound of ``x`` stored as ``outtype`` (rows in blocks of 32 for q8_0) over rms of ``x``."""
    x = x.detach().float().reshape(-1, x.shape[-1])
    if outtype == "f16":
        return 2.0 ** -11
    blocks = x.reshape(x.shape[0], -1, 32)
    bound = blocks.abs().amax(-1) / 127 * (0.5 + 127 * 2.0 ** -11)
    return float(bound.pow(2).mean().sqrt() / blocks.pow(2).mean().sqrt())


def _quantized_sigma(model, ids: list[int], outtype: str) -> tuple[float, np.ndarray]:
    """The estimate above for ``model`` (float32, merged) run on ``ids``; also returns transformers' logits."""
    eps2, hooks = [], []

    def record(module, args):
        eps2.append(_rounding_bound_ratio(module.weight, outtype) ** 2 + _rounding_bound_ratio(args[0], outtype) ** 2)

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].numpy()
    finally:
        for hook in hooks:
            hook.remove()
    layers = model.config.num_hidden_layers
    assert len(eps2) == 4 * layers + 1, len(eps2)  # qkv, o, gate_up, down per layer, lm_head
    eps2.append(_rounding_bound_ratio(model.get_input_embeddings().weight, outtype) ** 2)
    rms = float(np.sqrt((logits ** 2).mean()))
    return float(np.sqrt(rms ** 2 * sum(eps2) + _llama_cpp_sigma(model.config.to_dict(), logits) ** 2)), logits


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_llama_cpp_runs_f16_and_q8_0_ggufs_within_their_rounding(outtype, demo_run, tmp_path):
    """llama.cpp's logits of an f16 / q8_0 export are within 5 sigma of the rounding estimate above of transformers'
    float32 ones, and its greedy choice is transformers' wherever the top two logits are further apart than that."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (README: how to build it)",
                                    exc_type=ImportError)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phitune.generation.generate import build_prompt_ids

    export(demo_run["run"], "gguf", tmp_path / "g", outtype=outtype, verbose=False)
    (path,) = (tmp_path / "g").glob("*.gguf")
    phitune.merge(demo_run["run"], tmp_path / "merged", dtype="float32", verbose=False)
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    prompt = build_prompt_ids(tok, CHAT)
    stops = [1024, 1025, 1031]
    with torch.no_grad():
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=stops,
                                pad_token_id=0)[0, len(prompt):].tolist()
    ids = prompt + greedy  # teacher-forced: every position compared, not only those before a first divergence
    sigma, ours = _quantized_sigma(model, ids, outtype)
    tol = 5 * sigma
    theirs = _llama_cpp_logits(llama_cpp, path, ids)
    diff = float(np.abs(theirs - ours).max())
    assert diff <= tol, (diff, sigma)
    assert diff > LLAMA_CPP_TOL  # the weights really were rounded: not an f32 file
    top2 = np.sort(ours, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * tol
    assert clear[len(prompt) - 1:].sum() >= len(greedy) // 2, (top2, tol)
    assert np.array_equal(theirs.argmax(-1)[clear], ours.argmax(-1)[clear])
