"""Fine-tuning cost per adapter on SmolLM2-135M: step time, tokens/s, peak memory (one run, ratios vs LoRA).

Each adapter runs in its own subprocess (peak memory on CPU is the process's max RSS, which never goes
down), through the real ``qwha.finetune.train`` on packaged GSM8K-style data, rank 64 on the seven
projections. The first optimizer step is excluded from the timings (allocation, lazy kernel set-up).

    PYTHONPATH=. python experiments/bench_finetune.py --adapters lora,cloq,qwha,dct2d --steps 4

Adapters: ``lora`` (PEFT LoRA, B = 0), ``cloq`` (the same PEFT LoRA layers with non-zero A and B: the
cost of a step does not depend on how CLoQ computed them), ``qwha`` (WHA: WHT along d_in, 1-D) and
``dct2d`` (the 2-D DCT ablation); the last two need ``qwha.adapters.attach_adapter``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = ("lora", "cloq", "qwha", "dct2d", "qwha-fused", "qwha-delta", "qwha-sparse")


def load_model(model_dir: str | None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_dir:
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        return model, tok
    from qwha.data.packaged import smollm2_gguf

    g = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    model = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer, model.is_quantized = None, False
    return model, tok


def attach(model, adapter: str, rank: int):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if adapter in ("lora", "cloq"):
        from peft import LoraConfig, get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        cfg = LoraConfig(
            r=rank,
            lora_alpha=rank,
            lora_dropout=0.0,
            target_modules=targets,
            init_lora_weights=adapter == "lora",
        )
        return get_peft_model(model, cfg)
    from qwha.adapters import attach_adapter  # the adapters engineer's module

    kw = {"qwha": {}, "dct2d": {"transform": "dct", "dims": 2}}.get(adapter, {})
    if adapter.startswith("qwha-"):
        kw = {"compute": adapter.split("-", 1)[1]}
    return attach_adapter(model, method="wha", rank=rank, target_modules=targets, **kw)


def one(args) -> dict:
    import torch

    from qwha.data.sft import build_or_load_tokenized
    from qwha.finetune import train

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model_dir)
    model = attach(model, args.adapter, args.rank)
    data = build_or_load_tokenized(
        args.data_cache,
        tok,
        format="gsm8k",
        source="packaged",
        size=args.examples,
        seed=0,
        max_length=args.max_length,
        mask_prompt=True,
    )
    cfg = dict(
        lr=1e-4,
        max_steps=args.steps + 1,
        micro_batch_size=args.micro_batch,
        effective_batch=args.micro_batch * args.accum,
        warmup_ratio=0.0,
        save_every=0,
        grad_checkpointing=args.grad_checkpointing,
        wandb={"mode": "disabled"},
    )
    with tempfile.TemporaryDirectory() as d:
        m = train(model, tok, data, cfg, Path(d), seed=0, device="cpu")
    return {k: m[k] for k in ("trainable_params", "step_time_s", "tokens_per_s", "peak_mem_mb", "first_loss")}


def _step_fn(model, opt, batches):
    """One optimizer step (a forward and backward per micro-batch, then the AdamW update) on fixed
    micro-batches (gradient accumulation when there are several); returns its seconds."""
    t0 = time.perf_counter()
    for batch in batches:
        loss = model(input_ids=batch, labels=batch).loss / len(batches)
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def interleaved(args) -> None:
    """LoRA vs WHA training steps on the whole 2-bit GPTQ SmolLM2, alternating in one process.

    ``--compute fused,sparse`` adds one WHA model per computation to the rotation.

    Both models are the same GPTQ checkpoint (GPTQModel ``TorchLinear`` layers, training mode: the
    packed weight is dequantized in every forward, as in the fine-tune stage); LoRA is PEFT's
    (``GPTQLoraLinear``), WHA this project's; rank ``--rank`` on the seven projections gives both the
    same number of trainable values. Each repetition times one optimizer step of every model on the same
    ``--accum`` micro-batches of ``--micro-batch`` × ``--max-length`` tokens (gradient accumulation, as
    the fine-tune stage does), the order reversed every other repetition; the first
    step of each is a warm-up. Reported: the median step of each and the median of the per-repetition
    ratios to LoRA."""
    import statistics

    import torch

    sys.path.insert(0, str(ROOT / "experiments"))
    from smollm2_2bit import build

    from qwha.adapters import attach_adapter
    from qwha.quant.pipeline import load_quantized

    torch.set_num_threads(args.threads)
    qdir = build(Path(args.quantized)) if args.quantized else build()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    computes = args.compute.split(",")
    models = {}
    for name in ["lora"] + [f"wha-{c}" for c in computes]:
        m = load_quantized(qdir, weight_cache=False)
        if name == "lora":
            m = attach_adapter(m, method="lora", rank=args.rank, target_modules=targets)
        else:
            compute = name.split("-", 1)[1]
            m = attach_adapter(m, method="wha", rank=args.rank, target_modules=targets, compute=compute)
        m.train()
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)
        models[name] = (m, opt, sum(p.numel() for p in params))
    g = torch.Generator().manual_seed(0)
    vocab = models["lora"][0].config.vocab_size
    batch = [
        torch.randint(0, vocab, (args.micro_batch, args.max_length), generator=g) for _ in range(args.accum)
    ]
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, (m, opt, _) in models.items():
            _step_fn(m, opt, batch)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                _step_fn(m, opt, batch)
            print(f"\n## {name}: one step, top ops by self CPU time\n")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))
        return
    names = list(models)
    times: dict[str, list[float]] = {k: [] for k in names}
    for m, opt, _ in models.values():  # warm-up
        _step_fn(m, opt, batch)
    for rep in range(args.reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            m, opt, _ = models[name]
            times[name].append(_step_fn(m, opt, batch))
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    load = os.getloadavg()[0]
    print(
        f"\n# 2-bit GPTQ SmolLM2-135M, {platform.machine()}, threads={args.threads}, load avg {load:.1f}; "
        f"{args.accum} micro-batch(es) of {args.micro_batch} x {args.max_length} tokens per step, "
        f"rank {args.rank}, "
        f"{args.reps} interleaved repetitions after one warm-up step each\n"
    )
    print("| adapter | trainable values | median step (s) | steps (s) | median of per-rep ratios to LoRA |")
    print("|---|---:|---:|---|---:|")
    for name in names:
        steps = ", ".join(f"{t:.2f}" for t in times[name])
        ratios = [t / lo for t, lo in zip(times[name], times["lora"], strict=True)]
        print(
            f"| {name} | {models[name][2]:,} | {med[name]:.2f} | {steps} | {statistics.median(ratios):.3f} "
            f"({min(ratios):.2f}-{max(ratios):.2f}) |"
        )


def padding_report(args) -> None:
    """Share of padding tokens in micro-batches cut from random order vs. sorted within each step."""
    import statistics

    import torch

    from qwha.data.sft import load_sft_records, tokenize_sft

    tok = _tokenizer(args.model_dir) if args.model_dir else load_model(None)[1]
    step, micro = 64, args.micro_batch
    print(
        "| set | tokens, median (p10-p90) | padding, random micro-batches | padding, sorted within the step |"
    )
    print("|---|---|---:|---:|")
    for fmt in ("gsm8k", "alpaca"):
        recs = load_sft_records(fmt, "packaged", size=2000, seed=0)
        data = tokenize_sft(recs, tok, max_length=args.max_length, mask_prompt=fmt == "gsm8k")
        lengths = [len(x["input_ids"]) for x in data]
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
        steps = [order[i : i + step] for i in range(0, len(order) - step + 1, step)]

        def waste(groups, lengths=lengths):
            padded = sum(max(lengths[i] for i in g) * len(g) for g in groups)
            return 1 - sum(lengths[i] for g in groups for i in g) / padded

        rand = [s[i : i + micro] for s in steps for i in range(0, step, micro)]
        srt = [sorted(s, key=lambda i: lengths[i]) for s in steps]
        srt = [s[i : i + micro] for s in srt for i in range(0, step, micro)]
        q = statistics.quantiles(lengths, n=10)
        print(
            f"| {fmt} (packaged, {len(data)}) | {statistics.median(lengths):.0f} ({q[0]:.0f}-{q[-1]:.0f}) | "
            f"{100 * waste(rand):.1f}% | {100 * waste(srt):.1f}% |"
        )


def _tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", default="lora,cloq,qwha,dct2d")
    ap.add_argument("--adapter", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps (plus one warm-up)")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument(
        "--model-dir", help="a transformers folder of SmolLM2 (default: convert the packaged GGUF)"
    )
    ap.add_argument("--data-cache", default=str(Path(tempfile.gettempdir()) / "qwha-bench-sft"))
    ap.add_argument("--padding", action="store_true", help="only report padding: random vs. sorted steps")
    ap.add_argument(
        "--interleave",
        action="store_true",
        help="LoRA vs WHA steps on the 2-bit GPTQ SmolLM2, alternating in one process (see interleaved())",
    )
    ap.add_argument("--reps", type=int, default=5, help="--interleave: timed repetitions")
    ap.add_argument(
        "--compute",
        default="auto",
        help="--interleave: WHA compute(s), comma-separated (auto/fused/delta/sparse)",
    )
    ap.add_argument(
        "--quantized", help="--interleave: a GPTQ checkpoint (default: build a 2-bit SmolLM2 once)"
    )
    ap.add_argument("--profile", type=int, default=0, help="--interleave: print the top N ops of one step")
    args = ap.parse_args()
    if args.padding:
        padding_report(args)
        return
    if args.interleave:
        interleaved(args)
        return
    if args.adapter:  # child process: one adapter, JSON on the last line
        print(json.dumps(one(args)))
        return

    rows = {}
    for adapter in args.adapters.split(","):
        if adapter not in ADAPTERS:
            raise SystemExit(f"--adapters: {adapter!r} is unknown: allowed values are {', '.join(ADAPTERS)}")
        cmd = [
            sys.executable,
            __file__,
            "--adapter",
            adapter,
            "--rank",
            str(args.rank),
            "--steps",
            str(args.steps),
            "--micro-batch",
            str(args.micro_batch),
            "--accum",
            str(args.accum),
            "--max-length",
            str(args.max_length),
            "--examples",
            str(args.examples),
            "--threads",
            str(args.threads),
            "--data-cache",
            args.data_cache,
        ]
        cmd += ["--grad-checkpointing"] if args.grad_checkpointing else []
        cmd += ["--model-dir", args.model_dir] if args.model_dir else []
        t0 = time.time()
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
        if proc.returncode != 0:
            print(f"{adapter}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows[adapter] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{adapter}: {rows[adapter]} ({time.time() - t0:.0f} s)", file=sys.stderr)

    load = os.getloadavg()[0]
    print(
        f"\n# {platform.machine()}, {os.cpu_count()} cores, threads={args.threads}, "
        f"load avg {load:.1f}; micro-batch {args.micro_batch} x accum {args.accum}, max_length "
        f"{args.max_length}, rank {args.rank}, {args.steps} timed steps\n"
    )
    print("| adapter | trainable params | step time (s) | tokens/s | peak RSS (MiB) | step time / LoRA |")
    print("|---|---:|---:|---:|---:|---:|")
    ref = rows.get("lora")
    for name, r in rows.items():
        ratio = f"{r['step_time_s'] / ref['step_time_s']:.2f}" if ref else "n/a"
        print(
            f"| {name} | {r['trainable_params']:,} | {r['step_time_s']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['peak_mem_mb']:.0f} | {ratio} |"
        )


if __name__ == "__main__":
    main()
