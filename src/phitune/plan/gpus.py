"""The GPUs ``phitune plan`` prices a step for, and the roofline that prices it.

Each op of the simulated step costs max(bytes / bandwidth, FLOPs / rate) at the GPU's rates: dense bf16/fp16 tensor
rate for ops in half precision, the fp32 rate otherwise. The rates are measured ones where phitune has a
measurement (the H200 of ../shared/bench: 789.4 TFLOP/s bf16 matmul at 8192^3, 4,240.6 GB/s device copy, i.e. 80 % and
88 % of its datasheet), else the datasheet's scaled by those same two ratios. Memory is what
``torch.cuda.get_device_properties(0).total_memory`` reports, in GiB.

Every op is its own kernel (no fusion beyond what phitune's code does), so the sum is a lower bound of what a GPU
reaches; ``TIME_RANGE`` turns it into the range the plan prints (see ``benchmarks/plan_accuracy.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

# What one real GPU achieved against its datasheet (bench/matmul_ceiling.py on the peer's H200).
MATMUL_EFFICIENCY = 789.4 / 989.0
COPY_EFFICIENCY = 4240.6 / 4800.0
# Measured step time / roofline sum on the four H200 rows with a throughput: 1.259-1.327
# (benchmarks/plan_accuracy.py); the plan prints the roofline sum times this range, about +-12 % around them, wider
# than the H200's spread because other GPUs' rates are scaled from their datasheets.
TIME_RANGE = (1.15, 1.5)
# Launch and framework overhead per kernel (the roofline counts none): a CUDA launch costs ~5 us on the host;
# most hide behind the previous kernel, so this is added only to the top of the range.
LAUNCH_S = 5e-6

# Outside torch.cuda.max_memory_allocated, and not seen by MemTracker: the CUDA context (~0.5 GiB), cuBLAS and
# FlashAttention workspaces (the simulation came out 0.06-0.11 GiB below all six H200 measurements), and the
# caching allocator's fragmentation (a few % of the peak).
MARGIN_GIB = 1.0
MARGIN_FRACTION = 0.05


@dataclass(frozen=True)
class GPU:
    """One GPU model: memory (GiB, as torch reports it), dense half-precision tensor rate and fp32 rate (TFLOP/s),
    memory bandwidth (GB/s), bfloat16 support, and where the rates come from."""

    name: str
    memory_gib: float
    half_tflops: float
    fp32_tflops: float
    bandwidth_gbs: float
    bf16: bool = True
    measured: bool = False

    @property
    def matmul_rate(self) -> float:
        """FLOP/s a large half-precision matmul reaches."""
        return self.half_tflops * 1e12 * (1.0 if self.measured else MATMUL_EFFICIENCY)

    @property
    def copy_rate(self) -> float:
        """Bytes/s a device copy reaches."""
        return self.bandwidth_gbs * 1e9 * (1.0 if self.measured else COPY_EFFICIENCY)

    @property
    def source(self) -> str:
        return "measured" if self.measured else "datasheet x H200's measured/datasheet ratio"


# Dense (no sparsity) datasheet rates; the H200 row is measured (bench/README.md).
GPUS = {g.name: g for g in (
    GPU("H200", 139.8, 789.4, 67.0, 4240.6, measured=True),
    GPU("H100", 79.1, 989.0, 67.0, 3350.0),
    GPU("H100-PCIe", 79.1, 756.0, 51.0, 2000.0),
    GPU("A100-80GB", 79.2, 312.0, 19.5, 2039.0),
    GPU("A100-40GB", 39.4, 312.0, 19.5, 1555.0),
    GPU("L40S", 44.4, 362.0, 91.6, 864.0),
    GPU("L4", 22.0, 121.0, 30.3, 300.0),
    GPU("A10G", 22.0, 70.0, 31.2, 600.0),
    GPU("RTX4090", 23.6, 165.0, 82.6, 1008.0),
    GPU("RTX3090", 23.7, 71.0, 35.6, 936.0),
    GPU("T4", 14.6, 65.0, 8.1, 320.0, bf16=False),
)}
DEFAULT_GPUS = ("H200", "H100", "A100-80GB", "A100-40GB", "L40S", "L4", "A10G", "RTX4090", "RTX3090", "T4")


def gpu(name: str) -> GPU:
    """The table's GPU for ``name`` (case and punctuation ignored: h100, A100_80GB, rtx-4090)."""
    key = _plain(name)
    for g in GPUS.values():
        if _plain(g.name) == key:
            return g
    raise ConfigError(f"--gpu {name}: not in phitune's GPU table ({', '.join(GPUS)}); for another GPU give its "
                      "memory with --gpu-memory GIB")


def custom_gpu(memory_gib: float) -> GPU:
    """A GPU known only by its memory (--gpu-memory): fits or not, no step time."""
    return GPU(f"{memory_gib:g} GiB GPU", float(memory_gib), 0.0, 0.0, 0.0)


def _plain(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def op_seconds(flops: int, nbytes: int, half: bool, g: GPU) -> float:
    """One op's roofline time on ``g``."""
    rate = g.matmul_rate if half else g.fp32_tflops * 1e12 * (1.0 if g.measured else MATMUL_EFFICIENCY)
    return max(nbytes / g.copy_rate, flops / rate if rate else 0.0)


def roofline_seconds(ops, g: GPU) -> float:
    """The step's roofline: every op priced on its own and summed."""
    return sum(op_seconds(o.flops, o.nbytes, o.half, g) for o in ops if not o.no_move)


def kernels(ops) -> int:
    """Ops that launch a kernel on a GPU (views and factories do not)."""
    return sum(1 for o in ops if not o.no_move)


def fits(total_gib: float, memory_gib: float) -> tuple[bool, float]:
    """(fits, GiB left) for a peak of ``total_gib`` on a GPU of ``memory_gib``, after the margin."""
    need = total_gib * (1 + MARGIN_FRACTION) + MARGIN_GIB
    return need <= memory_gib, round(memory_gib - need, 2)
