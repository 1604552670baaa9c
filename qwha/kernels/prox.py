"""Triton kernel for MagR's group-wise ℓ∞ proximal operator.

``prox_{α‖·‖∞}(v)`` clips a group ``v`` (one output channel × one quantization group) to ``[−t, t]``
where ``t ≥ 0`` solves ``Σ_j (|v_j| − t)_+ = α``. With ``u`` the magnitudes sorted in decreasing order
and ``s_k = u_1 + … + u_k``, ``t = (s_ρ − α) / ρ`` for the largest ``ρ`` with ``u_ρ > (s_ρ − α) / ρ``
(clamped at 0, which covers ``‖v‖₁ ≤ α``). One program holds ``ROWS`` groups of ``G`` values in
registers, sorts each group (bitonic, ``tl.sort``), takes the prefix sums, counts ``ρ`` and writes
the clipped group: one read and one write of the tensor, against the torch path's several
elementwise passes and a host synchronisation per Newton step (``qwha.quant.magr.prox_linf``).
"""

from __future__ import annotations

import torch

from qwha.kernels.fwht import interpreted

try:
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is in the project's dependencies
    _HAVE_TRITON = False

MAX_GROUP = 1024  # groups longer than this (or not a power of two) use the torch path

if _HAVE_TRITON:

    @triton.jit
    def _prox_linf_kernel(v_ptr, out_ptr, n_rows, alpha, G: tl.constexpr, ROWS: tl.constexpr):
        pid = tl.program_id(0)
        r = pid * ROWS + tl.arange(0, ROWS)
        c = tl.arange(0, G)
        offs = r[:, None].to(tl.int64) * G + c[None, :]
        mask = (r < n_rows)[:, None]
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.sort(tl.abs(v), dim=1, descending=True)
        css = tl.cumsum(u, axis=1)
        j = (c + 1).to(tl.float32)[None, :]
        rho = tl.sum((u * j > css - alpha).to(tl.int32), axis=1)  # ≥ 1: u_1 > u_1 − α
        s_rho = tl.sum(tl.where(c[None, :] == (rho - 1)[:, None], css, 0.0), axis=1)
        t = tl.maximum((s_rho - alpha) / rho.to(tl.float32), 0.0)[:, None]
        out = tl.minimum(tl.maximum(v, -t), t)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def supports(v: torch.Tensor) -> bool:
    """Whether ``prox_linf_groups(v, α)`` can run on ``v`` here (device, group length)."""
    g = v.shape[-1]
    usable = (v.is_cuda and torch.cuda.is_available() and not interpreted()) or (
        interpreted() and not v.is_cuda
    )
    return _HAVE_TRITON and usable and 2 <= g <= MAX_GROUP and g & (g - 1) == 0


def prox_linf_groups(v: torch.Tensor, alpha: float) -> torch.Tensor:
    """``prox_{α‖·‖∞}`` of every slice ``v[..., :]`` (a power-of-two length ≤ 1024), float32 math."""
    if not supports(v):
        raise RuntimeError(f"the Triton prox kernel cannot run on {v.device} with group length {v.shape[-1]}")
    g = v.shape[-1]
    rows = v.contiguous().view(-1, g)
    out = torch.empty_like(rows)
    n = rows.shape[0]
    if n:
        block = max(1, min(128, 4096 // g))
        _prox_linf_kernel[(triton.cdiv(n, block),)](
            rows, out, n, float(alpha), G=g, ROWS=block, num_warps=4 if g * block <= 4096 else 8
        )
    return out.view(v.shape)


__all__ = ["MAX_GROUP", "prox_linf_groups", "supports"]
