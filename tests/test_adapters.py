"""The WHA adapter family and the LoRA view against dense float64 computations.

Reference: ``y = (W_Q + s · T_out · F · T_inᵀ) x + b`` with ``T`` from ``transform_matrix`` (``T_out = I``
for ``dims=1``), ``F`` scattered densely from (E, c), gradients by dense autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qwha.adapters import (
    ADAPTER_METHODS,
    WHALinear,
    adapter_layers,
    attach_adapter,
    wha_budget,
    wha_scale,
)
from qwha.adapters.wha import default_indices
from qwha.hadamard import HadamardSizeError
from qwha.transforms import TRANSFORMS, transform_matrix
from tests.gptq_layers import quantize_linears, rtn_grid, tiny_llama, torch_linear_from

CASES = [
    (t, d, c)
    for t in TRANSFORMS
    for d in (1, 2)
    for c in ("fused", "delta", "sparse")
    if not (c == "sparse" and d == 2)
]


def random_sparse(d_out: int, d_in: int, p: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(d_out * d_in, generator=g)[:p]
    return torch.stack((flat // d_in, flat % d_in), dim=1), torch.randn(p, generator=g, dtype=dtype)


def dense_reference(w_q, bias, idx, vals, transform, dims, scale, x, g):
    """Output and gradients (wrt c in the given order, and x) by dense float64 autograd."""
    d_out, d_in = w_q.shape
    c = vals.clone().double().requires_grad_(True)
    xr = x.detach().clone().double().requires_grad_(True)
    f = torch.zeros(d_out, d_in, dtype=torch.float64).index_put((idx[:, 0], idx[:, 1]), c)
    t_in = transform_matrix(transform, d_in)
    t_out = transform_matrix(transform, d_out) if dims == 2 else torch.eye(d_out, dtype=torch.float64)
    w = w_q.double() + scale * t_out @ f @ t_in.T
    y = xr @ w.T + (0 if bias is None else bias.double())
    gc, gx = torch.autograd.grad((y * g).sum(), (c, xr))
    return y.detach(), gc, gx


def check_layer_against_dense(layer, w_q, bias, transform, dims, seed, tokens=5):
    d_out, d_in = w_q.shape
    p = layer.budget
    idx, vals = random_sparse(d_out, d_in, p, seed)
    layer.set_sparse(idx, vals)
    x = torch.randn(2, tokens, d_in, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, tokens, d_out, dtype=torch.float64)
    y = layer(x)
    gc_layer, gx = torch.autograd.grad((y * g).sum(), (layer.wha_c, x))
    y_ref, gc_ref, gx_ref = dense_reference(w_q, bias, idx, vals, transform, dims, layer.scale, x, g)
    assert torch.allclose(y.double(), y_ref, rtol=0, atol=1e-10)
    assert torch.allclose(gx.double(), gx_ref, rtol=0, atol=1e-10)
    # the layer stores E row-major: map its gradient back to the order set_sparse was given
    pos = {int(r) * d_in + int(c): k for k, (r, c) in enumerate(idx.tolist())}
    order = torch.tensor([pos[int(e)] for e in layer.wha_indices.tolist()])
    assert torch.allclose(gc_layer.double(), gc_ref[order], rtol=0, atol=1e-10)


@pytest.mark.parametrize("transform, dims, compute", CASES)
def test_linear_base_equals_dense(transform, dims, compute):
    torch.manual_seed(0)
    base = nn.Linear(24, 20, dtype=torch.float64)  # 24 = 12·2, 20 = Paley I (q = 19)
    layer = WHALinear(
        base, 37, transform=transform, dims=dims, compute=compute, alpha=3.0, scale_norm="paper"
    )
    check_layer_against_dense(layer, base.weight.detach(), base.bias.detach(), transform, dims, seed=1)


@pytest.mark.parametrize("transform, dims, compute", CASES)
def test_gptq_base_equals_dense(transform, dims, compute):
    torch.manual_seed(0)
    src = nn.Linear(64, 48, bias=True)
    base = torch_linear_from(src, bits=4, group_size=32)
    w_q, _, _ = rtn_grid(src.weight, 4, 32)  # W_Q computed independently of GPTQModel's dequant
    bias = base.bias.detach().double()
    layer = WHALinear(
        base, 50, transform=transform, dims=dims, compute=compute, alpha=40.0, dtype=torch.float64
    )
    check_layer_against_dense(layer, w_q.double(), bias, transform, dims, seed=2)
    assert torch.equal(layer.base_weight(), w_q)


@pytest.mark.parametrize("transform, dims", [("wht", 1), ("wht", 2), ("dct", 2)])
@pytest.mark.parametrize("tokens", [2, 40])
def test_fused_gradient_both_orders(transform, dims, tokens):
    # few tokens: ∂L/∂c from transformed activations; many tokens: from the transformed ∂L/∂ΔW
    torch.manual_seed(0)
    base = nn.Linear(24, 20, dtype=torch.float64)
    layer = WHALinear(base, 33, transform=transform, dims=dims, compute="fused")
    check_layer_against_dense(layer, base.weight.detach(), base.bias.detach(), transform, dims, 5, tokens)


@pytest.mark.parametrize("dims", [1, 2])
def test_inference_path_equals_dense_and_follows_updates(dims):
    torch.manual_seed(0)
    base = nn.Linear(24, 20, dtype=torch.float64)
    layer = WHALinear(base, 30, dims=dims, transform="dht")
    assert layer.resolved_compute(needs_grad=False) == ("sparse" if dims == 1 else "delta")
    x = torch.randn(3, 24, dtype=torch.float64)
    for seed in (1, 2):  # a second set_sparse must not reuse a cached ΔW
        idx, vals = random_sparse(20, 24, 30, seed)
        layer.set_sparse(idx, vals)
        with torch.no_grad():
            y = layer(x)
        y_ref, _, _ = dense_reference(
            base.weight, base.bias, idx, vals, "dht", dims, layer.scale, x, torch.zeros(3, 20)
        )
        assert torch.allclose(y, y_ref, atol=1e-10)


def test_dropout_path_is_split_and_exact_in_eval():
    torch.manual_seed(0)
    base = nn.Linear(16, 12, dtype=torch.float64)
    layer = WHALinear(base, 20, dropout=0.5)
    assert layer.resolved_compute() == "sparse"
    assert WHALinear(base, 20, dropout=0.5, dims=2).resolved_compute() == "delta"
    layer.eval()
    check_layer_against_dense(layer, base.weight.detach(), base.bias.detach(), "wht", 1, seed=3)


def test_bf16_base_within_dtype_tolerance():
    torch.manual_seed(0)
    base = nn.Linear(64, 32, dtype=torch.bfloat16)
    layer = WHALinear(base, 100, alpha=4000.0)
    assert layer.wha_c.dtype == torch.float32
    idx, vals = random_sparse(32, 64, 100, seed=4)
    layer.set_sparse(idx, vals.float() * 1e-3)
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y_ref, _, _ = dense_reference(
        base.weight.detach(),
        base.bias.detach(),
        idx,
        vals * 1e-3,
        "wht",
        1,
        layer.scale,
        x,
        torch.zeros(8, 32),
    )
    assert torch.allclose(y.double(), y_ref, rtol=2**-6, atol=2**-6 * float(y_ref.abs().max()))


def test_scale_variants():
    assert wha_scale("paper", 4000.0, 3072, 1024) == 4000.0 / 3072
    assert wha_scale("reference", 4000.0, 3072, 1024) == pytest.approx(4000.0 / (3072 * 1024) ** 0.5)
    assert wha_scale("none", 2.0, 3072, 1024) == 2.0
    with pytest.raises(ValueError, match="scale_norm='x' is not one of paper, reference, none"):
        wha_scale("x", 1.0, 2, 2)


def test_default_indices():
    idx = default_indices(1000, 48, 64)
    assert torch.equal(idx, torch.arange(1000) * (48 * 64) // 1000)
    assert bool((idx[1:] > idx[:-1]).all()) and int(idx[-1]) < 48 * 64
    layer = WHALinear(nn.Linear(64, 48), 1000)
    assert torch.equal(layer.wha_indices.long(), idx) and layer.wha_indices.dtype == torch.int32
    assert not bool(layer.wha_c.any())
    rows = layer.indices()[:, 0]
    assert torch.bincount(rows, minlength=48).min() >= 1000 // 48 - 1  # spread over every row


def test_set_sparse_validation():
    layer = WHALinear(nn.Linear(16, 8), 10)
    with pytest.raises(ValueError, match=r"indices \[10, 2\] and values \[10\]"):
        layer.set_sparse(torch.zeros(9, 2, dtype=torch.long), torch.zeros(9))
    dup = torch.tensor([[0, 1]] * 2 + [[1, k] for k in range(8)])
    with pytest.raises(ValueError, match="duplicate"):
        layer.set_sparse(dup, torch.zeros(10))
    bad = torch.tensor([[8, 0]] + [[1, k] for k in range(9)])
    with pytest.raises(ValueError, match="out of range"):
        layer.set_sparse(bad, torch.zeros(10))
    with pytest.raises(ValueError, match="budget=200 must be in"):
        WHALinear(nn.Linear(16, 8), 200)


def test_width_without_hadamard_fails_fast():
    with pytest.raises(HadamardSizeError, match="nearest supported widths: 28 and 32"):
        WHALinear(nn.Linear(30, 8), 10)
    WHALinear(nn.Linear(30, 8), 10, transform="dct")  # other transforms have every size
    with pytest.raises(HadamardSizeError, match="width 30"):
        WHALinear(nn.Linear(8, 30), 10, dims=2)


# LoTA adapts GPTQ integer codes, so it runs on quantized layers only (float layers: tests/test_lota.py
# checks the refusal).
@pytest.mark.parametrize(
    ("method", "quantized"),
    [(m, q) for m in ADAPTER_METHODS for q in (False, True) if q or m != "lota"],
)
def test_attach_budget_and_frozen_base(method, quantized):
    model = tiny_llama()
    if quantized:
        quantize_linears(model)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    shapes = {
        n: (m.in_features, m.out_features)
        for n, m in model.named_modules()
        if n.rsplit(".", 1)[-1] in targets
    }
    adapted = attach_adapter(model, method=method, rank=3, target_modules=targets)
    layers = adapter_layers(adapted)
    assert set(layers) == set(shapes)  # names of the un-adapted model
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    budget = sum(wha_budget(3, d_in, d_out) for d_in, d_out in shapes.values())
    assert sum(p.numel() for p in trainable) == budget == sum(3 * (a + b) for a, b in shapes.values())
    for name, layer in layers.items():
        assert layer.method == method
        w = layer.base_weight()
        assert w.shape == (shapes[name][1], shapes[name][0]) and w.dtype == torch.float32
        assert not bool(layer.delta_weight().any())  # both start at ΔW = 0


def test_budget_cap():
    assert wha_budget(64, 64, 32) == 64 * 32
    model = attach_adapter(tiny_llama(), method="wha", rank=64, target_modules=["k_proj"])
    (layer,) = adapter_layers(model).values()
    assert layer.budget == 64 * 32


def test_wha_init_interface_and_training_step():
    torch.manual_seed(0)
    model = quantize_linears(tiny_llama())
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    model = attach_adapter(model, method="wha", rank=2, target_modules=["q_proj", "down_proj"])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # zero init: same function
    for k, layer in enumerate(adapter_layers(model).values()):
        idx, vals = random_sparse(
            layer.out_features, layer.in_features, layer.budget, seed=k, dtype=torch.float32
        )
        layer.set_sparse(idx, vals)
        dense = torch.zeros(layer.out_features, layer.in_features).index_put((idx[:, 0], idx[:, 1]), vals)
        expected = layer.scale * dense @ transform_matrix("wht", layer.in_features, torch.float32).T
        assert torch.allclose(layer.delta_weight(), expected, atol=1e-5)
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(grads) == 2 and all(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_lora_view_set_lora_matches_dense():
    torch.manual_seed(0)
    model = quantize_linears(tiny_llama())
    peft_model = attach_adapter(model, method="lora", rank=4, lora_alpha=8.0, target_modules=["v_proj"])
    ((name, view),) = adapter_layers(peft_model).items()
    assert name == "model.layers.0.self_attn.v_proj" and view.scaling == 2.0
    a, b = torch.randn(4, 64), torch.randn(32, 4)
    view.set_lora(a, b)
    assert torch.allclose(view.delta_weight(), 2.0 * b @ a)
    base = view.module.get_base_layer()
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = view.module(x)
    expected = x @ (view.base_weight() + 2.0 * b @ a).T
    assert torch.allclose(y, expected, atol=1e-4)
    assert base.__class__.__name__ == "TorchLinear"
    with pytest.raises(ValueError, match=r"A \[4, 64\] and B \[32, 4\]"):
        view.set_lora(torch.zeros(3, 64), b)


def test_bad_arguments_fail_fast():
    model = tiny_llama()
    with pytest.raises(ValueError, match="method='dora' is not one of wha, lora"):
        attach_adapter(model, method="dora", rank=2)
    with pytest.raises(ValueError, match="dims=3 is not one of 1, 2"):
        attach_adapter(model, method="wha", rank=2, dims=3)
    with pytest.raises(ValueError, match="matched no module"):
        attach_adapter(model, method="wha", rank=2, target_modules=["nope"])
    with pytest.raises(TypeError, match="adapters go on nn.Linear"):
        attach_adapter(model, method="lora", rank=2, target_modules=["embed_tokens"])


@pytest.mark.parametrize("method", [m for m in ADAPTER_METHODS if m != "lota"])  # lota: quantized only
def test_merge_on_float_model(method):
    from qwha.adapters import merge_to_dense

    torch.manual_seed(0)
    model = attach_adapter(tiny_llama(), method=method, rank=2, target_modules=["q_proj", "up_proj"])
    for k, layer in enumerate(adapter_layers(model).values()):
        if method == "wha":
            layer.set_sparse(
                *random_sparse(layer.out_features, layer.in_features, layer.budget, k, torch.float32)
            )
        else:
            layer.set_lora(0.1 * torch.randn(2, layer.in_features), 0.1 * torch.randn(layer.out_features, 2))
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        expected = model(ids).logits
        merged = merge_to_dense(model, dtype=torch.float32)
        got = merged(ids).logits
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith(("q_proj", "up_proj")))
    assert torch.allclose(got, expected, atol=1e-5)
