"""qwha: quantization-aware Walsh-Hadamard adaptation (QWHA) for quantized LLMs.

Stages: quantize (MagR + GPTQ) -> init (AdaAlloc + refinement) -> finetune -> eval, each cached by a
hash of the configuration that matters to it. Entry point: ``python -m qwha``.
"""

from qwha.runtime import configure_environment as _configure_environment

_configure_environment()

__version__ = "0.1.0"
