"""phitune.training.distributed: 2 processes under torchrun (CPU, gloo) train like 1 process with the doubled batch; a
killed
2-process run resumes to the same end; FSDP2 trains and saves an adapter that loads in peft.

The reference 2-process run is started as users start one, `python -m torch.distributed.run --standalone
--nproc_per_node 2 -m phitune train CONFIG` (most of its minute is three processes importing torch and
transformers). The others fork the test process into 2 workers with torchrun's environment variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), which skips those imports.
"""

import json
import multiprocessing
import os
import socket
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from helpers import losses, tiny_config

from phitune.training import checkpoint as ckpt
from phitune.training import distributed
from phitune.config import build_training_config
from phitune.errors import ConfigError
from phitune.training.train import finetune

from helpers import ROOT
PER_DEVICE = 2  # x 2 processes = the 1-process batch of 4


def _config(model_dir, files, out, **training) -> dict:
    # 6 steps of 2 x 4 sequences over 32 conversations: accumulation, an epoch boundary (step 4), checkpoints,
    # rotation and the final evaluation.
    training = {"max_steps": 6, "gradient_accumulation_steps": 2, "save_steps": 2, "save_total_limit": 2,
                "per_device_train_batch_size": PER_DEVICE, **training}
    return tiny_config(model_dir, files, out, **training)


def _torchrun(cfg: dict, tmp: Path) -> str:
    """Run ``cfg`` as a user would on 2 processes; return the console output."""
    path = tmp / f"{Path(cfg['training_config']['output_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "phitune", "train", str(path)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    text = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    return text


def _worker(rank: int, world: int, port: int, cfg: dict, env: dict, report: str | None) -> None:
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    code = 0
    try:
        model = finetune(cfg).model
        if report:  # what this process holds of the base weights
            from torch.distributed.tensor import DTensor

            qkv = model.model.layers[0].self_attn.qkv_proj
            Path(f"{report}-{rank}.json").write_text(json.dumps({
                "sharded": sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor)),
                "whole": sorted(n for n, p in model.named_parameters() if not isinstance(p, DTensor)),
                "qkv_rows": [qkv.weight.to_local().shape[0], qkv.weight.shape[0]]}))
    except BaseException:  # noqa: BLE001 - reported by the parent through the exit code
        __import__("traceback").print_exc()
        code = 1
    os._exit(code)  # not pytest's atexit handlers


def _forked(cfg: dict, env: dict | None = None, world: int = 2, report: str | None = None) -> list:
    """``world`` forked workers training ``cfg`` as torchrun's would (started, not joined)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(r, world, port, cfg, env or {}, report)) for r in range(world)]
    for p in procs:
        p.start()
    return procs


def _join(procs: list, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(deadline - time.monotonic(), 1))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert codes == [0] * len(procs), f"worker exit codes {codes} (tracebacks above)"


def _adapter(out: Path) -> dict:
    return load_file(str(out / "adapter_model.safetensors"))


# Tolerances of "the same training, its sums taken in another order" (N processes sum their halves of a batch; one
# process sums the batch at once; kernels block their reductions differently on AVX2 and AVX-512 CPUs and with
# other thread counts). A float32 sum of n terms is exact within n x eps relative to the sum of |terms|; the longest
# sums here run over a step's tokens: 2 micro-batches x 4 sequences x 64 positions.
EPS32 = torch.finfo(torch.float32).eps
SUMMED_TERMS = 2 * 4 * 64
ROUNDING = SUMMED_TERMS * EPS32  # relative, ~6e-5


def _adam_tolerance(out: Path) -> float:
    """Largest parameter difference rounding can cause through Adam: its update lr x m/sqrt(v) normalises each
    gradient element, so a relative gradient error r moves an element by about lr x r per step; an element whose
    gradient cancels down to sqrt(n eps) of its terms' sum still gets r <= sqrt(n eps). Summed over the steps' lrs."""
    lrs = [r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    return sum(lrs) * ROUNDING ** 0.5


def _assert_same_adapter(a: Path, b: Path):
    ta, tb = _adapter(a), _adapter(b)
    assert ta.keys() == tb.keys()
    atol = _adam_tolerance(b)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=ROUNDING, atol=atol, msg=lambda m: f"{k}: {m}")


def _assert_same_curve(a: Path, b: Path):
    la, lb = losses(a), losses(b)
    assert [s for s, _ in la] == [s for s, _ in lb]
    for (_, x), (_, y) in zip(la, lb):
        assert x == pytest.approx(y, rel=ROUNDING, abs=1e-6)


@pytest.fixture(scope="module")
def two_process_run(tiny_model_dir, chat_files, tmp_path_factory):
    """2 processes x per-device batch 2, uninterrupted: (output folder, console output)."""
    tmp = tmp_path_factory.mktemp("ddp")
    out = tmp / "ddp"
    text = _torchrun(_config(tiny_model_dir, chat_files, out), tmp)
    return out, text


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_doubled_batch(two_process_run, tiny_model_dir,
                                                               chat_files, tmp_path):
    out2, text = two_process_run
    out1 = tmp_path / "single"
    finetune(_config(tiny_model_dir, chat_files, out1, per_device_train_batch_size=2 * PER_DEVICE))
    _assert_same_curve(out2, out1)
    _assert_same_adapter(out2, out1)
    m1, m2 = (json.loads((o / "final_metrics.json").read_text()) for o in (out1, out2))
    assert m2["train_tokens"] == m1["train_tokens"]  # the same supervised tokens, split over the processes
    for k in ("train_loss", "eval_loss", "eval_token_accuracy"):
        assert m2[k] == pytest.approx(m1[k], rel=ROUNDING), k
    # One output folder, written once: the same files as the single-process run, nothing per rank.
    names = lambda o: sorted(str(p.relative_to(o)) for p in o.rglob("*"))  # noqa: E731
    assert names(out2) == names(out1)
    assert [p.name for p in ckpt.list_checkpoints(out2)] == ["checkpoint-4", "checkpoint-6"]  # save_total_limit 2
    assert ckpt.read_meta(out2 / "checkpoints" / "checkpoint-6")["data_position"] == {"epoch": 1, "micro_batch": 4}
    records = [json.loads(line) for line in (out2 / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]  # logged once, not once per process
    assert text.count("phitune: step 6 (epoch") == 2  # the train and the eval line, from rank 0 only
    assert text.count("run saved to") == 1
    state = torch.load(out2 / "checkpoints" / "checkpoint-6" / "training_state.pt", weights_only=True)
    assert len(state["rng_per_process"]) == 2


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_the_same_end(two_process_run, tiny_model_dir, chat_files,
                                                        tmp_path):
    """SIGKILL both processes while rank 0 writes checkpoint-4 (checkpoint-2 complete), then resume on 2
    processes, and once more on 1 process with the same total batch."""
    ref, _ = two_process_run
    out = tmp_path / "killed"
    cfg = _config(tiny_model_dir, chat_files, out)
    procs = _forked(cfg, env={"PHITUNE_TEST_SLOW_SAVE": "4:120"})
    try:
        deadline = time.monotonic() + 240
        while not list((out / "checkpoints").glob(".tmp-checkpoint-4-*/meta.json")):
            assert all(p.is_alive() for p in procs), [p.exitcode for p in procs]
            assert time.monotonic() < deadline, "the run never reached the save of checkpoint-4"
            time.sleep(0.2)
    finally:
        for p in procs:
            os.kill(p.pid, signal.SIGKILL)
            p.join(30)
    assert [p.exitcode for p in procs] == [-signal.SIGKILL] * 2
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]
    keep = tmp_path / "checkpoint-2"  # for the 1-process resume below
    __import__("shutil").copytree(out / "checkpoints" / "checkpoint-2", keep)

    cfg["training_config"]["resume_from_checkpoint"] = "auto"
    _join(_forked(cfg))
    _assert_same_curve(out, ref)
    _assert_same_adapter(out, ref)
    final, ref_final = (json.loads((o / "final_metrics.json").read_text()) for o in (out, ref))
    assert final["train_loss"] == pytest.approx(ref_final["train_loss"], rel=1e-6)
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]

    # The data position is global: 1 process with batch 4 continues the 2 x 2 run from the same checkpoint.
    single = tmp_path / "single"
    finetune(_config(tiny_model_dir, chat_files, single, per_device_train_batch_size=2 * PER_DEVICE,
                     resume_from_checkpoint=str(keep)))
    assert [s for s, _ in losses(single)] == [3, 4, 5, 6]
    for (_, x), (_, y) in zip(losses(single), losses(ref)[2:]):
        assert x == pytest.approx(y, rel=ROUNDING, abs=1e-6)
    assert json.loads((single / "final_metrics.json").read_text())["train_loss"] == pytest.approx(
        ref_final["train_loss"], rel=ROUNDING)


@pytest.mark.slow
def test_fsdp_trains_and_saves_an_adapter_that_loads_in_peft(two_process_run, tiny_model_dir, chat_files,
                                                             tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from phitune.adapt import load_adapter

    ref, _ = two_process_run
    out = tmp_path / "fsdp"
    cfg = _config(tiny_model_dir, chat_files, out, fsdp="full_shard auto_wrap", gradient_checkpointing=True,
                  fsdp_config={"transformer_layer_cls_to_wrap": ["Phi3DecoderLayer"]})
    _join(_forked(cfg, report=str(tmp_path / "held")))
    # The frozen base of the decoder is sharded (each process holds half the rows); LoRA and lm_head are whole.
    held = [json.loads((tmp_path / f"held-{r}.json").read_text()) for r in range(2)]
    assert held[0] == held[1]
    assert held[0]["qkv_rows"] == [96, 192]
    assert "model.embed_tokens.weight" in held[0]["sharded"] and "model.layers.1.mlp.down_proj.weight" in held[0][
        "sharded"]
    assert all(".lora_" in n or n == "lm_head.weight" for n in held[0]["whole"]), held[0]["whole"]
    _assert_same_curve(out, ref)  # sharding the frozen base changes nothing in the updates
    _assert_same_adapter(out, ref)

    ids = torch.tensor([[1, 5, 9, 30, 200, 17, 3, 44]])

    def base():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    theirs = peft.PeftModel.from_pretrained(base(), out).eval()
    ours = base()
    load_adapter(ours, out)
    with torch.no_grad():
        a, b, plain = theirs(input_ids=ids).logits, ours(input_ids=ids).logits, base()(input_ids=ids).logits
    # the same float32 network, sums in another order: eps x the longest reduction (intermediate 128) per layer
    tol = EPS32 * 128 * 3 * float(a.abs().max())
    torch.testing.assert_close(a, b, rtol=0, atol=tol)
    assert (a - plain).abs().max() > 1e-4  # the adapter was trained, not saved at its zero init


# --- the pieces, in one process ---------------------------------------------------------------------------------------


def test_split_evenly_is_disjoint_ordered_and_balanced():
    units = list(range(7))
    parts = [distributed.split_evenly(units, r, 3) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    assert distributed.split_evenly([0], 1, 2) == []


@pytest.mark.parametrize("packing", [True, False])
def test_the_parts_of_a_micro_batch_are_its_rows(packing):
    """What 2 processes train on is exactly the micro-batch of 1 process with the doubled batch, row for row."""

    from phitune.data import batch_plan, collate

    rng = __import__("random").Random(0)
    samples = []
    for _ in range(40):
        n = rng.randint(3, 20)
        samples.append({"input_ids": [rng.randint(5, 99) for _ in range(n)], "labels": list(range(n))})

    def rows(entry):
        batch = collate(samples, entry, 32, packing)
        return [tuple(r[r != 0].tolist()) for r in batch["input_ids"]], int((batch["labels"][:, 1:] != -100).sum())

    for entry in batch_plan(samples, 2 * 3, 32, packing, seed=1):
        parts = [distributed.sharder(r, 2)(entry) for r in range(2)]
        assert sorted(parts[0] + parts[1]) == sorted(entry)
        got = [rows(p) for p in parts if p]
        assert [r for g in got for r in g[0]] == rows(entry)[0]
        assert sum(g[1] for g in got) == rows(entry)[1]  # the supervised tokens of the step, too
        assert all(len(rows(p)[0]) <= 3 for p in parts if p)  # at most the per-device batch each


def test_one_process_helpers_do_nothing():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.sum_ints(3, 4) == [3, 4]
    t = torch.ones(2)
    assert distributed.sum_(t) is t and distributed.striped([1, 2]) == [1, 2]
    assert distributed.on_main(lambda x: x + 1, 1) == 2
    assert distributed.sharder() is list


def test_distributed_keys_are_checked():
    tc = build_training_config({"fsdp": "full_shard", "fsdp_config": {"fsdp_reshard_after_forward": False,
                                                                      "use_orig_params": True}})
    assert tc.fsdp == ["full_shard"] and tc.fsdp_config == {"reshard_after_forward": False}
    assert any("use_orig_params" in n for n in tc.notes)
    assert build_training_config({"fsdp": "offload"}).fsdp == ["full_shard", "offload"]
    assert build_training_config({"fsdp_config": {"activation_checkpointing": True}, "fsdp": True}
                                 ).gradient_checkpointing
    with pytest.raises(ConfigError, match="did you mean 'full_shard'"):
        build_training_config({"fsdp": "full_shar"})
    with pytest.raises(ConfigError, match="hybrid_shard.*not supported"):
        build_training_config({"fsdp": "hybrid_shard"})
    with pytest.raises(ConfigError, match="did you mean 'gloo'"):
        build_training_config({"ddp_backend": "glo"})
    with pytest.raises(ConfigError, match="FSDP2"):
        build_training_config({"fsdp": "full_shard", "fsdp_config": {"version": 1}})


def test_fsdp_with_qlora_is_refused_under_torchrun(monkeypatch, tiny_model_dir, chat_files, tmp_path):
    from phitune.config import load_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(_config(tiny_model_dir, chat_files, tmp_path / "q", fsdp="full_shard"))
    cfg.model.load_in_4bit = True
    with pytest.raises(ConfigError, match="fsdp with model.load_in_4bit.*Remove fsdp"):
        distributed.check_supported(cfg)
    with pytest.raises(ConfigError, match="torchrun"):  # WORLD_SIZE without the rest of torchrun's variables
        distributed.init(cfg.training_config)


def test_resume_accepts_another_process_count_with_the_same_total_batch(tiny_model_dir, chat_files,
                                                                         tmp_path):
    from phitune.config import load_config

    def settings(per_device, world):
        cfg = load_config(_config(tiny_model_dir, chat_files, tmp_path / "r", per_device_train_batch_size=per_device))
        return ckpt.resume_settings(cfg, world_size=world)

    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    saved = settings(2, 2)
    (folder / "meta.json").write_text(json.dumps({"config_hash": ckpt.config_hash(saved), "settings": saved}))
    ckpt.check_compatible(folder, settings(4, 1))
    ckpt.check_compatible(folder, settings(1, 4))
    with pytest.raises(ckpt.CheckpointError, match=r"was 4, is 6"):
        ckpt.check_compatible(folder, settings(2, 3))


@pytest.mark.slow
@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_on_two_processes_equals_one_process_with_the_doubled_batch(tiny_model_dir, tmp_path, precompute):
    """Preference runs shard whole pairs (chosen and rejected stay on one process); the pairs, the rewards metrics
    and the reference (adapters off, or precomputed on every process) are summed over processes."""
    words = ["apple", "river stone", "cloud", "tiger lemon piano", "glass", "mouse", "candle forest", "rocket"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Reverse: {w}", "chosen": w[::-1], "rejected": w}) + "\n"
                             for w in words))
    extra = {"method": "dpo", "max_steps": 3, "save_steps": 1000, "precompute_ref_log_probs": precompute,
             "lr_scheduler_type": "constant"}
    out1, out2 = tmp_path / "single", tmp_path / "two"
    _join(_forked(_config(tiny_model_dir, (pairs, pairs), out2, **extra)))
    finetune(_config(tiny_model_dir, (pairs, pairs), out1, **extra, per_device_train_batch_size=2 * PER_DEVICE))
    _assert_same_curve(out2, out1)
    _assert_same_adapter(out2, out1)
    r1, r2 = ([json.loads(line) for line in (o / "metrics.jsonl").read_text().splitlines()] for o in (out1, out2))
    for a, b in zip(r1, r2):
        assert a.get("pairs") == b.get("pairs") and a.get("eval_pairs") == b.get("eval_pairs")
        for k in ("rewards/margins", "eval_rewards/margins", "logps/chosen"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=ROUNDING, abs=1e-6), k
