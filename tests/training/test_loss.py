"""forward_loss: the chunked head path equals model(...).logits (loss, accuracy, LoRA-style gradients)."""

import pytest
import torch
from transformers import Phi3Config, Phi3ForCausalLM

from phitune.training.loss import LossOutput, forward_loss


def tiny_phi3(vocab=97, **kw):
    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                     pad_token_id=0, use_cache=False, **kw)
    return Phi3ForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


def batch_of(B=2, T=12, vocab=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, -3:] = -100
    return {"input_ids": ids, "labels": labels}


def grads_of(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    out = forward_loss(model, batch, with_accuracy=True, **kw)
    out.loss_sum.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [None, 5])
def test_chunked_equals_plain(chunk):
    model = tiny_phi3()
    for n, p in model.named_parameters():  # frozen base, a few trainable tensors (as with LoRA) + lm_head
        p.requires_grad_("o_proj" in n or "lm_head" in n or "layers.0.mlp.down_proj" in n)
    batch = batch_of()
    ref, gref = grads_of(model, batch, fused_loss=False)
    got, ggot = grads_of(model, batch, chunk_tokens=chunk)
    assert isinstance(got, LossOutput)
    assert int(got.n_tokens) == int(ref.n_tokens) == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(got.loss_sum, ref.loss_sum, rtol=1e-5, atol=1e-5)
    assert int(got.n_correct) == int(ref.n_correct)
    assert gref.keys() == ggot.keys() and gref
    for n in gref:
        torch.testing.assert_close(ggot[n], gref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_sum_matches_hf_mean_loss():
    model = tiny_phi3()
    batch = batch_of()
    with torch.no_grad():
        out = forward_loss(model, batch)
        hf = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    torch.testing.assert_close(out.loss_sum / out.n_tokens, hf, rtol=1e-5, atol=1e-6)
    assert out.n_correct is None


def test_no_supervised_tokens_backward_works():
    model = tiny_phi3()
    batch = batch_of()
    batch["labels"][:] = -100
    out = forward_loss(model, batch)
    assert int(out.n_tokens) == 0 and float(out.loss_sum.detach()) == 0.0
    out.loss_sum.backward()


def test_logit_transform_falls_back_to_plain(monkeypatch):
    model = tiny_phi3()
    model.config.final_logit_softcapping = 30.0
    called = []
    orig = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: called.append(1) or orig(*a, **k))
    forward_loss(model, batch_of())
    assert called


def test_packed_4d_mask_equals_position_ids():
    from phitune.training.fast.attention import mask_matches_positions, model_inputs

    model = tiny_phi3()
    ids = torch.randint(1, 97, (1, 10), generator=torch.Generator().manual_seed(3))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    seg = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2]])
    mask = ((seg[:, :, None] == seg[:, None, :]) & torch.ones(10, 10, dtype=torch.bool).tril())[:, None]
    labels = ids.clone()
    labels[0, [0, 4, 7]] = -100
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": mask}
    assert mask_matches_positions(mask, pos)
    assert "attention_mask" not in model_inputs(model, batch)
    with torch.no_grad():
        fast = forward_loss(model, batch)
        plain = forward_loss(model, batch, fused_loss=False)
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(fast.loss_sum, plain.loss_sum, rtol=1e-5, atol=1e-5)
    # each packed sample alone gives the same logits as inside the pack
    alone = model(input_ids=ids[:, 4:7]).logits
    torch.testing.assert_close(ref[:, 4:7], alone, rtol=1e-4, atol=1e-5)
    # a mask that says something else is kept
    other = mask.clone()
    other[0, 0, 5, 1] = True
    assert not mask_matches_positions(other, pos)
    assert "attention_mask" in model_inputs(model, dict(batch, attention_mask=other))


def test_bf16_logits_on_a_cpu_take_smaller_lm_head_chunks_with_the_same_loss(monkeypatch):
    """cross_entropy's rule for half-precision logits on a CPU (benchmarks/loss_chunks.py): under bf16 autocast
    head_loss cuts a Phi-3-sized vocabulary's positions into smaller chunks than in float32, and the loss and the
    hidden states' gradient equal those of one chunk."""
    from phitune.training.fast import cross_entropy as ce

    vocab, n, width = 32064, 300, 16
    cpu = torch.device("cpu")
    assert ce.default_chunk(vocab, torch.bfloat16, cpu) < n < ce.default_chunk(vocab, torch.float32, cpu)
    assert ce.default_chunk(vocab, torch.bfloat16, torch.device("meta")) == ce.default_chunk(vocab, torch.float32, cpu)
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(width, vocab, bias=False).requires_grad_(False)
    hidden = torch.randn(1, n, width, generator=g).requires_grad_()
    labels = torch.randint(0, vocab, (1, n), generator=g)
    chunks = []
    real = ce.HeadCrossEntropy.apply
    monkeypatch.setattr(ce.HeadCrossEntropy, "apply", lambda *a: chunks.append(a[4]) or real(*a))

    def loss_and_grad(**kw):
        hidden.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ce.head_loss(hidden, head, labels, **kw)
        out.loss_sum.backward()
        return out.loss_sum.detach(), hidden.grad.clone()

    loss, grad = loss_and_grad()
    assert chunks == [ce.default_chunk(vocab, torch.bfloat16, cpu)]
    one_loss, one_grad = loss_and_grad(chunk_tokens=n)
    # A row's logits, loss and gradient do not depend on its chunk: only the float32 sum over rows is reordered
    # (n terms, float32 eps), and a bf16 gradient row may round the other way (one bf16 ulp of its largest entry).
    torch.testing.assert_close(loss, one_loss, rtol=n * 2**-24, atol=0)
    torch.testing.assert_close(grad, one_grad, rtol=0, atol=2**-8 * one_grad.abs().max().item())
