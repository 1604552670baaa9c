"""Sanity baseline of the evaluation pieces on the real fp32 SmolLM2-135M-Instruct (from the GGUF).

CSQA (all 8 offline tasks, first ``--csqa-limit`` documents each), GSM8K greedy on the first
``--gsm8k-n`` test questions, and strided perplexity on the packaged held-out text; prints one JSON
object with the numbers and the wall time of each part.

    PYTHONPATH=. python experiments/eval_smollm2_baseline.py --csqa-limit 100 --gsm8k-n 50
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qwha.data.packaged import smollm2_gguf
from qwha.data.text import joined_text
from qwha.eval.csqa import ALL_TASKS, run_csqa
from qwha.eval.gsm8k import run_gsm8k
from qwha.eval.perplexity import perplexity


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--csqa-limit", type=int, default=100)
    ap.add_argument("--gsm8k-n", type=int, default=50)
    ap.add_argument("--gsm8k-batch", type=int, default=8)
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--gsm8k-chat", action="store_true", help="wrap GSM8K prompts in the chat template")
    ap.add_argument("--parts", default="csqa,ppl,gsm8k", help="comma-separated subset of csqa,ppl,gsm8k")
    args = ap.parse_args()
    parts = set(args.parts.split(","))

    out: dict = {"machine": f"{platform.node()} {platform.processor()} threads={torch.get_num_threads()}"}
    t0 = time.time()
    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    out["load_s"] = round(time.time() - t0, 1)

    if "csqa" in parts:
        t0 = time.time()
        csqa = run_csqa(model, tok, tasks=ALL_TASKS, source="packaged", limit=args.csqa_limit, batch_size=8)
        out["csqa"] = csqa
        out["csqa_s"] = round(time.time() - t0, 1)
        print(json.dumps({"csqa": csqa, "csqa_s": out["csqa_s"]}), flush=True)

    if "ppl" in parts:
        t0 = time.time()
        text = joined_text("packaged", "test")
        out["ppl"] = perplexity(model, tok, text, window=2048, stride=512, max_tokens=args.ppl_tokens)
        out["ppl_s"] = round(time.time() - t0, 1)
        print(json.dumps({"ppl": out["ppl"], "ppl_s": out["ppl_s"]}), flush=True)

    if "gsm8k" in parts:
        t0 = time.time()
        out["gsm8k"] = run_gsm8k(
            model,
            tok,
            source="packaged",
            limit=args.gsm8k_n,
            batch_size=args.gsm8k_batch,
            decoding="greedy",
            chat_template=args.gsm8k_chat,
        )
        out["gsm8k_s"] = round(time.time() - t0, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
