"""MagR: weight magnitude reduction before quantization (Zhang, Zhang & Saab, 2024).

For one linear layer ``y = W x`` with calibration inputs ``X`` (tokens as rows), MagR solves, for every
output channel ``i`` and every group ``g`` of ``group_size`` consecutive input columns,

    min_Ŵ  ½ ‖(Ŵ − W) X_nᵀ‖_F²  +  α Σ_{i,g} ‖Ŵ[i, g]‖_∞ ,

where ``X_n = X / ‖X‖₂`` (unit top singular value, so the smooth part has a 1-Lipschitz gradient), by
proximal gradient with step 1:

    Ŵ ← prox_{α‖·‖∞}( Ŵ − (Ŵ − W) G_n ),     G_n = XᵀX / λ_max(XᵀX).

The ℓ∞ prox comes from the Moreau decomposition: ``prox_{α‖·‖∞}(v) = v − α Π_{B₁}(v / α)`` with
``Π_{B₁}`` the Euclidean projection onto the unit ℓ1 ball (Duchi et al. 2008, by sorting). Every output
channel and group is one row of a ``[d_out · d_in / group_size, group_size]`` batch, so one iteration is
one matrix product plus one batched sort. Smaller group-wise ℓ∞ norms give GPTQ's min/max grid a
smaller range, hence a finer step, for the same layer output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = [
    "MATMUL_MODES",
    "SOLVERS",
    "magr",
    "magr_solver",
    "project_l1_ball",
    "prox_linf",
    "split_tf32",
    "top_eigenvalue",
]


def project_l1_ball(v: Tensor, radius: float | Tensor = 1.0) -> Tensor:
    """Euclidean projection of each row of ``v`` onto ``{x : ‖x‖₁ ≤ radius}``.

    Args:
        v: ``[..., n]``; every slice along the last dimension is projected independently.
        radius: positive scalar, or a tensor broadcastable to ``[..., 1]``.

    Returns:
        ``[..., n]``, same dtype and device. Rows already inside the ball are returned unchanged.

    Duchi et al. (2008), Fig. 1: with ``u`` the magnitudes sorted in decreasing order and
    ``s_j = u_1 + … + u_j``, the threshold is ``θ = (s_ρ − r) / ρ`` where ``ρ`` is the largest ``j`` with
    ``u_j > (s_j − r) / j``; the projection is ``sign(v) · max(|v| − θ, 0)``.
    """
    n = v.shape[-1]
    a = v.abs()
    u = torch.sort(a, dim=-1, descending=True).values
    css = u.cumsum(dim=-1)
    j = torch.arange(1, n + 1, device=v.device, dtype=v.dtype)
    # The condition holds exactly on a prefix j = 1..ρ, so counting it gives ρ.
    rho = (u * j > css - radius).sum(dim=-1, keepdim=True).clamp_(min=1)
    theta = (css.gather(-1, rho - 1) - radius) / rho.to(v.dtype)
    projected = torch.sign(v) * (a - theta).clamp_(min=0)
    inside = a.sum(dim=-1, keepdim=True) <= radius
    return torch.where(inside, v, projected)


def prox_linf(v: Tensor, alpha: float) -> Tensor:
    """Proximal operator of ``alpha · ‖·‖_∞`` applied to each row of ``v`` (``[..., n]`` → ``[..., n]``).

    ``prox(v) = argmin_x ½‖x − v‖² + α‖x‖_∞ = v − α Π_{B₁}(v / α)`` (Moreau decomposition; the conjugate
    of ``‖·‖_∞`` is the indicator of the unit ℓ1 ball). Written out, it clips every entry of a row to
    ``[−t, t]`` where ``t`` solves ``f(t) = Σ_j (|v_j| − t)_+ − α = 0`` (``t = 0`` when ``‖v‖₁ ≤ α``).

    ``t`` is found without sorting, by Newton's method on the convex, decreasing, piecewise-linear ``f``
    started left of the root at ``t₀ = max|v| − α``: ``t ← (Σ_{|v_j|>t} |v_j| − α) / #{|v_j| > t}``.
    Iterates increase monotonically to the root and stop, exactly, once the set ``{|v_j| > t}`` stops
    changing — after one or two steps when only the few largest entries are clipped (MagR's small α),
    so a step costs a few elementwise passes instead of a sort.
    """
    if alpha <= 0:
        raise ValueError(f"quant.magr_alpha={alpha}: must be > 0")
    if v.is_cuda and v.dtype == torch.float32:
        # On the GPU the per-step host synchronisation below costs more than the arithmetic: one
        # Triton kernel sorts each group in registers and clips it in a single pass instead.
        from qwha.kernels import prox as _prox_kernel

        if _prox_kernel.supports(v):
            return _prox_kernel.prox_linf_groups(v, alpha)
    a = v.abs()
    t = a.amax(dim=-1, keepdim=True) - alpha
    count_prev = None
    for _ in range(v.shape[-1] + 1):  # the active set only shrinks, so this bound is never reached
        active = a > t
        count = active.sum(dim=-1, keepdim=True)
        if count_prev is not None and torch.equal(count, count_prev):
            break
        total = torch.where(active, a, 0.0).sum(dim=-1, keepdim=True)
        t = torch.where(count > 0, (total - alpha) / count.clamp(min=1), t)
        count_prev = count
    t = t.clamp(min=0)
    return torch.minimum(torch.maximum(v, -t), t)


def top_eigenvalue(xtx: Tensor, iters: int = 64) -> Tensor:
    """Largest eigenvalue of a symmetric positive semi-definite ``[d, d]`` matrix (float32 scalar).

    Subspace (block power) iteration on 8 vectors, then the Rayleigh-Ritz value; ``O(d²)`` per step,
    much cheaper than a full ``eigvalsh`` for d in the thousands. An estimate a few percent low only makes
    MagR's step slightly longer than ``1/L``; proximal gradient still converges for any step below
    ``2/L``.
    """
    d = xtx.shape[0]
    k = min(8, d)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(d, k, generator=gen, dtype=torch.float32).to(xtx.device)
    a = xtx.float()
    for _ in range(iters):
        q, _ = torch.linalg.qr(a @ q)
    ritz = torch.linalg.eigvalsh(q.T @ a @ q)
    return ritz[-1]


def split_tf32(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x = hi + lo`` with ``hi`` exactly representable in TF32 (10 mantissa bits) and ``lo`` the float32
    remainder, for products at TF32 tensor-core speed with ~2⁻²¹ relative accuracy (``hi·hi + hi·lo +
    lo·hi``; the dropped ``lo·lo`` and TF32's rounding of ``lo`` are what remains)."""
    x = x.contiguous().to(torch.float32)
    hi = (x.view(torch.int32) & -8192).view(torch.float32)  # clear the 13 low mantissa bits
    return hi, x - hi


MATMUL_MODES = ("auto", "float32", "tf32", "3xtf32")


def _product(a: Tensor, b: Tensor | tuple[Tensor, Tensor], mode: str, bias: Tensor) -> Tensor:
    """``bias + a @ b`` in float32, TF32 (one tensor-core product) or 3xTF32 (``b`` pre-split)."""
    if mode == "float32":
        return torch.addmm(bias, a, b)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        if mode == "tf32":
            return torch.addmm(bias, a, b)
        (b_hi, b_lo), (a_hi, a_lo) = b, split_tf32(a)
        return torch.addmm(bias, a_hi, b_hi).addmm_(a_hi, b_lo).addmm_(a_lo, b_hi)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@torch.no_grad()
def magr(
    weight: Tensor,
    xtx: Tensor,
    group_size: int,
    alpha: float = 1e-5,
    iters: int = 200,
    *,
    matmul: str = "auto",
    solver: str | None = None,
) -> Tensor:
    """MagR-preprocessed weight: group-wise ℓ∞ proximal gradient, all channels and groups at once.

    Args:
        weight: ``W`` ``[d_out, d_in]``, any float dtype.
        xtx: calibration Gram ``XᵀX`` ``[d_in, d_in]`` (any positive scale: GPTQ's Hessian ``2XᵀX/n``
            works as is, since it is normalised by its top eigenvalue here).
        group_size: number of consecutive input columns sharing one ℓ∞ term (the quantization group);
            ``-1`` or ``d_in`` for one group per output channel. Must divide ``d_in``.
        alpha: ℓ∞ penalty per group in the normalised objective (paper: 1e-5 per group, 1e-3 per
            channel).
        iters: proximal-gradient iterations (paper: 200).
        matmul: precision of the one product per iteration: ``float32``, ``tf32`` (CUDA tensor cores,
            10-bit operands) or ``3xtf32`` (three TF32 products on split operands); ``auto``: 3xTF32
            on CUDA, float32 elsewhere. The product is taken on the change ``D = Ŵ − W``, not on
            ``Ŵ``, so its rounding error scales with MagR's (small) change of the weight. On an H100,
            200 iterations on a 3072×8192 layer, distance to a float64 run relative to ‖Ŵ − W‖:
            float32 1.68 s / 2e-4, 3xTF32 0.79 s / 1.7e-3, TF32 0.30 s / 1.7e-2
            (experiments/results/gpu.md).
        solver: ``ista`` (the paper's plain proximal-gradient iteration, above) or ``fista`` (the same
            step with per-channel Nesterov momentum and adaptive restart: the same objective and
            minimiser, reached in fewer iterations; ``tests/test_magr.py`` checks it against ISTA);
            None: the setting of the enclosing :func:`magr_solver` block, ``ista`` outside one.

    Returns:
        ``Ŵ`` ``[d_out, d_in]`` in float32 on ``weight``'s device.
    """
    if weight.ndim != 2:
        raise ValueError(f"magr: weight must be [d_out, d_in], got shape {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    if tuple(xtx.shape) != (d_in, d_in):
        raise ValueError(f"magr: xtx must be [{d_in}, {d_in}], got {tuple(xtx.shape)}")
    g = d_in if group_size in (-1, 0) else group_size
    if g <= 0 or d_in % g:
        raise ValueError(f"quant.group_size={group_size} must divide d_in={d_in}")
    if iters < 0:
        raise ValueError(f"quant.magr_iters={iters}: must be >= 0")
    if matmul not in MATMUL_MODES:
        raise ValueError(f"magr: matmul={matmul!r}: allowed values are {', '.join(MATMUL_MODES)}")
    w = weight.detach().to(torch.float32)
    gram = xtx.detach().to(device=w.device, dtype=torch.float32)
    lam = top_eigenvalue(gram)
    if not torch.isfinite(lam) or lam <= 0:
        return w.clone()
    gram = gram / lam
    # Ŵ − (Ŵ − W)G = W + D(I − G) with D = Ŵ − W: one fused addmm per iteration. Taking the product
    # on D (small: MagR moves few weights, by little) rather than on Ŵ keeps its rounding error
    # proportional to the change itself.
    step = torch.eye(d_in, device=w.device, dtype=torch.float32) - gram
    if matmul == "auto":
        matmul = "3xtf32" if w.is_cuda else "float32"
    operand = split_tf32(step) if matmul == "3xtf32" else step
    solver = _SOLVER if solver is None else solver
    if solver not in SOLVERS:
        raise ValueError(f"quant.magr_solver={solver!r}: allowed values are {', '.join(SOLVERS)}")

    def prox_step(y: Tensor) -> Tensor:  # prox(y − (y − W)G) = prox(W + (y − W)(I − G))
        return prox_linf(_product(y - w, operand, matmul, w).view(d_out, d_in // g, g), alpha).view(
            d_out, d_in
        )

    w_hat = w.clone()
    if solver == "ista":
        for _ in range(iters):
            w_hat = prox_step(w_hat)
        return w_hat
    # FISTA (Beck & Teboulle 2009) with gradient-based adaptive restart (O'Donoghue & Candès 2015), per
    # output channel: the objective is a sum of independent problems, one per row of W, so each row keeps
    # its own momentum t_i and restarts (drops its momentum) when its last step points against it.
    t = torch.ones(d_out, 1, device=w.device, dtype=torch.float32)
    y = w_hat
    for _ in range(iters):
        new = prox_step(y)
        restart = ((y - new) * (new - w_hat)).sum(dim=1, keepdim=True) > 0
        t_next = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        momentum = torch.where(restart, 0.0, (t - 1) / t_next)
        y = new + momentum * (new - w_hat)
        t = torch.where(restart, 1.0, t_next)
        w_hat = new
    return w_hat


SOLVERS = ("ista", "fista")
_SOLVER = "ista"


@contextlib.contextmanager
def magr_solver(name: str) -> Iterator[None]:
    """Within this block, :func:`magr` calls that name no ``solver`` use ``name`` (``ista`` | ``fista``).

    How a run's ``quant.magr_solver`` reaches the MagR call made inside GPTQModel's quantization loop
    (``qwha.quant.gptq``) without threading it through GPTQModel. A module-level setting, not a context
    variable, because GPTQModel may quantize modules on worker threads.
    """
    global _SOLVER
    if name not in SOLVERS:
        raise ValueError(f"quant.magr_solver={name!r}: allowed values are {', '.join(SOLVERS)}")
    previous, _SOLVER = _SOLVER, name
    try:
        yield
    finally:
        _SOLVER = previous
