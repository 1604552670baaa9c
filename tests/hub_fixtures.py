"""Stand-ins for Hugging Face hub models and datasets, staged in the real cache layout.

What a connected ``from_pretrained`` / ``load_dataset`` leaves under ``$HF_HOME`` and what the libraries
read back with ``HF_HUB_OFFLINE=1``:

- models (huggingface_hub): ``hub/models--<org>--<name>/blobs/<sha256>`` (file contents),
  ``snapshots/<commit>/<file>`` (relative symlinks to the blobs) and ``refs/main`` (the commit);
  offline, ``refs/<revision>`` names the snapshot that ``from_pretrained(id)`` loads.
- datasets: the downloaded files in ``hub/datasets--<org>--<name>/`` (same layout), and the Arrow
  files ``load_dataset`` prepares from them in ``datasets/<org>___<name>/<config>/0.0.0/<commit>/``.
  Offline, ``datasets`` reads only the latter (``CachedDatasetModuleFactory``), so both are staged; the
  Arrow files are written by datasets' own parquet builder, configured as ``load_dataset`` configures
  it for a hub repository (config name, repo id, commit as hash).

The models are random, small in depth and vocabulary; the Llama-3.2-3B stand-in keeps that model's
config.json widths (hidden 3072, intermediate 8192, 24 heads / 8 KV heads of 128, tied embeddings).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from pathlib import Path

import torch

LLAMA_32_3B_ID = "meta-llama/Llama-3.2-3B"
QWEN2_ID = "Qwen/Qwen2.5-Tiny-Standin"
# meta-llama/Llama-3.2-3B config.json (the published file), except depth and vocabulary.
LLAMA_32_3B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 3072,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
}
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"
WORDS = (
    "the a of and to in is was for on with as by at from his her their it that this which one two three "
    "river city king army song film game team school church war year people world water light house "
    "built played wrote found began named moved became called opened released won lost held made took "
    "north south early later first last new old great small long major local national several many"
).split()


# ------------------------------------------------------------------------------------------ layout
def fake_commit(*parts: object) -> str:
    """A 40-hex commit id derived from ``parts`` (stable across runs)."""
    return hashlib.sha1(repr(parts).encode()).hexdigest()


def stage_repo(
    hf_home: Path, repo_id: str, src: Path, repo_type: str = "model", commit: str | None = None
) -> Path:
    """Move the files of ``src`` into ``hf_home/hub`` as a downloaded ``repo_id`` at ``commit``
    (``refs/main`` points to it); the snapshot folder."""
    repo = Path(hf_home) / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    files = sorted(p for p in Path(src).rglob("*") if p.is_file())
    commit = commit or fake_commit(repo_id, *(p.relative_to(src).as_posix() for p in files), os.urandom(4))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for p in files:
        with open(p, "rb") as f:
            blob = repo / "blobs" / hashlib.file_digest(f, "sha256").hexdigest()
        if not blob.exists():
            shutil.move(str(p), blob)
        link = snapshot / p.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


# ------------------------------------------------------------------------------------------- text
def words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def wikitext_lines(n_lines: int, seed: int) -> list[str]:
    """WikiText-2-raw-like rows: headings, paragraphs and empty lines."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_lines):
        if i % 7 == 0:
            rows.append(f" = {words(3, seed * 1000 + i).title()} = \n")
        elif i % 7 == 1:
            rows.append("")
        else:
            rows.append(" " + words(rng.randint(40, 80), seed * 1000 + i) + " . \n")
    return rows


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer (any text encodes) trained on the stand-in text, adding BOS like
    Llama-3's, with BOS/EOS/PAD special tokens; a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(wikitext_lines(400, 1) + [str(i) for i in range(100)], trainer=trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos)]
    )
    # A pad token in the vocabulary (as Llama-3's reserved one, Qwen2's <|endoftext|>): without one,
    # GPTQModel's tokenicer picks a pad id for the model config that a small vocabulary may not hold.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


# ----------------------------------------------------------------------------------------- models
def write_llama32_3b_standin(folder: Path, tokenizer, num_layers: int = 1, seed: int = 0) -> Path:
    """Llama-3.2-3B's widths with ``num_layers`` blocks and the tokenizer's vocabulary; random weights
    saved in bfloat16 (as published) with the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(LLAMA_32_3B_CONFIG, num_hidden_layers=num_layers, vocab_size=len(tokenizer))
    cfg.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    cfg.pop("architectures")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def write_qwen2_standin(folder: Path, tokenizer, seed: int = 0) -> Path:
    """A 2-block Qwen2 (biases on q/k/v, GQA) of width 128 with the tokenizer's vocabulary."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def stage_model(hf_home: Path, repo_id: str, folder: Path) -> Path:
    """Stage a saved model folder as the hub repository ``repo_id`` (the folder is consumed)."""
    return stage_repo(hf_home, repo_id, folder, "model")


# --------------------------------------------------------------------------------------- datasets
def _mc(i: int, n: int, seed: int) -> tuple[list[str], int]:
    rng = random.Random(seed * 7919 + i)
    return [words(rng.randint(2, 5), seed * 31 + i * 5 + k) for k in range(n)], rng.randrange(n)


def _arc(i: int, seed: int) -> dict:
    texts, gold = _mc(i, 4, seed)
    labels = ["A", "B", "C", "D"]
    return {
        "id": f"Q{seed}-{i}",
        "question": words(10, seed + i) + "?",
        "choices": {"text": texts, "label": labels},
        "answerKey": labels[gold],
    }


def _obqa(i: int, seed: int) -> dict:
    row = _arc(i, seed)
    return {
        "id": row["id"],
        "question_stem": row["question"],
        "choices": row["choices"],
        "answerKey": row["answerKey"],
    }


def _hellaswag(i: int, seed: int) -> dict:
    endings, gold = _mc(i, 4, seed)
    ctx_a, ctx_b = words(12, seed + i), words(3, seed + i + 1)
    return {
        "ind": i,
        "activity_label": words(2, seed - i).title(),
        "ctx_a": ctx_a,
        "ctx_b": ctx_b,
        "ctx": f"{ctx_a} {ctx_b}",
        "endings": endings,
        "source_id": f"src-{i}",
        "split": "val",
        "split_type": "indomain",
        "label": str(gold),
    }


def _piqa(i: int, seed: int) -> dict:
    sols, gold = _mc(i, 2, seed)
    return {"goal": words(8, seed + i), "sol1": sols[0], "sol2": sols[1], "label": gold}


def _boolq(i: int, seed: int) -> dict:
    return {"question": words(6, seed + i), "passage": words(40, seed - i), "idx": i, "label": i % 2}


def _winogrande(i: int, seed: int) -> dict:
    opts, gold = _mc(i, 2, seed)
    return {
        "sentence": f"{words(6, seed + i)} _ {words(5, seed - i)}.",
        "option1": opts[0],
        "option2": opts[1],
        "answer": str(gold + 1),
    }


def _gsm8k(i: int, seed: int) -> dict:
    a, b = 3 + (i * 7 + seed) % 20, 2 + (i * 5) % 9
    return {
        "question": f"A {WORDS[20 + i % 20]} has {a} boxes with {b} books each. How many books are there?",
        "answer": f"{a} boxes of {b} books: {a} * {b} = <<{a}*{b}={a * b}>>{a * b} books.\n#### {a * b}",
    }


def _alpaca(i: int, seed: int) -> dict:
    return {
        "instruction": f"Write the {WORDS[i % len(WORDS)]} sentence in capitals.",
        "input": words(8, seed + i) if i % 2 else "",
        "output": words(8, seed + i).upper(),
    }


def _rows(make, n: int, seed: int) -> list[dict]:
    return [make(i, seed) for i in range(n)]


def standin_datasets(n: int = 8) -> dict[tuple[str, str | None], dict[str, list[dict]]]:
    """{(repo_id, config): {split: rows}} with the fields of the real datasets, ``n`` rows a split."""
    three = ("train", "validation", "test")
    out: dict[tuple[str, str | None], dict[str, list[dict]]] = {
        ("Salesforce/wikitext", "wikitext-2-raw-v1"): {
            s: [{"text": t} for t in wikitext_lines(300 if s == "train" else 120, k)]
            for k, s in enumerate(three)
        },
        ("openai/gsm8k", "main"): {"train": _rows(_gsm8k, 4 * n, 0), "test": _rows(_gsm8k, n, 1)},
        ("yahma/alpaca-cleaned", None): {"train": _rows(_alpaca, 4 * n, 0)},
        ("aps/super_glue", "boolq"): {s: _rows(_boolq, n, k) for k, s in enumerate(three)},
        ("Rowan/hellaswag", None): {s: _rows(_hellaswag, n, k) for k, s in enumerate(three)},
        ("allenai/openbookqa", "main"): {s: _rows(_obqa, n, k) for k, s in enumerate(three)},
        ("baber/piqa", None): {s: _rows(_piqa, n, k) for k, s in enumerate(three)},
        ("allenai/winogrande", "winogrande_xl"): {s: _rows(_winogrande, n, k) for k, s in enumerate(three)},
    }
    for name in ("ARC-Challenge", "ARC-Easy"):
        out[("allenai/ai2_arc", name)] = {s: _rows(_arc, n, 10 * k + len(name)) for k, s in enumerate(three)}
    return out


def stage_dataset(hf_home: Path, repo_id: str, configs: dict[str | None, dict[str, list[dict]]]) -> Path:
    """Stage one dataset repository with its configs: parquet files + README in the hub cache, and the
    Arrow cache ``load_dataset`` prepares from them (one per config)."""
    import datasets
    from datasets.data_files import DataFilesDict
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.parquet.parquet import Parquet, ParquetConfig

    src = Path(hf_home) / ".staging" / repo_id.replace("/", "--")
    yaml = ["---", "configs:"]
    for config, splits in configs.items():
        name = config or "default"
        yaml += [f"- config_name: {name}", "  data_files:"]
        for split, rows in splits.items():
            rel = (
                f"{name}/{split}-00000-of-00001.parquet" if config else f"data/{split}-00000-of-00001.parquet"
            )
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_list(rows).to_parquet(str(src / rel))
            yaml += [f"  - split: {split}", f"    path: {rel}"]
    (src / "README.md").write_text("\n".join([*yaml, "---", f"Stand-in for {repo_id} (tests).", ""]))
    commit = fake_commit(repo_id, sorted(str(c) for c in configs))
    snapshot = stage_repo(hf_home, repo_id, src, "dataset", commit)
    shutil.rmtree(src, ignore_errors=True)
    for config, splits in configs.items():
        name = config or "default"
        files = {
            s: [str(snapshot / (f"{name}/{s}" if config else f"data/{s}")) + "-00000-of-00001.parquet"]
            for s in splits
        }
        builder_cls = type(
            "Parquet",
            (Parquet,),
            {
                "BUILDER_CONFIGS": [
                    ParquetConfig(name=name, data_files=DataFilesDict.from_local_or_remote(files))
                ]
            },
        )
        builder = builder_cls(
            cache_dir=str(Path(hf_home) / "datasets"),
            dataset_name=camelcase_to_snakecase(repo_id.split("/")[-1]),
            config_name=name,
            hash=commit,
        )
        # load_dataset also passes repo_id (with hf:// URLs for the files, which __init__ insists on);
        # set it afterwards so that the folder is <namespace>___<name>/<config>/0.0.0/<commit>.
        builder.repo_id = repo_id
        builder._cache_dir = builder._build_cache_dir()
        builder.download_and_prepare()
    return snapshot


def stage_datasets(hf_home: Path, n: int = 8) -> None:
    """Every stand-in dataset of :func:`standin_datasets`, grouped by repository."""
    by_repo: dict[str, dict[str | None, dict[str, list[dict]]]] = {}
    for (repo_id, config), splits in standin_datasets(n).items():
        by_repo.setdefault(repo_id, {})[config] = splits
    for repo_id, configs in by_repo.items():
        stage_dataset(hf_home, repo_id, configs)


def stage_hub(hf_home: Path, llama_layers: int | None = 1) -> dict[str, Path]:
    """Stage the Qwen2 stand-in (and, unless ``llama_layers`` is None, the Llama-3.2-3B stand-in) and
    all stand-in datasets under ``hf_home``; also write the Qwen2 stand-in as a plain local folder."""
    hf_home = Path(hf_home)
    tok = build_tokenizer()
    work = hf_home / ".staging"
    out = {"qwen": stage_model(hf_home, QWEN2_ID, write_qwen2_standin(work / "qwen", tok))}
    out["local"] = write_qwen2_standin(hf_home.parent / "local-qwen2", tok)
    stage_datasets(hf_home)
    if llama_layers is not None:
        out["llama"] = stage_llama(hf_home, llama_layers, tok)
    shutil.rmtree(work, ignore_errors=True)
    return out


def stage_llama(hf_home: Path, num_layers: int = 1, tokenizer=None) -> Path:
    """Stage the Llama-3.2-3B stand-in (about 100M parameters, 200 MB, per block) under ``hf_home``."""
    tok = tokenizer or build_tokenizer()
    folder = write_llama32_3b_standin(Path(hf_home) / ".staging" / "llama", tok, num_layers)
    return stage_model(hf_home, LLAMA_32_3B_ID, folder)


def offline_env(hf_home: Path, **extra: str) -> dict[str, str]:
    """A subprocess environment that sees only ``hf_home`` (no user caches, no token) and no Hub."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", **extra)
    return env
