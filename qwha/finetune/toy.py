"""A tiny random Llama with a LoRA adapter and a synthetic SFT set: the fine-tuning engine's test bench.

Used by the tests (in-process and under torchrun) and by ``experiments/bench_finetune.py``; nothing in the
pipeline depends on it.
"""

from __future__ import annotations

import torch
from torch import nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(seed: int = 0, vocab_size: int = 64, lora_rank: int | None = 4) -> nn.Module:
    """``LlamaConfig(hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads)`` with random weights.

    With ``lora_rank`` the seven projections carry a PEFT LoRA (dropout 0, B initialised non-zero so every
    adapter tensor gets a gradient from the first step) and only the LoRA tensors are trainable.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(cfg).float()
    if lora_rank is None:
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=lora_rank,
        lora_alpha=2 * lora_rank,
        lora_dropout=0.0,
        target_modules=list(PROJECTIONS),
        init_lora_weights=False,
    )
    torch.manual_seed(seed + 1)
    return get_peft_model(model, lora)


def tiny_llama_partly_trainable(
    seed: int = 0, trainable: tuple[str, ...] = ("q_proj.weight", "down_proj.weight")
) -> nn.Module:
    """``tiny_llama`` without PEFT, only the weights whose names end with ``trainable`` left trainable."""
    model = tiny_llama(seed, lora_rank=None)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(trainable))
    return model


def copy_task(
    n: int, seed: int = 0, vocab_size: int = 64, min_len: int = 3, max_len: int = 10
) -> list[dict[str, list[int]]]:
    """``n`` examples ``prompt = [1] + x + [2]``, ``target = x + [3]`` (x random tokens >= 4, varying length).

    The prompt is masked in the labels (-100), so the loss measures how well the model copies ``x``.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        x = torch.randint(4, vocab_size, (length,), generator=g).tolist()
        prompt, target = [1, *x, 2], [*x, 3]
        out.append({"input_ids": prompt + target, "labels": [-100] * len(prompt) + target})
    return out


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters with ``requires_grad=True``, by name."""
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
