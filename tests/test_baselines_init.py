"""The Table 3 baselines' own inits (no quantization-aware init) and LoftQ's refusal of a stale base.

* ``ssh_w0`` (SSH): half the locations are the largest ``|2-D DHT(W0)|`` of the PRETRAINED weight,
  checked against a DHT computed with numpy's FFT (``H = Re − Im`` of the DFT, scaled); the other
  half distinct, outside the top half, and drawn with the seed; values exactly zero.
* ``random_zero`` (SHiRA / LoCA): distinct uniform locations drawn with the seed, values exactly zero.
* Both: a model initialized with them computes exactly what the quantized model computes, and the
  per-layer budget is ``p = r (d_in + d_out)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from qwha.adapters import adapter_layers, attach_adapter
from qwha.config import ConfigError, validate
from qwha.init import initialize
from tests.conftest import compose, run_cli
from tests.gptq_layers import quantize_linears, rtn_grid, tiny_llama


def dht2_numpy(w: np.ndarray) -> np.ndarray:
    """Orthonormal 2-D discrete Hartley transform ``H_out W H_in`` by FFTs (``cas = cos + sin``)."""
    f = np.fft.fft(w, axis=1)
    w = (f.real - f.imag) / math.sqrt(w.shape[1])
    f = np.fft.fft(w, axis=0)
    return (f.real - f.imag) / math.sqrt(w.shape[0])


def flat_set(idx: torch.Tensor, d_in: int) -> set[int]:
    return {int(r) * d_in + int(c) for r, c in idx.tolist()}


def _layer(d_out=12, d_in=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) * 0.05
    w_q = rtn_grid(w0, 2, 4)[0].double()
    return w0, w_q


@pytest.mark.parametrize("seed", [0, 3])
def test_ssh_w0_top_half_is_the_dht_of_the_pretrained_weight(seed):
    d_out, d_in = 12, 20
    w0, w_q = _layer(d_out, d_in)
    p = 2 * (d_in + d_out)  # r = 2: 64 of 240 coefficients
    out = initialize("ssh_w0", w0 - w_q, None, p, transform="dht", transform_out="dht", weight=w0, seed=seed)
    got = flat_set(out["indices"], d_in)
    assert out["indices"].shape == (p, 2) and len(got) == p  # distinct
    assert out["values"].dtype == torch.float64 and torch.equal(
        out["values"], torch.zeros(p, dtype=torch.float64)
    )

    spectrum = np.abs(dht2_numpy(w0.numpy()))
    ranked = np.argsort(-spectrum.reshape(-1), kind="stable")
    top = {int(i) for i in ranked[: p // 2]}
    assert top <= got
    rest = got - top
    assert len(rest) == p - p // 2
    # the rest is not the next-largest coefficients: it is drawn uniformly from all the others
    assert rest != {int(i) for i in ranked[p // 2 : p]}
    # and it is not what the quantization error's spectrum would have picked
    err_top = {int(i) for i in np.argsort(-np.abs(dht2_numpy((w0 - w_q).numpy())).reshape(-1))[: p // 2]}
    assert err_top != top


def test_ssh_w0_random_half_follows_the_seed():
    d_out, d_in = 12, 20
    w0, w_q = _layer(d_out, d_in)
    p = 2 * (d_in + d_out)

    def support(seed):
        kw = dict(transform="dht", transform_out="dht", weight=w0, seed=seed)
        return flat_set(initialize("ssh_w0", w0 - w_q, None, p, **kw)["indices"], d_in)

    a, a_again, b = support(0), support(0), support(1)
    assert a == a_again
    assert a != b and len(a & b) >= p // 2  # same top half, another random half
    # over many seeds the random half is spread over all the remaining positions: mean rank in the
    # middle of the ranks left after the top half (uniform: (p/2 + n - 1)/2)
    ranked = np.argsort(-np.abs(dht2_numpy(w0.numpy())).reshape(-1), kind="stable")
    rank_of = {int(i): k for k, i in enumerate(ranked)}
    n = d_out * d_in
    ranks = [rank_of[i] for s in range(40) for i in support(s) if rank_of[i] >= p // 2]
    assert abs(np.mean(ranks) - (p // 2 + n - 1) / 2) < 0.1 * n


def test_ssh_w0_needs_the_weight():
    w0, w_q = _layer()
    with pytest.raises(ValueError, match="weight: method='ssh_w0' needs"):
        initialize("ssh_w0", w0 - w_q, None, 10, transform="dht", transform_out="dht")


def test_random_zero_is_seeded_distinct_and_zero():
    d_out, d_in = 12, 20
    w0, w_q = _layer(d_out, d_in)
    p = 3 * (d_in + d_out)
    out = initialize("random_zero", w0 - w_q, None, p, transform="dct", transform_out="dct", seed=5)
    got = flat_set(out["indices"], d_in)
    assert len(got) == p and torch.equal(out["values"], torch.zeros(p, dtype=torch.float64))
    # provenance: the first p of a seeded uniform permutation of the d_out·d_in positions
    perm = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(5))[:p]
    assert got == set(perm.tolist())
    again = initialize("random_zero", w0 - w_q, None, p, transform="identity", seed=5)
    assert flat_set(again["indices"], d_in) == got  # locations do not depend on the transform
    other = initialize("random_zero", w0 - w_q, None, p, transform="identity", seed=6)
    assert flat_set(other["indices"], d_in) != got


@pytest.mark.parametrize(
    "method, transform", [("ssh_w0", "dht"), ("random_zero", "dct"), ("random_zero", "identity")]
)
def test_initialized_model_is_the_quantized_model(method, transform):
    rank = 2
    model = tiny_llama(seed=1)
    w0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    quantize_linears(model, bits=2, group_size=32)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        quantized_logits = model(input_ids=ids).logits
    dims = 1 if transform == "identity" else 2
    model = attach_adapter(model, method="wha", rank=rank, transform=transform, dims=dims, scale_norm="paper")
    for name, layer in adapter_layers(model).items():
        d_out, d_in = layer.out_features, layer.in_features
        assert layer.budget == min(rank * (d_in + d_out), d_in * d_out)
        w = w0[name].double()
        res = initialize(
            method,
            w - layer.base_weight().double(),
            None,
            layer.budget,
            transform=transform,
            transform_out=transform if dims == 2 else None,
            weight=w,
            seed=0,
        )
        layer.set_sparse(res["indices"], (res["values"] / layer.scale).float())
        assert torch.equal(layer.wha_c.detach(), torch.zeros(layer.budget))
        assert torch.equal(layer.delta_weight().detach(), torch.zeros(d_out, d_in))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, quantized_logits)


def test_init_stage_ranks_the_pretrained_weight():
    """The init stage hands W0 (not ΔW_Q) to ssh_w0, with the adapter's 2-D DHT."""
    from qwha.stages.init import _init_layer

    cfg = compose("adapter=dht2d", "init=ssh_w0", "device=cpu", "rank=2")
    assert (cfg.adapter.transform, cfg.adapter.dims, cfg.init.method) == ("dht", 2, "ssh_w0")
    d_out, d_in = 12, 20
    w0, w_q = _layer(d_out, d_in)
    base = nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        base.weight.copy_(w_q.float())
    model = attach_adapter(
        nn.Sequential(base), method="wha", rank=2, target_modules="0", transform="dht", dims=2
    )
    layer = model[0]
    x = torch.randn(d_in, 50, dtype=torch.float64)
    row = _init_layer(cfg, "0", layer, w0.float(), x @ x.T, 50, None)
    assert row["shape"] == [d_out, d_in]
    p = layer.budget
    ranked = np.argsort(-np.abs(dht2_numpy(w0.float().double().numpy())).reshape(-1), kind="stable")
    assert {int(i) for i in ranked[: p // 2]} <= set(layer.wha_indices.tolist())
    assert torch.equal(layer.wha_c.detach(), torch.zeros(p))


@pytest.mark.parametrize("iters", [2, 5])
def test_loftq_with_more_than_one_iteration_is_refused(iters):
    cfg = compose("adapter=lora", "init=loftq", f"init.loftq_iters={iters}")
    with pytest.raises(ConfigError, match=r"^init\.loftq_iters=\d+ .*allowed values: 1$"):
        validate(cfg)
    validate(compose("adapter=lora", "init=loftq", "init.loftq_iters=1"))


def test_loftq_refusal_is_one_line_before_anything_runs(tmp_path):
    res = run_cli("method=loftq", "init.loftq_iters=3", env={"QWHA_CACHE_PATH": str(tmp_path / "c")})
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "init.loftq_iters=3 is not supported" in lines[0], res.stderr
    assert not (tmp_path / "c").exists()
