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

from ..adapt import adapter_state_dict, redraw_lora
from ..adapt.inject import PEFT_PREFIX
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
                f"{', shards in host memory' if _offload(tc) else ''}); LoRA and lm_head whole on each")
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


def _offload(tc) -> bool:
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
    # Held tensors are found by name: by data_ptr(), under `phitune plan`'s fake process group every parameter looked
    # held (a fake tensor's data_ptr() is 0) and nothing was sharded; an empty (meta) model's tensors have no storage.
    keep = {id(p) for p in model.parameters() if p.requires_grad}
    held = {k[len(PEFT_PREFIX):].replace(".base_layer.", ".") for k in adapter_state_dict(model)}
    keep |= {id(p) for n, p in model.named_parameters() if n in held}
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        keep.add(id(head.weight))
    ignored = {p for p in model.parameters() if id(p) in keep}

    mesh = init_device_mesh(device.type, (world_size(),))
    reshard = bool(fcfg.get("reshard_after_forward", "shard_grad_op" not in opts))
    offload = CPUOffloadPolicy() if _offload(tc) else OffloadPolicy()
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
            if not isinstance(p, DTensor) and p.device not in (device, _META):
                p.data = p.data.to(device)
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None and not isinstance(buf, DTensor) and buf.device not in (device, _META):
                    module._buffers[name] = buf.to(device)


def loads_on_rank0(tc) -> bool:
    """Whether the processes build the model empty and rank 0 alone reads the checkpoint (FSDP, unless
    ``fsdp_config.cpu_ram_efficient_loading`` is false)."""
    return fsdp_enabled(tc) and bool(tc.fsdp_config.get("cpu_ram_efficient_loading", True))


def prepare_model(model, tc, device: torch.device, checkpoint=None) -> list[str]:
    """After add_lora: the same trainable start on every process, then FSDP2 sharding if asked. Notes to log.

    ``checkpoint``: ``() -> safetensors files``, for an empty model (``loads_on_rank0``); called on rank 0 only.
    """
    if not active():
        return []
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not tc.fsdp:
        broadcast_params(trainable)
        return [f"data parallel over {world_size()} processes: trainable gradients summed once per step"]
    empty = checkpoint is not None
    if not empty:
        broadcast_params(trainable)
    n = shard_model(model, tc, device)
    notes = [f"FSDP2 over {world_size()} processes: {n} decoder layers and the decoder body sharded "
             f"({', '.join(tc.fsdp)}); LoRA parameters whole on every process"]
    if empty:
        materialize(model, device)
        size = fill_from_rank0(model, checkpoint)
        init_lora_everywhere(model, tc.seed)
        notes.append(f"base weights ({size / 2**30:.2f} GiB) read by rank 0 alone and sent shard by shard; "
                     f"LoRA drawn from seed {tc.seed} on every process and checked equal")
    return notes


_META = torch.device("meta")


def checkpoint_tensors(files: list, names) -> list[tuple[str, str]]:
    """(file, tensor name) of each tensor of ``files`` that the model has (``names``), in the files' order."""
    from safetensors import safe_open

    found = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            found += [(str(file), key) for key in f.keys() if key in names]
    return found


def materialize(model, device: torch.device) -> None:
    """Storage on ``device`` for every parameter of an empty, fully_shard-ed model (its shards, and the tensors kept
    whole), uninitialised; buffers are kept (the model computed them). FSDP2's recipe: ``fully_shard`` on the meta
    model, then ``to_empty``; :func:`fill_from_rank0` then receives each shard straight into its storage."""
    kept = [(module, name, buf) for module in model.modules() for name, buf in module._buffers.items()
            if buf is not None and buf.device != _META]
    places: dict[int, list] = {}  # a parameter shared by modules (tied embeddings) and where it sits
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                places.setdefault(id(p), []).append((module, name))
    model.to_empty(device=device)  # from meta, torch gives each module a new Parameter: ties are lost
    for module, name, buf in kept:
        module._buffers[name] = buf.to(device)
    for (owner, first), *others in (p for p in places.values() if len(p) > 1):
        for module, name in others:
            module._parameters[name] = owner._parameters[first]


def fill_from_rank0(model, checkpoint) -> int:
    """Fill a materialized, fully_shard-ed model's base weights: rank 0 reads the files ``checkpoint()`` lists
    (called there only; its error, e.g. no safetensors, stops every process) one tensor at a time and sends each
    process its dim-0 chunk straight into that process's shard storage (whole tensors, those fully_shard left alone,
    are broadcast into place). Returns the bytes read. Parameters the files lack (all but the LoRA factors) stop it
    before any is read, with their names.

    Not ``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)``, the documented route, which
    broadcasts every full tensor to every process: measured with benchmarks/loading_memory.py (2 processes, gloo),
    its receive buffers, freed but kept by the C allocator, left the process that reads nothing at 0.70x the model
    (430 MB model) and the node at 1.26x the single-process peak (1.34x at 180 MB), and each call walks the whole
    model (~0.1 s, per tensor or group). Here a process receives only its chunk, in place: 0.60x, 1.17x (1.26x at
    180 MB)."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    state = model.state_dict(keep_vars=True)
    tensors = on_main(lambda: checkpoint_tensors(checkpoint(), state))
    # every parameter but the LoRA factors (drawn from the seed) comes from the files, modules_to_save included
    needed = {n for n, _ in model.named_parameters() if not n.endswith((".lora_A", ".lora_B"))}
    missing = sorted(needed - {k for _, k in tensors})
    if missing:
        raise PhituneError(f"the checkpoint of this model has no {', '.join(missing[:5])}"
                           f"{' ...' if len(missing) > 5 else ''}; rank 0 cannot send them. Set "
                           "training_config.fsdp_config.cpu_ram_efficient_loading: false to load it with "
                           "transformers in every process")
    device, size = _comm_device(), 0
    with torch.no_grad():
        for file, key in tensors:
            target, full = state[key], None
            if is_main():
                with safe_open(file, framework="pt") as f:  # opened per tensor: its mapped pages are let go each time
                    full = f.get_tensor(key).to(target.dtype)
                size += full.numel() * full.element_size()
            if isinstance(target, DTensor):
                _scatter_rows(key, full, target, device)
            else:
                _broadcast_into(full, target.data, device)
    return size


def _scatter_rows(key: str, full, target, device: torch.device) -> None:
    """Rank 0 sends process r the r-th ``torch.chunk`` of ``full``'s rows, the split of DTensor's Shard(0) (checked
    against the shard each process holds); each process receives into its own shard."""
    from torch.distributed.tensor import Shard

    local, world = target.to_local(), world_size()
    rows = [c.shape[0] for c in torch.empty(target.shape[0], device=_META).chunk(world)]
    rows += [0] * (world - len(rows))
    if tuple(target.placements) != (Shard(0),) or local.shape[0] != rows[rank()]:
        raise PhituneError(f"{key}: this process holds {tuple(local.shape)} of {tuple(target.shape)} "
                           f"({target.placements}), not the rows torch.chunk gives; set "
                           "training_config.fsdp_config.cpu_ram_efficient_loading: false")
    if is_main():
        start = rows[0]
        local.copy_(full[:start])
        for r in range(1, world):
            if rows[r]:
                dist.send(full[start:start + rows[r]].contiguous().to(device), dst=r)
            start += rows[r]
    elif local.numel():
        buf = local if local.device == device else torch.empty_like(local, device=device)
        dist.recv(buf, src=0)
        if buf is not local:
            local.copy_(buf)


def _broadcast_into(full, target: torch.Tensor, device: torch.device) -> None:
    """Rank 0's ``full`` into ``target`` on every process."""
    buf = target if target.device == device else torch.empty_like(target, device=device)
    if is_main():
        buf.copy_(full)
    dist.broadcast(buf, src=0)
    if buf is not target:
        target.copy_(buf)


def init_lora_everywhere(model, seed: int) -> None:
    """Give the LoRA factors of an empty model their start: drawn from ``seed`` in add_lora's order on every process
    (the values one process gets from the same seed), then compared with rank 0's."""
    torch.manual_seed(seed)
    redraw_lora(model)
    check_same_everywhere([(n, p) for n, p in model.named_parameters() if p.requires_grad])


def check_same_everywhere(named: list[tuple[str, torch.Tensor]]) -> None:
    """Raise unless every process holds rank 0's values of these tensors, bit for bit."""
    if not active() or not named:
        return
    device = _comm_device()
    mine = torch.cat([t.detach().reshape(-1).to(device, torch.float64) for _, t in named])
    theirs = mine.clone()
    dist.broadcast(theirs, src=0)
    differs = torch.tensor([float(not torch.equal(mine, theirs))], device=device)
    dist.all_reduce(differs)
    if differs.item():
        offset, first = 0, None
        for name, t in named:
            if first is None and not torch.equal(mine[offset:offset + t.numel()], theirs[offset:offset + t.numel()]):
                first = name
            offset += t.numel()
        raise PhituneError(f"the trainable parameters differ between processes ({int(differs.item())} of "
                           f"{world_size()} differ from rank 0{', first ' + first if first else ''}): every process "
                           "must draw the LoRA start from the same seed and the same code")
