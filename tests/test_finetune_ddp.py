"""Two processes under torchrun (gloo, CPU), killed and resumed, match one process at the same global batch.

This file is also the worker: ``python -m torch.distributed.run --nproc_per_node 2 tests/test_finetune_ddp.py
OUT [ddp|fsdp]`` trains the tiny Llama and writes each rank's final trainable tensors to ``OUT/rank<r>.pt``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4
DATA_SIZE = 40


def run_config(fsdp: bool = False) -> dict:
    # Global batch 8: micro 2 x accumulation 4 in one process, micro 2 x accumulation 2 x 2 processes.
    return dict(
        lr=1e-2,
        max_steps=STEPS,
        micro_batch_size=2,
        effective_batch=8,
        warmup_ratio=0.25,
        weight_decay=0.1,
        save_every=2,
        fsdp=fsdp,
        wandb={"mode": "disabled"},
    )


class Killed(RuntimeError):
    pass


def worker(out: Path, mode: str) -> None:
    """Train to step 3 and die (last checkpoint: step 2), then resume to the end in the same processes."""
    from qwha.finetune import train
    from qwha.finetune.toy import copy_task, tiny_llama_partly_trainable

    def kill_after_3(step: int, row: dict) -> None:
        if step == 3:
            raise Killed()

    data, cfg = copy_task(DATA_SIZE, seed=1), run_config(mode == "fsdp")
    try:
        train(
            tiny_llama_partly_trainable(seed=0),
            None,
            data,
            cfg,
            out / "run",
            seed=5,
            device="cpu",
            on_step=kill_after_3,
        )
        raise AssertionError("the run was not interrupted")
    except Killed:
        pass
    model = tiny_llama_partly_trainable(seed=0)
    metrics = train(model, None, data, cfg, out / "run", seed=5, device="cpu")
    # The final checkpoint holds the full (gathered) tensors in every mode; under DDP each rank's live
    # parameters are full too and must agree with it.
    rank = int(os.environ["RANK"])
    if mode == "ddp":
        live = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
        torch.save(live, out / f"rank{rank}.pt")
    if rank == 0:
        (out / "metrics.json").write_text(json.dumps(metrics))


def one_process_reference(tmp: Path) -> tuple[dict, dict]:
    from qwha.finetune import train
    from qwha.finetune.toy import copy_task, tiny_llama_partly_trainable, trainable_state

    model = tiny_llama_partly_trainable(seed=0)
    metrics = train(model, None, copy_task(DATA_SIZE, seed=1), run_config(), tmp, seed=5, device="cpu")
    return trainable_state(model), metrics


def launch(out: Path, mode: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(__file__).resolve()),
        str(out),
        mode,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return one_process_reference(tmp_path_factory.mktemp("one"))
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_processes_match_one(tmp_path, reference, mode):
    """2 processes, killed after step 3 and resumed, vs 1 process straight through: same final tensors.

    Tolerance: float32 on CPU, gradients summed in a different order by gloo -> rtol 1e-5, atol 1e-6.
    (FSDP2 is the documented option for models that do not fit one GPU; slow marker: ~30 s here.)
    """
    from qwha.finetune.checkpoint import load_checkpoint

    ref_state, ref_metrics = reference
    launch(tmp_path, mode)
    final = load_checkpoint(tmp_path / "run" / "checkpoints" / f"step-{STEPS}")[0]
    assert set(final) == set(ref_state)
    for k in ref_state:
        torch.testing.assert_close(final[k], ref_state[k], rtol=1e-5, atol=1e-6)
    if mode == "ddp":
        r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
        for k in ref_state:
            assert torch.equal(r0[k], r1[k]), k  # DDP keeps the replicas identical
            assert torch.equal(r0[k], final[k]), k
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["grad_accum"] == 2
    assert metrics["resumed_from_step"] == 2 and metrics["steps_run"] == STEPS - 2
    assert metrics["first_loss"] == pytest.approx(ref_metrics["first_loss"], rel=1e-6)
    assert metrics["final_loss"] == pytest.approx(ref_metrics["final_loss"], rel=1e-5)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # only rank 0 wrote, once per step


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2])
