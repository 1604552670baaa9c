"""On a CUDA machine (``make gpu-check``): the compiled Triton kernels against float64/torch references
in bf16 and fp32, the adapter family's forward/backward on CUDA against a float64 dense reference, and
one QWHA training step on a 2-bit GPTQ model of SmolLM2-135M's shapes. Deselected by default
(``-m gpu``); collected in the CPU rehearsal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qwha import hadamard as hd
from qwha.kernels import fwht as kernels
from qwha.transforms import transform_matrix

pytestmark = pytest.mark.gpu
CUDA = "cuda"

# Every projection width of the target model families (see tests/test_triton_fwht.py).
WIDTHS = [192, 576, 896, 1024, 1536, 2048, 2304, 3072, 3584, 4096, 4864, 5120, 8192]
WIDTHS += [11008, 13824, 14336, 18944]


def test_kernels_are_compiled_not_interpreted():
    assert torch.cuda.is_available()
    assert not kernels.interpreted() and kernels.available()


@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_transform_equals_float64(n, dtype):
    torch.manual_seed(n)
    x = torch.randn(64, n, device=CUDA).to(dtype)
    h = hd.hadamard_matrix(n).to(CUDA)  # dense float64 [n, n] (2.9 GB at 18944: fine on an H200)
    for inverse in (False, True):
        ref = x.double() @ (h.T if inverse else h)
        y = (hd.ifwht if inverse else hd.fwht)(x, backend="triton")
        assert y.dtype == dtype
        if dtype == torch.float32:
            assert (y.double() - ref).abs().max() <= 1e-5 * (1 + ref.abs().max())
        else:  # float32 arithmetic, one rounding to bf16
            assert bool(((y.double() - ref).abs() <= ref.abs() * 2.0**-8 + 1e-5 * ref.abs().max()).all())
        y_torch = (hd.ifwht if inverse else hd.fwht)(x, backend="torch")
        assert (y.double() - y_torch.double()).abs().max() <= 2.0**-7 * ref.abs().max()


# The activation side ("sparse") is 1-D only by definition: no 2-D rows for it.
ADAPTER_CASES = [
    (dims, transform, compute)
    for dims, transform in [(1, "wht"), (2, "wht"), (2, "dct"), (1, "dht")]
    for compute in ("fused", "sparse", "delta")
    if not (compute == "sparse" and dims == 2)
]


@pytest.mark.parametrize("dims, transform, compute", ADAPTER_CASES)
def test_adapter_forward_backward_on_cuda(dims, transform, compute):
    from qwha.adapters.wha import WHALinear

    torch.manual_seed(0)
    base = nn.Linear(576, 192, dtype=torch.float64).to(CUDA)
    layer = WHALinear(base, 4000, transform=transform, dims=dims, compute=compute, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.wha_c.copy_(torch.randn(layer.budget, generator=g, dtype=torch.float64).to(CUDA))
    x = torch.randn(2, 33, 576, dtype=torch.float64, device=CUDA, requires_grad=True)
    gy = torch.randn(2, 33, 192, dtype=torch.float64, device=CUDA)
    y = layer(x)
    gc, gx = torch.autograd.grad((y * gy).sum(), (layer.wha_c, x))
    # float64 dense reference on the CPU
    c = layer.wha_c.detach().cpu().clone().requires_grad_(True)
    xr = x.detach().cpu().clone().requires_grad_(True)
    f = torch.zeros(192 * 576, dtype=torch.float64).index_put((layer.wha_indices.long().cpu(),), c)
    t_in = transform_matrix(transform, 576)
    t_out = transform_matrix(transform, 192) if dims == 2 else torch.eye(192, dtype=torch.float64)
    w = base.weight.detach().cpu() + layer.scale * t_out @ f.view(192, 576) @ t_in.T
    yr = xr @ w.T + base.bias.detach().cpu()
    gcr, gxr = torch.autograd.grad((yr * gy.cpu()).sum(), (c, xr))
    assert torch.allclose(y.detach().cpu(), yr.detach(), atol=1e-9)
    assert torch.allclose(gx.cpu(), gxr, atol=1e-9)
    assert torch.allclose(gc.cpu(), gcr, atol=1e-8)


def test_one_qwha_step_on_2bit_gptq_smollm2_shapes():
    from transformers import LlamaConfig, LlamaForCausalLM

    from qwha.adapters import attach_adapter
    from tests.gptq_layers import quantize_linears

    cfg = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    quantize_linears(model, bits=2, group_size=64)  # GPTQModel TorchLinear layers, 2-bit codes
    model = model.to(CUDA)
    model = attach_adapter(model, method="wha", rank=64)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == 30 * 64 * (2 * 1152 + 2 * 768 + 3 * 2112)  # 19,537,920
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, 49152, (4, 512), device=CUDA)
    before = [p.detach().clone() for p in params]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in params)
    assert any(not torch.equal(a, p) for a, p in zip(before, params, strict=True))


def test_fused_weight_is_reused_within_a_step_and_rebuilt_after_it_on_cuda(monkeypatch):
    """On CUDA the materialised ``W_Q + ΔW`` is keyed without a device sync (storage, version counter,
    the process's optimizer steps): two micro-batches build it once and accumulate the float64 dense
    gradient; an optimizer step rebuilds it with the new values."""
    from qwha.adapters.wha import WHALinear

    torch.manual_seed(0)
    base = nn.Linear(576, 192, dtype=torch.float64).to(CUDA)
    layer = WHALinear(base, 9216, compute="fused", dtype=torch.float64)
    builds = []
    real = WHALinear._effective_weight
    monkeypatch.setattr(
        WHALinear, "_effective_weight", lambda self, c, dtype: builds.append(1) or real(self, c, dtype)
    )
    with torch.no_grad():
        layer.wha_c.normal_()
    xs = [torch.randn(8, 576, dtype=torch.float64, device=CUDA) for _ in range(2)]
    for x in xs:
        layer(x).square().sum().backward()
    assert len(builds) == 1
    t = transform_matrix("wht", 576).to(CUDA)

    def dense(c):
        f = torch.zeros(192 * 576, dtype=torch.float64, device=CUDA).index_put((layer.wha_indices.long(),), c)
        return base.weight.detach() + layer.scale * f.view(192, 576) @ t.T

    c = layer.wha_c.detach().clone().requires_grad_(True)
    ref = sum((x @ dense(c).T + base.bias.detach()).square().sum() for x in xs)
    (want,) = torch.autograd.grad(ref, [c])
    assert torch.allclose(layer.wha_c.grad, want, rtol=1e-9, atol=1e-9)
    torch.optim.SGD([layer.wha_c], lr=1e-3).step()
    y = layer(xs[0])
    assert len(builds) == 2
    assert torch.allclose(y, xs[0] @ dense(layer.wha_c.detach()).T + base.bias.detach(), atol=1e-9)
