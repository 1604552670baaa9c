"""Inference speed of the merged LoTA-QAF model against the unmerged QLoRA model (and the plain GPTQ model).

    PYTHONPATH=. python experiments/bench_lota_inference.py --quantized <cache>/quantize/<key>/model \\
        --lota <cache>/finetune/<key>/adapter [--lora <cache>/finetune/<key>/adapter] [--threads 2]

Rows, all on the same quantized SmolLM2 (GPTQModel torch kernel, float32 on CPU), timed in one run:

* ``gptq``          the quantized model alone (no adapter): the floor;
* ``lota merged``   LoTA merged into the codes (``qwha.adapters.save_merged_lota``), reloaded with
                    ``qwha.quant.load_quantized``: GPTQModel's in-checkpoint rank-G offset LoRA included;
* ``lota adapter``  the training-form LoTA layer (effective weight rebuilt when the factors change,
                    cached otherwise);
* ``lora r=64``     PEFT LoRA on the GPTQ layers, unmerged (``--lora``: a saved adapter; else a fresh
                    rank-64 LoRA with random ``B`` -- the cost does not depend on the values).

Timed: a 512-token prefill (batch 1) and greedy decoding of 64 new tokens after a 64-token prompt
(batch 1, KV cache), medians of ``--repeats`` runs after one warm-up. Ratios are against ``lora r=64``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

for _k, _v in {"GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model, vocab: int, repeats: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    prefill = torch.randint(0, vocab, (1, 512), generator=g)
    prompt = torch.randint(0, vocab, (1, 64), generator=g)
    with torch.no_grad():
        t_pre = timed(lambda: model(prefill), repeats)
        t_dec = timed(
            lambda: model.generate(
                prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0
            ),
            repeats,
        )
    return {"prefill_512_s": t_pre, "decode_tok_per_s": 64 / t_dec}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quantized", type=Path, required=True, help="a quantize artifact's model/ folder")
    ap.add_argument("--lota", type=Path, required=True, help="a LoTA init/finetune artifact's adapter/")
    ap.add_argument("--lora", type=Path, help="a LoRA init/finetune artifact's adapter/ (optional)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from qwha.adapters import attach_adapter, load_adapter, save_merged_lota
    from qwha.quant import load_quantized

    rows: dict[str, dict] = {}
    base = load_quantized(args.quantized)
    vocab = int(base.config.vocab_size)
    rows["gptq"] = measure(base, vocab, args.repeats)
    del base

    lota = load_adapter(load_quantized(args.quantized), args.lota)
    rows["lota adapter"] = measure(lota, vocab, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        save_merged_lota(lota, args.quantized, Path(tmp) / "merged")
        del lota
        merged = load_quantized(Path(tmp) / "merged")
        rows["lota merged"] = measure(merged, vocab, args.repeats)
        del merged

    if args.lora:
        lora = load_adapter(load_quantized(args.quantized), args.lora)
    else:
        lora = attach_adapter(load_quantized(args.quantized), method="lora", rank=64)
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 1e-3)
    rows["lora r=64"] = measure(lora, vocab, args.repeats)

    ref = rows["lora r=64"]
    print(f"threads {torch.get_num_threads()}, repeats {args.repeats} (medians)")
    print("| model | prefill 512 tok (s) | vs LoRA | decode (tok/s) | vs LoRA |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['prefill_512_s']:.3f} | {r['prefill_512_s'] / ref['prefill_512_s']:.2f}x | "
            f"{r['decode_tok_per_s']:.1f} | {r['decode_tok_per_s'] / ref['decode_tok_per_s']:.2f}x |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
