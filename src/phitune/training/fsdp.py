"""FSDP2 under torchrun: the frozen base sharded across processes (``shard_model``: ``fully_shard`` per decoder layer
and on the decoder body; the trainable parameters and what the adapter file holds stay whole on every process), and
memory-efficient loading (``loads_on_rank0``): every process builds the model on the meta device, rank 0 alone reads
the safetensors and sends each process its rows (``fill_from_rank0``); LoRA is drawn from the seed on every process
and checked equal (``init_lora_everywhere``, ``check_same_everywhere``). The process group, collectives and data
shards are distributed.py's.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from ..adapt import adapter_state_dict, redraw_lora
from ..adapt.inject import PEFT_PREFIX
from ..errors import ConfigError, PhituneError
from .fast.cross_entropy import decoder_of


from .distributed import (active, broadcast_params, comm_device, is_main, launched_world_size, offloads_params, on_main,
                          rank, world_size)

log = logging.getLogger("phitune")


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
    offload = CPUOffloadPolicy() if offloads_params(tc) else OffloadPolicy()
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
    device, size = comm_device(), 0
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
    device = comm_device()
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
