"""Triton kernels for the Walsh-Hadamard transform: power-of-two butterflies, and the fused ``H_m ⊗ H_P``.

One program transforms ``ROWS`` rows of length ``P = 2^LOG_P`` held in registers. Each stage is the
"perfect shuffle" form of a radix-2 butterfly: view the row as ``[2, P/2]`` (top index bit first),
combine the halves into ``(a + b, a − b)`` and interleave them, which moves the transformed bit to
the bottom. After ``LOG_P`` stages every bit has been transformed once and is back in place, so the
result is the Sylvester transform in natural order. Arithmetic is float32 whatever the input dtype;
the row is scaled by ``scale`` and rounded once into the output dtype.

``fused_transform`` does a whole non-power-of-two width ``n = m·P`` in one pass: each program
accumulates the ``m × m`` dense factor over the ``m`` slabs of its rows (``m`` padded to a power of two
in registers), then runs the same butterflies on the accumulator and stores the result in the output
dtype, so nothing goes through memory in float32 between the two factors.

Whether this pays against the torch butterflies (``qwha.hadamard._butterflies_torch``) is measured
by ``experiments/bench_adapter.py --fwht`` on the GPU machine. Under ``TRITON_INTERPRET=1`` the same
kernel runs on CPU tensors; the interpreter must be selected before this module is imported.
"""

from __future__ import annotations

import os

import torch

MAX_LOG_P = 15  # 32768 float32 values per row in registers; longer rows use the torch path

try:  # triton is a hard dependency on GPU machines; keep the CPU import path working without it
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is in the project's dependencies
    _HAVE_TRITON = False


# Triton decides between compiled and interpreted kernels when the decorators below run, so what
# counts is the setting at import time.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreted() -> bool:
    """Whether this module's kernels were built for Triton's interpreter (they run on CPU tensors)."""
    return _INTERPRETED


def available() -> bool:
    """Whether the kernel can run on CUDA tensors here."""
    return _HAVE_TRITON and torch.cuda.is_available() and not interpreted()


if _HAVE_TRITON:

    @triton.jit
    def _fwht_rows_kernel(
        x_ptr,
        y_ptr,
        n_rows,
        scale,
        P: tl.constexpr,
        LOG_P: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        r = pid * ROWS + tl.arange(0, ROWS)
        c = tl.arange(0, P)
        offs = r[:, None].to(tl.int64) * P + c[None, :]
        mask = (r < n_rows)[:, None]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        for _ in tl.static_range(LOG_P):
            x3 = tl.permute(tl.reshape(x, (ROWS, 2, P // 2)), (0, 2, 1))
            a, b = tl.split(x3)
            x = tl.reshape(tl.join(a + b, a - b), (ROWS, P))
        tl.store(y_ptr + offs, (x * scale).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fwht_fused_kernel(
        x_ptr,
        f_ptr,
        y_ptr,
        n_rows,
        scale,
        M: tl.constexpr,
        M_PAD: tl.constexpr,
        P: tl.constexpr,
        LOG_P: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        # Row r holds X [M, P] (index a·P + b). Y = Fm · X · H_P · scale, Fm the dense factor [M, M]:
        # the m × m product first (one read of each [ROWS, P] slab of x, accumulated in registers),
        # then the butterflies on the accumulator; x is read once and y written once.
        pid = tl.program_id(0)
        r = pid * ROWS + tl.arange(0, ROWS)
        j = tl.arange(0, M_PAD)
        c = tl.arange(0, P)
        row_ok = r < n_rows
        base = r.to(tl.int64) * (M * P)
        acc = tl.zeros((ROWS, M_PAD, P), dtype=tl.float32)
        for a in tl.range(0, M):
            xa = tl.load(x_ptr + base[:, None] + a * P + c[None, :], mask=row_ok[:, None], other=0.0)
            fa = tl.load(f_ptr + j * M + a, mask=j < M, other=0.0)  # column a of Fm
            acc += fa[None, :, None] * xa.to(tl.float32)[:, None, :]
        z = tl.reshape(acc, (ROWS * M_PAD, P))
        for _ in tl.static_range(LOG_P):
            z3 = tl.permute(tl.reshape(z, (ROWS * M_PAD, 2, P // 2)), (0, 2, 1))
            lo, hi = tl.split(z3)
            z = tl.reshape(tl.join(lo + hi, lo - hi), (ROWS * M_PAD, P))
        out = tl.reshape(z * scale, (ROWS, M_PAD, P)).to(y_ptr.dtype.element_ty)
        offs = base[:, None, None] + j[None, :, None] * P + c[None, None, :]
        mask = row_ok[:, None, None] & (j < M)[None, :, None]
        tl.store(y_ptr + offs, out, mask=mask)


def supports(p: int) -> bool:
    """Whether a power-of-two length ``p`` is handled by the kernel."""
    return _HAVE_TRITON and p >= 2 and p & (p - 1) == 0 and p.bit_length() - 1 <= MAX_LOG_P


def butterflies(x: torch.Tensor, scale: float = 1.0, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``scale · x · H_P`` (unnormalised Sylvester ``H_P``) for a contiguous ``[R, P]`` tensor.

    ``out_dtype`` defaults to float32 (the kernel's arithmetic)."""
    if not _HAVE_TRITON:
        raise RuntimeError("triton is not installed")
    if x.ndim != 2 or not x.is_contiguous():
        raise ValueError("butterflies() needs a contiguous [rows, P] tensor")
    n_rows, p = x.shape
    if not supports(p):
        raise ValueError(f"row length {p} is not a power of two in [2, 2^{MAX_LOG_P}]")
    y = torch.empty((n_rows, p), dtype=out_dtype or torch.float32, device=x.device)
    if n_rows == 0:
        return y
    rows = max(1, min(64, 4096 // p))
    num_warps = max(1, min(16, p * rows // 512))
    grid = (triton.cdiv(n_rows, rows),)
    _fwht_rows_kernel[grid](
        x, y, n_rows, float(scale), P=p, LOG_P=p.bit_length() - 1, ROWS=rows, num_warps=num_warps
    )
    return y


# Accumulator elements per program of the fused kernel; a row wider than this (after padding m to a
# power of two) gets one program of its own.
FUSED_TILE = 8192


def fused_transform(
    x: torch.Tensor, factor: torch.Tensor, p: int, scale: float, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``scale · (Fm ⊗ H_P)``-transform of each row of a contiguous ``[R, m·P]`` tensor in one kernel.

    Row ``x`` viewed as ``X [m, P]`` becomes ``Y = scale · Fm · X · H_P`` (``H_P`` unnormalised
    Sylvester, ``factor = Fm`` a float32 ``[m, m]`` matrix): the dense factor and the butterflies are
    applied in registers, so the input is read once and the output written once, in ``out_dtype``
    (default: ``x.dtype``); arithmetic is float32."""
    if not _HAVE_TRITON:
        raise RuntimeError("triton is not installed")
    m = factor.shape[0]
    if x.ndim != 2 or not x.is_contiguous() or x.shape[1] != m * p or factor.shape != (m, m):
        raise ValueError(
            f"fused_transform() needs a contiguous [rows, {m}·{p}] tensor and a [{m}, {m}] factor"
        )
    if not supports(p):
        raise ValueError(f"row length {p} is not a power of two in [2, 2^{MAX_LOG_P}]")
    n_rows = x.shape[0]
    y = torch.empty((n_rows, m * p), dtype=out_dtype or x.dtype, device=x.device)
    if n_rows == 0:
        return y
    m_pad = 1 << (m - 1).bit_length()
    width = m_pad * p
    rows = max(1, min(16, FUSED_TILE // width))
    num_warps = max(1, min(16, rows * width // 512))
    grid = (triton.cdiv(n_rows, rows),)
    f = factor.to(device=x.device, dtype=torch.float32).contiguous()
    _fwht_fused_kernel[grid](
        x,
        f,
        y,
        n_rows,
        float(scale),
        M=m,
        M_PAD=m_pad,
        P=p,
        LOG_P=p.bit_length() - 1,
        ROWS=rows,
        num_warps=num_warps,
    )
    return y


__all__ = [
    "FUSED_TILE",
    "MAX_LOG_P",
    "available",
    "butterflies",
    "fused_transform",
    "interpreted",
    "supports",
]
