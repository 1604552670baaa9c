"""Orthonormal transforms of the adapter family: WHT, DCT, DHT and identity.

Convention (shared with :mod:`qwha.hadamard`): a transform ``T`` is an orthonormal ``[n, n]`` matrix
acting on row vectors, forward ``x ↦ x·T``, inverse ``x ↦ x·T⁻¹ = x·Tᵀ``.

* ``wht``: ``T = hadamard_matrix(n)``; applied by the fast transform (butterflies), ``O(n log n)``.
* ``dct``: orthonormal DCT-II, ``T[j, k] = √(2/n) · c_k · cos(π (2j + 1) k / (2n))``, ``c_0 = 1/√2``,
  ``c_k = 1`` otherwise, so ``x·T`` are the DCT-II coefficients of ``x``.
* ``dht``: discrete Hartley, ``T[j, k] = cas(2π jk / n) / √n`` with ``cas = cos + sin`` (symmetric,
  its own inverse).
* ``identity``: ``T = I`` (the adapter becomes a plain sparse update, SHiRA-like).

DCT and DHT are applied as dense matrix products, ``O(n²)`` per vector, which is how the DCT/DHT
adapters this project compares against (LoCA, SSH) compute their updates; the speed benchmark's
DCT-2D figure reflects that choice.
"""

from __future__ import annotations

import functools
import math

import torch

from qwha.hadamard import fwht, hadamard_matrix, ifwht

TRANSFORMS = ("wht", "dct", "dht", "identity")

__all__ = ["TRANSFORMS", "apply_transform", "check_transform", "transform_matrix"]


def check_transform(kind: str) -> str:
    if kind not in TRANSFORMS:
        raise ValueError(f"transform={kind!r} is not one of {', '.join(TRANSFORMS)}")
    return kind


def transform_matrix(kind: str, n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthonormal ``[n, n]`` matrix ``T`` of ``kind`` (forward transform ``x ↦ x·T``)."""
    check_transform(kind)
    if kind == "wht":
        return hadamard_matrix(n, dtype)
    if kind == "identity":
        return torch.eye(n, dtype=dtype)
    j = torch.arange(n, dtype=torch.float64)
    if kind == "dct":
        t = torch.cos(math.pi * (2 * j[:, None] + 1) * j[None, :] / (2 * n)) * math.sqrt(2.0 / n)
        t[:, 0] /= math.sqrt(2.0)
    else:  # dht
        # (j k) mod n keeps the angle small, so the float64 table is exact to the last bits for large n
        ang = 2 * math.pi * torch.remainder(j[:, None] * j[None, :], n) / n
        t = (torch.cos(ang) + torch.sin(ang)) / math.sqrt(n)
    return t.to(dtype)


@functools.lru_cache(maxsize=32)
def _cached_matrix(kind: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return transform_matrix(kind, n, torch.float64).to(device=device, dtype=dtype)


def apply_transform(x: torch.Tensor, kind: str, dim: int = -1, inverse: bool = False) -> torch.Tensor:
    """``x·T`` (or ``x·Tᵀ`` if ``inverse``) along ``dim``; differentiable, any batch shape.

    ``wht`` uses :func:`qwha.hadamard.fwht`; ``dct``/``dht`` multiply by the cached dense matrix
    (float32 arithmetic for half-precision inputs); ``identity`` returns ``x``."""
    check_transform(kind)
    if kind == "identity":
        return x
    if kind == "wht":
        return ifwht(x, dim) if inverse else fwht(x, dim)
    dim = dim % x.ndim
    n = x.shape[dim]
    cdtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    t = _cached_matrix(kind, n, cdtype, x.device)
    xm = x.movedim(dim, -1).to(cdtype)
    y = xm @ (t.T if inverse else t)
    return y.to(x.dtype).movedim(-1, dim)
