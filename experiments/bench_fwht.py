"""Bandwidth of the fast Walsh-Hadamard transform against the device's own copy bandwidth.

    python experiments/bench_fwht.py                  # CUDA: bf16 and fp32, 8192-row tensors
    python experiments/bench_fwht.py --shapes 8192x3072 --dtypes bfloat16

Without a GPU the same script rehearses on CPU (Triton interpreted, 16-row shapes, wall clock): the
figures then say nothing about bandwidth, only that the script runs.

A transform along the last axis of an ``[R, n]`` tensor must read and write the tensor once, so its
ceiling is a device-to-device copy of the same bytes. Printed for every shape and dtype, from one run:
the copy time (``torch.Tensor.copy_``), ``qwha.hadamard.fwht`` with the Triton butterflies and with
the torch butterflies, each as milliseconds, effective GB/s (bytes read + written) and the share of
the copy's bandwidth. ``n = m · 2^k`` with ``m > 1`` (e.g. 3072 = 12 · 256) adds one small ``m × m``
product per slab on top of the butterflies (``qwha.hadamard``).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwha.hadamard import fwht, hadamard_factors  # noqa: E402


def cuda_ms(fn, reps: int = 50) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` CUDA-event-timed calls after warm-up."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def cpu_ms(fn, reps: int = 3) -> float:
    """Median wall milliseconds of ``fn()`` on CPU (the rehearsal's timer)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="*", default=["8192x3072", "8192x4096", "8192x8192", "8192x576"])
    ap.add_argument("--dtypes", nargs="*", default=["bfloat16", "float32"])
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda:  # a rehearsal of the script (Triton interpreted): tiny shapes, wall-clock timing
        if args.shapes == ap.get_default("shapes"):
            args.shapes = ["16x3072", "16x576"]
        args.reps = 1
    timer = cuda_ms if cuda else cpu_ms
    name = (
        torch.cuda.get_device_name() if cuda else f"CPU rehearsal ({platform.machine()}, Triton interpreted)"
    )
    print(f"device {name}, torch {torch.__version__}, {platform.node()}")
    cols = ["shape", "dtype", "m·2^k", "copy ms", "copy GB/s", "triton ms", "triton GB/s", "triton/copy"]
    print("| " + " | ".join([*cols, "torch ms", "torch/copy"]) + " |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        rows, n = (int(s) for s in shape.lower().split("x"))
        for name in args.dtypes:
            dtype = getattr(torch, name)
            x = torch.randn(rows, n, device=device, dtype=dtype)
            y = torch.empty_like(x)
            nbytes = 2 * x.numel() * x.element_size()
            t_copy = timer(lambda x=x, y=y: y.copy_(x), args.reps)
            ref = fwht(x.double(), backend="torch")
            m, p = hadamard_factors(n)
            row = [shape, name, f"{m}·{p}", f"{t_copy:.4f}", f"{nbytes / t_copy / 1e6:.0f}"]
            for backend in ("triton", "torch"):
                out = fwht(x, backend=backend)
                err = (out.double() - ref).abs().max().item() / ref.abs().max().item()
                tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
                if err > tol:
                    print(f"  {backend}: relative error {err:.2e} > {tol}")
                t = timer(lambda x=x, b=backend: fwht(x, backend=b), args.reps)
                if backend == "triton":
                    row += [f"{t:.4f}", f"{nbytes / t / 1e6:.0f}", f"{t_copy / t:.0%}"]
                else:
                    row += [f"{t:.4f}", f"{t_copy / t:.0%}"]
            print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
