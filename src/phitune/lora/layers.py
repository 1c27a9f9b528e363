"""LoRA layers with loralib 0.1.2's API (names, arguments, shapes, init, scaling, merge on eval).

What differs from loralib 0.1.2 (microsoft/LoRA, loralib/layers.py), on purpose, fixing its known bugs:
- ``train()``/``eval()`` return the layer; ``merge()``/``unmerge()``/``delta_weight()`` are explicit methods.
- merge then unmerge restores the frozen weight bit-exactly in any dtype: ``merge()`` keeps a copy of the pre-merge
  weight (a non-persistent buffer) and ``unmerge()`` restores it. Cost: one extra copy of the weight while merged.
  Re-subtracting B@A cannot be exact in bf16 (loralib drifts by ~7e-3 after 20 cycles), and a stored rounding
  correction is only exact if B@A is recomputed bit-identically, which BLAS does not promise.
- ``state_dict()`` always holds the unmerged weight and loading into a merged layer unmerges, loads, re-merges,
  so a LoRA checkpoint loaded after ``eval()`` takes effect and a merged checkpoint never applies ΔW twice.
- ``lora_dropout=0`` is an ``nn.Identity`` (picklable), not a lambda.
- MergedLinear takes unequal groups (``out_splits``) and its forward uses low-rank products only.
- Conv1d/2d/3d subclass nn.ConvNd (state_dict keys ``weight, bias, lora_A, lora_B``) and work for any kernel.
- ``use_rslora`` (scaling = lora_alpha / sqrt(r)) and ``lora_dtype`` (e.g. float32 LoRA on a bf16 base).
- Bad arguments raise ValueError naming the argument before any parameter is created.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LoRALayer", "Linear", "Embedding", "MergedLinear", "Conv1d", "Conv2d", "Conv3d"]


def _check_lora_args(r, lora_dropout=0.0, lora_dtype=None):
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r must be an int >= 0 (0 = no LoRA), got {r!r}")
    if not (isinstance(lora_dropout, (int, float)) and 0 <= lora_dropout < 1):
        raise ValueError(f"lora_dropout must be a float in [0, 1), got {lora_dropout!r}")
    if lora_dtype is not None and not (isinstance(lora_dtype, torch.dtype) and lora_dtype.is_floating_point):
        raise ValueError(f"lora_dtype must be None or a floating torch.dtype (e.g. torch.float32), got {lora_dtype!r}")


class LoRALayer:
    """Mixin holding the LoRA hyper-parameters and the merge protocol shared by every layer.

    A concrete layer creates ``lora_A``/``lora_B`` and implements ``_delta_parts(dtype)``, which yields
    ``(index, delta)`` pairs: ``weight[index] += delta`` merges the adapter (scaling included).
    ``adapter_disabled`` (set by :func:`phitune.lora.disable_adapters`) makes forward the base layer's alone.
    """

    # A class default rather than an __init__ attribute, so layers built around existing modules or unpickled from
    # older versions have it too.
    adapter_disabled = False

    def __init__(self, r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool, *,
                 use_rslora: bool = False, lora_dtype: torch.dtype | None = None):
        _check_lora_args(r, lora_dropout, lora_dtype)
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.merge_weights = merge_weights
        self.use_rslora = use_rslora
        self.lora_dtype = lora_dtype
        # rsLoRA (Kalajdzievski 2023): alpha/sqrt(r) keeps the update's scale stable as r grows.
        self.scaling = (lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r) if r > 0 else 0.0
        self.register_buffer("_unmerged_weight", None, persistent=False)

    def _make_lora_params(self, a_shape, b_shape):
        w = self.weight
        dtype = self.lora_dtype or w.dtype
        self.lora_A = nn.Parameter(w.new_zeros(a_shape, dtype=dtype))
        self.lora_B = nn.Parameter(w.new_zeros(b_shape, dtype=dtype))
        w.requires_grad = False

    def _has_lora(self) -> bool:
        return self.r > 0 and "lora_A" in self._parameters

    def _lora_active(self) -> bool:
        """Whether forward adds the LoRA branch: an adapter that is neither merged nor switched off."""
        return not self.merged and not self.adapter_disabled and self._has_lora()

    def _delta_parts(self, dtype):
        raise NotImplementedError(f"{type(self).__name__} does not define _delta_parts")

    def delta_weight(self) -> torch.Tensor:
        """ΔW·scaling as a float32 tensor in the base weight's layout (zeros where no adapter applies)."""
        delta = torch.zeros(self.weight.shape, dtype=torch.float32, device=self.weight.device)
        if self._has_lora():
            with torch.no_grad():
                for index, part in self._delta_parts(torch.float32):
                    delta[index] = part
        return delta

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW·scaling into the weight (float32 math, one rounding); a no-op when already merged, or while the
        adapter is switched off (phitune.lora.disable_adapters: eval() must not fold it back in)."""
        if self.merged or self.adapter_disabled:
            return
        if self._has_lora():
            w = self.weight
            self._unmerged_weight = w.detach().clone()
            compute = torch.promote_types(w.dtype, torch.float32)
            for index, part in self._delta_parts(compute):
                w[index] = w[index].to(compute) + part
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact pre-merge weight; a no-op when not merged."""
        if not self.merged:
            return
        if self._unmerged_weight is not None:
            self.weight.copy_(self._unmerged_weight)
            self._unmerged_weight = None
        self.merged = False

    def train(self, mode: bool = True):
        super().train(mode)
        if self.merge_weights:
            self.unmerge() if mode else self.merge()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged and self._unmerged_weight is not None:
            destination[prefix + "weight"] = self._unmerged_weight

    def _load_from_state_dict(self, *args, **kwargs):
        was_merged = self.merged
        self.unmerge()
        super()._load_from_state_dict(*args, **kwargs)
        if was_merged:
            self.merge()

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return f"{text}, r={self.r}, lora_alpha={self.lora_alpha}" if self.r > 0 else text


def _lora_linear(x, weight, bias, x_lora, A, B, scaling):
    """x Wᵀ + b + scaling · x_lora Aᵀ Bᵀ, never forming B·A; the LoRA branch runs in A's dtype."""
    shape = x.shape[:-1]
    x, x_lora = x.reshape(-1, x.shape[-1]), x_lora.reshape(-1, x.shape[-1])
    result = F.linear(x, weight, bias)
    h = F.linear(x_lora.to(A.dtype), A) * scaling  # scaling the (N, r) tensor is cheaper than the (N, out) one
    if result.dtype == B.dtype:
        # Accumulating in place into the 2-D base output (not a view of it, which autograd would copy)
        # saves an (N, out) temporary and a pass over it, forward and backward.
        result.addmm_(h, B.t())
    else:
        result = result + F.linear(h, B).to(result.dtype)
    return result.view(*shape, result.shape[-1])


def _linear_shape(weight, fan_in_fan_out):
    """(in_features, out_features) of a 2-D weight stored as (out, in), or (in, out) with fan_in_fan_out."""
    if weight.dim() != 2:
        raise ValueError(f"from_linear needs a 2-D weight, got shape {tuple(weight.shape)}")
    return tuple(weight.shape) if fan_in_fan_out else tuple(reversed(weight.shape))


def _wrap_linear(cls, linear, fan_in_fan_out):
    """An instance of cls that holds linear's weight/bias Parameters as they are (no copy, no init)."""
    in_features, out_features = _linear_shape(linear.weight, fan_in_fan_out)
    self = cls.__new__(cls)
    nn.Module.__init__(self)
    self.in_features, self.out_features = in_features, out_features
    self.weight = linear.weight
    self.register_parameter("bias", linear.bias)
    return self


class Linear(LoRALayer, nn.Linear):
    """nn.Linear with a rank-r adapter: y = x Wᵀ + b + dropout(x) Aᵀ Bᵀ · scaling."""

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False, merge_weights: bool = True, *,
                 use_rslora: bool = False, lora_dtype: torch.dtype | None = None, **kwargs):
        _check_lora_args(r, lora_dropout, lora_dtype)
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        self._init_lora(r, lora_alpha, lora_dropout, fan_in_fan_out, merge_weights, use_rslora, lora_dtype)
        # Draw the base init a second time, as loralib does, so seeded models match loralib's bit for bit.
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.t().contiguous()

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 0, lora_alpha: float = 1, lora_dropout: float = 0.0,
                    fan_in_fan_out: bool = False, merge_weights: bool = True, *, use_rslora: bool = False,
                    lora_dtype: torch.dtype | None = None) -> "Linear":
        """Wrap an existing layer's weight/bias Parameters (shared, not copied or re-initialised).

        With fan_in_fan_out the weight is taken as stored (in, out), e.g. GPT-2's Conv1D.
        """
        _check_lora_args(r, lora_dropout, lora_dtype)
        self = _wrap_linear(cls, linear, fan_in_fan_out)
        self._init_lora(r, lora_alpha, lora_dropout, fan_in_fan_out, merge_weights, use_rslora, lora_dtype)
        self._reset_lora()
        nn.Module.train(self, linear.training)  # mode flags only: a fresh adapter has nothing to merge
        return self

    def _init_lora(self, r, lora_alpha, lora_dropout, fan_in_fan_out, merge_weights, use_rslora, lora_dtype):
        LoRALayer.__init__(self, r, lora_alpha, lora_dropout, merge_weights,
                           use_rslora=use_rslora, lora_dtype=lora_dtype)
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0:
            self._make_lora_params((r, self.in_features), (self.out_features, r))

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)
        self._reset_lora()

    def _reset_lora(self) -> None:
        if "lora_A" in self._parameters:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def _delta_parts(self, dtype):
        delta = (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling
        yield (), delta.t() if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.t() if self.fan_in_fan_out else self.weight
        if not self._lora_active():
            return F.linear(x, weight, self.bias)
        return _lora_linear(x, weight, self.bias, self.lora_dropout(x), self.lora_A, self.lora_B, self.scaling)


def group_layout(sizes: Sequence[int], enable_lora: Sequence[bool]) -> list[tuple[int, int]]:
    """(first output row, size) of each enabled group of a fused layer, in lora_A/lora_B order."""
    starts = [sum(sizes[:g]) for g in range(len(sizes))]
    return [(s, n) for s, n, on in zip(starts, sizes, enable_lora) if on]


class MergedLinear(LoRALayer, nn.Linear):
    """A fused projection (e.g. qkv) whose output groups each get an optional rank-r adapter.

    ``enable_lora`` says which groups are adapted; ``out_splits`` gives their sizes (default: equal groups).
    With n enabled groups ``lora_A`` is (r·n, in) and ``lora_B`` is (sum of enabled sizes, r): the k-th enabled
    group uses ``lora_A[k·r:(k+1)·r]`` and the next ``size_k`` rows of ``lora_B``.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, enable_lora: Sequence[bool] = (False,), fan_in_fan_out: bool = False,
                 merge_weights: bool = True, *, out_splits: Sequence[int] | None = None, use_rslora: bool = False,
                 lora_dtype: torch.dtype | None = None, **kwargs):
        _check_lora_args(r, lora_dropout, lora_dtype)
        sizes = self._group_sizes(out_features, enable_lora, out_splits)
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        self._init_lora(r, lora_alpha, lora_dropout, enable_lora, sizes, fan_in_fan_out, merge_weights,
                        use_rslora, lora_dtype)
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.t().contiguous()

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 0, lora_alpha: float = 1, lora_dropout: float = 0.0,
                    enable_lora: Sequence[bool] = (False,), fan_in_fan_out: bool = False, merge_weights: bool = True,
                    *, out_splits: Sequence[int] | None = None, use_rslora: bool = False,
                    lora_dtype: torch.dtype | None = None) -> "MergedLinear":
        """Wrap an existing fused layer's weight/bias Parameters (shared, not copied or re-initialised)."""
        _check_lora_args(r, lora_dropout, lora_dtype)
        _, out_features = _linear_shape(linear.weight, fan_in_fan_out)
        sizes = cls._group_sizes(out_features, enable_lora, out_splits)
        self = _wrap_linear(cls, linear, fan_in_fan_out)
        self._init_lora(r, lora_alpha, lora_dropout, enable_lora, sizes, fan_in_fan_out, merge_weights,
                        use_rslora, lora_dtype)
        self._reset_lora()
        nn.Module.train(self, linear.training)
        return self

    @staticmethod
    def _group_sizes(out_features, enable_lora, out_splits):
        if isinstance(enable_lora, (str, bytes)) or not isinstance(enable_lora, Sequence) or not enable_lora \
                or not all(isinstance(e, bool) for e in enable_lora):
            raise ValueError("enable_lora must be a non-empty list of bools (one per output group), "
                             f"got {enable_lora!r}")
        groups = len(enable_lora)
        if out_splits is None:
            if out_features % groups:
                raise ValueError(f"The length of enable_lora must divide out_features: {groups} groups do not divide "
                                 f"out_features={out_features}; pass out_splits=[...] for groups of unequal size")
            return [out_features // groups] * groups
        sizes = list(out_splits)
        if len(sizes) != groups or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes) \
                or sum(sizes) != out_features:
            raise ValueError(f"out_splits must be {groups} positive ints (one per enable_lora entry) summing to "
                             f"out_features={out_features}, got {out_splits!r}")
        return sizes

    def _init_lora(self, r, lora_alpha, lora_dropout, enable_lora, sizes, fan_in_fan_out, merge_weights,
                   use_rslora, lora_dtype):
        LoRALayer.__init__(self, r, lora_alpha, lora_dropout, merge_weights,
                           use_rslora=use_rslora, lora_dtype=lora_dtype)
        self.enable_lora = list(enable_lora)
        self.out_splits = list(sizes)
        self.fan_in_fan_out = fan_in_fan_out
        self._lora_groups = group_layout(sizes, enable_lora)
        if r > 0 and self._lora_groups:
            n_rows = sum(n for _, n in self._lora_groups)
            self._make_lora_params((r * len(self._lora_groups), self.in_features), (n_rows, r))
            # loralib's row mask of the adapted output rows: a plain attribute, not saved in state_dict
            self.lora_ind = torch.zeros(self.out_features, dtype=torch.bool, device=self.weight.device)
            for start, size in self._lora_groups:
                self.lora_ind[start:start + size] = True

    def _has_lora(self) -> bool:
        return self.r > 0 and bool(self._lora_groups)

    reset_parameters = Linear.reset_parameters
    _reset_lora = Linear._reset_lora

    def _group_factors(self, dtype=None):
        """(first output row, B_k, A_k) for each enabled group."""
        A, B, r, row = self.lora_A, self.lora_B, self.r, 0
        if dtype is not None:
            A, B = A.to(dtype), B.to(dtype)
        for k, (start, size) in enumerate(self._lora_groups):
            yield start, B[row:row + size], A[k * r:(k + 1) * r]
            row += size

    def _delta_parts(self, dtype):
        for start, B_k, A_k in self._group_factors(dtype):
            delta = (B_k @ A_k) * self.scaling
            rows = slice(start, start + B_k.shape[0])
            yield ((slice(None), rows), delta.t()) if self.fan_in_fan_out else ((rows,), delta)

    def expanded_B(self) -> torch.Tensor:
        """(out, r·n) matrix holding each B_k in its group's rows and its own r columns, zeros elsewhere: the B of
        one plain LoRA on the whole fused layer (what the PEFT file holds).

        x Aᵀ (N, r·n) times its transpose gives every group's update in one small matmul (N·out·r·n flops).
        """
        if len(self._lora_groups) == 1 and self._lora_groups[0] == (0, self.out_features):
            return self.lora_B
        r = self.r
        full = self.lora_B.new_zeros(self.out_features, r * len(self._lora_groups))
        for k, (start, B_k, _) in enumerate(self._group_factors()):
            full[start:start + B_k.shape[0], k * r:(k + 1) * r] = B_k
        return full

    def compact_B(self, full: torch.Tensor) -> torch.Tensor:
        """The inverse of ``expanded_B``: the enabled groups' blocks of ``full`` stacked as this layer's lora_B.
        Raises ValueError when ``full`` has non-zero values outside those blocks (not a per-group LoRA)."""
        r, blocks, rest = self.r, [], full.clone()
        for k, (start, size) in enumerate(self._lora_groups):
            blocks.append(full[start:start + size, k * r:(k + 1) * r])
            rest[start:start + size, k * r:(k + 1) * r] = 0
        if rest.abs().max() > 0:
            raise ValueError("lora_B is not block-structured per enabled group")
        return torch.cat(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.t() if self.fan_in_fan_out else self.weight
        if not self._lora_active():
            return F.linear(x, weight, self.bias)
        return _lora_linear(x, weight, self.bias, self.lora_dropout(x), self.lora_A, self.expanded_B(), self.scaling)


class Embedding(LoRALayer, nn.Embedding):
    """nn.Embedding with a rank-r adapter; A starts at zero and B ~ N(0, 1), as in loralib (see its PR #14)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 0, lora_alpha: float = 1,
                 merge_weights: bool = True, *, use_rslora: bool = False, lora_dtype: torch.dtype | None = None,
                 **kwargs):
        _check_lora_args(r, 0.0, lora_dtype)
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        LoRALayer.__init__(self, r, lora_alpha, 0.0, merge_weights, use_rslora=use_rslora, lora_dtype=lora_dtype)
        if r > 0:
            self._make_lora_params((r, num_embeddings), (embedding_dim, r))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.Embedding.reset_parameters(self)
        if "lora_A" in self._parameters:
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def _delta_parts(self, dtype):
        yield (), ((self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = nn.Embedding.forward(self, x)
        if not self._lora_active():
            return result
        after_A = F.embedding(x, self.lora_A.t(), self.padding_idx, self.max_norm, self.norm_type,
                              self.scale_grad_by_freq, self.sparse)
        return result + (after_A @ (self.lora_B.t() * self.scaling)).to(result.dtype)


class _ConvLoRA(LoRALayer):
    """LoRA for nn.ConvNd: ΔW = (B·A).view(weight.shape) with loralib's shapes, generalised to any kernel.

    For kernel (k0, k1, ...) with P = k0·k1·...: A is (r·k0, in·P/k0) and B is (out/groups·k0, r·k0); for a square
    2-D kernel this is loralib's (r·k, in·k) and (out/groups·k, r·k).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, merge_weights: bool = True, *, use_rslora: bool = False,
                 lora_dtype: torch.dtype | None = None, **kwargs):
        _check_lora_args(r, lora_dropout, lora_dtype)
        dims = self._conv_dims
        ks = (kernel_size,) * dims if isinstance(kernel_size, int) and not isinstance(kernel_size, bool) \
            else tuple(kernel_size) if isinstance(kernel_size, Sequence) else None
        if ks is None or len(ks) != dims or not all(isinstance(k, int) and k > 0 for k in ks):
            raise ValueError(f"kernel_size must be a positive int or a tuple of {dims} positive ints, "
                             f"got {kernel_size!r}")
        groups = kwargs.get("groups", 1)
        if not isinstance(groups, int) or groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"groups must be a positive int dividing in_channels={in_channels} and "
                             f"out_channels={out_channels}, got {groups!r}")
        self._conv_cls.__init__(self, in_channels, out_channels, ks, **kwargs)
        LoRALayer.__init__(self, r, lora_alpha, lora_dropout, merge_weights, use_rslora=use_rslora,
                           lora_dtype=lora_dtype)
        if r > 0:
            k0, rest = ks[0], math.prod(ks[1:])
            self._make_lora_params((r * k0, in_channels * rest), (out_channels // groups * k0, r * k0))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._conv_cls.reset_parameters(self)
        Linear._reset_lora(self)

    def _delta(self, dtype=None):
        A, B = (self.lora_A, self.lora_B) if dtype is None else (self.lora_A.to(dtype), self.lora_B.to(dtype))
        return (B @ A).view(self.weight.shape) * self.scaling

    def _delta_parts(self, dtype):
        yield (), self._delta(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._lora_active():
            return self._conv_forward(x, self.weight, self.bias)
        delta = self._delta()
        if isinstance(self.lora_dropout, nn.Identity) and delta.dtype == self.weight.dtype:
            return self._conv_forward(x, self.weight + delta, self.bias)  # one conv with W + ΔW
        # Dropout on the LoRA branch input needs a second conv over the dropped-out input (about 2x the conv cost).
        result = self._conv_forward(x, self.weight, self.bias)
        return result + self._conv_forward(self.lora_dropout(x).to(delta.dtype), delta, None).to(result.dtype)


class Conv1d(_ConvLoRA, nn.Conv1d):
    """nn.Conv1d with a LoRA adapter: Conv1d(in, out, kernel_size, r=0, lora_alpha=1, lora_dropout=0., ...)."""
    _conv_cls, _conv_dims = nn.Conv1d, 1


class Conv2d(_ConvLoRA, nn.Conv2d):
    """nn.Conv2d with a LoRA adapter: Conv2d(in, out, kernel_size, r=0, lora_alpha=1, lora_dropout=0., ...)."""
    _conv_cls, _conv_dims = nn.Conv2d, 2


class Conv3d(_ConvLoRA, nn.Conv3d):
    """nn.Conv3d with a LoRA adapter: Conv3d(in, out, kernel_size, r=0, lora_alpha=1, lora_dropout=0., ...)."""
    _conv_cls, _conv_dims = nn.Conv3d, 3
