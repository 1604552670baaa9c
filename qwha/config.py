"""Checks on the configuration that run before any model is loaded.

Every failure is one line naming the key and its allowed values (``ConfigError``); ``__main__`` prints
it and exits with status 2.
"""

from __future__ import annotations

import json
import math
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
STAGES = ("quantize", "init", "finetune", "eval", "export", "all")
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


# --------------------------------------------------------------------------------------- value checks
class _Int:
    """An integer (not a bool) in ``[lo, hi]``; ``None`` allowed with ``null``."""

    def __init__(self, lo: int | None = None, hi: int | None = None, null: bool = False, note: str = ""):
        self.lo, self.hi, self.null, self.note = lo, hi, null, note

    def check(self, v) -> bool:
        if v is None:
            return self.null
        if isinstance(v, bool) or not isinstance(v, int):
            return False
        return (self.lo is None or v >= self.lo) and (self.hi is None or v <= self.hi)

    def allowed(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"an integer in [{self.lo}, {self.hi}]"
        elif self.lo is not None:
            text = f"an integer >= {self.lo}"
        else:
            text = "an integer"
        return text + (" or null" if self.null else "") + (f" ({self.note})" if self.note else "")


class _Num:
    """A finite number (int or float, not a bool) with optional open/closed bounds."""

    def __init__(self, lo=None, hi=None, lo_open=False, hi_open=False, null=False, note=""):
        self.lo, self.hi, self.lo_open, self.hi_open, self.null, self.note = (
            lo,
            hi,
            lo_open,
            hi_open,
            null,
            note,
        )

    def check(self, v) -> bool:
        if v is None:
            return self.null
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def allowed(self) -> str:
        if self.lo is not None and self.hi is not None:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            text = f"a number in {left}{self.lo:g}, {self.hi:g}{right}"
        elif self.lo is not None:
            text = f"a number {'>' if self.lo_open else '>='} {self.lo:g}"
        else:
            text = "a number"
        return text + (" or null" if self.null else "") + (f" ({self.note})" if self.note else "")


class _Bool:
    def check(self, v) -> bool:
        return isinstance(v, bool)

    def allowed(self) -> str:
        return "true or false"


class _IntOr:
    """An integer (not a bool) >= ``lo``, or one of the named words (e.g. ``auto``)."""

    def __init__(self, lo: int, *words: str, note: str = ""):
        self.int, self.words, self.note = _Int(lo), words, note

    def check(self, v) -> bool:
        return v in self.words if isinstance(v, str) else self.int.check(v)

    def allowed(self) -> str:
        text = " or ".join((*self.words, self.int.allowed()))
        return text + (f" ({self.note})" if self.note else "")


class _Choice:
    def __init__(self, *values):
        self.values = values

    def check(self, v) -> bool:
        return any(v == x and type(v) is type(x) for x in self.values)

    def allowed(self) -> str:
        return "one of " + ", ".join(
            "null" if x is None else str(x).lower() if isinstance(x, bool) else str(x) for x in self.values
        )


_SEED = _Int(0, 2**32 - 1)
_POS = _Int(1)
_POS_OR_NULL = _Int(1, null=True)
# Every numeric, boolean and enumerated key of the composed config that a stage reads (a key a group does
# not define is skipped). Checked in this order: top-level keys first, as the groups interpolate them.
VALUE_CHECKS: dict[str, object] = {
    "seed": _SEED,
    "force": _Bool(),
    "dry_run": _Bool(),
    "model.source": _Choice("gguf", "hub"),
    "model.offline": _Bool(),
    "offline": _Bool(),  # ${model.offline} unless set
    "model.dtype": _Choice("float32", "bfloat16", "float16"),
    "model.hidden_size": _POS_OR_NULL,
    "model.kv_width": _POS_OR_NULL,
    "model.intermediate_size": _POS_OR_NULL,
    "model.text_source": _Choice("packaged", "wikitext2"),
    "model.calib_windows": _POS,
    "model.calib_length": _Int(2),
    "model.max_steps": _POS_OR_NULL,
    "model.effective_batch": _POS,
    "model.max_length": _Int(2),
    "model.eval_limit": _POS_OR_NULL,
    "model.ppl_max_tokens": _Int(2, null=True),
    "model.ppl_stride": _POS,
    "calib.source": _Choice("packaged", "wikitext2"),
    "calib.n": _POS,
    "calib.length": _Int(2),
    "calib.seed": _SEED,
    "quant.method": _Choice("none", "rtn", "gptq", "magr_gptq"),
    "quant.bits": _Choice(*BITS),
    "quant.group_size": _POS,
    "quant.damp": _Num(0, lo_open=True),
    "quant.magr_alpha": _Num(0),
    "quant.magr_iters": _Int(0),
    "quant.cd_iters": _IntOr(
        0, "auto", note="coordinate-descent sweeps after GPTQ; auto: 30 at 2 bits, else 1"
    ),
    "quant.cd_damp": _Num(0, lo_open=True),
    "adapter.rank": _POS,
    "adapter.loca.enabled": _Bool(),
    "adapter.loca.coef_steps": _POS,
    "adapter.loca.location_steps": _POS,
    "adapter.loca.learn_fraction": _Num(0, 1),
    "adapter.loca.location_lr": _Num(0, lo_open=True),
    "adapter.loca.grad_clip": _Num(0, lo_open=True),
    "adapter.transform": _Choice("wht", "dct", "dht", "identity"),
    "adapter.dims": _Choice(1, 2),
    "adapter.scale_norm": _Choice("paper", "reference", "none"),
    "adapter.alpha": _Num(0, lo_open=True),
    "adapter.lora_alpha": _Num(0, lo_open=True),
    "adapter.dropout": _Num(0, 1, hi_open=True),
    "adapter.seed": _SEED,
    "adapter.omega": _Num(0, lo_open=True, null=True, note="null: 0.75 * rank"),
    "adapter.keep_start": _Num(0, 1, lo_open=True),
    "adapter.keep_mid": _Num(0, 1, lo_open=True),
    "adapter.keep_end": _Num(0, 1, lo_open=True),
    "adapter.mid_fraction": _Num(0, 1, lo_open=True),
    "init.kind": _Choice("sparse", "lowrank", "lota"),
    "init.alloc_weight": _Choice("activation", "weight"),
    "init.score": _Choice("magnitude", "energy"),
    "init.refine": _Bool(),
    "init.temperature": _Num(0, lo_open=True),
    "init.scale_norm": _Choice("paper", "reference", "none"),
    "init.gram_budget_gb": _Num(0, lo_open=True),
    "init.batch_size": _POS,
    "init.loftq_iters": _POS,
    "data.name": _Choice("gsm8k", "alpaca", "jsonl"),  # gsm8k/alpaca: a row of the model's lr table
    "data.format": _Choice("gsm8k", "alpaca", "jsonl"),
    "data.lr_like": _Choice("gsm8k", "alpaca"),  # data=jsonl: the lr-table row a custom set uses
    "data.packaged_size": _POS_OR_NULL,
    "data.mask_prompt": _Bool(),
    "export.bits": _Choice(*BITS),
    "export.group_size": _POS,
    "export.calib_windows": _POS_OR_NULL,
    "export.measure.perplexity": _Bool(),
    "export.measure.gsm8k_answer_nll": _Bool(),
    "first_run.compare": _Bool(),
    "first_run.magr_iters": _Int(0),
    "model.first_run.compare": _Bool(),
    "model.first_run.magr_iters": _Int(0),
    "data.max_length": _Int(2),
    "data.epochs": _Num(0, lo_open=True),
    "data.weight_decay": _Num(0),
    "train.lr": _Num(0, lo_open=True),
    "train.epochs": _Num(0, lo_open=True),
    "train.max_steps": _POS_OR_NULL,
    "train.micro_batch_size": _POS,
    "train.effective_batch": _POS,
    "train.weight_decay": _Num(0),
    "train.warmup_ratio": _Num(0, 1, hi_open=True),
    "train.scheduler": _Choice("cosine", "linear", "constant"),
    "train.max_grad_norm": _Num(0, null=True, note="0 or null: no clipping"),
    "train.precision": _Choice("auto", "bf16", "fp32"),
    "train.grad_checkpointing": _Bool(),
    "train.save_every": _Int(0, note="0: only at the end"),
    "train.keep_last": _Int(0, note="0: keep all"),
    "train.resume": _Bool(),
    "train.log_every": _POS,
    "train.fsdp": _Bool(),
    "train.wandb.mode": _Choice("offline", "online", "disabled"),
    "eval.csqa.enabled": _Choice("auto", True, False),
    "eval.csqa.limit": _POS_OR_NULL,
    "eval.csqa.sample_seed": _SEED,
    "eval.gsm8k.answer_nll_limit": _POS_OR_NULL,
    "eval.train_heldout.enabled": _Bool(),
    "eval.train_heldout.size": _POS,
    "eval.train_heldout.batch_size": _POS,
    "eval.train_heldout.seed": _SEED,
    "eval.csqa.batch_size": _POS,
    "eval.gsm8k.enabled": _Choice("auto", True, False),
    "eval.gsm8k.limit": _POS_OR_NULL,
    "eval.gsm8k.decoding": _Choice("sample", "greedy"),
    "eval.gsm8k.max_new_tokens": _POS,
    "eval.gsm8k.batch_size": _POS,
    "eval.gsm8k.seed": _SEED,
    "eval.gsm8k.answer_nll": _Bool(),
    "eval.perplexity.enabled": _Bool(),
    "eval.perplexity.window": _Int(2),
    "eval.perplexity.stride": _POS,
    "eval.perplexity.max_tokens": _Int(2, null=True),
}
_ABSENT = object()
# A Hugging Face repo id: `name` or `owner/name` (huggingface_hub's rules: word characters, '-', '.').
HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
# The linear layers of a decoder block by the widths they map between.
_WIDTHS = {
    "q_proj": ("hidden", "hidden"),
    "o_proj": ("hidden", "hidden"),
    "k_proj": ("hidden", "kv"),
    "v_proj": ("hidden", "kv"),
    "gate_proj": ("hidden", "intermediate"),
    "up_proj": ("hidden", "intermediate"),
    "down_proj": ("intermediate", "hidden"),
}


def _value(cfg: DictConfig, key: str):
    """The resolved value of ``key`` (``_ABSENT`` if the composed config has no such key)."""
    try:
        return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
    except Exception as e:  # an interpolation that cannot resolve (a bad value it reads)
        cause = str(e).splitlines()[0]
        raise ConfigError(f"{key} cannot be resolved: {cause}") from None


def _lr_leaves(table, prefix: str):
    """``(key path, value)`` of every learning rate in a model's lr table (``<column>.<data>.b<bits>``;
    ``source`` names where the numbers come from and is not a rate)."""
    for name, value in table.items():
        if name == "source":
            continue
        if isinstance(value, dict | DictConfig):
            yield from _lr_leaves(value, f"{prefix}.{name}")
        else:
            yield f"{prefix}.{name}", value


def check_values(cfg: DictConfig) -> None:
    """Types and ranges of every key in :data:`VALUE_CHECKS` (one line naming the first bad key)."""
    for key, rule in VALUE_CHECKS.items():
        value = _value(cfg, key)
        if value is _ABSENT:
            continue
        if not rule.check(value):
            raise ConfigError(f"{key}={value!r} is not allowed: {rule.allowed()}")
    lr_table = _value(cfg, "model.lr")
    for path, lr in _lr_leaves(lr_table if isinstance(lr_table, dict | DictConfig) else {}, "model.lr"):
        if not _Num(0, lo_open=True).check(lr):
            raise ConfigError(f"{path}={lr!r} is not allowed: a number > 0")
    stride, window = _value(cfg, "eval.perplexity.stride"), _value(cfg, "eval.perplexity.window")
    if stride is not _ABSENT and window is not _ABSENT and stride > window:
        raise ConfigError(
            f"eval.perplexity.stride={stride} is larger than eval.perplexity.window={window}: "
            f"allowed values are 1..{window}"
        )
    micro, batch = _value(cfg, "train.micro_batch_size"), _value(cfg, "train.effective_batch")
    if batch % micro:
        raise ConfigError(
            f"train.effective_batch={batch} is not a multiple of train.micro_batch_size={micro}: "
            f"allowed values of train.micro_batch_size are divisors of {batch}"
        )


def check_model_id(cfg: DictConfig) -> None:
    """``model.id`` of a hub model: an existing local folder, or shaped like a hub id (owner/name)."""
    if str(cfg.model.source) != "hub":
        return
    mid = str(cfg.model.id)
    path = Path(mid).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise ConfigError(
            f"model.id={mid!r} is a file: allowed values are a model folder or a hub id (owner/name)"
        )
    if not HUB_ID.match(mid) or "--" in mid or ".." in mid:
        raise ConfigError(
            f"model.id={mid!r} is neither an existing folder nor a Hugging Face id: allowed values are a "
            "local model folder or owner/name"
        )


def model_shapes(cfg: DictConfig, *, load: bool = False) -> dict[str, int] | None:
    """{hidden, intermediate[, kv]} widths of the model's decoder linears, or None when unknown.

    From the model config (``model.hidden_size``/``intermediate_size``), else the model's config.json in
    a local folder or the hub cache; ``load=True`` also fetches config.json from the hub (a few kB).
    The key/value width comes from ``model.kv_width``, else from config.json.
    """
    m = cfg.model
    return shapes_from_json(cfg, _model_config_json(str(m.id), load=load and str(m.source) == "hub"))


def shapes_from_json(cfg: DictConfig, raw: dict | None) -> dict[str, int] | None:
    """:func:`model_shapes` given the model's config.json contents (``raw``, or None if unknown)."""
    m = cfg.model
    hidden = m.hidden_size if m.hidden_size is not None else (raw or {}).get("hidden_size")
    inter = m.intermediate_size if m.intermediate_size is not None else (raw or {}).get("intermediate_size")
    if hidden is None or inter is None:
        return None
    out = {"hidden": int(hidden), "intermediate": int(inter)}
    if m.get("kv_width") is not None:  # the model config's k/v output width (num_key_value_heads * head_dim)
        out["kv"] = int(m.kv_width)
    elif raw and raw.get("num_attention_heads") and int(raw.get("hidden_size", hidden)) == int(hidden):
        heads = int(raw["num_attention_heads"])
        head_dim = int(raw.get("head_dim") or int(hidden) // heads)
        out["kv"] = int(raw.get("num_key_value_heads") or heads) * head_dim
    return out


def _model_config_json(model_id: str, *, load: bool) -> dict | None:
    path = Path(model_id).expanduser() / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    if not HUB_ID.match(model_id):
        return None
    try:
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(model_id, "config.json", local_files_only=not load)
    except Exception:  # not cached (offline), no such repo, no network: unknown here
        if load:
            raise ConfigError(
                f"model.id={model_id!r}: its config.json cannot be fetched from the hub; allowed values "
                "are a local model folder or an existing hub id (owner/name)"
            ) from None
        return None
    return json.loads(Path(local).read_text())


def model_widths(cfg: DictConfig) -> tuple[int, int]:
    """(hidden_size, intermediate_size): from the model config, else from the model's config.json."""
    shapes = model_shapes(cfg, load=True)
    if shapes is None:
        raise ConfigError(
            f"model.id={str(cfg.model.id)!r}: its config.json has no hidden_size/intermediate_size"
        )
    return shapes["hidden"], shapes["intermediate"]


def check_shapes(cfg: DictConfig, shapes: dict[str, int]) -> None:
    """Checks that need the layer widths: group size divides them, and the adapter budget fits.

    A rank-r budget is p = r (d_in + d_out) trainable values per layer; more than the layer's d_in d_out
    weights cannot be placed (a sparse adapter) or spanned (a low-rank one). The largest rank every
    adapted layer can hold is min over layers of floor(d_in d_out / (d_in + d_out)).
    """
    hidden, inter = shapes["hidden"], shapes["intermediate"]
    if cfg.quant.method != "none":
        g = cfg.quant.group_size
        bad = [w for w in sorted({hidden, inter}) if w % g]
        if bad:
            ok = ", ".join(str(x) for x in (16, 32, 64, 128, 256) if hidden % x == 0 and inter % x == 0)
            raise ConfigError(
                f"group_size={g} does not divide the {cfg.model.name} layer width(s) "
                f"{', '.join(map(str, bad))}: allowed values for this model are {ok}"
            )
    targets = [t for t in OmegaConf.select(cfg, "adapter.target_modules", default=[]) or [] if t in _WIDTHS]
    layers = {}
    for t in targets:
        d_in, d_out = (shapes.get(w) for w in _WIDTHS[t])
        if d_in is not None and d_out is not None:
            layers[t] = (d_out, d_in)
    family = str(cfg.adapter.method)
    if not layers or family not in ("wha", "lora", "lota"):
        return
    cap, layer = recipes.capacity(family, layers)
    r = cfg.adapter.rank
    if r > cap:
        d_out, d_in = layers[layer]
        rule = "r*(d_in+d_out) exceeds d_in*d_out" if family == "wha" else "r exceeds min(d_in, d_out)"
        raise ConfigError(
            f"rank={r} does not fit the {cfg.model.name} layers: {rule} for {layer} ({d_in}x{d_out}) with "
            f"adapter.method={family}; allowed values are 1..{cap}"
        )


def _interpolated(cfg: DictConfig, key: str) -> bool:
    """The key's raw value is an interpolation (``${...}``), not a value the user typed."""
    raw = OmegaConf.to_container(cfg, resolve=False).get(key)
    return isinstance(raw, str) and raw.strip().startswith("${")


def _check_rank(cfg: DictConfig) -> None:
    if isinstance(cfg.rank, bool) or not isinstance(cfg.rank, int) or cfg.rank <= 0:
        raise ConfigError(f"rank={cfg.rank!r} must be a positive integer")


def validate_after_load(cfg: DictConfig) -> None:
    """The width checks for a model whose widths were unknown before (a hub id not in the local cache):
    run once its config.json is fetched, before any stage starts."""
    shapes = model_shapes(cfg, load=True)
    if shapes is not None:
        check_shapes(cfg, shapes)


def validate(cfg: DictConfig) -> None:
    """Fail fast on bad input, whatever the stage: the single entry point for every config check.

    A check that fails inside an interpolation (a ``${recipe:...}`` value) reaches the caller as the
    one-line :class:`ConfigError` it raised, not as OmegaConf's wrapper.
    """
    from omegaconf.errors import InterpolationResolutionError

    try:
        _validate(cfg)
    except InterpolationResolutionError as err:
        seen, todo = set(), [err]
        while todo:  # OmegaConf chains the resolver's own error through __cause__ / __context__
            cur = todo.pop()
            if id(cur) in seen:
                continue
            seen.add(id(cur))
            if isinstance(cur, ConfigError):
                raise cur from None
            todo += [e for e in (cur.__cause__, cur.__context__) if e is not None]
        raise ConfigError(str(err).splitlines()[0]) from None


def _validate(cfg: DictConfig) -> None:
    """The checks of :func:`validate`, in order.

    Cheap: reads configs only (and a model's config.json when it is local or cached). Order: the stage and
    model, the top-level keys the groups interpolate (bits, rank, group_size), every value's type and
    range, the model id, the layer widths (group size, rank capacity), then combinations.
    """
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage={cfg.stage!r} is unknown: allowed values are {', '.join(STAGES)}")
    if OmegaConf.is_missing(cfg.model, "id"):
        raise ConfigError("model.id is required with model=hf: a Hugging Face id or a local folder")
    check_model_id(cfg)  # before anything that resolves ${recipe:...}, which reads the model's widths
    if isinstance(cfg.bits, bool) or not isinstance(cfg.bits, int) or cfg.bits not in BITS:
        raise ConfigError(f"bits={cfg.bits!r} is not supported: allowed values are 2, 3, 4, 8")
    if isinstance(cfg.group_size, bool) or not isinstance(cfg.group_size, int) or cfg.group_size <= 0:
        raise ConfigError(f"group_size={cfg.group_size!r} must be a positive integer (32, 64, 128, 256)")
    if cfg.stage == "export":  # its keys, before any model is loaded (dry_run included)
        from qwha.stages.export import check as check_export

        check_export(cfg)
    if not DEVICES.match(str(cfg.device)):
        raise ConfigError(f"device={cfg.device!r} is unknown: allowed values are auto, cpu, cuda, cuda:N")
    if not _interpolated(cfg, "rank"):  # a typed rank= first, under its own name
        _check_rank(cfg)
    check_values(cfg)
    _check_rank(cfg)  # the recipe's rank, resolved once the widths it reads are known to be sane
    recipes.check(cfg)  # per-method recipe (lr, dropout, rank, alpha, steps): a rule for each, logged
    shapes = model_shapes(cfg)
    if shapes is not None:
        check_shapes(cfg, shapes)
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
