"""Synthetic GPTQModel layers: a ``TorchLinear`` packed from any weight without a quantization run.

Used by the tests and by ``experiments/bench_adapter.py``. ``torch_linear_from(linear, bits,
group_size)`` rounds the weight to an asymmetric per-group grid (round-to-nearest; the GPTQ format
stores exactly such a grid) and packs it with GPTQModel's public ``pack_original``; the layer's
dequantized weight is then that grid (``rtn_grid`` returns it as GPTQModel computes it, in fp16).
``TorchLinear.post_init()`` wraps ``dequantize_weight`` in ``torch.compile``; ``compile=False`` skips
that (~15 s per process on CPU) without changing the arithmetic.
"""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["random_torch_linear", "rtn_grid", "torch_linear_from"]


def _empty_torch_linear(bits: int, group_size: int, d_in: int, d_out: int, *, bias: bool):
    """An unpacked asymmetric GPTQModel ``TorchLinear`` (int32 packing, no act-order)."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    return TorchLinear(
        bits=bits,
        group_size=group_size,
        sym=False,
        desc_act=False,
        in_features=d_in,
        out_features=d_out,
        bias=bias,
        pack_dtype=torch.int32,
    )


def rtn_grid(weight: torch.Tensor, bits: int, group_size: int):
    """Asymmetric per-group RTN: (W_Q [d_out, d_in] as GPTQModel dequantizes it, scale, zero)."""
    d_out, d_in = weight.shape
    w = weight.detach().float().reshape(d_out, d_in // group_size, group_size)
    maxq = 2**bits - 1
    wmin, wmax = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scale = ((wmax - wmin) / maxq).clamp_min(1e-5).half().float()  # fp16 storage of the scales
    zero = torch.round(-wmin / scale).clamp(0, maxq)
    q = torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], 0, maxq)
    # GPTQModel dequantizes in fp16: scale·(q − zero), one correctly rounded fp16 product
    deq = ((q - zero[..., None]) * scale[..., None]).reshape(d_out, d_in).half().float()
    return deq, scale, zero


def torch_linear_from(linear: nn.Linear, bits: int = 4, group_size: int = 32, compile: bool = False):
    """A CPU GPTQModel ``TorchLinear`` holding ``linear``'s weight on a ``bits``-bit grid."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

    d_out, d_in = linear.weight.shape
    deq, scale, zero = rtn_grid(linear.weight, bits, group_size)
    src = nn.Linear(d_in, d_out, bias=linear.bias is not None)
    with torch.no_grad():
        src.weight.copy_(deq)
        if linear.bias is not None:
            src.bias.copy_(linear.bias.detach().float())
    layer = _empty_torch_linear(bits, group_size, d_in, d_out, bias=linear.bias is not None)
    g_idx = torch.arange(d_in, dtype=torch.int32) // group_size
    layer.pack_original(src, scale.half(), zero.half(), g_idx)
    if not compile:
        layer.optimized = True  # skip GPTQModel's torch.compile of dequantize_weight (see module doc)
    layer.post_init()
    layer.eval()
    return layer


def random_torch_linear(
    d_in: int,
    d_out: int,
    bits: int = 4,
    group_size: int = 128,
    compile: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
):
    """A ``TorchLinear`` with random codes, zeros and small scales (for timing; instant at any size)."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

    layer = _empty_torch_linear(bits, group_size, d_in, d_out, bias=False)
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(2**31), 2**31 - 1
    with torch.no_grad():
        layer.qweight.copy_(
            torch.randint(lo, hi, layer.qweight.shape, generator=g, dtype=torch.int64).to(torch.int32)
        )
        layer.qzeros.copy_(
            torch.randint(lo, hi, layer.qzeros.shape, generator=g, dtype=torch.int64).to(torch.int32)
        )
        layer.scales.copy_((0.002 + 0.004 * torch.rand(layer.scales.shape, generator=g)).half())
        layer.g_idx.copy_(torch.arange(d_in, dtype=torch.int32) // group_size)
    layer = layer.to(device)
    if not compile:
        layer.optimized = True
    layer.post_init()
    return layer
