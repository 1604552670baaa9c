"""MagR solvers on real SmolLM2 layers: how much of the objective decrease of the paper's 200 plain
proximal-gradient iterations (ISTA) FISTA reaches in k iterations, and the cost of one iteration of each.

    PYTHONPATH=. python experiments/magr_solver.py [--grams /tmp/grams.pt] [--threads 1]

The calibration Grams of six projections (layers 0, 15, 29) are taken from the full-precision model on the
default calibration sample (32 x 512 tokens) through forward hooks, float64, and cached in ``--grams``.
For each layer it prints ``(F0 − F_k) / (F0 − F_ISTA200)`` (1 = the paper's 200 plain iterations; above
1 = a lower objective) with ``F`` the MagR objective in float64, then times 20 iterations of each solver,
interleaved, three repeats, and prints the per-iteration ratio. Results: experiments/results/first_run.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

LAYERS = [
    (0, "self_attn.q_proj"),
    (15, "self_attn.q_proj"),
    (29, "self_attn.q_proj"),
    (15, "mlp.gate_proj"),
    (0, "mlp.down_proj"),
    (29, "mlp.down_proj"),
]
ALPHA, GROUP = 1e-5, 64


def grams(path: Path) -> dict:
    """``{"grams": {(layer, name): XᵀX float64}, "weights": {(layer, name): W}}``, computed once."""
    if path.is_file():
        return torch.load(path)
    from hydra import compose, initialize_config_dir
    from transformers import AutoModelForCausalLM

    from qwha.artifacts import load_calibration
    from qwha.cache import StageCache
    from qwha.config import CONF_DIR
    from qwha.models import base_model_ref, local_model_dir
    from qwha.pipeline import materialize

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config")
    cache = StageCache(cfg.cache_dir)
    calib, base = materialize("calib", cfg, cache), materialize("base", cfg, cache)
    model = AutoModelForCausalLM.from_pretrained(
        local_model_dir(base_model_ref(base.path)), dtype=torch.float32
    )
    out: dict = {"grams": {}, "weights": {}}
    for layer, name in LAYERS:
        mod = model.model.layers[layer].get_submodule(name)
        out["weights"][(layer, name)] = mod.weight.detach().clone()

        def hook(_mod, inp, _out, key=(layer, name)):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            out["grams"][key] = out["grams"].get(key, 0) + x.T @ x

        mod.register_forward_hook(hook)
    ids = load_calibration(calib.path)
    with torch.no_grad():
        for i in range(0, ids.shape[0], 4):
            model(ids[i : i + 4])
    torch.save(out, path)
    return out


def objective(w_hat: torch.Tensor, w: torch.Tensor, g: torch.Tensor, lam: torch.Tensor) -> float:
    """½ tr(D G_n Dᵀ) + α Σ_{i,g} ‖Ŵ[i, g]‖∞ in float64, D = Ŵ − W, G_n = G / λ_max."""
    d = (w_hat - w).double()
    d_out, d_in = w.shape
    lin = w_hat.double().abs().view(d_out, d_in // GROUP, GROUP).amax(-1)
    return float(0.5 * ((d @ (g / lam)) * d).sum() + ALPHA * lin.sum())


def main() -> None:
    from qwha.quant.magr import magr, top_eigenvalue

    ap = argparse.ArgumentParser()
    ap.add_argument("--grams", type=Path, default=Path("/tmp/qwha_magr_grams.pt"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    blob = grams(args.grams)
    for key in LAYERS:
        g, w = blob["grams"][key], blob["weights"][key].float()
        lam = top_eigenvalue(g.float()).double()
        f0 = objective(w, w, g, lam)
        ref = f0 - objective(magr(w, g.float(), GROUP, alpha=ALPHA, iters=200, solver="ista"), w, g, lam)
        row = []
        for solver, k in (("ista", 50), ("fista", 25), ("fista", 40), ("fista", 50), ("fista", 100)):
            f = objective(magr(w, g.float(), GROUP, alpha=ALPHA, iters=k, solver=solver), w, g, lam)
            row.append(f"{solver}{k} {(f0 - f) / ref:.3f}")
        times: dict[str, list[float]] = {"ista": [], "fista": []}
        for _ in range(3):
            for solver in times:
                start = time.perf_counter()
                magr(w, g.float(), GROUP, alpha=ALPHA, iters=20, solver=solver)
                times[solver].append(time.perf_counter() - start)
        ratio = min(times["fista"]) / min(times["ista"])
        print(
            f"{key[0]:2d} {key[1]:17s} {tuple(w.shape)}  "
            + "  ".join(row)
            + f"  cost/it fista/ista {ratio:.2f}"
        )


if __name__ == "__main__":
    main()
