"""LoTA-QAF: the GPTQ bit streams, the ternary step and its boundary masks, the offset μ, the
straight-through gradient, t-SignSGD, the lossless merge, and a tiny quantized Llama end to end.

Independent references: GPTQModel's own ``dequantize_weight`` for the code layout; hand-made examples
for the masks, μ, one optimizer step and the schedule; float64 re-computations written out here (with
explicit loops over groups) for the forward and the gradients.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

for _k, _v in {"GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(_k, _v)

from qwha.adapters import adapter_layers, attach_adapter, load_adapter, save_adapter  # noqa: E402
from qwha.adapters.base import dense_weight  # noqa: E402
from qwha.adapters.lota import (  # noqa: E402
    LoTALinear,
    gptq_grid,
    lota_offset,
    lota_step,
    pack_codes,
    ternary_kaiming,
    unpack_codes,
)
from qwha.adapters.lota_merge import merge_lota, save_merged_lota  # noqa: E402
from qwha.finetune.tsignsgd import TSignSGD, keep_fraction, sign_threshold  # noqa: E402
from tests.conftest import compose, tiny_llama_config  # noqa: E402
from tests.gptq_layers import torch_linear_from  # noqa: E402

U16 = 2.0**-11  # unit roundoff of float16 (GPTQModel stores scales, and the merged offset, in fp16)


def _layer(bits: int, group: int, d_in: int = 64, d_out: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    return torch_linear_from(torch.nn.Linear(d_in, d_out), bits, group)


def _ref_weight(w_int, s, z, a, b, omega, maxq, group):
    """s·(W_int − z + Ŵ + μ) in float64 with explicit loops over groups (the test's own reading)."""
    d = (a.double() @ b.double()).T
    w_int = w_int.double()
    out = torch.empty_like(d)
    for g in range(d.shape[1] // group):
        cols = slice(g * group, (g + 1) * group)
        dg, wg = d[:, cols], w_int[:, cols]
        step = torch.zeros_like(dg)
        step[(dg > omega) & (wg < maxq)] = 1.0
        step[(dg < -omega) & (wg > 0)] = -1.0
        mu = (dg - omega * step).sum(1, keepdim=True) / group / omega
        out[:, cols] = s[:, g : g + 1].double() * (wg - z[:, g : g + 1].double() + step + mu)
    return out


# ---- the GPTQ grid ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_grid_reproduces_gptqmodel_dequantization(bits):
    layer = _layer(bits, 32)
    w_int, s, z, group = gptq_grid(layer)
    assert group == 32 and w_int.min() >= 0 and w_int.max() <= 2**bits - 1
    deq = s.repeat_interleave(group, 1) * (w_int.float() - z.repeat_interleave(group, 1))
    # GPTQModel dequantizes in fp16: one rounding of a value below max|W|.
    ref = dense_weight(layer).float()
    assert (deq - ref).abs().max() <= U16 * ref.abs().max()
    assert torch.equal(pack_codes(w_int.T.contiguous(), bits), layer.qweight)


def test_pack_unpack_round_trip_3bit_straddles_words():
    codes = torch.randint(0, 8, (64, 5), generator=torch.Generator().manual_seed(0))
    packed = pack_codes(codes, 3)
    assert packed.shape == (6, 5) and packed.dtype == torch.int32
    assert torch.equal(unpack_codes(packed, 3, 64).long(), codes)
    # code 10 occupies bits 30..32: two low bits in word 0, its high bit in word 1
    one = torch.zeros(32, 1, dtype=torch.int64)
    one[10] = 0b101
    p = pack_codes(one, 3)
    assert (int(p[0, 0]) & 0xFFFFFFFF) >> 30 == 0b01 and int(p[1, 0]) & 1 == 1


# ---- the method's pieces, by hand --------------------------------------------------------------------


def test_boundary_masks_hand_example():
    # 2 bits: maxq = 3, ω = 1.5. One row of ΔW against the codes below it.
    delta = torch.tensor([[2.0, 2.0, -2.0, -2.0, 1.0, -1.0, 3.0, -3.0]])
    w_int = torch.tensor([[1, 3, 2, 0, 3, 0, 0, 3]])
    step = lota_step(delta, w_int, 1.5, 3)
    # +1 allowed at code 1; blocked at code 3; −1 allowed at 2; blocked at 0; |ΔW| ≤ ω: no step;
    # +1 at code 0 and −1 at code 3 are fine.
    assert step.tolist() == [[1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0, -1.0]]
    assert ((w_int + step) >= 0).all() and ((w_int + step) <= 3).all()


def test_offset_mu_hand_computation():
    # group size 4, ω = 2: μ = mean(ΔW − ω·Ŵ)/ω per group.
    delta = torch.tensor([[3.0, -1.0, 0.0, 2.0, -3.0, -3.0, 1.0, 1.0]])
    step = torch.tensor([[1.0, 0.0, 0.0, 0.0, -1.0, -1.0, 0.0, 0.0]])
    mu = lota_offset(delta, step, 2.0, 4)
    # group 0: (3−2, −1, 0, 2) → sum 2 → 2/4/2 = 0.25; group 1: (−1, −1, 1, 1) → 0
    assert torch.allclose(mu, torch.tensor([[0.25, 0.0]]))


def test_ternary_kaiming_init():
    a = ternary_kaiming((512, 16), torch.Generator().manual_seed(0))
    assert set(a.unique().tolist()) <= {-1.0, 0.0, 1.0}
    # |N(0,1)| > 0.75·E|N(0,1)| = 0.75·√(2/π): probability 2·(1 − Φ(0.598)) ≈ 0.550
    density = float((a != 0).float().mean())
    assert abs(density - 0.550) < 0.02


def _lota_layer(bits=2, group=16, r=4, omega=1.0, seed=0):
    layer = LoTALinear(
        _layer(bits, group, seed=seed), r, omega, generator=torch.Generator().manual_seed(seed)
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        layer.lota_B.copy_(torch.randint(-1, 2, layer.lota_B.shape, generator=g).float())
    return layer


@pytest.mark.parametrize("bits,group", [(2, 16), (3, 32), (4, 64)])
def test_forward_matches_float64_reference(bits, group):
    layer = _lota_layer(bits, group)
    w_int, s, z = layer.grid()
    ref = _ref_weight(w_int, s, z, layer.lota_A, layer.lota_B, layer.omega, layer.maxq, group)
    assert torch.allclose(
        layer.effective_weight(torch.float64), ref, rtol=0, atol=1e-6 * float(ref.abs().max())
    )
    step, _ = layer.step_and_offset()
    assert step.abs().sum() > 0  # the example exercises the ternary step, not only μ
    x = torch.randn(5, 64, dtype=torch.float64)
    y = layer(x.float()).double()
    bias = layer.base_layer.bias.double()
    assert torch.allclose(y, x @ ref.T + bias, rtol=0, atol=1e-5)


def test_straight_through_gradient_matches_hand_derivation():
    layer = _lota_layer(2, 16, r=4, omega=1.0)
    x = torch.randn(3, 7, 64)
    c = torch.randn(3, 7, 32)
    (layer(x) * c).sum().backward()
    # by hand: ∂L/∂W_eff = Σ_tokens c xᵀ; STE: ∂L/∂ΔW = (s/ω) ⊙ ∂L/∂W_eff (s per group); ΔW = (A·B)ᵀ.
    x2, c2 = x.reshape(-1, 64).double(), c.reshape(-1, 32).double()
    gw = c2.T @ x2
    _, s, _ = layer.grid()
    gd = torch.empty_like(gw)
    for g in range(4):
        gd[:, g * 16 : (g + 1) * 16] = gw[:, g * 16 : (g + 1) * 16] * s[:, g : g + 1].double() / 1.0
    a, b = layer.lota_A.detach().double(), layer.lota_B.detach().double()
    assert torch.allclose(layer.lota_A.grad.double(), gd.T @ b.T, rtol=1e-5, atol=1e-6)
    assert torch.allclose(layer.lota_B.grad.double(), a.T @ gd.T, rtol=1e-5, atol=1e-6)
    # the input gradient is exact: W_effᵀ applied to c
    xr = x.clone().requires_grad_(True)
    (layer(xr) * c).sum().backward()
    w = layer.effective_weight(torch.float64)
    assert torch.allclose(xr.grad.double(), c.double() @ w, atol=1e-5)


# ---- t-SignSGD -----------------------------------------------------------------------------------------


def test_tsignsgd_one_step_by_hand():
    p = torch.nn.Parameter(torch.tensor([[0.0, 1.0, -1.0, 0.0], [1.0, 0.0, -1.0, 1.0]]))
    p.grad = torch.tensor([[0.5, -0.9, 0.1, -0.3], [0.05, 0.2, 0.7, -0.6]])
    # keep 3/8 of the entries: m = ⌈0.375·8⌉ = 3; σ = 4th largest |g| = 0.5; move where |g| > 0.5:
    # −0.9 (p=1 → 2, clipped to 1), 0.7 (p=−1 → −2, clipped to −1), −0.6 (p=1 → 2 → 1). Then the clipping
    # leaves p unchanged here; a second tensor shows real moves.
    q = torch.nn.Parameter(torch.tensor([[0.0, 1.0, -1.0, 0.0], [1.0, 0.0, -1.0, 1.0]]))
    q.grad = torch.tensor([[0.5, 0.9, -0.1, -0.3], [0.05, -0.2, -0.7, 0.6]])
    assert float(sign_threshold(p.grad, 0.375)) == 0.5
    opt = TSignSGD([p, q], total_steps=10, keep_start=0.375)
    opt.step()
    assert p.tolist() == [[0.0, 1.0, -1.0, 0.0], [1.0, 0.0, -1.0, 1.0]]
    # q: |g| > 0.5 at 0.9 (1 → 0), −0.7 (−1 → 0), 0.6 (1 → 0)
    assert q.tolist() == [[0.0, 0.0, -1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    assert int(opt.state[q]["step"]) == 1


def test_tsignsgd_floor_and_full_keep():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([1e-10, -2e-9, 0.0, 3.0])
    TSignSGD([p], total_steps=1, keep_start=1.0).step()  # keep all: σ = 0, floor 1e-9 applies
    assert p.tolist() == [0.0, 1.0, 0.0, -1.0]


def test_keep_fraction_schedule_hand_values():
    t = 100  # 5% → 0.1% over steps 0..80, then → 0.01% at step 99
    assert keep_fraction(0, t) == pytest.approx(0.05)
    assert keep_fraction(40, t) == pytest.approx(0.0255)
    assert keep_fraction(80, t) == pytest.approx(0.001)
    assert keep_fraction(90, t) == pytest.approx(0.001 - 0.0009 * 10 / 19)
    assert keep_fraction(99, t) == pytest.approx(0.0001)
    assert keep_fraction(150, t) == pytest.approx(0.0001)


def test_tsignsgd_state_dict_resumes_exactly():
    def run(split: int | None):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.zeros(40, 30))
        opt = TSignSGD([p], total_steps=6, keep_start=0.3, keep_mid=0.05, keep_end=0.01)
        gs = [torch.randn(40, 30, generator=torch.Generator().manual_seed(i)) for i in range(6)]
        for i, g in enumerate(gs):
            if i == split:
                sd = opt.state_dict()
                opt = TSignSGD([p], total_steps=6)  # other defaults: the state_dict restores the group's
                opt.load_state_dict(sd)
            p.grad = g
            opt.step()
        return p.detach().clone()

    assert torch.equal(run(None), run(3))


# ---- merge -------------------------------------------------------------------------------------------


class _Holder(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer


@pytest.mark.parametrize("bits,group", [(2, 16), (3, 32), (4, 64)])
def test_merge_is_lossless_and_codes_stay_in_range(bits, group):
    layer = _lota_layer(bits, group, r=4, omega=1.0)
    # push codes against both boundaries: the masks must keep W_int + Ŵ inside [0, 2^b − 1]
    w_int, _, _ = layer.grid()
    assert (w_int == 0).any() and (w_int == layer.maxq).any()
    x = torch.randn(9, 64, dtype=torch.float64)
    w_ref = layer.effective_weight(torch.float64)
    y_ref = x @ w_ref.T + layer.base_layer.bias.double()
    step, _ = layer.step_and_offset()
    codes_expected = w_int + step.to(w_int.dtype)
    holder = merge_lota(_Holder(layer))
    merged = holder.proj
    codes, _, _, _ = gptq_grid(merged)
    assert torch.equal(codes, codes_expected)
    assert codes.min() >= 0 and codes.max() <= layer.maxq
    y = merged(x.float()).double()
    # The merged layer is GPTQModel's kernel: its fp16 dequantization rounds each weight once (relative
    # 2^-11) and the offset LoRA adds s·μ summed over each group. Bound: 2·u16·(|x|·|W_eff|ᵀ) per output.
    bound = 2 * U16 * (x.abs() @ w_ref.abs().T)
    assert ((y - y_ref).abs() <= bound + 1e-6).all()


# ---- end to end on a tiny quantized Llama -----------------------------------------------------------


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from qwha.quant import quantize_model
    from tests.conftest import byte_tokenizer

    root = tmp_path_factory.mktemp("lota")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=256)).save_pretrained(root / "fp")
    byte_tokenizer().save_pretrained(root / "fp")
    quantize_model(root / "fp", root / "q", None, method="rtn", bits=2, group_size=32)
    return root


def _train_set(n: int = 8, length: int = 24):
    g = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 256, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def _train_cfg(steps: int, **kw):
    return {
        "max_steps": steps,
        "micro_batch_size": 4,
        "effective_batch": 8,
        "save_every": 2,
        "precision": "fp32",
        "max_grad_norm": None,
        "optimizer": "tsignsgd",
        "tsignsgd": {"keep_start": 0.2, "keep_mid": 0.05, "keep_end": 0.02, "mid_fraction": 0.8},
        **kw,
    }


def test_end_to_end_train_lowers_loss_then_merge_equals(quantized, tmp_path):
    from qwha.finetune import train
    from qwha.quant.pipeline import load_quantized

    model = attach_adapter(load_quantized(quantized / "q"), method="lota", rank=4, omega=1.0, seed=0)
    data = _train_set()
    batch = torch.tensor([r["input_ids"] for r in data])

    def loss_of(m):
        with torch.no_grad():
            logits = m(batch).logits[:, :-1]
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1)))

    before = loss_of(model)
    res = train(model, None, data, _train_cfg(8), tmp_path / "run", device="cpu")
    assert res["steps_run"] == 8
    after = loss_of(model)
    assert after < before - 1e-3, (before, after)
    for layer in adapter_layers(model).values():
        assert set(layer.lota_A.unique().tolist()) <= {-1.0, 0.0, 1.0}
        assert set(layer.lota_B.unique().tolist()) <= {-1.0, 0.0, 1.0}

    # adapter save/load (PEFT layout, int8 ternary factors) reproduces the trained model
    save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LOTA"
    reloaded = load_adapter(load_quantized(quantized / "q"), tmp_path / "adapter")
    assert loss_of(reloaded) == pytest.approx(after, abs=1e-6)

    # merged checkpoint: GPTQModel format, loads with both loaders, outputs equal the adapter-on model
    with torch.no_grad():
        y_adapter = model(batch).logits
    out = save_merged_lota(model, quantized / "q", tmp_path / "merged")
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["adapter"] == {"name": "lora", "path": "", "rank": 4}  # max groups: 128 / 32
    merged = load_quantized(out)  # float32 through transformers + GPTQModel's own Lora
    with torch.no_grad():
        y_merged = merged(batch).logits
    # float32 kernel; the stored s·μ is rounded once to fp16 (relative 2^-11 of an offset that is a
    # fraction of one quantization step). Observed ~4e-5 on logits of size ~0.7.
    assert (y_merged - y_adapter).abs().max() <= 1e-3 * y_adapter.abs().max()
    for name, module in merged.named_modules():
        if hasattr(module, "qweight"):
            codes = gptq_grid(module)[0]
            assert codes.min() >= 0 and codes.max() <= 3, name

    # GPTQModel's own loader (no qwha code at inference), its fp16 kernel: same distance from the
    # adapter-on float32 model as the plain quantized model's fp16 kernel has from its float32 self.
    fp16 = load_quantized(out, loader="gptqmodel", dtype=torch.float16)
    base32 = load_quantized(quantized / "q")
    base16 = load_quantized(quantized / "q", loader="gptqmodel", dtype=torch.float16)
    with torch.no_grad():
        err_merged = (fp16(batch).logits.float() - y_adapter).abs().max()
        err_kernel = (base16(batch).logits.float() - base32(batch).logits).abs().max()
    assert err_merged <= 3 * err_kernel, (err_merged, err_kernel)


def test_trainer_resume_with_tsignsgd_is_exact(quantized, tmp_path):
    from qwha.finetune import train
    from qwha.quant.pipeline import load_quantized

    data = _train_set()

    def fresh():
        return attach_adapter(load_quantized(quantized / "q"), method="lota", rank=4, omega=1.0, seed=0)

    full = fresh()
    train(full, None, data, _train_cfg(4), tmp_path / "a", device="cpu")

    class Stop(Exception):
        pass

    def stop_at_2(step, _row):
        if step == 2:
            raise Stop

    part = fresh()
    with pytest.raises(Stop):
        train(part, None, data, _train_cfg(4), tmp_path / "b", device="cpu", on_step=stop_at_2)
    resumed = fresh()
    res = train(resumed, None, data, _train_cfg(4), tmp_path / "b", device="cpu")
    assert res["resumed_from_step"] == 2
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters(), strict=True):
        if p.requires_grad:
            assert torch.equal(p, q), n


# ---- configuration ------------------------------------------------------------------------------------


def test_config_method_lota_composes_and_validates():
    from qwha.config import ConfigError, validate

    cfg = compose("method=lota")
    validate(cfg)
    assert cfg.adapter.method == "lota" and cfg.init.kind == "lota" and cfg.method_name == "lota"
    assert cfg.adapter.omega is None and cfg.adapter.rank == cfg.rank
    with pytest.raises(ConfigError, match="quant.method=none"):
        validate(compose("method=lota", "quant=none"))
    with pytest.raises(ConfigError, match="adapter=lota needs init=lota"):
        validate(compose("adapter=lota"))
    with pytest.raises(ConfigError, match="adapter.keep_start"):
        validate(compose("method=lota", "adapter.keep_start=0"))
    from omegaconf import OmegaConf

    sweep = OmegaConf.load("conf/experiment/table3.yaml").hydra.sweeper.params.method
    assert "lota" in sweep.split(",")


def test_finetune_stage_selects_tsignsgd():
    from qwha.finetune.config import TrainConfig
    from qwha.stages.finetune import train_config

    cfg = TrainConfig.from_mapping(train_config(compose("method=lota")))
    assert (
        cfg.optimizer == "tsignsgd" and cfg.tsignsgd.keep_start == 0.05 and cfg.tsignsgd.mid_fraction == 0.8
    )
    assert TrainConfig.from_mapping(train_config(compose())).optimizer == "adamw"
    assert math.isclose(keep_fraction(0, 10, cfg.tsignsgd.keep_start), 0.05)


def test_float_layers_are_refused_with_a_clear_error():
    from torch import nn

    from qwha.adapters.lota import LoTALinear

    with pytest.raises(TypeError, match="LoTA adapts GPTQModel quantized layers, got Linear"):
        LoTALinear(nn.Linear(64, 32), r=4)
