"""The real model: SmolLM2-135M-Instruct (packaged GGUF) + PEFT LoRA on packaged GSM8K-style data, CPU.

Slow (minutes on 2 cores): ``pytest -m slow tests/test_finetune_smollm2.py``.
"""

from __future__ import annotations

import pytest
import torch

from qwha.data.sft import load_sft_records, make_collator, tokenize_sft
from qwha.finetune import train

pytestmark = pytest.mark.slow


def test_smollm2_lora_loss_falls(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwha.data.packaged import smollm2_gguf

    g = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    model = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    data = tokenize_sft(load_sft_records("gsm8k", "packaged", size=4, seed=0), tok, max_length=128)

    def mean_loss() -> float:  # transformers' own loss over the 4 examples, independent of the trainer
        with torch.no_grad():
            return float(model(**make_collator(tok)(data)).loss)

    before = mean_loss()
    run = dict(
        lr=1e-3,
        max_steps=6,
        micro_batch_size=2,
        effective_batch=4,
        warmup_ratio=0.0,
        scheduler="constant",
        save_every=0,
        wandb={"mode": "disabled"},
    )
    out = train(model, tok, data, run, tmp_path, seed=0, device="cpu")
    after = mean_loss()
    assert out["first_loss"] == pytest.approx(before, rel=1e-4)
    assert after < 0.8 * before, (before, after)
    assert out["final_loss"] < out["first_loss"]
