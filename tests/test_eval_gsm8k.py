"""GSM8K loading, contamination ids, and run_gsm8k's counting, padding and decoding settings."""

from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from qwha.eval import gsm8k
from qwha.eval.gsm8k import GSM_SYMBOLIC_TEST_IDS, PROMPT_TEMPLATE, load_gsm8k_test, run_gsm8k
from tests.conftest import tiny_llama_config


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 258-token byte-level tokenizer (256 bytes + pad + eos): lossless and instant to build."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {"<pad>": 256, "<eos>": 257}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def test_set() -> list[dict]:
    return load_gsm8k_test("packaged")


def test_packaged_test_set(test_set: list[dict]) -> None:
    assert len(test_set) == 1319
    assert [it["id"] for it in test_set] == list(range(1319))
    assert test_set[0]["question"].startswith("Janet")  # the public first test item: answer 18
    assert gsm8k.gold_answer(test_set[0]["answer"]) == "18"
    golds = [gsm8k.gold_answer(it["answer"]) for it in test_set]  # raises if any gold is not a number
    assert all(g.lstrip("-").replace(".", "").isdigit() for g in golds)


def test_exclude_ids(test_set: list[dict]) -> None:
    kept = load_gsm8k_test("packaged", exclude_ids=GSM_SYMBOLIC_TEST_IDS)
    assert len(kept) == 1319 - 100
    assert not {it["id"] for it in kept} & set(GSM_SYMBOLIC_TEST_IDS)
    with pytest.raises(ValueError, match="exclude_ids"):
        load_gsm8k_test("packaged", exclude_ids=[5000])
    with pytest.raises(ValueError, match="source"):
        load_gsm8k_test("nope")


# (generator, phrase found by reading both the generator's template and the GSM8K test question)
SYMBOLIC_PAIRS = [
    (0, "a minute and saute"),
    (27, "collects garbage from 3 different apartment complexes"),
    (59, "fog bank rolls in from the ocean to cover a city"),
    (76, "people apply for a job at"),
    (93, "slew"),
    (99, "wants to buy"),
]


@pytest.mark.parametrize(("gen", "phrase"), SYMBOLIC_PAIRS)
def test_gsm_symbolic_ids_match_templates(test_set: list[dict], gen: int, phrase: str) -> None:
    from reasoning_gym.arithmetic.gsm_symbolic import generators_00_49, generators_50_99

    module = generators_00_49 if gen < 50 else generators_50_99
    generated = getattr(module, f"generate_{gen}")(random.Random(1), 1.0)["question"]
    assert phrase in generated
    assert phrase in test_set[GSM_SYMBOLIC_TEST_IDS[gen]]["question"]


def test_gsm_symbolic_ids_are_distinct_test_items() -> None:
    assert len(set(GSM_SYMBOLIC_TEST_IDS)) == 100
    assert all(0 <= i < 1319 for i in GSM_SYMBOLIC_TEST_IDS)


class ScriptedLM(torch.nn.Module):
    """``generate`` appends a scripted reply per question and records what it was called with."""

    def __init__(self, tokenizer, replies: dict[str, str]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.replies, self.calls, self.prompts = tokenizer, replies, [], []

    def generate(self, input_ids, attention_mask, **kw):
        self.calls.append({"mask": attention_mask.clone(), "seed": torch.initial_seed(), **kw})
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = self.tok.decode(ids[mask.bool()])
            self.prompts.append(prompt)
            question = next(q for q in self.replies if PROMPT_TEMPLATE.format(question=q) in prompt)
            reply = self.tok(self.replies[question]).input_ids + [self.tok.eos_token_id]
            rows.append(torch.tensor(reply))
        width = max(len(r) for r in rows)
        pad = self.tok.eos_token_id
        new = torch.stack([torch.cat([r, torch.full((width - len(r),), pad)]) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def test_run_gsm8k_counts_and_padding(test_set: list[dict]) -> None:
    tok = byte_tokenizer()
    items = test_set[:6]
    gold = [it["answer"].split("####")[-1].strip() for it in items]
    assert int(gold[2]) >= 1000  # so that the comma case below has a comma
    replies = [
        f"Some steps. The final answer is: {gold[0]}",  # correct
        f"So it is {gold[1]}.0 in the end",  # correct via last number, decimal form
        f"The final answer is: ${int(gold[2]):,}.",  # correct with $ and a thousands comma
        "I cannot solve this.",  # unparsable
        "The final answer is: 123456789",  # wrong
        f"{gold[5]} is not it; I think 7777777",  # wrong (last number)
    ]
    model = ScriptedLM(tok, {it["question"]: r for it, r in zip(items, replies, strict=True)})
    res = run_gsm8k(model, tok, limit=6, batch_size=4, decoding="greedy", max_new_tokens=17)
    assert (res["n"], res["correct"], res["unparsable"]) == (6, 3, 1)
    assert res["exact_match"] == pytest.approx(0.5)
    assert [s["output"] for s in res["samples"]] == replies[:5]
    assert res["samples"][3]["pred"] is None
    assert [r["id"] for r in res["records"]] == [it["id"] for it in items]  # one record per question
    assert [r["correct"] for r in res["records"]] == [1, 1, 1, 0, 0, 0]
    assert [r["generation"] for r in res["records"]] == replies and res["records"][3]["pred"] is None

    assert model.prompts == [PROMPT_TEMPLATE.format(question=it["question"]) for it in items]  # raw
    assert len(model.calls) == 2  # batches of 4 and 2
    for call in model.calls:
        assert call["do_sample"] is False and call["max_new_tokens"] == 17
        mask = call["mask"]
        assert bool(mask[:, -1].all())  # every prompt ends at the last column: left padding
        assert bool((mask[:, 1:] >= mask[:, :-1]).all())  # zeros only before ones
    assert bool((model.calls[0]["mask"] == 0).any())  # prompts of different lengths were padded
    assert tok.padding_side == "right"  # restored


def test_run_gsm8k_sampling_settings(test_set: list[dict]) -> None:
    tok = byte_tokenizer()
    model = ScriptedLM(tok, {test_set[0]["question"]: "The final answer is: 18"})
    res = run_gsm8k(model, tok, limit=1, decoding="sample", seed=42)
    call = model.calls[0]
    assert (call["do_sample"], call["temperature"], call["top_k"], call["top_p"]) == (True, 0.1, 40, 0.95)
    assert call["max_new_tokens"] == 256 and call["seed"] == 42
    assert res["correct"] == 1


def test_chat_template_wraps_prompt(test_set: list[dict]) -> None:
    tok = byte_tokenizer()
    model = ScriptedLM(tok, {test_set[0]["question"]: "The final answer is: 18"})
    with pytest.raises(ValueError, match="chat template"):
        run_gsm8k(model, tok, limit=1, chat_template=True)
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}[end]{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    res = run_gsm8k(model, tok, limit=1, decoding="greedy", chat_template=True)
    expected = "[user]" + PROMPT_TEMPLATE.format(question=test_set[0]["question"]) + "[end][assistant]"
    assert model.prompts == [expected]
    assert res["correct"] == 1


def test_bad_arguments() -> None:
    tok = byte_tokenizer()
    model = ScriptedLM(tok, {})
    with pytest.raises(ValueError, match="decoding"):
        run_gsm8k(model, tok, decoding="beam")
    with pytest.raises(ValueError, match="limit"):
        run_gsm8k(model, tok, limit=0)


def test_batched_left_padded_greedy_equals_single_generation() -> None:
    tok = byte_tokenizer()
    torch.manual_seed(0)
    cfg = tiny_llama_config(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(cfg).double().eval()
    prompts = ["Tom has 3 cats.", "A much longer question about 12 apples and 7 pears?", "x"]
    batched = gsm8k.generate_batched(
        model, tok, prompts, batch_size=3, do_sample=False, max_new_tokens=6, num_beams=1
    )
    for prompt, out in zip(prompts, batched, strict=True):
        ids = tok(prompt, return_tensors="pt").input_ids
        single = model.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id)
        assert out == tok.decode(single[0, ids.shape[1] :], skip_special_tokens=True)


def test_answer_nll_matches_per_item_float64_reference(test_set: list[dict]) -> None:
    """The batched, right-padded loss equals a float64 loop over single unpadded items that scores the
    solution tokens ("The final answer is: N" form, then EOS) after the GSM8K prompt."""
    from qwha.data.sft import gsm8k_prompt, gsm8k_target

    tok = byte_tokenizer()
    torch.manual_seed(0)
    cfg = tiny_llama_config(vocab_size=258, pad_token_id=256, eos_token_id=257, bos_token_id=257)
    model = LlamaForCausalLM(cfg).eval()
    items = test_set[:5]
    total, count = 0.0, 0
    per_item: list[tuple[float, int]] = []
    with torch.no_grad():
        model64 = LlamaForCausalLM(cfg).double().eval()
        model64.load_state_dict(model.state_dict())
        for it in items:
            prompt = tok(gsm8k_prompt(it["question"])).input_ids
            target = tok(gsm8k_target(it["answer"]), add_special_tokens=False).input_ids + [257]
            ids = torch.tensor([prompt + target])
            logp = torch.log_softmax(model64(input_ids=ids).logits[0], dim=-1)
            item = -sum(float(logp[pos - 1, ids[0, pos]]) for pos in range(len(prompt), ids.shape[1]))
            per_item.append((item, ids.shape[1] - len(prompt)))
            total += item
            count += ids.shape[1] - len(prompt)
    res = gsm8k.answer_nll(model, tok, limit=5, batch_size=3, max_length=4096)  # batches of 3, 2; padded
    assert (res["n"], res["tokens"]) == (5, count)
    assert res["nll"] == pytest.approx(total / count, rel=1e-5)
    assert res["ppl"] == pytest.approx(float(torch.tensor(total / count).exp()), rel=1e-5)
    assert [r["id"] for r in res["records"]] == [it["id"] for it in items]
    for rec, (item, tokens) in zip(res["records"], per_item, strict=True):  # each item's own sum
        assert rec["tokens"] == tokens and rec["nll"] == pytest.approx(item, rel=1e-5)
    assert "The final answer is: 18" in gsm8k_target(items[0]["answer"])
    with pytest.raises(ValueError, match="eval.limit"):
        gsm8k.answer_nll(model, tok, limit=0)
