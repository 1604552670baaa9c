"""The paper's per-method training recipes, resolved from (model, method, data, bits).

The configs name these values through the ``${recipe:<name>}`` resolver registered here, so that every
consumer (the stages, the cache keys, ``--cfg job --resolve``) sees the same number:

- ``lr``: the learning rate. The paper tunes two columns (its Table 9): CLoQ's, used for every low-rank
  adapter (``adapter.method=lora``: QLoRA, CLoQ, LoftQ), and QWHA's, used for every sparse/spectral one
  (``adapter.method=wha``: QWHA, SSH, LoCA, SHiRA and the Table 2/4 ablations). The columns live in
  the model config (``model.lr.<column>.<data>.b<bits>``); ``model.lr.source`` says whether they are the
  paper's or documented project values (models the paper does not run). QWHA's rates were tuned with
  the authors' code scale α/√(d_in·d_out); a run with the paper's α/d_in multiplies them by
  :func:`paper_scale_lr_factor`. 8-bit has no published rate: the 4-bit one is used.
- ``dropout``: LoRA family 0.1 (the paper's Table 8, CLoQ), sparse/spectral adapters 0.
- ``rank`` / ``alpha``: the paper's r = 64, α = 4000 on the paper's models and on any model at least as
  wide as Llama-3.2-3B (the paper runs r = 64 from 3B to 8B); on a narrower model, the rank whose
  coefficient density ``p / (d_in·d_out)`` on the hidden × hidden layers matches Llama-3.2-3B at r = 64
  (``2r/d``: 4.17 %) and the α that gives those layers the same scale. An
  explicit ``rank=`` (or ``adapter.alpha=``) replaces the interpolation and so always wins.
- ``max_steps`` / ``steps``: LoTA-QAF's own recipe (``recipe=lota``) trains a fixed number of steps on
  Alpaca (300) and one epoch on GSM8K; ``max_steps`` is also bounded by ``model.max_steps`` (the embedded
  model's short run). Every other recipe trains ``train.epochs``.
- ``loca_name``: ``loca`` when LoCA's location learning is on (``adapter.loca.enabled``), else
  ``loca_fixed`` (shown as "loca (fixed locations)").

:func:`check` (called by :func:`qwha.config.validate`) resolves all of them once, raises a one-line
``ConfigError`` for a combination with no rule, and logs the rule that produced each value (the rank's
capacity is checked with the other widths by :func:`qwha.config.check_shapes`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("qwha.recipes")

# The paper's models (Table 9 has rates for them; Table 8: r = 64, alpha = 4000).
PAPER_MODELS = ("llama3.2-3b", "llama3.1-8b", "mistral-7b-v0.3")
PAPER_RANK = 64
PAPER_ALPHA = 4000.0
# The density reference: Llama-3.2-3B's hidden size (its q/o projections are 3072 x 3072).
REFERENCE_MODEL = "llama3.2-3b"
REFERENCE_HIDDEN = 3072
# Table 9's column per adapter family (paper §7: low-rank baselines use CLoQ's, sparse ones QWHA's).
LR_COLUMN = {"lora": "cloq", "wha": "qwha", "lota": "qwha"}
# Table 8: LoRA-family dropout 0.1 (CLoQ), sparse/spectral adapters 0.
DROPOUT = {"lora": 0.1, "wha": 0.0}
# LoTA-QAF's recipe (arXiv 2505.18724): optimizer steps per data set (None: one epoch, train.epochs).
LOTA_STEPS = {"alpaca": 300, "gsm8k": None}
RECIPES = ("paper", "lota")
PUBLISHED_BITS = (2, 3, 4)


def _error(msg: str) -> Exception:
    from qwha.config import ConfigError

    return ConfigError(msg)


# --------------------------------------------------------------------------------------------- shapes


def _raw_model_config(model: DictConfig) -> dict:
    path = Path(str(model.id)) / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model.id)).to_dict()
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0][:160]
        raise _error(
            f"model.id={model.id!r}: its config.json could not be read ({reason}); the default rank and "
            f"alpha need the model's widths: fetch it (huggingface-cli download {model.id} config.json) or "
            "use a local folder"
        ) from err


def layer_shapes(model: DictConfig) -> dict[str, tuple[int, int]]:
    """``{projection: (d_out, d_in)}`` of the seven adapted projections of one decoder block.

    From ``model.hidden_size``, ``model.intermediate_size`` and ``model.kv_width`` (the k/v projections'
    output width, ``num_key_value_heads · head_dim``); missing ones are read from the model's
    ``config.json`` (``model=hf``). q_proj is taken as hidden × hidden (true of Llama, Mistral, Qwen,
    SmolLM2).
    """
    h, i, kv = (OmegaConf.select(model, k) for k in ("hidden_size", "intermediate_size", "kv_width"))
    if h is None or i is None or kv is None:
        raw = _raw_model_config(model)
        h = h or raw["hidden_size"]
        i = i or raw["intermediate_size"]
        heads = raw.get("num_attention_heads", 1)
        head_dim = raw.get("head_dim") or h // heads
        kv = kv or raw.get("num_key_value_heads", heads) * head_dim
    h, i, kv = int(h), int(i), int(kv)
    return {
        "q_proj": (h, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, h),
        "gate_proj": (i, h),
        "up_proj": (i, h),
        "down_proj": (h, i),
    }


def density(rank: int, d_out: int, d_in: int) -> float:
    """Fraction of a ``d_out × d_in`` layer's coefficients held by a rank-``r`` budget ``r·(d_in+d_out)``."""
    return rank * (d_in + d_out) / (d_in * d_out)


def matched_rank(hidden: int) -> int:
    """The rank whose density on a hidden × hidden layer (``2r/d``) equals Llama-3.2-3B's at r = 64."""
    return max(1, round(PAPER_RANK * hidden / REFERENCE_HIDDEN))


def matched_alpha(hidden: int) -> float:
    """The α that gives a hidden × hidden layer Llama-3.2-3B's scale α/d (either normalisation)."""
    return PAPER_ALPHA * hidden / REFERENCE_HIDDEN


def paper_scale_lr_factor(shapes: dict[str, tuple[int, int]]) -> float:
    """Learning-rate factor for the paper's scale α/d_in when the rate was tuned under α/√(d_in·d_out).

    With Adam a coefficient moves by about ``lr`` per step, so a layer's update moves by ``s·lr``. The
    paper's scale is the code's times ``√(d_out/d_in)`` per projection: no single factor matches every
    projection. This one matches the parameter-weighted geometric mean (weights ``r·(d_in+d_out)``):
    ``exp(−Σ p_l·log√(d_out/d_in) / Σ p_l)``. Square layers are unchanged either way.
    """
    num = sum((o + i) * 0.5 * math.log(o / i) for o, i in shapes.values())
    den = sum(o + i for o, i in shapes.values())
    return math.exp(-num / den)


# -------------------------------------------------------------------------------------------- resolve


def _is_paper_model(root: DictConfig) -> bool:
    return str(root.model.name) in PAPER_MODELS


def resolve_rank(root: DictConfig) -> tuple[int, str]:
    """(rank, rule) for ``rank: ${recipe:rank}``."""
    if _is_paper_model(root):
        return PAPER_RANK, f"r = {PAPER_RANK}: the paper's rank (Table 8)"
    h = layer_shapes(root.model)["q_proj"][1]
    if h >= REFERENCE_HIDDEN:
        return (
            PAPER_RANK,
            f"r = {PAPER_RANK}: the paper's rank (hidden size {h} >= Llama-3.2-3B's {REFERENCE_HIDDEN})",
        )
    r = matched_rank(h)
    return r, (
        f"r = {r}: density-matched to Llama-3.2-3B at r = {PAPER_RANK} "
        f"(p/(d_in·d_out) on {h}x{h} layers {100 * density(r, h, h):.2f} %, "
        f"paper {100 * density(PAPER_RANK, REFERENCE_HIDDEN, REFERENCE_HIDDEN):.2f} %)"
    )


def resolve_alpha(root: DictConfig) -> tuple[float, str]:
    """(alpha, rule) for the sparse adapters' ``alpha: ${recipe:alpha}``."""
    if _is_paper_model(root):
        return PAPER_ALPHA, f"alpha = {PAPER_ALPHA:g}: the paper's (Table 8)"
    h = layer_shapes(root.model)["q_proj"][1]
    if h >= REFERENCE_HIDDEN:
        return PAPER_ALPHA, f"alpha = {PAPER_ALPHA:g}: the paper's (hidden size {h} >= {REFERENCE_HIDDEN})"
    a = matched_alpha(h)
    return a, (
        f"alpha = {a:g}: Llama-3.2-3B's scale on {h}x{h} layers "
        f"({PAPER_ALPHA:g}/{REFERENCE_HIDDEN} = {a:g}/{h} = {a / h:.4g})"
    )


def resolve_lr(root: DictConfig) -> tuple[float, str]:
    """(learning rate, rule) for ``train.lr: ${recipe:lr}``."""
    family = str(root.adapter.method)
    if family not in LR_COLUMN:
        allowed = ", ".join(LR_COLUMN)
        raise _error(f"adapter.method={family!r} has no learning-rate rule: allowed values are {allowed}")
    column = LR_COLUMN[family]
    # data=jsonl (custom data) borrows a published data set's row: data.lr_like (conf/data/jsonl.yaml)
    data = str(OmegaConf.select(root, "data.lr_like", default=None) or root.data.name)
    bits, model = int(root.bits), str(root.model.name)
    table = OmegaConf.select(root, f"model.lr.{column}.{data}")
    if table is None:
        raise _error(
            f"model={model} data={data}: no learning-rate rule (model.lr.{column}.{data} is missing); "
            f"allowed data for this model are {', '.join(_lr_data(root, column)) or 'none'}"
        )
    used_bits = bits if bits in PUBLISHED_BITS else 4
    key = f"b{used_bits}"
    if key not in table:
        raise _error(f"bits={bits} has no rate in model.lr.{column}.{data}: allowed values are 2, 3, 4, 8")
    lr = float(table[key])
    source = str(OmegaConf.select(root, "model.lr.source", default="project"))
    where = "the paper's Table 9" if source == "paper" else f"project values (conf/model/{model}.yaml)"
    rule = f"lr = {lr:g}: {where}, {column.upper()} column, {data}, {used_bits}-bit"
    if used_bits != bits:
        rule += f" (no published {bits}-bit rate: the 4-bit one)"
    if family == "lota":
        rule += "; unused by t-SignSGD"
    elif family == "wha" and str(root.adapter.scale_norm) == "paper":
        factor = paper_scale_lr_factor(layer_shapes(root.model))
        lr *= factor
        rule += f" x {factor:.4f} for the paper's scale alpha/d_in (rates tuned under the code's) = {lr:.4g}"
    return lr, rule


def _lr_data(root: DictConfig, column: str) -> list[str]:
    node = OmegaConf.select(root, f"model.lr.{column}")
    return sorted(node.keys()) if node is not None else []


def resolve_dropout(root: DictConfig) -> tuple[float, str]:
    """(dropout, rule) for a method preset's ``adapter.dropout: ${recipe:dropout}``."""
    family = str(root.adapter.method)
    if family not in DROPOUT:
        raise _error(f"adapter.method={family!r} has no dropout rule: allowed values are lora, wha")
    return DROPOUT[family], f"dropout = {DROPOUT[family]:g}: Table 8 ({family})"


def _recipe(root: DictConfig) -> str:
    name = str(OmegaConf.select(root, "recipe", default="paper"))
    if name not in RECIPES:
        raise _error(f"recipe={name!r} is unknown: allowed values are {', '.join(RECIPES)}")
    return name


def resolve_steps(root: DictConfig) -> tuple[int | None, str]:
    """(optimizer steps or None for epochs, rule): the recipe's own length, before any budget bound."""
    if _recipe(root) != "lota":
        return None, "train.epochs (data.epochs): the QWHA paper's recipe"
    data = str(root.data.name)
    if data not in LOTA_STEPS:
        raise _error(f"recipe=lota data={data}: no LoTA-QAF step count; allowed data are alpaca, gsm8k")
    steps = LOTA_STEPS[data]
    return steps, (
        f"LoTA-QAF's recipe: {steps} steps on {data}" if steps else f"LoTA-QAF's recipe: one epoch of {data}"
    )


def resolve_max_steps(root: DictConfig) -> tuple[int | None, str]:
    """``train.max_steps``: the model's bounded run (``model.max_steps``) if it has one, else the recipe's."""
    bound = OmegaConf.select(root, "model.max_steps")
    if bound is not None:
        return int(bound), f"max_steps = {bound}: the model's bounded run (model.max_steps)"
    return resolve_steps(root)


def resolve_loca_name(root: DictConfig) -> tuple[str, str]:
    """``loca`` when locations are learned during the run, else ``loca_fixed``: learning off, or a bounded
    run too short to reach a location step (none before ``⌊learn_fraction · max_steps⌋ > coef_steps``)."""
    loca = OmegaConf.select(root, "adapter.loca", default=None)
    if loca is None or not loca.get("enabled", False):
        return "loca_fixed", "LoCA, fixed locations (adapter.loca.enabled=false)"
    steps = OmegaConf.select(root, "train.max_steps", default=None)
    if steps is not None and math.floor(float(loca.learn_fraction) * int(steps)) <= int(loca.coef_steps):
        return "loca_fixed", (
            f"LoCA, fixed locations: {steps} steps give no location step (learn_fraction "
            f"{loca.learn_fraction} of the run <= coef_steps {loca.coef_steps})"
        )
    return "loca", "LoCA with location learning"


RESOLVERS = {
    "lr": resolve_lr,
    "dropout": resolve_dropout,
    "rank": resolve_rank,
    "alpha": resolve_alpha,
    "steps": resolve_steps,
    "max_steps": resolve_max_steps,
    "loca_name": resolve_loca_name,
}


def _resolve(name: str, *, _root_: DictConfig):
    if name not in RESOLVERS:
        raise _error(f"${{recipe:{name}}} is unknown: allowed names are {', '.join(RESOLVERS)}")
    return RESOLVERS[name](_root_)[0]


if not OmegaConf.has_resolver("recipe"):
    OmegaConf.register_new_resolver("recipe", _resolve)


# ---------------------------------------------------------------------------------------------- check


def _uses_recipe(cfg: DictConfig, key: str, *names: str) -> bool:
    """The value at ``key`` is still a ``${recipe:<name>}`` interpolation (not overridden)."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent:
        return False
    raw = parent._get_node(leaf)._value()
    return isinstance(raw, str) and raw.replace(" ", "") in {f"${{recipe:{n}}}" for n in names}


def capacity(rank_family: str, shapes: dict[str, tuple[int, int]]) -> tuple[int, str]:
    """Largest rank every adapted layer can hold, and the layer that sets it.

    Sparse adapters hold ``r·(d_in+d_out) ≤ d_in·d_out`` coefficients; low-rank ones need
    ``r ≤ min(d_in, d_out)``.
    """
    if rank_family == "wha":
        caps = {n: (o * i) // (o + i) for n, (o, i) in shapes.items()}
    else:
        caps = {n: min(o, i) for n, (o, i) in shapes.items()}
    name = min(caps, key=caps.get)
    return caps[name], name


def check(cfg: DictConfig) -> dict[str, str]:
    """Resolve the recipe once, fail with one line where no rule applies, and log each rule used.

    Returns ``{quantity: rule}``, also logged as one INFO line (DEBUG under ``dry_run=true``, whose
    output lists the stage keys only).
    """
    rules: dict[str, str] = {}
    rules["recipe"] = _recipe(cfg)
    family = str(cfg.adapter.method)
    rules["rank"] = resolve_rank(cfg)[1] if _uses_recipe(cfg, "rank", "rank") else f"r = {cfg.rank}: explicit"
    if family == "wha":
        if _uses_recipe(cfg, "adapter.alpha", "alpha"):
            rules["alpha"] = resolve_alpha(cfg)[1]
        else:
            rules["alpha"] = f"alpha = {cfg.adapter.alpha:g}: explicit"
        rules["scale"] = f"scale_norm = {cfg.adapter.scale_norm}"
    if _uses_recipe(cfg, "train.lr", "lr"):
        rules["lr"] = resolve_lr(cfg)[1]
    else:
        rules["lr"] = f"lr = {cfg.train.lr:g}: explicit"
    if family in DROPOUT:
        rules["dropout"] = (
            resolve_dropout(cfg)[1]
            if _uses_recipe(cfg, "adapter.dropout", "dropout")
            else f"dropout = {cfg.adapter.dropout:g}: adapter={family}'s default (no method preset)"
        )
    rules["steps"] = (
        resolve_max_steps(cfg)[1]
        if _uses_recipe(cfg, "train.max_steps", "max_steps", "steps")
        else f"max_steps = {cfg.train.max_steps}: explicit or the budget's"
    )
    level = logging.DEBUG if OmegaConf.select(cfg, "dry_run", default=False) else logging.INFO
    log.log(level, "recipe: %s", "; ".join(f"{k}: {v}" for k, v in rules.items()))
    return rules
