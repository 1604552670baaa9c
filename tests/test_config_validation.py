"""The whole composed config is checked before any work, whatever the stage: one line naming the key and
what is allowed, exit status 2, no traceback, nothing in the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from qwha.config import VALUE_CHECKS, ConfigError, check_shapes, shapes_from_json, validate
from tests.conftest import compose, run_cli

# (overrides, the start of the one-line message). Each row is a value a new user could type.
BAD = [
    # the examples
    (["train.lr=abc"], "train.lr='abc' is not allowed: a number > 0"),
    (["train.lr=-1"], "train.lr=-1 is not allowed: a number > 0"),
    (["train.micro_batch_size=0"], "train.micro_batch_size=0 is not allowed: an integer >= 1"),
    (["rank=100000"], "rank=100000 does not fit the smollm2-135m layers"),
    (["model=hf", "model.id=/nonexistent/folder"], "model.id='/nonexistent/folder' is neither an existing"),
    (["seed=abc"], "seed='abc' is not allowed: an integer in [0, 4294967295]"),
    # learning rates, batch sizes, steps
    (["train.lr=0"], "train.lr=0 is not allowed: a number > 0"),
    (["train.lr=nan"], "train.lr=nan is not allowed"),
    (["train.lr=inf"], "train.lr=inf is not allowed"),
    (["train.lr=true"], "train.lr=True is not allowed"),
    (["train.micro_batch_size=2.5"], "train.micro_batch_size=2.5 is not allowed: an integer >= 1"),
    (["train.micro_batch_size=abc"], "train.micro_batch_size='abc' is not allowed"),
    (["train.effective_batch=0"], "train.effective_batch=0 is not allowed: an integer >= 1"),
    (["train.effective_batch=6"], "train.effective_batch=6 is not a multiple of train.micro_batch_size=4"),
    (["train.max_steps=0"], "train.max_steps=0 is not allowed: an integer >= 1 or null"),
    (["train.max_steps=-5"], "train.max_steps=-5 is not allowed"),
    (["train.epochs=0"], "train.epochs=0 is not allowed: a number > 0"),
    (["train.weight_decay=-0.1"], "train.weight_decay=-0.1 is not allowed: a number >= 0"),
    (["train.warmup_ratio=1"], "train.warmup_ratio=1 is not allowed: a number in [0, 1)"),
    (["train.warmup_ratio=-0.5"], "train.warmup_ratio=-0.5 is not allowed"),
    (["train.max_grad_norm=-1"], "train.max_grad_norm=-1 is not allowed: a number >= 0 or null"),
    (["train.save_every=-1"], "train.save_every=-1 is not allowed: an integer >= 0"),
    (["train.keep_last=-1"], "train.keep_last=-1 is not allowed"),
    (["train.log_every=0"], "train.log_every=0 is not allowed: an integer >= 1"),
    (["train.scheduler=step"], "train.scheduler='step' is not allowed: one of cosine, linear, constant"),
    (["train.precision=fp16"], "train.precision='fp16' is not allowed: one of auto, bf16, fp32"),
    (["train.grad_checkpointing=maybe"], "train.grad_checkpointing='maybe' is not allowed: true or false"),
    (["train.resume=1"], "train.resume=1 is not allowed: true or false"),
    (["train.fsdp=yes"], "train.fsdp='yes' is not allowed"),
    (["train.wandb.mode=cloud"], "train.wandb.mode='cloud' is not allowed: one of offline, online, disabled"),
    # seeds
    (["seed=-1"], "seed=-1 is not allowed"),
    (["seed=4294967296"], "seed=4294967296 is not allowed"),
    (["calib.seed=x"], "calib.seed='x' is not allowed"),
    (["eval.gsm8k.seed=1.5"], "eval.gsm8k.seed=1.5 is not allowed"),
    (["method=lota", "adapter.seed=-3"], "adapter.seed=-3 is not allowed"),
    # windows, limits, lengths
    (["calib.n=0"], "calib.n=0 is not allowed: an integer >= 1"),
    (["calib.length=1"], "calib.length=1 is not allowed: an integer >= 2"),
    (["calib.length=abc"], "calib.length='abc' is not allowed"),
    (["calib.source=c4"], "calib.source='c4' is not allowed: one of packaged, wikitext2"),
    (["eval.perplexity.window=0"], "eval.perplexity.window=0 is not allowed: an integer >= 2"),
    (["eval.perplexity.stride=0"], "eval.perplexity.stride=0 is not allowed: an integer >= 1"),
    (
        ["eval.perplexity.stride=4096"],
        "eval.perplexity.stride=4096 is larger than eval.perplexity.window=2048",
    ),
    (
        ["eval.perplexity.max_tokens=1"],
        "eval.perplexity.max_tokens=1 is not allowed: an integer >= 2 or null",
    ),
    (["eval.perplexity.enabled=no"], "eval.perplexity.enabled='no' is not allowed: true or false"),
    (["eval.csqa.limit=0"], "eval.csqa.limit=0 is not allowed: an integer >= 1 or null"),
    (["eval.gsm8k.limit=-2"], "eval.gsm8k.limit=-2 is not allowed"),
    (["eval.csqa.batch_size=0"], "eval.csqa.batch_size=0 is not allowed"),
    (["eval.gsm8k.batch_size=abc"], "eval.gsm8k.batch_size='abc' is not allowed"),
    (["eval.gsm8k.max_new_tokens=0"], "eval.gsm8k.max_new_tokens=0 is not allowed"),
    (["eval.gsm8k.decoding=beam"], "eval.gsm8k.decoding='beam' is not allowed: one of sample, greedy"),
    (
        ["eval.csqa.enabled=sometimes"],
        "eval.csqa.enabled='sometimes' is not allowed: one of auto, true, false",
    ),
    (["eval.gsm8k.answer_nll=2"], "eval.gsm8k.answer_nll=2 is not allowed"),
    (["data.max_length=1"], "data.max_length=1 is not allowed: an integer >= 2"),
    (["data.packaged_size=0"], "data.packaged_size=0 is not allowed"),
    (["data.epochs=0"], "data.epochs=0 is not allowed"),
    (["data.weight_decay=-1"], "data.weight_decay=-1 is not allowed"),
    (["data.mask_prompt=abc"], "data.mask_prompt='abc' is not allowed"),
    (["data.name=squad"], "data.name='squad' is not allowed: one of gsm8k, alpaca"),
    (["data.format=chat"], "data.format='chat' is not allowed: one of gsm8k, alpaca"),
    (["model.max_length=0"], "model.max_length=0 is not allowed"),
    (["model.eval_limit=0"], "model.eval_limit=0 is not allowed"),
    (["model.calib_windows=abc"], "model.calib_windows='abc' is not allowed"),
    (["model.lr.qwha.gsm8k.b3=-1"], "model.lr.qwha.gsm8k.b3=-1 is not allowed: a number > 0"),
    (["model.dtype=int8"], "model.dtype='int8' is not allowed: one of float32, bfloat16, float16"),
    (["model.hidden_size=0"], "model.hidden_size=0 is not allowed"),
    # quantization, adapter, init
    (["quant.bits=5"], "quant.bits=5 is not allowed: one of 2, 3, 4, 8"),
    (["quant.group_size=0"], "quant.group_size=0 is not allowed"),
    (["quant.damp=0"], "quant.damp=0 is not allowed: a number > 0"),
    (["quant.magr_alpha=-1e-5"], "quant.magr_alpha=-1e-05 is not allowed: a number >= 0"),
    (["quant.magr_iters=-1"], "quant.magr_iters=-1 is not allowed: an integer >= 0"),
    (["quant.magr_iters=ten"], "quant.magr_iters='ten' is not allowed"),
    (["quant.cd_iters=-2"], "quant.cd_iters=-2 is not allowed: auto or an integer >= 0"),
    (["quant.cd_iters=often"], "quant.cd_iters='often' is not allowed: auto or an integer >= 0"),
    (["quant.cd_damp=0"], "quant.cd_damp=0 is not allowed: a number > 0"),
    (["bits=abc"], "bits='abc' is not supported: allowed values are 2, 3, 4, 8"),
    (["rank=abc"], "rank='abc' must be a positive integer"),
    (["rank=-4"], "rank=-4 must be a positive integer"),
    (["rank=145"], "rank=145 does not fit the smollm2-135m layers"),
    (["group_size=abc"], "group_size='abc' must be a positive integer"),
    (["adapter.rank=0"], "adapter.rank=0 is not allowed: an integer >= 1"),
    (["adapter.alpha=0"], "adapter.alpha=0 is not allowed: a number > 0"),
    (["adapter.dropout=1"], "adapter.dropout=1 is not allowed: a number in [0, 1)"),
    (["adapter.dims=3"], "adapter.dims=3 is not allowed: one of 1, 2"),
    (["adapter.transform=fft"], "adapter.transform='fft' is not allowed: one of wht, dct, dht, identity"),
    (["adapter.scale_norm=l2"], "adapter.scale_norm='l2' is not allowed"),
    (["adapter=lora", "init=cloq", "adapter.lora_alpha=0"], "adapter.lora_alpha=0 is not allowed"),
    (["method=lota", "adapter.keep_start=0"], "adapter.keep_start=0 is not allowed: a number in (0, 1]"),
    (["method=lota", "adapter.mid_fraction=2"], "adapter.mid_fraction=2 is not allowed"),
    (["method=lota", "adapter.omega=-1"], "adapter.omega=-1 is not allowed: a number > 0 or null"),
    (["init.temperature=0"], "init.temperature=0 is not allowed: a number > 0"),
    (["init.batch_size=0"], "init.batch_size=0 is not allowed"),
    (["init.gram_budget_gb=0"], "init.gram_budget_gb=0 is not allowed"),
    (["init.refine=abc"], "init.refine='abc' is not allowed: true or false"),
    (
        ["init.alloc_weight=gradient"],
        "init.alloc_weight='gradient' is not allowed: one of activation, weight",
    ),
    (["init.score=abs"], "init.score='abs' is not allowed: one of magnitude, energy"),
    (["adapter=lora", "init=loftq", "init.loftq_iters=0"], "init.loftq_iters=0 is not allowed"),
    # top-level switches
    (["force=abc"], "force='abc' is not allowed: true or false"),
    (["dry_run=2"], "dry_run=2 is not allowed"),
    (["offline=maybe"], "offline='maybe' is not allowed"),
    (["model.offline=abc"], "model.offline='abc' is not allowed"),
    # paths
    (["model=hf", "model.id=./no/such/model"], "model.id='./no/such/model' is neither an existing folder"),
    (["model=hf", "model.id=a/b/c"], "model.id='a/b/c' is neither an existing folder"),
    (["model=hf", "model.id=org--x/y"], "model.id='org--x/y' is neither an existing folder"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_value_is_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose(*overrides))
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(message), text


GOOD = [
    [],
    ["train.lr=1e-4"],
    ["train.lr=1"],  # an integer is a number
    ["train.max_grad_norm=null"],
    ["train.micro_batch_size=8"],
    ["seed=4294967295"],
    ["rank=144"],  # 144 * (576 + 192) = 576 * 192: the largest rank k_proj (576 -> 192) can hold
    ["adapter=lora", "init=cloq", "rank=192"],  # a LoRA spans up to min(d_in, d_out) = 192 on k_proj
    ["eval.perplexity.max_tokens=null"],
    ["model=llama3.1-8b", "bits=3", "data=alpaca"],
    ["method=lota"],
    ["method=cloq"],
    ["budget=small"],
]


@pytest.mark.parametrize("overrides", GOOD, ids=[" ".join(o) or "default" for o in GOOD])
def test_good_configs_pass(overrides):
    validate(compose(*overrides))


def test_model_id_existing_folder_passes_and_a_file_does_not(tmp_path: Path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128}))
    validate(compose("model=hf", f"model.id={folder}", "rank=8", "group_size=32"))
    with pytest.raises(ConfigError, match=r"model.id=.* is a file"):
        validate(compose("model=hf", f"model.id={folder / 'config.json'}"))


def test_rank_capacity_from_a_local_config_json_includes_key_value_width(tmp_path: Path):
    """A Llama-style folder with 4 heads of 16 and 2 key/value heads: k_proj maps 64 -> 32, so its
    capacity is floor(64*32 / 96) = 21 (q_proj's would be 32)."""
    folder = tmp_path / "m"
    folder.mkdir()
    raw = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    (folder / "config.json").write_text(json.dumps(raw))
    validate(compose("model=hf", f"model.id={folder}", "rank=21", "group_size=32"))
    with pytest.raises(
        ConfigError,
        match=r"rank=22 does not fit .* k_proj \(64x32\) with adapter.method=wha; allowed values are 1..21",
    ):
        validate(compose("model=hf", f"model.id={folder}", "rank=22", "group_size=32"))
    # without k/v among the targets, q_proj (64x64) bounds it: 64*64 / 128 = 32
    only_q = "adapter.target_modules=[q_proj,o_proj]"
    validate(compose("model=hf", f"model.id={folder}", "rank=32", "group_size=32", only_q))


def test_embedded_model_rank_capacity_uses_its_key_value_width():
    """SmolLM2-135M: 3 key/value heads of 64 (k_proj 576 -> 192, ``model.kv_width``): capacity
    floor(576*192/768) = 144, refused from the yaml alone; the converted config.json agrees."""
    raw = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3}
    with pytest.raises(ConfigError, match=r"rank=145 does not fit .* k_proj \(576x192\)"):
        validate(compose("rank=145"))
    validate(compose("rank=144"))
    cfg = compose("rank=145")
    with pytest.raises(ConfigError, match=r"allowed values are 1..144"):
        check_shapes(cfg, shapes_from_json(cfg, raw))


def _numeric_leaves(cfg) -> set[str]:
    out = set()

    def walk(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, int | float) or v is None:
                out.add(f"{prefix}{k}")

    walk(OmegaConf.to_container(cfg, resolve=True))
    return out


def test_every_numeric_key_is_checked(tmp_path: Path):
    """Every number, flag or nullable number in the composed configs (several groups) has a rule, or is
    one of the top-level keys checked with their own messages, or a row of the model's lr table."""
    folder = tmp_path / "hf_model"  # model=hf reads its widths from config.json
    folder.mkdir()
    raw = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
    (folder / "config.json").write_text(json.dumps(raw))
    seen: set[str] = set()
    for overrides in (
        [],
        ["method=lota"],
        ["adapter=lora", "init=loftq"],
        ["model=hf", f"model.id={folder}"],
    ):
        seen |= _numeric_leaves(compose(*overrides))
    own = {"bits", "rank", "group_size"}
    unchecked = {k for k in seen if k not in VALUE_CHECKS and k not in own and not k.startswith("model.lr.")}
    # null strings: a free-form run name, and the package of a GGUF file (hub models have none)
    # first_run: the budget's copy of model.first_run (its leaves are checked under both names)
    assert unchecked == {"train.wandb.name", "model.gguf_package", "first_run"}


CLI_CASES = [
    ("train.lr=abc",),
    ("train.lr=-1",),
    ("train.micro_batch_size=0",),
    ("rank=100000",),
    ("model=hf", "model.id=/nonexistent/folder"),
    ("seed=abc",),
]


@pytest.mark.parametrize("args", CLI_CASES, ids=[" ".join(a) for a in CLI_CASES])
def test_cli_refuses_before_any_work(args, tmp_path: Path):
    res = run_cli("stage=quantize", *args, env={"QWHA_CACHE_PATH": str(tmp_path / "c")})
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwha: error: "), res.stderr
    key = args[-1].split("=", 1)[0]
    assert f"{key}=" in lines[0]
    assert "Traceback" not in res.stderr + res.stdout
    assert not (tmp_path / "c").exists()  # nothing written to the cache
