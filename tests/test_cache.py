"""The stage-cache contract (docs/design.md): keys, atomic publication, checksums, reuse across stages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from qwha import pipeline
from qwha.cache import MANIFEST, StageCache, config_key
from qwha.pipeline import stage_key
from qwha.stages import ALL_STAGES, get_stage
from tests.conftest import ROOT, compose


def test_key_ignores_dict_order_and_depends_on_values():
    a = {"bits": 2, "group_size": 64, "nested": {"x": 1, "y": [1, 2]}}
    b = {"nested": {"y": [1, 2], "x": 1}, "group_size": 64, "bits": 2}
    assert config_key("quantize", a, {"calib": "k1"}) == config_key("quantize", b, {"calib": "k1"})
    assert config_key("quantize", a, {"calib": "k1"}) != config_key("quantize", a, {"calib": "k2"})
    assert config_key("quantize", a, {}) != config_key("quantize", {**a, "bits": 3}, {})
    assert config_key("quantize", a, {}) != config_key("init", a, {})


def test_key_independent_of_yaml_key_order(tmp_path: Path):
    one = tmp_path / "one.yaml"
    two = tmp_path / "two.yaml"
    one.write_text("method: gptq\nbits: 2\ngroup_size: 64\ndamp: 0.01\n")
    two.write_text("damp: 0.01\ngroup_size: 64\nbits: 2\nmethod: gptq\n")
    c1 = OmegaConf.to_container(OmegaConf.load(one))
    c2 = OmegaConf.to_container(OmegaConf.load(two))
    assert config_key("quantize", c1, {}) == config_key("quantize", c2, {})


def _keys(cfg) -> dict[str, str]:
    keys: dict[str, str] = {}
    for name in ALL_STAGES:
        ups = get_stage(name).upstream(cfg)
        keys[name] = stage_key(name, cfg, {u: keys[u] for u in ups})[0]
    return keys


def test_keys_independent_of_cache_root_device_and_logging():
    base = _keys(compose())
    other = _keys(
        compose(
            "cache_dir=/somewhere/else",
            "device=cpu",
            "train.wandb.mode=disabled",
            "train.save_every=7",
            "force=true",
        )
    )
    assert base == other


def test_finetune_key_change_keeps_upstream_keys():
    base = _keys(compose())
    lr = _keys(compose("train.lr=0.123"))
    assert {s: lr[s] == base[s] for s in ALL_STAGES} == {
        "base": True,
        "calib": True,
        "quantize": True,
        "init": True,
        "finetune": False,
        "eval": False,
        "export": False,  # exports the tuned adapter
    }
    bits = _keys(compose("bits=3"))
    assert {s: bits[s] == base[s] for s in ALL_STAGES} == {
        "base": True,
        "calib": True,
        "quantize": False,
        "init": False,
        "finetune": False,
        "eval": False,
        "export": False,
    }


class _Recorder:
    """Replaces every stage's `run` with one that writes a small file and records the call."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in ALL_STAGES:
            mod = get_stage(name)
            monkeypatch.setattr(mod, "run", self._make(name))

    def _make(self, name):
        def run(cfg, out: Path, inputs: dict, **kwargs) -> dict:
            self.calls.append(name)
            (out / "payload.json").write_text(json.dumps({"stage": name, "inputs": sorted(inputs)}))
            return {"value": len(self.calls)}

        return run


def test_pipeline_reuses_upstream_when_finetune_key_changes(monkeypatch, cache_root):
    rec = _Recorder(monkeypatch)
    cache = StageCache(cache_root)
    pipeline.run_stage(compose("stage=all"), cache)
    assert rec.calls == ["base", "calib", "quantize", "init", "finetune", "eval"]
    rec.calls.clear()
    done = pipeline.run_stage(compose("stage=all", "train.lr=0.5"), cache)
    assert rec.calls == ["finetune", "eval"]  # nothing upstream recomputed
    assert [n for n, (_, hit) in done.items() if hit] == ["base", "calib", "quantize", "init"]
    rec.calls.clear()
    pipeline.run_stage(compose("stage=all", "bits=4"), cache)
    assert rec.calls == ["quantize", "init", "finetune", "eval"]
    rec.calls.clear()
    pipeline.run_stage(compose("stage=all", "bits=4"), cache)
    assert rec.calls == []
    pipeline.run_stage(compose("stage=init", "bits=4", "force=true"), cache)
    assert rec.calls == ["init"]


def test_stage_all_resumes_from_first_miss(monkeypatch, cache_root):
    rec = _Recorder(monkeypatch)
    cache = StageCache(cache_root)
    pipeline.run_stage(compose("stage=init"), cache)
    assert rec.calls == ["base", "calib", "quantize", "init"]
    rec.calls.clear()
    pipeline.run_stage(compose("stage=all"), cache)
    assert rec.calls == ["finetune", "eval"]


def test_failed_stage_leaves_nothing_and_is_redone(cache_root):
    cache = StageCache(cache_root)

    def boom(out: Path):
        (out / "half_written.bin").write_bytes(b"x" * 100)
        raise KeyboardInterrupt  # a Ctrl-C mid-stage

    with pytest.raises(KeyboardInterrupt):
        cache.build("quantize", "k0", boom, config={}, upstream={})
    assert cache.lookup("quantize", "k0") is None
    assert list((cache_root / "quantize").iterdir()) == []
    art, hit = cache.get_or_build(
        "quantize", "k0", lambda out: (out / "w").write_text("ok") and {}, config={}, upstream={}
    )
    assert not hit and (art.path / "w").read_text() == "ok"


def test_killed_process_leaves_no_complete_artifact(cache_root):
    """SIGKILL during a stage (no cleanup code runs): the next lookup is a miss and redoes it."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from qwha.cache import StageCache
        def slow(out):
            (out / "weights.bin").write_bytes(b"0" * 4096)
            print("started", flush=True)
            time.sleep(60)
        StageCache({str(cache_root)!r}).build("init", "kk", slow, config={{}}, upstream={{}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    cache = StageCache(cache_root)
    assert cache.lookup("init", "kk") is None
    assert not (cache_root / "init" / "kk").exists()
    leftovers = [p.name for p in (cache_root / "init").iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-kk-")
    # another key's build leaves it (it is the sweep's, after a day) ...
    cache.get_or_build("init", "other", lambda out: {}, config={}, upstream={})
    assert (cache_root / "init" / leftovers[0]).exists()
    old = time.time() - 2 * 86400
    os.utime(cache_root / "init" / leftovers[0], (old, old))
    assert cache.sweep() == 1
    # ... and the next build of its own key removes it at once (no live process writes there: it holds
    # the key's lock)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert len(list((cache_root / "init").glob(".tmp-kk-*"))) == 1
    art, hit = cache.get_or_build("init", "kk", lambda out: {}, config={}, upstream={})
    assert not hit and (art.path / MANIFEST).is_file()
    assert not list((cache_root / "init").glob(".tmp-*"))


def test_corrupted_artifact_is_detected_and_recomputed(cache_root, caplog):
    cache = StageCache(cache_root)
    calls = []

    def build(out: Path):
        calls.append(1)
        (out / "model.safetensors").write_bytes(b"good weights")
        return {"ppl": 12.5}

    art, _ = cache.get_or_build("quantize", "kq", build, config={"bits": 2}, upstream={})
    info = json.loads((art.path / MANIFEST).read_text())
    assert info["status"] == "complete" and info["metrics"] == {"ppl": 12.5}
    assert set(info["files"]) == {"model.safetensors"}
    (art.path / "model.safetensors").write_bytes(b"flipped bits")
    with caplog.at_level("WARNING", logger="qwha.cache"):
        art2, hit = cache.get_or_build("quantize", "kq", build, config={"bits": 2}, upstream={})
    assert not hit and len(calls) == 2
    assert "failed its checksums" in caplog.text
    assert (art2.path / "model.safetensors").read_bytes() == b"good weights"


def test_hit_is_logged_with_path(cache_root, caplog):
    cache = StageCache(cache_root)
    cache.get_or_build("eval", "ke", lambda out: {}, config={}, upstream={})
    with caplog.at_level("INFO", logger="qwha.cache"):
        art, hit = cache.get_or_build("eval", "ke", lambda out: {}, config={}, upstream={})
    assert hit and str(art.path) in caplog.text


def test_manifest_records_the_machine(cache_root):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        art, _ = StageCache(cache_root).get_or_build("eval", "km", lambda out: {}, config={}, upstream={})
    finally:
        torch.set_num_threads(threads)
    machine = json.loads((art.path / MANIFEST).read_text())["machine"]
    assert machine["torch_threads"] == 1
    assert machine["cpu_count"] == os.cpu_count()
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["gpu"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        if names:
            assert machine["cpu"] == names[0]
