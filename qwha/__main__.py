"""``python -m qwha``: the single entry point (a Hydra app over ``conf/``).

python -m qwha                                  # embedded default, offline, all stages
python -m qwha stage=init model=llama3.2-3b bits=2
python -m qwha -m bits=2,3,4                    # sweep
python -m qwha --help | --cfg job
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys

import hydra
from omegaconf import DictConfig

import qwha  # noqa: F401  (environment hygiene before the heavy imports)
from qwha.config import CONF_DIR, ConfigError, check_overrides, validate

log = logging.getLogger("qwha")


# Warnings of third-party libraries that a user can do nothing about (torchao's optional CUDA extensions,
# torch's pytree deprecation notes raised by torchao, GPTQModel's banner and its notes on the GIL and on
# calibration sizes): silenced before those libraries load. Errors still show.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def _quiet_imports() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:  # GPTQModel logs through LogBar's shared logger, which sets its own level when first created;
        # importing logbar writes an empty line to stdout, kept out of `dry_run` listings.
        with contextlib.redirect_stdout(io.StringIO()):
            from logbar import LogBar

            LogBar.shared().setLevel(logging.ERROR)
    except ImportError:  # pragma: no cover - logbar comes with gptqmodel
        pass


def _fail(msg: str, code: int = 2) -> None:
    print(f"qwha: error: {msg}", file=sys.stderr)
    sys.exit(code)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict | None:
    _quiet_imports()
    from qwha.runtime import quiet_third_party_logs, set_offline

    set_offline(bool(cfg.offline))
    try:
        if not cfg.dry_run:
            from qwha.hub import check_model_for

            check_model_for(cfg)  # the Hub (or the cache) answers in seconds, before anything is built
        validate(cfg)
    except ConfigError as e:
        _fail(str(e))
    from qwha.cache import CacheError, StageCache

    try:
        cache = StageCache(cfg.cache_dir)  # reads QWHA_CACHE_LOCK / QWHA_CACHE_LOCK_STALE_S
    except CacheError as e:
        _fail(str(e))
    quiet_third_party_logs()

    from qwha.pipeline import plan, run_stage, summary_table
    from qwha.stages import PIPELINE, StageNotReady

    target = PIPELINE[-1] if cfg.stage == "all" else cfg.stage
    if not cfg.dry_run:
        from qwha.hub import check_run

        rows = plan(target, cfg, cache)
        todo = [n for n, row in rows.items() if cfg.force or not row["cached"]]
        try:
            check_run(cfg, todo)  # datasets and target modules of the stages that will compute
        except ConfigError as e:
            _fail(str(e))
    try:
        cache.check_writable()
    except CacheError as e:
        _fail(str(e))

    if cfg.dry_run:
        rows = plan(target, cfg, cache)
        for name, row in rows.items():
            print(f"{name:9s} {row['key']}  {'cached ' if row['cached'] else 'missing'}  {row['path']}")
        return rows

    log.info("stage=%s model=%s bits=%s cache=%s", cfg.stage, cfg.model.name, cfg.bits, cache.root)
    try:
        done = run_stage(cfg, cache)
    except StageNotReady as e:
        _fail(str(e), code=3)
    except ConfigError as e:  # bad input only detectable once data is read (e.g. too little text)
        _fail(str(e))
    except CacheError as e:  # the cache's file system is full: nothing was published
        _fail(str(e), code=1)
    except Exception as e:  # a hub failure the checks above could not foresee: one line, not a traceback
        from qwha.hub import explain

        msg = explain(e)
        if msg is None:
            raise
        _fail(msg)
    log.info("summary\n%s", summary_table(done))
    from qwha.summary import first_run_summary, wanted

    if wanted(cfg):  # `make run`: full precision vs quantized vs initialized vs tuned (qwha/summary.py)
        try:
            print(first_run_summary(cfg, cache, done), flush=True)
        except (StageNotReady, ConfigError) as e:
            _fail(str(e), code=3 if isinstance(e, StageNotReady) else 2)
    return {name: art.metrics for name, (art, _) in done.items()}


def cli() -> None:
    try:
        check_overrides(sys.argv[1:])
    except ConfigError as e:
        _fail(str(e))
    main()


if __name__ == "__main__":
    cli()
