"""Checks on the configuration that run before any model is loaded.

Every failure is one line naming the key and its allowed values (``ConfigError``); ``__main__`` prints
it and exits with status 2.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from qwha import recipes


def _conf_dir() -> Path:
    """The Hydra config folder: ``qwha/conf`` inside an installed wheel, else the repository's ``conf/``
    (a checkout or an editable install)."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return packaged if (packaged / "config.yaml").is_file() else here.parent / "conf"


CONF_DIR = _conf_dir()
STAGES = ("quantize", "init", "finetune", "eval", "all")
BITS = (2, 3, 4, 8)
GROUPS = ("model", "quant", "adapter", "init", "data", "train", "eval", "experiment", "method", "budget")
DEVICES = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def _lr_for(table, data: str, bits: int) -> float:
    """``${lr_for:${model.lr},${data.name},${bits}}``: the model's learning rate for (data, bits)."""
    return float(table[data][f"b{bits}"])


if not OmegaConf.has_resolver("lr_for"):
    OmegaConf.register_new_resolver("lr_for", _lr_for)


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key and the allowed values."""


def group_options(group: str) -> list[str]:
    """Config names available in ``conf/<group>/`` (e.g. the known models)."""
    folder = CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def check_overrides(args: list[str]) -> None:
    """Reject ``group=name`` overrides that name no config, before Hydra composes anything.

    Hydra's own message for this is several lines long; ours names the key and the allowed values.
    Sweeps (``bits=2,3``) are checked value by value.
    """
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key not in GROUPS or value in ("null", ""):
            continue
        allowed = group_options(key)
        for v in _sweep_values(value):
            if v not in allowed:
                raise ConfigError(f"{key}={v!r} is unknown: allowed values are {', '.join(allowed)}")


def _sweep_values(value: str) -> list[str]:
    if value.startswith(("choice(", "range(", "glob(")):
        return []
    return [v.strip() for v in value.split(",") if v.strip()]


def model_widths(cfg: DictConfig) -> tuple[int, int]:
    """(hidden_size, intermediate_size): from the model config, else from the model's config.json."""
    m = cfg.model
    if m.hidden_size is not None and m.intermediate_size is not None:
        return int(m.hidden_size), int(m.intermediate_size)
    path = Path(str(m.id)) / "config.json"
    if path.is_file():
        raw = json.loads(path.read_text())
    else:
        from transformers import AutoConfig

        raw = AutoConfig.from_pretrained(str(m.id)).to_dict()
    return int(raw["hidden_size"]), int(raw["intermediate_size"])


def validate(cfg: DictConfig) -> None:
    """Fail fast on bad input. Cheap: reads configs only (and config.json for `model=hf`)."""
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage={cfg.stage!r} is unknown: allowed values are {', '.join(STAGES)}")
    if OmegaConf.is_missing(cfg.model, "id"):
        raise ConfigError("model.id is required with model=hf: a Hugging Face id or a local folder")
    if not isinstance(cfg.bits, int) or cfg.bits not in BITS:
        raise ConfigError(f"bits={cfg.bits!r} is not supported: allowed values are 2, 3, 4, 8")
    recipes.check(cfg)  # per-method recipe (lr, dropout, rank, alpha, steps): a rule for each, logged
    if not isinstance(cfg.rank, int) or cfg.rank <= 0:
        raise ConfigError(f"rank={cfg.rank!r} must be a positive integer")
    if not isinstance(cfg.group_size, int) or cfg.group_size <= 0:
        raise ConfigError(f"group_size={cfg.group_size!r} must be a positive integer (32, 64, 128, 256)")
    if not DEVICES.match(str(cfg.device)):
        raise ConfigError(f"device={cfg.device!r} is unknown: allowed values are auto, cpu, cuda, cuda:N")
    cd_iters = cfg.quant.get("cd_iters", 0)
    if cd_iters != "auto" and (isinstance(cd_iters, bool) or not isinstance(cd_iters, int) or cd_iters < 0):
        raise ConfigError(f"quant.cd_iters={cd_iters!r}: allowed values are auto or an integer >= 0")
    if cfg.quant.method != "none":
        hidden, inter = model_widths(cfg)
        bad = [w for w in sorted({hidden, inter}) if w % cfg.group_size]
        if bad:
            ok = ", ".join(str(g) for g in (16, 32, 64, 128, 256) if hidden % g == 0 and inter % g == 0)
            raise ConfigError(
                f"group_size={cfg.group_size} does not divide the {cfg.model.name} layer width(s) "
                f"{', '.join(map(str, bad))}: allowed values for this model are {ok}"
            )
    kind = cfg.init.kind
    method = cfg.adapter.method
    if method == "lota" and kind != "lota":
        raise ConfigError(
            f"adapter=lota needs init=lota (ternary A, B = 0), got init={cfg.init.method}; "
            "method=lota sets both"
        )
    needs = {"sparse": ("wha",), "lowrank": ("lora",), "lota": ("lota",)}
    use = {"sparse": "wha|dca|dha|sparse|dct2d|wht2d", "lowrank": "lora", "lota": "lota"}
    if kind in needs and method not in needs[kind]:
        raise ConfigError(
            f"init={cfg.init.method} ({kind}) does not fit adapter.method={method!r}: use adapter={use[kind]}"
        )
    if method == "lota":
        _validate_lota(cfg)
    _validate_baselines(cfg)
    if cfg.eval.target not in ("quantize", "init", "finetune"):
        raise ConfigError(
            f"eval.target={cfg.eval.target!r} is unknown: allowed values are quantize, init, finetune"
        )
    for key in ("data.source", "eval.source"):
        value = OmegaConf.select(cfg, key)
        if value not in ("auto", "packaged", "hub"):
            raise ConfigError(f"{key}={value!r} is unknown: allowed values are auto, packaged, hub")
    solver = OmegaConf.select(cfg, "quant.magr_solver", default="ista")
    if solver not in ("ista", "fista"):
        raise ConfigError(f"quant.magr_solver={solver!r} is unknown: allowed values are ista, fista")
    if cfg.data.format == "jsonl":  # custom data: the file and its fields, read once, no model loaded
        from qwha.data.jsonl import check

        check(cfg.data)


def _validate_baselines(cfg: DictConfig) -> None:
    """LoftQ's iterations and LoCA's location learning (``adapter.loca``)."""
    if cfg.init.method == "loftq":
        iters = cfg.init.get("loftq_iters", 1)
        if iters != 1:
            raise ConfigError(
                f"init.loftq_iters={iters!r} is not supported: more steps would re-quantize the base "
                "weight, which the stored quantized model does not take; allowed values: 1"
            )
    loca = cfg.adapter.get("loca")
    if loca is None or not loca.get("enabled", False):
        return
    from qwha.adapters.loca import LoCAConfig

    try:
        LoCAConfig.from_mapping(loca)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.adapter.method != "wha":
        raise ConfigError(
            f"adapter.loca.enabled=true needs adapter.method=wha, got {cfg.adapter.method!r}: "
            "allowed adapters are the sparse ones (dct2d, dht2d, wha, dca, dha, sparse, wht2d)"
        )
    if cfg.train.fsdp:
        raise ConfigError(
            "train.fsdp=true does not fit adapter.loca.enabled=true: location steps need whole tensors; "
            "allowed: train.fsdp=false (DDP)"
        )


def _validate_lota(cfg: DictConfig) -> None:
    """LoTA-QAF moves integer codes: it needs a quantized model, its own init, and a sane schedule."""
    a = cfg.adapter
    if cfg.quant.method == "none":
        raise ConfigError(
            "adapter=lota needs a quantized model: quant.method=none has no integer grid; "
            "allowed values are rtn, gptq, magr_gptq"
        )
    if not isinstance(a.rank, int) or a.rank <= 0:
        raise ConfigError(f"adapter.rank={a.rank!r} must be a positive integer")
    if a.omega is not None and not (isinstance(a.omega, int | float) and a.omega > 0):
        raise ConfigError(f"adapter.omega={a.omega!r} must be a positive number or null (0.75 * rank)")
    for key in ("keep_start", "keep_mid", "keep_end", "mid_fraction"):
        value = a[key]
        if not (isinstance(value, int | float) and 0 < value <= 1):
            raise ConfigError(f"adapter.{key}={value!r} must be in (0, 1]")
    if cfg.train.fsdp:
        raise ConfigError("train.fsdp=true does not fit adapter=lota: t-SignSGD needs whole tensors; use DDP")
