"""Sliding-window perplexity of a causal LM on held-out text (Hugging Face's strided method).

The text is tokenized once (with the tokenizer's usual special tokens) into ``N`` ids. Windows of at
most ``window`` tokens start every ``stride`` tokens: window ``k`` covers ``[k·stride, min(k·stride +
window, N))`` and scores only the tokens that no earlier window scored, i.e. the first window scores
tokens ``1 … window-1`` and each later one the ``stride`` tokens after the previous window's end, with
up to ``window - stride`` tokens of context. With ``stride < window`` every token except the first is
scored exactly once, so ``tokens = N - 1`` and ``ppl = exp(Σ NLL / tokens)`` (natural log, accumulated
in float64). ``stride == window`` gives non-overlapping chunks (the GPTQ papers' protocol), where each
chunk's first token has no context and is not scored.

Held-out text: ``qwha.data.text.joined_text("packaged" | "wikitext2", "test")``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def strided_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, n_scored)`` per window: ids ``[begin, end)``, the last ``n_scored`` of them scored."""
    if window < 2:
        raise ValueError(f"eval.perplexity.window={window}: must be >= 2")
    if not 1 <= stride <= window:
        raise ValueError(f"eval.perplexity.stride={stride}: must be in [1, window={window}]")
    out: list[tuple[int, int, int]] = []
    prev_end = 1  # token 0 has no context and is never scored
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        if end > prev_end:
            # begin < prev_end when stride < window; with stride == window the window's own first
            # token has no context and is skipped.
            out.append((begin, end, min(end - prev_end, end - begin - 1)))
            prev_end = end
        if end == n_tokens:
            break
    return out


def token_nll(logits: torch.Tensor, ids: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``-log p(ids[:, t+1] | ids[:, :t+1])`` ``[B, L-1]`` from ``logits [B, L, V]`` (float32 for half or
    float32 logits, float64 for float64 ones).

    A chunk of positions at a time, so that no full-size float32 copy or log-softmax of the logits is
    made (a 2048-token window of a 49k-vocabulary model has 0.4 GB of float32 logits; the one-shot
    ``cross_entropy`` over its transpose held two more such tensors).
    """
    b, length, vocab = logits.shape
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    out = torch.empty(b, length - 1, dtype=dtype, device=logits.device)
    for start in range(0, length - 1, chunk):
        end = min(start + chunk, length - 1)
        part = logits[:, start:end].to(dtype).reshape(-1, vocab)
        target = ids[:, start + 1 : end + 1].reshape(-1)
        out[:, start:end] = F.cross_entropy(part, target, reduction="none").view(b, end - start)
    return out


# Model types whose logits are exactly ``lm_head(decoder(ids).last_hidden_state)``: no logit scaling or
# soft-capping (Gemma, Cohere, Granite, ... have one and take the full-logits path).
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})


def window_nll(model: Any, ids: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Per-token NLL ``[B, L-1]`` of ``ids [B, L]`` under ``model``.

    For the plain-head model types (``PLAIN_HEAD_MODEL_TYPES``) the decoder runs once and the output
    embedding is applied ``chunk`` positions at a time, so the ``[B, L, V]`` logits never exist (0.4 GB
    per 2048-token window of a 49k-vocabulary model in float32). Other models go through full logits.
    """
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES or head is None or decoder is None:
        return token_nll(model(input_ids=ids).logits, ids)
    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state  # [B, L, hidden]
    length = ids.shape[1]
    parts = [
        token_nll(head(hidden[:, start : start + chunk + 1]), ids[:, start : start + chunk + 1])
        for start in range(0, length - 1, chunk)
    ]  # each [B, min(chunk, L-1-start)]: positions start+1 ... scored from hidden states start ...
    return torch.cat(parts, dim=1)


@torch.no_grad()
def perplexity(
    model: Any,
    tokenizer: Any,
    text: str,
    *,
    window: int = 2048,
    stride: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 1,
) -> dict[str, float | int]:
    """Strided perplexity of ``model`` on ``text``.

    Args:
        model: causal LM returning ``.logits`` [batch, seq, vocab] from ``model(input_ids=...)``.
        tokenizer: its tokenizer.
        text: the held-out text (one string).
        window: tokens per forward pass (the model's context used for evaluation).
        stride: new tokens scored per window after the first; context is ``window - stride``.
        max_tokens: keep only the first ``max_tokens`` ids of the tokenized text (quick runs).
        batch_size: windows of equal length run together in one forward pass.

    Returns:
        ``{"ppl": exp(mean NLL), "nll": mean NLL in nats, "tokens": number of scored tokens}``.
    """
    if batch_size < 1:
        raise ValueError(f"eval.perplexity.batch_size={batch_size}: must be >= 1")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"eval.perplexity.max_tokens={max_tokens}: must be >= 2 or null")
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError("perplexity needs a text of at least 2 tokens")
    windows = strided_windows(ids.numel(), window, stride)
    device = getattr(model, "device", None) or torch.device("cpu")

    # Group consecutive windows of equal length into batches (only the last window can be shorter).
    batches: list[list[tuple[int, int, int]]] = []
    for w in windows:
        if batches and len(batches[-1]) < batch_size and batches[-1][0][1] - batches[-1][0][0] == w[1] - w[0]:
            batches[-1].append(w)
        else:
            batches.append([w])

    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for batch in tqdm(batches, desc="perplexity", unit="batch"):
            x = torch.stack([ids[b:e] for b, e, _ in batch]).to(device)  # [B, L]
            nll = window_nll(model, x)  # [B, L-1]
            length = x.shape[1]
            n_new = torch.tensor([n for _, _, n in batch], device=device)  # [B]
            pos = torch.arange(1, length, device=device)  # target positions
            scored = pos[None, :] >= (length - n_new)[:, None]  # [B, L-1]
            total_nll += nll.double()[scored].sum().item()
            total_tokens += int(scored.sum().item())
    finally:
        if was_training:
            model.train()
    mean = total_nll / total_tokens
    return {"ppl": math.exp(mean), "nll": mean, "tokens": total_tokens}
