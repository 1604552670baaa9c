"""Benchmark MagR: per-iteration cost (matrix product vs ℓ∞ prox), the sort-free prox against the sorting
one, and the batched loop against a per-output-channel loop. Prints times and ratios measured in one run.

    PYTHONPATH=. python experiments/bench_magr.py                       # SmolLM2 shapes + 3072×8192
    PYTHONPATH=. python experiments/bench_magr.py --big-iters 200       # full 200 iterations on 3072×8192
    PYTHONPATH=. python experiments/bench_magr.py --device cuda         # on a GPU

The 3072×8192 layer is ``[d_out, d_in] = [3072, 8192]`` (Llama-3.2-3B's down_proj): one iteration is one
``[3072, 8192] × [8192, 8192]`` product (4.1e11 FLOP) plus the prox on 25 M weights. On CPU the default
runs ``--big-iters`` iterations and scales the time to 200 (the per-iteration work is constant).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from qwha.quant.magr import magr, project_l1_ball, prox_linf, top_eigenvalue

SMOLLM2 = {  # [d_out, d_in] and count per layer
    "q_proj/o_proj": ((576, 576), 2),
    "k_proj/v_proj": ((192, 576), 2),
    "gate_proj/up_proj": ((1536, 576), 2),
    "down_proj": ((576, 1536), 1),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device: torch.device, reps: int = 5) -> float:
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / reps


def layer(d_out: int, d_in: int, device: torch.device, tokens: int = 4096):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(d_out, d_in, generator=gen) * 0.02
    x = torch.randn(tokens, d_in, generator=gen) * torch.exp(torch.randn(d_in, generator=gen))
    return w.to(device), (x.T @ x).to(device)


def magr_per_channel(w: torch.Tensor, g: torch.Tensor, group: int, alpha: float, iters: int) -> torch.Tensor:
    """The same iteration with a Python loop over output channels (what batching removes)."""
    gn = g / top_eigenvalue(g)
    out = torch.empty_like(w)
    for i in range(w.shape[0]):
        wi = w[i : i + 1]
        wh = wi.clone()
        for _ in range(iters):
            v = wh - (wh - wi) @ gn
            wh = prox_linf(v.view(1, -1, group), alpha).view(1, -1)
        out[i] = wh[0]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--big-iters", type=int, default=3)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--alpha", type=float, default=1e-5)
    a = p.parse_args()
    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    print(f"device={device} threads={torch.get_num_threads()} loadavg={os.getloadavg()}")

    print("\n# one MagR iteration on SmolLM2-135M shapes (matmul | prox), ms")
    total_mm = total_px = 0.0
    for name, ((d_out, d_in), count) in SMOLLM2.items():
        w, g = layer(d_out, d_in, device)
        step = torch.eye(d_in, device=device) - g / top_eigenvalue(g)
        wg = w @ (g / top_eigenvalue(g))
        v = torch.addmm(wg, w, step).view(d_out, -1, a.group)
        t_mm = timeit(lambda w=w, wg=wg, step=step: torch.addmm(wg, w, step), device)
        t_px = timeit(lambda v=v: prox_linf(v, a.alpha), device)
        t_sort = timeit(lambda v=v: v - a.alpha * project_l1_ball(v / a.alpha), device)
        total_mm += count * t_mm
        total_px += count * t_px
        print(
            f"{name:18s} [{d_out}x{d_in}] matmul {t_mm * 1e3:7.2f}  prox {t_px * 1e3:7.2f}  "
            f"(sorting prox {t_sort * 1e3:7.2f}, ratio {t_sort / t_px:4.1f}x)"
        )
    per_layer = total_mm + total_px
    print(
        f"per decoder layer: {per_layer * 1e3:.0f} ms/iteration (matmul {total_mm / per_layer:.0%}); "
        f"x 200 iterations x 30 layers = {per_layer * 200 * 30 / 60:.1f} min"
    )

    print("\n# batched vs per-output-channel loop (q_proj 576x576, 20 iterations)")
    w, g = layer(576, 576, device)
    t_b = timeit(lambda: magr(w, g, a.group, a.alpha, 20), device, reps=2)
    t_c = timeit(lambda: magr_per_channel(w, g, a.group, a.alpha, 20), device, reps=1)
    print(f"batched {t_b:.3f} s, per-channel {t_c:.3f} s, ratio {t_c / t_b:.0f}x")

    print(f"\n# 3072x8192 layer, {a.big_iters} iterations")
    w, g = layer(3072, 8192, device, tokens=8192)
    start = time.perf_counter()
    magr(w, g, a.group, a.alpha, a.big_iters)
    sync(device)
    t = time.perf_counter() - start
    t0 = timeit(lambda: magr(w, g, a.group, a.alpha, 0), device, reps=1)  # setup: eigenvalue, W G
    per_iter = (t - t0) / max(a.big_iters, 1)
    print(
        f"total {t:.2f} s (setup {t0:.2f} s, {per_iter:.3f} s/iteration) -> 200 iterations: "
        f"{t0 + 200 * per_iter:.1f} s" + ("" if a.big_iters == 200 else " (scaled)")
    )
    if device.type == "cuda":
        # The three precisions of the one product per iteration, each against a float64 run of the
        # same iteration (torch prox): distance relative to MagR's own change of the weight.
        w64, g64 = w.double(), g.double() / top_eigenvalue(g).double()
        step64 = torch.eye(g.shape[0], device=device, dtype=torch.float64) - g64
        ref64 = w64.clone()
        for _ in range(a.big_iters):
            v = torch.addmm(w64, ref64 - w64, step64)
            ref64 = prox_linf(v.view(v.shape[0], -1, a.group), a.alpha).view_as(v)
        change = (ref64 - w64).norm()
        base = None
        for mode in ("float32", "tf32", "3xtf32"):
            magr(w, g, a.group, a.alpha, 2, matmul=mode)  # warm-up
            sync(device)
            start = time.perf_counter()
            out = magr(w, g, a.group, a.alpha, a.big_iters, matmul=mode)
            sync(device)
            secs = time.perf_counter() - start
            base = base or secs
            dist = float((out.double() - ref64).norm() / change)
            print(
                f"matmul={mode:8s} {secs:6.2f} s for {a.big_iters} iterations ({base / secs:4.1f}x float32); "
                f"‖Ŵ − Ŵ_fp64‖ / ‖Ŵ_fp64 − W‖ = {dist:.2e}"
            )


if __name__ == "__main__":
    main()
