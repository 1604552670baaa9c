"""The fine-tuning loop: AdamW + warmup/cosine, gradient accumulation, checkpoint/resume, DDP/FSDP.

``train.optimizer=tsignsgd`` (set by ``adapter=lota``) trains with LoTA-QAF's t-SignSGD instead
(:mod:`qwha.finetune.tsignsgd`): no learning rate, so no schedule; its step counter is optimizer state and
resumes like AdamW's moments.

A plain PyTorch loop rather than HF's ``Trainer``: the whole recipe fits on a page, and it gives what the
pipeline needs without fighting a framework: checkpoints holding only the trainable (adapter) tensors, an
exact resume (data position is a function of the step), a loss normalised by the number of supervised
tokens of the whole global batch (so 1 and N processes, or any micro-batch split, compute the same
gradient), and no extra dependency (accelerate) in the hot path.

Per optimizer step ``s`` (0-based): epoch ``e = s // S``, position ``s % S`` where ``S`` steps make one
epoch. The order of an epoch is ``DistributedSampler(shuffle=True, seed, drop_last=True)`` at epoch ``e``;
rank ``r`` takes its next ``micro x accum`` indices (sorted by length, then cut into micro-batches). The
union over ranks of one step's examples is the same contiguous slice of the epoch's permutation whatever
the number of processes.

The gradient of a step is that of ``sum(token losses) / (supervised tokens in the global batch)``; under
DDP each micro-batch's summed loss is scaled by ``world / N`` (DDP averages gradients over processes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import resource
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

from qwha.data.sft import IGNORE_INDEX, SFTCollator, make_collator
from qwha.finetune import checkpoint as ckpt
from qwha.finetune.config import TrainConfig
from qwha.finetune.distributed import DistEnv, all_reduce_sum, barrier, setup, teardown
from qwha.finetune.schedule import NoSchedule, build_scheduler, warmup_steps
from qwha.finetune.tracking import MetricsLog, Progress, WandbRun

log = logging.getLogger("qwha.finetune")

# Keys that must agree between a checkpoint and the run resuming from it (the number of processes and
# the micro-batch size may change: they only split the same global batch differently).
_FINGERPRINT_KEYS = (
    "total_steps",
    "effective_batch",
    "lr",
    "weight_decay",
    "warmup_ratio",
    "scheduler",
    "max_grad_norm",
    "n_examples",
    "seed",
    "trainable",
    "optimizer",
    "tsignsgd",
)
# What a checkpoint written before a key existed implicitly had.
_FINGERPRINT_DEFAULTS = {"optimizer": "adamw", "tsignsgd": None}


def train(
    model: nn.Module,
    tokenizer: Any,
    train_set: Sequence[dict[str, Sequence[int]]],
    cfg_train: Any,
    out_dir: str | Path,
    *,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    run_name: str | None = None,
    config_to_log: dict | None = None,
    checkpoint_dir: str | Path | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    step_hook: Any = None,
) -> dict[str, Any]:
    """Fine-tune the parameters of ``model`` that have ``requires_grad=True`` on ``train_set``.

    model: a causal LM taking ``input_ids [B, L]``, ``attention_mask [B, L]`` and returning ``.logits
    [B, L, V]``; it is moved to ``device`` and trained in place. tokenizer: gives the pad id (its EOS when
    it has no pad token; None pads with 0 -- padding never enters the loss). train_set: a sequence of
    ``{"input_ids": [L], "labels": [L]}`` (``qwha.data.sft.tokenize_sft``). cfg_train: the keys of
    ``conf/train/default.yaml`` (``TrainConfig``). out_dir: receives ``metrics.jsonl`` (and wandb's offline
    files). checkpoint_dir: where ``step-N/`` checkpoints live (default ``out_dir/checkpoints``); pass a
    stable folder for a run to resume across kills. on_step(step, row): called on every process after
    optimizer step ``step`` (1-based) and its checkpoint. step_hook: an object that trains something
    besides the optimizer's parameters (LoCA's locations, ``qwha.adapters.loca.LocationLearner``):
    ``before_step(step, total_steps)`` before a step's forward passes, ``before_optimizer(step,
    optimizer)`` after its backward passes (before clipping), and ``state_dict()`` /
    ``load_state_dict()`` saved in and restored from every checkpoint.

    Under torchrun (WORLD_SIZE > 1) it joins the process group, wraps the model in DDP (or FSDP2 with
    ``fsdp: true``) and only rank 0 writes files. Returns the run's metrics (rank 0's view; the same
    losses on every rank): final_loss, first_loss, steps, tokens_per_s, step_time_s, peak_mem_mb, ...
    """
    cfg = TrainConfig.from_mapping(cfg_train)
    env = setup(device)
    # The process group (if this call created it) lives until the process exits; a later call reuses it.
    # On an exception no barrier is entered (a failed rank must not wait for the others).
    args = (model, tokenizer, train_set, cfg, Path(out_dir), seed, env, run_name, config_to_log)
    result = _Trainer(*args, checkpoint_dir, on_step, step_hook).run()
    teardown(env)
    return result


class _Trainer:
    def __init__(
        self,
        model,
        tokenizer,
        train_set,
        cfg: TrainConfig,
        out_dir: Path,
        seed: int,
        env: DistEnv,
        run_name,
        config_to_log,
        checkpoint_dir,
        on_step,
        step_hook=None,
    ) -> None:
        self.cfg, self.env, self.seed, self.on_step = cfg, env, seed, on_step
        self.step_hook = step_hook
        self.model, self.train_set = model, train_set
        self.out_dir = out_dir
        self.ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out_dir / "checkpoints"
        self.run_name, self.config_to_log = run_name, config_to_log
        if tokenizer is None:
            self.collate = SFTCollator(0)
        else:
            self.collate = make_collator(tokenizer, 8 if env.device.type == "cuda" else None)

        self.accum = cfg.grad_accum(env.world_size)
        self.local_batch = cfg.micro_batch_size * self.accum  # examples per process and optimizer step
        n = len(train_set)
        self.steps_per_epoch = (n // env.world_size) // self.local_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set has {n} examples, fewer than train.effective_batch={cfg.effective_batch}"
            )
        if cfg.max_steps is not None:
            self.total_steps = int(cfg.max_steps)
        else:
            self.total_steps = max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.params = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(
                "the model has no trainable parameters (requires_grad=True); attach an adapter first"
            )

    # ------------------------------------------------------------------------------------- set-up
    def _autocast(self):
        p = self.cfg.precision
        if p == "auto":
            p = "bf16" if self.env.device.type == "cuda" else "fp32"
        if p == "bf16":
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _prepare_model(self) -> nn.Module:
        model = self.model
        # Trainable weights are kept in fp32 (bf16 would round away AdamW's small updates); autocast
        # computes in bf16 where it is on.
        for _, p in self.params:
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
        model.to(self.env.device)
        if self.cfg.grad_checkpointing:
            if not hasattr(model, "gradient_checkpointing_enable"):
                raise ValueError(
                    "train.grad_checkpointing=true: this model has no gradient_checkpointing_enable()"
                )
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
            model.config.use_cache = False
        model.train()
        if self.env.world_size == 1:
            return model
        if self.cfg.fsdp:
            return _fully_shard(model, self.env)
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        # Frozen (quantized) buffers are identical on every rank: no need to broadcast them each step.
        return DDP(model, device_ids=ids, find_unused_parameters=False, broadcast_buffers=False)

    def _optimizer(self) -> torch.optim.Optimizer:
        if self.cfg.optimizer == "tsignsgd":
            from qwha.finetune.tsignsgd import TSignSGD

            t = self.cfg.tsignsgd
            return TSignSGD(
                [p for _, p in self.params],
                total_steps=self.total_steps,
                keep_start=t.keep_start,
                keep_mid=t.keep_mid,
                keep_end=t.keep_end,
                mid_fraction=t.mid_fraction,
            )
        decay, no_decay = [], []
        for name, p in self.params:
            (no_decay if _no_weight_decay(self.model, name) else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        kw = {"fused": True} if self.env.device.type == "cuda" and not self.cfg.fsdp else {}
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=(0.9, 0.999), eps=1e-8, **kw)

    def _fingerprint(self) -> dict:
        shapes = json.dumps([(k, list(p.shape)) for k, p in self.params])
        names = hashlib.sha256(shapes.encode()).hexdigest()[:16]
        c = self.cfg
        return {
            "total_steps": self.total_steps,
            "effective_batch": c.effective_batch,
            "lr": c.lr,
            "weight_decay": c.weight_decay,
            "warmup_ratio": c.warmup_ratio,
            "scheduler": c.scheduler,
            "max_grad_norm": c.max_grad_norm,
            "n_examples": len(self.train_set),
            "seed": self.seed,
            "trainable": names,
            "optimizer": c.optimizer,
            "tsignsgd": dataclasses.asdict(c.tsignsgd) if c.optimizer == "tsignsgd" else None,
        }

    # ------------------------------------------------------------------------------------- state
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) trainable tensors by name; a collective under FSDP (call on every rank)."""
        return {k: _full(p).detach().to("cpu", copy=True) for k, p in self.params}

    def _optimizer_state(self, opt: torch.optim.Optimizer) -> dict:
        """AdamW state keyed by parameter name, full tensors (collective under FSDP)."""
        sd = opt.state_dict()
        index_to_name = {}
        i = 0
        for group in opt.param_groups:
            for p in group["params"]:
                index_to_name[i] = self._name_of[id(p)]
                i += 1
        state = {
            index_to_name[i]: {k: (_full(v).cpu() if torch.is_tensor(v) else v) for k, v in s.items()}
            for i, s in sd["state"].items()
        }
        groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
        group_names = [[index_to_name[i] for i in g["params"]] for g in sd["param_groups"]]
        return {"state": state, "param_groups": groups, "group_names": group_names}

    def _load_state(self, path: Path, opt, sched) -> dict:
        trainable, opt_state, state = ckpt.load_checkpoint(path)
        _check_fingerprint(state["fingerprint"], self._fingerprint(), path)
        missing = [k for k, _ in self.params if k not in trainable]
        if missing:
            raise ValueError(
                f"checkpoint {path} lacks trainable tensor {missing[0]!r}; it is from another model"
            )
        with torch.no_grad():
            for k, p in self.params:
                _copy_into(p, trainable[k])
        names = [self._name_of[id(p)] for g in opt.param_groups for p in g["params"]]
        if [n for g in opt_state["group_names"] for n in g] != names:
            raise ValueError(f"checkpoint {path}: optimizer parameter order differs from this model's")
        by_name = dict(self.params)
        sd: dict = {"state": {}, "param_groups": []}
        first = 0
        for group, group_names in zip(opt_state["param_groups"], opt_state["group_names"], strict=True):
            sd["param_groups"].append({**group, "params": list(range(first, first + len(group_names)))})
            first += len(group_names)
        for i, n in enumerate(names):
            if n in opt_state["state"]:
                sd["state"][i] = {
                    k: _like(v, by_name[n]) if torch.is_tensor(v) and v.dim() > 0 else v
                    for k, v in opt_state["state"][n].items()
                }
        opt.load_state_dict(sd)
        sched.load_state_dict(state["scheduler"])
        if self.step_hook is not None:
            self.step_hook.load_state_dict(state.get("step_hook"))
        ckpt.set_rng_state(state["rng"])
        return state

    def _save(self, step: int, opt, sched, summary: dict, metrics_path: Path) -> None:
        trainable = self._trainable_state()  # every rank (collective under FSDP)
        opt_state = self._optimizer_state(opt)
        if self.env.is_main:
            state = {"scheduler": sched.state_dict(), "fingerprint": self._fingerprint(), "summary": summary}
            if self.step_hook is not None:
                state["step_hook"] = self.step_hook.state_dict()
            ckpt.save_checkpoint(
                self.ckpt_dir, step, trainable, opt_state, state, metrics_path, self.cfg.keep_last
            )
        barrier(self.env)

    # ------------------------------------------------------------------------------------- data
    def _epoch_indices(self, epoch: int) -> list[int]:
        sampler = DistributedSampler(
            range(len(self.train_set)),
            num_replicas=self.env.world_size,
            rank=self.env.rank,
            shuffle=True,
            seed=self.seed,
            drop_last=True,
        )
        sampler.set_epoch(epoch)
        return list(sampler)

    def _step_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if self._epoch != epoch:
            self._order, self._epoch = self._epoch_indices(epoch), epoch
        idx = self._order[pos * self.local_batch : (pos + 1) * self.local_batch]
        # The step's gradient is a sum over its examples, so their order is free: sorting them by length
        # before cutting micro-batches removes most padding (packaged GSM8K, 64 per step, micro-batch 4:
        # 26% of the tokens were padding in random order, 4% sorted; experiments/results/finetune.md).
        idx = sorted(idx, key=lambda i: len(self.train_set[i]["input_ids"]))
        m = self.cfg.micro_batch_size
        return [self.collate([self.train_set[i] for i in idx[j : j + m]]) for j in range(0, len(idx), m)]

    # ------------------------------------------------------------------------------------- loop
    def run(self) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        torch.manual_seed(self.seed)
        self._epoch, self._order = -1, []
        n_trainable = sum(_full_numel(p) for _, p in self.params)
        wrapped = self._prepare_model()
        # FSDP replaces the parameters by sharded ones (same names): take them again after wrapping.
        self.params = [(k, p) for k, p in self.model.named_parameters() if p.requires_grad]
        self._name_of = {id(p): k for k, p in self.params}
        opt = self._optimizer()
        if getattr(opt, "uses_lr", True):
            sched = build_scheduler(opt, self.total_steps, cfg.warmup_ratio, cfg.scheduler)
        else:
            sched = NoSchedule()

        start, summary, previous = 0, {}, []
        if env.is_main:
            ckpt.clean_partial(self.ckpt_dir)
        barrier(env)
        latest = ckpt.latest_checkpoint(self.ckpt_dir)
        if latest is not None and cfg.resume:
            state = self._load_state(latest, opt, sched)
            start, summary = int(state["step"]), dict(state.get("summary", {}))
            previous = [r for r in ckpt.read_metrics(latest) if r["step"] <= start]
            if env.is_main:
                log.info("resuming from %s (step %d of %d)", latest, start, self.total_steps)
        elif env.is_main:
            if latest is not None:
                log.info("train.resume=false: removing the checkpoints in %s", self.ckpt_dir)
            for _, p in ckpt.list_checkpoints(self.ckpt_dir):
                shutil.rmtree(p, ignore_errors=True)
            # A run from step 0 is a new wandb run (a resumed one continues the run named in this file).
            (self.ckpt_dir / "wandb_id").unlink(missing_ok=True)
        barrier(env)

        metrics_path = self.out_dir / "metrics.jsonl"
        mlog = MetricsLog(metrics_path if env.is_main else None, previous)
        wandb_run = WandbRun(
            cfg.wandb,
            self.run_name,
            self.config_to_log,
            self.out_dir,
            self.ckpt_dir / "wandb_id",
            active=env.is_main,
        )
        bar = Progress(self.total_steps, start, active=env.is_main)
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)
        warm = warmup_steps(self.total_steps, cfg.warmup_ratio)
        (log.info if env.is_main else log.debug)(
            "fine-tuning %d trainable parameters: %d steps (%d per epoch, warmup %d), %d examples, "
            "effective batch %d = %d micro x %d accumulation x %d processes",
            *(n_trainable, self.total_steps, self.steps_per_epoch, warm, len(self.train_set)),
            *(cfg.effective_batch, cfg.micro_batch_size, self.accum, env.world_size),
        )

        step_times, step_tokens = [], []
        t_begin = time.perf_counter()
        row: dict[str, Any] = {}
        try:
            for step in range(start, self.total_steps):
                t0 = time.perf_counter()
                loss, n_tokens, grad_norm, lr = self._step(wrapped, opt, sched, step)
                dt = time.perf_counter() - t0
                step_times.append(dt)
                step_tokens.append(n_tokens)
                summary.setdefault("first_loss", loss)
                summary["last_loss"] = loss
                summary["tokens_seen"] = summary.get("tokens_seen", 0) + n_tokens
                done = step + 1
                row = {
                    "step": done,
                    "epoch": round(done / self.steps_per_epoch, 4),
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": n_tokens,
                    "tokens_per_s": n_tokens / dt,
                    "step_time_s": dt,
                    "elapsed_s": time.perf_counter() - t_begin,
                }
                if done % cfg.log_every == 0 or done == self.total_steps:
                    mlog.write(row)
                    wandb_run.log(row, done)
                bar.update(loss, n_tokens / dt, lr)
                if (cfg.save_every and done % cfg.save_every == 0) or done == self.total_steps:
                    self._save(done, opt, sched, summary, metrics_path)
                if self.on_step is not None:
                    self.on_step(done, row)
        finally:
            bar.close()
            mlog.close()

        timed = step_times[1:] or step_times  # the first step pays one-off costs (allocation, kernels)
        timed_tokens = step_tokens[1:] or step_tokens
        result = {
            "final_loss": summary.get("last_loss", float("nan")),
            "first_loss": summary.get("first_loss", float("nan")),
            "steps": self.total_steps,
            "steps_run": len(step_times),
            "resumed_from_step": start,
            "steps_per_epoch": self.steps_per_epoch,
            "n_examples": len(self.train_set),
            "effective_batch": cfg.effective_batch,
            "grad_accum": self.accum,
            "world_size": env.world_size,
            "trainable_params": n_trainable,
            "tokens_seen": summary.get("tokens_seen", 0),
            "tokens_per_s": (sum(timed_tokens) / sum(timed)) if timed else float("nan"),
            "step_time_s": statistics.median(timed) if timed else float("nan"),
            "train_time_s": time.perf_counter() - t_begin,
            **_peak_memory(env),
            "final_checkpoint": str(self.ckpt_dir / f"step-{self.total_steps}"),
        }
        wandb_run.summary(result)
        wandb_run.finish()
        return result

    def _step(self, wrapped: nn.Module, opt, sched, step: int) -> tuple[float, int, float | None, float]:
        env, cfg = self.env, self.cfg
        batches = self._step_batches(step)
        if self.step_hook is not None:
            self.step_hook.before_step(step, self.total_steps)
        counts = torch.tensor(
            [
                sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches),
                sum(int(b["attention_mask"].sum()) for b in batches),
            ],
            dtype=torch.float64,
            device=env.device,
        )
        all_reduce_sum(counts, env)
        n_target = max(1.0, float(counts[0]))
        scale = env.world_size / n_target
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        for j, b in enumerate(batches):
            last = j == len(batches) - 1
            b = {k: v.to(env.device, non_blocking=True) for k, v in b.items()}
            with self._no_sync(wrapped, last):  # forward and backward both inside (DDP's requirement)
                with self._autocast():
                    out = wrapped(
                        input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False
                    )
                logits = out.logits
                # Predict token t+1 from tokens <= t: shift the labels, not the (large) logits.
                target = F.pad(b["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
                loss = F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]),
                    target.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
                (loss * scale).backward()
            loss_sum += loss.detach().double()
            del out, logits, loss
        if self.step_hook is not None:
            self.step_hook.before_optimizer(step, opt)
        params = [p for _, p in self.params]
        if cfg.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        else:
            grad_norm = None
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        all_reduce_sum(loss_sum, env)
        return float(loss_sum) / n_target, int(counts[1]), grad_norm, lr

    def _no_sync(self, wrapped: nn.Module, last: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if self.env.world_size == 1 or last:
            if self.cfg.fsdp and self.env.world_size > 1:
                wrapped.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.cfg.fsdp:
            wrapped.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return wrapped.no_sync()


# ----------------------------------------------------------------------------------------- helpers
def _no_weight_decay(model: nn.Module, name: str) -> bool:
    """HF Trainer's rule: no decay on biases and normalisation weights."""
    if name.endswith("bias"):
        return True
    module_name = name.rsplit(".", 1)[0] if "." in name else ""
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    return isinstance(module, nn.LayerNorm | nn.GroupNorm) or "Norm" in type(module).__name__


def _full(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a (possibly sharded) DTensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _full_numel(p: torch.Tensor) -> int:
    return int(math.prod(p.shape))


def _like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full optimizer-state tensor placed like ``param`` (sharded the same way under FSDP)."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value.to(param.device)


def _copy_into(param: torch.Tensor, full: torch.Tensor) -> None:
    if hasattr(param, "device_mesh"):
        param.copy_(_like(full.to(param.dtype), param))
    else:
        param.copy_(full.to(device=param.device, dtype=param.dtype))


def _fully_shard(model: nn.Module, env: DistEnv) -> nn.Module:
    """FSDP2: shard each transformer block (the classes HF lists in ``_no_split_modules``), then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    block_names = set()
    for m in model.modules():
        block_names.update(getattr(m, "_no_split_modules", None) or [])
    for m in model.modules():
        if type(m).__name__ in block_names:
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _check_fingerprint(saved: dict, current: dict, path: Path) -> None:
    for k in _FINGERPRINT_KEYS:
        was = saved.get(k, _FINGERPRINT_DEFAULTS.get(k))
        if was != current.get(k):
            raise ValueError(
                f"checkpoint {path} was made with {k}={was!r}, this run has {current.get(k)!r}: "
                f"set train.resume=false to start over, or use another checkpoint folder"
            )


def _peak_memory(env: DistEnv) -> dict[str, Any]:
    if env.device.type == "cuda":
        return {
            "peak_mem_mb": torch.cuda.max_memory_allocated(env.device) / 2**20,
            "peak_mem_kind": "cuda_allocated",
        }
    # Linux reports ru_maxrss in KiB: the whole process's peak resident memory (model, data, libraries).
    return {
        "peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_mem_kind": "cpu_max_rss",
    }
