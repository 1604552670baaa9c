"""qwha: quantization-aware Walsh-Hadamard adaptation (QWHA) for quantized LLMs.

Stages: quantize (MagR + GPTQ) -> init (AdaAlloc + refinement) -> finetune -> eval, each cached by a
hash of the configuration that matters to it. Entry point: ``python -m qwha``.
"""

from qwha.runtime import configure_environment as _configure_environment

_configure_environment()

__version__ = "0.1.0"


def __getattr__(name: str):
    """``qwha.load_tuned`` (imported on first use: ``import qwha`` stays light)."""
    if name == "load_tuned":
        from qwha.load import load_tuned

        return load_tuned
    raise AttributeError(f"module 'qwha' has no attribute {name!r}")
