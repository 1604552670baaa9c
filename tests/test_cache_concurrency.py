"""Several processes on one cache: one build per key, crashed holders, readers of other keys.

The processes are real (``subprocess``) and run a stub stage whose build sleeps about a second, through
``StageCache.get_or_build`` exactly as the pipeline calls it. Every build appends its pid to a log file,
so "exactly one build" is counted outside the cache, and every build writes random bytes, so the artifact
that every process ends up reading tells which build was kept.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from qwha.cache import MANIFEST, BuildLock, StageCache, file_sha256
from tests.conftest import ROOT

STUB = textwrap.dedent(
    """
    import json, logging, os, sys, time
    sys.path.insert(0, {root!r})
    import qwha.cache
    from qwha.cache import StageCache, file_sha256

    # The manifest's machine record imports torch (seconds, holding the GIL): not what these tests time.
    qwha.cache.machine_info = lambda: {{"stub": True}}

    root, stage, key, builds, sleep_s, mode, stale_s = sys.argv[1:8]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")

    def build(out):
        with open(builds, "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        print("building", flush=True)
        gate = os.environ.get("STUB_GATE")
        if gate:  # build until the test opens the gate (it waits for the others to be waiting first)
            while not os.path.exists(gate):
                time.sleep(0.05)
        else:
            time.sleep(float(sleep_s))
        (out / "weights.bin").write_bytes(os.urandom(4096))
        return {{"builder": os.getpid()}}

    cache = StageCache(root, lock=mode, stale_s=float(stale_s))
    art, hit = cache.get_or_build(stage, key, build, config={{"k": key}}, upstream={{}})
    sha = file_sha256(art.path / "weights.bin")
    print(json.dumps({{"hit": hit, "pid": os.getpid(), "sha": sha}}), flush=True)
    """
).format(root=str(ROOT))


def _start(
    tmp_path: Path, cache_root: Path, key: str, *, sleep_s=1.0, mode="flock", stale_s=600.0, gate=None
):
    script = tmp_path / "stub_stage.py"
    script.write_text(STUB)
    args = [str(cache_root), "quantize", key, str(tmp_path / f"builds-{key}.log"), str(sleep_s), mode]
    return subprocess.Popen(
        [sys.executable, str(script), *args, str(stale_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "STUB_GATE": str(gate or "")},
    )


def _builds(tmp_path: Path, key: str) -> list[int]:
    path = tmp_path / f"builds-{key}.log"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _result(proc: subprocess.Popen) -> tuple[dict, str]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def _wait_line(stream, needle: str, timeout_s: float = 60.0) -> str:
    """Read ``stream`` until a line contains ``needle`` (the process's progress, not a timing)."""
    box: list[str] = []

    def reader():
        for line in stream:
            if needle in line:
                box.append(line)
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(timeout_s)
    assert box, f"no line with {needle!r}"
    return box[0]


@pytest.mark.parametrize(("mode", "stale_s"), [("flock", 600.0), ("excl", 1.0)])
def test_concurrent_runs_of_one_key_build_once(tmp_path, cache_root, mode, stale_s):
    """N = 4 processes on one empty key: one build, all succeed on the same bytes, one artifact.

    The holder builds until all three others have logged that they wait for it. With ``excl`` the lock's
    staleness limit (1 s) is shorter than that: only the holder's heartbeat keeps the others waiting.
    """
    gate = tmp_path / "gate"
    holder = _start(tmp_path, cache_root, "k1", mode=mode, stale_s=stale_s, gate=gate)
    assert holder.stdout.readline().strip() == "building"  # the holder has the lock
    others = [_start(tmp_path, cache_root, "k1", mode=mode, stale_s=stale_s) for _ in range(3)]
    for p in others:  # each waiter names the holder
        line = _wait_line(p.stderr, "is being built by")
        assert f"pid {holder.pid} on " in line, line
    time.sleep(2 * stale_s if mode == "excl" else 0)  # several staleness limits pass while they wait
    gate.touch()
    results = [_result(p) for p in [holder, *others]]
    assert _builds(tmp_path, "k1") == [holder.pid]
    assert [r["hit"] for r, _ in results] == [False, True, True, True]
    assert len({r["sha"] for r, _ in results}) == 1
    for _, err in results[1:]:
        assert "is being built by" not in err  # logged once only
        assert "built by the process waited for" in err
    names = sorted(p.name for p in (cache_root / "quantize").iterdir())
    assert names == ["k1"]  # no second artifact, no temporary folder, the lock file removed


def test_same_key_in_threads_of_one_process_builds_once(cache_root):
    """Two StageCache objects in two threads (flock locks are per open file, so this serialises too)."""
    calls: list[int] = []

    def build(out: Path):
        calls.append(1)
        time.sleep(0.3)
        (out / "w").write_text("x")
        return {}

    hits: list[bool] = []
    threads = [
        threading.Thread(
            target=lambda: hits.append(
                StageCache(cache_root).get_or_build("calib", "kt", build, config={}, upstream={})[1]
            )
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(hits) == [False, True, True]


@pytest.mark.parametrize("mode", ["flock", "excl"])
def test_killed_holder_does_not_block_the_next_run(tmp_path, cache_root, mode):
    """SIGKILL the builder while another process waits on its lock: the waiter builds, and so does a
    run started afterwards would (the lock of a dead process is free)."""
    holder = _start(tmp_path, cache_root, "k2", sleep_s=60, mode=mode)
    assert holder.stdout.readline().strip() == "building"
    waiter = _start(tmp_path, cache_root, "k2", sleep_s=0.2, mode=mode)
    _wait_line(waiter.stderr, "is being built by")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    res, _ = _result(waiter)
    assert res["hit"] is False
    assert _builds(tmp_path, "k2") == [holder.pid, waiter.pid]
    art = StageCache(cache_root).lookup("quantize", "k2")
    assert art is not None and art.metrics == {"builder": waiter.pid}
    # A lone run after a killed holder (its lock file left behind) builds straight away.
    holder = _start(tmp_path, cache_root, "k3", sleep_s=60, mode=mode)
    assert holder.stdout.readline().strip() == "building"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    res, err = _result(_start(tmp_path, cache_root, "k3", sleep_s=0.1, mode=mode))
    assert res["hit"] is False and len(_builds(tmp_path, "k3")) == 2


def test_reader_is_unaffected_by_another_keys_publish(tmp_path, cache_root):
    """A process reads and verifies artifact A in a loop while other processes build and publish B."""
    cache = StageCache(cache_root)
    a, _ = cache.get_or_build(
        "quantize", "ka", lambda out: (out / "w.bin").write_bytes(b"a" * 8192) and {}, config={}, upstream={}
    )
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys
                from pathlib import Path
                sys.path.insert(0, {str(ROOT)!r})
                from qwha.cache import StageCache
                cache = StageCache({str(cache_root)!r})
                print("reading", flush=True)
                n, stop = 0, Path({str(tmp_path / "stop")!r})
                while not stop.exists() or n == 0:
                    art = cache.lookup("quantize", "ka", discard=False)
                    assert art is not None, "artifact ka vanished or failed its checks"
                    assert (art.path / "w.bin").read_bytes() == b"a" * 8192
                    n += 1
                print(n, flush=True)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert reader.stdout.readline().strip() == "reading"
    writers = [_start(tmp_path, cache_root, "kb", sleep_s=0.5) for _ in range(3)]
    for w in writers:
        _result(w)
    (tmp_path / "stop").touch()  # the reader stops once every writer has published
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    assert int(out.strip()) > 0
    assert cache.lookup("quantize", "ka") is not None
    assert file_sha256(a.path / "w.bin") == file_sha256(cache.path("quantize", "ka") / "w.bin")
    assert len(_builds(tmp_path, "kb")) == 1


# ------------------------------------------------------------------------------- first writer wins
def test_publish_keeps_an_intact_artifact_that_appeared_meanwhile(cache_root, caplog):
    """Two builders that do not share a lock (another cache root view, or a file system without
    locking): the second to publish keeps the first one's artifact and discards its own."""
    cache = StageCache(cache_root)
    first: dict = {}

    def slow(out: Path):
        (out / "w.bin").write_bytes(b"second")
        # while this build runs, another builder publishes the same key
        first["art"] = cache.build(
            "quantize", "kw", lambda o: (o / "w.bin").write_bytes(b"first") and {}, config={}, upstream={}
        )
        first["inode"] = os.stat(first["art"].path / "w.bin").st_ino
        return {}

    with caplog.at_level(logging.INFO, logger="qwha.cache"):
        art = cache.build("quantize", "kw", slow, config={}, upstream={})
    assert (art.path / "w.bin").read_bytes() == b"first"
    assert os.stat(art.path / "w.bin").st_ino == first["inode"]  # the same files, never replaced
    assert "published by another process meanwhile; keeping it" in caplog.text
    assert sorted(p.name for p in (cache_root / "quantize").iterdir()) == ["kw"]


def test_publish_replaces_a_damaged_artifact_that_appeared_meanwhile(cache_root):
    cache = StageCache(cache_root)

    def slow(out: Path):
        (out / "w.bin").write_bytes(b"good")
        damaged = cache.path("quantize", "kd")
        damaged.mkdir(parents=True)
        (damaged / "w.bin").write_bytes(b"half")  # no manifest: not an artifact
        return {}

    art = cache.build("quantize", "kd", slow, config={}, upstream={})
    assert (art.path / "w.bin").read_bytes() == b"good" and (art.path / MANIFEST).is_file()
    assert cache.lookup("quantize", "kd") is not None


# ------------------------------------------------------------------------------- the excl fallback
def test_excl_lock_of_a_remote_holder_is_kept_while_it_beats_and_broken_when_it_stops(tmp_path, caplog):
    """A holder on another node (same lock file, other host name): its heartbeat keeps the lock; once the
    file is older than ``stale_s`` the waiter takes it over and logs why."""
    path = tmp_path / ".lock-kx"
    holder = BuildLock(path, "excl", stale_s=0.4)
    holder.acquire()
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "host": "node-b"}))  # judged by its heartbeat alone
    waiter = BuildLock(path, "excl", stale_s=0.4)
    got = threading.Event()

    def take():
        waiter.acquire()
        got.set()

    t = threading.Thread(target=take, daemon=True)
    t.start()
    # Waiting spans several staleness limits while the heartbeat runs: the lock is not taken.
    assert not got.wait(1.5)
    assert waiter.waited
    holder._stop.set()  # the remote holder dies: no more heartbeats (its file stays behind)
    holder._beat.join()
    with caplog.at_level(logging.WARNING, logger="qwha.cache"):
        assert got.wait(30)
    t.join()
    assert "removing the stale lock" in caplog.text and "node-b" in caplog.text
    assert json.loads(path.read_text())["token"] == waiter._record["token"]
    waiter.release()
    assert not path.exists()


def test_excl_lock_of_a_dead_local_process_is_broken_at_once(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    path = tmp_path / ".lock-kd"
    path.write_text(json.dumps({"pid": proc.pid, "host": os.uname().nodename, "token": "old"}))
    import socket

    if socket.gethostname() != os.uname().nodename:  # pragma: no cover - exotic hosts
        path.write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname(), "token": "old"}))
    lock = BuildLock(path, "excl", stale_s=3600)
    lock.acquire()  # the pid is gone: no waiting for the hour-long limit
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()


def test_flock_unsupported_falls_back_to_excl(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    lock = BuildLock(tmp_path / ".lock-kf", "flock")
    with caplog.at_level(logging.WARNING, logger="qwha.cache"), lock:
        assert lock.mode == "excl"
        assert json.loads((tmp_path / ".lock-kf").read_text())["pid"] == os.getpid()
    assert "using the lock-file fallback" in caplog.text
    assert not (tmp_path / ".lock-kf").exists()


def test_lock_mode_is_selected_by_environment(monkeypatch, cache_root):
    from qwha.cache import CacheError

    monkeypatch.setenv("QWHA_CACHE_LOCK", "excl")
    assert StageCache(cache_root).lock_mode == "excl"
    monkeypatch.setenv("QWHA_CACHE_LOCK", "posix")
    with pytest.raises(
        CacheError, match="QWHA_CACHE_LOCK='posix' is unknown: allowed values are flock, excl"
    ):
        StageCache(cache_root)


def test_bad_lock_mode_on_the_command_line_is_one_line(tmp_path):
    from tests.conftest import run_cli

    res = run_cli("dry_run=true", env={"QWHA_CACHE_PATH": str(tmp_path / "c"), "QWHA_CACHE_LOCK": "nfs"})
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines == ["qwha: error: QWHA_CACHE_LOCK='nfs' is unknown: allowed values are flock, excl"]
