"""Packaging: the wheel carries the Hydra configs and runs from any folder, the console script, the
GPTQModel pin, the license, and no reference to a file the repository lacks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / p for p in out.split()]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_console_script_is_the_module_entry_point():
    from qwha.__main__ import cli

    assert pyproject()["project"]["scripts"] == {"qwha": "qwha.__main__:cli"}
    src = (ROOT / "qwha" / "__main__.py").read_text()
    assert src.rstrip().endswith('if __name__ == "__main__":\n    cli()')  # `python -m qwha` runs cli()
    assert callable(cli)


def test_gptqmodel_is_pinned_to_the_version_the_magr_hook_names():
    deps = pyproject()["project"]["dependencies"]
    pins = [d for d in deps if d.startswith("gptqmodel")]
    assert len(pins) == 1 and re.fullmatch(r"gptqmodel==\d+\.\d+\.\d+", pins[0]), pins
    version = pins[0].split("==")[1]
    assert f"gptqmodel=={version}" in (ROOT / "constraints.txt").read_text().splitlines()
    assert f"GPTQModel {version}" in (ROOT / "qwha" / "quant" / "gptq.py").read_text()


def test_license_is_the_declared_apache_2():
    meta = pyproject()["project"]
    assert meta["license"] == "Apache-2.0" and meta["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    # The full text, not a notice: its nine sections and the end marker.
    for n, title in enumerate(["Definitions", "Grant of Copyright License", "Grant of Patent License"], 1):
        assert f"{n}. {title}." in text
    assert "9. Accepting Warranty or Additional Liability." in text and "END OF TERMS AND CONDITIONS" in text


def test_nothing_cites_a_file_the_repository_lacks():
    # Built by pieces so this file does not match itself.
    gone = ["METHOD" + ".md", "DESIGN" + ".md", "ENV" + ".md", "STYLE" + ".md", "../" + "shared"]
    bare = re.compile(r"\b(?:" + "METHOD|DESIGN|ENV" + r")(?:\s*§|\s+\d|'s\b|\))")
    hits = []
    for path in tracked_files():
        if path.suffix not in (".py", ".md", ".yaml", ".toml", ".txt", "") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            if any(g in line for g in gone) or bare.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()[:80]}")
    assert not hits, "\n".join(hits)


def test_docs_links_point_at_files_in_the_repository():
    assert (ROOT / "docs" / "method.md").is_file() and (ROOT / "docs" / "design.md").is_file()
    missing = set()
    for path in tracked_files():
        if path.suffix in (".py", ".md", ".yaml") and path.is_file():
            for ref in re.findall(r"docs/[\w.-]+\.md", path.read_text(errors="replace")):
                if not (ROOT / ref).is_file():
                    missing.add(f"{path.relative_to(ROOT)} -> {ref}")
    assert not missing, sorted(missing)


def test_config_folder_is_found_in_a_checkout():
    from qwha.config import CONF_DIR

    assert CONF_DIR == ROOT / "conf" and (CONF_DIR / "config.yaml").is_file()


def test_wheel_ships_the_configs_and_runs_from_another_folder(tmp_path):
    """Build the wheel from the tracked files alone, check its contents, unpack it and compose the
    configuration from an unrelated folder with only the unpacked wheel on the path (~15 s)."""
    src = tmp_path / "src"
    for path in tracked_files():
        if path.is_file():
            dest = src / path.relative_to(ROOT)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(path.read_bytes())
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            ".",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        cwd=src,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("qwha-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"qwha/conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert want and want <= names, sorted(want - names)[:5]
    assert any(n.endswith("licenses/LICENSE") for n in names)
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert "qwha = qwha.__main__:cli" in zipfile.ZipFile(wheel).read(entry[0]).decode()

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "QWHA_CACHE_PATH": str(tmp_path / "cache")}
    probe = subprocess.run(
        [sys.executable, "-c", "import qwha.config as c; print(c.CONF_DIR)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(probe.stdout.strip()) == site / "qwha" / "conf"
    res = subprocess.run(
        [sys.executable, "-m", "qwha", "--cfg", "job", "bits=4"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "bits: 4" in res.stdout and "magr_iters" in res.stdout
