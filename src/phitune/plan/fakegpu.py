"""A fake CUDA GPU for ``phitune plan``: FakeTensorMode tensors on "cuda" (shapes and dtypes, no memory), with
what a real GPU would answer where torch or transformers ask the hardware.

Everything here is undone when the ``with fake_device()`` block ends; nothing is patched at import. Each patch names
the upstream behaviour it works around (found on torch 2.13 / transformers 5.25; each upgrade may need a re-check):

1. backward on a CPU-only torch needs a CUDA device guard: ``fake_cuda_runtime.cpp``, built once with
   ``torch.utils.cpp_extension`` and loaded before ``import torch`` in a fresh process (``worker_command``);
2. FakeTensorMode warms up the GPU context by allocating a real tensor (``fake_tensor.init_gpu_context``);
3. ``Module.to()`` on fake parameters: ``torch.utils.swap_tensors`` refuses the weakref.KeyedRef FakeTensorMode keeps
   in its memo (pytorch PRs #184976, #196558, not in 2.13);
4. CUDA autocast and ``torch.cuda.is_bf16_supported`` switch off when no GPU is present;
5. transformers counts any FakeTensor as "tracing" and then always builds the causal mask (sdpa leaves flash);
6. sdpa picks its *math* kernel for fake tensors (the fp32 (B, H, T, T) matrix saved): ``sdpa_kernel`` routes
   to the aten kernel the device would pick (CUDA, or the CPU for the tests' comparison with a real run);
7. data-dependent ops (``.item()``, ``nonzero``) get answers from ``Answers``, which logs each one with its caller;
8. torch's MemTracker hooks every parameter's gradient and fails on frozen ones: ``FrozenSafeMemTracker``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import traceback
import weakref
from collections import Counter
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from ..errors import PhituneError

aten = torch.ops.aten
SHIM_SOURCE = Path(__file__).resolve().with_name("fake_cuda_runtime.cpp")
SHIM_NAME = "phitune_fake_cuda_runtime"
_PLAN_DIR = str(Path(__file__).resolve().parent)


class PlanUnsupported(PhituneError):
    """The step cannot be simulated (an architecture or kernel without a fake implementation)."""


# --- the C++ shim: built once, loaded before torch in the worker process ------------------------------------------


def shim_needed() -> bool:
    """A CPU-only torch has no CUDA device guard; a CUDA build simulates without one (no GPU needed either)."""
    return torch.version.cuda is None


def shim_dir() -> Path:
    """Where the built shim is cached: one folder per torch version (its C++ ABI)."""
    root = Path(os.environ.get("PHITUNE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "phitune")
    return root / "fake_cuda" / f"torch-{torch.__version__}"


def shim_path() -> Path:
    return shim_dir() / f"{SHIM_NAME}.so"


def ensure_shim(log=None) -> Path | None:
    """The shim's path (built now if missing, in a child process so that this one keeps no CUDA guard), or None
    when this torch needs none."""
    if not shim_needed():
        return None
    path = shim_path()
    if path.exists():
        return path
    say = log or (lambda text: print(text, file=sys.stderr, flush=True))
    say(f"phitune plan: this PyTorch is a CPU-only build; building a small C++ library that lets autograd run on a "
        f"fake CUDA device (once, about 10-60 s with torch.utils.cpp_extension; cached in {path.parent})")
    path.parent.mkdir(parents=True, exist_ok=True)
    code = ("import os, sys, torch; from torch.utils import cpp_extension; "
            "lib = os.path.join(os.path.dirname(torch.__file__), 'lib'); "
            "cpp_extension.load(name=sys.argv[1], sources=[sys.argv[2]], build_directory=sys.argv[3], "
            "is_python_module=False, extra_ldflags=['-Wl,-rpath,' + lib], verbose=False)")
    done = subprocess.run([sys.executable, "-c", code, SHIM_NAME, str(SHIM_SOURCE), str(path.parent)],
                          capture_output=True, text=True)
    if done.returncode != 0 or not path.exists():
        raise PlanUnsupported("phitune plan: could not build the fake CUDA runtime (needs a C++ compiler: g++ or "
                              f"clang, and ninja):\n{done.stderr[-2000:]}")
    return path


def worker_command(module: str, shim: Path | None, script: str | None = None, args: list[str] = ()) -> list[str]:
    """``python -c ...`` that loads the shim (RTLD_GLOBAL, before torch) and runs ``module`` (or the file
    ``script``, with ``args``) as __main__."""
    load = f"import ctypes; ctypes.CDLL({str(shim)!r}, mode=ctypes.RTLD_GLOBAL); " if shim is not None else ""
    run = (f"import sys; sys.argv = {[script, *args]!r}; runpy.run_path({script!r}, run_name='__main__')" if script
           else f"runpy.run_module({module!r}, run_name='__main__')")
    return [sys.executable, "-c", f"{load}import runpy; {run}"]


def reexec_on_fake_cuda(script: str, args: list[str]) -> None:
    """For a script that simulates on fake CUDA: replace this process by one with the runtime loaded before torch
    (``PHITUNE_FAKE_CUDA=1`` marks it); returns only in that process (or when none is needed)."""
    if os.environ.get("PHITUNE_FAKE_CUDA") == "1" or not shim_needed():
        return
    command = worker_command("", ensure_shim(), script=script, args=args)
    os.environ["PHITUNE_FAKE_CUDA"] = "1"
    sys.stdout.flush()
    os.execv(command[0], command)


# --- the patches, active only inside ``with fake_cuda()`` ----------------------------------------------------------

_MATH, _FLASH, _EFFICIENT, _FLASH_CPU = "math", "flash", "efficient", "flash_cpu"


def _fake_on(t: torch.Tensor, device_type: str) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    if device_type == "meta":  # the 4-bit base's simulation: meta tensors stand for a CUDA GPU's
        return t.device.type == "meta"
    return isinstance(t, FakeTensor) and t.device.type == device_type


def sdpa_kernel(q, k, v, attn_mask, enable_gqa, dropout_p: float = 0.0) -> str:
    """The kernel torch's sdpa dispatcher picks for these inputs on their device (aten sdp_utils.cpp, torch 2.13).

    CUDA (Ampere or newer): FlashAttention-2 without a mask for fp16/bf16 and head_dim <= 256 (a multiple of 8),
    memory-efficient attention with one, else math. CPU: its flash kernel for dense 4-D inputs with equal head
    counts and no dropout, else math."""
    head_dim, half = q.shape[-1], (torch.float16, torch.bfloat16)
    same_heads = q.shape[-3] == k.shape[-3] == v.shape[-3]
    if q.device.type == "cpu":
        return _FLASH_CPU if q.dim() == 4 and same_heads and not dropout_p else _MATH
    heads_ok = same_heads or (enable_gqa and q.shape[-3] % k.shape[-3] == 0)
    if (attn_mask is None and q.dtype in half and q.dtype == k.dtype == v.dtype and head_dim <= 256
            and head_dim % 8 == 0 and q.dim() == 4 and heads_ok):
        return _FLASH
    if q.dim() == 4 and same_heads and head_dim % (8 if q.dtype in half else 4) == 0:
        return _EFFICIENT
    return _MATH


def _sdpa_as_on_device(original, device_type: str, kernels: Counter):
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if not _fake_on(query, device_type):
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        kernel = sdpa_kernel(query, key, value, attn_mask, enable_gqa, dropout_p)
        kernels[kernel] += 1
        bias = attn_mask
        if bias is not None and bias.dtype == torch.bool:  # sdpa turns a bool mask into an additive one first
            bias = torch.where(bias.logical_not(), float("-inf"), 0.0).to(query.dtype)
        if kernel == _FLASH:
            return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                            scale=scale)[0]
        if kernel == _FLASH_CPU:
            return aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                    attn_mask=bias, scale=scale)[0]
        if kernel == _EFFICIENT:
            lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
            return aten._scaled_dot_product_efficient_attention(query, key, value, bias, lse, dropout_p, is_causal,
                                                                scale=scale)[0]
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)

    return sdpa


def _weakref_without_keyedrefs() -> ModuleType:
    shim = ModuleType("weakref")
    shim.__dict__.update(weakref.__dict__)
    shim.getweakrefs = lambda obj: [r for r in weakref.getweakrefs(obj) if not isinstance(r, weakref.KeyedRef)]
    return shim


@contextlib.contextmanager
def _patched(obj, name: str, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


@contextlib.contextmanager
def fake_device(device_type: str = "cuda"):
    """Inside: fake tensors on ``device_type`` behave as on that device (a CUDA GPU: Ampere or newer; see the module
    docstring); yields a Counter of the sdpa kernels chosen. Everything is restored on exit."""
    import torch._subclasses.fake_tensor as fake_tensor
    import torch.cuda.amp.common as amp_common
    import transformers.masking_utils as masking
    from transformers.utils.import_utils import is_tracing

    kernels: Counter = Counter()
    with contextlib.ExitStack() as stack:
        if device_type == "cuda":
            if shim_needed():  # (2) would allocate a real CUDA tensor
                stack.enter_context(_patched(fake_tensor, "init_gpu_context", lambda device: None))
            stack.enter_context(_patched(torch.utils, "weakref", _weakref_without_keyedrefs()))  # (3)
            stack.enter_context(_patched(amp_common, "amp_definitely_not_available", lambda: False))  # (4)
            stack.enter_context(_patched(torch.cuda, "is_bf16_supported", lambda *a, **k: True))
        # (5) real tracing (torch.fx, dynamo) still counts; a fake tensor's values are asked of Answers instead
        stack.enter_context(_patched(masking, "is_tracing", lambda tensor=None: is_tracing(None)))
        stack.enter_context(_patched(F, "scaled_dot_product_attention",
                                     _sdpa_as_on_device(F.scaled_dot_product_attention, device_type, kernels)))  # (6)
        yield kernels


# --- a process group of N ranks in one process (FSDP2 and data parallel, per rank) ----------------------------------


class _NoEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


class _NoStream(_NoEvent):
    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _NoEvent()


class _CudaHandle:
    """What FSDP2 asks of ``torch.cuda`` (streams, events, the current device), answered without a GPU: on one
    stream nothing needs waiting for."""

    Stream, Event = _NoStream, _NoEvent
    _stream = _NoStream()

    @staticmethod
    def current_device():
        return 0

    @classmethod
    def current_stream(cls, device=None):
        return cls._stream

    @staticmethod
    @contextlib.contextmanager
    def stream(stream):
        yield

    @staticmethod
    def device_count():
        return 1

    @staticmethod
    def is_available():
        return False


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """This process as rank 0 of ``world_size``: torch's "fake" backend (collectives return at once, nothing is
    sent), with FSDP2 given a device handle for "cuda" and its DeviceMesh built outside FakeTensorMode (the mesh
    keeps its rank layout in a real CPU tensor and reads it back). Destroyed on exit."""
    import torch.distributed as dist
    import torch.distributed.device_mesh as device_mesh
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives, _fsdp_init, _fsdp_param_group, _fsdp_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    original_mesh, original_handle = device_mesh.init_device_mesh, device_mesh._get_device_handle

    def real_mesh(*args, **kwargs):
        with _disable_current_modes():
            return original_mesh(*args, **kwargs)

    def handle(device_type: str = "cuda"):
        return _CudaHandle if device_type == "cuda" else original_handle(device_type)

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_patched(device_mesh, "init_device_mesh", real_mesh))
            for module in (_fsdp_collectives, _fsdp_init, _fsdp_param_group, _fsdp_state):
                stack.enter_context(_patched(module, "_get_device_handle", handle))
            yield
    finally:
        dist.destroy_process_group()


# --- answers to data-dependent ops ---------------------------------------------------------------------------------


class Answers(TorchDispatchMode):
    """(7) Answers the ops whose values a fake tensor cannot know, and logs each answer with its caller.

    ``.item()`` etc. (aten._local_scalar_dense): the value ``scalars`` gives for the calling function's name, else
    floats ``1.0`` (a finite loss and gradient norm, so the optimizer steps), bools ``True``, ints ``int_value``.
    ``nonzero``: the row count ``nonzero_rows`` gives for the calling function's name (default: every element).
    Real tensors pass through.
    """

    def __init__(self, *, int_value: int, nonzero_rows: dict[str, int] | None = None,
                 scalars: dict[str, object] | None = None):
        super().__init__()
        self.int_value = int_value
        self.nonzero_rows = dict(nonzero_rows or {})
        self.scalars = dict(scalars or {})
        self.log: Counter = Counter()

    @staticmethod
    def _caller() -> tuple[str, str]:
        for frame in reversed(traceback.extract_stack()[:-3]):
            if "/torch/" not in frame.filename and _PLAN_DIR not in frame.filename:
                return frame.name, f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
        return "?", "?"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten._local_scalar_dense.default, aten.nonzero.default) and _is_fake(args[0]):
            t = args[0]
            name, where = self._caller()
            if func is aten.nonzero.default:
                rows = self.nonzero_rows.get(name, t.numel())
                self.log[f"{where}: nonzero -> {rows} rows"] += 1
                return torch.empty((rows, t.dim()), dtype=torch.long, device=t.device)
            if name in self.scalars:
                value = self.scalars[name]
            elif t.dtype == torch.bool:
                value = True
            else:
                value = 1.0 if t.dtype.is_floating_point else self.int_value
            self.log[f"{where}: {value!r}"] += 1
            return value
        return func(*args, **kwargs)


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or (isinstance(t, torch.Tensor) and t.device.type == "meta")


# --- memory tracking --------------------------------------------------------------------------------------------------


def frozen_safe_mem_tracker():
    """(8) torch's MemTracker, for models with frozen parameters (every LoRA model).

    MemTracker registers a gradient hook on every parameter of each module it meets; on a parameter that does not
    require grad ``register_hook`` raises (torch 2.13). Frozen parameters are counted as parameters, without hooks.
    """
    from torch.distributed._tools import mem_tracker

    class FrozenSafeMemTracker(mem_tracker.MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            def grad_hook(grad):
                self._update_and_maybe_create_winfos(grad, mem_tracker._MemRefType.GRAD)

            param_bytes = buffer_bytes = 0
            for param in module.parameters():
                infos = self._update_and_maybe_create_winfos(param, mem_tracker._MemRefType.PARAM)
                param_bytes += sum(w.mem_consumed for w in infos)
                if param.grad is not None:
                    self._update_and_maybe_create_winfos(param.grad, mem_tracker._MemRefType.GRAD)
                if install_grad_hooks and param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(grad_hook),
                        param.register_post_accumulate_grad_hook(lambda p: grad_hook(p.grad)))
            for buffer in module.buffers():
                infos = self._update_and_maybe_create_winfos(buffer, mem_tracker._MemRefType.BUFFER)
                buffer_bytes += sum(w.mem_consumed for w in infos)
            return param_bytes, buffer_bytes

    return FrozenSafeMemTracker()


def peak_by_category(tracker, device_type: str) -> dict[str, int]:
    """The tracker's peak snapshot of one device type, bytes by category (Parameter, Activation, Temp, ...)."""
    out: dict[str, int] = {}
    for device, snapshot in tracker.get_tracker_snapshot("peak").items():
        if torch.device(device).type != device_type:
            continue
        for kind, nbytes in snapshot.items():
            key = getattr(kind, "value", str(kind))
            out[key] = out.get(key, 0) + int(nbytes)
    return out
