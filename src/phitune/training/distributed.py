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

from ..adapt import adapter_state_dict
from ..errors import ConfigError, PhituneError
from .fast.cross_entropy import decoder_of

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


def _comm_device() -> torch.device:
    """Where collective tensors live: the process's GPU for nccl, else host memory."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- collectives ------------------------------------------------------------------------------------------------------


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """All-reduce ``tensor`` in place (sum over processes) and return it; unchanged in one process."""
    if not active():
        return tensor
    buf = tensor.to(_comm_device())
    dist.all_reduce(buf)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def sum_ints(*values: int) -> list[int]:
    """Integers summed over processes (token counts)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def sum_floats(*values: float) -> list[float]:
    """Numbers summed over processes in float64 (evaluation sums)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def sum_gradients(params: list[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over processes with one flat all-reduce (call after accumulation).

    Summed, not averaged: each process already divided its loss by the supervised tokens of the whole step. A
    parameter that no process gave a gradient keeps ``grad = None`` (the optimizer skips it, as in one process).
    """
    if not active() or not params:
        return
    device = _comm_device()
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
    device = _comm_device()
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


# --- FSDP2 ------------------------------------------------------------------------------------------------------------


def fsdp_enabled(tc) -> bool:
    return bool(tc.fsdp) and launched_world_size() > 1


def check_supported(cfg) -> list[str]:
    """Refuse combinations that cannot work, before any slow work; return notes for the ones that do nothing."""
    tc, notes = cfg.training_config, []
    if tc.fsdp and launched_world_size() <= 1:
        notes.append("training_config.fsdp: one process, nothing to shard; launch with torchrun --nproc_per_node N")
        return notes
    if not tc.fsdp:
        if tc.ddp_find_unused_parameters is not None and launched_world_size() > 1:
            notes.append("training_config.ddp_find_unused_parameters: not needed; phitune sums the trainable "
                         "gradients itself after accumulation, and unused ones never stall a step")
        return notes
    if getattr(cfg.model, "load_in_4bit", False):
        raise ConfigError("training_config.fsdp with model.load_in_4bit: QLoRA's 4-bit (bitsandbytes) weights "
                          "cannot be sharded by fully_shard here. Remove fsdp to train QLoRA data-parallel (each "
                          "process holds the 4-bit base, e.g. Phi-3-medium in ~8 GB), or drop load_in_4bit to "
                          "shard a 16-bit base with FSDP")
    if tc.torch_compile:
        raise ConfigError("training_config.fsdp with torch_compile: not supported together (compiled decoder "
                          "layers and FSDP2's sharding hooks are not tested in phitune); set one of them to false")
    return notes


def shard_model(model, tc, device: torch.device) -> int:
    """FSDP2: ``fully_shard`` each decoder layer, then the decoder body (embeddings, final norm); returns how many
    layers. Trainable parameters, tied or adapter-held frozen tensors and the lm_head stay whole on every process
    (the loss calls the body and the lm_head separately, so only the body is an FSDP root)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    opts, fcfg = tc.fsdp, tc.fsdp_config
    wanted = fcfg.get("transformer_layer_cls_to_wrap")
    layers = [m for m in model.modules()
              if (type(m).__name__ in wanted if wanted else type(m).__name__.endswith("DecoderLayer"))]
    if not layers:
        classes = sorted({type(m).__name__ for m in model.modules() if "Layer" in type(m).__name__})
        raise ConfigError(f"training_config.fsdp_config.transformer_layer_cls_to_wrap: no module of class "
                          f"{wanted or '*DecoderLayer'} in this model; its layer classes: {', '.join(classes)}")
    body = decoder_of(model)
    if body is None:
        raise ConfigError(f"training_config.fsdp: {type(model).__name__} has no decoder body "
                          "(base_model_prefix) to shard")
    # Whole on every process: what is trained, what the adapter file holds (e.g. a targeted embedding's base
    # weight), and weights shared between modules (tied embeddings).
    # Held tensors are found by their storage (_same_storage): by data_ptr(), under `phitune plan`'s fake process
    # group every parameter looked held (a fake tensor's data_ptr() is 0) and nothing was sharded.
    keep = {id(p) for p in model.parameters() if p.requires_grad}
    held = list(adapter_state_dict(model).values())
    keep |= {id(p) for p in model.parameters() if any(_same_storage(p, t) for t in held)}
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        keep.add(id(head.weight))
    ignored = {p for p in model.parameters() if id(p) in keep}

    mesh = init_device_mesh(device.type, (world_size(),))
    reshard = bool(fcfg.get("reshard_after_forward", "shard_grad_op" not in opts))
    offload = CPUOffloadPolicy() if ("offload" in opts or fcfg.get("offload_params")) else OffloadPolicy()
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, offload_policy=offload, ignored_params=ignored)
    fully_shard(body, mesh=mesh, reshard_after_forward=reshard, offload_policy=offload, ignored_params=ignored)
    _move_whole_tensors(model, device)
    return len(layers)


def _move_whole_tensors(model, device: torch.device) -> None:
    """Put what fully_shard left unsharded (trainable and kept parameters, buffers) on ``device``."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for p in model.parameters():
            if not isinstance(p, DTensor) and p.device != device:
                p.data = p.data.to(device)
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None and not isinstance(buf, DTensor) and buf.device != device:
                    module._buffers[name] = buf.to(device)


def prepare_model(model, tc, device: torch.device) -> list[str]:
    """After add_lora: the same trainable start on every process, then FSDP2 sharding if asked. Notes to log."""
    if not active():
        return []
    broadcast_params([p for p in model.parameters() if p.requires_grad])
    if not tc.fsdp:
        return [f"data parallel over {world_size()} processes: trainable gradients summed once per step"]
    n = shard_model(model, tc, device)
    return [f"FSDP2 over {world_size()} processes: {n} decoder layers and the decoder body sharded "
            f"({', '.join(tc.fsdp)}); LoRA parameters whole on every process"]
