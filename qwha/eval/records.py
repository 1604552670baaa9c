"""Per-item evaluation records: one compressed JSON-lines file per suite in the `eval` artifact.

    eval/<key>/records_csqa.jsonl.gz    {"task", "doc_id", "gold", "ll", "acc", "acc_norm", "correct"}
    eval/<key>/records_gsm8k.jsonl.gz   {"id", "nll", "tokens"[, "generation", "pred", "gold", "correct"]}
    eval/<key>/records_heldout.jsonl.gz {"id", "nll", "tokens"}: held-out training-distribution records

They sit beside ``results.json`` (no weights in an eval artifact), are checksummed in its manifest like
every file, and are copied by ``experiments/render.py archive``. The gzip header carries no time stamp
and no file name, so equal records give byte-equal files.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SUITES: tuple[str, ...] = ("csqa", "gsm8k", "heldout")


def records_file(suite: str) -> str:
    """The file name of ``suite``'s records inside an eval artifact."""
    if suite not in SUITES:
        raise ValueError(f"records suite {suite!r}: allowed values are {', '.join(SUITES)}")
    return f"records_{suite}.jsonl.gz"


RECORD_FILES: tuple[str, ...] = tuple(records_file(s) for s in SUITES)


def write_records(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Write ``records`` as gzip-compressed JSON lines (reproducible bytes); returns how many."""
    buf = io.BytesIO()
    n = 0
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
        for rec in records:
            gz.write((json.dumps(rec, separators=(",", ":"), ensure_ascii=False) + "\n").encode())
            n += 1
    Path(path).write_bytes(buf.getvalue())
    return n


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a file written by :func:`write_records`."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def merge_gsm8k(generations: list[dict] | None, losses: list[dict] | None) -> list[dict[str, Any]]:
    """One GSM8K record per test id: its answer loss (``nll``, ``tokens``) and, for the questions that
    were also generated, ``generation``, ``pred``, ``gold`` and ``correct``; sorted by id."""
    by_id: dict[int, dict[str, Any]] = {}
    for rec in losses or []:
        by_id.setdefault(int(rec["id"]), {"id": int(rec["id"])}).update(nll=rec["nll"], tokens=rec["tokens"])
    for rec in generations or []:
        by_id.setdefault(int(rec["id"]), {"id": int(rec["id"])}).update(
            {k: rec[k] for k in ("generation", "pred", "gold", "correct")}
        )
    return [by_id[i] for i in sorted(by_id)]
