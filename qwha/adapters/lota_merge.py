"""Lossless merge of LoTA-QAF into the quantized model: new integer codes, and the fractional zero shift.

The trained layer computes ``s · (W_int − z + Ŵ + μ)``. Merged, ``W'_int = W_int + Ŵ`` is a valid b-bit
code (the boundary masks guarantee it; asserted here) and replaces ``qweight``; the offset folds into
the zero point, ``z' = z − μ``, which is fractional.

Where the fractional zero point goes (GPTQModel 7.6, checked in its source):

* The GPTQ formats (``gptq``, ``gptq_v2``, ``gptq_p``) pack zero points as b-bit integers in ``qzeros``;
  every GPTQ kernel (``TorchLinear`` included) computes ``scales · (q − zeros)`` with integer zeros.
* The formats with float zero points are AWQ's ``gemv_fast`` / ``llm-awq`` (``scaled_zeros`` = −s·z in
  fp16): 4-bit only, group size ≤ 128, CUDA only. AWQ ``gemm`` packs integer zeros like GPTQ;
  ParoQuant's float zero points are 4-bit only and re-rounded at packing. GGUF ``Q4_1``/``Q5_1`` have a
  float per-block minimum but fixed 4/5 bits and block 32. None covers 2/3-bit at any group size.
* What GPTQModel does load for every GPTQ kernel and bit width is its own LoRA extension with the
  weights stored *inside the model checkpoint*: ``quantize_config.json`` ``"adapter": {"name": "lora",
  "path": "", "rank": R}`` makes each quantized layer allocate ``lora_A [d_in, R]`` / ``lora_B [R, d_out]``
  buffers, read from ``model.safetensors``, and add ``(x @ lora_A) @ lora_B`` to its output
  (``gptqmodel.adapter.adapter.Lora``, ``BaseQuantLinear.__init__`` / ``post_init``).

The offset term ``s·μ`` is constant within each (output channel, group), so it is exactly a rank-G
product (G = groups per row): ``lora_A`` is the group-membership indicator (``lora_A[k, g] = 1`` iff input
``k`` is in group ``g``), ``lora_B[g, o] = s[o, g] · μ[o, g]``. That is the per-group float tensor the
fractional zero point needs, ``−s·(z' − z)``, stored in GPTQModel's own slot, so ``GPTQModel.load`` runs
the merged model with no code of ours. ``qzeros`` keep the integer ``z``. One rank serves every layer
(GPTQModel's buffers take ``adapter.rank``), so ``R`` is the largest G among the quantized layers; layers
with fewer groups pad with zero columns, unadapted quantized layers get zeros. Cost at inference: a
rank-R product per layer (R = d_in/group_size, e.g. 24 for SmolLM2-135M's down_proj at group 64).
The tensors are stored in float16 (GPTQModel's buffer dtype); ``lora_A`` is exact, ``lora_B`` rounds
``s·μ`` once to float16, the same relative precision as the fp16 scales of the kernel itself.

The transformers loader (optimum's GPTQ path) ignores the ``adapter`` entry; :func:`qwha.quant.pipeline.
load_quantized` puts the same GPTQModel ``Lora`` back on each layer, so both loaders give the merged
model.

For loaders that know neither GPTQModel's adapter entry nor qwha, :func:`write_offset_adapter` writes the
same offset as a standard PEFT LoRA (rank ``G`` per layer, ``lora_A`` the indicator, ``lora_B = s·μ``,
scaling 1) into the merged folder. ``stage=export export.format=lota`` (:mod:`qwha.stages.export`)
ships that folder so that every loader gives the adapter-on model or refuses:

* ``AutoModelForCausalLM.from_pretrained(folder)`` (transformers + optimum): transformers finds
  ``adapter_config.json`` beside ``config.json`` and attaches it with PEFT to the GPTQ layers; the
  in-checkpoint ``lora_A``/``lora_B`` tensors are reported as unexpected keys and ignored;
* ``GPTQModel.load(folder)``: the codes and its own in-checkpoint LoRA (it reads no ``adapter_config.json``);
* ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), folder)``: PEFT reloads the
  same adapter into the same slot (not a second copy); ``AutoPeftModelForCausalLM`` fails on the adapter's
  ``base_model_name_or_path``, which is deliberately not a loadable id (the base is the folder itself);
* ``qwha.quant.load_quantized`` finds no ``quantize_config.json`` (the export drops it; GPTQModel reads
  ``config.json`` instead) and refuses, rather than adding its LoRA on top of transformers' one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from qwha.adapters.base import is_quantized_linear, unwrap_model
from qwha.adapters.lota import LoTALinear, pack_codes

__all__ = ["group_indicator", "merge_lota", "offset_lora", "save_merged_lota", "write_offset_adapter"]

MERGE_INFO = "lota_merge.json"


def group_indicator(d_in: int, group_size: int, rank: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """``[d_in, rank]`` with 1 at ``(k, k // group_size)``, zero padding beyond the layer's groups."""
    n_groups = d_in // group_size
    if rank < n_groups:
        raise ValueError(f"rank {rank} < {n_groups} groups")
    a = torch.zeros(d_in, rank, dtype=dtype, device=device)
    a[torch.arange(d_in, device=device), torch.arange(d_in, device=device) // group_size] = 1
    return a


@torch.no_grad()
def offset_lora(layer: LoTALinear, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(new codes W_int + Ŵ [d_out, d_in] int16, lora_A [d_in, rank], lora_B [rank, d_out])``, float32."""
    w_int, s, _z = layer.grid()
    step, mu = layer.step_and_offset()
    codes = w_int + step.to(w_int.dtype)
    lo, hi = int(codes.min()), int(codes.max())
    assert lo >= 0 and hi <= layer.maxq, f"merged codes leave [0, {layer.maxq}]: [{lo}, {hi}]"
    a = group_indicator(layer.in_features, layer.group_size, rank, device=s.device)
    b = torch.zeros(rank, layer.out_features, device=s.device)
    b[: s.shape[1]] = (s * mu).T
    return codes, a, b


def _groups(module: nn.Module) -> int:
    return int(module.scales.shape[0])


@torch.no_grad()
def merge_lota(model: nn.Module) -> nn.Module:
    """Merge every :class:`LoTALinear` into its GPTQModel layer, in place; returns the transformers model.

    Each layer's ``qweight`` becomes the packed ``W_int + Ŵ``; its ``adapter`` becomes a GPTQModel
    ``Lora`` (``path=""``) carrying ``s·μ`` through the group indicator (module docstring). The rank is
    the largest number of groups of any quantized layer of the model. Raises if a merged code leaves
    ``[0, 2^b − 1]``.
    """
    from gptqmodel.adapter.adapter import Lora

    inner = unwrap_model(model)
    lota = {n: m for n, m in inner.named_modules() if isinstance(m, LoTALinear)}
    if not lota:
        raise ValueError("the model carries no LoTA layer (attach_adapter(method='lota') first)")
    bases = [m.base_layer for m in lota.values()]
    rank = max(_groups(m) for m in [*bases, *(m for m in inner.modules() if is_quantized_linear(m))])
    for name, layer in lota.items():
        base = layer.base_layer
        codes, a, b = offset_lora(layer, rank)
        base.qweight.copy_(pack_codes(codes.T.contiguous(), layer.bits).to(base.qweight.device))
        base.adapter = Lora(rank=rank, path="")
        base.adapter.post_init(weight_key=name, device=base.qweight.device, lora_A=a, lora_B=b)
        _reset_kernel_caches(base)
        parent_name, _, attr = name.rpartition(".")
        setattr(inner.get_submodule(parent_name) if parent_name else inner, attr, base)
    inner.__dict__.pop("qwha_adapter_config", None)
    inner.__dict__["qwha_lota_merge_rank"] = rank
    return inner


def _reset_kernel_caches(layer: nn.Module) -> None:
    for method in ("_stream_reset_cache", "clear_weight_cache"):
        fn = getattr(layer, method, None)
        if callable(fn):
            fn()


@torch.no_grad()
def save_merged_lota(model: nn.Module, quant_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge ``model`` (quantized model from ``quant_dir`` + LoTA) in place and write the merged GPTQModel
    checkpoint to ``out_dir``: ``quant_dir``'s files with the new ``qweight`` of every adapted layer and
    the offset LoRA (``<module>.lora_A`` / ``.lora_B``, float16) of every quantized layer in the same
    safetensors shard, ``adapter`` added to ``quantize_config.json`` and ``config.json``, and
    ``lota_merge.json`` (rank, omega, source). Loads with ``GPTQModel.load`` or
    :func:`qwha.quant.pipeline.load_quantized`.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    quant_dir, out_dir = Path(quant_dir), Path(out_dir)
    inner = unwrap_model(model)
    lota = {n: m for n, m in inner.named_modules() if isinstance(m, LoTALinear)}
    shards = sorted(quant_dir.glob("*.safetensors"))
    if not (quant_dir / "quantize_config.json").is_file() or not shards:
        raise FileNotFoundError(f"{quant_dir} holds no GPTQModel checkpoint")
    state: dict[Path, dict[str, torch.Tensor]] = {}
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            state[shard] = {k: f.get_tensor(k) for k in f.keys()}
    where = {k[: -len(".qweight")]: shard for shard, t in state.items() for k in t if k.endswith(".qweight")}
    for name, layer in lota.items():
        if name not in where or not torch.equal(
            state[where[name]][f"{name}.qweight"], layer.base_layer.qweight.cpu()
        ):
            raise ValueError(f"{quant_dir} is not the quantized model under the adapter (layer {name!r})")
    config = getattr(inner, "qwha_adapter_config", None)
    merge_lota(inner)
    rank = inner.__dict__["qwha_lota_merge_rank"]
    for name, shard in where.items():
        module = inner.get_submodule(name)
        tensors = state[shard]
        adapter = getattr(module, "adapter", None)
        if name in lota:
            tensors[f"{name}.qweight"] = module.qweight.detach().cpu().contiguous()
            a, b = adapter.lora_A, adapter.lora_B
        else:
            d_in, d_out = int(module.in_features), int(module.out_features)
            a, b = torch.zeros(d_in, rank), torch.zeros(rank, d_out)
        tensors[f"{name}.lora_A"] = a.detach().to("cpu", torch.float16).contiguous()
        tensors[f"{name}.lora_B"] = b.detach().to("cpu", torch.float16).contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in quant_dir.iterdir():
        if item.suffix != ".safetensors" and item.is_file():
            shutil.copy2(item, out_dir / item.name)
    for shard, tensors in state.items():
        save_file(tensors, str(out_dir / shard.name), metadata={"format": "pt"})
    entry = {"name": "lora", "path": "", "rank": rank}
    qc = json.loads((quant_dir / "quantize_config.json").read_text())
    (out_dir / "quantize_config.json").write_text(json.dumps({**qc, "adapter": entry}, indent=2) + "\n")
    cfg_path = quant_dir / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        cfg.setdefault("quantization_config", {})["adapter"] = entry
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    index = quant_dir / "model.safetensors.index.json"
    if index.is_file():
        doc = json.loads(index.read_text())
        for name, shard in where.items():
            for t in ("lora_A", "lora_B"):
                doc["weight_map"][f"{name}.{t}"] = shard.name
        (out_dir / index.name).write_text(json.dumps(doc, indent=2) + "\n")
    info = {
        "method": "lota",
        "rank": rank,
        "lota": config.to_dict() if config is not None else None,
        "adapted_layers": sorted(lota),
        "source": str(quant_dir),
    }
    (out_dir / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


@torch.no_grad()
def write_offset_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str) -> Path:
    """Write the fractional zero-point shift of a model merged by :func:`merge_lota` as a standard PEFT
    LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) in ``out_dir``.

    Per merged layer with ``G`` groups: rank ``G``, ``lora_alpha = G`` (scaling 1), ``lora_A.weight``
    ``[G, d_in]`` the group indicator, ``lora_B.weight`` ``[d_out, G]`` = ``s·μ`` in float32 (PEFT's
    ``Δy = lora_B(lora_A(x))``); ``rank_pattern`` / ``alpha_pattern`` carry each layer's ``G``. Only
    the LoTA-adapted layers are targeted (the other layers have no offset).
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    inner = unwrap_model(model)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, module in inner.named_modules():
        adapter = getattr(module, "adapter", None)
        if not is_quantized_linear(module) or adapter is None or getattr(adapter, "lora_A", None) is None:
            continue
        g = _groups(module)
        a, b = adapter.lora_A[:, :g].float(), adapter.lora_B[:g].float()
        if not b.any():  # an unadapted layer: zero offset, nothing to store
            continue
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.T.contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.T.contiguous().cpu()
        ranks[name] = g
    if not ranks:
        raise ValueError("the model carries no merged LoTA offset (merge_lota first)")
    r = max(ranks.values())
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(ranks),
        rank_pattern={n: g for n, g in ranks.items() if g != r},
        alpha_pattern={n: g for n, g in ranks.items() if g != r},
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
        revision=None,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out
