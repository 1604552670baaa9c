"""LoTA-QAF: ternary adaptation on the quantization grid of a GPTQModel layer (arXiv 2505.18724).

A GPTQ layer stores integer codes ``W_int ∈ [0, 2^b − 1]`` ``[d_out, d_in]``, and per (output channel,
group of ``group_size`` inputs) a scale ``s`` and an integer zero point ``z``; its weight is
``s · (W_int − z)``. LoTA trains two ternary matrices ``A ∈ {−1,0,1}^{d_in×r}``, ``B ∈ {−1,0,1}^{r×d_out}``
whose product ``ΔW = (A·B)ᵀ`` ``[d_out, d_in]`` has integer entries in ``[−r, r]``, and moves the codes by
at most one step:

* ``Ŵ = sign(ΔW) · 1[|ΔW| > ω]`` (``ω`` default ``0.75·r``), with +1 suppressed where ``W_int = 2^b − 1``
  and −1 where ``W_int = 0`` (the boundary masks), so ``W_int + Ŵ`` is a valid b-bit code;
* ``μ = mean_group(ΔW − ω·Ŵ) / ω`` per (output channel, group): the part of ``ΔW/ω`` that the ternary
  step did not apply, as a constant shift of the group (``Ŵ`` here is the masked one, so whatever the
  masks suppressed is carried by ``μ``);
* effective weight ``s · (W_int − z + Ŵ + μ)``. The group scale is the only magnitude: no learning rate
  and no float adapter weights.

``A`` and ``B`` are float32 ``nn.Parameter`` holding values in {−1, 0, 1}, so the trainer, DDP and the
checkpoints treat them like any adapter weight; :class:`qwha.finetune.tsignsgd.TSignSGD` keeps them
ternary. Initialisation: ``A`` a ternarised Kaiming normal (``A₀ ~ N(0, 2/r)``, kept where
``|A₀| > 0.75·mean|A₀|``, then its sign), ``B = 0`` (so ``ΔW = 0`` and the layer starts as the
quantized model).

Computation: one autograd function (:class:`_LoTAWeightSide`) builds the effective weight once per
optimizer step (cached while ``A``, ``B`` are unchanged, so gradient-accumulation micro-batches and the
backward reuse it; ``cache_weight=False`` recomputes it per call instead), then ``y = x W_effᵀ + b``.
Everything is tensor arithmetic over ``[d_out, G, group_size]`` views; there is no loop over channels
or groups. The codes are unpacked from GPTQModel's ``qweight``/``qzeros`` bit streams on every weight
build (:func:`unpack_codes`), so no unpacked copy of the model stays in memory.

Merging (:func:`merge_lota`, :func:`save_merged_lota`): ``W'_int = W_int + Ŵ`` replaces the codes, and the
zero point would become ``z' = z − μ``, which is fractional. See :mod:`qwha.adapters.lota_merge` for
where the fractional part is stored and why.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qwha.adapters.base import base_bias, is_quantized_linear, iter_target_linears, unwrap_model

__all__ = [
    "LoTAConfig",
    "LoTALinear",
    "attach_lota",
    "gptq_grid",
    "lota_offset",
    "lota_step",
    "pack_codes",
    "ternary_kaiming",
    "unpack_codes",
]


@dataclass
class LoTAConfig:
    """Configuration of LoTA-QAF (serialised into ``adapter_config.json``).

    Attributes:
        r: rank of the ternary factors (``ΔW`` entries lie in ``[−r, r]``).
        omega: threshold ``ω`` of the ternary step; ``None`` means ``0.75·r`` (the paper's value).
        target_modules: module-name suffixes (list) or a full-name regex (str), PEFT's rule.
        seed: seed of the ternarised Kaiming init of ``A`` (each layer draws from one generator, in
            model order).
    """

    r: int = 64
    omega: float | None = None
    target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r={self.r!r} must be a positive integer")
        if self.omega is not None and not self.omega > 0:
            raise ValueError(f"omega={self.omega!r} must be > 0 (or null for 0.75·r)")

    @property
    def resolved_omega(self) -> float:
        return 0.75 * self.r if self.omega is None else float(self.omega)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- GPTQ bit streams ------------------------------------------------------------------------------


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Integer codes ``[n, C]`` (int16) from a GPTQ bit stream ``packed`` ``[n·bits/32, C]`` (int32).

    GPTQModel packs ``n`` codes of ``bits`` bits per column into consecutive 32-bit words, code ``i``
    at bit ``i·bits`` of the stream (little-endian; for 3 bits some codes straddle two words). This
    reads code ``i`` from the 64-bit concatenation of words ``⌊i·bits/32⌋`` and the next one.
    """
    words = packed.to(torch.int64) & 0xFFFFFFFF  # the int32 words as unsigned
    pos = torch.arange(n, device=packed.device) * bits
    w = pos // 32
    lo = words[w]
    hi = words[(w + 1).clamp(max=words.shape[0] - 1)]
    stream = lo | (hi << 32)
    shift = (pos % 32).view(-1, *([1] * (packed.dim() - 1)))
    return ((stream >> shift) & ((1 << bits) - 1)).to(torch.int16)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`unpack_codes`: codes ``[n, C]`` in ``[0, 2^bits)`` -> ``[n·bits/32, C]`` int32."""
    n = codes.shape[0]
    if (n * bits) % 32:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole 32-bit words")
    c = codes.to(torch.int64)
    if bool(((c < 0) | (c >= (1 << bits))).any()):
        raise ValueError(f"codes outside [0, {(1 << bits) - 1}]")
    bit = torch.arange(bits, device=c.device).view(1, bits, *([1] * (c.dim() - 1)))
    stream = ((c.unsqueeze(1) >> bit) & 1).reshape(n * bits // 32, 32, *c.shape[1:])  # bit k of word
    weight = torch.ones(32, dtype=torch.int64, device=c.device) << torch.arange(32, device=c.device)
    word = (stream * weight.view(1, 32, *([1] * (c.dim() - 1)))).sum(1)
    return (word - ((word >> 31) << 32)).to(torch.int32)  # two's complement of the unsigned word


def gptq_grid(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(W_int [d_out, d_in] int16, s [d_out, G] float32, z [d_out, G] float32, group_size)`` of a
    GPTQModel packed layer (``qweight``/``qzeros``/``scales``, static groups), such that its dequantized
    weight is ``s · (W_int − z)`` per group. Zero points are read as the torch kernel reads them."""
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        if not isinstance(getattr(layer, name, None), torch.Tensor):
            raise TypeError(f"{type(layer).__name__} has no {name}: LoTA needs a GPTQ packed layer")
    bits, d_in, d_out = int(layer.bits), int(layer.in_features), int(layer.out_features)
    n_groups = layer.scales.shape[0]
    group_size = d_in // n_groups
    if group_size * n_groups != d_in:
        raise ValueError(f"{n_groups} groups do not split d_in={d_in} evenly")
    expected = torch.arange(d_in, device=layer.g_idx.device) // group_size
    if not torch.equal(layer.g_idx.long(), expected):
        raise ValueError("LoTA needs static, ordered groups (g_idx = i // group_size; no act-order)")
    w_int = unpack_codes(layer.qweight, bits, d_in)[:, :d_out].T
    zeros = unpack_codes(layer.qzeros.T, bits, d_out).T[:, :d_out]  # [G, d_out]
    return w_int, layer.scales.float().T, zeros.float().T, group_size


# ---- the method's pieces ---------------------------------------------------------------------------


def ternary_kaiming(shape: tuple[int, int], generator: torch.Generator | None = None) -> torch.Tensor:
    """A ternarised Kaiming normal ``[d_in, r]``: ``sign(A₀)·1[|A₀| > 0.75·mean|A₀|]``, float32."""
    a0 = torch.randn(shape, generator=generator) * math.sqrt(2.0 / shape[1])
    return torch.sign(a0) * (a0.abs() > 0.75 * a0.abs().mean())


def lota_step(delta: torch.Tensor, w_int: torch.Tensor, omega: float, maxq: int) -> torch.Tensor:
    """``Ŵ = sign(ΔW)·1[|ΔW| > ω]`` with the boundary masks (no +1 at ``maxq``, no −1 at 0)."""
    step = torch.sign(delta) * (delta.abs() > omega)
    step = torch.where((step > 0) & (w_int >= maxq), 0.0, step)
    return torch.where((step < 0) & (w_int <= 0), 0.0, step).to(delta.dtype)


def lota_offset(delta: torch.Tensor, step: torch.Tensor, omega: float, group_size: int) -> torch.Tensor:
    """``μ = mean_group(ΔW − ω·Ŵ) / ω`` ``[d_out, G]`` for ``ΔW``, ``Ŵ`` ``[d_out, d_in]``."""
    d_out, d_in = delta.shape
    resid = (delta - omega * step).view(d_out, d_in // group_size, group_size)
    return resid.mean(-1) / omega


class _LoTAWeightSide(torch.autograd.Function):
    """``y = x W_effᵀ + b`` with ``W_eff = s·(W_int − z + Ŵ + μ)``; gradients for ``x``, ``A``, ``B``.

    Straight-through estimator: in the backward, ``Ŵ + μ`` is replaced by its smooth counterpart
    ``ΔW/ω`` (``μ`` is exactly the group mean of ``ΔW/ω − Ŵ``, so ``Ŵ + μ`` is ``ΔW/ω`` with each
    group's within-group detail rounded to the ternary step). Then ``∂L/∂ΔW = (s/ω) ⊙ ∂L/∂W_eff``, s
    broadcast over each group. Equivalently: the identity STE for ``Ŵ`` (slope ``1/ω``) plus the exact
    derivative of ``μ`` with ``Ŵ`` held fixed — the ``−ω·Ŵ`` term of ``μ`` cancels the group mean of
    the ``Ŵ`` path and ``ΔW/ω`` inside ``μ`` restores it, leaving ``s/ω`` per entry. The group scale
    ``s`` stays in the gradient on purpose: it is the size of a code step in weight units, so the
    sign-based optimizer compares entries by their effect on the loss. The boundary masks are not
    differentiated (an entry the mask blocks still receives the gradient that would move it back).
    With ``M = A·B`` ``[d_in, d_out]``, ``∂L/∂A = (∂L/∂ΔW)ᵀ Bᵀ`` and ``∂L/∂B = Aᵀ (∂L/∂ΔW)ᵀ``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, layer: LoTALinear) -> torch.Tensor:
        w = layer.effective_weight(_compute_dtype(x))
        bias = base_bias(layer.base_layer)
        ctx.save_for_backward(x, a, b, w)
        ctx.layer = layer
        return F.linear(x.to(w.dtype), w, None if bias is None else bias.to(w.dtype))

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, a, b, w = ctx.saved_tensors
        layer: LoTALinear = ctx.layer
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_y.to(w.dtype) @ w).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g2 = grad_y.reshape(-1, layer.out_features).float()
            x2 = x.reshape(-1, layer.in_features).float()
            grad_w = g2.T @ x2  # ∂L/∂W_eff [d_out, d_in]
            grad_delta = layer.ste_scale(grad_w)  # ∂L/∂ΔW [d_out, d_in]
            if ctx.needs_input_grad[1]:
                grad_a = (grad_delta.T @ b.float().T).to(a.dtype)
            if ctx.needs_input_grad[2]:
                grad_b = (a.float().T @ grad_delta.T).to(b.dtype)
        return grad_x, grad_a, grad_b, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class LoTALinear(nn.Module):
    """A GPTQModel quantized linear with a LoTA ternary adapter (see the module docstring).

    Args:
        base_layer: a GPTQModel packed layer (``TorchLinear``; 2/3/4/8 bits, any group size, static
            groups); frozen.
        r: rank of ``A`` ``[d_in, r]`` and ``B`` ``[r, d_out]``.
        omega: ``ω``; default ``0.75·r``.
        generator: draws ``A``'s init (default: torch's global generator).
        cache_weight: keep the effective weight between calls while ``A``, ``B`` are unchanged.
    """

    method = "lota"

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        omega: float | None = None,
        *,
        generator: torch.Generator | None = None,
        cache_weight: bool = True,
    ) -> None:
        super().__init__()
        if not is_quantized_linear(base_layer):
            raise TypeError(
                f"LoTA adapts GPTQModel quantized layers, got {type(base_layer).__name__}: "
                "quantize the model first (quant.method=none has no integer grid)"
            )
        self.base_layer = base_layer
        self.in_features, self.out_features = int(base_layer.in_features), int(base_layer.out_features)
        self.bits = int(base_layer.bits)
        self.maxq = (1 << self.bits) - 1
        _w, _s, _z, self.group_size = gptq_grid(base_layer)  # validates the layout now
        self.r = int(r)
        self.omega = 0.75 * self.r if omega is None else float(omega)
        device = base_layer.qweight.device
        self.lota_A = nn.Parameter(ternary_kaiming((self.in_features, self.r), generator).to(device))
        self.lota_B = nn.Parameter(torch.zeros(self.r, self.out_features, device=device))
        self.cache_weight = cache_weight
        self.__dict__["_weight_cache"] = None

    # ---- the pieces, differentiable-free (float32) ----------------------------------------------

    def grid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(W_int [d_out, d_in], s [d_out, G], z [d_out, G])`` of the base layer."""
        w_int, s, z, _ = gptq_grid(self.base_layer)
        return w_int, s, z

    def delta(self) -> torch.Tensor:
        """``ΔW = (A·B)ᵀ`` ``[d_out, d_in]``, float32 with integer values."""
        return (self.lota_A.detach().float() @ self.lota_B.detach().float()).T

    def step_and_offset(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Ŵ [d_out, d_in], μ [d_out, G])`` for the current ``A``, ``B``."""
        w_int, _, _ = self.grid()
        d = self.delta()
        step = lota_step(d, w_int, self.omega, self.maxq)
        return step, lota_offset(d, step, self.omega, self.group_size)

    @torch.no_grad()
    def effective_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``s · (W_int − z + Ŵ + μ)`` ``[d_out, d_in]`` in ``dtype`` (built in float32)."""
        a, b = self.lota_A, self.lota_B
        key = (a._version, b._version, a.data_ptr(), b.data_ptr(), dtype, a.device)
        cached = self.__dict__.get("_weight_cache")
        if self.cache_weight and cached is not None and cached[0] == key:
            return cached[1]
        w_int, s, z = self.grid()
        d = self.delta()
        step = lota_step(d, w_int, self.omega, self.maxq)
        mu = lota_offset(d, step, self.omega, self.group_size)
        g = self.group_size
        codes = (w_int.float() + step).view(self.out_features, -1, g)
        w = (s[..., None] * (codes - (z - mu)[..., None])).view(self.out_features, self.in_features)
        w = w.to(dtype)
        self.__dict__["_weight_cache"] = (key, w) if self.cache_weight else None
        return w

    def ste_scale(self, grad_w: torch.Tensor) -> torch.Tensor:
        """``∂L/∂ΔW = (s/ω) ⊙ ∂L/∂W_eff`` (the straight-through rule of :class:`_LoTAWeightSide`)."""
        s = self.base_layer.scales.float().T.to(grad_w.device)  # [d_out, G]
        g = grad_w.view(self.out_features, -1, self.group_size) * (s / self.omega)[..., None]
        return g.view(self.out_features, self.in_features)

    # ---- the API shared with the other adapters ---------------------------------------------------

    def base_weight(self) -> torch.Tensor:
        """Dequantized base weight ``s·(W_int − z)`` ``[d_out, d_in]``, float32."""
        w_int, s, z = self.grid()
        g = self.group_size
        w = s[..., None] * (w_int.float().view(self.out_features, -1, g) - z[..., None])
        return w.view(self.out_features, self.in_features)

    def delta_weight(self) -> torch.Tensor:
        """The weight change the adapter makes, ``s·(Ŵ + μ)`` ``[d_out, d_in]``, float32."""
        step, mu = self.step_and_offset()
        _, s, _ = self.grid()
        d = s[..., None] * (step.view(self.out_features, -1, self.group_size) + mu[..., None])
        return d.view(self.out_features, self.in_features)

    def train(self, mode: bool = True) -> LoTALinear:
        if mode:  # training resumes: A and B will change, drop the materialised weight
            self.__dict__["_weight_cache"] = None
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (
            self.lota_A.requires_grad or self.lota_B.requires_grad or x.requires_grad
        )
        if not needs_grad:  # inference: the materialised W_eff, one dense product (the base's cost)
            w = self.effective_weight(_compute_dtype(x))
            bias = base_bias(self.base_layer)
            return F.linear(x.to(w.dtype), w, None if bias is None else bias.to(w.dtype))
        return _LoTAWeightSide.apply(x, self.lota_A, self.lota_B, self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"omega={self.omega:g}, bits={self.bits}, group_size={self.group_size}"
        )


def attach_lota(model: nn.Module, config: LoTAConfig) -> nn.Module:
    """Replace every target quantized linear of ``model`` by a :class:`LoTALinear` (in place); freeze all
    but ``A`` and ``B``."""
    inner = unwrap_model(model)
    targets = list(iter_target_linears(inner, config.target_modules))
    gen = torch.Generator().manual_seed(int(config.seed))
    layers = {}
    for name, module, _parent, _attr in targets:  # build all first: a bad layer fails before any change
        layers[name] = LoTALinear(module, config.r, config.resolved_omega, generator=gen)
    for p in inner.parameters():
        p.requires_grad_(False)
    for name, _module, parent, attr in targets:
        setattr(parent, attr, layers[name])
        layers[name].lota_A.requires_grad_(True)
        layers[name].lota_B.requires_grad_(True)
    inner.qwha_adapter_config = config
    return model
