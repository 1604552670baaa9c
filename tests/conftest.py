"""Shared fixtures: composed configs, a scratch cache, tiny models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import qwha  # noqa: F401  (environment hygiene: TRITON_INTERPRET, HF_HOME, WANDB_MODE, ...)

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


def compose(*overrides: str):
    """The config `python -m qwha <overrides>` would run with (Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import qwha.config  # noqa: F401  (registers the lr_for resolver)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def run_cli(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run `python -m qwha ...` in a subprocess from the repository root."""
    base = dict(os.environ)
    if env and "HF_HOME" in env:
        # A test that names its own HF_HOME means that cache only: drop the cache paths this process's
        # imports pinned (gptqmodel's tokenicer sets HF_HUB_CACHE, TRANSFORMERS_CACHE, ... from HF_HOME).
        base = {k: v for k, v in base.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    full_env = {**base, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "qwha", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny_llama_config(**overrides):
    """A 2-block Llama of width 64 (the unit tests' model); ``overrides`` set vocab size and the rest."""
    from transformers import LlamaConfig

    base = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaConfig(**{**base, **overrides})


@pytest.fixture
def cache_root(tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    root.mkdir()
    return root


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (256 tokens): any text encodes, no files needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=alphabet[0], bos_token=alphabet[0], pad_token=alphabet[0]
    )
