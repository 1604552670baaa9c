"""The fine-tuning options (the keys of ``conf/train/default.yaml``), validated before any heavy work."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
WANDB_MODES = ("offline", "online", "disabled")
OPTIMIZERS = ("adamw", "tsignsgd")


@dataclass(frozen=True)
class WandbConfig:
    project: str = "qwha"
    name: str | None = None
    mode: str = "offline"


@dataclass(frozen=True)
class TSignConfig:
    """The kept-fraction schedule of t-SignSGD (:mod:`qwha.finetune.tsignsgd`); LoTA-QAF's values."""

    keep_start: float = 0.05
    keep_mid: float = 0.001
    keep_end: float = 0.0001
    mid_fraction: float = 0.8


@dataclass(frozen=True)
class TrainConfig:
    """Options of one fine-tuning run.

    lr: peak learning rate (AdamW). epochs: passes over the data, unless ``max_steps`` (optimizer steps)
    is set. micro_batch_size: examples per process and forward pass. effective_batch: examples per
    optimizer step over all processes (= micro_batch_size x accumulation x world size). warmup_ratio:
    fraction of the steps with a linear warmup (``ceil(ratio x steps)`` steps, as in HF's Trainer).
    max_grad_norm: gradient clipping (0 or None: off). precision: ``auto`` = bf16 autocast on CUDA, fp32 on
    CPU. save_every: a checkpoint every N optimizer steps (0: only at the end). keep_last: checkpoints
    kept (older ones are deleted; 0 keeps all). optimizer: ``adamw`` (the paper's recipe) or ``tsignsgd``
    (LoTA-QAF's ternary sign optimizer: ``lr``, ``weight_decay``, ``warmup_ratio`` and ``scheduler`` are
    then unused; its schedule is ``tsignsgd``). Not keys of ``conf/train/default.yaml``: the finetune stage
    sets them from ``adapter=lota``.
    """

    lr: float = 2e-4
    epochs: float = 1
    max_steps: int | None = None
    micro_batch_size: int = 4
    effective_batch: int = 64
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    scheduler: str = "cosine"
    max_grad_norm: float | None = 1.0
    precision: str = "auto"
    grad_checkpointing: bool = False
    save_every: int = 50
    resume: bool = True
    log_every: int = 1
    fsdp: bool = False
    keep_last: int = 2
    wandb: WandbConfig = field(default_factory=WandbConfig)
    optimizer: str = "adamw"
    tsignsgd: TSignConfig = field(default_factory=TSignConfig)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | TrainConfig) -> TrainConfig:
        """Build from a dict or an OmegaConf node; unknown keys and bad values raise one-line ValueErrors."""
        if isinstance(cfg, TrainConfig):
            return cfg
        raw = _to_dict(cfg)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"train.{unknown[0]} is unknown: allowed keys are {', '.join(sorted(known))}")
        nested = {}
        for key, sub in (("wandb", WandbConfig), ("tsignsgd", TSignConfig)):
            values = _to_dict(raw.pop(key, None) or {})
            sub_known = {f.name for f in fields(sub)}
            if set(values) - sub_known:
                bad = sorted(set(values) - sub_known)[0]
                raise ValueError(
                    f"train.{key}.{bad} is unknown: allowed keys are {', '.join(sorted(sub_known))}"
                )
            nested[key] = sub(**values)
        out = cls(**raw, **nested)
        out.validate()
        return out

    def validate(self) -> None:
        def bad(key: str, allowed: str) -> ValueError:
            return ValueError(f"train.{key}={getattr(self, key)!r}: {allowed}")

        if not self.lr > 0:
            raise bad("lr", "must be > 0")
        if self.max_steps is None and not self.epochs > 0:
            raise bad("epochs", "must be > 0 (or set train.max_steps)")
        if self.max_steps is not None and self.max_steps < 1:
            raise bad("max_steps", "must be a positive number of optimizer steps or null")
        if self.micro_batch_size < 1:
            raise bad("micro_batch_size", "must be >= 1")
        if self.effective_batch < 1:
            raise bad("effective_batch", "must be >= 1")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be >= 0")
        if not 0 <= self.warmup_ratio < 1:
            raise bad("warmup_ratio", "must be in [0, 1)")
        if self.scheduler not in SCHEDULERS:
            raise bad("scheduler", f"allowed values are {', '.join(SCHEDULERS)}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise bad("max_grad_norm", "must be >= 0 or null")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"allowed values are {', '.join(PRECISIONS)}")
        if self.save_every < 0:
            raise bad("save_every", "must be >= 0 (0: checkpoint only at the end)")
        if self.log_every < 1:
            raise bad("log_every", "must be >= 1")
        if self.keep_last < 0:
            raise bad("keep_last", "must be >= 0 (0: keep all)")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"allowed values are {', '.join(OPTIMIZERS)}")
        t = self.tsignsgd
        for key in ("keep_start", "keep_mid", "keep_end", "mid_fraction"):
            if not 0 < getattr(t, key) <= 1:
                raise ValueError(f"train.tsignsgd.{key}={getattr(t, key)!r}: must be in (0, 1]")
        if self.optimizer == "tsignsgd" and self.fsdp:
            raise bad("fsdp", "t-SignSGD's per-tensor percentile needs whole tensors: use DDP (fsdp=false)")
        if self.wandb.mode not in WANDB_MODES:
            raise ValueError(
                f"train.wandb.mode={self.wandb.mode!r}: allowed values are {', '.join(WANDB_MODES)}"
            )

    def grad_accum(self, world_size: int) -> int:
        """Micro-steps per optimizer step so that micro x accum x world == effective_batch."""
        per_step = self.micro_batch_size * world_size
        if self.effective_batch % per_step:
            raise ValueError(
                f"train.effective_batch={self.effective_batch} is not divisible by train.micro_batch_size "
                f"({self.micro_batch_size}) x processes ({world_size}); choose a multiple of {per_step}"
            )
        return self.effective_batch // per_step


def _to_dict(cfg: Any) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return dict(OmegaConf.to_container(cfg, resolve=True))
    except ImportError:  # pragma: no cover
        pass
    if isinstance(cfg, WandbConfig | TSignConfig):
        return {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    return dict(cfg)
