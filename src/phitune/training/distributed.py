"""Training on several processes started by torchrun: the same loop in every process, one process per device.

    torchrun --nproc_per_node 4 -m phitune train config.yaml

What a process does differently from a single one is here, as small helpers that do nothing in one process:

- ``init`` joins the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
  backend ``ddp_backend`` (nccl on CUDA, gloo on CPU by default); each process takes GPU ``LOCAL_RANK``.
- Data: every process builds the same batch plan, with micro-batches of ``per_device_train_batch_size x processes``
  (sequences, or packed rows), and ``sharder`` gives process r the r-th block of each micro-batch's rows. So N
  processes with per-device batch B train on exactly the micro-batches of one process with batch N*B, packed or
  not, and the data position saved in a checkpoint is global (any process count with the same N*B resumes it).
- Gradients: the trainable (LoRA) gradients are summed across processes by ``sum_gradients``, one flat all-reduce
  per optimizer step, after accumulation. Not DDP's wrapper: phitune's loss runs the decoder body and the chunked
  lm_head itself (``phitune.training.loss.forward_loss``), not the wrapper's forward, which DDP needs to arm its
  reducer; and
  LoRA gradients are a few MB, so DDP's bucketed overlap buys little over one all-reduce per step. Unused
  parameters need no ``find_unused_parameters``: a parameter no process gave a gradient keeps none.
- The loss of a step is divided by the supervised tokens of the whole step over every process (``sum_ints``), and the
  gradients are summed, not averaged, so the update equals that of one process with all the data.
- Rank 0 alone writes: logging, metrics.jsonl, checkpoints, the final folder. ``on_main`` runs a function there
  and gives every process its result or its exception (so it is also the barrier).
- FSDP2 (``fsdp: full_shard``): ``shard_model`` applies ``fully_shard`` to each decoder layer and to the decoder
  body, so the frozen base weights are split across processes; the trainable parameters (and the few frozen
  tensors the adapter file holds) are left whole on every process (``ignored_params``), so gradients, optimizer,
  checkpoints and ``save_adapter`` are those of the DDP path.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import StorageWeakRef

from ..errors import ConfigError, PhituneError

log = logging.getLogger("phitune")

_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# --- process group ----------------------------------------------------------------------------------------------------


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init(tc) -> bool:
    """Join the process group torchrun describes; True if this call created it (``finish`` then destroys it).

    Nothing happens in a single process, or when the application initialised torch.distributed itself.
    """
    world = launched_world_size()
    if world <= 1 or active():
        return False
    if not dist.is_available():
        raise PhituneError(f"WORLD_SIZE={world}, but this PyTorch build has no torch.distributed")
    missing = [k for k in _TORCHRUN_VARS if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start several processes with "
                          "torchrun (`torchrun --nproc_per_node N -m phitune train CONFIG`), which sets them all")
    cuda = not tc.use_cpu and torch.cuda.is_available()
    backend = tc.ddp_backend or ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ConfigError("training_config.ddp_backend: nccl needs CUDA GPUs"
                          + (" (use_cpu is true)" if tc.use_cpu else " (none is visible)") + "; use gloo on the CPU")
    kwargs = {}
    if cuda:
        local, count = local_rank(), torch.cuda.device_count()
        if local >= count:
            raise ConfigError(f"LOCAL_RANK {local} but this node has {count} visible GPU(s): start at most {count} "
                              "processes per node (torchrun --nproc_per_node)")
        torch.cuda.set_device(local)
        if backend == "nccl":
            kwargs["device_id"] = torch.device("cuda", local)
    dist.init_process_group(backend, timeout=timedelta(seconds=tc.ddp_timeout), **kwargs)
    log.info("process %d of %d (backend %s, local rank %d)", rank(), world_size(), backend, local_rank())
    return True


def finish(created: bool) -> None:
    """Leave the process group if ``init`` created it."""
    if created and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def comm_device() -> torch.device:
    """Where collective tensors live: the process's GPU for nccl, else host memory."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextmanager
def explain_lost_peers(output_dir):
    """Turn a collective that failed because another process is gone (killed, out of memory, its node lost) into a
    PhituneError that says so and how to continue, in every process that is left, instead of a backend traceback.
    A process that stops answering without closing its connections ends the others at ``ddp_timeout``."""
    try:
        yield
    except RuntimeError as exc:
        if not (active() and _lost_peer(exc)):
            raise
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PhituneError(f"process {rank()} of {world_size()}: another process of this run stopped or stopped "
                           f"answering (killed, out of memory, hung, or its node lost): {detail}. Every process stops. "
                           "Start all of them again with "
                           "training_config.resume_from_checkpoint: auto to continue from the last complete "
                           f"checkpoint in {output_dir}/checkpoints") from exc


def _lost_peer(exc: BaseException) -> bool:
    # torch's own types for NCCL and store failures; gloo raises a plain RuntimeError whose text starts with the
    # source file of its TCP transport (e.g. "[.../gloo/transport/tcp/pair.cc:553] Connection closed by peer").
    return isinstance(exc, getattr(dist, "DistError", ())) or "gloo/transport" in str(exc)


# --- collectives ------------------------------------------------------------------------------------------------------


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """All-reduce ``tensor`` in place (sum over processes) and return it; unchanged in one process."""
    if not active():
        return tensor
    buf = tensor.to(comm_device())
    dist.all_reduce(buf)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def sum_ints(*values: int) -> list[int]:
    """Integers summed over processes (token counts)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=comm_device())
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def sum_floats(*values: float) -> list[float]:
    """Numbers summed over processes in float64 (evaluation sums)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return t.tolist()


def sum_gradients(params: list[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over processes with one flat all-reduce (call after accumulation).

    Summed, not averaged: each process already divided its loss by the supervised tokens of the whole step. A
    parameter that no process gave a gradient keeps ``grad = None`` (the optimizer skips it, as in one process).
    """
    if not active() or not params:
        return
    device = comm_device()
    pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(device, torch.float32)
              for p in params]
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=device)
    flat = torch.cat(pieces + [has_grad])
    dist.all_reduce(flat)
    offset = 0
    for p, used in zip(params, flat[-len(params):].tolist()):
        n = p.numel()
        if used:
            g = flat[offset:offset + n].view(p.shape).to(p.device, p.dtype)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)
        offset += n


def broadcast_params(params: list[torch.Tensor]) -> None:
    """Copy rank 0's values of ``params`` to every process (the same LoRA start everywhere, whatever the RNG did)."""
    if not active() or not params:
        return
    device = comm_device()
    with torch.no_grad():
        for p in params:
            buf = p.detach().to(device)
            dist.broadcast(buf, src=0)
            if not _same_storage(buf, p):
                p.copy_(buf)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors share memory. By storage, not data_ptr(): a fake or meta tensor's data_ptr() is 0
    (``phitune plan`` runs this code on fake tensors)."""
    return StorageWeakRef(a.untyped_storage()) == StorageWeakRef(b.untyped_storage())


def broadcast_object(obj):
    """Rank 0's ``obj`` on every process."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list | None:
    """Every process's ``obj`` as a list on rank 0 (None elsewhere, and None in one process)."""
    if not active():
        return None
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def on_main(fn, *args, **kwargs):
    """Run ``fn`` on rank 0 only; every process returns its result or raises its error (also a barrier).

    This is how writing is rank-0-only: output folder checks, checkpoints and the final save run once, and the
    other processes wait for them and stop with the same message if they fail.
    """
    if not active():
        return fn(*args, **kwargs)
    outcome, original = None, None
    if is_main():
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - handed to every process, re-raised below
            original = exc
            outcome = ("error", exc if _picklable(exc) else PhituneError(str(exc)))
    kind, value = broadcast_object(outcome)
    if kind == "error":
        raise original if original is not None else value
    return value


def _picklable(obj) -> bool:
    import pickle

    try:
        pickle.loads(pickle.dumps(obj))
        return True
    except Exception:  # noqa: BLE001
        return False


@contextmanager
def local_main_first():
    """Local rank 0 of each node runs the block first (e.g. writing the data cache); then the others (cache hit)."""
    if active() and local_rank() != 0:
        dist.barrier()
    yield
    if active() and local_rank() == 0:
        dist.barrier()


def seed_per_process(seed: int) -> None:
    """Different, reproducible dropout masks in each process (after the model is built with the shared seed)."""
    if active():
        torch.manual_seed(seed + 1_000_003 * rank())


def nodes() -> int:
    """How many nodes (torchrun agents) the processes run on: GROUP_WORLD_SIZE as torchrun sets it, 1 without."""
    if "GROUP_WORLD_SIZE" in os.environ:
        return int(os.environ["GROUP_WORLD_SIZE"])
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    return max(world_size() // per_node, 1) if per_node else 1


def describe_layout(model, optimizer, tc) -> list[str]:
    """What ``phitune train`` says before step 1 (rank 0 logs it): the world (nodes x processes, backend, FSDP or
    data parallel, what is sharded) and the bytes each process holds: parameters (its shards and the tensors kept
    whole), the adapter (trainable), and the optimizer state (AdamW's two moments, in the parameters' dtype, and a
    float32 step per trainable tensor; allocated at step 1, so counted from the parameters until then)."""
    from torch.distributed.tensor import DTensor

    world, n = world_size(), nodes()
    where = (f"{n} node{'s' * (n > 1)} x {world // n} process{'es' * (world // n > 1)}" if world % n == 0
             else f"{world} processes on {n} nodes")
    if not active():
        what = "one process, no distribution"
    elif tc.fsdp:
        reshard = tc.fsdp_config.get("reshard_after_forward", "shard_grad_op" not in tc.fsdp)
        what = (f"FSDP2 {' '.join(tc.fsdp)}: frozen base sharded over {world} processes (decoder layers and body; "
                f"{'resharded' if reshard else 'kept gathered'} after forward"
                f"{', shards in host memory' if offloads_params(tc) else ''}); LoRA and lm_head whole on each")
    else:
        what = "data parallel: the whole model on every process, trainable gradients all-reduced once per step"
    backend = dist.get_backend() if active() else "none"
    local = lambda p: p.to_local() if isinstance(p, DTensor) else p  # noqa: E731
    nbytes = lambda ps: sum(local(p).numel() * local(p).element_size() for p in ps)  # noqa: E731
    params = list(model.parameters())
    sharded = nbytes(p for p in params if isinstance(p, DTensor))
    trainable = [p for p in params if p.requires_grad]
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    moments = (sum(t.numel() * t.element_size() for t in state) if state
               else 2 * nbytes(trainable) + 4 * len(trainable))
    devices = ", ".join(sorted({str(local(p).device) for p in params}))
    return [f"world: {where}, backend {backend}; {what}",
            f"per process: parameters {_mb(nbytes(params))} ({_mb(sharded)} sharded, {_mb(nbytes(params) - sharded)} "
            f"whole) on {devices}; adapter {_mb(nbytes(trainable))} (trainable, and as much again for its "
            f"gradients); optimizer state {_mb(moments)}"]


def _mb(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def offloads_params(tc) -> bool:
    return "offload" in tc.fsdp or bool(tc.fsdp_config.get("offload_params"))


# --- data -------------------------------------------------------------------------------------------------------------


def split_evenly(units: list, rank: int, world: int) -> list:
    """The ``rank``-th of ``world`` contiguous blocks of ``units``, sizes differing by at most one."""
    base, extra = divmod(len(units), world)
    start = rank * base + min(rank, extra)
    return units[start:start + base + (rank < extra)]


def striped(items: list) -> list:
    """This process's items (every world_size-th, from its rank), padded with None to the same count on every
    process, so that all run the same number of forward passes (FSDP's collectives need it)."""
    world = world_size()
    if world == 1:
        return items
    mine = list(items[rank()::world])
    return mine + [None] * (-(-len(items) // world) - len(mine))


def sharder(rank_: int | None = None, world: int | None = None):
    """``part(entry) -> this process's rows`` of a micro-batch of the global plan (``data.batch_plan``'s rows as they
    are; the entry itself in one process): the r-th contiguous block of rows, so the rows of all the parts are the
    rows of the entry. A part may be empty at the end of an epoch."""
    world = world_size() if world is None else world
    rank_ = rank() if rank_ is None else rank_
    if world == 1:
        return list

    def part(entry) -> list:
        return list(split_evenly(list(entry), rank_, world))

    return part
