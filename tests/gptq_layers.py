"""Test helpers: tiny Llama models whose linears are GPTQModel ``TorchLinear`` layers packed without a
quantization run (see :mod:`qwha.adapters.synthetic`)."""

from __future__ import annotations

import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from qwha.adapters.synthetic import rtn_grid, torch_linear_from  # noqa: E402,F401


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
