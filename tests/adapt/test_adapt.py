"""phitune.adapt against peft on tiny random models: same parameters, same loss/gradients, adapters in both
directions."""

import json

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM  # noqa: E402
from zoo import build  # noqa: E402

from phitune import lora  # noqa: E402
from phitune.adapt import (  # noqa: E402
    LoraConfig, LoraReport, add_lora, adapter_state_dict, load_adapter, load_adapter_state_dict, merge_lora,
    merge_lora_checked, save_adapter,
)
from phitune.errors import AdapterError, ConfigError  # noqa: E402

torch.set_num_threads(1)


def phi3(gqa: bool = False) -> Phi3ForCausalLM:
    """Mini-like (4/4 heads) or medium-like GQA (4 q heads, 2 kv heads: q/k/v = 64/32/32), from the zoo."""
    return build("phi3-medium" if gqa else "phi3-mini").eval()


def qwen2() -> Qwen2ForCausalLM:  # q/k/v carry biases, unlike Phi-3
    return build("qwen2").eval()


IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model):
    return model(input_ids=IDS).logits.float()


def peft_model(base, cfg: dict):
    return peft.get_peft_model(base, peft.LoraConfig(**cfg)).eval()


CASES = {
    "phi3-mini-all-linear": (phi3, dict(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")),
    "phi3-gqa-patterns-lm_head": (lambda: phi3(gqa=True), dict(
        r=4, lora_alpha=16, target_modules=["qkv_proj", "o_proj", "down_proj"], rank_pattern={"o_proj": 2},
        alpha_pattern={"layers.1.self_attn.qkv_proj": 3}, modules_to_save=["lm_head"])),
    "qwen2-bias-embed": (qwen2, dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                     bias="lora_only", modules_to_save=["embed_tokens"], use_rslora=True)),
    "phi3-embedding-target": (phi3, dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "o_proj"])),
}


@pytest.mark.parametrize("case", CASES)
def test_trainable_parameters_and_file_layout_match_peft(case, tmp_path):
    make, cfg = CASES[case]
    ours, theirs = make(), peft_model(make(), cfg)
    report = add_lora(ours, cfg)
    assert isinstance(report, LoraReport) and str(report).startswith("LoRA on ")
    assert report.trainable_params == theirs.get_nb_trainable_parameters()[0]
    assert report.trainable_params == sum(p.numel() for p in ours.parameters() if p.requires_grad)
    save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    shapes = lambda d: {k: tuple(v.shape) for k, v in load_file(d / "adapter_model.safetensors").items()}  # noqa: E731
    assert shapes(tmp_path / "ours") == shapes(tmp_path / "peft")
    assert report.adapter_bytes == sum(t.numel() * t.element_size()
                                       for t in load_file(tmp_path / "ours" / "adapter_model.safetensors").values())


@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradients_match_peft(case):
    make, cfg = CASES[case]
    theirs = peft_model(make(), {**cfg, "init_lora_weights": False})
    with torch.no_grad():  # modules_to_save copies start equal to the base; perturb them so they matter
        for n, p in theirs.named_parameters():
            if p.requires_grad and ("modules_to_save" in n or n.endswith("bias")):
                p.add_(torch.randn_like(p) * 0.1)
    ours = make()
    add_lora(ours, cfg)
    load_adapter_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    ours.train(), theirs.train()
    loss_ours, loss_theirs = ours(input_ids=IDS, labels=IDS).loss, theirs(input_ids=IDS, labels=IDS).loss
    loss_ours.backward(), loss_theirs.backward()
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-5, atol=1e-6)
    their_grads = {k.replace(".default", "").replace("base_model.model.", "").replace("modules_to_save.", "")
                   .replace("base_layer.", "").replace("lora_embedding_", "lora_"): p.grad
                   for k, p in theirs.named_parameters() if p.requires_grad}
    our_grads = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    assert ({k.replace(".lora_A.weight", ".lora_A").replace(".lora_B.weight", ".lora_B") for k in their_grads}
            == set(our_grads))
    for k, g in their_grads.items():
        torch.testing.assert_close(our_grads[k.replace(".lora_A.weight", ".lora_A")
                                             .replace(".lora_B.weight", ".lora_B")],
                                   g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_per_slice_adapter_saves_as_fused_lora_that_peft_loads(use_rslora, tmp_path):
    cfg = dict(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"], use_rslora=use_rslora,
               init_lora_weights=False, modules_to_save=["lm_head", "embed_tokens"], task_type="CAUSAL_LM")
    model = phi3(gqa=True)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # stands in for a trained, saved-in-full head
    report = add_lora(model, cfg)
    assert "model.layers.0.self_attn.qkv_proj[q_proj,v_proj]" in report.modules
    assert "model.layers.0.mlp.gate_up_proj[up_proj]" in report.modules
    expected = logits(model)
    assert (expected - logits(phi3(gqa=True))).abs().max() > 1e-3  # the adapter matters
    save_adapter(model, tmp_path, base_model_name_or_path="tiny-phi3")
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "model.layers.0.self_attn.qkv_proj" in written["target_modules"]
    assert written["rank_pattern"]["model.layers.0.self_attn.qkv_proj"] == 4  # rank 2 per slice x 2 slices
    theirs = peft.PeftModel.from_pretrained(phi3(gqa=True), tmp_path).eval()
    torch.testing.assert_close(logits(theirs), expected, rtol=1e-5, atol=1e-5)
    # and back: a fresh model with the same config resumes from the folder (per-slice layers kept)
    again = phi3(gqa=True)
    add_lora(again, cfg)
    load_adapter(again, tmp_path, trainable=True)
    assert isinstance(again.model.layers[0].self_attn.qkv_proj, lora.MergedLinear)
    torch.testing.assert_close(logits(again), expected, rtol=1e-5, atol=1e-5)
    # onto a bare model it loads as one fused LoRA per module
    fused = phi3(gqa=True)
    load_adapter(fused, tmp_path)
    assert isinstance(fused.model.layers[0].self_attn.qkv_proj, lora.Linear)
    torch.testing.assert_close(logits(fused), expected, rtol=1e-5, atol=1e-5)


def test_per_slice_only_config_needs_no_patterns(tmp_path):
    model = phi3(gqa=True)
    add_lora(model, {"r": 2, "lora_alpha": 5, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False})
    save_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["rank_pattern"], written["alpha_pattern"]) == (4, 10, {}, {})
    theirs = peft.PeftModel.from_pretrained(phi3(gqa=True), tmp_path).eval()
    torch.testing.assert_close(logits(theirs), logits(model), rtol=1e-5, atol=1e-5)


def test_per_slice_trains_exactly_the_named_rows():
    model = phi3(gqa=True)  # q/k/v = 64/32/32 rows
    add_lora(model, {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj", "gate_proj"]})
    qkv, gate_up = model.model.layers[0].self_attn.qkv_proj, model.model.layers[0].mlp.gate_up_proj
    assert [n for n, p in model.named_parameters() if p.requires_grad and "layers.0." in n] == [
        "model.layers.0.self_attn.qkv_proj.lora_A", "model.layers.0.self_attn.qkv_proj.lora_B",
        "model.layers.0.mlp.gate_up_proj.lora_A", "model.layers.0.mlp.gate_up_proj.lora_B"]
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    rows = qkv.delta_weight().abs().sum(1)
    assert (rows[:64] > 0).all() and (rows[64:96] == 0).all() and (rows[96:] > 0).all()
    rows = gate_up.delta_weight().abs().sum(1)
    assert (rows[:128] > 0).all() and (rows[128:] == 0).all()
    assert qkv.weight.grad is None and gate_up.weight.grad is None


@pytest.mark.parametrize("case", ["phi3-mini-all-linear", "qwen2-bias-embed", "phi3-embedding-target"])
def test_peft_trained_adapter_loads_with_peft_logits(case, tmp_path):
    make, cfg = CASES[case]
    theirs = peft_model(make(), {**cfg, "init_lora_weights": False})
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad and ("modules_to_save" in n or n.endswith("bias")):
                p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(tmp_path / "st")
    ours = make()
    report = load_adapter(ours, tmp_path / "st")
    assert report.trainable_params == 0
    assert (logits(theirs) - logits(make())).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    # an older peft folder: adapter_model.bin, read with torch.load(weights_only=True)
    legacy = tmp_path / "bin"
    legacy.mkdir()
    (legacy / "adapter_config.json").write_text((tmp_path / "st" / "adapter_config.json").read_text())
    torch.save(load_file(tmp_path / "st" / "adapter_model.safetensors"), legacy / "adapter_model.bin")
    ours = make()
    load_adapter(ours, legacy)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)


def test_legacy_bin_with_code_is_refused(tmp_path):
    save_adapter(_adapted(), tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1), "f": print}, tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterError, match="never unpickles"):
        load_adapter(phi3(), tmp_path)


def _adapted(**extra):
    model = phi3()
    add_lora(model, {"r": 2, "lora_alpha": 4, "target_modules": ["qkv_proj", "o_proj"], "init_lora_weights": False,
                     **extra})
    return model


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj", "down_proj"], ["embed_tokens", "qkv_proj"]])
def test_merge_gives_plain_model_with_same_logits(targets, tmp_path):
    model = phi3(gqa=True)
    add_lora(model, {"r": 2, "lora_alpha": 4, "init_lora_weights": False, "target_modules": targets})
    expected = logits(model)
    assert (expected - logits(phi3(gqa=True))).abs().max() > 1e-3  # the adapter matters
    merged, diff = merge_lora_checked(model, IDS)
    assert merged is model and diff < 1e-4, diff
    assert not [m for m in model.modules() if isinstance(m, (lora.Linear, lora.MergedLinear, lora.Embedding))]
    assert (type(model.model.layers[0].self_attn.qkv_proj) is nn.Linear
            and type(model.model.embed_tokens) is nn.Embedding)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    max_diff = (logits(reloaded) - expected).abs().max().item()
    print(f"merge -> save_pretrained -> AutoModelForCausalLM: max logit diff {max_diff:.2e}")
    assert max_diff < 1e-4
    assert merge_lora(model) is model  # repeatable no-op


def test_merge_folds_in_float32_and_casts_once():
    model = phi3().to(torch.bfloat16)
    add_lora(model, {"r": 2, "lora_alpha": 4, "target_modules": ["o_proj"], "init_lora_weights": False},
             lora_dtype=torch.float32)
    layer = model.model.layers[0].self_attn.o_proj
    assert layer.lora_A.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    model(input_ids=IDS)  # mixed dtypes run without autocast
    want = (layer.weight.float() + layer.delta_weight()).to(torch.bfloat16)
    merge_lora(model)
    assert torch.equal(model.model.layers[0].self_attn.o_proj.weight, want)


def test_report_counts_and_lm_head_excluded_from_all_linear():
    model = phi3()
    report = add_lora(model, {"r": 4, "target_modules": "all-linear"})
    assert report.num_modules == 8 and not any("lm_head" in m for m in report.modules)
    lora_params = 2 * (4 * 64 + 192 * 4 + 4 * 64 + 64 * 4 + 4 * 64 + 256 * 4 + 4 * 128 + 64 * 4)
    assert report.trainable_params == lora_params and report.adapter_bytes == 4 * lora_params
    assert report.total_params == sum(p.numel() for p in model.parameters())


def test_adapter_state_dict_is_what_save_writes(tmp_path):
    model = _adapted(modules_to_save=["lm_head"])
    save_adapter(model, tmp_path)
    on_disk = load_file(tmp_path / "adapter_model.safetensors")
    sd = adapter_state_dict(model)
    assert sd.keys() == on_disk.keys() and all(torch.equal(sd[k], on_disk[k]) for k in sd)
    assert "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight" in sd
    assert "base_model.model.lm_head.weight" in sd


def test_a_failed_save_leaves_the_previous_adapter_files_intact(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    from phitune.errors import StorageError

    model = _adapted()
    save_adapter(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a header")
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(StorageError, match="cannot write the adapter weights: the disk is full"):
        save_adapter(_adapted(), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp file left either


def test_exclude_modules_and_regex_targets():
    model = phi3()
    report = add_lora(model, {"target_modules": r".*\.(qkv_proj|o_proj)",
                              "exclude_modules": ["layers.1.self_attn.o_proj"]})
    assert sorted(report.modules) == ["model.layers.0.self_attn.o_proj", "model.layers.0.self_attn.qkv_proj",
                                      "model.layers.1.self_attn.qkv_proj"]
    model = phi3()
    report = add_lora(model, {"target_modules": ["q_proj", "k_proj", "v_proj"], "layers_to_transform": [1]})
    assert report.modules == ["model.layers.1.self_attn.qkv_proj[q_proj,k_proj,v_proj]"]


def test_gaussian_init():
    model = phi3()
    add_lora(model, {"r": 4, "target_modules": ["o_proj"], "init_lora_weights": "gaussian"})
    layer = model.model.layers[0].self_attn.o_proj
    assert torch.all(layer.lora_B == 0) and 0.15 < layer.lora_A.std().item() < 0.35  # std 1/r = 0.25


# ------------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("cfg, match", [
    ({"target_modules": "all-linear", "lora_alpah": 16}, "unknown key 'lora_alpah'.*did you mean 'lora_alpha'"),
    ({"target_modules": "all-linear", "r": 0}, r"peft_config\.r: must be a positive int"),
    ({"target_modules": "all-linear", "r": 8.0}, r"peft_config\.r"),
    ({"target_modules": "all-linear", "lora_alpha": "32"}, r"peft_config\.lora_alpha"),
    ({"target_modules": "all-linear", "lora_dropout": 1.0}, r"lora_dropout: must be a number in \[0, 1\)"),
    ({"target_modules": "all-linear", "bias": "some"}, r"peft_config\.bias"),
    ({"target_modules": "all-linear", "init_lora_weights": "pissa"}, "supports True, False and 'gaussian'"),
    ({"target_modules": "all-linear", "use_dora": True}, "use_dora=True: phitune does not implement"),
    ({"target_modules": "all-linear", "task_type": "CAUSAL"}, "did you mean 'CAUSAL_LM'"),
    ({"r": 8}, "target_modules: not set"),
    ({"target_modules": "(unclosed"}, "not a valid regular expression"),
    ({"target_modules": ["qkv_prj"]}, r"'qkv_prj' matches no .*did you mean 'qkv_proj'.*Linear layers in this model: "
                                      r"down_proj, gate_up_proj, lm_head, o_proj, qkv_proj"),
    ({"target_modules": ["qkv_proj", "c_attn"]}, "'c_attn' matches no"),
    ({"target_modules": "all-linear", "modules_to_save": ["head"]}, "modules_to_save: 'head' matches no module"),
    ({"target_modules": ["q_proj", "k_proj"], "rank_pattern": {"k_proj": 2}}, "different r or lora_alpha"),
])
def test_config_errors(cfg, match):
    model = phi3()
    with pytest.raises(ConfigError, match=match):
        add_lora(model, cfg)
    assert not any(p.requires_grad is False for p in model.parameters())  # nothing touched


def test_direct_config_validation():
    with pytest.raises(ConfigError, match="lora_alpha: must be a number"):
        LoraConfig(target_modules="all-linear", lora_alpha="32")
    assert LoraConfig(target_modules=["q_proj"], lora_alpha=16.5).lora_alpha == 16.5
    peft_cfg = peft.LoraConfig(r=4, target_modules=["qkv_proj"])
    assert add_lora(phi3(), peft_cfg).num_modules == 2  # a peft.LoraConfig object is accepted too


def test_fused_slice_target_on_model_without_fused_module():
    class TwoLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc_in, self.fc_out = nn.Linear(8, 16), nn.Linear(16, 8)

    with pytest.raises(ConfigError, match="slice of Phi-3's fused 'gate_up_proj'"
                                          ".*neither 'gate_proj' nor 'gate_up_proj'"
                                          ".*Linear layers in this model: fc_in, fc_out"):
        add_lora(TwoLayer(), {"target_modules": ["gate_proj"]})


def test_llama_style_names_on_qwen2_are_plain_modules():
    report = add_lora(qwen2(), {"target_modules": ["q_proj", "gate_proj"]})
    assert report.modules == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj",
                              "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.gate_proj"]


def test_adding_twice_is_an_error():
    model = _adapted()
    with pytest.raises(AdapterError, match="already has LoRA layers"):
        add_lora(model, {"target_modules": ["o_proj"]})


def _rewrite(folder, edit):
    path = folder / "adapter_model.safetensors"
    from safetensors.torch import save_file
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_strict_load_errors(tmp_path):
    save_adapter(_adapted(), tmp_path)
    key = "base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"
    _rewrite(tmp_path, lambda t: t.pop(key))
    with pytest.raises(AdapterError, match=r"no weights for module 'model\.layers\.1\.self_attn\.o_proj'"):
        load_adapter(phi3(), tmp_path)

    save_adapter(_adapted(), tmp_path)
    _rewrite(tmp_path, lambda t: t.update({key: torch.zeros(3, 64)}))
    with pytest.raises(AdapterError, match=r"'model\.layers\.1\.self_attn\.o_proj': lora_A\.weight has shape "
                                           r"\(3, 64\) in the adapter but \(2, 64\) in the model "
                                           r"\(a different LoRA rank\)"):
        load_adapter(phi3(), tmp_path)

    save_adapter(_adapted(), tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"base_model.model.model.layers.0.mlp.down_proj.lora_A.weight":
                                           torch.zeros(2, 128)}))
    with pytest.raises(AdapterError, match=r"weights for 'model\.layers\.0\.mlp\.down_proj'"):
        load_adapter(phi3(), tmp_path)

    with pytest.raises(AdapterError, match="does not fit this model.*Linear layers in this model"):
        save_adapter(_adapted(), tmp_path)
        load_adapter(qwen2(), tmp_path)  # names qkv_proj, which Qwen2 lacks

    with pytest.raises(AdapterError, match="adapter_config.json: not found"):
        load_adapter(phi3(), tmp_path / "nowhere")


def test_dense_fused_b_does_not_load_into_per_slice_layers(tmp_path):
    save_adapter(_adapted(), tmp_path)  # one LoRA on the whole qkv_proj: dense B
    model = phi3()
    add_lora(model, {"r": 1, "target_modules": ["q_proj", "v_proj", "o_proj"], "rank_pattern": {"o_proj": 2}})
    with pytest.raises(AdapterError, match="not block-structured"):
        load_adapter(model, tmp_path)
