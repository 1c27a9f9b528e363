"""The simulation against the same step really run, and the depth extrapolation against full depth (CPU, tiny)."""

from __future__ import annotations

import pytest
import torch
from transformers import Phi3Config

from phitune.config import load_config
from phitune.plan import predict
from phitune.plan.simulate import simulate_step

GiB = 2**30


def tiny_phi3_config(layers: int = 2) -> Phi3Config:
    return Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=512, max_position_embeddings=256, pad_token_id=0)


def run_config(**training) -> object:
    tc = {"per_device_train_batch_size": 4, "use_cpu": True, "max_steps": 10, **training}
    return load_config({"model": {"name_or_path": "tiny", "dtype": "float32"},
                        "data": {"train": "unused.jsonl", "max_seq_length": 128, "packing": True},
                        "training_config": tc,
                        "peft_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}})


@pytest.mark.parametrize("training", [
    pytest.param({}, id="fast-path"),
    pytest.param({"gradient_checkpointing": True}, id="checkpointing", marks=pytest.mark.slow),
    pytest.param({"fast_path": "off"}, id="plain-path", marks=pytest.mark.slow),
])
def test_simulated_cpu_peak_is_within_5_percent_of_the_same_step_run_for_real(training):
    cfg, shape = run_config(**training), tiny_phi3_config(2)
    torch.manual_seed(0)
    fake = simulate_step(cfg, shape, 2, device="cpu", record_ops=False)
    real = simulate_step(cfg, shape, 2, device="cpu", record_ops=False, fake=False)
    assert real.peak["Total"] > 0
    assert fake.peak["Total"] == pytest.approx(real.peak["Total"], rel=0.05)
    # the parts too: the activations are most of this step, and the fake run must not miss them
    assert fake.peak["Activation"] == pytest.approx(real.peak["Activation"], rel=0.05)
    assert fake.supervised == real.supervised == 4 * 127


def test_data_dependent_answers_come_from_the_real_batch():
    cfg = run_config()
    sim = simulate_step(cfg, tiny_phi3_config(2), 2, device="cpu", record_ops=False)
    joined = "\n".join(sim.answers)
    assert "find_packed_sequence_indices: True" in joined  # one sample per row: transformers builds no packed mask
    assert "head_loss: nonzero -> 508 rows" in joined  # 4 x 127 supervised positions
    assert "supervised_tokens: 508" in joined


def test_packed_rows_are_answered_as_packed():
    cfg = run_config(per_device_train_batch_size=2)
    samples = [{"input_ids": list(range(1, 61)), "labels": list(range(1, 61))} for _ in range(4)]
    sim = simulate_step(cfg, tiny_phi3_config(2), 2, device="cpu", record_ops=False, samples=samples)
    assert sim.batch_shape == (2, 120)  # next-fit: two samples of 60 per row (rows end at the longest)
    assert "find_packed_sequence_indices: False" in "\n".join(sim.answers)


def test_extrapolation_from_2_and_4_layers_matches_6_layers_simulated_whole():
    cfg = run_config()
    steps = [simulate_step(cfg, tiny_phi3_config(6), n, device="cpu") for n in (2, 4)]
    whole = simulate_step(cfg, tiny_phi3_config(6), 6, device="cpu")
    for key in ("Total", "Activation", "Parameter"):
        predicted = predict.extrapolate(steps, 6, lambda s: s.peak.get(key, 0))
        # one layer's activations here are ~1/7 of the total: 2 % is far below what a wrong slope would give
        assert predicted == pytest.approx(whole.peak[key], rel=0.02), key
    flops = predict.extrapolate(steps, 6, lambda s: sum(o.flops for o in s.ops))
    assert flops == pytest.approx(sum(o.flops for o in whole.ops), rel=1e-9)  # FLOPs are exactly linear in depth


def test_peak_parts_add_up_and_name_the_adapter():
    cfg = run_config()
    sim = simulate_step(cfg, tiny_phi3_config(2), 2, device="cpu", record_ops=False)
    parts = predict.peak_parts([sim], 2, accumulation=1)
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"), abs=0.01)
    lora_params = 2 * (8 * (64 + 192) + 8 * (64 + 64) + 8 * (64 + 256) + 8 * (128 + 64))  # r x (in + out) per linear
    assert sim.trainable_bytes == lora_params * 4  # float32 factors, as train.py makes them


def test_qlora_base_is_simulated_4bit_on_meta_with_float32_adapter_bytes():
    pytest.importorskip("bitsandbytes")
    plain = simulate_step(run_config(), tiny_phi3_config(2), 2, device="cpu", record_ops=False)
    four_bit = load_config({**run_config(bf16=True).to_dict(),
                            "model": {"name_or_path": "tiny", "dtype": "float32", "load_in_4bit": True}})
    sim = simulate_step(four_bit, tiny_phi3_config(2), 2, device="cuda")
    assert any(o.name == "gemm_4bit" and o.flops > 0 for o in sim.ops)  # the base matmuls, counted as matmuls
    assert sim.trainable_bytes == plain.trainable_bytes  # float32 factors, as train.py keeps them
    # 4-bit linears: well under the float32 base's parameter bytes (the embedding and lm_head stay float32)
    assert sim.peak["Parameter"] < plain.peak["Parameter"]


def test_fsdp_rank_holds_its_shard_of_the_base_under_a_fake_process_group():
    """shard_model once identified tensors by data_ptr(), 0 for every fake tensor: then nothing was sharded."""
    def per_layer_parameter_bytes(**kw):
        cfg = run_config(**({"fsdp": "full_shard"} if kw else {}))
        two, four = (simulate_step(cfg, tiny_phi3_config(4), n, device="cpu", record_ops=False, **kw) for n in (2, 4))
        return (four.peak["Parameter"] - two.peak["Parameter"]) / 2, two

    whole, single = per_layer_parameter_bytes()
    shard, sharded = per_layer_parameter_bytes(world_size=4)
    # each added layer costs a quarter of its frozen weights on one of 4 ranks, plus its whole LoRA factors
    lora = whole - 4 * (64 * 192 + 64 * 64 + 64 * 256 + 128 * 64)
    assert shard == pytest.approx(lora + (whole - lora) / 4, rel=0.02)
    assert sharded.trainable_bytes == single.trainable_bytes  # LoRA factors whole on every rank


def test_data_batch_is_the_largest_micro_batch_train_would_make(tiny_model_dir, chat_files):
    from phitune.data import batch_plan, prepare_data
    from phitune.models.loading import load_tokenizer
    from phitune.plan.batch import longest_batch

    cfg = load_config({"model": {"name_or_path": str(tiny_model_dir)},
                       "data": {"train": str(chat_files[0]), "max_seq_length": 64, "packing": True, "cache": False},
                       "training_config": {"per_device_train_batch_size": 2, "use_cpu": True},
                       "peft_config": {"r": 4, "target_modules": "all-linear"}})
    prepared = prepare_data(cfg.data, load_tokenizer(cfg.model))
    samples, entry, about = longest_batch(prepared.train, cfg)
    plan = batch_plan(prepared.train, 2, 64, True, cfg.data.seed, 0)
    lengths = [[sum(len(prepared.train[i]["input_ids"]) for i in row) for row in e] for e in plan]
    assert about["padded_tokens"] == max(len(r) * max(r) for r in lengths)
    assert about["real_tokens"] == sum(len(s["input_ids"]) for s in samples)
    sim = simulate_step(cfg, tiny_phi3_config(2), 2, device="cpu", record_ops=False, samples=samples, entry=entry)
    assert sim.batch_shape[0] * sim.batch_shape[1] == about["padded_tokens"]


def test_in_place_gemms_count_their_flops():
    """torch's flop registry lists addmm, not addmm_: an in-place GEMM must not be priced as a free memory pass."""
    from phitune.plan.simulate import OpRecorder

    a, b, c = torch.randn(64, 32), torch.randn(32, 16), torch.zeros(64, 16)
    with OpRecorder() as rec:
        c.addmm_(a, b)
        torch.addmm(c, a, b)
    assert [(o.name, o.flops) for o in rec.ops] == [("addmm_", 2 * 64 * 32 * 16), ("addmm", 2 * 64 * 32 * 16)]
