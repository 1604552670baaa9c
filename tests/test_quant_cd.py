"""Coordinate-descent re-rounding (qwha.quant.coordinate_descent) against a brute-force float64 search.

The reference below knows nothing of the normalised Gram or the blocked updates: for each column in
turn it tries every code of the grid in every output row and keeps the one with the smallest damped
output error ``tr((W − Ŵ) H' (W − Ŵ)ᵀ)``, evaluated in full.
"""

from __future__ import annotations

import pytest
import torch

from qwha.quant.coordinate_descent import coordinate_descent, damped_gram, grid_codes, output_error


def _problem(d_out=6, d_in=24, group=8, bits=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    mix = torch.randn(d_in, d_in, generator=gen, dtype=torch.float64) * 0.4 + torch.eye(d_in)
    x = torch.randn(d_in, 200, generator=gen, dtype=torch.float64)
    x = mix @ x  # correlated inputs: the columns interact
    h = x @ x.T
    maxq = 2**bits - 1
    gw = w.view(d_out, -1, group)
    lo, hi = gw.amin(-1).clamp(max=0), gw.amax(-1).clamp(min=0)
    scale = (hi - lo) / maxq
    zero = torch.round(-lo / scale)
    g_idx = torch.arange(d_in) // group
    codes = grid_codes(w, scale, zero, g_idx, maxq)  # round to nearest: the start
    return w, codes, scale, zero, g_idx, h, maxq


def _dequant(codes, scale, zero, g_idx):
    return (codes.double() - zero[:, g_idx]) * scale[:, g_idx]


def _brute_force(w, codes, scale, zero, g_idx, h, maxq, sweeps, damp):
    hd = damped_gram(h, damp)
    q = codes.clone()
    for _ in range(sweeps):
        for j in range(w.shape[1]):
            errs = []
            for v in range(maxq + 1):
                trial = q.clone()
                trial[:, j] = v
                e = w - _dequant(trial, scale, zero, g_idx)
                errs.append(((e @ hd) * e).sum(1))  # per output row: rows are independent
            q[:, j] = torch.stack(errs, 1).argmin(1)
    return q


@pytest.mark.parametrize("bits,damp", [(2, 0.75), (3, 0.1)])
def test_sweeps_equal_the_brute_force_coordinate_search(bits, damp):
    w, codes, scale, zero, g_idx, h, maxq = _problem(bits=bits)
    want = _brute_force(w, codes, scale, zero, g_idx, h, maxq, sweeps=3, damp=damp)
    got = coordinate_descent(
        w, codes, scale, zero, g_idx, h, maxq=maxq, sweeps=3, damp=damp, block=5, dtype=torch.float64
    )
    assert torch.equal(got.codes, want)
    assert int((got.codes != codes).sum()) > 0  # the search moved codes: the comparison has teeth


def test_objective_never_increases_and_codes_stay_on_the_grid():
    w, codes, scale, zero, g_idx, h, maxq = _problem(d_out=16, d_in=64, seed=3)
    res = coordinate_descent(w, codes, scale, zero, g_idx, h, maxq=maxq, sweeps=30, damp=0.75, block=16)
    obj = res.objective
    assert all(b <= a * (1 + 1e-6) for a, b in zip(obj, obj[1:], strict=False))
    assert obj[-1] < 0.95 * obj[0]
    assert res.codes.dtype == torch.int64 and res.codes.min() >= 0 and res.codes.max() <= maxq
    hd = damped_gram(h, 0.75)
    assert obj[-1] == pytest.approx(output_error(w, _dequant(res.codes, scale, zero, g_idx), hd), rel=1e-6)


def test_stops_at_a_fixed_point():
    """A sweep that changes nothing ends the loop; running more sweeps from there changes nothing."""
    w, codes, scale, zero, g_idx, h, maxq = _problem(seed=5)
    res = coordinate_descent(w, codes, scale, zero, g_idx, h, maxq=maxq, sweeps=100, damp=0.75)
    assert res.sweeps < 100 and res.changed[-1] == 0
    again = coordinate_descent(w, res.codes, scale, zero, g_idx, h, maxq=maxq, sweeps=5, damp=0.75)
    assert torch.equal(again.codes, res.codes) and again.changed == [0]


def test_zero_sweeps_is_identity():
    w, codes, scale, zero, g_idx, h, maxq = _problem()
    res = coordinate_descent(w, codes, scale, zero, g_idx, h, maxq=maxq, sweeps=0)
    assert torch.equal(res.codes, codes) and res.sweeps == 0 and len(res.objective) == 1
