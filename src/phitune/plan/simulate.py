"""One steady-state training step of phitune, run on a fake device under torch's MemTracker: the peak memory by
category and every op's FLOPs and bytes (for the roofline in ``gpus.py``).

``simulate_step`` runs the same functions ``phitune train`` runs (add_lora -> gradient checkpointing ->
apply_fast_path -> build_optimization -> batch_maker -> train_step) on a model built from its config.json with
``layers`` decoder layers, inside ``FakeTensorMode`` on "cuda" (``phitune.plan.fakegpu``) or "cpu" (the tests compare
the latter with the same step really run). The batch is collated for real on the CPU first, so sample boundaries and
supervised-token counts are exact; the data-dependent ops on fake tensors are answered from it.

The optimizer state exists before the tracked step (one untracked update first), as after a real run's warm-up:
the peak is that of a steady-state step, what ``torch.cuda.max_memory_allocated`` reports after warm-up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
from dataclasses import dataclass, field

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils.flop_counter import flop_registry

from ..adapt import add_lora
from ..models.loading import prepare_kbit_training
from ..config import RunConfig
from ..training import fsdp, loss
from ..training.fast import varlen
from ..training.optim import autocast_context, build_optimization, enable_gradient_checkpointing
from ..training.step import batch_maker, supervised_tokens, train_step
from . import fakegpu


@dataclass
class OpRecord:
    """One aten op of the step: its FLOPs (torch's flop_registry), the bytes of its tensor inputs and outputs,
    whether it computes in half precision, and whether it moves no data (views, factories)."""

    name: str
    flops: int
    nbytes: int
    half: bool
    no_move: bool


@dataclass
class StepSimulation:
    """What one simulated step measured, for one depth."""

    layers: int
    peak: dict[str, int]  # bytes at the step's peak, by MemTracker category (Parameter, Activation, Temp, ...)
    ops: list[OpRecord]
    trainable_bytes: int  # the adapter's parameters
    batch_shape: tuple[int, int]
    supervised: int
    attention_kernels: dict[str, int] = field(default_factory=dict)
    answers: list[str] = field(default_factory=list)
    fast_path: tuple[str, ...] = ()


# Ops that create or alias storage without reading or writing it on a GPU (torch's runtime estimator ignores
# factories too, but charges views as traffic: obstacle 9 of the prototype's notes).
_NO_TRAFFIC = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "alias", "lift_fresh",
               "lift_fresh_copy", "_local_scalar_dense", "detach", "view", "_unsafe_view", "t", "transpose",
               "permute", "expand", "slice", "select", "unsqueeze", "squeeze", "as_strided", "split",
               "split_with_sizes", "unbind", "set_"}


def _gemm_4bit_flops(a, b, shape_b, *rest) -> int:
    """bitsandbytes' fused dequantize + matmul (QLoRA's base forward) is one custom op torch's flop_registry does not
    know: the matmul it is, 2 x M x N x K."""
    return 2 * (a.numel() // a.shape[-1]) * shape_b[0] * shape_b[1]


_EXTRA_FLOPS = {"gemm_4bit": _gemm_4bit_flops}


def _out_of_place(packet):
    """aten.addmm for aten.addmm_ & co.: torch's flop registry knows only the out-of-place ops, so an in-place GEMM
    would otherwise count 0 FLOPs and be priced as a cheap memory pass."""
    name = packet.__name__
    if not name.endswith("_") or name.startswith("_"):
        return None
    return getattr(torch.ops.aten, name[:-1], None)


class OpRecorder(TorchDispatchMode):
    """Records every op below it (FLOPs from torch's own formulas, bytes in and out); computes nothing itself.

    Not torch's RuntimeEstimator: it asserts a real GPU and reads its specs from it, and its roofline halves the
    FLOP count; the per-op cost model lives in ``gpus.py`` instead, priced afterwards for any GPU."""

    def __init__(self):
        super().__init__()
        self.ops: list[OpRecord] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        tensors_in = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        tensors_out = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        nbytes = sum(t.numel() * t.element_size() for t in tensors_in + tensors_out)
        formula = flop_registry.get(packet) or flop_registry.get(_out_of_place(packet))
        if formula is not None:
            flops = int(formula(*args, **kwargs, out_val=out))
        else:
            flops = _EXTRA_FLOPS.get(packet.__name__, lambda *a: 0)(*args)
        half = any(t.dtype in (torch.bfloat16, torch.float16) for t in tensors_in + tensors_out)
        no_move = getattr(func, "is_view", False) or packet.__name__ in _NO_TRAFFIC or not tensors_out
        self.ops.append(OpRecord(packet.__name__, flops, 0 if no_move else nbytes, half, no_move))
        return out


def shaped_config(hf_config, layers: int):
    """The model's config with ``layers`` decoder layers and no KV cache."""
    data = {**hf_config.to_dict(), "num_hidden_layers": layers, "use_cache": False}
    if "layer_types" in data and data["layer_types"]:
        data["layer_types"] = list(data["layer_types"])[:layers]
    return type(hf_config).from_dict(data)


def model_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype:
    """The base weights' dtype as ``phitune train`` resolves it on an Ampere+ GPU (auto: bfloat16) or the CPU."""
    name = cfg.model.dtype
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def worst_case_samples(rows: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    """``rows`` samples of ``length`` tokens, every position supervised: the fullest micro-batch packing can make."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(rows):
        ids = rng.integers(0, vocab, length)
        samples.append({"input_ids": ids, "labels": ids.copy()})
    return samples


def simulate_step(cfg: RunConfig, hf_config, layers: int, device: str = "cuda", samples: list[dict] | None = None,
                  record_ops: bool = True, fake: bool = True, world_size: int = 1,
                  entry: list[list[int]] | None = None) -> StepSimulation:
    """Simulate one optimizer step (one micro-batch) of ``cfg`` with ``layers`` decoder layers on a fake ``device``
    ("cuda" needs ``fakegpu``'s runtime on a CPU-only torch; "cpu" needs nothing). ``samples``: the micro-batch's
    samples (default: the worst case of the config; ``entry``: their rows, default packed next-fit).
    ``fake=False`` runs the very same step for real (on "cpu"): what the simulation is checked against.
    ``world_size`` > 1: rank 0 of a fake process group (data parallel, or FSDP2 with ``training_config.fsdp``), as
    under torchrun."""
    from transformers import AutoModelForCausalLM

    tc, dc = cfg.training_config, cfg.data
    length = dc.max_seq_length
    dev = torch.device(device, 0) if device == "cuda" else torch.device(device)
    dtype = model_dtype(cfg, dev)
    four_bit = cfg.model.load_in_4bit
    lora_dtype = torch.float32  # as train.py: float32 factors
    if four_bit and device == "cuda":
        # bitsandbytes' Params4bit is a _make_subclass tensor: it cannot wrap a FakeTensor, but its registered fake
        # kernels serve the meta device. No autocast there: the factors are kept in the autocast dtype instead and
        # the adapter's float32 bytes are added back afterwards (_float32_adapter).
        dev, fake = torch.device("meta"), False
        lora_dtype = torch.bfloat16 if tc.bf16 else torch.float16 if tc.fp16 else torch.float32
        tc = dataclasses.replace(tc, bf16=False, fp16=False)
    if samples is None:
        samples = worst_case_samples(tc.per_device_train_batch_size, length, hf_config.vocab_size)
    attn = "sdpa" if cfg.model.attn_implementation == "auto" else cfg.model.attn_implementation
    patches = fakegpu.fake_device(dev.type) if fake or dev.type == "meta" else contextlib.nullcontext({})
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    group = fakegpu.fake_process_group(world_size) if world_size > 1 else contextlib.nullcontext()
    with contextlib.ExitStack() as stack, group, patches as kernels, fake_mode:
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(shaped_config(hf_config, layers), attn_implementation=attn,
                                                     dtype=dtype)
        if four_bit:
            stack.enter_context(_bitsandbytes_cache_kept())
            quantize_on(model, dev, cfg.model, dtype)
            prepare_kbit_training(model)
        add_lora(model, cfg.peft_config, lora_dtype=lora_dtype)
        fsdp.prepare_model(model, tc, dev)  # FSDP2 or data parallel; nothing in one process
        enable_gradient_checkpointing(model, tc)
        fast = loss.apply_fast_path(model, tc)
        optimizer, scheduler, scaler = build_optimization(model, tc, dev, total_steps=10)
        autocast = autocast_context(tc, dev)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        _warm_optimizer(optimizer, params)
        with _disable_current_modes():  # a real batch on the CPU: its values are known
            batch = batch_maker(model, None, dc, fast)(samples, entry or list(range(len(samples))))
            rows = batch["input_ids"].shape[0]
            positions = batch.get("position_ids")
            cu, longest = varlen.boundaries(positions) if positions is not None else (range(rows + 1), length)
            supervised = supervised_tokens(batch)
            mask = batch.get("attention_mask")
            unpadded = mask is None or mask.dim() != 2 or bool(mask.all())
        answers = fakegpu.Answers(int_value=length, nonzero_rows={"boundaries": len(cu) - 1, "head_loss": supervised},
                                  scalars={"supervised_tokens": supervised, "boundaries": longest,
                                           # transformers: "no row holds two samples" (then no packed mask)
                                           "find_packed_sequence_indices": len(cu) - 1 == rows,
                                           "fast_all": unpadded})  # transformers: "no padding in this batch"
        tracker = fakegpu.frozen_safe_mem_tracker()
        tracker.track_external(model, optimizer)
        recorder = OpRecorder() if record_ops else contextlib.nullcontext()
        step_loss = functools.partial(loss.forward_loss, fast=fast)
        model.train()
        with answers, tracker, recorder, contextlib.redirect_stdout(io.StringIO()):
            train_step(model, [batch], optimizer, scheduler, scaler, tc, dev, autocast, step_loss)
        peak = fakegpu.peak_by_category(tracker, dev.type)
        trainable = sum(p.numel() * p.element_size() for p in params)
        if lora_dtype != torch.float32:
            peak, trainable = _float32_adapter(peak, trainable, lora_dtype)
    return StepSimulation(layers=layers, peak=peak, ops=recorder.ops if record_ops else [],
                          trainable_bytes=trainable, batch_shape=tuple(batch["input_ids"].shape),
                          supervised=supervised, attention_kernels=dict(kernels),
                          answers=sorted(f"{k} (x{n})" for k, n in answers.log.items()), fast_path=fast.notes)


def quantize_on(model, device: torch.device, model_cfg, dtype: torch.dtype) -> int:
    """Replace every nn.Linear but the output head by a bitsandbytes Linear4bit quantized on ``device``, as
    ``from_pretrained(quantization_config=BitsAndBytesConfig(...))`` does with ``model.quantization``."""
    import bitsandbytes as bnb

    q = model_cfg.quantization
    compute = dtype if q.compute_dtype == "auto" else getattr(torch, q.compute_dtype)
    head = model.get_output_embeddings()
    count = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=compute, compress_statistics=q.double_quant, quant_type=q.type,
                                  device="meta")
        weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, compress_statistics=q.double_quant,
                                   quant_type=q.type, module=layer)
        layer.weight = weight._quantize(device)  # what Params4bit.to(device) does: 4-bit blocks + absmax
        if module.bias is not None:
            layer.bias = module.bias
        model.set_submodule(name, layer)
        count += 1
    return count


@contextlib.contextmanager
def _bitsandbytes_cache_kept():
    """bitsandbytes caches its 8-bit quantization map on the device of the first tensor it quantizes
    (functional.name2qmap): made on meta here, it would break every later real quantization in this process."""
    import bitsandbytes.functional as bnb_functional

    saved = dict(bnb_functional.name2qmap)
    try:
        yield
    finally:
        bnb_functional.name2qmap.clear()
        bnb_functional.name2qmap.update(saved)


def _float32_adapter(peak: dict[str, int], trainable: int, simulated: torch.dtype) -> tuple[dict[str, int], int]:
    """The peak with the adapter (parameters, gradients, AdamW's two moments) in float32 as train.py keeps it, from
    a simulation that kept it in ``simulated`` (2 bytes) for want of autocast."""
    scale = 4 // torch.empty((), dtype=simulated).element_size()
    extra = trainable * (scale - 1)
    peak = dict(peak)
    peak["Parameter"] = peak.get("Parameter", 0) + extra
    grads = min(peak.get("Gradient", 0), trainable)
    opt_extra = peak.get("Optstate", 0) * (scale - 1)
    peak["Gradient"] = peak.get("Gradient", 0) + grads * (scale - 1)
    peak["Optstate"] = peak.get("Optstate", 0) + opt_extra
    peak["Total"] = peak.get("Total", 0) + extra + grads * (scale - 1) + opt_extra
    return peak, trainable * scale


def _warm_optimizer(optimizer, params) -> None:
    """One update with zero gradients: AdamW's state exists, as after the first step of a real run."""
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

