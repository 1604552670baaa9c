"""Custom JSON Lines data (``data=jsonl``): checks before any model, split, templates, masking, the
validation loss against a per-example float64 computation, and the CLI's one-line error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from qwha.config import ConfigError, validate
from qwha.data.jsonl import (
    check,
    fingerprint,
    format_prompt,
    load_records,
    n_validation,
    response_nll,
    split_indices,
    tokenized,
)
from qwha.data.sft import IGNORE_INDEX
from tests.conftest import compose, run_cli, tiny_llama_config

WORDS = "what is two plus three five the sum of and four nine say hello world context :".split()
CHAT = (
    "{% for m in messages %}<user> {{ m['content'] }} <end>{% endfor %}"
    "{% if add_generation_prompt %} <assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer over ``WORDS`` with a chat template (built in memory, no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<eos>", "<user>", "<assistant>", "<end>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.chat_template = CHAT
    return fast


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def node(path: Path, **kw):
    base = dict(
        name="jsonl",
        format="jsonl",
        path=str(path),
        prompt_field="prompt",
        response_field="response",
        input_field=None,
        chat_template=False,
        validation=0.25,
        validation_path=None,
        mask_prompt=True,
        max_length=64,
    )
    return OmegaConf.create({**base, **kw})


ROWS = [
    {"prompt": "what is two plus three", "response": "five", "ctx": "context : two"},
    {"prompt": "what is four plus five", "response": "nine", "ctx": "context : four"},
    {"prompt": "say hello", "response": "hello world", "ctx": "context"},
    {"prompt": "the sum of two and three", "response": "five", "ctx": "context : sum"},
]


# ------------------------------------------------------------------------------------ bad input
def test_missing_file_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.path='.*nope\.jsonl': no such file") as e:
        check(node(tmp_path / "nope.jsonl"))
    assert "\n" not in str(e.value)


def test_missing_field_names_line_field_and_fields_found(tmp_path):
    rows = [*ROWS[:2], {"question": "say hello", "response": "hello"}]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ConfigError) as e:
        check(node(p))
    msg = str(e.value)
    assert "line 3" in msg and "'prompt'" in msg and "question, response" in msg and "\n" not in msg


def test_bad_json_line_and_non_string_field(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(ConfigError, match="line 2 is not JSON"):
        check(node(p))
    write_jsonl(p, [{"prompt": "a", "response": 3}])
    with pytest.raises(ConfigError, match="non-string field 'response'"):
        check(node(p))


def test_fraction_and_required_path(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(ConfigError, match=r"data\.validation=1\.0"):
        check(node(p, validation=1.0))
    missing = node(p)
    missing.path = "???"
    with pytest.raises(ConfigError, match=r"data\.path is required"):
        check(missing)


def test_validate_runs_the_check_before_any_model(tmp_path):
    cfg = compose("data=jsonl", f"data.path={tmp_path / 'missing.jsonl'}")
    with pytest.raises(ConfigError, match="no such file"):
        validate(cfg)
    p = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cfg = compose("data=jsonl", f"data.path={p}")
    validate(cfg)
    # A custom set takes the learning rate an Alpaca run would (data.lr_like), from the model's table.
    assert cfg.train.lr == compose("data=alpaca").train.lr
    assert cfg.train.lr in [float(v) for v in cfg.model.lr.qwha.alpaca.values()]


def test_cli_missing_field_exits_2_with_one_line(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", ROWS)
    res = run_cli("data=jsonl", f"data.path={p}", "data.response_field=answer", "dry_run=true")
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("qwha: error: data.path=") and "'answer'" in lines[-1]
    assert sum(ln.startswith("qwha: error") for ln in lines) == 1


# ------------------------------------------------------------------------------------ split
@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
@pytest.mark.parametrize("frac", [0.0, 0.01, 0.25, 0.9])
def test_split_partitions_the_records(n, frac):
    train, val = split_indices(n, frac, seed=3)
    assert sorted(train + val) == list(range(n)) and not set(train) & set(val)
    assert len(val) == n_validation(n, frac)
    if frac > 0 and n >= 2:
        assert 1 <= len(val) <= n - 1 and len(val) == min(n - 1, max(1, math.ceil(frac * n)))
    else:
        assert val == []
    assert split_indices(n, frac, seed=3) == (train, val)


def test_split_depends_on_seed():
    assert {tuple(split_indices(100, 0.2, s)[1]) for s in range(5)}.__len__() > 1


def test_records_of_both_splits_and_validation_file(tmp_path, tokenizer):
    p = write_jsonl(tmp_path / "d.jsonl", ROWS)
    d = node(p)
    train = load_records(d, "train", tokenizer, seed=0)
    val = load_records(d, "validation", tokenizer, seed=0)
    assert len(train) == 3 and len(val) == 1
    _, held = split_indices(4, 0.25, 0)
    assert val[0]["target"] == ROWS[held[0]]["response"]
    v = write_jsonl(tmp_path / "v.jsonl", ROWS[2:])
    d2 = node(p, validation_path=str(v))
    assert len(load_records(d2, "train", tokenizer, seed=0)) == 4
    assert [r["target"] for r in load_records(d2, "validation", tokenizer, seed=0)] == ["hello world", "five"]


def test_fingerprint_follows_file_content(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", ROWS)
    a = fingerprint(node(p))
    write_jsonl(p, ROWS[:3])
    assert fingerprint(node(p)) != a


# ------------------------------------------------------------------------------------ templates, tokens
def test_prompt_plain_input_field_and_chat_template(tokenizer):
    assert format_prompt("say hello", None, tokenizer, False) == "say hello\n"
    assert format_prompt("say hello", "context", tokenizer, False) == "say hello\n\ncontext\n"
    assert format_prompt("say hello", None, tokenizer, True) == "<user> say hello <end> <assistant>"


def test_tokens_mask_the_prompt_and_end_with_eos(tmp_path, tokenizer):
    p = write_jsonl(tmp_path / "d.jsonl", ROWS)
    d = node(p, validation=0.0, input_field="ctx", chat_template=True)
    data = tokenized(d, tokenizer, seed=0)
    eos = tokenizer.eos_token_id
    for row, ex in zip(ROWS, data, strict=True):
        prompt = f"<user> {row['prompt']}\n\n{row['ctx']} <end> <assistant>"
        want_prompt = tokenizer(prompt)["input_ids"]
        want_target = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [eos]
        assert ex["input_ids"] == want_prompt + want_target
        assert ex["labels"] == [IGNORE_INDEX] * len(want_prompt) + want_target


# ------------------------------------------------------------------------------------ validation loss
def test_response_nll_matches_per_example_float64(tmp_path, tokenizer):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer))).eval()
    p = write_jsonl(tmp_path / "d.jsonl", ROWS)
    data = tokenized(node(p, validation=0.0), tokenizer, seed=0)
    got = response_nll(model, tokenizer, data, batch_size=3)  # padded batches of unequal lengths
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in data:  # one unpadded example at a time, float64 log-softmax
            logits = model(torch.tensor([ex["input_ids"]])).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            for t in range(1, len(ex["labels"])):
                if ex["labels"][t] != IGNORE_INDEX:
                    total -= float(logp[t - 1, ex["labels"][t]])
                    count += 1
    assert got["tokens"] == count and got["n"] == 4
    assert got["nll"] == pytest.approx(total / count, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
