"""Row labels of the rendered tables under the current method definitions (docs/protocol.md).

A Table 3 / Table 5 row is named by its ``method=`` preset only when the run used what that preset
means today: the run's recorded adapter, init, quantizer and training recipe are compared with the
preset composed now for the same model, bits and data. A run from an earlier definition keeps its
preset's name followed by ``(old: ...)`` and the recorded values that differ (``init=ssh``, ``r=64``,
``lr=0.0002``, ...), so it is never shown under the new name (nor beside the paper's number for it).
Budget keys (steps, batch, evaluation limits) are not part of a definition.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from omegaconf import OmegaConf

from qwha.stages.quantize import OMITTED_AT

CONF = Path(__file__).resolve().parent.parent / "conf"
# (stage record, config path, short name in a label). Dropout, scale and alpha do not change what an
# init computes (values are stored as c/s) but do change training, so they are compared for trained rows.
# lora_alpha is always the rank (scale 1). The fields that depend on the data set (lr, prompt masking)
# are named without their value, so that a method's Alpaca and GSM8K runs share one row.
ADAPTER_FIELDS = (
    ("init", "init.method", "init"),
    ("init", "init.refine", "refine"),
    ("init", "init.alloc_weight", "alloc"),
    ("init", "init.score", "score"),
    ("init", "adapter.method", "adapter"),
    ("init", "adapter.transform", "transform"),
    ("init", "adapter.dims", "dims"),
    ("init", "adapter.rank", "r"),
    ("init", "adapter.alpha", "alpha"),
    ("init", "adapter.scale_norm", "scale"),
    ("init", "adapter.dropout", "dropout"),
    ("finetune", "data.mask_prompt", "mask_prompt"),
    ("finetune", "train.scheduler", "schedule"),
    ("finetune", "train.warmup_ratio", "warmup"),
    ("finetune", "train.lr", "lr"),
)
PER_DATA = ("lr", "mask_prompt")
TABLE3_QUANT = ("quant.cd_iters=auto",)  # keep equal to conf/experiment/table3.yaml's quant block
Manifest = Callable[[str, str], dict]


@lru_cache(maxsize=256)
def _preset(method: str, model: str, bits: int, data: str) -> dict | None:
    """The preset ``method=<method>`` composed now for (model, bits, data), with the quantizer Table 3 uses
    (the authors': ``quant.cd_iters=auto``, ``conf/experiment/table3.yaml``), resolved; None if unknown."""
    if not (CONF / "method" / f"{method}.yaml").is_file() or not (CONF / "model" / f"{model}.yaml").is_file():
        return None
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.initialize import get_gh_backup, restore_gh_from_backup
    from omegaconf.errors import OmegaConfBaseException

    import qwha.config  # noqa: F401  (registers the recipe resolvers)

    # budget=paper: a table's definition, never the run without a budget, whose first-run settings
    # (the embedded model's FISTA MagR) would mark every table run "old"
    overrides = [
        f"method={method}",
        f"model={model}",
        f"bits={bits}",
        f"data={data}",
        "budget=paper",
        *TABLE3_QUANT,
    ]
    outer = get_gh_backup()  # a caller's own Hydra context (a test, an app) is set aside, then restored
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        return OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException, ValueError):  # a preset that no longer composes
        return None
    finally:
        restore_gh_from_backup(outer)


def _get(tree: dict, path: str):
    for part in path.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _same(old, new) -> bool:
    if isinstance(old, int | float) and isinstance(new, int | float) and not isinstance(old, bool):
        return abs(old - new) <= 1e-9 * max(abs(old), abs(new), 1e-30)
    return old == new


def differences(method: str, model: str, bits: int, data: str, recorded: dict[str, dict]) -> list[str] | None:
    """``key=old value`` for every definition field where the recorded run differs from the preset now.

    ``recorded`` maps a stage (``quantize``, ``init``, ``finetune``) to its manifest's config; a stage
    without a record is not compared. None when the preset (or the model) no longer exists.
    """
    preset = _preset(method, model, int(bits), data)
    if preset is None:
        return None
    diffs = []
    quant_old = recorded.get("quantize", {}).get("quant")
    if quant_old is not None:
        for key, new in (preset.get("quant") or {}).items():
            # a key the quantize stage leaves out of its record at its default
            old = quant_old.get(key, OMITTED_AT.get(key))
            if key in ("bits", "group_size") or (old is None and not new):
                continue  # bits/group size are the row's coordinates; an absent key that is off now is equal
            if not _same(old, new):
                diffs.append(f"quant.{key}={'–' if old is None else old}")
    if preset.get("eval", {}).get("target") == "quantize":
        return diffs
    lota = _get(preset, "adapter.method") == "lota"
    for stage, path, short in ADAPTER_FIELDS:
        if stage not in recorded or (lota and path == "train.lr"):  # t-SignSGD has no learning rate
            continue
        new, old = _get(preset, path), _get(recorded[stage], path)
        if old is None and new is None:
            continue
        if _same(old, new):
            continue
        value = "–" if old is None else (f"{old:g}" if isinstance(old, float) else old)
        diffs.append(short if short in PER_DATA else f"{short}={value}")
    return diffs


def label(method: str, model: str, bits: int, data: str, recorded: dict[str, dict]) -> str:
    """The row's name: the preset's when the run matches its current definition, else marked old."""
    if method in (None, "custom"):
        return method
    diffs = differences(method, model, bits, data, recorded)
    if diffs is None:
        return f"{method} (old preset)"
    return f"{method} (old: {', '.join(diffs)})" if diffs else display(method)


def display(method: str) -> str:
    """A preset's name in a table (LoCA without location learning says so)."""
    return {"loca_fixed": "loca (fixed locations)"}.get(method, method)


def eval_label(res: dict, manifest: Manifest) -> str:
    """Label of an eval record (``results.json`` with its upstream keys)."""
    ups = res.get("upstream", {})
    stages = [s for s in ("quantize", "init", "finetune") if ups.get(s)]
    recorded = {stage: manifest(stage, ups[stage]).get("config", {}) for stage in stages}
    return label(res.get("method_name"), res.get("model"), res.get("bits"), res.get("data"), recorded)


def finetune_label(run: dict, finetune_info: dict, manifest: Manifest) -> str | None:
    """Label of a fine-tuning record (Table 5) given its init run's description ``run``."""
    name = run.get("method_name")
    if name is None and run.get("adapter") == "lota":
        name = "lota"  # LoTA init reports record no preset; every LoTA run so far came from method=lota
    if name in (None, "custom"):
        return run.get("init")
    ups = finetune_info.get("upstream", {})
    recorded = {"finetune": finetune_info.get("config", {})}
    for stage in ("quantize", "init"):
        if ups.get(stage):
            recorded[stage] = manifest(stage, ups[stage]).get("config", {})
    data = _get(recorded["finetune"], "data.name")
    return label(name, run.get("model"), run.get("bits"), data, recorded)


def table_rank(model: str) -> int:
    """The rank at which the ablation tables (2, 4, 13, 14) compare rows: the model's default rank
    (the paper's r = 64 on its models, the density-matched rank elsewhere: 12 on SmolLM2-135M).
    Those tables also show the r = 64 rows (:func:`ablation_ranks`), each labelled with its r; fig_rank
    shows every rank."""
    path = CONF / "model" / f"{model}.yaml"
    from qwha import recipes

    if model in recipes.PAPER_MODELS or not path.is_file():
        return recipes.PAPER_RANK
    h = recipes.layer_shapes(OmegaConf.load(path))["q_proj"][1]
    return recipes.PAPER_RANK if h >= recipes.REFERENCE_HIDDEN else recipes.matched_rank(h)


def ablation_ranks(model: str) -> tuple[int, ...]:
    """Ranks whose rows the ablation tables show, each row with its r: the model's table rank and the
    paper's r = 64 (on SmolLM2-135M the earlier default, in another density regime: the header says so)."""
    from qwha import recipes

    return tuple(sorted({table_rank(model), recipes.PAPER_RANK}))


def regime_note(model: str) -> str:
    """The coefficient density of the model's default rank beside the paper's (a table header line)."""
    path = CONF / "model" / f"{model}.yaml"
    if not path.is_file():
        return ""
    from qwha import recipes

    spec = OmegaConf.load(path)
    try:
        shapes = recipes.layer_shapes(spec)
    except (KeyError, OSError, ValueError):
        return ""
    h = shapes["q_proj"][1]
    paper = 100 * recipes.density(recipes.PAPER_RANK, recipes.REFERENCE_HIDDEN, recipes.REFERENCE_HIDDEN)
    if model in recipes.PAPER_MODELS or h >= recipes.REFERENCE_HIDDEN:
        r = recipes.PAPER_RANK
        return (
            f"Density: r = {r} holds {100 * recipes.density(r, h, h):.2f} % of a {h}x{h} layer's "
            f"coefficients (the paper's setting; Llama-3.2-3B: {paper:.2f} %)."
        )
    r, alpha = recipes.matched_rank(h), recipes.matched_alpha(h)
    lo, hi = (
        100 * min(recipes.density(64, *s) for s in shapes.values()),
        100 * max(recipes.density(64, *s) for s in shapes.values()),
    )
    return (
        f"Density: the paper's Llama-3.2-3B at r = 64 holds {paper:.2f} % of a 3072x3072 layer; here that "
        f"is r = {r} with alpha = {alpha:g} ({100 * recipes.density(r, h, h):.2f} % of a {h}x{h} layer), the "
        f"default for this model. Runs at r = 64 (the earlier default) hold {lo:.1f}-{hi:.1f} % of each "
        f"layer, a different regime: the ablation tables (2, 4, 13, 14) give each row its r (compare rows "
        "of one r only), and Table 3/5 rows from earlier definitions say `(old: ...)` with their recorded "
        "values (docs/protocol.md)."
    )
