"""Measurements of a quantization run: per-layer errors, wall time, peak memory.

Per-layer error of a quantized linear ``W_Q`` against the original ``W`` (``ΔW_Q = W − W_Q``):
- ``dw_fro`` = ‖ΔW_Q‖_F, ``w_fro`` = ‖W‖_F;
- ``dw_x_fro`` = ‖ΔW_Q X‖_F, ``w_x_fro`` = ‖W X‖_F over calibration inputs ``X`` (tokens), computed from
  the Gram ``G = XᵀX`` as ``sqrt(tr(ΔW G ΔWᵀ))``; ``X`` is what the layer receives in the quantized
  model (outputs of the already quantized layers before it), the inputs GPTQ itself sees.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

ADAPTED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class RunStats:
    """Filled by :func:`measure_run`: wall seconds and peak memory (MiB) of the block."""

    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    peak_rss_source: str = ""
    peak_cuda_mb: float | None = None
    extra: dict = field(default_factory=dict)


def _read_vm_hwm_kb() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_vm_hwm() -> bool:
    """Reset the kernel's resident-set high-water mark of this process (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def measure_run(device: str | torch.device = "cpu") -> Iterator[RunStats]:
    """Time a block and record its peak resident memory (and peak CUDA memory on a CUDA device).

    The RSS peak is the block's own when Linux lets the process reset its high-water mark
    (``/proc/self/clear_refs``), otherwise the process's lifetime peak (``ru_maxrss``); ``peak_rss_source``
    says which.
    """
    stats = RunStats()
    reset = _reset_vm_hwm()
    is_cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    if is_cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        yield stats
    finally:
        stats.wall_s = time.perf_counter() - start
        hwm = _read_vm_hwm_kb() if reset else None
        if hwm is not None:
            stats.peak_rss_mb, stats.peak_rss_source = hwm / 1024, "VmHWM (reset at start)"
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            stats.peak_rss_mb, stats.peak_rss_source = rss / 1024, "ru_maxrss (process lifetime)"
        if is_cuda:
            stats.peak_cuda_mb = torch.cuda.max_memory_allocated() / 2**20


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """GPTQModel quantized linears of a loaded model by full name (anything with ``dequantize_weight``)."""
    return {
        name: mod
        for name, mod in model.named_modules()
        if hasattr(mod, "dequantize_weight") and hasattr(mod, "qweight")
    }


def dequantized_weight(qlinear: nn.Module) -> torch.Tensor:
    """``W_Q`` ``[d_out, d_in]`` float32 of a GPTQModel quantized linear.

    GPTQModel's ``dequantize_weight()`` returns the transpose, ``[d_in, d_out]`` (also for square
    layers, so the shape cannot tell).
    """
    w = qlinear.dequantize_weight().float().T
    if w.shape != (qlinear.out_features, qlinear.in_features):
        raise ValueError(f"unexpected dequantized shape {tuple(w.shape)} for {qlinear}")
    return w.contiguous()


def checkpoint_weights(model_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Weights ``<name>.weight`` from a model folder's safetensors files, float32, without loading the
    model."""
    from safetensors import safe_open

    want = {f"{n}.weight": n for n in names}
    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key in want:
                    out[want[key]] = f.get_tensor(key).float()
    missing = sorted(set(names) - set(out))
    if missing:
        raise KeyError(f"weights not found in {model_dir}: {', '.join(missing[:5])}")
    return out


def gram_error(dw: torch.Tensor, gram: torch.Tensor) -> float:
    """``sqrt(tr(ΔW G ΔWᵀ))`` = ‖ΔW X‖_F for ``G = XᵀX`` (float64)."""
    dw64 = dw.double()
    quad = ((dw64 @ gram.double()) * dw64).sum().item()
    return math.sqrt(max(quad, 0.0))


@torch.no_grad()
def input_grams(model: nn.Module, names: list[str], windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """``XᵀX`` (float64 ``[d_in, d_in]``) of the inputs of the named submodules over ``windows`` ``[n, L]``.

    A module fed the very same tensor object as the hooked module called just before it (q/k/v,
    gate/up) shares that module's accumulation (decided on the first window).
    """
    grams: dict[str, torch.Tensor] = {}
    leader_of: dict[str, str] = {}
    state = {"first": True, "x": None, "name": None}  # the last input is held: its storage stays unique

    def hook(name: str):
        def fn(_module, args):
            if name in leader_of:
                return
            x = args[0]
            if state["first"] and x is state["x"]:
                leader_of[name] = state["name"]
                return
            state["x"], state["name"] = x, name
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            g = (x2.T @ x2).double()
            grams[name] = grams[name] + g if name in grams else g

        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        device = next(model.parameters()).device
        for row in windows:
            model(row[None].to(device))
            state.update(first=False, x=None, name=None)
    finally:
        for h in handles:
            h.remove()
    for follower, leader in leader_of.items():
        grams[follower] = grams[leader]
    return grams


def summarize(layers: dict[str, dict[str, float]]) -> dict[str, float]:
    """Averages over layers: relative weight error and relative output error (when present)."""
    out: dict[str, float] = {"n_layers": float(len(layers))}
    rel_w = [r["dw_fro"] / r["w_fro"] for r in layers.values() if r.get("w_fro")]
    if rel_w:
        out["mean_rel_dw"] = sum(rel_w) / len(rel_w)
    rel_x = [r["dw_x_fro"] / r["w_x_fro"] for r in layers.values() if r.get("w_x_fro")]
    if rel_x:
        out["mean_rel_dw_x"] = sum(rel_x) / len(rel_x)
    magr = [r["magr_seconds"] for r in layers.values() if "magr_seconds" in r]
    if magr:
        out["magr_seconds_total"] = sum(magr)
    return out
