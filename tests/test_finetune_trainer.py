"""The fine-tuning loop on a tiny random Llama (PEFT LoRA or a few trainable weights), CPU, one process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from qwha.data.sft import SFTCollator
from qwha.finetune import TrainConfig, train
from qwha.finetune import checkpoint as ckpt
from qwha.finetune.schedule import build_scheduler, lr_factor, warmup_steps
from qwha.finetune.toy import copy_task, tiny_llama, trainable_state
from qwha.finetune.toy import tiny_llama_partly_trainable as few_trainable


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls on 2 shared cores: thread hand-offs cost 100x the arithmetic (measured 3.7 s vs 0.02 s
    # per step), and one thread is also deterministic run to run.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cfg(**kw) -> dict:
    base = dict(
        lr=1e-2,
        max_steps=6,
        micro_batch_size=2,
        effective_batch=8,
        warmup_ratio=0.2,
        weight_decay=0.1,
        save_every=2,
        log_every=1,
        wandb={"mode": "disabled"},
    )
    return {**base, **kw}


def hf_mean_loss(model, data) -> float:
    """Mean next-token loss over all supervised tokens, by transformers' own loss (one padded batch)."""
    b = SFTCollator(0)(data)
    with torch.no_grad():
        return float(model(**b).loss)


# ----------------------------------------------------------------------------------------- schedule
def test_cosine_warmup_matches_closed_form():
    # T = 106, ratio 0.05 -> ceil(5.3) = 6 warmup steps, then 100 cosine steps: hand-worked values.
    t, w = 106, warmup_steps(106, 0.05)
    assert w == 6
    expected = {
        0: 0.0,
        3: 0.5,
        6: 1.0,
        31: 0.5 * (1 + math.sqrt(0.5)),  # progress 1/4: cos(pi/4)
        56: 0.5,  # progress 1/2
        81: 0.5 * (1 - math.sqrt(0.5)),  # progress 3/4
        106: 0.0,
    }
    for step, want in expected.items():
        assert lr_factor(step, t, w, "cosine") == pytest.approx(want, abs=1e-12), step
    assert lr_factor(56, t, w, "linear") == pytest.approx(0.5)
    assert lr_factor(90, t, w, "constant") == 1.0
    # The LambdaLR the trainer uses gives the same lr after s optimizer steps.
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2e-4)
    sched = build_scheduler(opt, t, 0.05, "cosine")
    seen = {}
    for s in range(t + 1):
        seen[s] = sched.get_last_lr()[0]
        opt.step()
        sched.step()
    for step, want in expected.items():
        assert seen[step] == pytest.approx(2e-4 * want, rel=1e-9, abs=1e-15)


def test_schedule_agrees_with_transformers():
    from transformers import get_cosine_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    hf = get_cosine_schedule_with_warmup(opt, num_warmup_steps=7, num_training_steps=50)
    for s in range(51):
        assert hf.get_last_lr()[0] == pytest.approx(lr_factor(s, 50, 7), abs=1e-12)
        opt.step()
        hf.step()


# ----------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "override, message",
    [
        ({"scheduler": "step"}, "train.scheduler='step': allowed values are cosine, linear, constant"),
        ({"precision": "fp16"}, "train.precision='fp16': allowed values are auto, bf16, fp32"),
        ({"warmup_ratio": 1.5}, "train.warmup_ratio=1.5"),
        ({"learning_rate": 1e-4}, "train.learning_rate is unknown"),
        ({"wandb": {"mode": "sync"}}, "train.wandb.mode='sync'"),
    ],
)
def test_bad_config_is_one_clear_error(override, message):
    with pytest.raises(ValueError) as e:
        TrainConfig.from_mapping(cfg(**override))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_effective_batch_must_divide(tmp_path):
    model = few_trainable()
    with pytest.raises(ValueError, match=r"train.effective_batch=10 is not divisible .* multiple of 4"):
        train(model, None, copy_task(16), cfg(micro_batch_size=4, effective_batch=10), tmp_path, device="cpu")


def test_no_trainable_parameters_is_an_error(tmp_path):
    model = tiny_llama(lora_rank=None).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, None, copy_task(16), cfg(), tmp_path, device="cpu")


# ----------------------------------------------------------------------------------------- training
def test_loss_falls_and_only_adapter_changes(tmp_path):
    model = tiny_llama(lora_rank=16)
    data = copy_task(8, max_len=6)
    frozen_before = {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
    trainable_before = trainable_state(model)
    loss_before = hf_mean_loss(model, data)

    run = cfg(lr=1e-2, max_steps=60, micro_batch_size=4, effective_batch=8, warmup_ratio=0.1, save_every=0)
    out = train(model, None, data, run, tmp_path, seed=0, device="cpu")

    loss_after = hf_mean_loss(model, data)  # transformers' loss, independent of the trainer's
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
    # The first reported loss is the mean over the whole first batch (= all 8 examples) before any update.
    assert out["first_loss"] == pytest.approx(loss_before, rel=1e-5)
    assert out["final_loss"] < 0.8 * out["first_loss"]
    for k, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[k]), k
    assert all(not torch.equal(p, trainable_before[k]) for k, p in trainable_state(model).items())
    assert out["trainable_params"] == sum(v.numel() for v in trainable_before.values())

    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 61))
    warm = math.ceil(0.1 * 60)
    for r in rows:  # the logged lr follows the closed form (step s = r["step"] - 1 updates made before)
        s = r["step"] - 1
        want = s / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (60 - warm)))
        assert r["lr"] == pytest.approx(1e-2 * want, abs=1e-12)
    assert out["tokens_per_s"] > 0 and out["step_time_s"] > 0 and out["peak_mem_mb"] > 0


def test_micro_batch_split_does_not_change_the_update(tmp_path):
    """Gradient accumulation: 1 x 8 and 4 x 2 micro-batches give the same weights (token-weighted loss)."""
    data = copy_task(32)
    results = []
    for micro in (8, 2):
        model = few_trainable()
        run = cfg(micro_batch_size=micro, effective_batch=8, max_steps=4, save_every=0)
        train(model, None, data, run, tmp_path / f"m{micro}", device="cpu")
        results.append(trainable_state(model))
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-5, atol=1e-6)


class Killed(RuntimeError):
    pass


@pytest.mark.parametrize("use_lora", [False, True])
def test_resume_after_kill_matches_uninterrupted(tmp_path, use_lora):
    """K = 6 steps straight vs killed after step 3 (last checkpoint: step 2) and resumed: equal adapters.

    Same seed, CPU, one thread: the resumed run replays exactly the same arithmetic, so the tolerance is 0
    (bitwise equal), and so are the logged losses.
    """
    make = (lambda: tiny_llama(lora_rank=4)) if use_lora else few_trainable
    data = copy_task(40)
    run = cfg(max_steps=6, save_every=2)

    straight = make()
    train(straight, None, data, run, tmp_path / "a", seed=3, device="cpu")

    def kill_after_3(step, row):
        if step == 3:
            raise Killed()

    ckpt_dir = tmp_path / "stable-ckpt"
    with pytest.raises(Killed):
        train(
            make(),
            None,
            data,
            run,
            tmp_path / "b1",
            seed=3,
            device="cpu",
            checkpoint_dir=ckpt_dir,
            on_step=kill_after_3,
        )
    assert [s for s, _ in ckpt.list_checkpoints(ckpt_dir)] == [2]

    resumed = make()  # a fresh process would rebuild the model from its (init) artifact
    out = train(resumed, None, data, run, tmp_path / "b2", seed=3, device="cpu", checkpoint_dir=ckpt_dir)
    assert out["resumed_from_step"] == 2 and out["steps_run"] == 4
    a, b = trainable_state(straight), trainable_state(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k

    rows_a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (tmp_path / "b2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == list(range(1, 7))
    assert [r["loss"] for r in rows_b] == [r["loss"] for r in rows_a]
    assert [s for s, _ in ckpt.list_checkpoints(ckpt_dir)] == [4, 6]  # keep_last = 2
    saved = ckpt.load_checkpoint(ckpt_dir / "step-6")[0]
    assert set(saved) == set(a) and all(torch.equal(saved[k], a[k]) for k in a)


def test_finished_run_resumes_to_a_no_op(tmp_path):
    data = copy_task(16)
    model = few_trainable()
    first = train(
        model, None, data, cfg(max_steps=2), tmp_path / "a", device="cpu", checkpoint_dir=tmp_path / "c"
    )
    again = few_trainable()
    out = train(
        again, None, data, cfg(max_steps=2), tmp_path / "b", device="cpu", checkpoint_dir=tmp_path / "c"
    )
    assert out["steps_run"] == 0 and out["final_loss"] == first["final_loss"]
    a, b = trainable_state(model), trainable_state(again)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_partial_checkpoint_is_ignored_and_mismatch_refused(tmp_path):
    data = copy_task(16)
    ckpt_dir = tmp_path / "c"
    train(
        few_trainable(), None, data, cfg(max_steps=2), tmp_path / "a", device="cpu", checkpoint_dir=ckpt_dir
    )
    # A kill during a save leaves a hidden temporary folder: never taken for a checkpoint, cleaned up.
    partial = ckpt_dir / ".tmp-step-4-999"
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"truncated")
    assert ckpt.latest_checkpoint(ckpt_dir) == ckpt_dir / "step-2"
    with pytest.raises(ValueError, match=r"was made with lr=0.01, this run has 0.02"):
        train(
            few_trainable(),
            None,
            data,
            cfg(max_steps=2, lr=2e-2),
            tmp_path / "b",
            device="cpu",
            checkpoint_dir=ckpt_dir,
        )
    assert not partial.exists()
    # resume=false starts over (and replaces the old checkpoints).
    out = train(
        few_trainable(),
        None,
        data,
        cfg(max_steps=2, lr=2e-2, resume=False),
        tmp_path / "b",
        device="cpu",
        checkpoint_dir=ckpt_dir,
    )
    assert out["resumed_from_step"] == 0 and out["steps_run"] == 2


def test_grad_checkpointing_gives_the_same_update(tmp_path):
    data = copy_task(16)
    states = []
    for gc in (False, True):
        model = tiny_llama(lora_rank=4)
        train(
            model,
            None,
            data,
            cfg(max_steps=2, grad_checkpointing=gc, save_every=0),
            tmp_path / str(gc),
            device="cpu",
        )
        states.append(trainable_state(model))
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_keeps_fp32_master_weights(tmp_path):
    """precision=bf16 (what ``auto`` picks on CUDA) runs here on CPU autocast: trainable tensors stay fp32
    and the first loss is the fp32 one within bf16 rounding (~3 significant digits)."""
    data = copy_task(16)
    losses = {}
    for precision in ("fp32", "bf16"):
        model = tiny_llama(lora_rank=4)
        run = cfg(max_steps=2, precision=precision, save_every=0)
        out = train(model, None, data, run, tmp_path / precision, device="cpu")
        losses[precision] = out["first_loss"]
        assert all(p.dtype == torch.float32 for p in trainable_state(model).values())
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)
    assert losses["bf16"] != losses["fp32"]  # autocast did change the arithmetic


def _wandb_records(path: Path):
    """Records of a wandb transaction log (LevelDB-style: 7-byte file header, 32 KiB blocks, each record
    chunk = crc32 (4) + length (2, little endian) + type (1: full, 2: first, 3: middle, 4: last))."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, out, buf = path.read_bytes(), 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # trailer too short for a header: skip to the next block
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def test_wandb_offline_run_gets_config_and_metrics(tmp_path):
    run = cfg(max_steps=2, save_every=0, wandb={"project": "qwha-test", "name": "tiny", "mode": "offline"})
    train(few_trainable(), None, copy_task(16), run, tmp_path, device="cpu", config_to_log={"adapter": "wha"})
    logs = list(Path(tmp_path, "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    records = _wandb_records(logs[0])
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs[0].project == "qwha-test" and runs[0].display_name == "tiny"
    config = {u.key: json.loads(u.value_json) for u in runs[0].config.update}
    assert config["adapter"] == "wha"
    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    key = lambda item: item.key or "/".join(item.nested_key)
    losses = [json.loads(i.value_json) for h in history for i in h.item if key(i) == "train/loss"]
    logged = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(logged)
