"""The table renderer reads what the stages write: init artifacts found through their manifests."""

from __future__ import annotations

import json

from experiments import render
from qwha.cache import StageCache
from qwha.pipeline import stage_key
from qwha.stages import get_stage
from tests.conftest import compose


def _fake_pipeline(cache: StageCache, overrides: list[str], summary: dict) -> None:
    """Artifacts base -> calib -> quantize -> init with the real keys and manifests; fake contents."""
    cfg = compose(*overrides)
    keys: dict[str, str] = {}
    for name in ("base", "calib", "quantize", "init"):
        ups = {u: keys[u] for u in get_stage(name).upstream(cfg)}
        key, slice_ = stage_key(name, cfg, ups)

        def fn(out, name=name):
            if name == "init":
                (out / "report.json").write_text(json.dumps({"summary": summary}))
            return {}

        if cache.lookup(name, key) is None:
            cache.build(name, key, fn, config=slice_, upstream=ups)
        keys[name] = key


def test_table2_rows_from_cached_init_artifacts(cache_root):
    cache = StageCache(cache_root)
    _fake_pipeline(cache, ["init=qwha", "bits=2"], {"layer_error_relative": 0.41, "heldout_ppl": 110.0})
    _fake_pipeline(
        cache,
        ["init=qwha", "init.refine=false", "bits=2"],
        {"layer_error_relative": 0.77, "heldout_ppl": 900.0},
    )
    _fake_pipeline(cache, ["init=qwha_reference", "bits=4"], {"layer_error_relative": 0.5})
    _fake_pipeline(cache, ["init=magnitude", "bits=4"], {"layer_error_relative": 0.45})
    _fake_pipeline(cache, ["init=magnitude", "bits=4", "model=llama3.2-3b"], {"layer_error_relative": 0.1})
    runs = render.init_runs(cache_root, "smollm2-135m")
    info = sorted((r["run"]["bits"], r["run"]["init"], r["run"]["refine"]) for r in runs)
    assert info == [
        (2, "qwha", False),
        (2, "qwha", True),
        (4, "magnitude", True),
        (4, "qwha_reference", True),
    ]
    text = render.table2(cache_root, "smollm2-135m")
    assert "| 2 | qwha | True | 0.4100 |" in text and "| 110.0 | 3.86 |" in text  # paper: AdaAlloc 3.86
    assert "| 2 | qwha | False | 0.7700 |" in text and "| 7.06 |" in text  # paper: no refinement 7.06
    assert "4 cached runs" in text


def test_fig_rank_series_and_png_and_table2_keeps_r64(cache_root, tmp_path):
    cache = StageCache(cache_root)
    errors = {("qwha", 8): 0.8, ("qwha", 64): 0.41, ("cloq", 8): 0.9, ("cloq", 64): 0.6}
    for (method, r), err in errors.items():
        _fake_pipeline(cache, [f"method={method}", f"rank={r}", "bits=2"], {"layer_error_relative": err})
    _fake_pipeline(cache, ["init=magnitude", "rank=8", "bits=2"], {"layer_error_relative": 0.7})
    text = render.fig_rank(cache_root, "smollm2-135m", out=tmp_path)
    for (method, r), err in errors.items():
        assert f"| 2 | {method} | {r} | {err:.4f} |" in text
    assert "magnitude" not in text and "4 cached runs" in text
    png = tmp_path / "fig_rank_smollm2-135m.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = render.table2(cache_root, "smollm2-135m")
    assert "| 2 | qwha | True | 0.4100 |" in table  # r = 64 only: the r = 8 runs stay out of Table 2
    assert "0.8000" not in table and "0.7000" not in table
