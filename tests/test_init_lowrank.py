"""Low-rank baselines (LoRA zero, CLoQ, LoftQ) against independent numpy computations."""

import numpy as np
import pytest
import torch

from qwha.init import dense_update, initialize, output_error


def problem(d_out=10, d_in=14, tokens=40, seed=0):
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((d_out, d_in)) * 0.05
    x = rng.standard_normal((d_in, tokens)) * np.linspace(0.3, 2.5, d_in)[:, None]
    return d, x


def t64(a):
    return torch.tensor(a, dtype=torch.float64)


def rtn(w, bits=3, group=7):
    """Asymmetric round-to-nearest per row group (a stand-in quantizer for LoftQ's alternation)."""
    g = w.reshape(w.shape[0], -1, group)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    scale = (hi - lo) / (2**bits - 1)
    scale = np.where(scale == 0, 1.0, scale)
    q = np.clip(np.round((g - lo) / scale), 0, 2**bits - 1)
    return (q * scale + lo).reshape(w.shape)


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_cloq_is_truncated_svd_of_calibrated_error(rank):
    d, x = problem()
    g = x @ x.T
    lam = 1e-4 * np.mean(np.diag(g))
    evals, evecs = np.linalg.eigh(g + lam * np.eye(14))
    r = evecs * np.sqrt(evals)  # docs/method.md's R = U Σ^{1/2} (the code uses a Cholesky factor instead)
    u, s, vt = np.linalg.svd(d @ r)
    want = (u[:, :rank] * s[:rank]) @ vt[:rank] @ np.linalg.inv(r)
    out = initialize("cloq", t64(d), t64(g), rank=rank)
    assert out["kind"] == "lowrank" and out["A"].shape == (rank, 14) and out["B"].shape == (10, rank)
    ba = dense_update(out, (10, 14)).numpy()
    assert np.allclose(ba, want, rtol=1e-8, atol=1e-12)
    # Eckart–Young: the damped objective left over is the tail of the spectrum of ΔW_Q R
    assert np.isclose(np.linalg.norm((d - ba) @ r), np.sqrt(np.sum(s[rank:] ** 2)), rtol=1e-8)


def test_cloq_beats_data_free_svd_on_output_error():
    d, x = problem(seed=1)
    g = t64(x @ x.T)
    errs = {
        m: output_error(t64(d), dense_update(initialize(m, t64(d), g, rank=3), (10, 14)), g)
        for m in ("cloq", "loftq")
    }
    assert errs["cloq"] < errs["loftq"]


def test_loftq_one_step_is_svd_of_quant_error():
    d, _ = problem(seed=2)
    u, s, vt = np.linalg.svd(d)
    out = initialize("loftq", t64(d), None, rank=4, loftq_iters=1)
    assert "weight_q" not in out
    assert np.allclose(dense_update(out, (10, 14)).numpy(), (u[:, :4] * s[:4]) @ vt[:4], atol=1e-12)
    # balanced split B = U √S, A = √S Vᵀ (up to the sign of each singular pair)
    assert np.allclose(np.abs(out["B"].numpy()), np.abs(u[:, :4] * np.sqrt(s[:4])), atol=1e-12)


def test_loftq_alternation():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((10, 14))
    w_q = rtn(w)
    out = initialize(
        "loftq",
        t64(w - w_q),
        None,
        rank=3,
        loftq_iters=3,
        weight=t64(w),
        quantize_fn=lambda m: t64(rtn(m.numpy())),
    )
    # independent replay: Q_1 = W_Q, then Q_t = rtn(W − L_{t−1}), L_t = SVD_3(W − Q_t)
    q, low = w_q, None
    for step in range(3):
        if step:
            q = rtn(w - low)
        u, s, vt = np.linalg.svd(w - q)
        low = (u[:, :3] * s[:3]) @ vt[:3]
    assert np.allclose(out["weight_q"].numpy(), q, atol=1e-12)
    assert np.allclose(dense_update(out, (10, 14)).numpy(), low, atol=1e-10)


def test_lora_zero():
    d, _ = problem()
    out = initialize("lora_zero", t64(d), None, rank=5, seed=7)
    assert not out["B"].any() and out["A"].shape == (5, 14) and out["B"].shape == (10, 5)
    assert float(out["A"].abs().max()) <= 1 / np.sqrt(14) and float(out["A"].std()) > 0
    assert torch.equal(out["A"], initialize("lora_zero", t64(d), None, rank=5, seed=7)["A"])
    assert not torch.equal(out["A"], initialize("lora_zero", t64(d), None, rank=5, seed=8)["A"])
