"""Content-addressed stage cache.

An artifact lives in ``<root>/<stage>/<key>/``; ``key`` hashes exactly the configuration that affects
the stage plus the keys of the artifacts it consumes, so it is independent of the machine, the cache
root and the order of keys in YAML. The contract (docs/design.md):

- A stage builds into a private temporary folder beside the final one. Its ``manifest.json`` (stage,
  key, config slice, upstream keys and the :func:`build_id` of each upstream artifact it read,
  versions, machine, git commit, wall time, peak memory, file checksums, status) is written last, by an
  atomic rename, and then the whole folder is renamed into place. A run killed at any point leaves at
  most a ``.tmp-*`` folder, which is never read and is swept later (:meth:`StageCache.sweep`).
- On reuse every file is checked against the manifest's SHA-256. A mismatch is a *miss*: it is
  reported, the damaged artifact is moved aside, and the stage is recomputed (never used silently).
- One build per key: a process that misses takes the lock of (stage, key) (:class:`BuildLock`, a file
  ``<root>/<stage>/.lock-<key>`` beside the artifact) before building; a process that finds it taken
  logs the holder, waits, and then reuses what the holder published. Publishing is first-writer-wins: a
  complete, intact artifact already in place is kept and the newer build discarded (only ``force=true``
  replaces one, and then atomically, restoring the old one if the rename fails).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger("qwha.cache")

MANIFEST = "manifest.json"
KEY_LENGTH = 16
TRACKED_PACKAGES = ("qwha", "torch", "transformers", "gptqmodel", "peft", "lm_eval", "datasets", "triton")


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and fixed separators: equal configs give equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def config_key(stage: str, config: Mapping[str, Any], upstream: Mapping[str, str]) -> str:
    """Stable hash of (stage, the config slice that matters, the upstream artifact keys)."""
    payload = {"stage": stage, "config": config, "upstream": dict(upstream)}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:KEY_LENGTH]


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checksums(folder: Path) -> dict[str, str]:
    """SHA-256 of every file below ``folder`` except the manifest, by relative POSIX path."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(folder).as_posix()] = file_sha256(p)
    return out


def build_id(manifest: Mapping[str, Any]) -> str:
    """Content fingerprint of one build of an artifact: a hash of its files' SHA-256 sums (from its
    manifest). Two builds of one key share it only when every file is byte-identical, which a quantizer
    run on another CPU kernel set or thread count is not (experiments/results/quantize.md)."""
    return hashlib.sha256(canonical_json(manifest.get("files", {})).encode()).hexdigest()[:KEY_LENGTH]


def peak_rss_mb() -> float:
    """Peak resident memory of this process (and waited-for children) in MiB."""
    import resource

    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(self_kb, child_kb) / 1024.0


def _versions() -> dict[str, str]:
    out = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return out


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What ran the stage: CPU model, the kernel set torch dispatches to, threads and GPU.

    The cache key leaves the machine out on purpose (an artifact is valid anywhere), but float
    results differ in their last bits between kernel sets and thread counts, and at 2 bits GPTQ turns
    such differences into different roundings; this record tells two builds of one key apart.
    """
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_label(machine: Mapping[str, Any] | None) -> str:
    """A ``machine`` record (:func:`machine_info`) in a few words: the GPU, else
    ``CPU <kernel set> x<threads>``."""
    if not machine:
        return "–"
    if machine.get("gpu"):
        return str(machine["gpu"])
    return f"CPU {machine.get('cpu_capability', '?')} x{machine.get('torch_threads', '?')}"


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        res = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return res.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class CacheError(RuntimeError):
    """A problem with the cache root itself (not writable, ...)."""


@dataclass(frozen=True)
class Artifact:
    stage: str
    key: str
    path: Path

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / MANIFEST).read_text())

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})


# ----------------------------------------------------------------------------------------- build locks
LOCK_ENV = "QWHA_CACHE_LOCK"  # flock (default) | excl
STALE_ENV = "QWHA_CACHE_LOCK_STALE_S"  # excl mode: seconds without a heartbeat before a lock is stale
LOCK_MODES = ("flock", "excl")
DEFAULT_STALE_S = 600.0
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class LockUnsupported(OSError):
    """``flock`` is refused by this file system (NFS without a lock manager, Lustre without -o flock)."""


def _holder_record() -> dict[str, Any]:
    """Who holds a lock: written into the lock file for the processes that wait on it."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "token": uuid.uuid4().hex,
    }


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # gone, or being written
    return info if isinstance(info, dict) else None


def _describe(info: Mapping[str, Any] | None) -> str:
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on {info.get('host')} (since {info.get('started')})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class BuildLock:
    """The exclusive lock of one (stage, key) build: a context manager over the file ``path``.

    ``mode="flock"`` (default): ``fcntl.flock`` on the lock file. The kernel drops the lock when its holder
    exits, however it exits (SIGKILL, OOM killer, node reboot for local disks), so a crashed holder never
    blocks the next run. ``mode="excl"`` (for file systems whose ``flock`` is missing or node-local: NFS
    mounted ``nolock``, Lustre without ``-o flock``): the lock file is created with ``O_CREAT|O_EXCL``
    (atomic on NFSv3+ and Lustre), and its holder touches it every ``stale_s / 10`` seconds from a
    background thread. A waiter takes over a lock whose holder is a dead process on its own host, or whose
    file has not been touched for ``stale_s`` seconds (a holder on another node that died; clocks of the
    nodes must agree to well within ``stale_s``).

    Either way the holder writes ``{pid, host, started}`` into the file, and a waiter logs it once.
    """

    def __init__(self, path: Path, mode: str = "flock", *, what: str = "", stale_s: float = DEFAULT_STALE_S):
        if mode not in LOCK_MODES:
            raise CacheError(f"{LOCK_ENV}={mode!r} is unknown: allowed values are {', '.join(LOCK_MODES)}")
        self.path = Path(path)
        self.mode = mode
        self.what = what or self.path.name
        self.stale_s = float(stale_s)
        self.waited = False
        self._fd: int | None = None
        self._record: dict[str, Any] = {}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # ------------------------------------------------------------------------------- public
    def __enter__(self) -> BuildLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.mode == "flock":
            try:
                self._acquire_flock()
                return
            except LockUnsupported as e:
                log.warning(
                    "cache: flock is not supported on %s (%s); using the lock-file fallback (set %s=excl)",
                    self.path.parent,
                    e.strerror or e,
                    LOCK_ENV,
                )
                self.mode = "excl"
        self._acquire_excl()

    def release(self) -> None:
        if self.mode == "flock":
            if self._fd is not None:
                # Unlink while still holding it; a waiter that then locks the unlinked file notices (inode
                # check) and retries on a fresh one.
                self.path.unlink(missing_ok=True)
                os.close(self._fd)
                self._fd = None
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        info = _read_record(self.path)
        if info is not None and info.get("token") == self._record.get("token"):
            self.path.unlink(missing_ok=True)

    def _waiting(self, info: Mapping[str, Any] | None) -> None:
        if not self.waited:
            log.info("cache: %s is being built by %s; waiting for it", self.what, _describe(info))
            self.waited = True

    # ------------------------------------------------------------------------------- flock
    def _acquire_flock(self) -> None:
        while True:
            try:
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:
                    continue  # released (unlinked) meanwhile
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    self._waiting(_read_record(self.path))
                    fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    if created:  # an empty file would read as a lock taken by the fallback
                        self.path.unlink(missing_ok=True)
                    raise LockUnsupported(e.errno, e.strerror) from None
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder unlinked the file we locked: lock the current one
                os.close(fd)
                continue
            self._fd = fd
            self._record = _holder_record()
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(self._record).encode(), 0)
            return

    # ------------------------------------------------------------------------------- excl
    def _acquire_excl(self) -> None:
        poll = min(1.0, max(self.stale_s / 20, 0.02))
        while True:
            record = _holder_record()
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = _read_record(self.path)
                why = self._stale(info)
                if why:
                    self._break(info, why)
                    continue
                self._waiting(info)
                time.sleep(poll)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record))
            self._record = record
            self._stop.clear()
            self._beat = threading.Thread(target=self._heartbeat, name="qwha-lock-heartbeat", daemon=True)
            self._beat.start()
            return

    def _stale(self, info: Mapping[str, Any] | None) -> str | None:
        """Why the lock file's holder is gone (None: it is alive, or may be)."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None  # released meanwhile: the next O_EXCL attempt decides
        if info and info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
            return "its process is gone"
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s"
        return None

    def _break(self, info: Mapping[str, Any] | None, why: str) -> None:
        """Remove a stale lock file. Renaming is atomic, so of several waiters one takes it; if the file
        renamed turns out to be a fresh lock (taken between our read and the rename), it is put back."""
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        taken = _read_record(aside)
        if info is not None and taken is not None and taken.get("token") != info.get("token"):
            try:
                os.link(aside, self.path)  # restore the live lock unless a newer one exists
            except OSError:
                pass
        else:
            log.warning("cache: removing the stale lock of %s: %s (%s)", self.what, _describe(info), why)
        aside.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        every = max(self.stale_s / 10, 0.01)
        while not self._stop.wait(every):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                log.error(
                    "cache: the lock of %s was taken away (stale?); another process may build it", self.what
                )
                return

    @staticmethod
    def is_held(path: Path, mode: str = "flock", stale_s: float = DEFAULT_STALE_S) -> bool:
        """Whether some live process holds the lock at ``path`` (used by the sweep; does not wait)."""
        if not path.exists():
            return False
        if mode == "flock":
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            except OSError:
                return True  # cannot tell: err on keeping files
            finally:
                os.close(fd)
            return False
        lock = BuildLock(path, "excl", stale_s=stale_s)
        return lock._stale(_read_record(path)) is None


def lock_mode_from_env() -> str:
    mode = os.environ.get(LOCK_ENV, "flock") or "flock"
    if mode not in LOCK_MODES:
        raise CacheError(f"{LOCK_ENV}={mode!r} is unknown: allowed values are {', '.join(LOCK_MODES)}")
    return mode


def stale_s_from_env() -> float:
    raw = os.environ.get(STALE_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_STALE_S
    except ValueError:
        value = -1.0
    if not value > 0:
        raise CacheError(f"{STALE_ENV}={raw!r} must be a positive number of seconds")
    return value


# ----------------------------------------------------------------------------------------- the cache
class StageCache:
    """The folder of cached artifacts, ``<root>/<stage>/<key>/``.

    ``lock``: ``flock`` | ``excl`` (default: ``$QWHA_CACHE_LOCK``, else ``flock``); ``stale_s``: the
    ``excl`` mode's staleness limit (default ``$QWHA_CACHE_LOCK_STALE_S``, else 600 s).
    """

    def __init__(self, root: str | os.PathLike, *, lock: str | None = None, stale_s: float | None = None):
        self.root = Path(root).expanduser().resolve()
        self.lock_mode = lock or lock_mode_from_env()
        if self.lock_mode not in LOCK_MODES:
            raise CacheError(f"{LOCK_ENV}={self.lock_mode!r} is unknown: allowed values are flock, excl")
        self.stale_s = float(stale_s) if stale_s is not None else stale_s_from_env()

    def check_writable(self) -> None:
        """Fail with one clear line if the root cannot hold artifacts (checked before heavy work)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{uuid.uuid4().hex}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise CacheError(
                f"cache_dir={str(self.root)!r} is not writable ({e.strerror or e}); set QWHA_CACHE_PATH "
                "or cache_dir= to a writable folder"
            ) from None

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lock_path(self, stage: str, key: str) -> Path:
        return self.root / stage / f".lock-{key}"

    def lock(self, stage: str, key: str) -> BuildLock:
        """The build lock of (stage, key); hold it to build the artifact or use its work folder."""
        return BuildLock(
            self.lock_path(stage, key), self.lock_mode, what=f"{stage} {key}", stale_s=self.stale_s
        )

    def work_path(self, stage: str, key: str) -> Path:
        return self.root / stage / f".work-{key}"

    def work_dir(self, stage: str, key: str) -> Path:
        """A stable scratch folder for a stage's resumable state (checkpoints), removed once the artifact
        is published. Never read as an artifact; use it while holding :meth:`lock` (``get_or_build``
        does)."""
        path = self.work_path(stage, key)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def lookup(self, stage: str, key: str, *, verify: bool = True, discard: bool = True) -> Artifact | None:
        """The complete, intact artifact for (stage, key), or None (a miss).

        A folder with no manifest (should not happen, as folders are renamed into place complete), a
        manifest that is unreadable, not ``complete`` or of another key, or a file whose checksum disagrees
        with the manifest (missing, extra or changed) is reported and, with ``discard`` (only under the
        build lock), moved aside.
        """
        path = self.path(stage, key)
        manifest = path / MANIFEST
        reason = None
        if not manifest.is_file():
            if not path.exists():
                return None
            reason = "has no manifest"
        else:
            try:
                info = json.loads(manifest.read_text())
            except (OSError, ValueError):
                info, reason = None, "has an unreadable manifest"
            if reason is None and not isinstance(info, dict):
                reason = "has an unreadable manifest"
            elif reason is None and info.get("status") != "complete":
                reason = f"has status {info.get('status')!r}, not 'complete'"
            elif reason is None and info.get("key") != key:
                reason = f"has the manifest of key {info.get('key')!r}"
            elif reason is None and verify:
                bad = self.verify(path, info.get("files", {}))
                if bad:
                    reason = f"failed its checksums ({', '.join(bad[:5])})"
        if reason is not None:
            log.warning("cache: %s %s; treating it as a miss and recomputing", path, reason)
            if discard:
                self._discard(path)
            return None
        return Artifact(stage, key, path)

    @staticmethod
    def verify(path: Path, expected: Mapping[str, str]) -> list[str]:
        """Relative paths that are missing, extra or whose SHA-256 differs from ``expected``."""
        actual = checksums(path)
        bad = [name for name, digest in expected.items() if actual.get(name) != digest]
        bad += [name for name in actual if name not in expected]
        return sorted(bad)

    def build(
        self,
        stage: str,
        key: str,
        fn: Callable[[Path], Mapping[str, Any] | None],
        *,
        config: Mapping[str, Any],
        upstream: Mapping[str, str],
        replace: bool = False,
    ) -> Artifact:
        """Run ``fn(tmp_dir) -> metrics`` and publish its folder as the artifact (stage, key).

        First writer wins: an intact artifact that appeared meanwhile is kept and this build discarded,
        unless ``replace`` (``force=true``). A full disk (ENOSPC, EDQUOT) anywhere in the build becomes one
        :class:`CacheError` line; the temporary folder is removed and any previous artifact left as it was.
        """
        final = self.path(stage, key)
        tmp = final.parent / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        start = time.time()
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            metrics = dict(fn(tmp) or {})
            info = {
                "stage": stage,
                "key": key,
                "status": "complete",
                "config": config,
                "upstream": dict(upstream),
                "upstream_builds": self._upstream_builds(upstream),
                "metrics": metrics,
                "wall_time_s": round(time.time() - start, 3),
                "peak_rss_mb": round(peak_rss_mb(), 1),
                "versions": _versions(),
                "machine": machine_info(),
                "git_commit": _git_commit(),
                "python": platform.python_version(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "files": checksums(tmp),
            }
            part = tmp / (MANIFEST + ".part")
            part.write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
            os.replace(part, tmp / MANIFEST)  # the manifest appears last, atomically
            self._publish(stage, key, tmp, final, replace=replace)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno in _DISK_FULL:
                raise CacheError(
                    f"no space left to build {stage} {key} under {self.root} ({e.strerror}); nothing was "
                    "published: free space there or set QWHA_CACHE_PATH= to another file system"
                ) from None
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Artifact(stage, key, final)

    def _publish(self, stage: str, key: str, tmp: Path, final: Path, *, replace: bool) -> None:
        """Rename ``tmp`` into ``final``. ``rename(2)`` onto a non-empty folder fails, which makes this
        first-writer-wins even where no lock is shared: the artifact found there is kept if intact."""
        if replace and final.exists():
            aside = final.parent / f".discarded-{key}-{uuid.uuid4().hex[:8]}"
            os.rename(final, aside)
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(aside, final)  # the previous artifact stays where it was
                raise
            shutil.rmtree(aside, ignore_errors=True)
            return
        for _ in range(3):
            try:
                os.rename(tmp, final)  # the artifact appears complete, atomically
                return
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            if self.lookup(stage, key) is not None:  # discards a damaged one
                log.info("cache: %s %s was published by another process meanwhile; keeping it", stage, key)
                shutil.rmtree(tmp, ignore_errors=True)
                return
        raise CacheError(f"cache: could not publish {stage} {key} at {final}: the folder keeps reappearing")

    def _upstream_builds(self, upstream: Mapping[str, str]) -> dict[str, str]:
        """{stage: build_id} of the upstream artifacts this build consumed, so that a record can later be
        told apart from one built on another build of the same upstream key."""
        out = {}
        for stage, key in upstream.items():
            manifest = self.path(stage, key) / MANIFEST
            if manifest.is_file():
                out[stage] = build_id(json.loads(manifest.read_text()))
        return out

    def get_or_build(
        self,
        stage: str,
        key: str,
        fn: Callable[[Path], Mapping[str, Any] | None],
        *,
        config: Mapping[str, Any],
        upstream: Mapping[str, str],
        force: bool = False,
        work: bool = False,
    ) -> tuple[Artifact, bool]:
        """(artifact, hit). A hit is logged with its path; ``force`` recomputes.

        A miss takes the build lock of (stage, key) and looks again: a process that waited for another's
        build reuses its artifact. ``work``: the stage keeps resumable state in :meth:`work_dir`, which is
        removed (still under the lock) once the artifact is published.
        """
        if not force:
            found = self.lookup(stage, key, discard=False)
            if found is not None:
                log.info("cache hit: %s %s", stage, found.path)
                return found, True
        with self.lock(stage, key) as lock:
            if not force:
                found = self.lookup(stage, key)
                if found is not None:
                    how = "built by the process waited for" if lock.waited else "found under the lock"
                    log.info("cache hit: %s %s (%s)", stage, found.path, how)
                    return found, True
            self._clear_leftovers(stage, key)
            log.info("cache %s: %s %s -> computing", "forced" if force else "miss", stage, key)
            artifact = self.build(stage, key, fn, config=config, upstream=upstream, replace=force)
            if work:
                shutil.rmtree(self.work_path(stage, key), ignore_errors=True)
        return artifact, False

    def _clear_leftovers(self, stage: str, key: str) -> None:
        """Remove the ``.tmp-<key>-*`` folders of killed builds of this key. Called under its lock, so
        no live process is writing into any of them."""
        for tmp in self.path(stage, key).parent.glob(f".tmp-{key}-*"):
            log.info("cache: removing %s, left by a killed build", tmp.name)
            shutil.rmtree(tmp, ignore_errors=True)

    def _discard(self, path: Path) -> None:
        trash = path.parent / f".discarded-{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(path, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def sweep(self, older_than_s: float = 24 * 3600) -> int:
        """Delete leftover ``.tmp-*`` and ``.discarded-*`` folders of runs that died, older than
        ``older_than_s`` (by mtime); a ``.tmp-<key>-*`` folder whose key's build lock is held is kept.
        Returns how many were deleted. Called at the start of every pipeline run."""
        n = 0
        now = time.time()
        if not self.root.is_dir():
            return 0
        for pattern in ("*/.tmp-*", "*/.discarded-*"):
            for p in self.root.glob(pattern):
                try:
                    age = now - p.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age <= older_than_s:
                    continue
                if p.name.startswith(".tmp-"):
                    key = p.name[len(".tmp-") :].rsplit("-", 2)[0]
                    if BuildLock.is_held(self.lock_path(p.parent.name, key), self.lock_mode, self.stale_s):
                        continue
                shutil.rmtree(p, ignore_errors=True)
                n += 1
        if n:
            log.info("cache: swept %d leftover folder(s) older than %.0f h", n, older_than_s / 3600)
        return n
