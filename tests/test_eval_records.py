"""Per-item records of the eval stage: written, compact, reproducible, and on the same items for every row."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from qwha.config import ConfigError
from qwha.data.packaged import smollm2_gguf
from qwha.eval.gsm8k import GSM_SYMBOLIC_TEST_IDS
from qwha.eval.records import merge_gsm8k, read_records, records_file, write_records
from qwha.stages import eval as eval_stage
from tests.conftest import compose, tiny_llama_config


def test_records_round_trip_and_are_byte_reproducible(tmp_path):
    recs = [{"id": 3, "nll": 1.5, "tokens": 7, "generation": "é 18"}, {"id": 1, "nll": 0.25, "tokens": 2}]
    assert write_records(tmp_path / "a.jsonl.gz", recs) == 2
    write_records(tmp_path / "b.jsonl.gz", recs)
    assert read_records(tmp_path / "a.jsonl.gz") == recs
    assert (tmp_path / "a.jsonl.gz").read_bytes() == (tmp_path / "b.jsonl.gz").read_bytes()
    assert records_file("csqa") == "records_csqa.jsonl.gz"
    with pytest.raises(ValueError, match="allowed values are csqa, gsm8k, heldout"):
        records_file("mmlu")


def test_merge_gsm8k_joins_by_id():
    losses = [{"id": 5, "nll": 2.0, "tokens": 4}, {"id": 2, "nll": 1.0, "tokens": 3}]
    gens = [{"id": 2, "generation": "x 7", "pred": "7", "gold": "7", "correct": 1}]
    assert merge_gsm8k(gens, losses) == [
        {"id": 2, "nll": 1.0, "tokens": 3, "generation": "x 7", "pred": "7", "gold": "7", "correct": 1},
        {"id": 5, "nll": 2.0, "tokens": 4},
    ]


@pytest.mark.parametrize("target", ["quantize", "init", "finetune"])
def test_every_row_leaves_out_the_template_questions_offline(target):
    """The GPTQ-alone and init rows score the same GSM8K questions as the tuned rows."""
    assert eval_stage.gsm8k_exclude(compose(f"eval.target={target}")) == "gsm_symbolic"
    assert eval_stage.gsm8k_exclude(compose(f"eval.target={target}", "eval.gsm8k.exclude=none")) == "none"
    with pytest.raises(ConfigError, match="eval.gsm8k.exclude='some'.*auto, gsm_symbolic, none"):
        eval_stage.gsm8k_exclude(compose("eval.gsm8k.exclude=some"))


def test_budget_small_scores_500_documents_and_every_uncontaminated_question():
    cfg = compose("budget=small")
    assert cfg.eval.csqa.limit == 500 and cfg.eval.gsm8k.answer_nll_limit is None
    assert cfg.eval.gsm8k.limit == 50


def test_eval_stage_writes_per_item_records(tmp_path, monkeypatch):
    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))).eval()
    monkeypatch.setattr(eval_stage, "load_model_for", lambda cfg, inputs, upto: (model, tok))
    cfg = compose(
        "eval.target=quantize",
        "eval.perplexity.enabled=false",
        "eval.csqa.enabled=true",
        "eval.csqa.tasks=[arc_easy,boolq]",
        "eval.csqa.limit=3",
        "eval.gsm8k.limit=2",
        "eval.gsm8k.answer_nll_limit=4",
        "eval.gsm8k.max_new_tokens=3",
        "eval.gsm8k.decoding=greedy",
    )
    eval_stage.run(cfg, tmp_path, {})
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["records"] == {"csqa": "records_csqa.jsonl.gz", "gsm8k": "records_gsm8k.jsonl.gz"}
    assert "records" not in results["csqa"] and "records" not in results["gsm8k"]

    csqa = read_records(tmp_path / "records_csqa.jsonl.gz")
    assert [r["task"] for r in csqa] == ["arc_easy"] * 3 + ["boolq"] * 3
    assert results["csqa"]["n_records"] == 6
    for task in ("arc_easy", "boolq"):
        rows = [r for r in csqa if r["task"] == task]
        acc = sum(r["correct"] for r in rows) / 3
        assert acc == pytest.approx(results["csqa"]["tasks"][task]["value"])
    assert all(len(r["ll"]) == (4 if r["task"] == "arc_easy" else 2) for r in csqa)

    gsm = read_records(tmp_path / "records_gsm8k.jsonl.gz")
    assert len(gsm) == 4 and not {r["id"] for r in gsm} & set(GSM_SYMBOLIC_TEST_IDS)
    generated = [r for r in gsm if "generation" in r]
    assert len(generated) == 2 and sum(r["correct"] for r in generated) == results["gsm8k"]["correct"]
    nll = results["gsm8k"]["answer_nll"]
    assert sum(r["tokens"] for r in gsm) == nll["tokens"]
    assert sum(r["nll"] for r in gsm) / nll["tokens"] == pytest.approx(nll["nll"], rel=1e-12)
    assert results["gsm8k"]["excluded_gsm_symbolic_templates"] is True


@pytest.mark.parametrize("data", ["gsm8k", pytest.param("alpaca", marks=pytest.mark.slow)])
def test_train_heldout_records_are_training_distribution_but_not_training_records(data):
    from qwha.data.sft import load_sft_records

    cfg = compose(f"data={data}", "data.packaged_size=30", "eval.train_heldout.size=6")
    held = eval_stage.train_heldout_records(cfg)
    train = load_sft_records(data, "packaged", size=30, seed=int(cfg.seed))
    assert len(held) == 6 and not {r["prompt"] for r in held} & {r["prompt"] for r in train}
    assert held == eval_stage.train_heldout_records(cfg)  # seeded
    if data == "gsm8k":  # the same task: GSM8K-style prompts with worked solutions
        assert all(r["target"].rstrip().split("The final answer is: ")[-1] for r in held)
    else:  # a finite pool: asking for more than it holds beyond the training subset is one line
        too_many = compose(f"data={data}", "data.packaged_size=30", "eval.train_heldout.size=1000000")
        with pytest.raises(ConfigError, match="eval.train_heldout.size=1000000: only"):
            eval_stage.train_heldout_records(too_many)


def test_eval_stage_writes_the_heldout_training_loss(tmp_path, monkeypatch):
    from qwha.data.sft import tokenize_sft

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))).eval()
    monkeypatch.setattr(eval_stage, "load_model_for", lambda cfg, inputs, upto: (model, tok))
    cfg = compose(
        "eval.perplexity.enabled=false",
        "eval.gsm8k.enabled=false",
        "eval.train_heldout.enabled=true",
        "eval.train_heldout.size=3",
        "data.packaged_size=10",
        "data.max_length=256",
    )
    eval_stage.run(cfg, tmp_path, {})
    res = json.loads((tmp_path / "results.json").read_text())["train_heldout"]
    recs = read_records(tmp_path / "records_heldout.jsonl.gz")
    assert res["n"] == len(recs) == 3 and res["lr"] == pytest.approx(float(cfg.train.lr))
    data = tokenize_sft(eval_stage.train_heldout_records(cfg), tok, max_length=256, drop_empty=False)
    assert [r["tokens"] for r in recs] == [sum(x != -100 for x in d["labels"][1:]) for d in data]
    assert all(r["tokens"] > 0 for r in recs)
    assert sum(r["nll"] for r in recs) / res["tokens"] == pytest.approx(res["nll"], rel=1e-12)
