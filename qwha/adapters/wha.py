"""The WHA adapter family: a sparse spectral update ``ΔW = s · F · T⁻¹`` on a frozen (quantized) linear.

``F`` is ``[d_out, d_in]`` with ``p`` trainable values ``c`` at fixed positions ``E``; ``T`` is an
orthonormal transform along ``d_in`` (:mod:`qwha.transforms`): ``wht`` is WHA (the paper's method),
``dct`` DCA, ``dht`` DHA, ``identity`` a plain sparse update (SHiRA-like). With ``dims=2`` the update
is inverse-transformed along both axes, ``ΔW = s · T_out · F · T_in⁻¹`` (the FourierFT/LoCA/SSH form,
an ablation). Only ``c`` trains.

Positions are stored flat and row-major, ``e = row · d_in + col``, sorted ascending (CSR order) in
the int32 buffer ``wha_indices``; ``set_sparse`` sorts whatever it is given and permutes the values
with it. Before initialisation a layer holds ``p`` zeros at the evenly spread default positions
``e_k = ⌊k · d_out · d_in / p⌋``, ``k = 0 … p−1`` (deterministic, distinct, about ``p / d_out`` per row).

Scale ``s`` (``scale_norm``): ``"paper"`` α / d_in (the paper's text), ``"reference"`` α / √(d_in·d_out)
(what the authors' code applies; its learning rates were tuned with it), ``"none"`` α.

Computation (``compute``), all exact:

* ``"fused"`` (weight side): ``y = x · (W_Q + ΔW)ᵀ + b``, one dense product each way, like the base
  alone. ``W_Q + ΔW`` is saved for the backward (the quantized base saves its dequantized weight the
  same way for LoRA). ``∂L/∂c = s·(gᵀ(x·T))`` at ``E``: on CPU a sampled product when the layer is sparse
  enough (:data:`SAMPLED_COST`), with ``x·T`` computed once for the layers that read the same input
  (q/k/v, gate/up); else the transformed ``∂L/∂ΔW = gᵀx`` gathered at ``E``.
* ``"delta"`` (weight side, split): ``y = base(x) + dropout(x) · ΔWᵀ``: any base layer, dropout.
* ``"sparse"`` (activation side, ``dims=1``): ``y = base(x) + s · (dropout(x) · T) · Fᵀ`` with a CSR
  product; ``∂L/∂c`` is a sampled product of ``g`` and ``x·T`` at ``E``.
* ``"auto"``: per device, :data:`AUTO_COMPUTE` (CPU: ``"fused"``, measured; CUDA: ``"fused"``,
  provisional); ``"sparse"`` also whenever fusing is impossible (dropout, or a base without a dense
  weight) and ``dims=1``, else ``"delta"``. Measurements: ``experiments/bench_adapter.py`` and
  ``experiments/results/adapter.md``.

Inference: when no gradient is wanted (``torch.no_grad()``, or nothing requires grad), dropout is
inactive and the base exposes its dense weight, every ``compute`` gives way to the materialised
``W_eff = W_Q + ΔW``, built once in the input's dtype and reused while ``c`` and ``E`` are unchanged
(dropped by ``train()`` and rebuilt when they change): a perplexity pass or generation then costs what
the base model alone costs (``experiments/bench_eval.py``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from qwha.adapters.base import (
    base_bias,
    dense_weight,
    has_dense_weight,
    iter_target_linears,
    linear_features,
    unwrap_model,
)
from qwha.hadamard import hadamard_factors, scatter_positions, scatter_transform, transform_columns
from qwha.transforms import apply_transform, check_transform

SCALE_NORMS = ("paper", "reference", "none")
COMPUTES = ("auto", "fused", "delta", "sparse")
# What compute="auto" prefers per device type (dims=1; dims=2 is always weight side). CPU: measured on
# whole 2-bit SmolLM2 training steps, interleaved with LoRA (experiments/bench_finetune.py --interleave,
# experiments/results/finetune.md): fused 0.98-1.07x LoRA's step at r = 12, the activation side 1.67x
# (r = 64). CUDA: provisional until experiments/bench_adapter.py runs on the GPU machine (make gpu-check).
AUTO_COMPUTE = {"cpu": "fused", "cuda": "fused"}

__all__ = [
    "AUTO_COMPUTE",
    "COMPUTES",
    "SCALE_NORMS",
    "WHAConfig",
    "WHALinear",
    "attach_wha",
    "default_indices",
    "wha_budget",
    "wha_scale",
]


@dataclass
class WHAConfig:
    """Configuration of the WHA family (serialised into ``adapter_config.json``).

    Attributes:
        r: LoRA-equivalent rank; the per-layer budget is ``p = r · (d_in + d_out)`` values, capped at
            ``d_in · d_out``. Paper: 64.
        target_modules: module-name suffixes (list) or a full-name regex (str), PEFT's rule.
        transform: ``wht`` (WHA), ``dct`` (DCA), ``dht`` (DHA) or ``identity``.
        dims: 1 (transform along d_in; the method) or 2 (both axes; the FourierFT/LoCA/SSH ablation).
        scale_norm: ``reference`` (α/√(d_in·d_out), the authors' code), ``paper`` (α/d_in) or ``none`` (α).
        alpha: α; 4000 in the paper.
        dropout: dropout on the adapter's input (paper: 0).
        compute: ``auto`` / ``fused`` / ``delta`` / ``sparse`` (see the module docstring).
    """

    r: int = 64
    target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    transform: str = "wht"
    dims: int = 1
    scale_norm: str = "reference"
    alpha: float = 4000.0
    dropout: float = 0.0
    compute: str = "auto"

    def __post_init__(self) -> None:
        check_transform(self.transform)
        if self.dims not in (1, 2):
            raise ValueError(f"dims={self.dims!r} is not one of 1, 2")
        if self.scale_norm not in SCALE_NORMS:
            raise ValueError(f"scale_norm={self.scale_norm!r} is not one of {', '.join(SCALE_NORMS)}")
        if self.compute not in COMPUTES:
            raise ValueError(f"compute={self.compute!r} is not one of {', '.join(COMPUTES)}")
        if self.compute == "sparse" and self.dims != 1:
            raise ValueError("compute='sparse' (activation side) needs dims=1")
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r={self.r!r} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def wha_scale(scale_norm: str, alpha: float, d_in: int, d_out: int) -> float:
    """The scale ``s`` of ``ΔW = s · F · T⁻¹``."""
    if scale_norm == "paper":
        return alpha / d_in
    if scale_norm == "reference":
        return alpha / math.sqrt(d_in * d_out)
    if scale_norm == "none":
        return float(alpha)
    raise ValueError(f"scale_norm={scale_norm!r} is not one of {', '.join(SCALE_NORMS)}")


def default_indices(p: int, d_out: int, d_in: int) -> torch.Tensor:
    """The evenly spread flat positions ``⌊k · d_out · d_in / p⌋`` (int64, ascending, distinct)."""
    return torch.arange(p, dtype=torch.int64) * (d_out * d_in) // p


def _check_sizes(transform: str, dims: int, d_in: int, d_out: int) -> None:
    if transform == "wht":
        hadamard_factors(d_in)  # raises HadamardSizeError naming the nearest supported widths
        if dims == 2:
            hadamard_factors(d_out)


def _csr_tensor(
    crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    with warnings.catch_warnings():  # "CSR support is in beta": we use only mm and sampled_addmm
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


# A sampled product on CPU costs about this many dense-GEMM multiply-adds per sampled multiply-add
# (torch's CSR ``sampled_addmm`` against its GEMM, one thread, SmolLM2 shapes; measured, see
# experiments/results/finetune.md): ∂L/∂c is taken from the dense ∂L/∂ΔW when that is cheaper.
SAMPLED_COST = 5.0

# The transformed input of the last backward, shared by the layers that read the same input
# (q/k/v, gate/up): (key, x kept alive so that its address cannot be reused, x·T column-major).
_SHARED_XT: dict[str, Any] = {}


def _transformed_input(x2: torch.Tensor, transform: str) -> torch.Tensor:
    """``x2·T`` ``[N, d_in]`` (float32/64, column-major for the sampled product), computed once for
    every layer whose backward sees the same saved input tensor."""
    key = (
        x2.untyped_storage().data_ptr(),
        x2.storage_offset(),
        x2.shape,
        x2.stride(),
        x2._version,
        transform,
    )
    if _SHARED_XT.get("key") != key:
        _SHARED_XT.clear()  # drop the previous input first: peak memory holds one shared transform
        cdtype = torch.float64 if x2.dtype == torch.float64 else torch.float32
        if transform == "wht" and not x2.is_cuda:  # (x·H)ᵀ = Hᵀxᵀ built column-major directly
            xt = transform_columns(x2.to(cdtype).T, inverse=False).T
        else:
            xt = apply_transform(x2.to(cdtype), transform, dim=1).T.contiguous().T
        _SHARED_XT.update(key=key, x=x2, xt=xt)
    return _SHARED_XT["xt"]


# Optimizer steps taken in this process (any optimizer): part of the CUDA key of a materialised weight.
_STEPS = [0]


def _optimizer_steps(_optimizer, _args, _kwargs) -> None:
    _STEPS[0] += 1


register_optimizer_step_post_hook(_optimizer_steps)


def clear_shared_transform() -> None:
    """Free the transformed input kept for the next layer's backward (end of a step)."""
    _SHARED_XT.clear()


class _FusedWeightSide(torch.autograd.Function):
    """``y = x (W_Q + ΔW(c))ᵀ + b``: one product each way, like the quantized base alone.

    ``W_eff = W_Q + ΔW`` is saved for the backward (the quantized base layer saves its dequantized
    weight the same way, so this holds what a LoRA step holds, less LoRA's activations). ``∂L/∂c`` is
    ``s·(gᵀ·(x·T))`` at ``E``: a sampled product of ``g`` and the transformed input (shared by the
    layers that read the same input) when the layer is sparse enough, else the transformed dense
    ``gᵀx`` gathered at ``E`` (always on CUDA, where the dense product runs on tensor cores)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, c: torch.Tensor, layer: WHALinear) -> torch.Tensor:
        w = layer._materialised_weight(x.dtype)  # once per value of c: a step's micro-batches share it
        bias = base_bias(layer.base_layer)
        y = F.linear(x, w, None if bias is None else bias.to(x.dtype))
        ctx.save_for_backward(x, c, w)
        ctx.layer = layer
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, c, w = ctx.saved_tensors
        layer: WHALinear = ctx.layer
        grad_x = grad_c = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ w.to(grad_y.dtype)
        if ctx.needs_input_grad[1]:
            g2 = grad_y.reshape(-1, layer.out_features)
            x2 = x.reshape(-1, layer.in_features)
            d_out, d_in = layer.out_features, layer.in_features
            sampled = layer.dims == 1 and not g2.is_cuda and SAMPLED_COST * layer.budget < d_out * d_in
            if sampled:
                xt = _transformed_input(x2, layer.transform)
                grad_c = (layer._sampled_product(g2.to(xt.dtype), xt) * layer.scale).to(c.dtype)
            elif layer.transform == "wht" and layer.dims == 1 and not g2.is_cuda:
                # (∂L/∂ΔW · H)ᵀ = Hᵀ·(xᵀg): the GEMM's [d_in, d_out] result transformed along its columns
                # (no transposes), gathered at E in that layout
                cdtype = torch.float64 if g2.dtype == torch.float64 else torch.float32
                gt = transform_columns(x2.to(cdtype).T @ g2.to(cdtype), inverse=False)
                st = layer._csr_structure()
                grad_c = (gt.reshape(-1)[st["flat_t"]] * layer.scale).to(c.dtype)
            else:  # transform ∂L/∂ΔW = gᵀx, [d_out, d_in]
                grad_c = layer._grad_values(g2.T @ x2.to(g2.dtype)).to(c.dtype)
        return grad_x, grad_c, None


class _SparseActivationSide(torch.autograd.Function):
    """``s · xt · Fᵀ`` for ``xt = x·T`` ``[N, d_in]`` with ``F`` in CSR form; grads for ``xt`` and ``c``."""

    @staticmethod
    def forward(ctx, xt: torch.Tensor, c: torch.Tensor, layer: WHALinear) -> torch.Tensor:
        cdtype = torch.float32 if xt.dtype in (torch.float16, torch.bfloat16) else xt.dtype
        f = layer._csr(c.detach().to(cdtype) * layer.scale)
        y = (f @ xt.to(cdtype).T).T
        ctx.save_for_backward(xt, c)
        ctx.layer = layer
        return y.to(xt.dtype)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        xt, c = ctx.saved_tensors
        layer: WHALinear = ctx.layer
        cdtype = torch.float32 if xt.dtype in (torch.float16, torch.bfloat16) else xt.dtype
        g = grad_y.to(cdtype)
        grad_xt = grad_c = None
        if ctx.needs_input_grad[0]:
            ft = layer._csr_t(c.detach().to(cdtype) * layer.scale)  # Fᵀ as CSR [d_in, d_out]
            grad_xt = (ft @ g.T).T.to(xt.dtype)
        if ctx.needs_input_grad[1]:
            grad_c = (layer._sampled_product(g, xt.to(cdtype)) * layer.scale).to(c.dtype)
        return grad_xt, grad_c, None


class WHALinear(nn.Module):
    """A linear layer plus the sparse spectral update ``s · F · T⁻¹`` (see the module docstring).

    Args:
        base_layer: ``nn.Linear`` or a GPTQModel quantized linear; frozen.
        budget: number of trainable values ``p`` (``attach_adapter`` passes ``r · (d_in + d_out)``
            capped at ``d_in · d_out``).
        transform, dims, scale_norm, alpha, dropout, compute: as in :class:`WHAConfig`.
        dtype: dtype of ``c``; float32 by default (float64 on a float64 ``nn.Linear``).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        budget: int,
        *,
        transform: str = "wht",
        dims: int = 1,
        scale_norm: str = "reference",
        alpha: float = 4000.0,
        dropout: float = 0.0,
        compute: str = "auto",
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        WHAConfig(
            transform=transform,
            dims=dims,
            scale_norm=scale_norm,
            alpha=alpha,
            dropout=dropout,
            compute=compute,
        )
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        d_in, d_out = self.in_features, self.out_features
        if not 1 <= budget <= d_in * d_out:
            raise ValueError(
                f"budget={budget} must be in [1, d_in·d_out = {d_in * d_out}] for a {d_out}×{d_in} layer"
            )
        _check_sizes(transform, dims, d_in, d_out)
        if compute == "fused" and (dropout > 0 or not has_dense_weight(base_layer)):
            raise ValueError("compute='fused' needs dropout=0 and a base layer that exposes its dense weight")
        self.transform, self.dims, self.scale_norm, self.alpha = transform, dims, scale_norm, float(alpha)
        self.scale = wha_scale(scale_norm, alpha, d_in, d_out)
        self.compute = compute
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        ref = (
            next(iter(base_layer.buffers()), None)
            if not isinstance(base_layer, nn.Linear)
            else base_layer.weight
        )
        device = ref.device if ref is not None else None
        if dtype is None:
            is_f64 = isinstance(base_layer, nn.Linear) and base_layer.weight.dtype == torch.float64
            dtype = torch.float64 if is_f64 else torch.float32
        self.wha_c = nn.Parameter(torch.zeros(budget, dtype=dtype, device=device))
        self.register_buffer("wha_indices", default_indices(budget, d_out, d_in).to(torch.int32).to(device))
        self._structure_key: tuple | None = None
        self._structure: dict[str, torch.Tensor] = {}
        self.__dict__["_weight_cache"] = None  # (key, W_Q + ΔW) for no-grad calls, see forward

    # ---- the API the init stage uses -----------------------------------------------------------

    method = "wha"

    @property
    def budget(self) -> int:
        return self.wha_c.shape[0]

    def base_weight(self) -> torch.Tensor:
        """Dequantized base weight ``W_Q`` ``[d_out, d_in]``, float32 (float64 for a float64 base)."""
        with torch.no_grad():
            w = dense_weight(self.base_layer)
            return w.detach().to(torch.float64 if w.dtype == torch.float64 else torch.float32)

    @torch.no_grad()
    def set_sparse(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Set ``E`` (``[p, 2]`` (row, col) pairs) and the stored values ``c`` (``[p]``, already divided
        by ``s``)."""
        p = self.budget
        if indices.shape != (p, 2) or values.shape != (p,):
            raise ValueError(
                f"set_sparse needs indices [{p}, 2] and values [{p}], "
                f"got {tuple(indices.shape)} and {tuple(values.shape)}"
            )
        rows, cols = indices[:, 0].long(), indices[:, 1].long()
        if (
            rows.min() < 0
            or rows.max() >= self.out_features
            or cols.min() < 0
            or cols.max() >= self.in_features
        ):
            raise ValueError(f"indices out of range for a {self.out_features}×{self.in_features} layer")
        flat = rows * self.in_features + cols
        flat, order = torch.sort(flat)
        if p > 1 and bool((flat[1:] == flat[:-1]).any()):
            raise ValueError("indices contain duplicate positions")
        self.wha_indices.copy_(flat.to(self.wha_indices.device, torch.int32))
        self.wha_c.copy_(values.to(self.wha_c.device)[order.to(values.device)].to(self.wha_c.dtype))

    def indices(self) -> torch.Tensor:
        """``E`` as ``[p, 2]`` (row, col), int64, in storage (row-major) order."""
        flat = self.wha_indices.long()
        return torch.stack((flat // self.in_features, flat % self.in_features), dim=1)

    def sparse_matrix(self) -> torch.Tensor:
        """Dense ``F`` ``[d_out, d_in]`` (the stored values, without ``s``)."""
        f = torch.zeros(
            self.out_features * self.in_features, dtype=self.wha_c.dtype, device=self.wha_c.device
        )
        return f.index_put((self.wha_indices.long(),), self.wha_c).view(self.out_features, self.in_features)

    def delta_weight(self, c: torch.Tensor | None = None) -> torch.Tensor:
        """``ΔW = s · F · T⁻¹`` (``dims=2``: ``s · T_out · F · T_in⁻¹``), ``[d_out, d_in]``, differentiable.

        Float32 for a float32 ``c`` (float64 for float64)."""
        c = self.wha_c if c is None else c
        n = self.out_features * self.in_features
        f = torch.zeros(n, dtype=c.dtype, device=c.device).index_put(
            (self.wha_indices.long(),), c * self.scale
        )
        d = apply_transform(f.view(self.out_features, self.in_features), self.transform, dim=1, inverse=True)
        if self.dims == 2:
            d = apply_transform(d, self.transform, dim=0, inverse=True)
        return d

    # ---- internals -------------------------------------------------------------------------------

    def _effective_weight(self, c: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``W_Q + ΔW(c)`` in ``dtype``, no autograd. CPU, ``wht`` along d_in: scattered straight into the
        fast transform's layout with the base added in its last pass (:func:`scatter_transform`, about
        2x faster than :meth:`delta_weight` plus an add); CUDA keeps the Triton transform."""
        with torch.no_grad():
            w = dense_weight(self.base_layer)
            if self.transform == "wht" and self.dims == 1 and not c.is_cuda:
                cdtype = torch.float64 if c.dtype == torch.float64 else torch.float32
                st = self._csr_structure()
                out = scatter_transform(
                    c.to(cdtype) * self.scale,
                    st["wht_pos"],
                    self.out_features,
                    self.in_features,
                    inverse=True,
                    base=w,
                )
                return out.to(dtype)
            delta = self.delta_weight(c)
            return (w.to(delta.dtype) + delta).to(dtype)

    def _grad_values(self, grad_delta: torch.Tensor) -> torch.Tensor:
        """``∂L/∂c`` from ``∂L/∂ΔW``: ``s · (T_outᵀ) G T_in`` gathered at ``E``."""
        cdtype = torch.float64 if grad_delta.dtype == torch.float64 else torch.float32
        g = apply_transform(grad_delta.to(cdtype), self.transform, dim=1)
        if self.dims == 2:
            g = apply_transform(g, self.transform, dim=0)
        return g.reshape(-1)[self.wha_indices.long()] * self.scale

    def _sampled_product(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``(aᵀ b)`` at ``E`` in storage order, for ``a`` ``[N, d_out]`` and ``b`` ``[N, d_in]``.

        CPU: a sampled sparse product (``p·N`` multiply-adds). CUDA: the dense product then a gather
        (``d_out·d_in·N`` on tensor cores beats an irregular ``p·N`` there at these densities)."""
        if a.is_cuda:
            return (a.T @ b).reshape(-1)[self.wha_indices.long()].float()
        cdtype = torch.float64 if a.dtype == torch.float64 else torch.float32
        pattern = self._csr(torch.ones(self.budget, dtype=cdtype, device=a.device))
        sampled = torch.sparse.sampled_addmm(pattern, a.T.to(cdtype).contiguous(), b.to(cdtype), beta=0.0)
        return sampled.values()

    def _csr_structure(self) -> dict[str, torch.Tensor]:
        idx = self.wha_indices
        key = (idx.data_ptr(), idx._version, idx.device)
        if key != self._structure_key:
            flat = idx.long()
            rows, cols = flat // self.in_features, flat % self.in_features
            crow = torch.zeros(self.out_features + 1, dtype=torch.int64, device=idx.device)
            crow[1:] = torch.cumsum(torch.bincount(rows, minlength=self.out_features), 0)
            order_t = torch.argsort(cols * self.out_features + rows)
            crow_t = torch.zeros(self.in_features + 1, dtype=torch.int64, device=idx.device)
            crow_t[1:] = torch.cumsum(torch.bincount(cols, minlength=self.in_features), 0)
            self._structure = {
                "wht_pos": scatter_positions(flat, self.in_features) if self.transform == "wht" else None,
                "flat_t": cols * self.out_features + rows,  # E in the transposed [d_in, d_out] layout
                "crow": crow,
                "col": cols,
                "order_t": order_t,
                "crow_t": crow_t,
                "col_t": rows[order_t],
            }
            self._structure_key = key
        return self._structure

    def _csr(self, values: torch.Tensor) -> torch.Tensor:
        st = self._csr_structure()
        return _csr_tensor(st["crow"], st["col"], values, (self.out_features, self.in_features))

    def _csr_t(self, values: torch.Tensor) -> torch.Tensor:
        st = self._csr_structure()
        return _csr_tensor(
            st["crow_t"], st["col_t"], values[st["order_t"]], (self.in_features, self.out_features)
        )

    def resolved_compute(self, needs_grad: bool = True) -> str:
        """The computation ``forward`` uses unless it :meth:`materialises` the weight; ``"auto"``
        follows :data:`AUTO_COMPUTE` by device when gradients are needed, and the per-token-cheap paths
        when not (no ``d_out × d_in`` work per call: activation side, or a cached ``ΔW`` for ``dims=2``)."""
        if self.compute != "auto":
            return self.compute
        if not needs_grad:
            return "sparse" if self.dims == 1 else "delta"
        fusable = isinstance(self.dropout, nn.Identity) and has_dense_weight(self.base_layer)
        preferred = AUTO_COMPUTE.get(self.wha_c.device.type, "fused")
        if self.dims == 1 and (preferred == "sparse" or not fusable):
            return "sparse"
        return "fused" if fusable else "delta"

    def _inference_delta(self, dtype: torch.dtype) -> torch.Tensor:
        """``ΔW`` in ``dtype``, cached while ``c`` and ``E`` are unchanged (no-grad calls only)."""
        c, idx = self.wha_c, self.wha_indices
        key = (c.data_ptr(), c._version, idx.data_ptr(), idx._version, dtype, c.device)
        cached = self.__dict__.get("_delta_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, self.delta_weight().to(dtype))
            self.__dict__["_delta_cache"] = cached
        return cached[1]

    def _materialised_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``W_Q + ΔW`` ``[d_out, d_in]`` in ``dtype``, built once and reused while ``c`` and ``E`` are
        unchanged: across no-grad calls, and in training across the micro-batches of one optimizer step
        (gradient accumulation, a checkpointed recomputation), where the fused forward saves it for its
        backward anyway, so keeping it adds no peak memory; :meth:`train` drops it.

        Unchanged means, on CPU, the same values (``p`` elements compared: robust to writes through
        ``.data`` or a reloaded parameter that repeat a version counter); on CUDA, where comparing would
        wait for the device at every layer, the same storage and version counter and no optimizer step
        anywhere in the process since the build (:func:`_optimizer_steps`)."""
        c, idx = self.wha_c.detach(), self.wha_indices
        cached = self.__dict__.get("_weight_cache")
        if c.is_cuda:
            key = (dtype, c.device, _STEPS[0], c.data_ptr(), c._version, idx.data_ptr(), idx._version)
            fresh = cached is not None and cached[0] == key
        else:
            key = (dtype, c.device)
            fresh = (
                cached is not None
                and cached[0] == key
                and torch.equal(cached[1], c)
                and torch.equal(cached[2], idx)
            )
        if not fresh:
            self.__dict__["_weight_cache"] = None  # free the old one before building the new one
            held = (None, None) if c.is_cuda else (c.clone(), idx.clone())
            cached = (key, *held, self._effective_weight(c, dtype))
            self.__dict__["_weight_cache"] = cached
        return cached[3]

    def materialises(self, needs_grad: bool) -> bool:
        """Whether ``forward`` uses the materialised ``W_Q + ΔW`` (no gradient wanted, no active
        dropout, a base exposing its dense weight): one dense product per call, the base model's cost."""
        dropout_off = isinstance(self.dropout, nn.Identity) or not self.training
        return not needs_grad and dropout_off and has_dense_weight(self.base_layer)

    def train(self, mode: bool = True) -> WHALinear:
        if mode:  # training resumes: the values will change, drop the materialised weights
            self.__dict__["_weight_cache"] = None
            self.__dict__["_delta_cache"] = None
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (self.wha_c.requires_grad or x.requires_grad)
        if self.materialises(needs_grad):
            bias = base_bias(self.base_layer)
            w = self._materialised_weight(x.dtype)
            return F.linear(x, w, None if bias is None else bias.to(x.dtype))
        mode = self.resolved_compute(needs_grad)
        if mode == "fused":
            return _FusedWeightSide.apply(x, self.wha_c, self)
        y = self.base_layer(x)
        xa = self.dropout(x)
        if mode == "delta":
            delta = self.delta_weight().to(y.dtype) if needs_grad else self._inference_delta(y.dtype)
            return y + F.linear(xa.to(y.dtype), delta)
        xt = apply_transform(xa, self.transform, dim=-1)
        delta = _SparseActivationSide.apply(xt.reshape(-1, self.in_features), self.wha_c, self)
        return y + delta.reshape(*x.shape[:-1], self.out_features).to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, budget={self.budget}, "
            f"transform={self.transform}, dims={self.dims}, scale={self.scale:.6g} ({self.scale_norm}), "
            f"compute={self.compute}"
        )


def wha_budget(rank: int, d_in: int, d_out: int) -> int:
    """Per-layer budget ``p = r · (d_in + d_out)``, capped at ``d_in · d_out``."""
    return min(rank * (d_in + d_out), d_in * d_out)


def attach_wha(model: nn.Module, config: WHAConfig, budgets: dict[str, int] | None = None) -> nn.Module:
    """Replace every target linear of ``model`` by a :class:`WHALinear` (in place); freeze all but ``c``."""
    inner = unwrap_model(model)
    targets = list(iter_target_linears(inner, config.target_modules))
    layers = {}
    for name, module, _parent, _attr in targets:  # build all first: a bad width fails before any change
        d_in, d_out = int(module.in_features), int(module.out_features)
        p = budgets[name] if budgets is not None else wha_budget(config.r, d_in, d_out)
        layers[name] = WHALinear(
            module,
            p,
            transform=config.transform,
            dims=config.dims,
            scale_norm=config.scale_norm,
            alpha=config.alpha,
            dropout=config.dropout,
            compute=config.compute,
        )
    for p in inner.parameters():
        p.requires_grad_(False)
    for name, _module, parent, attr in targets:
        setattr(parent, attr, layers[name])
        layers[name].wha_c.requires_grad_(True)
    inner.qwha_adapter_config = config
    return model
