"""Evaluation speed with an adapter against the quantized model alone (2-bit GPTQ SmolLM2, one run).

    PYTHONPATH=. python experiments/bench_eval.py [--reps 5] [--threads 1] [--adapters wha,lota]

Loads the same GPTQ checkpoint once per model (the quantized model alone, and the same with each
adapter, its values set non-zero so that the adapter changes the outputs), in eval mode with
GPTQModel's inference weight cache on (what the eval stage does). Each repetition times, for every
model in turn (order reversed every other repetition): a held-out-perplexity forward (``--batch`` ×
``--length`` tokens, no grad, loss from the logits) and greedy generation of ``--new-tokens`` tokens
with the KV cache. The first repetition is a warm-up (it builds the materialised weights). Reported:
median seconds and the median of the per-repetition ratios to the model alone; and the largest logit
difference between each adapter's eval-mode forward and its training-mode (gradient) forward.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--adapters", default="wha,lota")
    ap.add_argument("--quantized", help="a GPTQ checkpoint (default: build a 2-bit SmolLM2 once)")
    args = ap.parse_args()

    import torch

    sys.path.insert(0, str(ROOT / "experiments"))
    from smollm2_2bit import build

    from qwha.adapters import adapter_layers, attach_adapter
    from qwha.quant.pipeline import load_quantized

    torch.set_num_threads(args.threads)
    qdir = build(Path(args.quantized)) if args.quantized else build()
    g = torch.Generator().manual_seed(0)
    models = {"quantized": load_quantized(qdir, weight_cache=True)}
    for name in args.adapters.split(","):
        m = attach_adapter(load_quantized(qdir, weight_cache=True), method=name, rank=64)
        with torch.no_grad():
            for layer in adapter_layers(m).values():
                if name == "wha":
                    layer.wha_c.copy_(torch.randn(layer.budget, generator=g) * 1e-3)
                else:
                    layer.lota_B.copy_(torch.randint(-2, 3, layer.lota_B.shape, generator=g).float())
        models[name] = m
    vocab = models["quantized"].config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.length), generator=g)
    prompt = ids[:, :32]

    # eval-mode forward equals the training-mode forward (within float32 tolerance)
    agree = {}
    for name, m in models.items():
        if name == "quantized":
            continue
        m.eval()
        with torch.no_grad():
            y_eval = m(input_ids=ids[:1, :64]).logits
        y_train = m(input_ids=ids[:1, :64]).logits.detach()  # gradients on: the training computation
        agree[name] = (y_eval - y_train).abs().max().item() / y_train.abs().max().item()

    times = {k: {"ppl": [], "gen": []} for k in models}
    names = list(models)
    for rep in range(args.reps + 1):
        for name in names if rep % 2 == 0 else names[::-1]:
            m = models[name].eval()
            with torch.no_grad():
                t0 = time.perf_counter()
                logits = m(input_ids=ids).logits
                torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
                t1 = time.perf_counter()
                m.generate(
                    prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
                )
                t2 = time.perf_counter()
            if rep > 0:
                times[name]["ppl"].append(t1 - t0)
                times[name]["gen"].append(t2 - t1)
        print(
            f"rep {rep}: "
            + ", ".join(f"{k} {v['ppl'][-1] if v['ppl'] else 0:.2f}" for k, v in times.items()),
            file=sys.stderr,
        )

    print(
        f"\n# 2-bit GPTQ SmolLM2-135M, {platform.machine()}, threads={args.threads}, load avg "
        f"{os.getloadavg()[0]:.1f}; perplexity forward {args.batch} x {args.length} tokens, greedy "
        f"generation of {args.new_tokens} tokens after a 32-token prompt (batch {args.batch}); "
        f"{args.reps} interleaved repetitions after a warm-up\n"
    )
    print("| model | ppl forward (s) | / quantized | generation (s) | / quantized | eval vs train logits |")
    print("|---|---:|---:|---:|---:|---:|")
    base = times["quantized"]
    for name in names:
        t = times[name]
        r_ppl = statistics.median(a / b for a, b in zip(t["ppl"], base["ppl"], strict=True))
        r_gen = statistics.median(a / b for a, b in zip(t["gen"], base["gen"], strict=True))
        diff = f"{agree[name]:.1e}" if name in agree else "-"
        print(
            f"| {name} | {statistics.median(t['ppl']):.3f} | {r_ppl:.3f} | "
            f"{statistics.median(t['gen']):.3f} | {r_gen:.3f} | {diff} |"
        )


if __name__ == "__main__":
    main()
