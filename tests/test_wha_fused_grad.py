"""The fused weight side's ∂L/∂c by both routes (sampled product on a shared ``x·T``; transformed dense
``gᵀx``), for layers that read the same input, against float64 dense autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qwha.adapters import wha
from qwha.adapters.wha import WHALinear
from qwha.transforms import transform_matrix


@pytest.mark.parametrize("cost", [0.0, 1e9])  # 0: always the sampled route; 1e9: always the dense one
def test_layers_sharing_an_input_get_exact_gradients(monkeypatch, cost):
    monkeypatch.setattr(wha, "SAMPLED_COST", cost)
    torch.manual_seed(0)
    d_in = 24
    bases = [nn.Linear(d_in, d_out, dtype=torch.float64) for d_out in (20, 12, 12)]  # q, k, v
    layers = [WHALinear(b, 40, compute="fused", dtype=torch.float64) for b in bases]
    g = torch.Generator().manual_seed(1)
    for layer in layers:
        with torch.no_grad():
            layer.wha_c.copy_(torch.randn(layer.budget, generator=g, dtype=torch.float64))
    x = torch.randn(3, 7, d_in, dtype=torch.float64, requires_grad=True)
    gys = [torch.randn(3, 7, b.out_features, generator=g, dtype=torch.float64) for b in bases]
    loss = sum((layer(x) * gy).sum() for layer, gy in zip(layers, gys, strict=True))
    grads = torch.autograd.grad(loss, [x] + [layer.wha_c for layer in layers])

    # float64 dense reference: W = W_Q + s·F·Hᵀ per layer, plain autograd
    t = transform_matrix("wht", d_in)
    xr = x.detach().clone().requires_grad_(True)
    cs = [layer.wha_c.detach().clone().requires_grad_(True) for layer in layers]
    ref_loss = 0.0
    for layer, base, c, gy in zip(layers, bases, cs, gys, strict=True):
        f = torch.zeros(base.out_features * d_in, dtype=torch.float64)
        f = f.index_put((layer.wha_indices.long(),), c).view(base.out_features, d_in)
        w = base.weight.detach() + layer.scale * f @ t.T
        ref_loss = ref_loss + ((xr @ w.T + base.bias.detach()) * gy).sum()
    ref = torch.autograd.grad(ref_loss, [xr, *cs])
    for got, want in zip(grads, ref, strict=True):
        assert torch.allclose(got, want, atol=1e-9)
    wha.clear_shared_transform()


def _dense_reference_weight(layer: WHALinear, base: nn.Linear, c: torch.Tensor) -> torch.Tensor:
    d_out, d_in = base.out_features, base.in_features
    f = torch.zeros(d_out * d_in, dtype=torch.float64).index_put((layer.wha_indices.long(),), c)
    return base.weight.detach() + layer.scale * f.view(d_out, d_in) @ transform_matrix("wht", d_in).T


def test_accumulated_micro_batches_share_one_weight_and_an_update_rebuilds_it(monkeypatch):
    """Gradient accumulation: the micro-batches of one step build ``W_Q + ΔW`` once and their summed
    gradient equals float64 dense autograd; after the optimizer changes ``c`` (in place, and also through
    ``.data``, which leaves the version counter alone) the next forward uses the new values."""
    torch.manual_seed(0)
    base = nn.Linear(24, 20, dtype=torch.float64)
    layer = WHALinear(base, 60, compute="fused", dtype=torch.float64)
    builds = []
    real = WHALinear._effective_weight
    monkeypatch.setattr(
        WHALinear, "_effective_weight", lambda self, c, dtype: builds.append(1) or real(self, c, dtype)
    )
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        layer.wha_c.copy_(torch.randn(layer.budget, generator=g, dtype=torch.float64))
    xs = [torch.randn(4, 24, generator=g, dtype=torch.float64) for _ in range(3)]
    gys = [torch.randn(4, 20, generator=g, dtype=torch.float64) for _ in range(3)]
    for x, gy in zip(xs, gys, strict=True):
        (layer(x) * gy).sum().backward()
    assert len(builds) == 1
    c = layer.wha_c.detach().clone().requires_grad_(True)
    w = _dense_reference_weight(layer, base, c)
    ref = sum(((x @ w.T + base.bias.detach()) * gy).sum() for x, gy in zip(xs, gys, strict=True))
    (want,) = torch.autograd.grad(ref, [c])
    assert torch.allclose(layer.wha_c.grad, want, atol=1e-9)

    opt = torch.optim.SGD([layer.wha_c], lr=0.1)
    opt.step()
    y = layer(xs[0])
    assert len(builds) == 2
    w_new = _dense_reference_weight(layer, base, layer.wha_c.detach())
    assert torch.allclose(y, xs[0] @ w_new.T + base.bias.detach(), atol=1e-9)

    layer.wha_c.data[0] += 1.0  # no version bump: the values still decide
    y = layer(xs[0])
    assert len(builds) == 3
    w_new = _dense_reference_weight(layer, base, layer.wha_c.detach())
    assert torch.allclose(y, xs[0] @ w_new.T + base.bias.detach(), atol=1e-9)
    wha.clear_shared_transform()
