"""Orthonormal Walsh-Hadamard matrices of any practical order and their fast transform.

Convention: ``fwht(x)`` computes ``x · H`` along one axis (a row vector times ``H``), ``ifwht(x)``
computes ``x · H⁻¹ = x · Hᵀ``. ``H`` is orthonormal (``H Hᵀ = I``, entries ``±1/√n``).

Orders. ``n = m · 2^k`` with ``H_n = H_m ⊗ H_{2^k}``: ``H_{2^k}`` is Sylvester's matrix
(``H_{2^k}[i, j] = (-1)^{popcount(i & j)} / √2^k``, symmetric), and ``H_m`` is

* ``m = 1`` or ``m = 2`` (then ``n`` is a power of two), or
* Paley I, ``m = q + 1`` for a prime power ``q ≡ 3 (mod 4)``, or
* Paley II, ``m = 2(q + 1)`` for a prime power ``q ≡ 1 (mod 4)``,

built here from the quadratic character of GF(q) (GF(p^e) arithmetic included: 14336 = 28·512 needs
GF(27), 11008 = 344·32 needs GF(343)). The smallest such ``m`` is picked automatically, so the dense
``m × m`` part of the fast transform stays small. Widths with no construction raise
:class:`HadamardSizeError`, naming the nearest supported widths.

Fast transform: butterflies (additions and subtractions only) over the ``2^k`` factor, then one
dense ``m × m`` product; ``O(n log n + n m)`` per vector. Half-precision inputs are transformed in
float32 and rounded once at the end, so a bf16 result carries one bf16 rounding, not one per stage.
On CUDA the whole transform (dense factor and butterflies) runs in one Triton kernel
(:mod:`qwha.kernels.fwht`) when Triton is present.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch

__all__ = [
    "HadamardSizeError",
    "fwht",
    "hadamard_factors",
    "scatter_transform",
    "transform_columns",
    "hadamard_matrix",
    "ifwht",
    "is_supported",
    "nearest_supported",
    "paley_construction",
    "supported_orders",
]


class HadamardSizeError(ValueError):
    """A width for which no Hadamard construction is implemented."""


# --------------------------------------------------------------------------------------------
# GF(p^e) and the quadratic character
# --------------------------------------------------------------------------------------------


def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, e)`` with ``q = p^e`` for a prime ``p``, else ``None``."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    e, r = 0, q
    while r % p == 0:
        r //= p
        e += 1
    return (p, e) if r == 1 else None


def _poly_mod(a: list[int], m: list[int], p: int) -> list[int]:
    """Remainder of polynomial ``a`` modulo monic ``m`` over GF(p); coefficients low degree first."""
    a = list(a)
    dm = len(m) - 1
    for i in range(len(a) - 1, dm - 1, -1):
        c = a[i] % p
        if c:
            for j in range(dm + 1):
                a[i - dm + j] = (a[i - dm + j] - c * m[j]) % p
    return [c % p for c in a[:dm]] + [0] * max(0, dm - len(a))


def _is_irreducible(m: list[int], p: int) -> bool:
    """Trial division of monic ``m`` by every monic polynomial of degree 1..deg(m)//2."""
    deg = len(m) - 1
    for d in range(1, deg // 2 + 1):
        for low in itertools.product(range(p), repeat=d):
            if not any(_poly_mod(m, [*low, 1], p)):
                return False
    return True


@functools.cache
def _irreducible_poly(p: int, e: int) -> tuple[int, ...]:
    """The first monic irreducible polynomial of degree ``e`` over GF(p) (low degree first)."""
    for low in itertools.product(range(p), repeat=e):
        m = [*low, 1]
        if m[0] != 0 and _is_irreducible(m, p):
            return tuple(m)
    raise AssertionError(f"no irreducible polynomial of degree {e} over GF({p})")  # cannot happen


def _quadratic_character_matrix(q: int) -> np.ndarray:
    """Jacobsthal matrix ``Q[a, b] = χ(a − b)`` of GF(q), χ the quadratic character (int8)."""
    p, e = _prime_power(q)  # type: ignore[misc]
    # An element is its coefficient vector over GF(p) (polynomial basis), encoded as sum d_i p^i.
    digits = np.array([[(x // p**i) % p for i in range(e)] for x in range(q)], dtype=np.int64)
    weights = p ** np.arange(e, dtype=np.int64)
    if e == 1:
        squares = {(x * x) % p for x in range(1, p)}
    else:
        mod = list(_irreducible_poly(p, e))
        squares = set()
        for x in range(1, q):
            a = digits[x].tolist()
            prod = [0] * (2 * e - 1)
            for i, ai in enumerate(a):
                for j, aj in enumerate(a):
                    prod[i + j] += ai * aj
            squares.add(int(np.dot(_poly_mod(prod, mod, p), weights)))
    if len(squares) != (q - 1) // 2:  # a field has exactly (q-1)/2 nonzero squares (q odd)
        raise AssertionError(f"GF({q}) arithmetic is broken")
    chi = np.full(q, -1, dtype=np.int8)
    chi[0] = 0
    chi[list(squares)] = 1
    diff = (digits[:, None, :] - digits[None, :, :]) % p  # [q, q, e]
    return chi[diff @ weights]


def paley_construction(m: int) -> tuple[str, int] | None:
    """How order ``m`` is built: ``("sylvester", m)`` for 1 and 2, ``("paley1", q)`` for
    ``m = q + 1`` (``q ≡ 3 mod 4``), ``("paley2", q)`` for ``m = 2(q + 1)`` (``q ≡ 1 mod 4``),
    ``None`` if neither applies."""
    if m in (1, 2):
        return ("sylvester", m)
    if m % 4:
        return None
    if _prime_power(m - 1) and (m - 1) % 4 == 3:
        return ("paley1", m - 1)
    q = m // 2 - 1
    if _prime_power(q) and q % 4 == 1:
        return ("paley2", q)
    return None


@functools.cache
def _small_hadamard(m: int) -> torch.Tensor:
    """Unnormalised ±1 Hadamard matrix of order ``m`` (float64, CPU), ``H Hᵀ = m I`` checked."""
    kind = paley_construction(m)
    if kind is None:
        raise HadamardSizeError(f"no Paley construction for order {m}")
    if kind[0] == "sylvester":
        h = np.array([[1]]) if m == 1 else np.array([[1, 1], [1, -1]])
    else:
        q = kind[1]
        jac = _quadratic_character_matrix(q).astype(np.int64)
        if kind[0] == "paley1":
            s = np.zeros((q + 1, q + 1), dtype=np.int64)
            s[0, 1:] = 1
            s[1:, 0] = -1
            s[1:, 1:] = jac
            h = np.eye(q + 1, dtype=np.int64) + s
        else:
            c = np.zeros((q + 1, q + 1), dtype=np.int64)
            c[0, 1:] = 1
            c[1:, 0] = 1
            c[1:, 1:] = jac
            h = np.kron(c, np.array([[1, -1], [-1, -1]])) + np.kron(
                np.eye(q + 1, dtype=np.int64), np.array([[1, 1], [1, -1]])
            )
    if not np.array_equal(h @ h.T, m * np.eye(m, dtype=np.int64)):
        raise AssertionError(f"construction of order {m} is not Hadamard")
    return torch.from_numpy(h.astype(np.float64))


# --------------------------------------------------------------------------------------------
# Orders
# --------------------------------------------------------------------------------------------


def _split(n: int) -> tuple[int, int] | None:
    """``(m, P)`` with ``n = m·P``, ``P`` a power of two and ``m`` the smallest constructible order."""
    if n < 1:
        return None
    v = (n & -n).bit_length() - 1  # 2-adic valuation
    odd = n >> v
    for j in range(v + 1):
        m = odd << j
        if paley_construction(m) is not None:
            return m, n // m
    return None


def is_supported(n: int) -> bool:
    """Whether a Hadamard matrix of order ``n`` can be built here."""
    return _split(n) is not None


def hadamard_factors(n: int) -> tuple[int, int]:
    """``(m, P)``: ``H_n = H_m ⊗ H_P`` with ``P`` a power of two and ``m`` the dense factor.

    Raises :class:`HadamardSizeError` (naming the nearest supported widths) if ``n`` has none."""
    split = _split(n)
    if split is None:
        lo, hi = nearest_supported(n)
        raise HadamardSizeError(
            f"no Hadamard construction for width {n}: a width must be m·2^k with m = 1, 2, q+1 "
            f"(q a prime power ≡ 3 mod 4) or 2(q+1) (q a prime power ≡ 1 mod 4); "
            f"nearest supported widths: {lo} and {hi}"
        )
    return split


def supported_orders(max_order: int = 1024) -> list[int]:
    """The dense factors ``m ≤ max_order`` implemented (1, 2 and the Paley orders)."""
    return [m for m in range(1, max_order + 1) if paley_construction(m) is not None]


def nearest_supported(n: int) -> tuple[int, int]:
    """The largest supported width ``< n`` (``0`` if none) and the smallest supported width ``> n``."""
    lo = next((k for k in range(n - 1, 0, -1) if is_supported(k)), 0)
    hi = next(k for k in itertools.count(n + 1) if is_supported(k))
    return lo, hi


def _sylvester(p: int, dtype: torch.dtype) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=dtype)
    two = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=dtype)
    while h.shape[0] < p:
        h = torch.kron(two, h)
    return h


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense orthonormal Hadamard matrix ``[n, n]`` = ``(H_m ⊗ H_P) / √n`` (the matrix ``fwht`` applies)."""
    m, p = hadamard_factors(n)
    h = torch.kron(_small_hadamard(m), _sylvester(p, torch.float64)) / math.sqrt(n)
    return h.to(dtype)


@functools.lru_cache(maxsize=64)
def _dense_factor(m: int, transpose: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised ``H_m`` (or its transpose) as the left operand of the dense step (see ``_transform``)."""
    h = _small_hadamard(m) / math.sqrt(m)
    # y = x·H on a [m, P] slab is H_mᵀ @ slab; x·Hᵀ is H_m @ slab.
    return (h.T if transpose else h).contiguous().to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Fast transform
# --------------------------------------------------------------------------------------------


def _butterflies_torch(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Sylvester transform along the last axis of a ``[R, P]`` tensor, ``P = 2^k``.

    Radix-2 stages written with ``out=`` into two ping-pong buffers: each stage reads the previous
    result once and writes once (no stacking copies); ``x`` itself is not modified. Measured on CPU
    about 2.4x faster than radix-4 stages built with ``torch.stack``."""
    r, p = x.shape
    if p == 1:
        return x.clone()
    src, bufs = x, [torch.empty_like(x), None]
    h, k = 1, 0
    while h < p:
        if bufs[k] is None:
            bufs[k] = torch.empty_like(x)
        dst = bufs[k]
        s = src.view(r, p // (2 * h), 2, h)
        d = dst.view(r, p // (2 * h), 2, h)
        torch.add(s[:, :, 0], s[:, :, 1], out=d[:, :, 0])
        torch.sub(s[:, :, 0], s[:, :, 1], out=d[:, :, 1])
        src, k, h = dst, 1 - k, 2 * h
    return src


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _transform(x: torch.Tensor, dim: int, inverse: bool, backend: str = "auto") -> torch.Tensor:
    n = x.shape[dim]
    m, p = hadamard_factors(n)
    out_dtype = x.dtype
    xm = x.movedim(dim, -1)
    batch_shape = xm.shape[:-1]
    rows = xm.reshape(-1, n)
    if rows.shape[0] == 0:
        return x.clone()
    use_triton = False
    if backend == "triton" or (backend == "auto" and p > 1 and rows.is_cuda):
        from qwha.kernels import fwht as _kernels

        usable = (_kernels.available() and rows.is_cuda) or _kernels.interpreted()
        use_triton = p > 1 and usable and _kernels.supports(p)
        if backend == "triton" and p > 1 and not use_triton:
            raise RuntimeError(f"the Triton FWHT kernel cannot run here (device {rows.device}, length {p})")
    elif backend not in ("auto", "torch"):
        raise ValueError(f"backend={backend!r} is not one of auto, torch, triton")
    if use_triton and m > 1:  # one kernel: the m × m factor and the butterflies, output dtype written once
        factor = _dense_factor(m, not inverse, torch.float32, rows.device)
        y = _kernels.fused_transform(rows.contiguous(), factor, p, 1.0 / math.sqrt(p), out_dtype)
        return y.reshape(*batch_shape, n).movedim(-1, dim)
    if use_triton:
        # The kernel loads any float dtype, computes in float32 and writes the output dtype (one rounding).
        y = _kernels.butterflies(
            rows.contiguous().view(-1, p),
            scale=1.0 / math.sqrt(p),
            out_dtype=out_dtype if m == 1 else _compute_dtype(out_dtype),
        )
    else:
        y = rows.to(_compute_dtype(out_dtype)).contiguous().view(-1, p)
        if p > 1:
            y = _butterflies_torch(y) * (1.0 / math.sqrt(p))
    if m > 1:
        y = torch.matmul(_dense_factor(m, not inverse, y.dtype, y.device), y.view(-1, m, p))
    return y.reshape(*batch_shape, n).to(out_dtype).movedim(-1, dim)


# Up to this power-of-two factor the weight-side build applies ``H_P`` as one GEMM (``P`` multiply-adds per
# element at GEMM speed); above it, as butterflies (``2·log2 P`` passes over memory). Measured on CPU,
# one thread, SmolLM2 widths: P = 16 (576 = 36·16) the GEMM is 1.7-2.6x faster than the butterflies;
# P = 128 (1536 = 12·128) the butterflies win (experiments/results/finetune.md).
_GEMM_MAX_P = 32


@functools.lru_cache(maxsize=64)
def _right_factor(
    m: int, inverse: bool, scale: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``scale · H_m`` (``scale · H_mᵀ`` if ``inverse``), normalised, as the right operand of a GEMM on
    rows laid out ``[..., m]`` (see :func:`scatter_transform`)."""
    h = _small_hadamard(m) / math.sqrt(m) * scale
    return (h.T if inverse else h).contiguous().to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _sylvester_cached(p: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _sylvester(p, torch.float64).to(device=device, dtype=dtype)


def _butterflies_middle(x: torch.Tensor, rows: int, p: int, m: int) -> torch.Tensor:
    """Unnormalised Sylvester transform along the middle axis of a contiguous ``[rows, p, m]`` tensor (each
    radix-2 stage adds and subtracts contiguous runs of ``h·m`` elements; ``x`` is overwritten)."""
    src, spare = x, torch.empty_like(x)
    h = 1
    while h < p:
        s = src.view(rows, p // (2 * h), 2, h * m)
        d = spare.view(rows, p // (2 * h), 2, h * m)
        torch.add(s[:, :, 0], s[:, :, 1], out=d[:, :, 0])
        torch.sub(s[:, :, 0], s[:, :, 1], out=d[:, :, 1])
        src, spare, h = spare, src, 2 * h
    return src


def scatter_positions(flat: torch.Tensor, n: int) -> torch.Tensor:
    """Where :func:`scatter_transform` puts the entry at row-major flat position ``flat`` of an ``[R, n]``
    matrix: column ``j = a·P + b`` (``n = m·P``) goes to ``b·m + a`` of its row (the ``[R, P, m]`` layout)."""
    m, p = hadamard_factors(n)
    flat = flat.long()
    row, col = flat // n, flat % n
    return row * n + (col % p) * m + col // p


def scatter_transform(
    values: torch.Tensor,
    positions: torch.Tensor,
    rows: int,
    n: int,
    *,
    inverse: bool,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base + S·H`` (``S·Hᵀ`` if ``inverse``) for the sparse ``S`` ``[rows, n]`` holding ``values`` at
    ``positions`` (from :func:`scatter_positions`), without autograd, in ``values``' dtype.

    The weight side of the WHA adapter (``W_Q + s·F·T⁻¹``) built in four passes: a scatter into the
    ``[rows, P, m]`` layout, ``H_m`` (with the ``1/√P`` of ``H_P`` folded in) as one GEMM over the last
    axis, ``H_P`` over the middle axis (one GEMM after a transpose for ``P ≤ 32``, else butterflies), and
    ``base`` added while the layout is turned back to ``[rows, m, P]`` (row-major ``[rows, n]``). About
    2x faster on CPU than scattering into ``[rows, n]`` and calling :func:`ifwht` (butterflies, then a
    broadcast batched product), which also needed separate passes for the scale and for adding ``base``.
    """
    m, p = hadamard_factors(n)
    dtype, device = values.dtype, values.device
    y = torch.zeros(rows * n, dtype=dtype, device=device)
    y.index_put_((positions,), values)
    y = y.view(rows * p, m)
    if m > 1:
        y = y @ _right_factor(m, inverse, 1.0 / math.sqrt(p), dtype, device)
    elif p > 1:
        y = y * (1.0 / math.sqrt(p))
    if p > 1 and p <= _GEMM_MAX_P:  # [rows, P, m] -> [rows·m, P] @ H_P (symmetric)
        z = y.view(rows, p, m).transpose(1, 2).reshape(rows * m, p)
        hp = _sylvester_cached(p, dtype, device)
        out = z @ hp if base is None else torch.addmm(base.reshape(rows * m, p).to(dtype), z, hp)
        return out.view(rows, n)
    if p > 1:
        y = _butterflies_middle(y.view(rows, p, m), rows, p, m)
    y = y.view(rows, p, m).transpose(1, 2)
    out = y.contiguous() if base is None else torch.add(base.reshape(rows, m, p).to(dtype), y)
    return out.view(rows, n)


def transform_columns(a: torch.Tensor, *, inverse: bool) -> torch.Tensor:
    """``Hᵀ·a`` (``H·a`` if ``inverse``) for ``a`` ``[n, N]``, without autograd, in ``a``'s (float) dtype:
    the transposed form of ``x·H`` (``x·Hᵀ``), i.e. ``(x·H)ᵀ`` for ``a = xᵀ``.

    With ``a`` viewed as ``[m, P, N]``: ``H_m`` is one GEMM over the first axis (``[m, m] @ [m, P·N]``,
    with the ``1/√P`` of ``H_P`` folded in) and ``H_P`` a batched GEMM (``P ≤ 32``) or butterflies over
    contiguous runs of ``h·N`` elements: no transposes, and the result is already the column-major ``x·H``
    that a sampled product reads (the WHA adapter's ``∂L/∂c``). On CPU, one thread, ``[512, 1536]`` it
    is several times faster than :func:`fwht` along the rows (experiments/results/finetune.md)."""
    n, cols = a.shape
    m, p = hadamard_factors(n)
    dtype, device = a.dtype, a.device
    y = a.contiguous().view(m, p * cols)
    if m > 1:  # Hmᵀ·y for x·H, Hm·y for x·Hᵀ: the transposed right factor of scatter_transform
        y = _right_factor(m, inverse, 1.0 / math.sqrt(p), dtype, device).T @ y
    elif p > 1:
        y = y * (1.0 / math.sqrt(p))
    elif y.data_ptr() == a.data_ptr():
        y = y.clone()
    if p > 1 and p <= _GEMM_MAX_P:
        hp = _sylvester_cached(p, dtype, device)
        y = torch.matmul(hp, y.view(m, p, cols))
    elif p > 1:
        y = _butterflies_middle(y.contiguous().view(m, p, cols), m, p, cols)
    return y.reshape(n, cols)


class _HadamardFn(torch.autograd.Function):
    # A linear map: the backward of x ↦ x·H is g ↦ g·Hᵀ, i.e. the opposite transform. Nothing is saved.
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, inverse: bool, backend: str) -> torch.Tensor:
        ctx.dim, ctx.inverse, ctx.backend = dim, inverse, backend
        return _transform(x, dim, inverse, backend)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _HadamardFn.apply(grad, ctx.dim, not ctx.inverse, ctx.backend), None, None, None


def fwht(x: torch.Tensor, dim: int = -1, *, backend: str = "auto") -> torch.Tensor:
    """``x · H`` along ``dim`` (any batch shape, float16/bfloat16/float32/float64), differentiable.

    ``H = hadamard_matrix(x.shape[dim])``. Half-precision inputs are computed in float32 and
    rounded once; the result has the input's dtype. ``backend``: ``"auto"`` (Triton butterflies
    for CUDA tensors when available, torch otherwise), ``"torch"``, or ``"triton"`` (CUDA, or any
    device under ``TRITON_INTERPRET=1``; an error if the kernel cannot run)."""
    return _HadamardFn.apply(x, dim % x.ndim, False, backend)


def ifwht(x: torch.Tensor, dim: int = -1, *, backend: str = "auto") -> torch.Tensor:
    """``x · H⁻¹ = x · Hᵀ`` along ``dim``: the inverse of :func:`fwht` (same ``backend`` choices)."""
    return _HadamardFn.apply(x, dim % x.ndim, True, backend)
