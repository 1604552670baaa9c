"""Inference with an adapter uses the materialised ``W_eff``: same outputs as the training-mode forward
(and as a float64 dense reference), built once, rebuilt when the values change, dropped by ``train()``.

Independent references: ``x·(W_Q + s·F·T⁻¹)ᵀ`` in float64 with the dense transform matrix (WHA), the
group-wise loop of the LoTA reading in float64 (LoTA), and each layer's own gradient-mode forward.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qwha.adapters.lota import LoTALinear
from qwha.adapters.wha import WHALinear
from qwha.transforms import transform_matrix
from tests.gptq_layers import torch_linear_from


def _wha_dense_reference(layer: WHALinear, w_q: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor):
    d_out, d_in = w_q.shape
    f = torch.zeros(d_out * d_in, dtype=torch.float64)
    f[layer.wha_indices.long()] = layer.wha_c.detach().double()
    w = w_q.double() + layer.scale * f.view(d_out, d_in) @ transform_matrix(layer.transform, d_in).T
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


def _set_random_values(layer: WHALinear, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.wha_c.copy_(torch.randn(layer.budget, generator=g) * 1e-3)


@pytest.mark.parametrize("compute", ["sparse", "fused", "delta", "auto"])
def test_wha_no_grad_equals_training_forward_and_dense(compute):
    torch.manual_seed(0)
    base = nn.Linear(48, 40)
    layer = WHALinear(base, 200, compute=compute)
    _set_random_values(layer, 1)
    x = torch.randn(3, 5, 48)
    y_train = layer(x)  # c requires grad: the training path of `compute`
    assert y_train.requires_grad
    layer.eval()
    with torch.no_grad():
        assert layer.materialises(needs_grad=False)
        y_eval = layer(x)
    ref = _wha_dense_reference(layer, base.weight.detach(), base.bias.detach(), x)
    assert torch.allclose(y_eval.double(), ref, atol=1e-5, rtol=0)
    assert torch.allclose(y_eval, y_train.detach(), atol=1e-5, rtol=0)


def test_wha_materialised_weight_is_built_once_and_follows_updates():
    torch.manual_seed(0)
    base = nn.Linear(24, 20, dtype=torch.float64)
    layer = WHALinear(base, 30, transform="dht", dtype=torch.float64).eval()
    x = torch.randn(4, 24, dtype=torch.float64)
    _set_random_values(layer, 2)
    with torch.no_grad():
        layer(x)
        w1 = layer.__dict__["_weight_cache"][1]
        layer(x)
        assert layer.__dict__["_weight_cache"][1] is w1  # reused, not rebuilt
        layer.wha_c.add_(1e-3)  # an optimizer step changes c in place
        y = layer(x)
    assert layer.__dict__["_weight_cache"][1] is not w1
    assert torch.allclose(y, _wha_dense_reference(layer, base.weight, base.bias, x), atol=1e-12)
    layer.train()
    assert layer.__dict__["_weight_cache"] is None


def test_wha_bf16_materialised_within_dtype_tolerance():
    torch.manual_seed(0)
    base = nn.Linear(64, 32).to(torch.bfloat16)
    layer = WHALinear(base, 300)
    _set_random_values(layer, 3)
    x = torch.randn(6, 64).to(torch.bfloat16)
    y_train = layer(x).detach()
    with torch.no_grad():
        y_eval = layer(x)
    assert y_eval.dtype == torch.bfloat16
    ref = _wha_dense_reference(layer, base.weight.detach().float(), base.bias.detach().float(), x.float())
    tol = 2 * 2.0**-8 * ref.abs().max().item()  # a few bf16 roundings of the output's magnitude
    assert (y_eval.double() - ref).abs().max() <= tol
    assert (y_eval.double() - y_train.double()).abs().max() <= tol


def test_wha_dropout_in_training_mode_is_not_materialised():
    layer = WHALinear(nn.Linear(16, 12), 20, dropout=0.5)
    assert not layer.materialises(needs_grad=False)  # train mode: dropout is active
    assert layer.eval().materialises(needs_grad=False)


def test_lota_no_grad_equals_training_forward_and_is_dropped_by_train():
    torch.manual_seed(0)
    base = torch_linear_from(nn.Linear(64, 32), 2, 32)
    layer = LoTALinear(base, r=4)
    with torch.no_grad():
        layer.lota_B.copy_(torch.randint(-3, 4, layer.lota_B.shape).float())
    x = torch.randn(2, 3, 64)
    y_train = layer(x)
    assert y_train.requires_grad
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x)
        w1 = layer.__dict__["_weight_cache"][1]
        layer(x)
        assert layer.__dict__["_weight_cache"][1] is w1
    bias = base.bias.double() if getattr(base, "bias", None) is not None else 0.0
    ref = x.double() @ layer.effective_weight(torch.float64).T + bias  # the same W_eff, float64 product
    assert torch.allclose(y_eval.double(), ref, atol=1e-5)
    assert torch.allclose(y_eval, y_train.detach(), atol=1e-6)
    layer.train()
    assert layer.__dict__["_weight_cache"] is None
