"""Calibration sample: ``n`` token windows of length ``L`` drawn with a seed from a tokenized corpus.

The quantize stage draws the sample once and stores it as its own artifact (``[n, L]`` int64); the init
stage reads the very same tensor, so MagR, GPTQ and the QWHA initialisation see identical tokens.

Windows are drawn like the paper's (GPTQ's) WikiText-2 sampler: each window starts at an independent
uniform random offset in ``[0, N − L]`` of the concatenated token stream, so windows MAY overlap (with
128 × 2048 windows over WikiText-2 train's ~2.4 M tokens they overlap a little). Only the count check
below guards against a corpus too small for the request: it needs ``N ≥ L`` and ``N ≥ n · L / 4`` — less
than a quarter of the requested tokens in distinct text would make the sample mostly repeated tokens.
"""

from __future__ import annotations

import torch
from torch import LongTensor

__all__ = ["MIN_COVERAGE", "check_sample_size", "sample_windows", "tokenize_corpus"]

# A corpus must hold at least this fraction of n·L distinct tokens (see the module docstring).
MIN_COVERAGE = 0.25


def tokenize_corpus(texts: list[str], tokenizer, separator: str = "\n\n") -> LongTensor:
    """Tokenize documents joined by ``separator`` into one stream ``[N]`` (int64), no special tokens.

    Joining before tokenizing (rather than concatenating per-document encodings) gives the same stream a
    perplexity evaluation over the joined text would read.
    """
    if not texts:
        raise ValueError("calibration text is empty: no documents to tokenize")
    ids = tokenizer(separator.join(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def check_sample_size(n_tokens: int, n: int, length: int) -> None:
    """One-line ValueError if ``n`` windows of ``length`` tokens cannot be drawn from ``n_tokens`` tokens."""
    if n < 1:
        raise ValueError(f"quant.calib_windows={n}: must be >= 1")
    if length < 1:
        raise ValueError(f"quant.calib_len={length}: must be >= 1")
    if n_tokens < length:
        raise ValueError(
            f"calibration text has {n_tokens} tokens, fewer than one window of quant.calib_len={length}"
        )
    if n_tokens < MIN_COVERAGE * n * length:
        raise ValueError(
            f"calibration text has {n_tokens} tokens, too few for quant.calib_windows={n} × "
            f"quant.calib_len={length} (needs >= {int(MIN_COVERAGE * n * length)}); "
            "lower the windows/length or use a larger text source"
        )


def sample_windows(token_ids: LongTensor, n: int, length: int, seed: int) -> LongTensor:
    """``n`` windows of ``length`` consecutive tokens at seeded uniform random offsets.

    Args:
        token_ids: ``[N]`` token stream.
        n: number of windows; length: tokens per window; seed: the draw (a private ``torch.Generator``,
            so global RNG state is neither used nor changed).

    Returns:
        ``[n, length]`` int64; identical for identical ``(token_ids, n, length, seed)``.
    """
    if token_ids.ndim != 1:
        raise ValueError(f"token_ids must be one stream [N], got shape {tuple(token_ids.shape)}")
    n_tokens = token_ids.numel()
    check_sample_size(n_tokens, n, length)
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, n_tokens - length + 1, (n,), generator=gen)
    idx = starts[:, None] + torch.arange(length)[None, :]
    return token_ids.to(torch.long)[idx]
