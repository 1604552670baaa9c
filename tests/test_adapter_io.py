"""Save/load in PEFT's format and the dense export, on a tiny Llama quantized by GPTQModel itself.

The quantized model is made once per module (GPTQModel.quantize on random token ids, a few seconds).
GPTQModel wraps ``TorchLinear.dequantize_weight`` in ``torch.compile``; these tests run with dynamo
disabled, which leaves the arithmetic unchanged and saves ~15 s of compilation per process."""

from __future__ import annotations

import json
import os

import pytest
import torch

from qwha.adapters import (
    adapter_layers,
    attach_adapter,
    load_adapter,
    merge_to_dense,
    save_adapter,
)
from qwha.adapters.io import CONFIG_NAME, WEIGHTS_NAME
from tests.gptq_layers import tiny_llama

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module", autouse=True)
def no_dynamo():
    import torch._dynamo

    # dynamo's own patch context restores its config state on exit (a plain monkeypatch of this hidden
    # key left later GPTQModel compiles reading an entry that "does not exist")
    with torch._dynamo.config.patch(disable=True):
        yield


def save_tiny_tokenizer(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    tok.save_pretrained(str(path))


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory, no_dynamo):
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    root = tmp_path_factory.mktemp("gptq")
    tiny_llama(seed=0).save_pretrained(str(root / "fp"))
    save_tiny_tokenizer(root / "fp")
    qcfg = QuantizeConfig(bits=4, group_size=32, sym=False, desc_act=False, pack_impl="original")
    model = GPTQModel.load(str(root / "fp"), qcfg, device="cpu")
    g = torch.Generator().manual_seed(0)
    calib = [
        {"input_ids": torch.randint(3, 128, (32,), generator=g).tolist(), "attention_mask": [1] * 32}
        for _ in range(8)
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # GPTQModel writes a logs/ folder into the working directory
        model.quantize(calib, backend=BACKEND.GPTQ_TORCH)
    model.save(str(root / "q4"))
    return root / "q4"


def load_quantized(path):
    from gptqmodel import BACKEND, GPTQModel

    model = GPTQModel.load(str(path), device="cpu", backend=BACKEND.GPTQ_TORCH)
    model.model.float()  # scales stay fp16 buffers; activations in float32 on CPU
    model.model.eval()
    return model


IDS = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def give_values(model, method: str) -> None:
    g = torch.Generator().manual_seed(3)
    for layer in adapter_layers(model).values():
        if method == "wha":
            p, n = layer.budget, layer.out_features * layer.in_features
            flat = torch.randperm(n, generator=g)[:p]
            idx = torch.stack((flat // layer.in_features, flat % layer.in_features), 1)
            layer.set_sparse(idx, 1e-3 * torch.randn(p, generator=g))
        else:
            r = layer.rank
            layer.set_lora(
                0.05 * torch.randn(r, layer.in_features, generator=g),
                0.05 * torch.randn(layer.out_features, r, generator=g),
            )


@pytest.mark.parametrize("method, kw", [("wha", {}), ("wha", {"transform": "dct", "dims": 2}), ("lora", {})])
def test_round_trip_identical_outputs(gptq_dir, tmp_path, method, kw):
    model = attach_adapter(load_quantized(gptq_dir), method=method, rank=2, target_modules=TARGETS, **kw)
    give_values(model, method)
    expected = logits(model)
    save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / CONFIG_NAME).is_file() and (tmp_path / "adapter" / WEIGHTS_NAME).is_file()
    config = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert config["peft_type"] == ("WHA" if method == "wha" else "LORA")
    reloaded = load_adapter(load_quantized(gptq_dir), tmp_path / "adapter")
    assert torch.equal(logits(reloaded), expected)
    assert not any(p.requires_grad for p in reloaded.parameters())
    trainable = load_adapter(load_quantized(gptq_dir), tmp_path / "adapter", is_trainable=True)
    assert sum(p.numel() for p in trainable.parameters() if p.requires_grad) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )


def test_wha_file_layout(gptq_dir, tmp_path):
    from safetensors.torch import load_file

    model = attach_adapter(
        load_quantized(gptq_dir), method="wha", rank=2, target_modules=["q_proj", "down_proj"]
    )
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert {k: config[k] for k in ("r", "transform", "dims", "scale_norm", "alpha")} == {
        "r": 2,
        "transform": "wht",
        "dims": 1,
        "scale_norm": "reference",
        "alpha": 4000.0,
    }
    state = load_file(str(tmp_path / WEIGHTS_NAME))
    assert sorted(state) == [
        "base_model.model.model.layers.0.mlp.down_proj.wha_c",
        "base_model.model.model.layers.0.mlp.down_proj.wha_indices",
        "base_model.model.model.layers.0.self_attn.q_proj.wha_c",
        "base_model.model.model.layers.0.self_attn.q_proj.wha_indices",
    ]
    assert state["base_model.model.model.layers.0.self_attn.q_proj.wha_c"].shape == (2 * (64 + 64),)
    assert state["base_model.model.model.layers.0.self_attn.q_proj.wha_indices"].dtype == torch.int32


def test_load_refuses_mismatched_model(gptq_dir, tmp_path):
    model = attach_adapter(load_quantized(gptq_dir), method="wha", rank=2, target_modules=["q_proj"])
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["target_modules"] = ["q_proj", "v_proj"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has no values for layer 'model.layers.0.self_attn.v_proj'"):
        load_adapter(load_quantized(gptq_dir), tmp_path)


@pytest.mark.parametrize("method", ["wha", "lora"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_to_dense_and_reload_with_transformers(gptq_dir, tmp_path, method, dtype):
    from transformers import AutoModelForCausalLM

    model = attach_adapter(load_quantized(gptq_dir), method=method, rank=2, target_modules=TARGETS)
    give_values(model, method)
    unmerged = logits(model)
    merged = merge_to_dense(model, dtype=dtype)
    assert not hasattr(merged.config, "quantization_config")
    assert all(type(m).__name__ != "TorchLinear" for m in merged.modules())
    assert all(p.dtype == dtype for p in merged.parameters())
    got = logits(merged)
    # one rounding of every weight to ``dtype`` plus ``dtype`` arithmetic through one block
    tol = {torch.bfloat16: 0.05, torch.float16: 0.01}[dtype] * float(unmerged.abs().max())
    assert float((got - unmerged).abs().max()) <= tol
    merged.save_pretrained(str(tmp_path / "merged"))
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=dtype)
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert torch.equal(logits(plain.eval()), got)
