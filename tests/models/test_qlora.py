"""QLoRA on CPU: LoRA on a bitsandbytes 4-bit base trains, saves/loads in the PEFT format (peft agrees), merges into
a 16/32-bit model with the reported logit parity, and refuses clearly what cannot work."""

import json
import sys

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from helpers import ROOT, losses, tiny_config  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from phitune import lora  # noqa: E402
from phitune.adapt import merge_checked  # noqa: E402
from phitune.lora import quantized as quant  # noqa: E402
from phitune.models.loading import prepare_kbit_training  # noqa: E402
from phitune.adapt import add_lora, load_adapter, merge_lora, merge_lora_checked, save_adapter  # noqa: E402
from phitune.config import build_model_config, load_config  # noqa: E402
from phitune.errors import AdapterError, ConfigError  # noqa: E402

torch.set_num_threads(1)
IDS = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
Q4 = {"compute_dtype": "float32"}  # float32 compute on CPU: exact comparisons against dense references


def load_4bit(folder, quant_type="nf4", double_quant=True, dtype=torch.float32):
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                             bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=cfg, dtype=dtype).eval()


@torch.no_grad()
def logits(model, ids=IDS):
    return model(input_ids=ids).logits.float()


EPS32 = torch.finfo(torch.float32).eps


def float32_tolerance(model, reference) -> float:
    """Max |difference| between two float32 evaluations of the same network that differ only in the order of their
    sums (another kernel, LoRA added before or after the base matmul, W + ΔW merged): each matmul rounds within
    eps x its reduction length (relative), compounded over the layers, times the size of the logits."""
    c = model.config
    longest = max(c.hidden_size, c.intermediate_size)
    return EPS32 * longest * (c.num_hidden_layers + 1) * float(reference.abs().max())


def peft_model(base, adapter_dir):
    """peft's model of ``adapter_dir`` on the same 4-bit kernel path as phitune's (see quant.keep_float_4bit_path:
    on AVX512-BF16 CPUs bitsandbytes would otherwise run its bfloat16 inference kernel under no_grad)."""
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    quant.keep_float_4bit_path(model)
    return model


def quantized_linear(in_f=64, out_f=96, bias=True, quant_type="nf4", seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(in_f, out_f, bias=bias)
    q = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=torch.float32, quant_type=quant_type)
    q.load_state_dict(dense.state_dict())
    return q.to("cpu")  # .to(device) quantizes


def dense_copy(q) -> nn.Linear:
    d = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
    with torch.no_grad():
        d.weight.copy_(quant.dequantize_weight(q))
        if q.bias is not None:
            d.bias.copy_(q.bias)
    return d


# --- layers -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_linear4bit_is_the_dense_lora_layer_on_the_dequantized_weight(quant_type):
    q = quantized_linear(quant_type=quant_type)
    ours = lora.Linear4bit.from_linear(q, r=4, lora_alpha=8)
    ref = lora.Linear.from_linear(dense_copy(q), r=4, lora_alpha=8, lora_dtype=torch.float32)
    with torch.no_grad():
        ours.lora_B.normal_()
        ref.lora_A.copy_(ours.lora_A), ref.lora_B.copy_(ours.lora_B)
    assert ours.weight is q.weight and ours.lora_A.dtype == torch.float32 and not ours.weight.requires_grad
    assert [n for n, _ in ours.named_parameters()] == ["weight", "bias", "lora_A", "lora_B"]  # base names kept
    x = torch.randn(2, 5, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(ours(x), ref(x2), rtol=1e-5, atol=1e-5)
    ours(x).square().sum().backward()
    ref(x2).square().sum().backward()
    for a, b in [(ours.lora_A, ref.lora_A), (ours.lora_B, ref.lora_B), (x, x2)]:
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.delta_weight(), ref.delta_weight())


def test_merged_linear4bit_per_slice_matches_the_dense_merged_linear():
    q = quantized_linear(64, 64 + 32 + 32, bias=False)
    kw = dict(r=2, lora_alpha=4, enable_lora=[True, False, True], out_splits=[64, 32, 32])
    ours = lora.MergedLinear4bit.from_linear(q, **kw)
    ref = lora.MergedLinear.from_linear(dense_copy(q), lora_dtype=torch.float32, **kw)
    assert ours.lora_A.shape == ref.lora_A.shape == (4, 64) and ours.lora_B.shape == ref.lora_B.shape == (96, 2)
    with torch.no_grad():
        ours.lora_B.normal_()
        ref.lora_A.copy_(ours.lora_A), ref.lora_B.copy_(ours.lora_B)
    x = torch.randn(3, 64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    delta = ours.delta_weight()
    assert delta[64:96].abs().max() == 0 and delta[:64].abs().max() > 0  # the k slice is not adapted
    dense = ours.to_dense(dense_copy(q))
    assert isinstance(dense, lora.MergedLinear) and dense.lora_A is ours.lora_A
    torch.testing.assert_close(dense(x), ref(x))


@pytest.mark.parametrize("merged", [False, True], ids=["Linear4bit", "MergedLinear4bit"])
def test_fused_4bit_lora_branch_gives_the_module_path_output_and_gradients(merged):
    """QLoRA layers get a fused LoRA branch too (they once got none of the fused functions: phitune plan showed
    38.9 GiB of activations for QLoRA on Phi-3-mini at batch 4 against 26.8 for LoRA)."""
    from phitune.training.fast import fused

    if merged:
        q = quantized_linear(64, 128, bias=False)
        layer = lora.MergedLinear4bit.from_linear(q, r=2, lora_alpha=4, enable_lora=[True, False, True],
                                                  out_splits=[64, 32, 32])
    else:
        layer = lora.Linear4bit.from_linear(quantized_linear(), r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 64, requires_grad=True)
    expected = layer(x)
    expected.square().sum().backward()
    grads = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)]
    for t in (x, layer.lora_A, layer.lora_B):
        t.grad = None
    assert fused.install(layer)["lora_linear_4bit"] == 1
    got = layer(x)
    got.square().sum().backward()
    # float32 throughout; the fused branch sums the same products in another order: a few ulps x the row length
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for t, g in zip((x, layer.lora_A, layer.lora_B), grads):
        torch.testing.assert_close(t.grad, g, rtol=1e-4, atol=1e-5)
    assert fused.uninstall(layer) == 1 and type(layer) in (lora.Linear4bit, lora.MergedLinear4bit)


def test_fused_swiglu_mlp_on_a_4bit_down_proj_gives_the_module_path_output_and_gradients():
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    from phitune.training.fast import fused

    mlp = Phi3MLP(Phi3Config(hidden_size=64, intermediate_size=64))
    mlp.gate_up_proj = lora.Linear4bit.from_linear(quantized_linear(64, 128, bias=False, seed=1), r=4, lora_alpha=8)
    mlp.down_proj = lora.Linear4bit.from_linear(quantized_linear(64, 64, bias=False, seed=2), r=4, lora_alpha=8)
    with torch.no_grad():
        mlp.down_proj.lora_B.normal_()
        mlp.gate_up_proj.lora_B.normal_()
    x = torch.randn(3, 4, 64, requires_grad=True)
    params = (x, mlp.down_proj.lora_A, mlp.down_proj.lora_B, mlp.gate_up_proj.lora_A)
    expected = mlp(x)
    expected.square().sum().backward()
    grads = [t.grad.clone() for t in params]
    for t in params:
        t.grad = None
    counts = fused.install(mlp)
    assert counts["swiglu_mlp"] == 1 and counts["lora_linear_4bit"] == 2
    got = mlp(x)
    got.square().sum().backward()
    # float32; backward dequantizes the same 4-bit weight again, so only the summation order differs: a few eps per
    # term of the longest reduction (2 x 64 rows of gate_up, then 64 of down), relative to the largest gradient
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    eps = torch.finfo(torch.float32).eps
    for t, g in zip(params, grads):
        torch.testing.assert_close(t.grad, g, rtol=0, atol=4 * eps * 192 * float(g.abs().max()))


def test_lora_on_4bit_runs_under_bf16_autocast_with_float32_factors():
    q = quantized_linear()
    layer = lora.Linear4bit.from_linear(q, r=4, lora_alpha=8, lora_dropout=0.1)
    layer.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(4, 64))
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad is not None


def test_merging_into_4bit_weights_is_refused_with_a_clear_message():
    layer = lora.Linear4bit.from_linear(quantized_linear(), r=4)
    with pytest.raises(RuntimeError, match="cannot merge LoRA into 4-bit weights.*phitune.merge"):
        layer.merge()
    with pytest.raises(ValueError, match="merge_weights=True would merge on eval"):
        lora.Linear4bit.from_linear(quantized_linear(), r=4, merge_weights=True)
    with pytest.raises(ValueError, match="needs a quantized bitsandbytes Linear4bit"):
        lora.Linear4bit.from_linear(nn.Linear(4, 4), r=2)


# --- adapt on a 4-bit model: peft agrees ------------------------------------------------------------------------------

CASES = {
    "all-linear": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "per-slice": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "o_proj"]),
}


@pytest.mark.parametrize("case", CASES)
def test_adapter_on_a_4bit_base_loads_in_peft_with_the_same_logits(case, tiny_model_dir, tmp_path):
    cfg = {**CASES[case], "init_lora_weights": False}  # nonzero B so the adapter changes the logits
    ours = load_4bit(tiny_model_dir)
    torch.manual_seed(0)
    report = add_lora(ours, cfg)
    kinds = {type(ours.get_submodule(n.split("[")[0])).__name__ for n in report.modules}
    assert kinds <= {"Linear4bit", "MergedLinear4bit"} and kinds
    assert all(p.dtype == torch.float32 for n, p in ours.named_parameters() if "lora_" in n)
    save_adapter(ours, tmp_path / "ours")
    theirs = peft_model(load_4bit(tiny_model_dir), tmp_path / "ours")
    reference = logits(theirs)
    tol = float32_tolerance(ours, reference)
    assert (logits(ours) - reference).abs().max() < tol
    assert (logits(ours) - logits(load_4bit(tiny_model_dir))).abs().max() > 1e-3  # the adapter matters

    # and back: peft's adapter saved from a 4-bit base loads into ours
    theirs.save_pretrained(tmp_path / "peft")
    again = load_4bit(tiny_model_dir)
    load_adapter(again, tmp_path / "peft")
    assert (logits(again) - reference).abs().max() < tol


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_forward_is_as_close_to_the_dequantized_float_reference_as_bitsandbytes_own(quant_type):
    """The reference is x @ dequant(W).T + b in float64. phitune's 4-bit LoRA layer dequantizes and multiplies in
    the compute dtype (float32): within eps x K of it. bitsandbytes' own Linear4bit in eval mode without grad takes a
    bfloat16 CPU kernel on AVX512-BF16 CPUs (the dequantize path elsewhere); phitune must be at least as close."""
    in_f, out_f = 256, 96
    q = quantized_linear(in_f, out_f, quant_type=quant_type)
    w = quant.dequantize_weight(q).double()  # before any bitsandbytes forward could repack it
    x = torch.randn(7, in_f, generator=torch.Generator().manual_seed(3))
    reference = x.double() @ w.T + q.bias.double()
    magnitude = float((x.double().abs() @ w.abs().T).max())  # largest sum of |terms| of one output
    with torch.no_grad():
        ours = lora.Linear4bit.from_linear(q, r=0).eval()(x).double()
        q.eval()
        theirs = q(x).double()  # bitsandbytes' own inference path on this CPU
    err_ours, err_theirs = (ours - reference).abs().max().item(), (theirs - reference).abs().max().item()
    assert err_ours <= EPS32 * in_f * magnitude
    assert err_ours <= err_theirs + EPS32 * in_f * magnitude


def test_a_4bit_model_still_trains_after_an_evaluation(tiny_model_dir):
    """An evaluation (eval mode, no grad) must not switch the layers left without LoRA to a kernel without autograd
    (bitsandbytes' bfloat16 CPU kernel on AVX512-BF16 CPUs): the gradients after it are the ones before it."""
    model = load_4bit(tiny_model_dir)
    torch.manual_seed(0)
    add_lora(model, {**CASES["per-slice"], "init_lora_weights": False})  # gate_proj/down_proj stay plain 4-bit

    def grads():
        model.train()
        model.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        return [p.grad.clone() for n, p in model.named_parameters() if "lora_" in n]

    before = grads()
    logits(model.eval())
    for a, b in zip(grads(), before):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_trainable_parameters_match_peft_on_a_4bit_base(tiny_model_dir):
    cfg = CASES["all-linear"]
    ours = load_4bit(tiny_model_dir)
    report = add_lora(ours, cfg)
    theirs = peft.get_peft_model(load_4bit(tiny_model_dir), peft.LoraConfig(**cfg))
    trainable, total = theirs.get_nb_trainable_parameters()
    assert (report.trainable_params, report.total_params) == (trainable, total)


def test_merge_lora_refuses_a_4bit_model_before_any_work(tiny_model_dir):
    model = load_4bit(tiny_model_dir)
    add_lora(model, CASES["all-linear"])
    for fn in (merge_lora, lambda m: merge_lora_checked(m, IDS)):
        with pytest.raises(AdapterError, match="cannot merge LoRA into 4-bit weights.*16/32-bit base"):
            fn(model)
    assert any(isinstance(m, lora.Linear4bit) for m in model.modules())  # untouched


def test_dequantize_model_then_merge_gives_the_same_logits(tiny_model_dir):
    model = load_4bit(tiny_model_dir)
    torch.manual_seed(0)
    add_lora(model, {**CASES["per-slice"], "init_lora_weights": False})
    before = logits(model)
    merged, diff = merge_checked(model, IDS, dtype="float32")
    assert diff < float32_tolerance(merged, before) and (logits(merged) - before).abs().max() <= diff + 1e-6
    assert not any(quant.is_4bit_linear(m) or isinstance(m, lora.Linear4bit) for m in merged.modules())
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert getattr(merged.config, "quantization_config", None) is None


@pytest.mark.parametrize("reentrant", [False, True])
def test_kbit_preparation_gives_lora_gradients_with_checkpointing(tiny_model_dir, reentrant):
    model = load_4bit(tiny_model_dir, dtype=torch.float16)
    prepare_kbit_training(model, gradient_checkpointing=True,
                                gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.model.norm.weight.dtype == torch.float32  # fp16 norms upcast
    assert not any(p.requires_grad for p in model.parameters())
    add_lora(model, CASES["all-linear"], lora_dtype=torch.float32)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # B = 0 at init: A's gradient is 0
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_quantized_modules_cannot_be_saved_in_full_or_8bit_targeted(tiny_model_dir):
    model = load_4bit(tiny_model_dir)
    with pytest.raises(ConfigError, match="modules_to_save: 'model.layers.0.mlp' holds quantized weights"):
        add_lora(model, {"target_modules": ["o_proj"], "modules_to_save": ["layers.0.mlp"]})

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=False)

    with pytest.raises(ConfigError, match="8-bit layer.*load_in_4bit: true"):
        add_lora(Tiny(), {"target_modules": ["proj"]})


# --- config, loading, errors ------------------------------------------------------------------------------------------


def test_quantization_config_keys():
    cfg = build_model_config({"name_or_path": "m", "load_in_4bit": True,
                              "quantization": {"bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False,
                                               "bnb_4bit_compute_dtype": "float16"}})
    assert (cfg.quantization.type, cfg.quantization.double_quant, cfg.quantization.compute_dtype) == \
        ("fp4", False, "float16")
    default = build_model_config({"name_or_path": "m", "load_in_4bit": True}).quantization
    assert (default.type, default.double_quant, default.compute_dtype) == ("nf4", True, "auto")
    with pytest.raises(ConfigError,
                       match="model.quantization: unknown key 'dobule_quant' .did you mean 'double_quant'"):
        build_model_config({"name_or_path": "m", "quantization": {"dobule_quant": True}})
    with pytest.raises(ConfigError, match="model.quantization.type: expected 'nf4' | 'fp4'"):
        build_model_config({"name_or_path": "m", "quantization": {"type": "int4"}})
    with pytest.raises(ConfigError,
                       match="model.quantization.load_in_4bit: .*set model.load_in_4bit: true one level up"):
        build_model_config({"name_or_path": "m", "quantization": {"load_in_4bit": True}})
    note = build_model_config({"name_or_path": "m", "quantization": {"type": "fp4"}}).notes
    assert note == ["model.quantization: has no effect without model.load_in_4bit: true"]


def test_loading_4bit_without_bitsandbytes_says_how_to_install(tiny_model_dir, monkeypatch):
    from phitune.models.loading import load_model_and_tokenizer

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(ConfigError, match=r"model.load_in_4bit: true needs the bitsandbytes package.*"
                                          r"pip install phitune\[qlora\]"):
        load_model_and_tokenizer({"name_or_path": str(tiny_model_dir), "load_in_4bit": True}, device="cpu")
    model, _ = load_model_and_tokenizer({"name_or_path": str(tiny_model_dir)}, device="cpu")  # 16/32-bit still fine
    assert not quant.is_quantized(model)


def test_4bit_on_an_unsupported_device_is_refused(tiny_model_dir):
    from phitune.models.loading import load_model_and_tokenizer

    with pytest.raises(ConfigError, match="model.load_in_4bit: bitsandbytes 4-bit layers run on CUDA, XPU or the CPU"):
        load_model_and_tokenizer({"name_or_path": str(tiny_model_dir), "load_in_4bit": True}, device="meta")


def test_example_qlora_yaml_loads_and_is_the_cookbook_setup():
    cfg = load_config(ROOT / "examples" / "phi3-mini-qlora.yaml")
    assert cfg.model.name_or_path == "microsoft/Phi-3-mini-4k-instruct" and cfg.model.load_in_4bit
    q = cfg.model.quantization
    assert (q.type, q.double_quant, q.compute_dtype) == ("nf4", True, "bfloat16")
    assert cfg.training_config.bf16 and cfg.training_config.gradient_checkpointing
    assert cfg.peft_config.r == 16 and cfg.peft_config.lora_alpha == 16 and cfg.peft_config.lora_dropout == 0.05
    assert set(cfg.peft_config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"}
    assert load_config(cfg.to_dict()).model == cfg.model  # the resolved config round-trips


# --- the whole story: finetune -> peft -> merge -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir, chat_files, tmp_path_factory):
    from phitune.training.train import finetune

    out = tmp_path_factory.mktemp("qlora") / "run"
    cfg = tiny_config(tiny_model_dir, chat_files, out, max_steps=8, eval_strategy="no")
    cfg["model"].update(load_in_4bit=True, quantization=Q4)
    cfg["peft_config"]["target_modules"] = ["q_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
    return finetune(cfg)


def test_finetune_on_a_4bit_base_learns(qlora_run):
    curve = [loss for _, loss in losses(qlora_run.output_dir)]
    assert len(curve) == 8 and curve[-1] < curve[0] - 0.2
    model = qlora_run.model
    assert quant.is_quantized(model) and any(isinstance(m, lora.MergedLinear4bit) for m in model.modules())
    saved = load_config(qlora_run.output_dir / "phitune_config.yaml").model
    assert saved.load_in_4bit and saved.quantization.compute_dtype == "float32"


def test_trained_adapter_loads_in_peft_on_the_4bit_base(qlora_run, tiny_model_dir):
    model = qlora_run.model.eval()
    theirs = peft_model(load_4bit(tiny_model_dir), qlora_run.output_dir)
    reference = logits(theirs)
    assert (logits(model) - reference).abs().max() < float32_tolerance(model, reference)


@pytest.mark.parametrize("dequantize", [True, False])
def test_merge_after_qlora_gives_a_plain_model_within_the_reported_tolerance(qlora_run, tmp_path, dequantize):
    from phitune.runs.merge import merge
    from phitune.runs.folder import load_run_model

    out = merge(qlora_run.output_dir, tmp_path / "merged", dtype="float32", dequantize=dequantize, verbose=False)
    info = json.loads((out / "phitune_merge.json").read_text())
    reported = info["max_abs_logit_diff_vs_adapter"]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert not quant.is_quantized(merged) and merged.dtype == torch.float32
    adapter_4bit, _, _ = load_run_model(qlora_run.output_dir, device="cpu", dtype="float32")
    assert quant.is_quantized(adapter_4bit)
    diff = (logits(merged) - logits(adapter_4bit)).abs().max().item()
    if dequantize:  # the merged model computes what was trained
        tol = float32_tolerance(merged, logits(adapter_4bit))
        assert reported < tol and diff < tol
    else:  # the original weights: the quantization error shows, and is reported
        assert reported > 1e-3 and diff > 1e-3


def test_chat_and_evaluate_on_a_qlora_run(qlora_run):
    from phitune.generation.chat import chat
    from phitune.evals.evaluate import evaluate

    answer = chat(qlora_run.output_dir, prompt="Reverse: apple", greedy=True, max_new_tokens=4, stream=False,
                  device="cpu")
    assert isinstance(answer, str)
    metrics = evaluate(qlora_run.output_dir, device="cpu", verbose=False)
    assert metrics["eval_loss"] > 0 and metrics["eval_tokens"] > 0


def test_the_fast_path_fuses_4bit_lora_layers_with_the_plain_paths_loss_and_gradients(tiny_model_dir):
    """QLoRA layers take the fused LoRA functions (base dequantized in forward and again in backward) and keep the
    plain path's loss and LoRA gradients: the same float32 products summed in another order."""
    from phitune.training.fast import fused, fused_4bit
    from phitune.training.loss import apply_fast_path, forward_loss

    model = load_4bit(tiny_model_dir).train()
    torch.manual_seed(0)
    add_lora(model, {**CASES["all-linear"], "init_lora_weights": False})  # non-zero B: every factor gets gradient
    labels = IDS.clone()
    labels[:, :3] = -100
    batch = {"input_ids": IDS, "labels": labels}

    def loss_and_grads(**kw):
        model.zero_grad(set_to_none=True)
        out = forward_loss(model, batch, **kw)
        out.loss_sum.backward()
        return out.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref = loss_and_grads(fused_loss=False)
    apply_fast_path(model, None)
    kinds = {type(m) for m in model.modules()}
    assert fused_4bit.FusedLoRALinear4bit in kinds or fused_4bit.FusedLoRAMergedLinear4bit in kinds
    loss, got = loss_and_grads()
    cfg = model.config
    # float32 rounding of a reduction of length K, through every layer: a relative bound on each norm
    tol = EPS32 * max(cfg.hidden_size, cfg.intermediate_size) * 4 * cfg.num_hidden_layers
    assert abs(loss - ref_loss) <= tol * abs(ref_loss)
    assert got.keys() == ref.keys() and ref
    for name, g in ref.items():
        assert (got[name] - g).norm() <= tol * g.norm(), name
    assert fused.uninstall(model) > 0
    assert not any("Fused" in type(m).__name__ for m in model.modules())
