"""The adapter benchmark runs end to end (a tiny shape; no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "bench_adapter.py"


def test_bench_adapter_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_adapter", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    assert (
        bench.main(
            [
                "--shapes",
                "48x64",
                "--tokens",
                "8",
                "--rank",
                "2",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "| 48x64 | 8 |" in text
    rows = {r["row"]: r for r in json.loads(out.read_text())["layers"]}
    assert set(rows) == set(bench.ROWS)
    budget = 2 * (64 + 48)
    assert all(rows[r]["params"] == budget for r in bench.ROWS if r != "base")
