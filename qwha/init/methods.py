"""Every adapter init as one function of a layer: `initialize(method, ΔW_Q, XXᵀ, budget, ...)`.

Sparse methods (`zero, random, magnitude, ssh, loca, adaalloc`, and the baselines' own inits
`random_zero, ssh_w0`; see `qwha.init.selection` for what each selects) return
`{"kind": "sparse", "indices": LongTensor [p, 2] (row, col) row-major, "values": [p] float64}` with
*unscaled* values: `ΔW = scatter(values, indices) · T_inᵀ`, or for the
2-D ablation `ΔW = T_out · F · T_inᵀ`. The adapter divides by its scale `s` when it stores them.
Low-rank methods (`lora_zero, cloq, loftq`) return `{"kind": "lowrank", "A": [r, d_in],
"B": [d_out, r]}` (float64, `ΔW = B @ A`, unscaled), plus `"weight_q"` for LoftQ with more than one
step (the new quantized base weight).

The sparse pipeline (docs/method.md §2), float64 throughout, on the device of `delta_w`:

    D = ΔW_Q (2-D: T_outᵀ ΔW_Q);  G_d = damped XXᵀ;  coeffs = D T;  M = Tᵀ G_d T;  Y = coeffs M
    locations  <- method (AdaAlloc budgets + per-row top scores, global top, random, ...)
    values     <- refine: per-row least squares M[S,S] c = Y[i,S] (batched), else coeffs[S]

The 2-D objective `‖(ΔW_Q − T_out F T_inᵀ) R‖` separates over the rows of `F` after rotating the
target by `T_outᵀ` (orthonormal `T_out` drops out of the normal matrix), so both cases share the
same code. Products with `T` use the Kronecker fast path of `RightTransform` when `T` has one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from qwha.init.allocation import ALLOC_WEIGHTS, adaalloc, channel_importance
from qwha.init.hessian import DEFAULT_REL_DAMP, damped_gram
from qwha.init.lowrank import cloq, loftq, lora_zero
from qwha.init.refine import gather_values, refine_values
from qwha.init.selection import (
    SCORES,
    coefficient_scores,
    select_global,
    select_per_channel,
    select_random,
    select_ssh,
)
from qwha.init.transform_op import RightTransform

__all__ = [
    "SPARSE_METHODS",
    "LOWRANK_METHODS",
    "METHODS",
    "TRANSFORMS",
    "resolve_transform",
    "initialize",
    "initialize_layer",
]

SPARSE_METHODS = ("zero", "random", "magnitude", "ssh", "loca", "adaalloc", "random_zero", "ssh_w0")
# Inits whose values are zero whatever `refine` says (the initialized model is the quantized model).
ZERO_VALUE_METHODS = ("zero", "random_zero", "ssh_w0")
LOWRANK_METHODS = ("lora_zero", "cloq", "loftq")
METHODS = SPARSE_METHODS + LOWRANK_METHODS
TRANSFORMS = ("wht", "dct", "dht", "identity")
SSH_SOURCES = ("quant_error", "weight")


def resolve_transform(transform: str | Tensor, n: int, *, device=None, key: str = "transform") -> Tensor:
    """The orthonormal `T [n, n]` float64 for a kind name, or a given matrix checked for shape.

    Kind names go to `qwha.transforms.transform_matrix` (imported here, lazily); "identity" is built
    locally.
    """
    if isinstance(transform, Tensor):
        if tuple(transform.shape) != (n, n):
            raise ValueError(f"{key}: expected a [{n}, {n}] matrix, got {tuple(transform.shape)}")
        return transform.to(device=device, dtype=torch.float64)
    if transform not in TRANSFORMS:
        raise ValueError(f"{key}: got {transform!r}, allowed: {', '.join(TRANSFORMS)} (or a matrix)")
    if transform == "identity":
        return torch.eye(n, dtype=torch.float64, device=device)
    from qwha.transforms import transform_matrix  # owned by the adapters module; imported lazily

    return transform_matrix(transform, n, dtype=torch.float64).to(device=device, dtype=torch.float64)


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}: got {value!r}, allowed: {', '.join(allowed)}")


def initialize(
    method: str,
    delta_w: Tensor,
    xtx: Tensor | None,
    budget: int | None = None,
    *,
    transform: str | Tensor = "wht",
    transform_out: str | Tensor | None = None,
    refine: bool = True,
    temperature: float = 1.0,
    alloc_weight: str = "activation",
    score: str = "magnitude",
    seed: int = 0,
    rank: int | None = None,
    loftq_iters: int = 1,
    weight: Tensor | None = None,
    quantize_fn: Callable[[Tensor], Tensor] | None = None,
    ssh_source: str = "quant_error",
    rel_damp: float = DEFAULT_REL_DAMP,
) -> dict:
    """Initial adapter of one layer, for every init of the paper's ablations (module docstring).

    Args:
        method: one of `METHODS`.
        delta_w: `ΔW_Q = W − W_Q [d_out, d_in]` (any float dtype; computed in float64).
        xtx: calibration Gram `XXᵀ [d_in, d_in]` (raw; damped here). Needed by `cloq`, by any
            refinement, by `loca`, by `adaalloc` with `alloc_weight="activation"` and by
            `score="energy"`; may be None otherwise.
        budget: sparse parameter count `p` (`r·(d_in + d_out)` for a rank-r match); sparse methods.
        transform: input transform kind (`wht, dct, dht, identity`) or a matrix `[d_in, d_in]`.
        transform_out: None (1-D adapter) or the output transform (kind or `[d_out, d_out]`), 2-D.
        refine: least-squares value refinement on the selected support (sparse methods except
            the zero-valued `zero, random_zero, ssh_w0`; ignored by those and the low-rank methods).
        temperature: AdaAlloc's `t`.
        alloc_weight: AdaAlloc importance, "activation" (paper) or "weight" (authors' code).
        score: "magnitude" (paper) or "energy" (authors' code); used by adaalloc, magnitude, ssh.
        seed: for random locations (random, zero, random_zero, ssh, ssh_w0) and LoRA's `A`.
        rank: `r` of the low-rank methods.
        loftq_iters: LoftQ's alternating steps (1: SVD of `ΔW_Q`).
        weight: full-precision `W [d_out, d_in]` (LoftQ with >1 step; ssh with `ssh_source="weight"`;
            `ssh_w0`, which ranks the transformed pretrained weight).
        quantize_fn: `W ↦ dequantized W_Q` (LoftQ with >1 step).
        ssh_source: what SSH-style ranks: "quant_error" (`ΔW_Q T`) or "weight" (`W T`).
        rel_damp: relative damping of the Gram (docs/method.md: 1e-4).

    Returns:
        `{"kind": "sparse", "indices", "values"}` or `{"kind": "lowrank", "A", "B"[, "weight_q"]}`.
    """
    _choice("method", method, METHODS)
    if delta_w.dim() != 2:
        raise ValueError(f"delta_w: expected [d_out, d_in], got shape {tuple(delta_w.shape)}")
    d_out, d_in = delta_w.shape
    if xtx is not None and tuple(xtx.shape) != (d_in, d_in):
        raise ValueError(f"xtx: expected [{d_in}, {d_in}], got {tuple(xtx.shape)}")
    if method in LOWRANK_METHODS:
        return _lowrank(method, delta_w, xtx, rank, seed, loftq_iters, weight, quantize_fn, rel_damp)
    _choice("alloc_weight", alloc_weight, ALLOC_WEIGHTS)
    _choice("score", score, SCORES)
    _choice("ssh_source", ssh_source, SSH_SOURCES)
    if budget is None or not 1 <= int(budget) <= d_out * d_in:
        raise ValueError(f"budget: must be in [1, d_out·d_in = {d_out * d_in}], got {budget}")
    budget = int(budget)
    device = delta_w.device
    gen = torch.Generator().manual_seed(seed)
    if method in ZERO_VALUE_METHODS:
        idx = _zero_value_support(method, budget, gen, weight, transform, transform_out, d_out, d_in, device)
        return {
            "kind": "sparse",
            "indices": idx,
            "values": torch.zeros(budget, dtype=torch.float64, device=device),
        }

    op_in = RightTransform.from_matrix(resolve_transform(transform, d_in, device=device))
    op_out = None
    if transform_out is not None:
        t_out = resolve_transform(transform_out, d_out, device=device, key="transform_out")
        op_out = RightTransform.from_matrix(t_out)

    def rotate_rows(m: Tensor) -> Tensor:  # m ↦ T_outᵀ m for the 2-D ablation
        return m if op_out is None else op_out.forward(m.transpose(0, 1).contiguous()).transpose(0, 1)

    target = rotate_rows(delta_w.to(torch.float64))
    coeffs = op_in.forward(target)  # dense solution D·T

    needs_rhs = refine or method == "loca" or (method == "adaalloc" and alloc_weight == "activation")
    needs_normal = needs_rhs or (score == "energy" and method in ("adaalloc", "magnitude", "ssh"))
    normal = rhs = None
    lam = 0.0
    if needs_normal:
        if xtx is None:
            raise ValueError(f"xtx: method={method!r} with refine={refine}, score={score!r} needs the Gram")
        gd, lam = damped_gram(xtx.to(device), rel_damp)
        normal = op_in.congruence(gd)  # Tᵀ G_d T
        del gd
        if needs_rhs:
            rhs = coeffs @ normal  # D G_d T
    diag = normal.diagonal() if normal is not None else None

    if method == "random":
        idx = select_random(d_out, d_in, budget, gen, device=device)
    elif method == "magnitude":
        idx = select_global(coefficient_scores(coeffs, score, diag), budget)
    elif method == "loca":
        idx = select_global(rhs.abs(), budget)
    elif method == "ssh":
        source = coeffs
        if ssh_source == "weight":
            if weight is None:
                raise ValueError("weight: ssh_source='weight' needs the full-precision weight")
            source = op_in.forward(rotate_rows(weight.to(device=device, dtype=torch.float64)))
        idx = select_ssh(coefficient_scores(source, score, diag), budget, gen)
    else:  # adaalloc
        importance = channel_importance(
            target, alloc_weight, damped_products=(coeffs, rhs, lam) if alloc_weight == "activation" else None
        )
        counts = adaalloc(importance, budget, d_in, temperature=temperature)
        idx = select_per_channel(coefficient_scores(coeffs, score, diag), counts)

    values = refine_values(normal, rhs, idx) if refine else gather_values(coeffs, idx)
    return {"kind": "sparse", "indices": idx, "values": values}


def _zero_value_support(method, budget, gen, weight, transform, transform_out, d_out, d_in, device) -> Tensor:
    """Locations of the zero-valued inits: uniform (`zero`, `random_zero`) or SSH's (`ssh_w0`).

    `ssh_w0` ranks `|T_outᵀ W₀ T_in|` (the transformed pretrained weight; 1-D without `transform_out`),
    keeps its `⌊p/2⌋` largest entries and draws the rest uniformly among the others (`select_ssh`)."""
    if method != "ssh_w0":
        return select_random(d_out, d_in, budget, gen, device=device)
    if weight is None:
        raise ValueError("weight: method='ssh_w0' needs the full-precision (pretrained) weight W0")
    if tuple(weight.shape) != (d_out, d_in):
        raise ValueError(f"weight: expected [{d_out}, {d_in}], got {tuple(weight.shape)}")
    w0 = weight.to(device=device, dtype=torch.float64)
    spectrum = RightTransform.from_matrix(resolve_transform(transform, d_in, device=device)).forward(w0)
    if transform_out is not None:
        op_out = RightTransform.from_matrix(
            resolve_transform(transform_out, d_out, device=device, key="transform_out")
        )
        spectrum = op_out.forward(spectrum.transpose(0, 1).contiguous()).transpose(0, 1)
    return select_ssh(spectrum.abs(), budget, gen)


def _lowrank(method, delta_w, xtx, rank, seed, loftq_iters, weight, quantize_fn, rel_damp) -> dict:
    d_out, d_in = delta_w.shape
    if rank is None:
        raise ValueError(f"rank: method={method!r} needs the LoRA rank r")
    if method == "lora_zero":
        a, b = lora_zero(d_out, d_in, int(rank), seed=seed)
        return {"kind": "lowrank", "A": a.to(delta_w.device), "B": b.to(delta_w.device)}
    if method == "cloq":
        if xtx is None:
            raise ValueError("xtx: method='cloq' needs the calibration Gram")
        gd, _ = damped_gram(xtx.to(delta_w.device), rel_damp)
        a, b = cloq(delta_w, gd, int(rank))
        return {"kind": "lowrank", "A": a, "B": b}
    a, b, wq = loftq(delta_w, int(rank), iters=loftq_iters, weight=weight, quantize_fn=quantize_fn)
    out = {"kind": "lowrank", "A": a, "B": b}
    if wq is not None:
        out["weight_q"] = wq
    return out


def initialize_layer(
    delta_w: Tensor,
    xtx: Tensor,
    budget: int,
    *,
    temperature: float = 1.0,
    alloc_weight: str = "activation",
    score: str = "magnitude",
    refine: bool = True,
    transform: str | Tensor = "wht",
) -> tuple[Tensor, Tensor]:
    """QWHA's init of one layer (AdaAlloc + selection + refinement). Returns `(indices, values)`.

    `indices` is a LongTensor `[p, 2]` of (row, col), row-major; `values [p]` float64 such that the
    unscaled update is `scatter(values, indices) · Hᵀ` (`H⁻¹ = Hᵀ`), `H = transform_matrix(kind, d_in)`.
    Arguments as in `initialize`; `init=qwha` is the defaults, `init=qwha_reference` is
    `alloc_weight="weight", score="energy"` (plus the adapter's reference scale).
    """
    out = initialize(
        "adaalloc",
        delta_w,
        xtx,
        budget,
        transform=transform,
        refine=refine,
        temperature=temperature,
        alloc_weight=alloc_weight,
        score=score,
    )
    return out["indices"], out["values"]
