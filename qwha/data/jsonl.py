"""Custom fine-tuning data from a JSON Lines file (``data=jsonl data.path=...``).

One JSON object per line. ``data.prompt_field`` and ``data.response_field`` name the two strings of a
record (``data.input_field``, optional, is appended to the prompt after a blank line, as Alpaca's input
block). The prompt is written either as is (``data.chat_template=false``) or through the tokenizer's chat
template as one user turn with the assistant's turn opened (``data.chat_template=true``); the response is
the supervised target, followed by EOS (``qwha.data.sft.tokenize_sft``).

Train/validation split: a seeded random ``data.validation`` fraction of the records (at least one when
the fraction is positive and there are two or more records) is held out; the finetune stage trains on the
rest and the eval stage reports the teacher-forced loss of the responses on the held-out records
(:func:`response_nll`). ``data.validation_path`` names a second file to use as the validation set instead.

Every problem with the file (missing, empty, an unreadable line, a missing or non-string field) is a
``ConfigError``: one line naming the key, raised by :func:`check` before any model is loaded.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import torch

from qwha.config import ConfigError

SPLITS = ("train", "validation")


def _read(path: str | Path, key: str, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """The records of a JSON Lines file, every one checked for ``fields`` (strings); ConfigError otherwise."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise ConfigError(f"{key}={str(path)!r}: no such file (a JSON Lines file, one object per line)")
    rows = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{key}={str(path)!r} line {lineno} is not JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{key}={str(path)!r} line {lineno} is not a JSON object")
            for field in fields:
                if not isinstance(row.get(field), str):
                    found = ", ".join(sorted(row)) or "none"
                    what = "has no field" if field not in row else "has a non-string field"
                    raise ConfigError(
                        f"{key}={str(path)!r} line {lineno} {what} {field!r} (fields found: {found}); "
                        "set data.prompt_field / data.response_field / data.input_field"
                    )
            rows.append(row)
    if not rows:
        raise ConfigError(f"{key}={str(path)!r} holds no records")
    return rows


def _fields(d) -> tuple[str, ...]:
    extra = (str(d.input_field),) if d.get("input_field") else ()
    return (str(d.prompt_field), str(d.response_field), *extra)


def check(d) -> None:
    """Validate a ``data=jsonl`` node (``conf/data/jsonl.yaml``): file(s), fields and split size.

    Cheap: reads the file(s) once, loads no model. Raises ``ConfigError`` with one line.
    """
    from omegaconf import OmegaConf

    if OmegaConf.is_missing(d, "path") or d.get("path") in (None, ""):
        raise ConfigError("data.path is required with data=jsonl: a JSON Lines file (data.path=my.jsonl)")
    frac = d.get("validation", 0.0)
    if not isinstance(frac, int | float) or not 0 <= frac < 1:
        raise ConfigError(f"data.validation={frac!r} must be a fraction in [0, 1)")
    if not isinstance(d.get("chat_template", False), bool):
        raise ConfigError(f"data.chat_template={d.get('chat_template')!r}: allowed values are true, false")
    _read(d.path, "data.path", _fields(d))
    if d.get("validation_path"):
        _read(d.validation_path, "data.validation_path", _fields(d))


def fingerprint(d) -> str:
    """SHA-256 of the data file(s) (``data.path``, then ``data.validation_path`` if set): keyed with the
    config, so an edited file at the same path is a new fine-tuning run, not a stale cache hit."""
    import hashlib

    h = hashlib.sha256()
    for key in ("path", "validation_path"):
        if d.get(key):
            h.update(Path(str(d[key])).expanduser().read_bytes())
            h.update(b"\0")
    return h.hexdigest()


def n_validation(n: int, fraction: float) -> int:
    """How many of ``n`` records are held out: ``ceil(fraction · n)``, at least 1 when fraction > 0 and
    n >= 2, never all of them."""
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, math.ceil(fraction * n)))


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) record indices: a seeded random subset held out, both lists in file order."""
    k = n_validation(n, fraction)
    held = set(random.Random(seed).sample(range(n), k))
    return [i for i in range(n) if i not in held], sorted(held)


def format_prompt(prompt: str, extra: str | None, tokenizer, chat_template: bool) -> str:
    """The prompt text the model sees: ``prompt`` (+ blank line + ``extra``), through the chat template
    as one user turn with the assistant turn opened when ``chat_template``."""
    text = prompt.strip() + (f"\n\n{extra.strip()}" if extra and extra.strip() else "")
    if not chat_template:
        return text if text.endswith("\n") else text + "\n"
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.chat_template=true but the tokenizer has no chat template: set it to false")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def load_records(d, split: str, tokenizer, *, seed: int) -> list[dict[str, str]]:
    """``{"prompt", "target"}`` records of one split of a ``data=jsonl`` node (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: allowed values are {', '.join(SPLITS)}")
    check(d)
    fields = _fields(d)
    rows = _read(d.path, "data.path", fields)
    if d.get("validation_path"):
        chosen = rows if split == "train" else _read(d.validation_path, "data.validation_path", fields)
    else:
        train, val = split_indices(len(rows), float(d.get("validation", 0.0)), seed)
        chosen = [rows[i] for i in (train if split == "train" else val)]
    extra = str(d.input_field) if d.get("input_field") else None
    chat = bool(d.get("chat_template", False))
    return [
        {
            "prompt": format_prompt(r[str(d.prompt_field)], r.get(extra) if extra else None, tokenizer, chat),
            "target": r[str(d.response_field)].strip(),
        }
        for r in chosen
    ]


def tokenized(d, tokenizer, *, seed: int, split: str = "train") -> list[dict[str, list[int]]]:
    """Token ids and labels of one split (``qwha.data.sft.tokenize_sft`` with ``data.max_length`` and
    ``data.mask_prompt``)."""
    from qwha.data.sft import tokenize_sft

    recs = load_records(d, split, tokenizer, seed=seed)
    return tokenize_sft(recs, tokenizer, max_length=int(d.max_length), mask_prompt=bool(d.mask_prompt))


@torch.no_grad()
def response_nll(model, tokenizer, data: list[dict[str, list[int]]], *, batch_size: int = 8) -> dict:
    """Teacher-forced loss of the supervised tokens of ``data`` (``tokenized(..., split="validation")``).

    Returns ``{"nll": mean nats per supervised token, "ppl": exp(nll), "tokens": count, "n": records}``;
    every supervised token counts once, whatever the batching (a sum over tokens, then one division).
    """
    from qwha.data.sft import IGNORE_INDEX, make_collator

    if not data:
        return {"nll": float("nan"), "ppl": float("nan"), "tokens": 0, "n": 0}
    collate = make_collator(tokenizer)
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(data), batch_size):
            batch = {k: v.to(dev) for k, v in collate(data[i : i + batch_size]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]  # position t predicts token t+1
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            keep = labels != IGNORE_INDEX
            picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            total += float(-(picked * keep).sum())
            count += int(keep.sum())
    finally:
        model.train(was_training)
    nll = total / max(count, 1)
    return {"nll": nll, "ppl": math.exp(nll), "tokens": count, "n": len(data)}


__all__ = [
    "check",
    "fingerprint",
    "format_prompt",
    "load_records",
    "n_validation",
    "response_nll",
    "split_indices",
    "tokenized",
]
