"""stage=export on a tiny random Llama quantized by GPTQModel: dense, gptq and the LoTA merge.

The reference everywhere is the adapter-on model (quantized model + unmerged adapter, float32), whose
forward is itself checked against float64 references in test_adapters.py / test_lota.py. Each export is
reloaded by the loaders a user has (transformers + optimum, GPTQModel, PEFT, qwha.load_tuned) and must
give the reference logits, or refuse with an error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

for _k, _v in {"GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(_k, _v)

from qwha.adapters import adapter_layers, attach_adapter, save_adapter  # noqa: E402
from qwha.cache import Artifact  # noqa: E402
from qwha.config import ConfigError  # noqa: E402
from qwha.quant.pipeline import load_quantized  # noqa: E402
from qwha.stages import export as export_stage  # noqa: E402
from tests.conftest import compose, tiny_llama_config  # noqa: E402

VOCAB, BITS, GROUP = 256, 2, 32
HUB_ID = "example-org/tiny-llama"  # what the export must record, not a cache path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """fp model + tokenizer, its 2-bit RTN GPTQModel checkpoint, and a calibration sample."""
    from transformers import LlamaForCausalLM

    from qwha.quant import quantize_model
    from tests.conftest import byte_tokenizer

    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB)).save_pretrained(root / "fp")
    byte_tokenizer().save_pretrained(root / "fp")
    quantize_model(root / "fp", root / "q", None, method="rtn", bits=BITS, group_size=GROUP)
    byte_tokenizer().save_pretrained(root / "q")
    return root


def _batch(n: int = 3, length: int = 20) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(5))


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch).logits.float()


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max())


def _lota_model(tiny):
    """Quantized model + LoTA with random ternary factors (codes move, the offset μ is non-zero)."""
    model = attach_adapter(load_quantized(tiny / "q"), method="lota", rank=4, omega=1.0, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lota_B.copy_(torch.randint(-1, 2, layer.lota_B.shape, generator=g).float())
    return model


def _wha_model(tiny):
    model = attach_adapter(load_quantized(tiny / "q"), method="wha", rank=2)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.wha_c.copy_(0.002 * torch.randn(layer.wha_c.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def lota_export(tiny):
    model = _lota_model(tiny)
    batch = _batch()
    ref = _logits(model, batch)
    base = _logits(load_quantized(tiny / "q"), batch)
    assert _rel(base, ref) > 0.05  # the adapter changes the function: the checks below can fail
    dest = tiny / "lota_export"
    export_stage.export_lota(model, tiny / "q", dest, HUB_ID)
    (dest / "qwha_export.json").write_text(json.dumps({"format": "lota"}))
    return dest, batch, ref


def test_lota_export_transformers_loads_codes_and_offset(lota_export):
    from transformers import AutoModelForCausalLM

    dest, batch, ref = lota_export
    model = AutoModelForCausalLM.from_pretrained(str(dest), dtype=torch.float32)
    assert any(hasattr(m, "lora_A") for m in model.modules())  # PEFT attached the folder's adapter
    # transformers loads the LoRA in float16 (the GPTQ layers' dtype): s·μ rounded once (rel. 2^-11),
    # the precision of the stored scales themselves.
    assert _rel(_logits(model, batch), ref) <= 1e-3


def test_lota_export_gptqmodel_loads_codes_and_offset(lota_export, tiny):
    from gptqmodel import GPTQModel

    dest, batch, ref = lota_export
    merged = GPTQModel.load(str(dest), device="cpu", dtype=torch.float16)
    plain16 = GPTQModel.load(str(tiny / "q"), device="cpu", dtype=torch.float16)
    err = (_logits(merged.model, batch) - ref).abs().max()
    # its float16 kernel: as far from the adapter-on float32 model as the plain quantized model's
    # float16 kernel is from its own float32 forward
    kernel_err = (_logits(plain16.model, batch) - _logits(load_quantized(tiny / "q"), batch)).abs().max()
    assert err <= 3 * kernel_err + 1e-4, (err, kernel_err)


def test_lota_export_peft_gives_the_adapter_once_or_refuses(lota_export):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    dest, batch, ref = lota_export
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(dest), dtype=torch.float32), dest
    )
    assert _rel(_logits(model, batch), ref) <= 1e-3  # the same slot reloaded, not a second offset
    with pytest.raises(Exception, match="NOT A BASE MODEL"):
        AutoPeftModelForCausalLM.from_pretrained(str(dest))


def test_lota_export_qwha_loaders(lota_export):
    from qwha.load import load_tuned

    dest, batch, ref = lota_export
    model, tok = load_tuned(dest)
    assert _rel(_logits(model, batch), ref) <= 1e-3
    assert tok is not None
    with pytest.raises(FileNotFoundError, match="quantize_config.json"):
        load_quantized(dest)  # would add GPTQModel's LoRA on top of the one transformers attached


def test_lota_export_offset_adapter_is_the_group_shift(lota_export):
    """The PEFT LoRA is rank G per layer with scaling 1: lora_A the group indicator (hand-built here)."""
    from safetensors.torch import load_file

    dest, _, _ = lota_export
    cfg = json.loads((dest / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == export_stage.LOTA_PEFT_BASE
    state = load_file(str(dest / "adapter_model.safetensors"))
    a = state["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"]  # d_in 128: 4 groups
    expected = torch.zeros(4, 128)
    for k in range(128):
        expected[k // GROUP, k] = 1
    assert torch.equal(a, expected)
    r = cfg["rank_pattern"].get("model.layers.0.mlp.down_proj", cfg["r"])
    alpha = cfg["alpha_pattern"].get("model.layers.0.mlp.down_proj", cfg["lora_alpha"])
    assert r == 4 and alpha == r
    assert not (dest / "quantize_config.json").exists()
    assert json.loads((dest / "lota_merge.json").read_text())["source"] == HUB_ID


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_dense_export_reloads_as_plain_transformers(tiny, tmp_path, dtype, tol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = _wha_model(tiny)
    batch = _batch()
    ref = _logits(model, batch)
    assert _rel(_logits(load_quantized(tiny / "q"), batch), ref) > 1e-3
    tok = AutoTokenizer.from_pretrained(str(tiny / "q"))
    export_stage.export_dense(model, tok, tmp_path / "d", dtype)
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert "quantization_config" not in cfg
    dense = AutoModelForCausalLM.from_pretrained(str(tmp_path / "d"), dtype=torch.float32)
    assert not any("Quant" in type(m).__name__ for m in dense.modules())
    assert _rel(_logits(dense, batch), ref) <= tol  # bf16: weights rounded once (rel. 2^-9)
    AutoTokenizer.from_pretrained(str(tmp_path / "d"))


def _inputs(tiny, tmp_path, adapter_model, stage: str = "finetune", calib: bool = False) -> dict:
    """Artifacts as the pipeline hands them to a stage, built by hand around the tiny model."""
    from qwha.artifacts import save_calibration

    base = tmp_path / "base"
    base.mkdir()
    (base / "base_model.json").write_text(json.dumps({"id": str(tiny / "fp"), "source": "local"}))
    quant = tmp_path / "quantize"
    quant.mkdir()
    (quant / "model").symlink_to(tiny / "q")
    tuned = tmp_path / stage
    save_adapter(adapter_model, tuned / "adapter")
    out = {"base": Artifact("base", "b", base), "quantize": Artifact("quantize", "q", quant)}
    out[stage] = Artifact(stage, "f", tuned)
    if calib:
        c = tmp_path / "calib"
        c.mkdir()
        save_calibration(torch.randint(0, VOCAB, (8, 64), generator=torch.Generator().manual_seed(1)), c)
        out["calib"] = Artifact("calib", "c", c)
    return out


def _cfg(*overrides: str):
    return compose(
        "stage=export",
        "model=hf",
        f"model.id={HUB_ID}",  # a hub id never fetched here: the widths-based defaults are given explicitly
        "rank=4",
        "quant=rtn",
        f"bits={BITS}",
        f"group_size={GROUP}",
        "calib.n=8",
        "export.measure.perplexity=false",
        *overrides,
    )


@pytest.mark.slow
def test_gptq_export_requantizes_the_merged_model(tiny, tmp_path):
    """8-bit re-quantization of W_Q + ΔW is close to lossless; the folder loads with both loaders."""
    from gptqmodel import GPTQModel

    model = _wha_model(tiny)
    batch = _batch()
    ref = _logits(model, batch)
    inputs = _inputs(tiny, tmp_path, model, calib=True)
    cfg = _cfg("export.format=gptq", "export.bits=8", "export.calib_windows=4")
    out = tmp_path / "art"
    out.mkdir()
    metrics = export_stage.run(cfg, out, inputs)
    dest = out / "model"
    info = json.loads((dest / "qwha_export.json").read_text())
    assert info["requant"]["bits"] == 8 and info["requant"]["calib_shape"] == [4, 64]
    assert json.loads((dest / "quantize_config.json").read_text())["bits"] == 8
    assert not (out / ".dense").exists()
    y = _logits(load_quantized(dest), batch)  # transformers + optimum (GPTQModel kernel)
    assert _rel(y, ref) <= 2e-2
    y2 = _logits(GPTQModel.load(str(dest), device="cpu", dtype=torch.float16).model, batch)
    assert _rel(y2, ref) <= 3e-2
    assert metrics["summary"]["format"] == "gptq" and metrics["size_mb"] > 0


def test_stage_run_writes_card_and_records_the_hub_id(tiny, tmp_path):
    model = _lota_model(tiny)
    batch = _batch()
    ref = _logits(model, batch)
    inputs = _inputs(tiny, tmp_path, model)
    cfg = _cfg("method=lota", "export.format=lota")
    # an adapter saved from the stages' model records the hub id, not the quantized model's folder
    from qwha.stages.common import load_model_for

    save_adapter(load_model_for(cfg, inputs, "finetune")[0], tmp_path / "resaved")
    doc = json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())
    assert doc["base_model_name_or_path"] == HUB_ID
    out = tmp_path / "art"
    out.mkdir()
    metrics = export_stage.run(cfg, out, inputs)
    dest = out / "model"
    card = (dest / "README.md").read_text()
    assert f"base_model: {HUB_ID}" in card and "AutoModelForCausalLM.from_pretrained" in card
    assert str(tiny) not in card  # no cache or local paths in the card
    info = json.loads((dest / "qwha_export.json").read_text())
    assert info["base_model"] == HUB_ID and info["format"] == "lota"
    assert metrics["summary"]["format"] == "lota" and metrics["size_mb"] > 0
    from qwha.load import load_tuned

    for path in (out, dest):  # the artifact and the folder itself
        assert _rel(_logits(load_tuned(path)[0], batch), ref) <= 1e-3


def test_load_tuned_from_a_cache_artifact(tiny, tmp_path):
    from qwha.load import load_tuned

    model = _wha_model(tiny)
    batch = _batch()
    ref = _logits(model, batch)
    root = tmp_path / "cache"
    qkey, fkey = "0" * 16, "1" * 16
    (root / "quantize" / qkey).mkdir(parents=True)
    (root / "quantize" / qkey / "model").symlink_to(tiny / "q")
    art = root / "finetune" / fkey
    model.qwha_base_model = HUB_ID
    save_adapter(model, art / "adapter")
    (art / "manifest.json").write_text(json.dumps({"upstream": {"quantize": qkey}}))
    doc = json.loads((art / "adapter" / "adapter_config.json").read_text())
    assert doc["base_model_name_or_path"] == HUB_ID
    for path in (art, art / "adapter"):
        loaded, tok = load_tuned(path)
        assert not loaded.training
        assert torch.equal(_logits(loaded, batch), ref)
        assert tok.decode(tok("abc")["input_ids"]).endswith("abc")
    loaded, _ = load_tuned(art, trainable=True)
    assert loaded.training and all(p.requires_grad for n, p in loaded.named_parameters() if "wha_c" in n)
    with pytest.raises(FileNotFoundError, match="quantized="):
        load_tuned(_orphan(tmp_path, model))


def _orphan(tmp_path: Path, model) -> Path:
    """An adapter folder outside any cache artifact."""
    return save_adapter(model, tmp_path / "orphan")


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["export.format=onnx"], "export.format"),
        (["export.source=eval"], "export.source"),
        (["export.format=lota"], "export.format=lota needs adapter=lota"),
        (["export.format=gptq", "export.quant=rtn"], "export.quant"),
        (["export.format=gptq", "export.calib_windows=99"], "export.calib_windows"),
        (["export.dtype=int8"], "export.dtype"),
    ],
)
def test_bad_export_config_is_one_line(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        export_stage.upstream(_cfg(*overrides))
    assert "\n" not in str(err.value) and "allowed" in str(err.value)


def test_export_is_a_stage_outside_all():
    from qwha.stages import PIPELINE

    cfg = _cfg()
    assert "export" not in PIPELINE and cfg.export.format == "dense"
    assert export_stage.upstream(cfg) == ["base", "quantize", "finetune"]
    assert export_stage.upstream(_cfg("export.format=gptq", "export.source=init")) == [
        "base",
        "quantize",
        "calib",
        "init",
    ]
    # the copy destination and the device do not change what is exported
    assert export_stage.key_config(_cfg()) == export_stage.key_config(_cfg("device=cpu"))


def test_lora_adapter_loads_with_plain_peft_and_records_the_hub_id(tiny, tmp_path):
    """What the README promises: a LoRA adapter needs no qwha code to load."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = attach_adapter(load_quantized(tiny / "q"), method="lora", rank=2)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    batch = _batch()
    ref = _logits(model, batch)
    model.get_base_model().qwha_base_model = HUB_ID
    save_adapter(model, tmp_path / "lora")
    assert (
        json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"]
        == HUB_ID
    )
    base = AutoModelForCausalLM.from_pretrained(str(tiny / "q"), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "lora"))
    assert _rel(_logits(peft_model, batch), _logits(load_quantized(tiny / "q"), batch)) > 1e-3
    # transformers' own kernel choice (not qwha's), float32: the same function
    assert _rel(_logits(peft_model, batch), ref) <= 1e-4


def test_cli_bad_export_key_is_one_line_exit_2(tmp_path):
    from tests.conftest import run_cli

    res = run_cli(
        "stage=export", "export.format=onnx", "dry_run=true", env={"QWHA_CACHE_PATH": str(tmp_path)}
    )
    assert res.returncode == 2, res.stderr[-500:]
    assert res.stderr.strip().splitlines() == [
        "qwha: error: export.format='onnx' is unknown: allowed values are dense, gptq, lota"
    ]
