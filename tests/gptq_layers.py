"""Test helpers: GPTQModel ``TorchLinear`` layers and tiny Llama models built without a quantization run.

``torch_linear_from(linear, bits, group_size)`` rounds the weight to an asymmetric per-group grid
(round-to-nearest, the GPTQ format's storage) and packs it with GPTQModel's public
``pack_original``; the layer's dequantized weight is then that grid exactly, which the tests use
as ``W_Q``. ``TorchLinear.post_init()`` would wrap ``dequantize_weight`` in ``torch.compile``
(~15 s per process on CPU); the helpers skip that by marking the layer optimized, which changes
nothing in its arithmetic.
"""

from __future__ import annotations

import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402
from torch import nn  # noqa: E402


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


def torch_linear_from(linear: nn.Linear, bits: int = 4, group_size: int = 32):
    """A GPTQModel ``TorchLinear`` holding ``linear``'s weight on a ``bits``-bit grid (CPU, fp16)."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    d_out, d_in = linear.weight.shape
    deq, scale, zero = rtn_grid(linear.weight, bits, group_size)
    src = nn.Linear(d_in, d_out, bias=linear.bias is not None)
    with torch.no_grad():
        src.weight.copy_(deq)
        if linear.bias is not None:
            src.bias.copy_(linear.bias.detach().float())
    layer = TorchLinear(
        bits=bits,
        group_size=group_size,
        sym=False,
        desc_act=False,
        in_features=d_in,
        out_features=d_out,
        bias=linear.bias is not None,
        pack_dtype=torch.int32,
    )
    g_idx = torch.arange(d_in, dtype=torch.int32) // group_size
    layer.pack_original(src, scale.half(), zero.half(), g_idx)
    layer.optimized = True  # skip GPTQModel's torch.compile of dequantize_weight (see module doc)
    layer.post_init()
    layer.eval()
    return layer


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype)
    model.eval()
    return model


def quantize_linears(
    model: nn.Module,
    bits: int = 4,
    group_size: int = 32,
    names=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
):
    """Replace the named linears of ``model`` by ``TorchLinear`` layers (in place); returns ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in names:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, torch_linear_from(module, bits, group_size))
    return model
