"""AdaAlloc, selection and refinement against independent float64 computations (numpy/scipy)."""

import numpy as np
import pytest
import scipy.fft
import scipy.linalg
import torch

from qwha.init import dense_update, initialize, output_error
from qwha.init.allocation import adaalloc, channel_importance
from qwha.init.refine import refine_values
from qwha.init.selection import select_per_channel


def hadamard(n):
    return scipy.linalg.hadamard(n) / np.sqrt(n)


def dct(n):
    return scipy.fft.dct(np.eye(n), norm="ortho", axis=0)


def rand_orth(n, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q


TRANSFORMS = {"wht": hadamard, "dct": dct, "orth": lambda n: rand_orth(n, 5)}


def problem(d_out=12, d_in=16, tokens=64, seed=0):
    """Random ΔW_Q with a few outlier rows/entries, and calibration activations X [d_in, tokens]."""
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((d_out, d_in)) * 0.02
    d[rng.integers(0, d_out, 3)] *= 5.0
    d[rng.integers(0, d_out, 4), rng.integers(0, d_in, 4)] += 0.3
    x = rng.standard_normal((d_in, tokens)) * np.linspace(0.2, 3.0, d_in)[:, None]
    x[0] += 4.0  # an outlier input channel
    return d, x


def damped_root(g):
    """docs/method.md's R = U Σ^{1/2} of the damped Gram (λ = 1e-4·mean diag, clamped eigenvalues)."""
    lam = 1e-4 * np.mean(np.diag(g))
    evals, evecs = np.linalg.eigh(g + lam * np.eye(g.shape[0]))
    return evecs * np.sqrt(np.clip(evals, 0, None))


def t64(a):
    return torch.tensor(a, dtype=torch.float64)


# ----------------------------------------------------------------------------- allocation


def test_adaalloc_hand_examples():
    a = torch.tensor([1.0, 1.0, 2.0, 4.0])
    assert adaalloc(a, 16, 8).tolist() == [2, 2, 4, 8]  # exact proportional split
    # cap 6: 8 -> 6, the 2 cut go one each to the smallest uncapped allocations
    assert adaalloc(a, 16, 6).tolist() == [3, 3, 4, 6]
    # floors [0, 0, 2, 18] -> cap [0, 0, 2, 16] -> remainder [1, 1, 2, 16] -> min 2 [2, 2, 2, 14]
    assert adaalloc(torch.tensor([0.0, 0.0, 1.0, 9.0]), 20, 16).tolist() == [2, 2, 2, 14]
    # temperature: t = 0 is uniform, t = 2 squares the importances (w = [0.1, 0.9])
    assert adaalloc(torch.tensor([1.0, 100.0]), 10, 10, temperature=0.0).tolist() == [5, 5]
    assert adaalloc(torch.tensor([1.0, 3.0]), 10, 10, temperature=2.0).tolist() == [2, 8]


@pytest.mark.parametrize("seed", range(8))
def test_adaalloc_properties(seed):
    rng = np.random.default_rng(seed)
    d_out, d_in = int(rng.integers(3, 40)), int(rng.integers(2, 30))
    a = torch.tensor(rng.lognormal(0.0, 2.0, d_out))  # heavy-tailed: exercises the cap
    for budget in {1, d_out, 2 * d_out, int(rng.integers(1, d_out * d_in + 1)), d_out * d_in}:
        p = adaalloc(a, budget, d_in, temperature=float(rng.uniform(0.25, 2.0)))
        assert p.dtype == torch.int64 and int(p.sum()) == budget
        assert int(p.min()) >= 0 and int(p.max()) <= d_in
        if budget >= 2 * d_out and d_in >= 2:
            assert int(p.min()) >= 2


def test_adaalloc_rejects_bad_budget():
    with pytest.raises(ValueError, match="budget"):
        adaalloc(torch.ones(3), 3 * 4 + 1, 4)


def test_activation_importance_is_output_row_norm():
    d, x = problem()
    dt, gt = t64(d), t64(x @ x.T)
    want = np.linalg.norm(d @ x, axis=1)
    assert np.allclose(channel_importance(dt, "activation", gram=gt).numpy(), want, rtol=1e-10)
    assert np.allclose(channel_importance(dt, "weight").numpy(), np.linalg.norm(d, axis=1), rtol=1e-12)


# ----------------------------------------------------------------------------- selection


@pytest.mark.parametrize("score", ["magnitude", "energy"])
def test_adaalloc_selection_is_top_score_per_row(score):
    d, x = problem(seed=1)
    t = hadamard(16)
    r = damped_root(x @ x.T)
    coeffs = d @ t
    if score == "magnitude":
        s = np.abs(coeffs)
    else:  # x_j² · ‖B_j‖², B = Tᵀ R (a row of B per coefficient)
        s = coeffs**2 * np.sum((t.T @ r) ** 2, axis=1)[None, :]
    budget = 5 * 16
    out = initialize("adaalloc", t64(d), t64(x @ x.T), budget, transform=t64(t), score=score, refine=False)
    idx = out["indices"].numpy()
    assert idx.shape == (budget, 2) and out["values"].shape == (budget,)
    assert len({tuple(p) for p in idx}) == budget
    counts = np.bincount(idx[:, 0], minlength=12)
    for i in range(12):
        chosen = set(idx[idx[:, 0] == i, 1].tolist())
        assert chosen == set(np.argsort(-s[i])[: counts[i]].tolist())
    # without refinement the values are the dense coefficients at the support
    assert np.allclose(out["values"].numpy(), coeffs[idx[:, 0], idx[:, 1]], atol=1e-14)
    # and the rows got AdaAlloc's budgets from ‖(ΔW_Q X)_i‖
    want = adaalloc(t64(np.linalg.norm(d @ x, axis=1)), budget, 16).numpy()
    assert np.array_equal(counts, want)


def test_select_per_channel_matches_argsort():
    rng = np.random.default_rng(3)
    s = rng.standard_normal((7, 11))
    counts = rng.integers(0, 12, 7)
    idx = select_per_channel(t64(s), torch.tensor(counts)).numpy()
    want = sorted((i, j) for i in range(7) for j in np.argsort(-s[i])[: counts[i]])
    assert [tuple(p) for p in idx] == want  # row-major sorted as well


def test_global_selections():
    d, x = problem(seed=2)
    t = dct(16)
    g = x @ x.T
    r = damped_root(g)
    budget = 40
    coeffs = d @ t
    mag = initialize("magnitude", t64(d), None, budget, transform=t64(t), refine=False)
    flat = np.argsort(-np.abs(coeffs).ravel())[:budget]
    assert {tuple(p) for p in mag["indices"].numpy()} == {(f // 16, f % 16) for f in flat}
    # LoCA-style: largest |∂L/∂F| at F = 0, L = ½‖(ΔW_Q − F Tᵀ) R‖² (autograd, damped objective)
    f = torch.zeros(12, 16, dtype=torch.float64, requires_grad=True)
    loss = 0.5 * ((t64(d) - f @ t64(t).T) @ t64(r)).square().sum()
    (grad,) = torch.autograd.grad(loss, f)
    loca = initialize("loca", t64(d), t64(g), budget, transform=t64(t), refine=False)
    flat = np.argsort(-grad.abs().numpy().ravel())[:budget]
    assert {tuple(p) for p in loca["indices"].numpy()} == {(f // 16, f % 16) for f in flat}
    # SSH-style: ⌊p/2⌋ largest |coeffs| + the rest random, all distinct, reproducible by seed
    ssh = initialize("ssh", t64(d), None, budget, transform=t64(t), refine=False, seed=3)
    pairs = {tuple(p) for p in ssh["indices"].numpy()}
    top = {(f // 16, f % 16) for f in np.argsort(-np.abs(coeffs).ravel())[: budget // 2]}
    assert len(pairs) == budget and top <= pairs
    again = initialize("ssh", t64(d), None, budget, transform=t64(t), refine=False, seed=3)
    other = initialize("ssh", t64(d), None, budget, transform=t64(t), refine=False, seed=4)
    assert torch.equal(again["indices"], ssh["indices"]) and not torch.equal(other["indices"], ssh["indices"])
    # zero: random locations (those of `random`, same seed), values 0
    zero = initialize("zero", t64(d), None, budget, seed=3)
    rnd = initialize("random", t64(d), None, budget, transform=t64(t), refine=False, seed=3)
    assert torch.equal(zero["indices"], rnd["indices"]) and not zero["values"].any()


# ----------------------------------------------------------------------------- refinement


@pytest.mark.parametrize("kind", list(TRANSFORMS))
def test_refinement_is_rowwise_least_squares(kind):
    d, x = problem(seed=4)
    t = TRANSFORMS[kind](16)
    g = x @ x.T
    r = damped_root(g)
    b = t.T @ r  # a row of B per coefficient index
    out = initialize("adaalloc", t64(d), t64(g), 60, transform=t64(t), refine=True)
    idx, vals = out["indices"].numpy(), out["values"].numpy()
    for i in range(12):
        sel = idx[:, 0] == i
        if not sel.any():
            continue
        cols = idx[sel, 1]
        c, *_ = np.linalg.lstsq(b[cols].T, d[i] @ r, rcond=None)  # min ‖v − c B'‖
        assert np.allclose(vals[sel], c, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("two_d", [False, True])
def test_refinement_is_global_least_squares_on_support(two_d):
    """One least squares over all p unknowns at once (no row separation assumed), 1-D and 2-D."""
    d, x = problem(d_out=8, d_in=16, seed=5)
    t_in, t_out = dct(16), (rand_orth(8, 1) if two_d else np.eye(8))
    g = x @ x.T
    r = damped_root(g)
    out = initialize(
        "magnitude", t64(d), t64(g), 30, transform=t64(t_in), transform_out=t64(t_out) if two_d else None
    )
    idx = out["indices"].numpy()
    # column s of the design matrix: vec(T_out[:, i] T_in[:, j]ᵀ R) for (i, j) = idx[s]
    design = np.stack([np.outer(t_out[:, i], t_in[:, j] @ r).ravel() for i, j in idx], axis=1)
    c, *_ = np.linalg.lstsq(design, (d @ r).ravel(), rcond=None)
    assert np.allclose(out["values"].numpy(), c, rtol=1e-8, atol=1e-12)
    upd = dense_update(out, (8, 16), t64(t_in), t64(t_out) if two_d else None).numpy()
    f = np.zeros((8, 16))
    f[idx[:, 0], idx[:, 1]] = c
    assert np.allclose(upd, t_out @ f @ t_in.T, atol=1e-12)


def test_refinement_never_worse_than_projection():
    d, x = problem(seed=6)
    g = t64(x @ x.T)
    t = t64(hadamard(16))
    for method in ["random", "magnitude", "ssh", "loca", "adaalloc"]:
        errs = []
        for refine in (False, True):
            out = initialize(method, t64(d), g, 50, transform=t, refine=refine, seed=1)
            errs.append(output_error(t64(d), dense_update(out, (12, 16), t), g))
        assert errs[1] <= errs[0] * (1 + 1e-9), method


def test_refine_values_handles_mixed_row_sizes():
    rng = np.random.default_rng(7)
    a = rng.standard_normal((10, 10))
    m = a @ a.T + 0.1 * np.eye(10)
    y = rng.standard_normal((4, 10))
    idx = torch.tensor([[0, 1], [0, 4], [0, 7], [2, 3], [3, 0], [3, 2], [3, 9]])
    vals = refine_values(t64(m), t64(y), idx).numpy()
    for i, cols in {0: [1, 4, 7], 2: [3], 3: [0, 2, 9]}.items():
        sel = idx[:, 0].numpy() == i
        assert np.allclose(vals[sel], np.linalg.solve(m[np.ix_(cols, cols)], y[i, cols]), rtol=1e-10)


# ----------------------------------------------------------------------------- whole-init properties


@pytest.mark.parametrize("kind", list(TRANSFORMS))
@pytest.mark.parametrize("method", ["adaalloc", "magnitude", "loca", "ssh", "random"])
@pytest.mark.parametrize("refine", [False, True])
def test_full_budget_reproduces_quant_error(kind, method, refine):
    d, x = problem(seed=8)
    t = t64(TRANSFORMS[kind](16))
    g = t64(x @ x.T)
    out = initialize(method, t64(d), g, 12 * 16, transform=t, refine=refine)
    upd = dense_update(out, (12, 16), t)
    assert torch.allclose(upd, t64(d), atol=1e-10)
    assert output_error(t64(d), upd, g) < 1e-9 * output_error(t64(d), torch.zeros(12, 16), g)


def test_full_budget_two_d():
    d, x = problem(seed=9)
    t_in, t_out = t64(dct(16)), t64(rand_orth(12, 2))
    out = initialize("adaalloc", t64(d), t64(x @ x.T), 12 * 16, transform=t_in, transform_out=t_out)
    assert torch.allclose(dense_update(out, (12, 16), t_in, t_out), t64(d), atol=1e-10)


def test_error_non_increasing_with_budget():
    d, x = problem(d_out=16, d_in=32, seed=10)
    g, t = t64(x @ x.T), t64(hadamard(32))
    # global magnitude: nested supports, so every step of the budget can only lower the error
    errs = [
        output_error(t64(d), dense_update(initialize("magnitude", t64(d), g, p, transform=t), (16, 32), t), g)
        for p in range(1, 16 * 32 + 1, 29)
    ]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errs, errs[1:], strict=False))
    # AdaAlloc at the rank-matched budgets r·(d_in + d_out), r = 1, 2, 4, 8, and full
    errs = []
    for p in [48, 96, 192, 384, 512]:
        out = initialize("adaalloc", t64(d), g, p, transform=t)
        errs.append(output_error(t64(d), dense_update(out, (16, 32), t), g))
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errs, errs[1:], strict=False))
    assert errs[-1] < 1e-9 * errs[0]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"method": "fourier"}, "method"),
        ({"alloc_weight": "grad"}, "alloc_weight"),
        ({"score": "abs"}, "score"),
        ({"budget": 12 * 16 + 1}, "budget"),
        ({"budget": 0}, "budget"),
        ({"xtx": None}, "xtx"),
        ({"transform": "fft"}, "transform"),
        ({"transform": torch.eye(15, dtype=torch.float64)}, "transform"),
        ({"method": "cloq", "rank": None}, "rank"),
        ({"method": "cloq", "rank": 13}, "rank"),
        ({"method": "loftq", "rank": 2, "loftq_iters": 3}, "loftq_iters"),
        ({"ssh_source": "grad"}, "ssh_source"),
    ],
)
def test_bad_input_names_the_key(kwargs, key):
    d, x = problem()
    args = {"method": "adaalloc", "xtx": t64(x @ x.T), "budget": 40, "transform": t64(hadamard(16))}
    args.update(kwargs)
    method, xtx, budget = args.pop("method"), args.pop("xtx"), args.pop("budget")
    with pytest.raises(ValueError, match=f"^{key}"):
        initialize(method, t64(d), xtx, budget, **args)


def test_refine_correct_after_explicit_thread_setting():
    """torch 2.13 CPU: batched LU is wrong after `torch.set_num_threads(2)`; the refinement must not be."""
    import subprocess
    import sys

    code = """
import numpy as np, torch
torch.set_num_threads(2)
from qwha.init.refine import refine_values
rng = np.random.default_rng(0)
d, n, k = 300, 16, 235  # the LU failure shows on blocks of this size, not on tiny ones
a = rng.standard_normal((d, 2 * d)); m = a @ a.T / d + np.eye(d)
y = rng.standard_normal((n, d))
cols = np.sort(np.stack([rng.permutation(d)[:k] for _ in range(n)]), axis=1)
idx = torch.tensor([[i, j] for i in range(n) for j in cols[i]])
got = refine_values(torch.tensor(m), torch.tensor(y), idx).numpy().reshape(n, k)
want = np.stack([np.linalg.solve(m[np.ix_(c, c)], y[i, c]) for i, c in enumerate(cols)])
assert np.allclose(got, want, rtol=1e-9, atol=1e-12), np.abs(got - want).max()
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
