"""Is MagR+GPTQ repeatable? Quantize the first layers of SmolLM2-135M-Instruct several times, each in its
own process, under different CPU settings, and compare the checkpoints with the first run's.

    PYTHONPATH=. python experiments/repeat_quant.py --layers 4 --bits 2

Settings (one subprocess each, in this order): one torch thread; the same again; one thread with
``ATEN_CPU_CAPABILITY=avx2`` (torch's AVX2 kernels on an AVX-512 machine); two threads. For each it
prints how many ``qweight``/``scales`` tensors are bit-identical to the first run's and the relative
difference of each module's ``‖ΔW X‖`` (GPTQModel's calibration error), median and largest per layer.
Calibration: ``measure_quant.calibration()`` (32 windows × 512 tokens, seed 0, packaged text).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = (
    ("1 thread", {"OMP_NUM_THREADS": "1"}),
    ("1 thread, again", {"OMP_NUM_THREADS": "1"}),
    ("1 thread, ATEN_CPU_CAPABILITY=avx2", {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2"}),
    ("2 threads", {"OMP_NUM_THREADS": "2"}),
)


def build(layers: int, bits: int, group_size: int, out_json: Path) -> None:
    """Quantize the first ``layers`` decoder layers; write tensor hashes and per-module errors."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from experiments import measure_quant as mq
    from qwha.quant import quantize_model

    src = mq.convert()
    work = Path(tempfile.mkdtemp(prefix="repeat_quant-"))
    config = AutoConfig.from_pretrained(src)
    config.num_hidden_layers = layers
    model = AutoModelForCausalLM.from_pretrained(src, config=config, dtype=torch.float32)
    model.save_pretrained(work / "src")
    mq.tokenizer().save_pretrained(work / "src")
    metrics = quantize_model(
        work / "src", work / "out", mq.calibration(), method="magr_gptq", bits=bits, group_size=group_size
    )
    tensors = load_file(work / "out" / "model.safetensors")
    hashes = {
        name: hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        for name, t in sorted(tensors.items())
        if name.endswith((".qweight", ".scales"))
    }
    out_json.write_text(
        json.dumps(
            {
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "threads": torch.get_num_threads(),
                "hashes": hashes,
                "dw_x": {name: m["dw_x_fro"] for name, m in metrics["layers"].items()},
            }
        )
    )


def _layer(module: str) -> int:
    """The decoder layer index in a module name (``model.layers.3.mlp.up_proj`` -> 3)."""
    return int(module.split(".layers.")[1].split(".")[0])


def compare(first: dict, other: dict) -> tuple[int, dict[int, tuple[float, float]]]:
    """(identical tensors, {layer: (median, max) relative difference of ‖ΔW X‖ against ``first``})."""
    same = sum(other["hashes"].get(k) == v for k, v in first["hashes"].items())
    per_layer: dict[int, list[float]] = {}
    for name, ref in first["dw_x"].items():
        per_layer.setdefault(_layer(name), []).append(abs(other["dw_x"][name] - ref) / ref)
    return same, {k: (statistics.median(v), max(v)) for k, v in sorted(per_layer.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4, help="decoder layers kept (SmolLM2 has 30)")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        build(args.layers, args.bits, args.group_size, args.child)
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, env) in enumerate(SETTINGS):
            out = Path(tmp) / f"{i}.json"
            cmd = [sys.executable, __file__, "--layers", str(args.layers), "--bits", str(args.bits)]
            cmd += ["--group-size", str(args.group_size), "--child", str(out)]
            print(f"[{i + 1}/{len(SETTINGS)}] {label}", file=sys.stderr, flush=True)
            child_env = {**os.environ, "MKL_NUM_THREADS": env["OMP_NUM_THREADS"], **env}
            log = Path(tmp) / f"{i}.log"
            with open(log, "w") as f:  # GPTQModel's progress output goes to the log, not the table
                done = subprocess.run(cmd, env=child_env, stdout=f, stderr=subprocess.STDOUT)
            if done.returncode:
                sys.exit(f"run {i + 1} ({label}) failed; its output ends:\n{log.read_text()[-3000:]}")
            runs.append((label, json.loads(out.read_text())))
    first = runs[0][1]
    n = len(first["hashes"])
    layers = sorted({_layer(k) for k in first["dw_x"]})
    title = f"MagR+GPTQ {args.bits}-bit, group {args.group_size}, first {args.layers} layers"
    print(f"\n{title}; differences against run 1\n")
    head = " | ".join(f"layer {k} median / max" for k in layers)
    print(f"| run | kernel set | threads | identical tensors | {head} |")
    print("|---|---|---|---|" + "---|" * len(layers))
    for label, run in runs:
        same, diffs = compare(first, run)
        cells = " | ".join(f"{diffs[k][0]:.1e} / {diffs[k][1]:.1e}" for k in layers)
        print(f"| {label} | {run['cpu_capability']} | {run['threads']} | {same}/{n} | {cells} |")


if __name__ == "__main__":
    main()
