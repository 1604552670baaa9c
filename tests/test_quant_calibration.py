"""Calibration windows, corpus tokenization, and the up-front validation of a quantization request."""

from __future__ import annotations

import pytest
import torch

from qwha.quant import BITS, QUANT_METHODS, input_widths, validate
from qwha.quant.calibration import sample_windows, tokenize_corpus


def test_windows_are_seeded_contiguous_slices():
    stream = torch.arange(10_000) * 7 + 3  # distinct values: a window identifies its offset
    a = sample_windows(stream, 16, 100, seed=0)
    b = sample_windows(stream, 16, 100, seed=0)
    c = sample_windows(stream, 16, 100, seed=1)
    assert a.shape == (16, 100) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    for row in a:
        start = int((row[0] - 3) // 7)
        assert torch.equal(row, stream[start : start + 100])
    assert a.unique(dim=0).shape[0] == 16  # 16 offsets drawn from 9901: distinct here


def test_windows_do_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sample_windows(torch.arange(1000), 4, 50, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_windows_cover_the_whole_stream_including_its_end():
    stream = torch.arange(60)  # 11 possible offsets for 50-token windows; 500 seeds × 4 draws hit all
    starts = {int(v) for seed in range(500) for v in sample_windows(stream, 4, 50, seed=seed)[:, 0]}
    assert starts == set(range(11))


@pytest.mark.parametrize(
    ("n_tokens", "n", "length", "match"),
    [
        (99, 1, 100, "fewer than one window"),
        (1000, 64, 100, "too few for quant.calib_windows=64"),
        (1000, 0, 10, "calib_windows=0"),
        (1000, 2, 0, "calib_len=0"),
    ],
)
def test_windows_bad_input(n_tokens, n, length, match):
    with pytest.raises(ValueError, match=match):
        sample_windows(torch.arange(n_tokens), n, length, seed=0)


class _ByteTokenizer:
    """A stand-in tokenizer: UTF-8 bytes, the callable interface of a transformers tokenizer."""

    def __call__(self, text, add_special_tokens=True, return_attention_mask=True):
        ids = list(text.encode("utf-8"))
        return {"input_ids": ([256] if add_special_tokens else []) + ids}


def test_tokenize_corpus_joins_documents():
    ids = tokenize_corpus(["ab", "c"], _ByteTokenizer())
    assert ids.tolist() == list(b"ab\n\nc")
    assert ids.dtype == torch.long
    with pytest.raises(ValueError, match="empty"):
        tokenize_corpus([], _ByteTokenizer())


def test_validate_accepts_the_paper_setting():
    for bits in BITS:
        validate(bits, 64, [3072, 8192], 128, 2048, 2_400_000)
    validate(2, 64, [576, 1536], None, None, None, method="rtn")
    validate(7, 5, [1], None, None, None, method="none")  # nothing is quantized: nothing to check


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 5}, r"quant.bits=5: allowed values are 2, 3, 4, 8"),
        ({"group_size": 48}, r"quant.group_size=48: allowed values are -1, 16, 32"),
        ({"group_size": 128, "widths": [576, 1536]}, r"quant.group_size=128 does not divide .* 576"),
        ({"method": "awq"}, r"quant.method='awq': allowed values are " + ", ".join(QUANT_METHODS)),
        ({"n_tokens": 1000}, r"too few for quant.calib_windows=32"),
        ({"n_tokens": 400}, r"fewer than one window of quant.calib_len=512"),
        ({"damp": 0.0}, r"quant.damp=0.0"),
        ({"magr_alpha": -1.0}, r"quant.magr_alpha=-1.0"),
        ({"n_windows": None}, r"needs a calibration sample"),
    ],
)
def test_validate_rejects_with_one_line(kwargs, match):
    args = {
        "bits": 2,
        "group_size": 64,
        "widths": [576, 1536],
        "n_windows": 32,
        "window_len": 512,
        "n_tokens": 371_092,
    }
    args.update(kwargs)
    extra = {k: args.pop(k) for k in ("method", "damp", "magr_alpha") if k in args}
    with pytest.raises(ValueError, match=match) as err:
        validate(**args, **extra)
    assert "\n" not in str(err.value)


def test_input_widths_from_config():
    smollm2 = {"hidden_size": 576, "num_attention_heads": 9, "intermediate_size": 1536}
    assert input_widths(smollm2) == [576, 1536]
    qwen3_like = {"hidden_size": 1024, "num_attention_heads": 16, "head_dim": 128, "intermediate_size": 3072}
    assert input_widths(qwen3_like) == [1024, 2048, 3072]  # o_proj reads 16 × 128
