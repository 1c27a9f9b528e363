"""phitune.training.distributed: 2 processes under torchrun (CPU, gloo) train like 1 process with the doubled batch; a
killed
2-process run resumes to the same end; FSDP2 trains and saves an adapter that loads in peft; DPO under DDP and FSDP2
trains like 1 process, whole pairs on each process.

The reference 2-process run is started as users start one, `python -m torch.distributed.run --standalone
--nproc_per_node 2 -m phitune train CONFIG` (most of its minute is three processes importing torch and
transformers). The others fork the test process into 2 workers with torchrun's environment variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), which skips those imports.
"""

import json
import multiprocessing
import os
import re
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
from phitune.training import distributed, fsdp
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
        for p in procs:  # all at once: a survivor sees its peer's closed connection and stops by itself
            os.kill(p.pid, signal.SIGKILL)
        for p in procs:
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
def test_fsdp_with_rank0_loading_trains_like_one_process_and_its_adapter_loads_in_peft(tiny_model_dir, chat_files,
                                                                                       tmp_path):
    """2 processes under FSDP2, the base built on meta and filled by rank 0 (the default), against 1 process with the
    doubled batch: the same losses, the same adapter, the same logits in peft."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from phitune.adapt import load_adapter
    from phitune.config import load_config

    out, ref = tmp_path / "fsdp", tmp_path / "single"
    cfg = _config(tiny_model_dir, chat_files, out, fsdp="full_shard auto_wrap", gradient_checkpointing=True,
                  fsdp_config={"transformer_layer_cls_to_wrap": ["Phi3DecoderLayer"]})
    os.environ["WORLD_SIZE"] = "2"
    try:
        assert fsdp.loads_on_rank0(load_config(cfg).training_config)
    finally:
        del os.environ["WORLD_SIZE"]
    _join(_forked(cfg, report=str(tmp_path / "held")))
    finetune(_config(tiny_model_dir, chat_files, ref, per_device_train_batch_size=2 * PER_DEVICE))
    # The frozen base of the decoder is sharded (each process holds half the rows); LoRA and lm_head are whole.
    held = [json.loads((tmp_path / f"held-{r}.json").read_text()) for r in range(2)]
    assert held[0] == held[1]
    assert held[0]["qkv_rows"] == [96, 192]
    assert "model.embed_tokens.weight" in held[0]["sharded"] and "model.layers.1.mlp.down_proj.weight" in held[0][
        "sharded"]
    assert all(".lora_" in n or n == "lm_head.weight" for n in held[0]["whole"]), held[0]["whole"]
    _assert_same_curve(out, ref)  # sharding the frozen base and loading it on rank 0 change nothing in the updates
    _assert_same_adapter(out, ref)

    ids = torch.tensor([[1, 5, 9, 30, 200, 17, 3, 44]])

    def base():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    theirs = peft.PeftModel.from_pretrained(base(), out).eval()
    ours = base()
    load_adapter(ours, out)
    single = peft.PeftModel.from_pretrained(base(), ref).eval()
    with torch.no_grad():
        a, b, c = theirs(input_ids=ids).logits, ours(input_ids=ids).logits, single(input_ids=ids).logits
        plain = base()(input_ids=ids).logits
    # the same float32 network, sums in another order: eps x the longest reduction (intermediate 128) per layer
    rounding = EPS32 * 128 * 3 * float(a.abs().max())
    torch.testing.assert_close(a, b, rtol=0, atol=rounding)
    effect = float((c - plain).abs().max())
    assert effect > 1e-4  # the adapter was trained, not saved at its zero init
    # The adapters agree within _adam_tolerance per element; to first order, a relative change r of both LoRA
    # factors changes the adapter's effect on the logits by 2r per layer it passes (2 layers here).
    weights = _adapter(ref)
    r = _adam_tolerance(ref) / min(float(t.abs().max()) for t in weights.values())
    torch.testing.assert_close(a, c, rtol=0, atol=rounding + 2 * 2 * r * effect)


@pytest.mark.slow
def test_rank0_loading_keeps_tied_embeddings_tied(tiny_model_dir, chat_files, tmp_path):
    """A base whose lm_head shares the embedding (Phi-4-mini's layout; its checkpoint holds the embedding only)."""
    from transformers import AutoModelForCausalLM

    tied = tmp_path / "tied"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tied)
    __import__("shutil").copytree(tiny_model_dir, tied, dirs_exist_ok=True,
                                  ignore=lambda d, names: [n for n in names if n.startswith(("model", "config"))])
    assert "lm_head.weight" not in load_file(str(tied / "model.safetensors"))
    out, ref = tmp_path / "fsdp", tmp_path / "single"
    _join(_forked(_config(tied, chat_files, out, max_steps=2, fsdp="full_shard", save_steps=1000),
                  report=str(tmp_path / "held")))
    finetune(_config(tied, chat_files, ref, max_steps=2, per_device_train_batch_size=2 * PER_DEVICE))
    _assert_same_curve(out, ref)
    _assert_same_adapter(out, ref)
    held = json.loads((tmp_path / "held-0.json").read_text())
    assert "model.embed_tokens.weight" in held["whole"]  # shared with lm_head: kept whole, filled once


# --- two nodes, rehearsed on one machine ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_process_run(tiny_model_dir, chat_files, tmp_path_factory):
    """1 process with the batch of the 2 x 2 runs, uninterrupted: its output folder."""
    out = tmp_path_factory.mktemp("single") / "single"
    finetune(_config(tiny_model_dir, chat_files, out, per_device_train_batch_size=2 * PER_DEVICE))
    return out


def _two_nodes(cfg: dict, tmp: Path, name: str, **env) -> list[tuple[subprocess.Popen, Path]]:
    """Two torchrun agents, one process each, as two nodes would start them (c10d rendezvous on the first node;
    here both on 127.0.0.1): (agent, its console log) per node, started, not waited for."""
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    agents = []
    for node in (0, 1):
        log = tmp / f"{name}-node{node}.log"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
               "--rdzv_id", name, "--rdzv_conf", f"is_host={int(node == 0)}", "--max_restarts", "0",
               "-m", "phitune", "train", str(path)]
        with log.open("w") as f:
            agents.append((subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT), log))
    return agents


def _wait(agents, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [a.wait(max(deadline - time.monotonic(), 1)) for a, _ in agents]
    finally:
        for a, _ in agents:
            if a.poll() is None:
                _kill_node(a)


def _kill_node(agent: subprocess.Popen) -> None:
    """SIGKILL a torchrun agent and its workers at once, as when its node is lost (a worker outlives its agent)."""
    psutil = pytest.importorskip("psutil")
    procs = psutil.Process(agent.pid).children(recursive=True) + [psutil.Process(agent.pid)]
    for p in procs:
        p.kill()
    psutil.wait_procs(procs, timeout=30)


@pytest.mark.slow
def test_two_nodes_train_like_one_process_and_write_once(one_process_run, tiny_model_dir, chat_files, tmp_path):
    out, ref = tmp_path / "nodes", one_process_run
    agents = _two_nodes(_config(tiny_model_dir, chat_files, out), tmp_path, "nodes")
    codes = _wait(agents, 400)
    logs = [log.read_text(errors="replace") for _, log in agents]
    assert codes == [0, 0], "\n".join(text[-3000:] for text in logs)
    _assert_same_curve(out, ref)
    _assert_same_adapter(out, ref)
    text = "".join(logs)
    assert text.count("world: 2 nodes x 1 process, backend gloo; data parallel") == 1  # rank 0 alone says it
    assert text.count("run saved to") == 1
    # One output folder, written by one process: the 1-process run's files, nothing per rank or per node.
    names = lambda o: sorted(str(p.relative_to(o)) for p in o.rglob("*"))  # noqa: E731
    assert names(out) == names(ref)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_a_lost_node_stops_the_other_and_a_fresh_two_node_start_resumes(one_process_run, tiny_model_dir,
                                                                         chat_files, tmp_path):
    """The node running rank 0 is killed while it writes checkpoint-4: the other node stops with phitune's message
    well before ddp_timeout; the same command with resume_from_checkpoint: auto finishes the run as if unbroken."""
    out, timeout = tmp_path / "lost", 60
    cfg = _config(tiny_model_dir, chat_files, out, ddp_timeout=timeout)
    agents = _two_nodes(cfg, tmp_path, "lost", PHITUNE_TEST_SLOW_SAVE="4:300")
    try:
        deadline = time.monotonic() + 300
        while not list((out / "checkpoints").glob(".tmp-checkpoint-4-*/meta.json")):
            assert all(a.poll() is None for a, _ in agents), [log.read_text()[-2000:] for _, log in agents]
            assert time.monotonic() < deadline, "the run never reached the save of checkpoint-4"
            time.sleep(0.2)
        main = next(i for i, (_, log) in enumerate(agents) if "phitune: step 4" in log.read_text(errors="replace"))
        _kill_node(agents[main][0])
        killed = time.monotonic()
        survivor, log = agents[1 - main]
        code = survivor.wait(timeout + 30)
        took = time.monotonic() - killed
    finally:
        _wait(agents, 1)
    text = log.read_text(errors="replace")
    assert code != 0
    assert took < timeout, f"the surviving node took {took:.0f} s to stop"
    assert "another process of this run stopped" in text and "resume_from_checkpoint: auto" in text, text[-3000:]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]

    cfg["training_config"]["resume_from_checkpoint"] = "auto"
    agents = _two_nodes(cfg, tmp_path, "resumed")
    codes = _wait(agents, 400)
    assert codes == [0, 0], "\n".join(log.read_text(errors="replace")[-3000:] for _, log in agents)
    _assert_same_curve(out, one_process_run)
    _assert_same_adapter(out, one_process_run)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    assert not list((out / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_a_process_that_stops_answering_ends_the_others_at_ddp_timeout(tiny_model_dir, chat_files, tmp_path,
                                                                     capfd):
    """Rank 1 is frozen (SIGSTOP: its connections stay open, nothing closes them) while rank 0 writes checkpoint-4:
    rank 0 stops with phitune's message once ddp_timeout has passed, not later."""
    timeout, slow_save = 15, 5
    cfg = _config(tiny_model_dir, chat_files, tmp_path / "silent", ddp_timeout=timeout)
    procs = _forked(cfg, env={"PHITUNE_TEST_SLOW_SAVE": f"4:{slow_save}"})
    try:
        deadline = time.monotonic() + 240
        while not list((tmp_path / "silent" / "checkpoints").glob(".tmp-checkpoint-4-*/meta.json")):
            assert all(p.is_alive() for p in procs) and time.monotonic() < deadline, [p.exitcode for p in procs]
            time.sleep(0.1)
        os.kill(procs[1].pid, signal.SIGSTOP)
        frozen = time.monotonic()
        procs[0].join(slow_save + timeout + 30)
        took = time.monotonic() - frozen
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(10)
    assert procs[0].exitcode == 1
    assert took <= slow_save + timeout + 10, f"rank 0 took {took:.0f} s"
    assert "another process of this run stopped or stopped answering" in capfd.readouterr().err


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
        fsdp.check_supported(cfg)
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


def test_an_empty_model_draws_the_lora_start_a_loaded_one_gets_from_the_seed(tiny_model_dir):
    """What every FSDP process does with its meta-built model gives the LoRA values of one process's add_lora."""
    from phitune.adapt import add_lora
    from phitune.models.loading import load_model_and_tokenizer

    peft_config = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    torch.manual_seed(0)
    loaded, tok = load_model_and_tokenizer(str(tiny_model_dir), device="cpu")
    add_lora(loaded, peft_config, lora_dtype=torch.float32)
    empty, _ = load_model_and_tokenizer(str(tiny_model_dir), device="cpu", tokenizer=tok, weights=False)
    assert {p.device.type for p in empty.parameters()} == {"meta"}
    assert all(b.device.type == "cpu" for b in empty.buffers())  # RoPE's tables are computed, not loaded
    add_lora(empty, peft_config, lora_dtype=torch.float32)
    fsdp.materialize(empty, torch.device("cpu"))
    fsdp.init_lora_everywhere(empty, seed=0)
    mine = {n: p for n, p in empty.named_parameters() if p.requires_grad}
    theirs = {n: p for n, p in loaded.named_parameters() if p.requires_grad}
    assert mine.keys() == theirs.keys() and len(mine) == 16
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name


def _check_worker(rank: int, port: int, outcome: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo")
    same = torch.ones(3)
    fsdp.check_same_everywhere([("same", same)])
    try:
        fsdp.check_same_everywhere([("same", same), ("lora_B", torch.full((2,), float(rank)))])
        message = "no error"
    except Exception as exc:  # noqa: BLE001 - reported to the test
        message = str(exc)
    Path(f"{outcome}-{rank}").write_text(message)
    os._exit(0)


def test_processes_that_drew_different_lora_starts_all_stop(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_check_worker, args=(r, port, str(tmp_path / "outcome"))) for r in range(2)]
    for p in procs:
        p.start()
    _join(procs, timeout=60)
    messages = [(tmp_path / f"outcome-{r}").read_text() for r in range(2)]
    assert all("trainable parameters differ between processes" in m for m in messages), messages
    assert "first lora_B" in messages[1]


def test_the_layout_says_what_one_process_holds_before_step_1(tiny_model_dir):
    from phitune.adapt import add_lora
    from phitune.models.loading import load_model_and_tokenizer
    from phitune.training.optim import build_optimizer

    model, _ = load_model_and_tokenizer(str(tiny_model_dir), device="cpu")
    add_lora(model, {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}, lora_dtype=torch.float32)
    tc = build_training_config({"use_cpu": True})
    optimizer = build_optimizer(model, tc, torch.device("cpu"))
    world, holds = distributed.describe_layout(model, optimizer, tc)
    assert world == "world: 1 node x 1 process, backend none; one process, no distribution"
    params = sum(p.numel() for p in model.parameters()) * 4  # float32
    trainable = [p for p in model.parameters() if p.requires_grad]
    adapter = sum(p.numel() for p in trainable) * 4
    assert f"parameters {params / 2**10:.1f} KiB (0.0 KiB sharded, {params / 2**10:.1f} KiB whole) on cpu" in holds
    assert f"adapter {adapter / 2**10:.1f} KiB" in holds
    # before step 1 AdamW holds nothing yet: two float32 moments and a step per trainable tensor, counted ahead
    assert f"optimizer state {(2 * adapter + 4 * len(trainable)) / 2**10:.1f} KiB" in holds


@pytest.mark.slow
def test_the_slurm_script_launch_line_trains_two_steps(tiny_model_dir, chat_files, tmp_path):
    """examples/slurm/train.sbatch's per-node command, run as srun would on each of two nodes (its environment set
    by hand, both nodes on this machine, CPU): two steps, one run folder."""
    script = (ROOT / "examples" / "slurm" / "train.sbatch").read_text()
    launch = re.search(r"srun [^\n]*bash -c '([^']+)'", script).group(1)
    assert launch.startswith("exec torchrun ") and "--rdzv_endpoint \"$MASTER_ADDR:$MASTER_PORT\"" in launch
    out = tmp_path / "slurm"
    config = tmp_path / "slurm.yaml"
    config.write_text(yaml.safe_dump(_config(tiny_model_dir, chat_files, out, max_steps=2, save_steps=1)))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
               SLURM_NNODES="2", SLURM_JOB_ID="4242", GPUS_PER_NODE="1", CONFIG=str(config),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    nodes = [subprocess.Popen(["bash", "-c", launch], env=dict(env, SLURM_NODEID=str(node)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for node in (0, 1)]
    texts = [p.communicate(timeout=400)[0].decode(errors="replace") for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(t[-3000:] for t in texts)
    assert [s for s, _ in losses(out)] == [1, 2]
    text = "".join(texts)
    assert text.count("world: 2 nodes x 1 process, backend gloo") == 1
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]


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


def _record_pair_rows(monkeypatch, folder: Path) -> None:
    """Every preference micro-batch a process of a 2-process run computes a loss on is logged to
    ``folder/rows-RANK.jsonl`` as the prompt tokens (before the reply) of each row with a reply."""
    from phitune.training import preference

    real = preference.pair_loss

    def recording(model, batch, **kwargs):
        if distributed.active():
            rows = []
            for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
                trained = [i for i, label in enumerate(labels) if label != -100]
                rows.append(ids[:trained[0]] if trained else None)
            with open(folder / f"rows-{distributed.rank()}.jsonl", "a") as f:
                f.write(json.dumps(rows) + "\n")
        return real(model, batch, **kwargs)

    monkeypatch.setattr(preference, "pair_loss", recording)  # inherited by the forked workers


@pytest.mark.slow
@pytest.mark.parametrize("precompute", [True, False])
def test_dpo_under_fsdp2_trains_like_one_process_with_whole_pairs_on_each_process(tiny_model_dir, tmp_path,
                                                                                  monkeypatch, precompute):
    """DPO on 2 processes under FSDP2 (the frozen base sharded, rank 0 loading it; the reference, adapters off,
    run through the sharded model once before training or with every micro-batch) against 1 process with the
    doubled batch: the same losses, rewards and adapter; every micro-batch of every process holds whole pairs (rows
    2k and 2k+1 share their prompt)."""
    words = ["apple", "river stone", "cloud", "tiger lemon piano", "glass", "mouse", "candle forest", "rocket"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Reverse: {w}", "chosen": w[::-1], "rejected": w}) + "\n"
                             for w in words))
    extra = {"method": "dpo", "max_steps": 3, "save_steps": 1000, "precompute_ref_log_probs": precompute,
             "lr_scheduler_type": "constant"}
    out1, out2 = tmp_path / "single", tmp_path / "fsdp"
    _record_pair_rows(monkeypatch, tmp_path)
    _join(_forked(_config(tiny_model_dir, (pairs, pairs), out2, **extra, fsdp="full_shard auto_wrap",
                          fsdp_config={"transformer_layer_cls_to_wrap": ["Phi3DecoderLayer"]}),
                  report=str(tmp_path / "held")))
    finetune(_config(tiny_model_dir, (pairs, pairs), out1, **extra, per_device_train_batch_size=2 * PER_DEVICE))

    held = json.loads((tmp_path / "held-0.json").read_text())
    assert held["qkv_rows"] == [96, 192]  # the base really was sharded
    _assert_same_curve(out2, out1)
    _assert_same_adapter(out2, out1)
    r1, r2 = ([json.loads(line) for line in (o / "metrics.jsonl").read_text().splitlines()] for o in (out1, out2))
    assert len(r1) == len(r2)
    for a, b in zip(r1, r2):
        assert a.get("pairs") == b.get("pairs") and a.get("eval_pairs") == b.get("eval_pairs")
        for k in ("rewards/margins", "rewards/accuracies", "logps/chosen", "eval_rewards/margins", "eval_loss"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=ROUNDING, abs=1e-6), k
    for rank in range(2):
        batches = [json.loads(line) for line in (tmp_path / f"rows-{rank}.jsonl").read_text().splitlines()]
        trained = [b for b in batches if any(r is not None for r in b)]
        assert len(trained) >= 3 * 2  # 3 steps x 2 micro-batches, then the evaluations
        for rows in trained:
            assert len(rows) % 2 == 0
            for chosen, rejected in zip(rows[0::2], rows[1::2]):
                assert chosen is not None and chosen == rejected  # the two sides of one pair: one prompt
            prompts = [tuple(r) for r in rows[0::2]]
            assert len(set(prompts)) == len(prompts)  # and different pairs in one micro-batch
