"""Calibration Grams on a tiny random Llama against XᵀX of captured activations."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qwha.init import calibration_grams
from qwha.init.hessian import plan_gram_passes

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def captured_grams(model, calib):
    """Reference: store every input of every target linear, then X Xᵀ in float64."""
    inputs = {}
    handles = []
    for name, mod in model.named_modules():
        if name.split(".")[-1] in TARGETS:
            handles.append(
                mod.register_forward_pre_hook(
                    lambda m, a, name=name: inputs.setdefault(name, []).append(a[0].detach().clone())
                )
            )
    with torch.no_grad():
        for row in calib:  # one sequence at a time: a different batching than the code under test
            model(input_ids=row[None], use_cache=False)
    for h in handles:
        h.remove()
    out = {}
    for name, xs in inputs.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).to(torch.float64)
        out[name] = x.T @ x
    return out


def test_grams_match_captured_activations(tiny_llama):
    calib = torch.randint(0, 97, (5, 9), generator=torch.Generator().manual_seed(1))
    want = captured_grams(tiny_llama, calib)
    got = calibration_grams(tiny_llama, calib, TARGETS, batch_size=2)
    assert set(got) == set(want) and len(got) == 14
    for name, g in got.items():
        assert g.dtype == torch.float64 and g.shape == want[name].shape
        assert torch.allclose(g, want[name], rtol=1e-5, atol=1e-6), name
    # q/k/v and gate/up read one tensor: one accumulator; o/down have their own
    for layer in range(2):
        p = f"model.layers.{layer}."
        assert got[p + "self_attn.q_proj"] is got[p + "self_attn.k_proj"] is got[p + "self_attn.v_proj"]
        assert got[p + "mlp.gate_proj"] is got[p + "mlp.up_proj"]
        assert got[p + "self_attn.o_proj"] is not got[p + "self_attn.q_proj"]
        assert got[p + "mlp.down_proj"] is not got[p + "mlp.gate_proj"]


def test_subset_and_float32_products(tiny_llama):
    calib = torch.randint(0, 97, (3, 7), generator=torch.Generator().manual_seed(2))
    want = captured_grams(tiny_llama, calib)
    names = ["model.layers.1.self_attn.v_proj", "model.layers.0.mlp.down_proj"]
    got = calibration_grams(tiny_llama, calib, TARGETS, modules=names, product_dtype=torch.float32)
    assert set(got) == set(names)
    for name in names:
        assert torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-4)


def test_bad_input(tiny_llama):
    calib = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="^target_modules"):
        calibration_grams(tiny_llama, calib, ["qkv"])
    with pytest.raises(ValueError, match="^calib"):
        calibration_grams(tiny_llama, calib.float(), TARGETS)
    with pytest.raises(ValueError, match="^modules"):
        calibration_grams(tiny_llama, calib, TARGETS, modules=["lm_head"])


def test_plan_gram_passes(tiny_llama):
    # hidden 32 -> 8·32² = 8192 bytes; intermediate 48 -> 18432 bytes (down_proj)
    groups = plan_gram_passes(tiny_llama, TARGETS, max_bytes=3 * 8192)
    flat = [n for g in groups for n in g]
    assert flat == [n for n, _ in tiny_llama.named_modules() if n.split(".")[-1] in TARGETS]
    sizes = {n: 8 * m.in_features**2 for n, m in tiny_llama.named_modules() if n in flat}
    assert all(sum(sizes[n] for n in g) <= 3 * 8192 or len(g) == 1 for g in groups)
    assert groups[0] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert len(plan_gram_passes(tiny_llama, TARGETS, max_bytes=10**9)) == 1


def test_blockwise_grams_equal_the_whole_model_pass(tiny_llama):
    from qwha.init.hessian import blockwise_grams

    calib = torch.randint(0, 97, (5, 9), generator=torch.Generator().manual_seed(3))
    want = calibration_grams(tiny_llama, calib, TARGETS, batch_size=2)
    blocks = []
    for grams in blockwise_grams(tiny_llama, calib, TARGETS, batch_size=2):
        assert torch.is_grad_enabled()  # the generator's no_grad does not leak into the caller
        blocks.append(grams)
    assert [sorted({n.split(".")[2] for n in b}) for b in blocks] == [["0"], ["1"]]  # one block each
    got = {n: g for b in blocks for n, g in b.items()}
    assert set(got) == set(want)
    for name, g in got.items():
        assert torch.equal(g, want[name]), name  # same operations in the same order: bitwise equal
    # shared inputs still share one accumulator within a block
    assert got["model.layers.1.self_attn.q_proj"] is got["model.layers.1.self_attn.v_proj"]
    assert tiny_llama.training is False


def test_blockwise_grams_skip_blocks_without_targets_and_refuse_outside_targets(tiny_llama):
    from qwha.init.hessian import blockwise_grams

    calib = torch.randint(0, 97, (3, 7), generator=torch.Generator().manual_seed(4))
    want = calibration_grams(tiny_llama, calib, ["layers.1.mlp.down_proj"])
    (only,) = list(blockwise_grams(tiny_llama, calib, ["layers.1.mlp.down_proj"]))
    assert list(only) == ["model.layers.1.mlp.down_proj"]
    assert torch.equal(only["model.layers.1.mlp.down_proj"], want["model.layers.1.mlp.down_proj"])
    with pytest.raises(ValueError, match="lm_head is not inside a decoder block"):
        list(blockwise_grams(tiny_llama, calib, ["lm_head"]))


def test_decoder_blocks_refuse_mixed_attention_types(tiny_llama):
    from qwha.init.hessian import decoder_blocks

    assert decoder_blocks(tiny_llama) is tiny_llama.model.layers
    tiny_llama.config.layer_types = ["sliding_attention", "full_attention"]
    try:
        assert decoder_blocks(tiny_llama) is None
    finally:
        del tiny_llama.config.layer_types
