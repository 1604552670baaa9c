"""The init stage's calibration Grams: computed pass by pass under the memory budget (the passes give
exactly the one-pass Grams), and once per (base, calib, targets, dtype) in a process."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from qwha.stages import init as init_stage
from tests.conftest import compose, tiny_llama_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _inputs(calib_key: str) -> dict:
    return {"base": SimpleNamespace(key="b0", path="unused"), "calib": SimpleNamespace(key=calib_key)}


def test_grams_reused_across_inits_and_recomputed_for_new_calibration(monkeypatch):
    monkeypatch.setattr(init_stage, "_in_sweep", lambda: True)
    calls = []

    def fake(cfg, inputs, targets, memo_key):
        calls.append(inputs["calib"].key)
        result = {"m": torch.ones(4, 4, dtype=torch.float64)}, {"m": torch.ones(2, 4)}, 8
        init_stage._remember(memo_key, result)
        yield result

    monkeypatch.setattr(init_stage, "_compute_grams", fake)
    monkeypatch.setattr(init_stage, "_GRAM_MEMO", {})
    grams = init_stage.full_precision_grams
    a = list(grams(compose("init=qwha", "bits=4"), _inputs("c1"), TARGETS))
    b = list(grams(compose("init=random", "bits=2"), _inputs("c1"), TARGETS))
    assert calls == ["c1"] and b[0] is a[0]  # another init and other bits: same Grams
    list(grams(compose("init=qwha"), _inputs("c2"), TARGETS))
    list(grams(compose("init=qwha"), _inputs("c2"), ["q_proj", "v_proj"]))
    assert calls == ["c1", "c2", "c2"]  # a new sample or target list recomputes


def test_memo_skipped_above_size_limit_and_outside_sweeps(monkeypatch):
    monkeypatch.setattr(init_stage, "_GRAM_MEMO", {})
    result = ({"m": torch.ones(16, 16, dtype=torch.float64)}, {}, 8)
    init_stage._remember(("k",), result)
    assert init_stage._GRAM_MEMO == {}  # a single run (no Hydra multirun) keeps nothing
    monkeypatch.setattr(init_stage, "_in_sweep", lambda: True)
    monkeypatch.setenv("QWHA_GRAM_MEMO_GB", str(1000 / 2**30))  # 1000 bytes < 16·16·8
    init_stage._remember(("k",), ({"m": torch.ones(16, 16, dtype=torch.float64)}, {}, 8))
    assert init_stage._GRAM_MEMO == {}
    monkeypatch.setenv("QWHA_GRAM_MEMO_GB", "1")
    init_stage._remember(("k",), ({"m": torch.ones(16, 16, dtype=torch.float64)}, {}, 8))
    assert list(init_stage._GRAM_MEMO) == [("k",)]


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


def test_passes_under_a_small_budget_give_the_one_pass_grams(monkeypatch):
    _tiny_sources(monkeypatch)
    monkeypatch.setattr(init_stage, "_in_sweep", lambda: True)
    inputs = _inputs("c1")
    inputs["calib"].path = "unused"
    one = list(init_stage.full_precision_grams(compose("device=cpu"), inputs, TARGETS))
    assert len(one) == 1 and len(init_stage._GRAM_MEMO) == 1  # one pass: memoised
    monkeypatch.setattr(init_stage, "_GRAM_MEMO", {})
    budget = 8 * 128**2 / 2**30  # room for one down_proj Gram (or four 64-wide ones) per pass
    many = list(
        init_stage.full_precision_grams(
            compose("device=cpu", f"init.gram_budget_gb={budget}"), inputs, TARGETS
        )
    )
    assert len(many) > 2 and init_stage._GRAM_MEMO == {}  # several passes: not memoised
    names = [n for grams, _, _ in many for n in grams]
    assert sorted(names) == sorted(one[0][0]) and len(names) == len(set(names)) == 14
    for grams, weights, tokens in many:
        assert tokens == 6 * 16 and set(weights) == set(grams)
        for n in grams:
            torch.testing.assert_close(grams[n], one[0][0][n], rtol=1e-12, atol=1e-12)
            assert torch.equal(weights[n], one[0][1][n])


def test_init_key_includes_perplexity_settings():
    a = init_stage.key_config(compose("init=qwha"))
    b = init_stage.key_config(compose("init=qwha", "eval.perplexity.max_tokens=1024"))
    assert a != b
