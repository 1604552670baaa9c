"""Strided perplexity against a direct forward and a per-token hand-computed reference."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from qwha.eval.perplexity import perplexity, strided_windows
from tests.conftest import tiny_llama_config

TEXT = "The quick brown fox jumps over the lazy dog; 12 cats sat on 3 mats. " * 2  # 138 bytes


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    t = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)} | {"<eos>": 256}, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>")


@pytest.fixture(scope="module")
def model(tok) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = tiny_llama_config(
        vocab_size=len(tok),
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).double().eval()


def test_windows_hand_example() -> None:
    # N=10, window 4, stride 2: [0,4) scores 1..3; [2,6) 4..5; [4,8) 6..7; [6,10) 8..9.
    assert strided_windows(10, 4, 2) == [(0, 4, 3), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    # non-overlapping chunks: each chunk's first token is unscored
    assert strided_windows(10, 4, 4) == [(0, 4, 3), (4, 8, 3), (8, 10, 1)]
    # shorter than one window
    assert strided_windows(3, 8, 2) == [(0, 3, 2)]


def test_single_window_equals_full_forward(model, tok) -> None:
    ids = tok(TEXT, return_tensors="pt").input_ids
    n = ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()  # [n, V], one forward over the whole text
        hf_loss = model(input_ids=ids, labels=ids).loss.item()  # HF's loss (computed in float32)
    mean_nll = -torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None]).mean().item()
    res = perplexity(model, tok, TEXT, window=n + 10, stride=4)
    assert res["tokens"] == n - 1
    assert res["ppl"] == pytest.approx(math.exp(mean_nll), rel=1e-12)
    assert res["ppl"] == pytest.approx(math.exp(hf_loss), rel=1e-5)


def reference_strided_nll(model, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """Token by token: token t is scored by the first window [k·stride, k·stride+window) containing it
    (t >= 1), with the context ids[k·stride : t], one forward pass per token."""
    n = ids.numel()
    total, count = 0.0, 0
    for t in range(1, n):
        k = 0
        while t >= k * stride + window:
            k += 1
        begin = k * stride
        with torch.no_grad():
            logits = model(input_ids=ids[None, begin:t]).logits[0, -1]  # predicts ids[t]
        total -= torch.log_softmax(logits, -1)[ids[t]].item()
        count += 1
    return total, count


@pytest.mark.parametrize(("window", "stride"), [(32, 8), (20, 13)])
def test_strided_equals_reference(model, tok, window: int, stride: int) -> None:
    ids = tok(TEXT, return_tensors="pt").input_ids[0]
    total, count = reference_strided_nll(model, ids, window, stride)
    assert count == ids.numel() - 1
    for batch_size in (1, 3):
        res = perplexity(model, tok, TEXT, window=window, stride=stride, batch_size=batch_size)
        assert res["tokens"] == count
        assert res["ppl"] == pytest.approx(math.exp(total / count), rel=1e-10)
    # the window really limits context: different from the full-context perplexity
    full = perplexity(model, tok, TEXT, window=ids.numel(), stride=1)
    assert abs(full["ppl"] - res["ppl"]) > 1e-6


def test_non_overlapping_chunks_count(model, tok) -> None:
    n = tok(TEXT, return_tensors="pt").input_ids.shape[1]  # 138
    res = perplexity(model, tok, TEXT, window=50, stride=50)
    assert res["tokens"] == n - math.ceil(n / 50)  # each chunk loses its first token


def test_max_tokens_and_errors(model, tok) -> None:
    assert perplexity(model, tok, TEXT, window=16, stride=4, max_tokens=40)["tokens"] == 39
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tok, TEXT, window=16, stride=17)
    with pytest.raises(ValueError, match="window"):
        perplexity(model, tok, TEXT, window=1, stride=1)
    with pytest.raises(ValueError, match="2 tokens"):
        perplexity(model, tok, "a", window=16, stride=4)


def test_token_nll_in_chunks_equals_float64_log_softmax() -> None:
    from qwha.eval.perplexity import token_nll

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 11, 7, generator=gen).to(torch.bfloat16)
    ids = torch.randint(0, 7, (2, 11), generator=gen)
    want = -torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    for chunk in (1, 3, 10, 256):  # chunk boundaries inside, at and past the sequence end
        got = token_nll(logits, ids, chunk=chunk)
        assert got.dtype == torch.float32 and got.shape == (2, 10)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    exact = token_nll(logits.double(), ids, chunk=4)
    assert exact.dtype == torch.float64
    torch.testing.assert_close(exact, want, rtol=1e-13, atol=1e-13)


def test_window_nll_without_full_logits_equals_the_logits_path(model) -> None:
    from qwha.eval.perplexity import token_nll, window_nll

    assert model.config.model_type == "llama"  # the chunked-head path
    ids = torch.randint(0, model.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = token_nll(model(input_ids=ids).logits, ids)
        for chunk in (1, 5, 22, 64):
            torch.testing.assert_close(window_nll(model, ids, chunk=chunk), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["wha", "lora"])
def test_window_nll_through_adapter_wrappers(method: str) -> None:
    """WHA adapts the modules in place; LoRA returns a PEFT wrapper: both reach the decoder and head."""
    from qwha.adapters import attach_adapter
    from qwha.eval.perplexity import token_nll, window_nll

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(vocab_size=97)).double().eval()
    model = attach_adapter(base, method=method, rank=4, target_modules=["q_proj", "down_proj"])
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)  # a non-zero update, so the adapter path matters
    model.eval()
    ids = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(
            window_nll(model, ids, chunk=4),
            token_nll(model(input_ids=ids).logits, ids),
            rtol=1e-12,
            atol=1e-12,
        )
