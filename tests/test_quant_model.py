"""quantize_model / load_quantized on a tiny random Llama: every method, both loaders, the metrics.

Independent references: the full-precision weights read from the source safetensors, a min/max
asymmetric grid written here, MagR re-run here on the layer-0 inputs captured from the fp model (layer
0 sees the same inputs in every model: embeddings → RMSNorm), and ‖ΔW X‖ computed from those inputs.
"""

from __future__ import annotations

import os

import pytest
import torch

for _k, _v in {"GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(_k, _v)

from qwha.quant import quantize_model  # noqa: E402
from qwha.quant.magr import magr  # noqa: E402
from qwha.quant.metrics import checkpoint_weights, dequantized_weight, quantized_linears  # noqa: E402
from qwha.quant.pipeline import NONE_MARKER, load_quantized  # noqa: E402
from tests.conftest import byte_tokenizer, tiny_llama_config  # noqa: E402

BITS, GROUP = 2, 32
ALPHA = 1e-3  # stronger than the paper's 1e-5 so that MagR visibly changes the grid
Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("quant")
    torch.manual_seed(0)
    cfg = tiny_llama_config(
        vocab_size=256,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(root / "fp")
    byte_tokenizer().save_pretrained(root / "fp")
    calib = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
    results = {}
    for method in ("none", "rtn", "gptq", "magr_gptq"):
        results[method] = quantize_model(
            root / "fp",
            root / method,
            calib,
            method=method,
            bits=BITS,
            group_size=GROUP,
            magr_alpha=ALPHA,
            magr_iters=100,
        )
    return {"root": root, "calib": calib, "results": results, "fp": model.eval()}


@torch.no_grad()
def _layer0_inputs(fp_model, calib) -> torch.Tensor:
    """Inputs of layer 0's q_proj over the calibration windows, [tokens, d_in], float64."""
    xs = []
    h = fp_model.get_submodule(Q0).register_forward_pre_hook(lambda _m, a: xs.append(a[0].reshape(-1, 64)))
    for row in calib:
        fp_model(row[None])
    h.remove()
    return torch.cat(xs).double()


def _minmax_grid(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max grid per group (range forced to include 0): (scale, zero, W_RTN) with the
    scale rounded to float16 as the GPTQ format stores it."""
    maxq = 2**bits - 1
    g = w.view(w.shape[0], -1, group)
    lo = g.amin(-1, keepdim=True).clamp(max=0)
    hi = g.amax(-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / maxq
    zero = torch.round(-lo / scale)
    codes = torch.clamp(torch.round(g / scale) + zero, 0, maxq)
    w_q = ((codes - zero) * scale.half().float()).view_as(w)
    return scale.squeeze(-1), zero.squeeze(-1), w_q


def test_artifacts_load_as_torchlinear_with_both_loaders(tiny):
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    x = tiny["calib"][:2]
    for method in ("rtn", "gptq", "magr_gptq"):
        out = tiny["root"] / method
        assert (out / "quantize_config.json").exists()
        via_tf = load_quantized(out, dtype=torch.bfloat16)
        via_gm = load_quantized(out, loader="gptqmodel", dtype=torch.bfloat16)
        for model in (via_tf, via_gm):
            lins = quantized_linears(model)
            assert len(lins) == 14 and all(isinstance(m, TorchLinear) for m in lins.values())
            assert all(m.bits == BITS and m.group_size == GROUP for m in lins.values())
        with torch.no_grad():
            torch.testing.assert_close(via_tf(x).logits, via_gm(x).logits)


def test_four_bit_loads_as_torchlinear(tiny, tmp_path):
    """At 4 bits GPTQModel's CPU auto-selection would pick TorchAtenLinear; the loader asks for the
    torch kernel so every bit width gives the same class."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    quantize_model(tiny["root"] / "fp", tmp_path / "rtn4", None, method="rtn", bits=4, group_size=GROUP)
    lins = quantized_linears(load_quantized(tmp_path / "rtn4"))
    assert all(type(m) is TorchLinear and m.bits == 4 for m in lins.values())


def test_rtn_is_the_minmax_grid(tiny):
    model = load_quantized(tiny["root"] / "rtn")
    lins = quantized_linears(model)
    ref = checkpoint_weights(tiny["root"] / "fp", sorted(lins))
    for name, mod in lins.items():
        _, _, want = _minmax_grid(ref[name], BITS, GROUP)
        torch.testing.assert_close(dequantized_weight(mod), want, atol=1e-6, rtol=0)


def test_gptq_grid_from_weights_and_beats_rtn_on_layer0(tiny):
    """Static groups: GPTQ's stored scales are the min/max scales of the original groups; its output
    error on layer 0's inputs is below RTN's."""
    x = _layer0_inputs(tiny["fp"], tiny["calib"])
    w = checkpoint_weights(tiny["root"] / "fp", [Q0])[Q0]
    scale, _, _ = _minmax_grid(w, BITS, GROUP)
    errs = {}
    for method in ("rtn", "gptq"):
        mod = quantized_linears(load_quantized(tiny["root"] / method))[Q0]
        torch.testing.assert_close(mod.scales.float().T, scale.half().float())
        errs[method] = ((w.double() - dequantized_weight(mod).double()) @ x.T).norm()
    assert errs["gptq"] < errs["rtn"]  # ~8% lower here: random embeddings make X nearly isotropic


def test_magr_ran_inside_gptq_on_the_layer_inputs(tiny):
    """The magr_gptq scales equal the min/max scales of MagR(W, XᵀX) recomputed here from the fp
    model's layer-0 inputs — so GPTQ quantized the MagR weight, built with the layer's own Gram."""
    x = _layer0_inputs(tiny["fp"], tiny["calib"])
    w = checkpoint_weights(tiny["root"] / "fp", [Q0])[Q0]
    w_hat = magr(w, (x.T @ x).float(), GROUP, alpha=ALPHA, iters=100)
    scale_hat, _, _ = _minmax_grid(w_hat, BITS, GROUP)
    scale_w, _, _ = _minmax_grid(w, BITS, GROUP)
    mod = quantized_linears(load_quantized(tiny["root"] / "magr_gptq"))[Q0]
    stored = mod.scales.float().T
    torch.testing.assert_close(stored, scale_hat.half().float(), atol=2e-4, rtol=2e-3)
    assert stored.mean() < 0.97 * scale_w.mean()  # MagR shrank the grid
    row = tiny["results"]["magr_gptq"]["layers"][Q0]
    assert row["group_linf_after"] < row["group_linf_before"]


def test_reported_errors_match_independent_computation(tiny):
    x = _layer0_inputs(tiny["fp"], tiny["calib"])
    for method in ("rtn", "gptq", "magr_gptq"):
        result = tiny["results"][method]
        lins = quantized_linears(load_quantized(tiny["root"] / method))
        ref = checkpoint_weights(tiny["root"] / "fp", sorted(lins))
        assert set(result["layers"]) == set(lins)
        for name, mod in lins.items():
            dw = ref[name] - dequantized_weight(mod)
            row = result["layers"][name]
            assert row["dw_fro"] == pytest.approx(dw.norm().item(), rel=1e-5)
            assert row["w_fro"] == pytest.approx(ref[name].norm().item(), rel=1e-6)
        dw0 = (ref[Q0] - dequantized_weight(lins[Q0])).double()
        assert result["layers"][Q0]["dw_x_fro"] == pytest.approx((dw0 @ x.T).norm().item(), rel=1e-4)
        assert result["layers"][Q0]["w_x_fro"] == pytest.approx(
            (ref[Q0].double() @ x.T).norm().item(), rel=1e-4
        )
        assert result["wall_s"] > 0 and result["peak_rss_mb"] > 0
        assert 0 < result["summary"]["mean_rel_dw_x"] < 1.5


def test_none_is_the_fp_model(tiny):
    result = tiny["results"]["none"]
    assert result["layers"] == {} and (tiny["root"] / "none" / NONE_MARKER).exists()
    model = load_quantized(tiny["root"] / "none")
    x = tiny["calib"][:2]
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, tiny["fp"](x).logits)


def test_bad_input_fails_before_loading(tmp_path, tiny):
    fp = tiny["root"] / "fp"
    calib = tiny["calib"]
    with pytest.raises(ValueError, match=r"quant.bits=5: allowed values are 2, 3, 4, 8"):
        quantize_model(fp, tmp_path / "a", calib, method="gptq", bits=5, group_size=32)
    with pytest.raises(ValueError, match=r"quant.group_size=128 does not divide .*\b64\b"):
        quantize_model(fp, tmp_path / "b", calib, method="gptq", bits=4, group_size=128)
    with pytest.raises(ValueError, match=r"needs a calibration sample"):
        quantize_model(fp, tmp_path / "c", None, method="magr_gptq", bits=4, group_size=32)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_inference_weight_cache_gives_the_same_outputs(tiny):
    """Loaded models keep each layer's dequantized weight for inference (not in training mode); the
    cached forward equals the uncached one exactly."""
    x = tiny["calib"][:2]
    model = load_quantized(tiny["root"] / "gptq")
    lins = list(quantized_linears(model).values())
    with torch.no_grad():
        first = model(x).logits
        assert all(m._cached_weights for m in lins)  # filled by the first forward
        cached = model(x).logits
        for m in lins:
            m.enable_weight_cache(False)
        plain = model(x).logits
    assert torch.equal(cached, plain) and torch.equal(first, plain)
    model.train()
    for m in lins:
        m.enable_weight_cache(True)
    model(x)
    assert not any(m._cached_weights for m in lins)  # training never fills or reads the cache
    off = load_quantized(tiny["root"] / "gptq", weight_cache=False)  # the init and quantize stages
    with torch.no_grad():
        assert torch.equal(off(x).logits, plain)
    assert not any(m._cached_weights for m in quantized_linears(off).values())


def test_coordinate_descent_pass_lowers_the_damped_error_on_gptqs_grid(tiny, tmp_path):
    """quant.cd_iters through GPTQModel: the checkpoint keeps GPTQ's scales and zero-points, every code
    on the grid, and its damped layer-0 error (recomputed here from the fp model's inputs) is lower."""
    from qwha.quant.coordinate_descent import damped_gram, output_error

    result = quantize_model(
        tiny["root"] / "fp",
        tmp_path / "cd",
        tiny["calib"],
        method="gptq",
        bits=BITS,
        group_size=GROUP,
        cd_iters=5,
    )
    x = _layer0_inputs(tiny["fp"], tiny["calib"])
    hd = damped_gram(x.T @ x, 0.75)
    w = checkpoint_weights(tiny["root"] / "fp", [Q0])[Q0]
    plain = quantized_linears(load_quantized(tiny["root"] / "gptq"))[Q0]
    cd = quantized_linears(load_quantized(tmp_path / "cd"))[Q0]
    assert torch.equal(cd.scales, plain.scales) and torch.equal(cd.qzeros, plain.qzeros)
    err_plain = output_error(w, dequantized_weight(plain), hd)
    err_cd = output_error(w, dequantized_weight(cd), hd)
    assert err_cd < 0.99 * err_plain
    row = result["layers"][Q0]
    assert 1 <= row["cd_sweeps"] <= 5 and row["cd_changed"] > 0 and row["cd_objective_ratio"] < 1
