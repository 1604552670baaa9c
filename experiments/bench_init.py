"""Batched QWHA init vs a plain per-output-channel loop on one layer (CPU by default).

    PYTHONPATH=. python experiments/bench_init.py                     # 3072×8192 (d_out×d_in), r = 64
    PYTHONPATH=. python experiments/bench_init.py --d-out 8192 --d-in 3072
    PYTHONPATH=. python experiments/bench_init.py --d-out 256 --d-in 512 --rank 8   # quick

Three implementations of the same init (AdaAlloc with activation weights, magnitude score,
refinement; docs/method.md §2) on the same synthetic layer, all float64, timed once each in one run:

- `batched`: `qwha.init.initialize("adaalloc", ...)` -- the package's code.
- `loop`: the plain per-channel formulation (the authors' structure, kept here only as the
  reference point): precompute `R` (Cholesky of the damped Gram), `B = Hᵀ R`, `V = ΔW_Q R` and the
  dense coefficients once, then for every output channel take its top-`p_i` coefficients and solve
  `(B' B'ᵀ) c = B' vᵀ` with `B'` the selected rows of `B`.
- `loop_on_M`: a per-channel loop over the batched path's own products `M = Hᵀ G_d H`,
  `Y = ΔW_Q G_d H` (selection + `M[S,S] c = Y[i,S]` row by row) -- isolates what batching the
  per-channel stage buys.

Printed: wall times, the speed-up of `batched` over each, and whether the outputs agree (same
indices, max |Δ values|). The synthetic layer: `W ~ N(0, 0.02²)` with a few heavy columns,
`ΔW_Q = W − RTN_4bit,g64(W)`, Gram of 2048 activation vectors with per-channel scales and a few
outlier channels. The transform is the Sylvester Hadamard (scipy) when `d_in` is a power of two,
else `qwha.transforms.transform_matrix("wht", d_in)`.
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np
import torch

from qwha.init import initialize
from qwha.init.allocation import adaalloc, channel_importance
from qwha.init.hessian import damped_gram
from qwha.init.selection import coefficient_scores, select_per_channel
from qwha.init.transform_op import RightTransform


def wht_matrix(n: int) -> torch.Tensor:
    """Sylvester Hadamard for powers of two; else the project's WHT, or a same-shaped stand-in."""
    import scipy.linalg

    if n & (n - 1) == 0:
        return torch.tensor(scipy.linalg.hadamard(n) / math.sqrt(n), dtype=torch.float64)
    try:
        from qwha.transforms import transform_matrix
    except ImportError:
        # Stand-in with the cost structure of H_m ⊗ H_2^k: a random orthogonal m×m ⊗ Sylvester.
        two = n & -n
        q, _ = torch.linalg.qr(torch.randn(n // two, n // two, dtype=torch.float64))
        print(f"(qwha.transforms missing: stand-in transform Q_{n // two} ⊗ Sylvester_{two})")
        return torch.kron(q.contiguous(), torch.tensor(scipy.linalg.hadamard(two) / math.sqrt(two)))
    return transform_matrix("wht", n, dtype=torch.float64)


def synthetic_layer(d_out: int, d_in: int, tokens: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) * 0.02
    heavy = torch.randperm(d_in, generator=gen)[: max(1, d_in // 256)]
    w[:, heavy] *= 8.0
    g = w.reshape(d_out, d_in // 64, 64)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo) / 15.0
    w_q = ((g - lo) / scale).round().clamp(0, 15) * scale + lo
    delta = w - w_q.reshape(d_out, d_in)
    x = torch.randn(tokens, d_in, generator=gen, dtype=torch.float64)
    x *= torch.rand(d_in, generator=gen, dtype=torch.float64) * 1.5 + 0.25
    x[:, torch.randperm(d_in, generator=gen)[:8]] *= 20.0
    return delta, x.T @ x


def loop_reference(delta, xtx, budget, h):
    """Plain per-channel loop (authors' structure): per row, topk + normal equations from B'."""
    d_out, d_in = delta.shape
    gd, _ = damped_gram(xtx)
    r = torch.linalg.cholesky(gd)  # R Rᵀ = G_d
    coeffs = delta @ h
    b = h.T @ r  # a row of B per coefficient index
    v = delta @ r
    counts = adaalloc(channel_importance(delta, "activation", gram=xtx), budget, d_in)
    idx_rows, vals_rows = [], []
    for i in range(d_out):
        k = int(counts[i])
        if k == 0:
            continue
        cols = torch.sort(torch.topk(coeffs[i].abs(), k).indices).values
        bs = b[cols]
        c = torch.linalg.solve(bs @ bs.T, bs @ v[i])
        idx_rows.append(torch.stack([torch.full_like(cols, i), cols], 1))
        vals_rows.append(c)
    return torch.cat(idx_rows), torch.cat(vals_rows)


def loop_on_normal(delta, xtx, budget, h):
    """Per-channel loop over the batched path's products M = Hᵀ G_d H and Y = ΔW_Q G_d H."""
    d_out, d_in = delta.shape
    op = RightTransform.from_matrix(h)
    gd, lam = damped_gram(xtx)
    coeffs = op.forward(delta)
    normal = op.congruence(gd)
    rhs = coeffs @ normal
    counts = adaalloc(
        channel_importance(delta, "activation", damped_products=(coeffs, rhs, lam)), budget, d_in
    )
    idx_rows, vals_rows = [], []
    t0 = time.perf_counter()
    for i in range(d_out):
        k = int(counts[i])
        if k == 0:
            continue
        cols = torch.sort(torch.topk(coeffs[i].abs(), k).indices).values
        c = torch.linalg.solve(normal[cols.unsqueeze(1), cols], rhs[i, cols])
        idx_rows.append(torch.stack([torch.full_like(cols, i), cols], 1))
        vals_rows.append(c)
    stage = time.perf_counter() - t0
    return torch.cat(idx_rows), torch.cat(vals_rows), (normal, rhs, coeffs, counts), stage


def batched_breakdown(delta, xtx, budget, h) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """The steps of `initialize("adaalloc", ...)`, timed one by one (same functions, same order)."""
    from qwha.init.refine import refine_values

    times = {}
    t0 = time.perf_counter()

    def tick(name):
        nonlocal t0
        now = time.perf_counter()
        times[name] = now - t0
        t0 = now

    op = RightTransform.from_matrix(h)
    tick("kronecker detection")
    gd, lam = damped_gram(xtx)
    tick("damping (+ Cholesky check)")
    coeffs = op.forward(delta)
    tick("coeffs = ΔW_Q·H")
    normal = op.congruence(gd)
    tick("M = Hᵀ G_d H")
    rhs = coeffs @ normal
    tick("Y = coeffs·M (GEMM)")
    imp = channel_importance(delta, "activation", damped_products=(coeffs, rhs, lam))
    counts = adaalloc(imp, budget, delta.shape[1])
    tick("AdaAlloc")
    idx = select_per_channel(coefficient_scores(coeffs, "magnitude"), counts)
    tick("selection (top-k per row)")
    vals = refine_values(normal, rhs, idx)
    tick("refinement (batched Cholesky)")
    return times, idx, vals


SMOLLM2_SHAPES = {  # SmolLM2-135M projections (d_out, d_in); 30 decoder layers
    "q_proj": (576, 576),
    "k_proj": (192, 576),
    "v_proj": (192, 576),
    "o_proj": (576, 576),
    "gate_proj": (1536, 576),
    "up_proj": (1536, 576),
    "down_proj": (576, 1536),
}


def smollm2_estimate(rank: int, tokens: int) -> None:
    """Time `initialize("adaalloc")` once per SmolLM2 projection shape; ×30 layers estimates the model."""
    total = 0.0
    for name, (d_out, d_in) in SMOLLM2_SHAPES.items():
        delta, xtx = synthetic_layer(d_out, d_in, tokens)
        h = wht_matrix(d_in)
        t0 = time.perf_counter()
        initialize("adaalloc", delta, xtx, rank * (d_in + d_out), transform=h)
        sec = time.perf_counter() - t0
        total += sec
        print(f"    {name:10s} {d_out:5d}×{d_in:<5d} {sec:7.3f} s")
    print(f"one decoder layer {total:.2f} s -> 30 layers ≈ {30 * total:.0f} s (init math only, no Grams)")


def gpu_run(args) -> None:
    """Batched init on ``args.device`` (float64), checked against the same call on CPU."""
    device = torch.device(args.device)
    d_out, d_in = args.d_out, args.d_in
    budget = args.rank * (d_in + d_out)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"device: {name}, torch {torch.__version__}; CPU threads {torch.get_num_threads()}")
    print(f"layer d_out×d_in = {d_out}×{d_in}, budget p = {budget} (r = {args.rank}), float64")
    wd, wg = synthetic_layer(64, 128, 256)
    wh = wht_matrix(128)
    initialize("adaalloc", wd.to(device), wg.to(device), 4 * 192, transform=wh.to(device))  # warm-up
    delta, xtx = synthetic_layer(d_out, d_in, args.tokens)
    h = wht_matrix(d_in)
    dd, xd, hd = delta.to(device), xtx.to(device), h.to(device)
    times = []
    for _ in range(3):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = initialize("adaalloc", dd, xd, budget, transform=hd)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    print(f"batched on {device}: " + ", ".join(f"{t:.3f} s" for t in times) + " (3 calls)")
    if args.breakdown:
        bt, _, _ = batched_breakdown(dd, xd, budget, hd)  # host-timed: each step ends in a sync-ing op
        for step, sec in bt.items():
            print(f"    {step:32s} {sec:8.3f} s")
    if args.skip_loop:
        return
    t0 = time.perf_counter()
    ref = initialize("adaalloc", delta, xtx, budget, transform=h)
    t_cpu = time.perf_counter() - t0
    same = torch.equal(out["indices"].cpu(), ref["indices"])
    diff = float((out["values"].cpu() - ref["values"]).abs().max())
    print(f"batched on CPU: {t_cpu:.2f} s -> GPU speed-up {t_cpu / min(times):.0f}x")
    print(f"GPU vs CPU output: same indices {same}, max |Δvalue| {diff:.2e}")
    t0 = time.perf_counter()
    idx_l, val_l = loop_reference(delta, xtx, budget, h)
    t_loop = time.perf_counter() - t0
    print(
        f"plain per-channel loop on CPU: {t_loop:.2f} s -> batched CPU speed-up {t_loop / t_cpu:.1f}x; "
        f"same indices {torch.equal(idx_l, ref['indices'])}, "
        f"max |Δvalue| {float((val_l - ref['values']).abs().max()):.2e}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-out", type=int, default=3072)
    ap.add_argument("--d-in", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=64, help="budget p = rank·(d_in + d_out)")
    ap.add_argument("--tokens", type=int, default=2048, help="activation vectors in the synthetic Gram")
    ap.add_argument("--skip-loop", action="store_true", help="skip the (slow) plain loop reference")
    ap.add_argument("--breakdown", action="store_true", help="also time the batched path step by step")
    ap.add_argument("--smollm2", action="store_true", help="time SmolLM2-135M's projection shapes instead")
    ap.add_argument(
        "--device",
        default="cpu",
        help="cuda: time the batched init on the GPU (float64) and compare it with the CPU batched output",
    )
    args = ap.parse_args()
    if args.device != "cpu":
        gpu_run(args)
        return
    d_out, d_in = args.d_out, args.d_in
    budget = args.rank * (d_in + d_out)
    if args.smollm2:
        print(f"machine: {platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
        wd, wg = synthetic_layer(64, 128, 256)
        initialize("adaalloc", wd, wg, 4 * 192, transform=wht_matrix(128))  # warm-up
        smollm2_estimate(args.rank, args.tokens)
        return
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    print(f"layer d_out×d_in = {d_out}×{d_in}, budget p = {budget} (r = {args.rank}), float64")
    # warm-up (lazy LAPACK/BLAS initialisation) of every path on a small layer, untimed
    wd, wg = synthetic_layer(64, 128, 256)
    wh = wht_matrix(128)
    initialize("adaalloc", wd, wg, 4 * 192, transform=wh)
    loop_on_normal(wd, wg, 4 * 192, wh)
    loop_reference(wd, wg, 4 * 192, wh)

    delta, xtx = synthetic_layer(d_out, d_in, args.tokens)
    h = wht_matrix(d_in)

    t0 = time.perf_counter()
    out = initialize("adaalloc", delta, xtx, budget, transform=h)
    t_batched = time.perf_counter() - t0
    print(f"batched   (qwha.init.initialize)          {t_batched:8.2f} s")

    if args.breakdown:
        times, idx_s, val_s = batched_breakdown(delta, xtx, budget, h)
        for name, sec in times.items():
            print(f"    {name:32s} {sec:8.2f} s")
        print(
            f"    (sum {sum(times.values()):.2f} s; same output as initialize(): "
            f"{torch.equal(idx_s, out['indices']) and torch.equal(val_s, out['values'])})"
        )

    t0 = time.perf_counter()
    idx_m, val_m, (normal, rhs, coeffs, counts), stage_loop = loop_on_normal(delta, xtx, budget, h)
    t_loop_m = time.perf_counter() - t0
    print(
        f"loop_on_M (per-channel solve on M, Y)     {t_loop_m:8.2f} s  (per-channel stage {stage_loop:.2f} s)"
    )

    from qwha.init.refine import refine_values

    t0 = time.perf_counter()
    idx_b = select_per_channel(coefficient_scores(coeffs, "magnitude"), counts)
    val_b = refine_values(normal, rhs, idx_b)
    stage_batched = time.perf_counter() - t0
    print(f"batched per-channel stage (select + refine) {stage_batched:6.2f} s")

    agree = lambda i, v: (torch.equal(i, out["indices"]), float((v - out["values"]).abs().max()))  # noqa: E731
    print(f"stage speed-up (loop_on_M stage / batched stage): {stage_loop / stage_batched:6.1f}x")
    print(f"end-to-end speed-up vs loop_on_M:                 {t_loop_m / t_batched:6.1f}x")
    print(
        f"loop_on_M output: same indices {agree(idx_m, val_m)[0]}, max |Δvalue| {agree(idx_m, val_m)[1]:.2e}"
    )
    print(
        f"batched stage replay equals initialize(): {torch.equal(idx_b, out['indices'])}, "
        f"max |Δvalue| {float((val_b - out['values']).abs().max()):.2e}"
    )
    if not args.skip_loop:
        t0 = time.perf_counter()
        idx_l, val_l = loop_reference(delta, xtx, budget, h)
        t_loop = time.perf_counter() - t0
        same, diff = agree(idx_l, val_l)
        rel = diff / float(out["values"].abs().max())
        print(f"loop      (plain per-channel, B' B'ᵀ)     {t_loop:8.2f} s")
        print(f"end-to-end speed-up vs plain loop:                {t_loop / t_batched:6.1f}x")
        print(f"plain loop output: same indices {same}, max |Δvalue| {diff:.2e} (relative {rel:.1e})")
    counts_np = np.asarray(counts)
    print(
        f"p_i: min {counts_np.min()}, mean {counts_np.mean():.1f}, max {counts_np.max()}, "
        f"distinct sizes {len(np.unique(counts_np))}"
    )


if __name__ == "__main__":
    main()
