"""Numbers published in the QWHA paper (arXiv 2509.17428), printed beside ours by the table renderer.

Keys follow the pipeline's names (method names as in `conf/`); values are percentages unless stated.
"""

from __future__ import annotations

PAPER = "QWHA (Jeon et al., arXiv 2509.17428)"

# Table 3: CSQA average / GSM8K accuracy (%), by model, bits and method. LoTA-QAF (method "lota", the
# second method family, arXiv 2505.18724) is not in the QWHA paper: its paper cells stay empty.
TABLE3 = {
    ("llama3.2-3b", 4): {
        "gptq_magr": (64.43, 3.34),
        "cloq": (65.48, 39.27),
        "ssh": (65.83, 39.80),
        "loca": (65.59, 40.33),
        "qwha": (66.11, 41.47),
    },
    ("llama3.2-3b", 2): {
        "gptq_magr": (42.90, 0.08),
        "cloq": (54.89, 26.53),
        "loca": (53.87, 23.88),
        "ssh": (54.01, 25.77),
        "qwha": (57.03, 29.11),
    },
    ("llama3.1-8b", 2): {
        "cloq": (56.49, 33.89),
        "qwha": (60.98, 37.83),
    },
}

# Tables 2 / 7: average layer output error x1e3 after init, 4-bit Llama-3.2-3B.
TABLE2_LAYER_ERROR = {
    "zero": 7.21,
    "random": 5.96,
    "ssh": 4.57,
    "magnitude": 3.82,
    "adaalloc": 3.86,
    "adaalloc_norefine": 7.06,
}

# Table 13: AdaAlloc temperature t, GSM8K (%), 4-bit Llama-3.2-3B.
TABLE13_TEMPERATURE = {0.25: 40.11, 0.5: 41.39, 1.0: 41.47, 1.5: 40.64, 2.0: 40.04}

# Table 14: group size, GSM8K (%), 2-bit Llama-3.2-3B.
TABLE14_GROUP_SIZE = {32: 29.94, 64: 29.11, 128: 24.48, 256: 22.51}

# Table 5: training time (hours, Llama-3.1-8B Alpaca, A100) at batch 1 / 16; init time (hours, 3B / 8B);
# inference throughput (tokens/s).
TABLE5_TRAIN_HOURS = {"cloq": (12.5, 3.6), "qwha": (18.2, 3.9), "ssh": (63.3, 8.3), "loca": (92.3, 9.8)}
TABLE5_INIT_HOURS = {"cloq": (0.58, 1.14), "qwha": (0.66, 1.34), "ssh": (3.85, 8.09)}
INFERENCE_TOKENS_PER_S = {"lora": 188.1, "wha": 184.6, "dca": 92.4, "dha": 92.4}
