"""mark_only_lora_as_trainable, lora_state_dict and loralib's README recipe (spec 12.11-12.14, section 14)."""

import loralib
import pytest
import torch
import torch.nn as nn

import phitune.lora as lora


class Block(nn.Module):
    def __init__(self, lib=lora):
        super().__init__()
        self.emb = lib.Embedding(10, 8, r=2)
        self.q = lib.Linear(8, 8, r=2)
        self.k = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.qkv = lib.MergedLinear(8, 12, r=2, enable_lora=[True, False, True])
        self.register_buffer("attn_bias", torch.ones(3))

    def forward(self, idx):
        h = self.ln(self.emb(idx))
        return self.qkv(self.q(h) + self.k(h))


def _trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


LORA = ["emb.lora_A", "emb.lora_B", "q.lora_A", "q.lora_B", "qkv.lora_A", "qkv.lora_B"]


def test_mark_only_lora_as_trainable_modes():
    model = Block()
    lora.mark_only_lora_as_trainable(model)
    assert _trainable(model) == LORA
    lora.mark_only_lora_as_trainable(model, bias="all")
    assert _trainable(model) == sorted(LORA + ["k.bias", "ln.bias", "q.bias", "qkv.bias"])
    lora.mark_only_lora_as_trainable(model, bias="lora_only")
    assert _trainable(model) == sorted(LORA + ["q.bias", "qkv.bias"])


def test_bad_bias_mode_is_rejected_before_anything_is_frozen():
    model = Block()
    with pytest.raises(ValueError, match="'none', 'all', 'lora_only'"):
        lora.mark_only_lora_as_trainable(model, bias="foo")
    assert model.k.weight.requires_grad  # loralib: already frozen when it raises
    with pytest.raises(ValueError, match="bias"):
        lora.lora_state_dict(model, bias="foo")


def test_lora_parameters_frozen_beforehand_become_trainable():
    model = Block()
    for p in model.parameters():
        p.requires_grad = False
    lora.mark_only_lora_as_trainable(model)
    assert _trainable(model) == LORA  # loralib: stay frozen (its PR #125)


def test_lora_found_by_layer_type_not_by_substring():
    model = nn.Module()
    model.flora_head = nn.Linear(4, 4)  # contains 'lora_' but is no LoRA layer
    model.adapter = lora.Linear(4, 4, r=2)
    lora.mark_only_lora_as_trainable(model)
    assert _trainable(model) == ["adapter.lora_A", "adapter.lora_B"]
    assert list(lora.lora_state_dict(model)) == ["adapter.lora_A", "adapter.lora_B"]


def test_conv_bias_included_with_lora_only():
    model = nn.Sequential(lora.Conv2d(3, 4, 3, r=2), nn.Conv2d(4, 4, 1))
    lora.mark_only_lora_as_trainable(model, bias="lora_only")
    assert _trainable(model) == ["0.bias", "0.lora_A", "0.lora_B"]
    assert sorted(lora.lora_state_dict(model, bias="lora_only")) == ["0.bias", "0.lora_A", "0.lora_B"]


def test_lora_state_dict_modes_and_shared_storage():
    model = Block()
    sd = lora.lora_state_dict(model)
    assert sorted(sd) == LORA
    assert sd["q.lora_A"].data_ptr() == model.q.lora_A.data_ptr()
    all_keys = sorted(lora.lora_state_dict(model, bias="all"))
    assert all_keys == sorted(LORA + ["k.bias", "ln.bias", "q.bias", "qkv.bias"])  # no 'attn_bias' buffer
    assert sorted(lora.lora_state_dict(model, bias="lora_only")) == sorted(LORA + ["q.bias", "qkv.bias"])


def test_same_keys_as_loralib():
    ours, theirs = Block(lora), Block(loralib)
    for bias in ("none", "lora_only"):
        assert sorted(lora.lora_state_dict(ours, bias)) == sorted(loralib.lora_state_dict(theirs, bias))
    assert sorted(loralib.lora_state_dict(theirs, "all")) == sorted([*lora.lora_state_dict(ours, "all"), "attn_bias"])


# --- 12.13: the README save/load recipe, and loralib's README snippets run unchanged ------------------------------

def test_readme_round_trip_matches_outputs(tmp_path):
    torch.manual_seed(0)
    model = Block()
    lora.mark_only_lora_as_trainable(model, bias="lora_only")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    idx = torch.tensor([[1, 2, 3, 4]])
    model(idx).square().mean().backward()
    opt.step()
    torch.save({k: v for k, v in model.state_dict().items() if "lora_" not in k}, tmp_path / "pretrained.pt")
    torch.save(lora.lora_state_dict(model, bias="lora_only"), tmp_path / "lora.pt")
    fresh = Block()
    first = fresh.load_state_dict(torch.load(tmp_path / "pretrained.pt"), strict=False)
    second = fresh.load_state_dict(torch.load(tmp_path / "lora.pt"), strict=False)
    assert not first.unexpected_keys and not second.unexpected_keys
    torch.testing.assert_close(fresh(idx), model(idx))
    torch.testing.assert_close(fresh.eval()(idx), model.eval()(idx))


README_SNIPPETS = '''
import torch
import torch.nn as nn
import phitune.lora as lora

in_features, out_features, d_model = 12, 10, 8

# ===== Before =====
# layer = nn.Linear(in_features, out_features)
# ===== After ======
# Add a pair of low-rank adaptation matrices with rank r=16
layer = lora.Linear(in_features, out_features, r=16)

# ===== Before =====
# qkv_proj = nn.Linear(d_model, 3*d_model)
# ===== After =====
# Break it up (remember to modify the pretrained checkpoint accordingly)
q_proj = lora.Linear(d_model, d_model, r=8)
k_proj = nn.Linear(d_model, d_model)
v_proj = lora.Linear(d_model, d_model, r=8)
# Alternatively, use lora.MergedLinear (recommended)
qkv_proj = lora.MergedLinear(d_model, 3*d_model, r=8, enable_lora=[True, False, True])

class BigModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = lora.Linear(in_features, out_features, r=16)
        self.qkv_proj = lora.MergedLinear(out_features, 3*d_model, r=8, enable_lora=[True, False, True])
        self.head = nn.Linear(3*d_model, 2)

    def forward(self, x):
        return self.head(self.qkv_proj(self.layer(x)))

model = BigModel()
model.load_state_dict(torch.load(ckpt_pretrained), strict=False)
# This sets requires_grad to False for all parameters without the string "lora_" in their names
lora.mark_only_lora_as_trainable(model)
# Training loop
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
for batch in dataloader:
    optimizer.zero_grad()
    model(batch).square().mean().backward()
    optimizer.step()

# ===== Before =====
# torch.save(model.state_dict(), checkpoint_path)
# ===== After =====
torch.save(lora.lora_state_dict(model), checkpoint_path)

model2 = BigModel()
# Load the pretrained checkpoint first
model2.load_state_dict(torch.load(ckpt_pretrained), strict=False)
# Then load the LoRA checkpoint
model2.load_state_dict(torch.load(checkpoint_path), strict=False)
'''


def test_loralib_readme_snippets_run_unchanged(tmp_path):
    torch.manual_seed(0)
    shapes = {"layer.weight": (10, 12), "layer.bias": (10,), "qkv_proj.weight": (24, 10), "qkv_proj.bias": (24,),
              "head.weight": (2, 24), "head.bias": (2,)}
    pretrained = {k: torch.randn(shape) for k, shape in shapes.items()}
    torch.save(pretrained, tmp_path / "pretrained.pt")
    batches = [torch.randn(4, 12) for _ in range(3)]
    scope = {"ckpt_pretrained": tmp_path / "pretrained.pt", "checkpoint_path": tmp_path / "lora.pt",
             "dataloader": batches}
    torch.manual_seed(1)
    exec(README_SNIPPETS, scope)
    model, model2 = scope["model"], scope["model2"]
    assert sorted(torch.load(tmp_path / "lora.pt")) == ["layer.lora_A", "layer.lora_B",
                                                        "qkv_proj.lora_A", "qkv_proj.lora_B"]
    assert model.layer.lora_B.abs().sum() > 0  # it trained
    x = torch.randn(5, 12)
    torch.testing.assert_close(model2(x), model(x))
    torch.testing.assert_close(model2.eval()(x), model.eval()(x))
    # the same script against the real loralib gives the same outputs from the same seed
    torch.manual_seed(1)
    theirs = dict(scope, **{"checkpoint_path": tmp_path / "theirs.pt"})
    exec(README_SNIPPETS.replace("import phitune.lora as lora", "import loralib as lora"), theirs)
    torch.testing.assert_close(theirs["model2"].eval()(x), model.eval()(x))


# --- 12.14: loralib's merge-state pitfalls are gone ---------------------------------------------------------------

def test_loralib_merge_state_pitfalls_reproduced_by_loralib_but_fixed_here():
    x = torch.randn(3, 8)
    for lib, fixed in ((loralib, False), (lora, True)):
        torch.manual_seed(0)
        model = nn.Sequential(lib.Linear(8, 8, r=2))
        trained = nn.Sequential(lib.Linear(8, 8, r=2))
        trained.load_state_dict(model.state_dict())
        with torch.no_grad():
            trained[0].lora_B.normal_()
        expected = trained(x)
        model.eval()
        model.load_state_dict(lib.lora_state_dict(trained), strict=False)
        assert torch.allclose(model(x), expected, atol=1e-5) == fixed
        trained.eval()
        reloaded = nn.Sequential(lib.Linear(8, 8, r=2))
        reloaded.load_state_dict(trained.state_dict())
        assert torch.allclose(reloaded(x), expected, atol=1e-5) == fixed


def _block_with_adapters(seed=0):
    torch.manual_seed(seed)
    model = Block()
    with torch.no_grad():  # non-zero adapters everywhere (B starts at zero, Embedding's A too)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    return model


def _base_forward(model, idx):
    """The block computed with every LoRA layer's plain base op (what 'no adapter' means)."""
    h = model.ln(nn.functional.embedding(idx, model.emb.weight))
    h = nn.functional.linear(h, model.q.weight, model.q.bias) + model.k(h)
    return nn.functional.linear(h, model.qkv.weight, model.qkv.bias)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged-on-eval"])
def test_disable_adapters_runs_the_base_layers_and_restores_the_adapters(merged):
    model = _block_with_adapters()
    idx = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        tuned = model(idx)
        base = _base_forward(model, idx)  # before any merge: the weights are the base ones
        if merged:
            model.eval()  # loralib's merge_weights: eval() folds the adapters into the weights
            assert model.q.merged
        with lora.disable_adapters(model):
            assert torch.equal(model(idx), base)
            model.eval()  # must not fold the adapters back in while they are off
            assert torch.equal(model(idx), base) and not model.q.merged
        assert model.q.merged == merged and not model.q.adapter_disabled
        torch.testing.assert_close(model(idx), tuned, rtol=0, atol=1e-6)  # merged: one rounding of W + BA


def test_disable_adapters_nests_and_survives_an_exception():
    model = _block_with_adapters()
    idx = torch.tensor([[5, 6]])
    with torch.no_grad():
        tuned = model(idx)
        with pytest.raises(RuntimeError):
            with lora.disable_adapters(model):
                with lora.disable_adapters(model):
                    pass
                assert model.qkv.adapter_disabled  # the inner block restored the outer one's state
                raise RuntimeError("boom")
        assert not any(m.adapter_disabled for m in model.modules() if isinstance(m, lora.LoRALayer))
        assert torch.equal(model(idx), tuned)
