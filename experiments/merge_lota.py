"""Merge a LoTA-QAF adapter into its quantized model: a GPTQModel checkpoint that needs no adapter code.

    PYTHONPATH=. python experiments/merge_lota.py --quantized <cache>/quantize/<key>/model \\
        --adapter <cache>/finetune/<key>/adapter --out /tmp/lota_merged [--check 4]

Loads the quantized model (float32, torch kernel), attaches the saved LoTA adapter, writes the merged
checkpoint (:func:`qwha.adapters.save_merged_lota`; format and the fractional zero points:
``qwha/adapters/lota_merge.py``), and with ``--check N`` reloads it and prints the largest logit
difference against the adapter-on model over ``N`` random sequences of 32 tokens. The merged model then
loads with ``GPTQModel.load(out)`` or ``qwha.quant.load_quantized(out)``.

``--export`` writes the layout of ``stage=export export.format=lota`` instead (the offset also as a
standard PEFT LoRA, so that ``AutoModelForCausalLM.from_pretrained(out)`` is right too;
``qwha/adapters/lota_merge.py``); the check then reloads through ``qwha.load_tuned``. The pipeline's
own way to get that folder, with a model card: ``python -m qwha stage=export method=lota export.format=lota``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

for _k, _v in {"GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quantized", type=Path, required=True, help="the quantize artifact's model/ folder")
    ap.add_argument("--adapter", type=Path, required=True, help="an init or finetune artifact's adapter/")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--check", type=int, default=0, help="sequences for the merged-vs-adapter check")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--export", action="store_true", help="the export layout (PEFT offset LoRA as well)")
    ap.add_argument("--base-model", default=None, help="hub id recorded with --export (default: none)")
    args = ap.parse_args()

    from qwha.adapters import load_adapter, save_merged_lota
    from qwha.quant import load_quantized

    model = load_adapter(load_quantized(args.quantized, device=args.device), args.adapter)
    batch = None
    if args.check:
        vocab = int(model.config.vocab_size)
        g = torch.Generator().manual_seed(0)
        batch = torch.randint(0, vocab, (args.check, 32), generator=g).to(args.device)
        with torch.no_grad():
            ref = model(batch).logits
    if args.export:
        from qwha.stages.export import export_lota

        export_lota(model, args.quantized, args.out, args.base_model or "unknown")
        (args.out / "qwha_export.json").write_text(
            json.dumps({"format": "lota", "base_model": args.base_model})
        )
    else:
        save_merged_lota(model, args.quantized, args.out)
    report = {"out": str(args.out)}
    if batch is not None:
        if args.export:
            from qwha.load import load_tuned

            merged = load_tuned(args.out, device=args.device)[0]
        else:
            merged = load_quantized(args.out, device=args.device)
        with torch.no_grad():
            diff = (merged(batch).logits - ref).abs().max().item()
        report.update(max_abs_logit_diff=diff, max_abs_logit=ref.abs().max().item())
    print(json.dumps(report))


if __name__ == "__main__":
    main()
