"""Each Table 3 preset composed for each paper model, bits and data, against the paper's protocol.

The expected values are typed here from the paper (Table 9's learning rates, Table 8's dropout, scale,
rank and alpha, each baseline's adapter and init, LoTA-QAF's recipe), never read from ``conf/``.
"""

from __future__ import annotations

import logging
import math

import pytest
from omegaconf import OmegaConf, open_dict

import qwha.config  # noqa: F401  (registers the resolvers)
from qwha import recipes
from qwha.config import ConfigError, validate
from tests.conftest import CONF, run_cli

# Paper Table 9: (CLoQ Alpaca, CLoQ GSM8K, QWHA Alpaca, QWHA GSM8K) per (model, bits).
TABLE9 = {
    ("llama3.2-3b", 4): (1e-4, 1e-4, 3e-5, 7e-5),
    ("llama3.2-3b", 3): (1e-4, 1e-4, 3e-5, 1e-4),
    ("llama3.2-3b", 2): (2e-4, 1e-4, 5e-5, 2e-4),
    ("llama3.1-8b", 4): (1e-5, 1e-4, 3e-5, 5e-5),
    ("llama3.1-8b", 3): (1e-5, 1e-4, 3e-5, 7e-5),
    ("llama3.1-8b", 2): (1e-5, 7e-5, 2e-5, 5e-5),
    ("mistral-7b-v0.3", 4): (3e-5, 3e-5, 5e-6, 2e-5),
    ("mistral-7b-v0.3", 3): (2e-5, 3e-5, 5e-6, 3e-5),
    ("mistral-7b-v0.3", 2): (2e-5, 3e-5, 7e-6, 3e-5),
}
MODELS = ("llama3.2-3b", "llama3.1-8b", "mistral-7b-v0.3")
BITS = (2, 3, 4)
DATA = ("alpaca", "gsm8k")

# Per preset: (Table 9 column, adapter.method, dropout, scale_norm, transform, dims, the init= option).
# Low-rank baselines take CLoQ's rates and LoRA dropout 0.1; sparse/spectral ones QWHA's rates, dropout 0
# and QWHA's code scale alpha/sqrt(d_in*d_out). SSH: 2-D DHT, W0-based half/half locations, no QA init;
# LoCA: 2-D DCT, random locations, zero values; SHiRA: identity transform, random locations, zero values.
PRESETS = {
    "qlora": ("cloq", "lora", 0.1, None, None, None, "lora_zero"),
    "cloq": ("cloq", "lora", 0.1, None, None, None, "cloq"),
    "loftq": ("cloq", "lora", 0.1, None, None, None, "loftq"),
    "qwha": ("qwha", "wha", 0.0, "reference", "wht", 1, "qwha"),
    "ssh": ("qwha", "wha", 0.0, "reference", "dht", 2, "ssh_w0"),
    "loca": ("qwha", "wha", 0.0, "reference", "dct", 2, "random_zero"),
    "shira": ("qwha", "wha", 0.0, "reference", "identity", 1, "random_zero"),
}
# Projection shapes (d_out, d_in) of one block: q, k, v, o, gate, up, down (the models' config.json).
SHAPES = {
    "llama3.2-3b": dict(h=3072, i=8192, kv=1024),
    "llama3.1-8b": dict(h=4096, i=14336, kv=1024),
    "mistral-7b-v0.3": dict(h=4096, i=14336, kv=1024),
}


@pytest.fixture
def compose():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda *overrides: hydra_compose(
            config_name="config", overrides=list(overrides), return_hydra_config=True
        )


def _lr(model: str, bits: int, data: str, column: str) -> float:
    row = TABLE9[(model, bits)]
    return row[(0 if column == "cloq" else 2) + (0 if data == "alpaca" else 1)]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_recipe_per_model_bits_data(compose, preset):
    column, family, dropout, scale_norm, transform, dims, init = PRESETS[preset]
    for model in MODELS:
        for data in DATA:
            cfg = compose(f"method={preset}", f"model={model}", f"data={data}", "budget=paper")
            for bits in BITS:
                cfg.bits = bits  # what the `bits=` override does: a plain top-level value
                where = f"{preset} {model} {bits}-bit {data}"
                assert cfg.train.lr == pytest.approx(_lr(model, bits, data, column), rel=1e-12), where
                a = cfg.adapter
                assert a.method == family and a.dropout == dropout, where
                assert cfg.hydra.runtime.choices.init == init, where
                assert cfg.rank == a.rank == 64, where
                if family == "wha":
                    assert (a.scale_norm, a.transform, a.dims) == (scale_norm, transform, dims), where
                    assert a.alpha == 4000.0, where
                else:
                    assert a.lora_alpha == 64, where  # lora_alpha / r = 1
                assert cfg.train.max_steps is None and cfg.train.effective_batch == 64, where
                assert cfg.train.scheduler == "cosine" and cfg.train.warmup_ratio == 0.06, where
                assert cfg.train.epochs == {"alpaca": 3, "gsm8k": 6}[data], where
                assert cfg.data.mask_prompt == (data == "gsm8k"), where
    # the bits= override itself, once per model
    for model in MODELS:
        cfg = compose(f"method={preset}", f"model={model}", "bits=3", "data=gsm8k")
        assert cfg.train.lr == pytest.approx(_lr(model, 3, "gsm8k", column), rel=1e-12)


def test_qwha_init_is_quantization_aware_and_baselines_are_not(compose):
    cfg = compose("method=qwha", "model=llama3.2-3b")
    assert (cfg.init.kind, cfg.init.method, cfg.init.refine) == ("sparse", "adaalloc", True)
    assert cfg.method_name == "qwha"
    for preset in ("ssh", "loca", "shira"):
        assert compose(f"method={preset}").hydra.runtime.choices.init in ("ssh_w0", "random_zero")
    # the QA-aware selection ablations keep their own names (Tables 2 and 4)
    for init in ("ssh", "loca", "random", "magnitude"):
        assert compose(f"init={init}").init.method == init


def test_loca_row_name_follows_location_learning(compose):
    cfg = compose("method=loca", "model=llama3.2-3b")  # unbounded run: locations are learned
    assert cfg.adapter.loca.enabled is True and cfg.method_name == "loca"
    assert compose("method=loca", "adapter.loca.enabled=false").method_name == "loca_fixed"
    # 30 steps: floor(0.1 * 30) = 3 <= coef_steps 10, so no location step is ever taken
    assert compose("method=loca", "model=llama3.2-3b", "train.max_steps=30").method_name == "loca_fixed"
    # 300 steps: 30 > 10, location steps happen
    assert compose("method=loca", "model=llama3.2-3b", "train.max_steps=300").method_name == "loca"


def _paper_scale_factor(h: int, i: int, kv: int) -> float:
    # (d_out, d_in) of q, k, v, o, gate, up, down; weights r*(d_in + d_out)
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]
    logs = sum((o + n) * math.log(math.sqrt(o / n)) for o, n in shapes)
    return math.exp(-logs / sum(o + n for o, n in shapes))


def test_paper_scale_variant_rescales_the_rate(compose):
    # hand value for Llama-3.2-3B: weights 6144 (q, o), 4096 (k, v), 11264 (gate, up, down);
    # sum p*log = 1024.0 (k, v: -0.5493 each x 4096; gate, up: +0.4904 x 11264; down -0.4904 x 11264)
    assert _paper_scale_factor(3072, 8192, 1024) == pytest.approx(math.exp(-1024.0 / 54272.0), rel=1e-3)
    for model in MODELS:
        cfg = compose("method=qwha_paper_scale", f"model={model}", "data=gsm8k")
        for bits in BITS:
            cfg.bits = bits
            assert cfg.adapter.scale_norm == "paper" and cfg.adapter.alpha == 4000.0
            expected = _lr(model, bits, "gsm8k", "qwha") * _paper_scale_factor(**SHAPES[model])
            assert cfg.train.lr == pytest.approx(expected, rel=1e-9)


def test_lota_runs_its_own_recipe(compose):
    for data, steps, epochs in (("alpaca", 300, 1), ("gsm8k", None, 1)):
        cfg = compose("method=lota", "model=llama3.2-3b", f"data={data}", "budget=paper")
        assert (cfg.adapter.method, cfg.hydra.runtime.choices.init) == ("lota", "lota")
        assert cfg.train.max_steps == steps and cfg.train.epochs == epochs
        assert cfg.train.effective_batch == 64 and cfg.data.mask_prompt is True
        assert (cfg.train.scheduler, cfg.train.warmup_ratio) == ("constant", 0.03)
        a = cfg.adapter
        assert a.omega is None  # 0.75 r
        assert (a.keep_start, a.keep_mid, a.keep_end, a.mid_fraction) == (0.05, 0.001, 0.0001, 0.8)
    old = compose("method=lota_qwha_recipe", "model=llama3.2-3b", "data=gsm8k", "budget=paper")
    assert old.adapter.method == "lota" and old.train.max_steps is None and old.train.epochs == 6
    assert old.train.scheduler == "cosine" and old.method_name == "lota_qwha_recipe"
    # a small budget bounds every method alike
    assert compose("method=lota", "data=alpaca", "budget=small").train.max_steps == 30


def test_small_model_keeps_the_paper_density_and_scale(compose):
    cfg = compose("method=qwha")  # SmolLM2-135M: 576 x 576 attention layers
    # Llama-3.2-3B at r = 64: 64 * 6144 / 3072^2 = 4.1667 %; SmolLM2 at r = 12: 12 * 1152 / 576^2, the same
    assert cfg.rank == cfg.adapter.rank == 12
    assert 12 * 1152 / 576**2 == pytest.approx(64 * 6144 / 3072**2)
    # scale alpha / 576 equal to 4000 / 3072 (square layers: the code's and the paper's scale agree)
    assert cfg.adapter.alpha == pytest.approx(750.0)
    assert compose("method=cloq").adapter.rank == 12
    # explicit values win
    assert compose("method=qwha", "rank=16").adapter.rank == 16
    assert compose("method=qwha", "adapter.alpha=4000").adapter.alpha == 4000.0
    # the paper's models keep r = 64 and alpha = 4000 (also at a small budget)
    big = compose("method=qwha", "model=llama3.1-8b", "budget=small")
    assert (big.rank, big.adapter.alpha) == (64, 4000.0)


def test_hf_model_density_from_its_config_json(compose, tmp_path):
    (tmp_path / "config.json").write_text(
        '{"hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2}'
    )
    cfg = compose("model=hf", f"model.id={tmp_path}", "method=qwha")
    assert cfg.rank == 19  # 64 * 896 / 3072 = 18.67
    assert cfg.adapter.alpha == pytest.approx(4000 * 896 / 3072)
    assert recipes.layer_shapes(cfg.model)["k_proj"] == (128, 896)  # 2 kv heads x 64
    # a model as wide as the paper's keeps the paper's r = 64 and alpha = 4000 (as Llama-3.1-8B does)
    (tmp_path / "config.json").write_text(
        '{"hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40, '
        '"num_key_value_heads": 8}'
    )
    wide = compose("model=hf", f"model.id={tmp_path}", "method=qwha")
    assert (wide.rank, wide.adapter.alpha) == (64, 4000.0)


def test_project_rates_are_logged_as_such(compose, caplog):
    cfg = compose("method=cloq", "data=alpaca", "bits=2")
    assert cfg.train.lr == pytest.approx(2e-4)  # Llama-3.2-3B's CLoQ rate, documented as SmolLM2's
    with caplog.at_level(logging.INFO, logger="qwha.recipes"):
        validate(cfg)
    assert "project values" in caplog.text and "CLOQ column" in caplog.text
    paper = recipes.check(compose("method=qwha", "model=mistral-7b-v0.3", "bits=3", "data=gsm8k"))
    assert "Table 9" in paper["lr"] and "3e-05" in paper["lr"]
    assert "explicit" in recipes.check(compose("method=qwha", "rank=8"))["rank"]
    assert recipes.check(compose("bits=8", "model=llama3.2-3b"))["lr"].endswith("the 4-bit one)")


def test_no_rule_is_one_line_config_error(compose):
    cfg = compose("method=cloq", "model=llama3.2-3b")
    with open_dict(cfg):
        del cfg.model.lr["cloq"]
    with pytest.raises(ConfigError, match=r"^model=llama3.2-3b data=gsm8k: no learning-rate rule"):
        recipes.check(cfg)
    cfg = compose("method=qwha")
    cfg.recipe = "fast"
    with pytest.raises(ConfigError, match=r"^recipe='fast' is unknown: allowed values are paper, lota$"):
        recipes.check(cfg)


def test_capacity_limits():
    # SmolLM2-135M's k_proj is 192 x 576: a sparse budget r*(192+576) fits 192*576 coefficients up to
    # r = 144; a LoRA needs r <= 192.
    shapes = {"k_proj": (192, 576), "q_proj": (576, 576)}
    assert recipes.capacity("wha", shapes) == (144, "k_proj")
    assert recipes.capacity("lora", shapes) == (192, "k_proj")


def test_rank_beyond_capacity_fails_fast(tmp_path):
    res = run_cli("rank=145", env={"QWHA_CACHE_PATH": str(tmp_path / "c")})
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "rank=145 does not fit the smollm2-135m layers" in lines[0] and "k_proj (576x192)" in lines[0]
    assert "allowed values are 1..144" in lines[0]


def test_rows_label_old_definitions_and_keep_matching_ones():
    from experiments import rows

    # A SmolLM2 QWHA run recorded before the protocol revision: r = 64, alpha = 4000, alpha/d_in, 2e-4.
    old = {
        "init": {
            "adapter": {
                "method": "wha",
                "transform": "wht",
                "dims": 1,
                "rank": 64,
                "alpha": 4000.0,
                "scale_norm": "paper",
                "dropout": 0.0,
            },
            "init": {
                "method": "adaalloc",
                "refine": True,
                "alloc_weight": "activation",
                "score": "magnitude",
            },
        },
        "finetune": {
            "train": {"lr": 2e-4, "scheduler": "cosine", "warmup_ratio": 0.06},
            "data": {"mask_prompt": True},
        },
    }
    assert (
        rows.label("qwha", "smollm2-135m", 4, "gsm8k", old) == "qwha (old: r=64, alpha=4000, scale=paper, lr)"
    )
    # the same run under today's definition (r = 12, alpha = 750, the code scale, Table 9's 7e-5)
    new = {
        "init": {
            "adapter": {**old["init"]["adapter"], "rank": 12, "alpha": 750.0, "scale_norm": "reference"},
            "init": old["init"]["init"],
        },
        "finetune": {**old["finetune"], "train": {**old["finetune"]["train"], "lr": 7e-5}},
    }
    assert rows.label("qwha", "smollm2-135m", 4, "gsm8k", new) == "qwha"
    # the earlier SSH row: QA-aware selection on a 2-D DCT
    ssh = {
        "init": {
            "adapter": {**new["init"]["adapter"], "transform": "dct", "dims": 2},
            "init": {"method": "ssh", "refine": True},
        }
    }
    label = rows.label("ssh", "smollm2-135m", 4, "gsm8k", ssh)
    assert label.startswith("ssh (old: init=ssh") and "transform=dct" in label
    assert rows.display("loca_fixed") == "loca (fixed locations)"
    assert rows.label("custom", "smollm2-135m", 4, "gsm8k", {}) == "custom"
    assert rows.table_rank("smollm2-135m") == 12 and rows.table_rank("llama3.1-8b") == 64


def test_rows_compare_with_table3s_quantizer(compose):
    """experiment=table3 builds every row on the authors' quantizer (coordinate descent, auto schedule);
    the row labels compare recorded runs with that same quantizer."""
    from experiments import rows

    cfg = compose("experiment=table3")
    assert cfg.quant.cd_iters == "auto" and compose().quant.cd_iters == 0
    assert rows.TABLE3_QUANT == ("quant.cd_iters=auto",)
    recorded = {"quantize": {"quant": {"method": "magr_gptq", "damp": 0.01}}}  # made without the pass
    # an absent cd_iters is the quantize stage's record of 0 (no pass), named as such
    assert "quant.cd_iters=0" in rows.label("gptq_magr", "smollm2-135m", 2, "gsm8k", recorded)


def test_a_table_run_is_named_by_its_preset_not_marked_old(compose):
    """A run made as the tables make it (budget=small, the Table 3 quantizer) carries its preset's name:
    the definition it is compared with is a table budget's, not the first run's (FISTA MagR, 40 iters)."""
    from experiments import rows

    run = compose("method=qwha", "data=gsm8k", "bits=2", "budget=small", *rows.TABLE3_QUANT)
    assert run.quant.magr_solver == "ista" and run.quant.magr_iters == 200  # the paper's MagR
    assert compose("method=qwha").quant.magr_solver == "fista"  # the run without a budget differs
    part = lambda *keys: {k: OmegaConf.to_container(run[k], resolve=True) for k in keys}  # noqa: E731
    recorded = {"quantize": part("quant"), "init": part("init", "adapter"), "finetune": part("data", "train")}
    del recorded["quantize"]["quant"]["magr_solver"]  # the quantize stage records ista by leaving it out
    assert rows.label("qwha", "smollm2-135m", 2, "gsm8k", recorded) == "qwha"
