"""The adapter budget on the real Llama-3.2-3B geometry, built on the meta device (no weights)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qwha.adapters import attach_adapter

LLAMA_32_3B = LlamaConfig(
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=28,
    num_attention_heads=24,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=128256,
    tie_word_embeddings=True,
)


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_llama32_3b_trainable_parameters_at_rank_64():
    # r·(d_in + d_out) per projection: q,o 2·(3072+3072), k,v 2·(3072+1024), gate,up,down 3·(3072+8192)
    per_block = 64 * (2 * 6144 + 2 * 4096 + 3 * 11264)
    assert per_block * 28 == 97_255_424
    for method in ("wha", "lora"):
        with torch.device("meta"):
            model = LlamaForCausalLM(LLAMA_32_3B)
        model = attach_adapter(model, method=method, rank=64)
        assert _trainable(model) == 97_255_424, method
