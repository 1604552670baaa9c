"""Forward+backward time and memory of one adapted GPTQ layer: WHA vs LoRA vs the 2-D DCT adapter.

    python experiments/bench_adapter.py          # quick (CPU default): SmolLM2 + 3072x3072, 512 tokens
    python experiments/bench_adapter.py --full   # GPU: Llama-3.2-3B + SmolLM2 shapes, 512 and 8192 tokens
    python experiments/bench_adapter.py --shapes 3072x3072 --tokens 512 8192 --repeats 20
    python experiments/bench_adapter.py --fwht   # also: Triton vs torch butterflies (CUDA)

One step = ``y = layer(x)``, ``y.backward(g)`` with ``x`` requiring grad (an inner layer of a model),
on a GPTQ 4-bit ``TorchLinear`` (group size 128, random packed codes) of shape ``d_out x d_in``.
Rows, for the same budget ``p = r·(d_in + d_out)`` (r = 64, a rank-64 LoRA's parameter count):

* ``base``        the frozen quantized layer alone (what every adapter pays anyway);
* ``lora``        PEFT's LoRA on the GPTQModel layer (``GPTQLoraLinear``), r = 64;
* ``wha``         WHA as configured by default (``compute="auto"``, see ``qwha.adapters.wha``);
* ``wha-fused``   WHA, weight side: ``x (W_Q + s·F·H⁻¹)ᵀ`` in one product, recomputed in backward;
* ``wha-sparse``  WHA, activation side: ``base(x) + s·(x·H)·Fᵀ`` with CSR products;
* ``wha-delta``   WHA, weight side split: ``base(x) + x·ΔWᵀ`` (the path used with dropout);
* ``dct2d``       the 2-D DCT adapter (``ΔW = s·C_out·F·C_inᵀ``, dense DCT matrices), weight side.

Reported per row: median wall milliseconds per step and the process CPU time (steadier than wall
time on a CPU shared with other jobs; the summary table uses it on CPU, see ``--ratio-clock``), the
bytes autograd saves for backward (measured with saved-tensor hooks, every device) and, on CUDA,
the peak allocated memory during the step above what was allocated before it.
Ratios: WHA/LoRA for each WHA row, and DCT-2D/WHA (default compute).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwha.adapters.synthetic import random_torch_linear  # noqa: E402
from qwha.adapters.wha import WHALinear, wha_budget  # noqa: E402

MODEL_SHAPES = {  # (d_out, d_in) of the projections
    "llama3.2-3b": [(3072, 3072), (1024, 3072), (8192, 3072), (3072, 8192)],
    "smollm2-135m": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
}
ROWS = ("base", "lora", "wha", "wha-fused", "wha-sparse", "wha-delta", "dct2d")


def parse_shape(text: str) -> tuple[int, int]:
    out, _, inp = text.lower().partition("x")
    return int(out), int(inp)


def per_row_sparse(d_out: int, d_in: int, p: int, gen: torch.Generator) -> torch.Tensor:
    """``p`` distinct positions, an equal share per output row (what AdaAlloc gives on average)."""
    per_row = torch.full((d_out,), p // d_out, dtype=torch.int64)
    per_row[: p % d_out] += 1
    scores = torch.rand(d_out, d_in, generator=gen)
    order = scores.argsort(dim=1, descending=True)
    mask = torch.arange(d_in)[None, :] < per_row[:, None]
    rows = torch.arange(d_out)[:, None].expand(d_out, d_in)[mask]
    cols = order[mask]
    return torch.stack((rows, cols), dim=1)


class _LoraHost(nn.Module):
    # PEFT places new adapters on the device of the model's first parameter; a quantized layer has
    # only buffers, so the host carries one frozen placeholder.
    def __init__(self, base: nn.Module, device: str) -> None:
        super().__init__()
        self.proj = base
        self.anchor = nn.Parameter(torch.zeros((), device=device), requires_grad=False)

    def forward(self, x):
        return self.proj(x)


def build(row: str, d_out: int, d_in: int, rank: int, device: str, compile_dequant: bool, seed: int):
    base = random_torch_linear(
        d_in, d_out, bits=4, group_size=128, compile=compile_dequant, device=device, seed=seed
    )
    base.train()  # training-mode dequantization, as in fine-tuning
    if row == "base":
        return base, []
    if row == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        host = inject_adapter_in_model(
            LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"]), _LoraHost(base, device)
        )
        host.to(device)
        params = [p for n, p in host.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        with torch.no_grad():  # nonzero B so that the adapter's work is not skipped by anything
            host.proj.lora_B["default"].weight.normal_(0, 0.01)
        return host, params
    p = wha_budget(rank, d_in, d_out)
    kind, dims, compute = {
        "wha": ("wht", 1, "auto"),
        "wha-fused": ("wht", 1, "fused"),
        "wha-sparse": ("wht", 1, "sparse"),
        "wha-delta": ("wht", 1, "delta"),
        "dct2d": ("dct", 2, "fused"),
    }[row]
    layer = WHALinear(base, p, transform=kind, dims=dims, compute=compute).to(device)
    gen = torch.Generator().manual_seed(seed)
    layer.set_sparse(per_row_sparse(d_out, d_in, p, gen), 1e-4 * torch.randn(p, generator=gen))
    return layer, [layer.wha_c]


def measure(module: nn.Module, params, x: torch.Tensor, g: torch.Tensor, warmup: int, repeats: int) -> dict:
    cuda = x.is_cuda

    def step():
        for p in params:
            p.grad = None
        xi = x.detach().requires_grad_(True)
        y = module(xi)
        y.backward(g)

    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    for _ in range(max(0, warmup - 1)):
        step()
    times, cpu_times = [], []
    peak = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    return {
        "ms": 1e3 * statistics.median(times),
        "cpu_ms": 1e3 * statistics.median(cpu_times),
        "saved_mb": saved[0] / 2**20,
        "peak_mb": peak,
    }


def bench_fwht(device: str, dtype: torch.dtype, repeats: int) -> list[dict]:
    from qwha.hadamard import fwht
    from qwha.kernels import fwht as kernels

    out = []
    for n in (576, 1536, 3072, 8192, 14336):
        for tokens in (512, 8192):
            x = torch.randn(tokens, n, device=device, dtype=dtype)
            row = {"n": n, "tokens": tokens}
            backends = ["torch"] + (["triton"] if device == "cuda" and kernels.available() else [])
            for backend in backends:
                fwht(x, backend=backend)
                ts = []
                for _ in range(repeats):
                    if device == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    fwht(x, backend=backend)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    ts.append(time.perf_counter() - t0)
                row[backend] = 1e3 * statistics.median(ts)
            out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--shapes", nargs="*", help="d_outxd_in shapes or model names (" + ", ".join(MODEL_SHAPES) + ")"
    )
    ap.add_argument("--tokens", nargs="*", type=int)
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=ROWS)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--full", action="store_true", help="all 3B and SmolLM2 shapes at 512 and 8192 tokens")
    ap.add_argument(
        "--compile-dequant",
        action="store_true",
        help="let GPTQModel torch.compile its dequant (default on CUDA)",
    )
    ap.add_argument("--fwht", action="store_true", help="also time the FWHT alone (torch vs Triton)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument(
        "--ratio-clock",
        choices=("wall", "cpu"),
        help="clock of the summary table: wall (default on CUDA) or process CPU time (default on CPU)",
    )
    args = ap.parse_args(argv)

    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    if args.full:
        shapes = MODEL_SHAPES["llama3.2-3b"] + MODEL_SHAPES["smollm2-135m"]
        tokens = args.tokens or [512, 8192]
    else:  # --quick, the CPU default
        shapes = MODEL_SHAPES["smollm2-135m"] + [(3072, 3072)]
        tokens = args.tokens or [512]
    if args.shapes:
        shapes = [s for spec in args.shapes for s in (MODEL_SHAPES.get(spec) or [parse_shape(spec)])]
    repeats = args.repeats or (20 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    compile_dequant = args.compile_dequant or cuda
    torch.manual_seed(0)

    where = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    load = f"  load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(
        f"# bench_adapter  device={args.device} ({where}, {torch.get_num_threads()} threads{load})"
        f"  dtype={str(dtype).removeprefix('torch.')}  rank={args.rank}  "
        f"repeats={repeats}  warmup={warmup}  torch {torch.__version__}  dequant compiled={compile_dequant}"
    )
    results = []
    for d_out, d_in in shapes:
        for n_tok in tokens:
            x = torch.randn(n_tok, d_in, device=args.device, dtype=dtype)
            g = torch.randn(n_tok, d_out, device=args.device, dtype=dtype)
            for row in args.rows:
                module, params = build(
                    row, d_out, d_in, args.rank, args.device, compile_dequant, seed=d_out + d_in
                )
                r = measure(module, params, x, g, warmup, repeats)
                r.update(
                    shape=f"{d_out}x{d_in}", tokens=n_tok, row=row, params=sum(p.numel() for p in params)
                )
                results.append(r)
                peak = "" if r["peak_mb"] is None else f"  peak {r['peak_mb']:8.1f} MB"
                print(
                    f"{r['shape']:>10} {n_tok:>6} {row:<10} {r['ms']:10.2f} ms"
                    f"  (process CPU {r['cpu_ms']:9.1f} ms)  saved {r['saved_mb']:8.1f} MB{peak}"
                    f"  params {r['params']}",
                    flush=True,
                )
                del module, params
                if cuda:
                    torch.cuda.empty_cache()

    clock = {"wall": "ms", "cpu": "cpu_ms"}[args.ratio_clock or ("wall" if cuda else "cpu")]
    print(f"\nsummary clock: {'wall' if clock == 'ms' else 'process CPU'} time (ms per step)")
    print(
        "\n| shape | tokens | "
        + " | ".join(args.rows)
        + " | WHA/LoRA (auto; fused, sparse, delta) | DCT-2D/WHA |"
    )
    print("|---|---|" + "---|" * (len(args.rows) + 2))
    for d_out, d_in in shapes:
        for n_tok in tokens:
            by = {r["row"]: r for r in results if r["shape"] == f"{d_out}x{d_in}" and r["tokens"] == n_tok}
            cells = [f"{by[r][clock]:.2f}" if r in by else "-" for r in args.rows]

            def ratio(a, b, by=by):
                return f"{by[a][clock] / by[b][clock]:.2f}" if a in by and b in by else "-"

            wl = (
                ratio("wha", "lora")
                + "; "
                + ", ".join(ratio(w, "lora") for w in ("wha-fused", "wha-sparse", "wha-delta"))
            )
            print(
                f"| {d_out}x{d_in} | {n_tok} | " + " | ".join(cells) + f" | {wl} | {ratio('dct2d', 'wha')} |"
            )

    fw = bench_fwht(args.device, dtype, repeats) if args.fwht else []
    if fw:
        print("\n| n | tokens | torch ms | triton ms |")
        print("|---|---|---|---|")
        for r in fw:
            print(f"| {r['n']} | {r['tokens']} | {r['torch']:.3f} | {r.get('triton', float('nan')):.3f} |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": str(args.json)}, "layers": results, "fwht": fw},
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
