"""Process-wide runtime hygiene, applied before the heavy libraries are imported.

Users should not need to know the environment variables that make the stack behave on a small or
offline machine; `configure_environment` sets them (only where the user has not) and is called by
`qwha/__init__.py` before anything imports torch, transformers, GPTQModel or Triton.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

DEFAULT_CACHE = ".cache/qwha"


def cache_root() -> Path:
    """The stage-cache root: ``$QWHA_CACHE_PATH`` or ``./.cache/qwha``, made absolute."""
    return Path(os.environ.get("QWHA_CACHE_PATH", DEFAULT_CACHE)).expanduser().resolve()


def has_cuda_device() -> bool:
    """Cheap CUDA probe that does not import torch (Triton's mode must be fixed before its import)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


def configure_environment() -> None:
    """Set defaults for the third-party environment variables this project relies on."""
    root = cache_root()
    # gptqmodel's dependencies otherwise move HF_HOME to a temporary folder (docs/design.md, "Environment").
    os.environ.setdefault("HF_HOME", str(root / "hf_home"))
    # wandb raises with no mode and no API key; offline keeps runs local until the user syncs them.
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    # On 2 cores GPTQModel's quantize() raises about its worker pools unless told how many to use.
    if (os.cpu_count() or 1) <= 4:
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(2, os.cpu_count() or 1))))
    # Triton kernels run through the interpreter on machines without a GPU; this must be set before
    # any @triton.jit decorator executes.
    if not has_cuda_device():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # Idle OpenMP threads spin by default; on a small or shared machine that stalls every small BLAS
    # call of the per-layer init (measured: 56 min vs 3 min for SmolLM2's init on 2 loaded cores).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")


def set_offline(offline: bool) -> None:
    """Forbid hub access for runs whose model and data are all local (the embedded default)."""
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def quiet_third_party_logs() -> None:
    """Drop banners and advisory warnings from the libraries; our own logger keeps INFO."""
    warnings.filterwarnings("ignore")
    for name in (
        "transformers",
        "datasets",
        "gptqmodel",
        "lm-eval",
        "lm_eval",
        "accelerate",
        "peft",
        "optimum",
        "torch.distributed",
        "urllib3",
        "filelock",
        "httpx",
        "huggingface_hub",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - logging hygiene must never fail a run
        pass
