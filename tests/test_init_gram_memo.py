"""The init stage's calibration Grams: block by block (or, for models whose blocks cannot run alone,
pass by pass under the memory budget), both giving exactly the one-pass Grams; and inside a sweep
once per (base, calib, targets, dtype) in a process."""

from __future__ import annotations

from types import SimpleNamespace

import torch

import qwha.models
from qwha.stages import init as init_stage
from tests.conftest import compose, tiny_llama_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _inputs(calib_key: str) -> dict:
    return {"base": SimpleNamespace(key="b0", path="unused"), "calib": SimpleNamespace(key=calib_key)}


def test_grams_reused_across_inits_and_recomputed_for_new_calibration(monkeypatch):
    monkeypatch.setattr(init_stage, "_in_sweep", lambda: True)
    calls = []

    def fake(cfg, inputs, targets):
        calls.append(inputs["calib"].key)
        yield {"a": torch.ones(4, 4, dtype=torch.float64)}, {"a": torch.ones(2, 4)}, 8
        yield {"b": torch.ones(4, 4, dtype=torch.float64)}, {"b": torch.ones(2, 4)}, 8

    monkeypatch.setattr(init_stage, "_compute_grams", fake)
    monkeypatch.setattr(init_stage, "_GRAM_MEMO", {})
    grams = init_stage.full_precision_grams
    a = list(grams(compose("init=qwha", "bits=4"), _inputs("c1"), TARGETS))
    b = list(grams(compose("init=random", "bits=2"), _inputs("c1"), TARGETS))
    assert len(a) == 2 and len(b) == 1 and sorted(b[0][0]) == ["a", "b"]  # the chunks, gathered
    assert calls == ["c1"] and b[0][0]["a"] is a[0][0]["a"]  # another init and other bits: same Grams
    list(grams(compose("init=qwha"), _inputs("c2"), TARGETS))
    list(grams(compose("init=qwha"), _inputs("c2"), ["q_proj", "v_proj"]))
    assert calls == ["c1", "c2", "c2"]  # a new sample or target list recomputes


def test_memo_skipped_above_size_limit_and_outside_sweeps(monkeypatch):
    def fake(cfg, inputs, targets):
        for name in "ab":
            yield {name: torch.ones(16, 16, dtype=torch.float64)}, {}, 8

    monkeypatch.setattr(init_stage, "_compute_grams", fake)
    monkeypatch.setattr(init_stage, "_GRAM_MEMO", {})
    cfg = compose("init=qwha")
    assert len(list(init_stage.full_precision_grams(cfg, _inputs("c1"), TARGETS))) == 2
    assert init_stage._GRAM_MEMO == {}  # a single run (no Hydra multirun) keeps nothing
    monkeypatch.setattr(init_stage, "_in_sweep", lambda: True)
    monkeypatch.setenv("QWHA_GRAM_MEMO_GB", str(3000 / 2**30))  # one 2 KiB Gram fits, not two
    assert len(list(init_stage.full_precision_grams(cfg, _inputs("c1"), TARGETS))) == 2
    assert init_stage._GRAM_MEMO == {}
    monkeypatch.setenv("QWHA_GRAM_MEMO_GB", "1")
    assert len(list(init_stage.full_precision_grams(cfg, _inputs("c1"), TARGETS))) == 2
    assert len(init_stage._GRAM_MEMO) == 1


def _tiny_sources(monkeypatch):
    from transformers import LlamaForCausalLM

    import qwha.models

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=97)).eval()
    calib = torch.randint(0, 97, (6, 16))
    monkeypatch.setattr(qwha.models, "base_model_ref", lambda path: "tiny")
    monkeypatch.setattr(qwha.models, "load_causal_lm", lambda ref, dtype, dev: model)
    monkeypatch.setattr(init_stage, "load_calibration", lambda path: calib)
    monkeypatch.setattr(init_stage, "_GRAM_MEMO", {})


def _one_pass_grams() -> tuple[dict, dict]:
    from qwha.init import calibration_grams
    from qwha.init.hessian import select_target_modules

    model = qwha.models.load_causal_lm("tiny", None, None)
    calib = init_stage.load_calibration("unused")
    with torch.no_grad():
        grams = calibration_grams(model, calib, TARGETS, batch_size=4)
    weights = {n: m.weight.detach() for n, m in select_target_modules(model, TARGETS).items()}
    return grams, weights


def _check_chunks(chunks, one):
    names = [n for grams, _, _ in chunks for n in grams]
    assert sorted(names) == sorted(one[0]) and len(names) == len(set(names)) == 14
    for grams, weights, tokens in chunks:
        assert tokens == 6 * 16 and set(weights) == set(grams)
        for n in grams:
            torch.testing.assert_close(grams[n], one[0][n], rtol=1e-12, atol=1e-12)
            assert torch.equal(weights[n], one[1][n])


def test_block_by_block_grams_in_the_stage(monkeypatch):
    _tiny_sources(monkeypatch)
    one = _one_pass_grams()
    inputs = _inputs("c1")
    inputs["calib"].path = "unused"
    chunks = list(init_stage.full_precision_grams(compose("device=cpu"), inputs, TARGETS))
    assert [sorted({n.split(".")[2] for n in g}) for g, _, _ in chunks] == [["0"], ["1"]]
    _check_chunks(chunks, one)
    assert init_stage._GRAM_MEMO == {}  # not a sweep
    monkeypatch.setattr(init_stage, "_in_sweep", lambda: True)
    list(init_stage.full_precision_grams(compose("device=cpu"), inputs, TARGETS))
    (memo,) = init_stage._GRAM_MEMO.values()
    _check_chunks([memo], one)  # a sweep keeps the whole model's Grams


def test_passes_under_a_small_budget_give_the_one_pass_grams(monkeypatch):
    import qwha.init.hessian

    _tiny_sources(monkeypatch)
    monkeypatch.setattr(qwha.init.hessian, "decoder_blocks", lambda model: None)  # no block stack
    one = _one_pass_grams()
    inputs = _inputs("c1")
    inputs["calib"].path = "unused"
    whole = list(init_stage.full_precision_grams(compose("device=cpu"), inputs, TARGETS))
    assert len(whole) == 1
    _check_chunks(whole, one)
    budget = 8 * 128**2 / 2**30  # room for one down_proj Gram (or four 64-wide ones) per pass
    many = list(
        init_stage.full_precision_grams(
            compose("device=cpu", f"init.gram_budget_gb={budget}"), inputs, TARGETS
        )
    )
    assert len(many) > 2
    _check_chunks(many, one)


def test_init_key_includes_perplexity_settings():
    a = init_stage.key_config(compose("init=qwha"))
    b = init_stage.key_config(compose("init=qwha", "eval.perplexity.max_tokens=1024"))
    assert a != b
