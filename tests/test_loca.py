"""LoCA's location learning (qwha.adapters.loca) against hand-computed examples and dense autograd.

* the alternating schedule against phases typed by hand;
* a one-coefficient layer where the loss of every cell is known: the location step moves the
  coefficient toward the neighbour whose finite-difference estimate says the loss is lower;
* the finite-difference estimate against ``∂L/∂F`` from dense float64 autograd (2-D DCT);
* distinct locations (clashing moves are not made), AdamW moments following their coefficient;
* inside the trainer: locations move only on location steps, coefficients only on the others, and a
  killed run resumes to the same locations and values.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qwha.adapters import WHALinear, adapter_layers, attach_adapter, load_adapter, save_adapter
from qwha.adapters.loca import LoCAConfig, LocationLearner, location_learner
from qwha.config import ConfigError, validate
from qwha.finetune import checkpoint as ckpt
from qwha.finetune import train
from qwha.finetune.toy import copy_task, tiny_llama
from qwha.transforms import transform_matrix
from tests.conftest import compose


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_schedule_matches_hand_typed_phases():
    cfg = LoCAConfig(enabled=True, coef_steps=2, location_steps=3, learn_fraction=0.5)
    # B_s = 10: step 0 coefficients; then per cycle of 5: 2 coefficient steps, 3 location steps
    locations = {2, 3, 4, 7, 8, 9}
    assert [cfg.phase(t, 20) for t in range(20)] == [
        "locations" if t in locations else "coefficients" for t in range(20)
    ]
    paper = LoCAConfig(enabled=True)  # B_a = 10, B_l = 20, B_s = 10% of 600 = 60
    assert [t for t in range(600) if paper.phase(t, 600) == "locations"] == [*range(10, 30), *range(40, 60)]


def one_coefficient_layer(d_out: int, d_in: int, cells, values) -> WHALinear:
    base = nn.Linear(d_in, d_out, bias=False, dtype=torch.float64)
    nn.init.zeros_(base.weight)
    layer = WHALinear(base, len(cells), transform="identity", scale_norm="none", alpha=1.0)
    layer.set_sparse(torch.tensor(cells), torch.tensor(values, dtype=torch.float64))
    return layer


def location_step(learner: LocationLearner, layer: WHALinear, x, v, optimizer=None, total=10, step=1):
    """One location step on the loss ``L = Σ_tokens y · v`` (so ``∂L/∂y = v`` for every token)."""
    learner.before_step(step, total)
    y = layer(x)
    (y * v).sum().backward()
    grads = learner.location_gradients("0")
    learner.before_optimizer(step, optimizer)
    return grads


def test_location_step_moves_toward_the_lower_loss_neighbour():
    # ΔW = F (identity transform, s = 1), one coefficient c = 2 at (1, 1) of a 3×3 layer, one token
    # x = e_1 and ∂L/∂y = v = (3, 2, 1): the loss with the coefficient at (r, k) is c · v_r · x_k, so
    # 6, 4, 2 down column 1 and 0 elsewhere in row 1. By hand: K = ∂L/∂F = v xᵀ, the central
    # difference along rows is ½ · 2 · (K[2,1] − K[0,1]) = 1 − 3 = −2, clamped to −1, times
    # (d_out − 1) = 2 → −2; along columns ½ · 2 · (K[1,2] − K[1,0]) = 0. Adam's first step is
    # lr · g / |g|, so u_row = 1/2 + 0.3 = 0.8 → row round(0.8 · 2) = 2; the column stays.
    layer = one_coefficient_layer(3, 3, [[1, 1]], [2.0])
    model = nn.Sequential(layer)
    cfg = LoCAConfig(enabled=True, coef_steps=1, location_steps=1, learn_fraction=1.0, location_lr=0.3)
    learner = LocationLearner(model, cfg)
    x = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    before = float((layer(x) * v).sum())
    grads = location_step(learner, layer, x, v)
    assert torch.equal(grads, torch.tensor([[-2.0, 0.0]]))
    assert layer.indices().tolist() == [[2, 1]] and learner.moved == 1
    assert layer.wha_c.tolist() == [2.0] and layer.wha_c.grad is None  # value kept, not trained
    after = float((layer(x) * v).sum())
    assert (before, after) == (4.0, 2.0)


def test_warns_when_the_run_has_no_location_steps(caplog):
    # budget=small's 30 steps with the paper's schedule: B_s = 3 < B_a = 10, so nothing moves
    layer = one_coefficient_layer(3, 3, [[1, 1]], [2.0])
    learner = LocationLearner(nn.Sequential(layer), LoCAConfig(enabled=True))
    with caplog.at_level("INFO", logger="qwha.adapters.loca"):
        learner.before_step(0, 30)
    assert "LoCA: 0 location steps of 30" in caplog.text and "stay fixed" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="qwha.adapters.loca"):
        learner.before_step(0, 600)
    assert "LoCA: 40 location steps of 600 (B_a = 10, B_l = 20, B_s = 60)" in caplog.text


def test_coefficient_steps_do_not_move_locations():
    layer = one_coefficient_layer(3, 3, [[1, 1]], [2.0])
    cfg = LoCAConfig(enabled=True, coef_steps=1, location_steps=1, learn_fraction=1.0, location_lr=0.3)
    learner = LocationLearner(nn.Sequential(layer), cfg)
    x = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    learner.before_step(2, 10)  # 2 % 2 == 0 < B_a: a coefficient step
    (layer(x) * v).sum().backward()
    learner.before_optimizer(2, None)
    assert layer.indices().tolist() == [[1, 1]] and layer.wha_c.grad is not None


@pytest.mark.parametrize("clip", [1e9, 0.05])
def test_finite_difference_matches_dense_autograd_2d_dct(clip):
    torch.manual_seed(0)
    d_out, d_in, p = 6, 8, 10
    base = nn.Linear(d_in, d_out, dtype=torch.float64)
    layer = WHALinear(base, p, transform="dct", dims=2, scale_norm="paper", alpha=3.0)
    flat = torch.randperm(d_out * d_in)[:p]
    idx = torch.stack((flat // d_in, flat % d_in), dim=1)
    layer.set_sparse(idx, torch.randn(p, dtype=torch.float64))
    cfg = LoCAConfig(enabled=True, coef_steps=1, location_steps=1, learn_fraction=1.0, grad_clip=clip)
    learner = LocationLearner(nn.Sequential(layer), cfg)
    x = torch.randn(2, 7, d_in, dtype=torch.float64)
    g = torch.randn(2, 7, d_out, dtype=torch.float64)
    learner.before_step(1, 10)
    (layer(x) * g).sum().backward()
    got = learner.location_gradients("0")

    # reference: K = ∂L/∂F by dense autograd through W = W_Q + s · C_out F C_inᵀ
    f = torch.zeros(d_out, d_in, dtype=torch.float64, requires_grad=True)
    c_in, c_out = transform_matrix("dct", d_in), transform_matrix("dct", d_out)
    w = base.weight.detach() + layer.scale * c_out @ f @ c_in.T
    ((x @ w.T + base.bias.detach()) * g).sum().backward()
    k = f.grad
    rows, cols = layer.indices().unbind(1)
    c = layer.wha_c.detach()
    up, down = (rows + 1).clamp(max=d_out - 1), (rows - 1).clamp(min=0)
    right, left = (cols + 1).clamp(max=d_in - 1), (cols - 1).clamp(min=0)
    fd_row = (0.5 * c * (k[up, cols] - k[down, cols])).clamp(-clip, clip) * (d_out - 1)
    fd_col = (0.5 * c * (k[rows, right] - k[rows, left])).clamp(-clip, clip) * (d_in - 1)
    assert torch.allclose(got.double(), torch.stack((fd_row, fd_col), 1), rtol=1e-5, atol=1e-6)
    learner.before_optimizer(1, None)
    assert len(set(layer.wha_indices.tolist())) == p


def test_clashing_moves_are_not_made():
    # coefficients at rows 0 and 2 of column 0 both want row 1 (v = (1, −5, 1)): neither moves
    layer = one_coefficient_layer(3, 1, [[0, 0], [2, 0]], [1.0, 1.0])
    cfg = LoCAConfig(enabled=True, coef_steps=1, location_steps=1, learn_fraction=1.0, location_lr=0.3)
    learner = LocationLearner(nn.Sequential(layer), cfg)
    x = torch.ones(1, 1, dtype=torch.float64)
    v = torch.tensor([1.0, -5.0, 1.0], dtype=torch.float64)
    grads = location_step(learner, layer, x, v)
    assert grads[:, 0].tolist() == [-2.0, 2.0]  # toward row 1 from both sides (clamped ±1, times 2)
    assert layer.indices().tolist() == [[0, 0], [2, 0]] and learner.moved == 0
    assert torch.equal(learner.state_dict()["layers"]["0"]["u"][:, 0], torch.tensor([0.0, 1.0]))


def test_moves_reorder_values_and_adamw_moments_together():
    # rows 1 (value 3) and 2 (value 5) of a 4×1 layer; v = (1, 0, −1, 0): the row-1 coefficient
    # jumps to row 3 (u = 1/3 + 0.6 → round(0.93 · 3) = 3), the row-2 one sees K[3] − K[1] = 0
    layer = one_coefficient_layer(4, 1, [[1, 0], [2, 0]], [3.0, 5.0])
    cfg = LoCAConfig(enabled=True, coef_steps=1, location_steps=1, learn_fraction=1.0, location_lr=0.6)
    learner = LocationLearner(nn.Sequential(layer), cfg)
    fake_optimizer = type("Opt", (), {})()
    fake_optimizer.state = {layer.wha_c: {"exp_avg": torch.tensor([30.0, 50.0]), "step": torch.tensor(4.0)}}
    x = torch.ones(1, 1, dtype=torch.float64)
    v = torch.tensor([1.0, 0.0, -1.0, 0.0], dtype=torch.float64)
    location_step(learner, layer, x, v, optimizer=fake_optimizer)
    assert layer.indices().tolist() == [[2, 0], [3, 0]]  # storage stays row-major
    assert layer.wha_c.tolist() == [5.0, 3.0]
    assert fake_optimizer.state[layer.wha_c]["exp_avg"].tolist() == [50.0, 30.0]
    assert layer.delta_weight().flatten().tolist() == [0.0, 0.0, 5.0, 3.0]


def toy_loca_model():
    model = tiny_llama(seed=0, lora_rank=None)
    model = attach_adapter(
        model, method="wha", rank=1, transform="dct", dims=2, scale_norm="paper", alpha=40.0
    )
    for layer in adapter_layers(model).values():  # random locations, values zero (init=random_zero)
        d_out, d_in = layer.out_features, layer.in_features
        flat = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(d_out + d_in))[
            : layer.budget
        ]
        layer.set_sparse(torch.stack((flat // d_in, flat % d_in), 1), torch.zeros(layer.budget))
    return model


def snapshot(model):
    return {n: (l.wha_indices.clone(), l.wha_c.detach().clone()) for n, l in adapter_layers(model).items()}


def test_trainer_alternates_locations_and_coefficients(tmp_path):
    model = toy_loca_model()
    loca = LoCAConfig(enabled=True, coef_steps=1, location_steps=2, learn_fraction=1.0, location_lr=0.05)
    learner = LocationLearner(model, loca)
    run = dict(
        lr=1e-2,
        max_steps=6,
        micro_batch_size=2,
        effective_batch=4,
        warmup_ratio=0.0,
        save_every=0,
        wandb={"mode": "disabled"},
    )
    states = [snapshot(model)]
    train(
        model,
        None,
        copy_task(24),
        run,
        tmp_path,
        seed=1,
        device="cpu",
        step_hook=learner,
        on_step=lambda step, row: states.append(snapshot(model)),
    )
    moved_any = False
    for t in range(6):
        phase = loca.phase(t, 6)
        for name, (idx0, c0) in states[t].items():
            idx1, c1 = states[t + 1][name]
            if phase == "coefficients":
                assert torch.equal(idx0, idx1), (t, name)
            else:  # same values, each following its location
                assert torch.equal(torch.sort(c0).values, torch.sort(c1).values), (t, name)
                moved_any |= not torch.equal(idx0, idx1)
        if phase == "coefficients":
            assert any(not torch.equal(states[t][n][1], states[t + 1][n][1]) for n in states[t])
    assert moved_any
    # the learned locations are what the saved adapter holds: a fresh model loads the same function
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(tiny_llama(seed=0, lora_rank=None), tmp_path / "adapter")
    ids = torch.randint(4, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


class Killed(Exception):
    pass


def test_resume_restores_locations(tmp_path):
    loca = LoCAConfig(enabled=True, coef_steps=1, location_steps=2, learn_fraction=1.0, location_lr=0.05)
    run = dict(
        lr=1e-2,
        max_steps=6,
        micro_batch_size=2,
        effective_batch=4,
        warmup_ratio=0.0,  # step 0 makes the values non-zero, so steps 1-2 (before the kill) move
        save_every=2,
        wandb={"mode": "disabled"},
    )
    data = copy_task(24)
    straight = toy_loca_model()
    straight_learner = LocationLearner(straight, loca)
    train(
        straight,
        None,
        data,
        run,
        tmp_path / "a",
        seed=1,
        device="cpu",
        step_hook=straight_learner,
    )

    def kill_after_5(step, row):
        if step == 5:
            raise Killed()

    ckpt_dir = tmp_path / "ckpt"
    first = toy_loca_model()
    with pytest.raises(Killed):
        train(
            first,
            None,
            data,
            run,
            tmp_path / "b1",
            seed=1,
            device="cpu",
            checkpoint_dir=ckpt_dir,
            on_step=kill_after_5,
            step_hook=LocationLearner(first, loca),
        )
    assert [s for s, _ in ckpt.list_checkpoints(ckpt_dir)] == [2, 4]
    saved = torch.load(ckpt_dir / "step-4" / "state.pt", weights_only=False)["step_hook"]
    assert saved["total_moved"] > 0 and saved["adam_steps"] == 2  # locations moved before the checkpoint
    resumed = toy_loca_model()  # locations as the init left them, until the checkpoint is read
    out = train(
        resumed,
        None,
        data,
        run,
        tmp_path / "b2",
        seed=1,
        device="cpu",
        checkpoint_dir=ckpt_dir,
        step_hook=(resumed_learner := LocationLearner(resumed, loca)),
    )
    assert out["resumed_from_step"] == 4
    assert resumed_learner.total_moved == straight_learner.total_moved
    a, b = snapshot(straight), snapshot(resumed)
    for name in a:
        assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1]), name


def test_config_keys_and_bad_values():
    cfg = compose("adapter=dct2d", "init=random_zero", "adapter.loca.enabled=true")
    validate(cfg)
    assert location_learner(toy_loca_model(), cfg.adapter) is not None
    assert location_learner(toy_loca_model(), compose("adapter=dct2d").adapter) is None  # off by default
    assert location_learner(toy_loca_model(), compose("adapter=sparse").adapter) is None  # no loca keys
    for override, message in [
        ("adapter.loca.coef_steps=0", r"^adapter\.loca\.coef_steps=0 is not allowed: an integer >= 1$"),
        (
            "adapter.loca.learn_fraction=1.5",
            r"^adapter\.loca\.learn_fraction=1\.5 is not allowed: a number in \[0, 1\]$",
        ),
        ("adapter.loca.location_lr=-1", r"^adapter\.loca\.location_lr=-1 is not allowed: a number > 0$"),
        ("train.fsdp=true", r"^train\.fsdp=true does not fit adapter\.loca\.enabled=true"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate(compose("adapter=dct2d", "init=random_zero", "adapter.loca.enabled=true", override))


def test_gradient_checkpointing_gives_the_same_locations(tmp_path):
    """Recomputed forwards (non-reentrant checkpointing) must not add a second finite-difference sum."""
    loca = LoCAConfig(enabled=True, coef_steps=1, location_steps=2, learn_fraction=1.0, location_lr=0.05)
    data = copy_task(16)
    out = {}
    for ckpt_on in (False, True):
        model = toy_loca_model()
        run = dict(
            lr=1e-2,
            max_steps=3,
            micro_batch_size=2,
            effective_batch=4,
            warmup_ratio=0.0,
            save_every=0,
            grad_checkpointing=ckpt_on,
            wandb={"mode": "disabled"},
        )
        learner = LocationLearner(model, loca)
        train(model, None, data, run, tmp_path / str(ckpt_on), seed=2, device="cpu", step_hook=learner)
        out[ckpt_on] = (snapshot(model), learner.state_dict())
    (a, sa), (b, sb) = out[False], out[True]
    assert sa["adam_steps"] == sb["adam_steps"] == 2
    for name in a:
        assert torch.equal(a[name][0], b[name][0]), name
        assert torch.allclose(a[name][1], b[name][1], rtol=1e-5, atol=1e-7), name
        assert torch.allclose(sa["layers"][name]["m"], sb["layers"][name]["m"], rtol=1e-4, atol=1e-7), name


def test_loca_keys_go_into_the_finetune_key_not_the_init_key():
    from qwha.pipeline import stage_key

    up = {"base": "b", "calib": "c", "quantize": "q", "init": "i"}
    off = compose("adapter=dct2d", "init=random_zero")
    on = compose("adapter=dct2d", "init=random_zero", "adapter.loca.enabled=true")
    assert stage_key("init", off, up)[0] == stage_key("init", on, up)[0]
    assert stage_key("finetune", off, up)[0] != stage_key("finetune", on, up)[0]
    assert "loca" not in stage_key("init", on, up)[1]["adapter"]
    sparse = compose("adapter=sparse", "init=random_zero")  # no adapter.loca: no loca in its key
    assert "loca" not in stage_key("finetune", sparse, up)[1]


# ----------------------------------------------------------------------------------------- DDP
DDP_RUN = dict(
    lr=1e-2,
    max_steps=3,
    micro_batch_size=2,
    effective_batch=8,
    warmup_ratio=0.0,
    save_every=0,
    wandb={"mode": "disabled"},
)
DDP_LOCA = LoCAConfig(enabled=True, coef_steps=1, location_steps=2, learn_fraction=1.0, location_lr=0.05)


def ddp_worker(out) -> None:
    """Under torchrun: train the toy LoCA model, save this rank's locations, values and location state."""
    import os

    model = toy_loca_model()
    learner = LocationLearner(model, DDP_LOCA)
    train(model, None, copy_task(24), DDP_RUN, out / "run", seed=4, device="cpu", step_hook=learner)
    torch.save((snapshot(model), learner.state_dict()), out / f"rank{os.environ['RANK']}.pt")


@pytest.mark.slow
def test_two_processes_learn_the_same_locations_as_one(tmp_path):
    """2 processes (gloo) vs 1 at the same global batch: the same moves, values, and Adam moments of ``u``
    (the per-rank sums are averaged like DDP's gradients: summing them would double the moments)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(Path(__file__).resolve()), str(tmp_path)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    model = toy_loca_model()
    learner = LocationLearner(model, DDP_LOCA)
    train(model, None, copy_task(24), DDP_RUN, tmp_path / "one", seed=4, device="cpu", step_hook=learner)
    ref, ref_state = snapshot(model), learner.state_dict()
    (r0, s0), (r1, s1) = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert learner.total_moved > 0
    for name in ref:
        for k in (0, 1):
            assert torch.equal(r0[name][k], r1[name][k]), name  # replicas identical
        assert torch.equal(r0[name][0], ref[name][0]), name
        torch.testing.assert_close(r0[name][1], ref[name][1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            s0["layers"][name]["m"], ref_state["layers"][name]["m"], rtol=1e-4, atol=1e-7
        )


if __name__ == "__main__":
    import sys
    from pathlib import Path

    ddp_worker(Path(sys.argv[1]))
