"""What a run reports: while it trains, a local ``metrics.jsonl``, wandb (offline by default) and a
progress bar; after each evaluation, the eval metrics to wandb (:func:`log_eval`).

Only the main process (rank 0) creates any of them; the others get no-op objects.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any

from qwha.finetune.config import WandbConfig


class MetricsLog:
    """Appends one JSON line per logged step to ``path`` (flushed, so a kill loses at most one line)."""

    def __init__(self, path: Path | None, previous: list[dict] | None = None) -> None:
        self.path = path
        self._f = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
            for row in previous or []:
                self._f.write(json.dumps(row) + "\n")
            self._f.flush()

    def write(self, row: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class WandbRun:
    """A wandb run, or nothing when the mode is ``disabled`` or on a non-main process.

    The run id is kept in ``id_file`` (beside the checkpoints), so a resumed run continues the same wandb
    run. The resolved configuration is attached as the run's config.
    """

    def __init__(
        self,
        cfg: WandbConfig,
        run_name: str | None,
        config: dict | None,
        out_dir: Path,
        id_file: Path | None,
        active: bool,
    ) -> None:
        self.run = None
        if not active or cfg.mode == "disabled":
            return
        try:
            import wandb
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ModuleNotFoundError(
                "train.wandb.mode is not 'disabled' but wandb is not installed; `pip install wandb` or set "
                "train.wandb.mode=disabled"
            ) from e
        run_id = None
        if id_file is not None and id_file.is_file():
            run_id = id_file.read_text().strip() or None
        if run_id is None:
            run_id = uuid.uuid4().hex[:12]
            if id_file is not None:
                id_file.parent.mkdir(parents=True, exist_ok=True)
                id_file.write_text(run_id)
        self.run = wandb.init(
            project=cfg.project,
            name=cfg.name or run_name,
            mode=cfg.mode,
            config=config or {},
            dir=str(out_dir),
            id=run_id,
            resume="allow",
        )

    def log(self, row: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(
                {f"train/{k}": v for k, v in row.items() if k != "step" and v is not None}, step=step
            )

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self.run.summary[k] = v

    def finish(self) -> None:
        if self.run is not None:
            import wandb

            self.run.finish()
            # finish() may return before wandb's service has flushed the offline log (observed with wandb
            # 0.31: a 7-byte file right after finish); teardown waits for it, so the artifact is complete.
            wandb.teardown()
            self.run = None


class Progress:
    """A tqdm bar over optimizer steps with loss and tokens/s (main process only)."""

    def __init__(self, total: int, initial: int, active: bool) -> None:
        self.bar = None
        if active:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="finetune", unit="step", dynamic_ncols=True)

    def update(self, loss: float, tokens_per_s: float, lr: float | None) -> None:
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{loss:.4f}",
                tok_s=f"{tokens_per_s:.0f}",
                lr="-" if lr is None else f"{lr:.2e}",
                refresh=False,
            )
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def flat_metrics(results: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Finite numbers of a nested results dict as ``{"a/b/c": value}`` (lists and strings left out)."""
    out: dict[str, float] = {}
    for k, v in results.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_metrics(v, key + "/"))
        elif isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)
    return out


def log_eval(
    cfg: WandbConfig, run_name: str, results: dict[str, Any], out_dir: Path, target: str
) -> dict[str, float]:
    """Send one evaluation's metrics to wandb as its own run (``job_type="eval"``), grouped with the
    fine-tuning run of the same name, so the project shows training curves and eval numbers together.

    Logs ``eval/<metric>`` for every finite number in ``results`` (per-task scores included) and puts
    them in the run summary. Files go under ``out_dir``. Returns what was logged (empty when the mode is
    ``disabled``).
    """
    metrics = {f"eval/{k}": v for k, v in flat_metrics(results).items() if k not in ("seed", "rank", "bits")}
    if cfg.mode == "disabled":
        return {}
    import wandb

    run = wandb.init(
        project=cfg.project,
        name=f"{cfg.name or run_name}-eval-{target}",
        group=cfg.name or run_name,
        job_type="eval",
        mode=cfg.mode,
        dir=str(out_dir),
        config={
            k: results.get(k) for k in ("model", "target", "quant", "bits", "adapter", "init", "data", "seed")
        },
    )
    run.log(metrics)
    for k, v in metrics.items():
        run.summary[k] = v
    run.finish()
    wandb.teardown()  # as in WandbRun.finish: the offline files are complete when this returns
    return metrics
