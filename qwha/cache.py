"""Content-addressed stage cache.

An artifact lives in ``<root>/<stage>/<key>/``; ``key`` hashes exactly the configuration that affects
the stage plus the keys of the artifacts it consumes, so it is independent of the machine, the cache
root and the order of keys in YAML. The contract (docs/design.md):

- A stage builds into a private temporary folder beside the final one. Its ``manifest.json`` (stage,
  key, config slice, upstream keys and the :func:`build_id` of each upstream artifact it read,
  versions, machine, git commit, wall time, peak memory, file checksums, status) is written last, by an
  atomic rename, and then the whole folder is renamed into place. A run killed at any point leaves at
  most a ``.tmp-*`` folder, which is never read and is swept later.
- On reuse every file is checked against the manifest's SHA-256. A mismatch is a *miss*: it is
  reported, the damaged artifact is moved aside, and the stage is recomputed (never used silently).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
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


class StageCache:
    """The folder of cached artifacts, ``<root>/<stage>/<key>/``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

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

    def work_dir(self, stage: str, key: str) -> Path:
        """A stable scratch folder for a stage's resumable state (checkpoints), removed once the artifact
        is published. Never read as an artifact."""
        path = self.root / stage / f".work-{key}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def lookup(self, stage: str, key: str, *, verify: bool = True) -> Artifact | None:
        """The complete, intact artifact for (stage, key), or None (a miss).

        A folder with no manifest (should not happen, as folders are renamed into place complete) or with
        a file whose checksum disagrees with the manifest is reported and moved aside.
        """
        path = self.path(stage, key)
        manifest = path / MANIFEST
        if not manifest.is_file():
            if path.exists():
                log.warning("cache: %s has no manifest; treating as a miss", path)
                self._discard(path)
            return None
        try:
            info = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("cache: unreadable manifest in %s; recomputing", path)
            self._discard(path)
            return None
        if info.get("status") != "complete" or info.get("key") != key:
            log.warning("cache: manifest in %s is not a complete artifact; recomputing", path)
            self._discard(path)
            return None
        if verify:
            bad = self.verify(path, info.get("files", {}))
            if bad:
                log.warning("cache: %s failed its checksums (%s); recomputing", path, ", ".join(bad[:5]))
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
    ) -> Artifact:
        """Run ``fn(tmp_dir) -> metrics`` and publish its folder as the artifact (stage, key)."""
        final = self.path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        start = time.time()
        try:
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
            if final.exists():  # a damaged or incomplete predecessor: move it out of the way
                self._discard(final)
            os.replace(tmp, final)  # the artifact appears complete, atomically
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Artifact(stage, key, final)

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
    ) -> tuple[Artifact, bool]:
        """(artifact, hit). A hit is logged with its path; ``force`` recomputes."""
        if not force:
            found = self.lookup(stage, key)
            if found is not None:
                log.info("cache hit: %s %s", stage, found.path)
                return found, True
        log.info("cache %s: %s %s -> computing", "forced" if force else "miss", stage, key)
        return self.build(stage, key, fn, config=config, upstream=upstream), False

    def _discard(self, path: Path) -> None:
        trash = path.parent / f".discarded-{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(path, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def sweep(self, older_than_s: float = 24 * 3600) -> int:
        """Delete leftover ``.tmp-*`` folders of runs that died (older than ``older_than_s``)."""
        n = 0
        now = time.time()
        for tmp in self.root.glob("*/.tmp-*"):
            if now - tmp.stat().st_mtime > older_than_s:
                shutil.rmtree(tmp, ignore_errors=True)
                n += 1
        return n
