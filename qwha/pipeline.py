"""Resolve a stage and everything upstream of it through the cache."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from qwha.cache import Artifact, StageCache, config_key
from qwha.config import check_shapes, model_shapes, shapes_from_json, validate_after_load
from qwha.stages import PIPELINE, get_stage

log = logging.getLogger("qwha.pipeline")


def stage_key(name: str, cfg: DictConfig, upstream_keys: dict[str, str]) -> tuple[str, dict]:
    """(key, config slice) of a stage given the keys of its inputs."""
    slice_ = _plain(get_stage(name).key_config(cfg))
    return config_key(name, slice_, upstream_keys), slice_


def _plain(x):
    """Resolved plain Python values (interpolations resolved against the whole config)."""
    if isinstance(x, DictConfig | ListConfig):
        return OmegaConf.to_container(x, resolve=True)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def materialize(
    name: str,
    cfg: DictConfig,
    cache: StageCache,
    *,
    force: frozenset[str] = frozenset(),
    done: dict[str, tuple[Artifact, bool]] | None = None,
) -> Artifact:
    """The artifact of stage ``name`` for ``cfg``: from the cache, or computed (inputs first).

    ``done`` collects (artifact, hit) per stage for the run summary; stages in ``force`` are recomputed.
    """
    done = {} if done is None else done
    if name in done:
        return done[name][0]
    mod = get_stage(name)
    inputs = {up: materialize(up, cfg, cache, force=force, done=done) for up in mod.upstream(cfg)}
    key, slice_ = stage_key(name, cfg, {up: a.key for up, a in inputs.items()})
    resumable = getattr(mod, "RESUMABLE", False)

    def build(out):
        if resumable:  # checkpoints survive a killed run in a stable folder keyed like the artifact
            return mod.run(cfg, out, inputs, work=cache.work_dir(name, key))
        return mod.run(cfg, out, inputs)

    if not is_main_process():
        return _follower(name, key, cache, build)
    # The build lock of (name, key) is held while building, and so while the work folder is in use; it
    # is removed (under the lock) once the artifact is published.
    artifact, hit = cache.get_or_build(
        name,
        key,
        build,
        config=slice_,
        upstream={up: a.key for up, a in inputs.items()},
        force=name in force,
        work=resumable,
    )
    done[name] = (artifact, hit)
    if name == "base":
        _check_base_shapes(cfg, artifact)
    return artifact


def _check_base_shapes(cfg: DictConfig, base: Artifact) -> None:
    """Once a converted model (GGUF) has its config.json, the width checks again with every layer's
    width (the key/value projections' is known only from there), before any stage uses the model."""
    config_json = base.path / "model" / "config.json"
    if config_json.is_file():
        shapes = shapes_from_json(cfg, json.loads(config_json.read_text()))
        if shapes is not None:
            check_shapes(cfg, shapes)


def is_main_process() -> bool:
    """Rank 0 under torchrun (or a plain single process): the only process that publishes artifacts."""
    return int(os.environ.get("RANK", "0")) == 0


def _follower(name: str, key: str, cache: StageCache, build) -> Artifact:
    """A non-zero rank under torchrun: upstream artifacts must exist; the distributed stage itself runs
    (the trainer synchronises with rank 0) into a private folder that is thrown away."""
    found = cache.lookup(name, key, verify=False, discard=False)
    if found is not None:
        return found
    if name != "finetune":
        raise RuntimeError(
            f"stage {name!r} is not cached; under torchrun only `finetune` runs distributed: run "
            "`python -m qwha stage=init ...` in one process first"
        )
    with tempfile.TemporaryDirectory(prefix=f"qwha-rank{os.environ.get('RANK')}-") as tmp:
        build(Path(tmp))
    return Artifact(name, key, cache.path(name, key))


def plan(name: str, cfg: DictConfig, cache: StageCache, rows: dict | None = None) -> dict[str, dict]:
    """Keys and cache status of ``name`` and its inputs, computing nothing (``dry_run=true``)."""
    rows = {} if rows is None else rows
    if name in rows:
        return rows
    mod = get_stage(name)
    ups = mod.upstream(cfg)
    for up in ups:
        plan(up, cfg, cache, rows)
    key, _ = stage_key(name, cfg, {up: rows[up]["key"] for up in ups})
    hit = cache.lookup(name, key, verify=False, discard=False) is not None
    rows[name] = {"key": key, "cached": hit, "path": str(cache.path(name, key))}
    return rows


def run_stage(cfg: DictConfig, cache: StageCache) -> dict[str, tuple[Artifact, bool]]:
    """Run ``cfg.stage`` (or the whole pipeline for ``all``); returns every artifact touched."""
    target = PIPELINE[-1] if cfg.stage == "all" else cfg.stage
    force = frozenset(PIPELINE if cfg.stage == "all" else (cfg.stage,)) if cfg.force else frozenset()
    if model_shapes(cfg) is None:  # a hub model not in the local cache: width checks on its config.json
        validate_after_load(cfg)
    if is_main_process():
        cache.sweep()  # .tmp-* folders of runs killed more than a day ago
    done: dict[str, tuple[Artifact, bool]] = {}
    materialize(target, cfg, cache, force=force, done=done)
    return done


def summary_table(done: dict[str, tuple[Artifact, bool]]) -> str:
    """A markdown table of the stages touched: cached or computed, headline metrics, path."""
    rows = ["| stage | status | key metrics | artifact |", "|---|---|---|---|"]
    for name, (art, hit) in done.items():
        metrics = art.metrics
        shown = ", ".join(
            f"{k}={_fmt(v)}"
            for k, v in metrics.get("summary", metrics).items()
            if isinstance(v, int | float | str) and not isinstance(v, bool)
        )[:160]
        rows.append(f"| {name} | {'cached' if hit else 'computed'} | {shown} | {art.path} |")
    return "\n".join(rows)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
