"""Quantize a model folder into a GPTQModel checkpoint, and load such a checkpoint back.

``quantize_model`` is what the quantize stage calls; it writes GPTQModel's own output into ``out_dir``
(``model.safetensors`` with ``qweight/qzeros/scales/g_idx``, ``quantize_config.json``, ``config.json``
with its ``quantization_config``, tokenizer files, GPTQModel's ``quant_log.csv``) and returns metrics.
For ``method="none"`` nothing is quantized: ``out_dir`` receives only :data:`NONE_MARKER`, a JSON file
naming the source folder, and :func:`load_quantized` then loads the full-precision model from there
(copying a multi-GB model into the cache would buy nothing).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from qwha.quant import CALIBRATED_METHODS, QUANT_METHODS, validate
from qwha.quant.metrics import (
    ADAPTED_PROJECTIONS,
    checkpoint_weights,
    dequantized_weight,
    gram_error,
    input_grams,
    measure_run,
    quantized_linears,
    summarize,
)

NONE_MARKER = "quant_none.json"

__all__ = ["NONE_MARKER", "load_quantized", "projection_shapes", "quantize_model"]


def projection_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """``{module name: (d_out, d_in)}`` of the adapted projections, read from safetensors headers only."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, int]] = {}
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                parts = key.split(".")
                if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in ADAPTED_PROJECTIONS:
                    shape = f.get_slice(key).get_shape()
                    shapes[key[: -len(".weight")]] = (int(shape[0]), int(shape[1]))
    return shapes


def _gptq_config(bits: int, group_size: int, damp: float):
    from gptqmodel import QuantizeConfig

    # Asymmetric, static groups, no act-order (neither desc_act nor GPTQModel's default act_group_aware).
    return QuantizeConfig(
        bits=bits,
        group_size=group_size,
        sym=False,
        desc_act=False,
        act_group_aware=False,
        static_groups=True,
        damp_percent=damp,
    )


def _rtn_config(bits: int, group_size: int):
    from gptqmodel.quantization.config import RTNConfig

    return RTNConfig(bits=bits, group_size=group_size, sym=False, desc_act=False)


def quantize_model(
    model_dir: Path,
    out_dir: Path,
    calib: torch.Tensor | None,
    *,
    method: str,
    bits: int,
    group_size: int,
    damp: float = 0.01,
    magr_alpha: float = 1e-5,
    magr_iters: int = 200,
    cd_iters: int = 0,
    cd_damp: float = 0.75,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 1,
    rtn_metric_windows: int = 8,
) -> dict:
    """Quantize the model in ``model_dir`` with ``method`` and save the GPTQModel checkpoint in ``out_dir``.

    Args:
        model_dir: a transformers model folder (safetensors weights).
        out_dir: created if needed; receives GPTQModel's saved checkpoint (or the ``none`` marker).
        calib: calibration token windows ``[n, L]`` int64 (:func:`qwha.quant.calibration.sample_windows`);
            required by ``gptq``/``magr_gptq``; optional for ``rtn`` (then only used to report
            ``‖ΔW_Q X‖`` on its first ``rtn_metric_windows`` windows); ignored by ``none``.
        method: one of ``QUANT_METHODS``; bits, group_size, damp: GPTQ settings; magr_alpha,
            magr_iters: MagR settings (``magr_gptq`` only); cd_iters, cd_damp: coordinate-descent sweeps
            after GPTQ and their Gram damping (:mod:`qwha.quant.coordinate_descent`; ``gptq`` and
            ``magr_gptq``; 0 sweeps: none).
        device: where GPTQModel quantizes (``"cpu"``, ``"cuda"``, ``"cuda:0"``); dtype: dtype the
            full-precision model is loaded in for quantization (calibration forwards run in it).
        batch_size: calibration windows per forward in GPTQModel's loop.

    Returns:
        ``{"method", "bits", "group_size", ..., "wall_s", "peak_rss_mb", "peak_rss_source",
        "peak_cuda_mb", "layers": {module: {"dw_fro", "w_fro", "dw_x_fro", "w_x_fro", ...}},
        "summary": {...}}``. See :mod:`qwha.quant.metrics` for the error definitions.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if method not in QUANT_METHODS:
        raise ValueError(f"quant.method={method!r}: allowed values are {', '.join(QUANT_METHODS)}")
    shapes = projection_shapes(model_dir)
    n_windows, window_len = (int(calib.shape[0]), int(calib.shape[1])) if calib is not None else (None, None)
    validate(
        bits,
        group_size,
        sorted({d_in for _, d_in in shapes.values()}),
        n_windows,
        window_len,
        None,
        method=method,
        damp=damp,
        magr_alpha=magr_alpha,
        magr_iters=magr_iters,
        cd_iters=cd_iters,
        cd_damp=cd_damp,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    info: dict = {
        "method": method,
        "bits": bits,
        "group_size": group_size,
        "damp": damp,
        "magr_alpha": magr_alpha if method == "magr_gptq" else None,
        "magr_iters": magr_iters if method == "magr_gptq" else None,
        "cd_iters": cd_iters if method in CALIBRATED_METHODS else None,
        "cd_damp": cd_damp if method in CALIBRATED_METHODS and cd_iters > 0 else None,
        "calib_shape": [n_windows, window_len] if method != "none" and calib is not None else None,
        "device": str(device),
    }
    if method == "none":
        (out_dir / NONE_MARKER).write_text(json.dumps({"method": "none", "source": str(model_dir)}) + "\n")
        return {**info, "wall_s": 0.0, "layers": {}, "summary": {}}

    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel

    info["gptqmodel_version"] = gptqmodel.__version__
    layers: dict[str, dict[str, float]] = {}
    with measure_run(device) as stats:
        if method in CALIBRATED_METHODS:
            from qwha.quant.gptq import LayerErrorSink, MagRSettings, gptq_task_class_installed

            model = GPTQModel.load(
                str(model_dir), _gptq_config(bits, group_size, damp), device=device, dtype=dtype
            )
            rows = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in calib.long()]
            sink = LayerErrorSink()
            settings = MagRSettings(
                enabled=method == "magr_gptq",
                alpha=magr_alpha,
                iters=magr_iters,
                cd_iters=cd_iters,
                cd_damp=cd_damp,
            )
            with gptq_task_class_installed(settings, sink):
                model.quantize(rows, batch_size=batch_size, backend=BACKEND.GPTQ_TORCH)
            model.save(str(out_dir))
            layers = dict(sink.rows)
        else:
            model = GPTQModel.load(str(model_dir), _rtn_config(bits, group_size), device=device, dtype=dtype)
            model.quantize(None, backend=BACKEND.GPTQ_TORCH)
            model.save(str(out_dir))
        del model
    if method == "rtn":
        with measure_run("cpu") as metric_stats:
            layers = _checkpoint_errors(
                model_dir, out_dir, calib[:rtn_metric_windows] if calib is not None else None
            )
        info["metric_wall_s"] = metric_stats.wall_s
    return {
        **info,
        "wall_s": stats.wall_s,
        "peak_rss_mb": stats.peak_rss_mb,
        "peak_rss_source": stats.peak_rss_source,
        "peak_cuda_mb": stats.peak_cuda_mb,
        "layers": layers,
        "summary": summarize(layers),
    }


@torch.no_grad()
def _checkpoint_errors(
    model_dir: Path, out_dir: Path, windows: torch.Tensor | None
) -> dict[str, dict[str, float]]:
    """Per-layer ``‖ΔW_Q‖`` from the saved checkpoint (and ``‖ΔW_Q X‖`` over ``windows`` if given, ``X``
    the inputs of the quantized model)."""
    model = load_quantized(out_dir, device="cpu", dtype=torch.float32)
    qlins = quantized_linears(model)
    names = sorted(qlins)
    ref = checkpoint_weights(model_dir, names)
    grams = input_grams(model, names, windows) if windows is not None and len(windows) else {}
    layers: dict[str, dict[str, float]] = {}
    for name in names:
        w = ref[name]
        dw = w - dequantized_weight(qlins[name])
        row = {"dw_fro": dw.norm().item(), "w_fro": w.norm().item()}
        if name in grams:
            row["dw_x_fro"] = gram_error(dw, grams[name])
            row["w_x_fro"] = gram_error(w, grams[name])
            row["nsamples"] = float(windows.numel())
        layers[name] = row
    return layers


def load_quantized(
    out_dir: Path,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    loader: str = "transformers",
    weight_cache: bool = True,
) -> nn.Module:
    """Load a :func:`quantize_model` artifact as a transformers ``PreTrainedModel`` in eval mode.

    ``weight_cache``: let each ``TorchLinear`` keep its dequantized weight after its first inference
    forward (4 bytes per weight, the size of a float32 model; 4.9× faster KV-cache decoding). Stages
    that only score a few long windows (init and quantize perplexity) pass ``False``.

    Quantized projections come back as GPTQModel ``TorchLinear`` modules (``qweight/qzeros/scales``;
    ``dequantize_weight()`` gives ``W_Q``) with either loader, both asking GPTQModel for its torch
    kernel:
    - ``"transformers"``: ``AutoModelForCausalLM.from_pretrained`` (transformers + optimum dispatch to
      GPTQModel), any dtype; default float32, which reproduces the stored ``W_Q`` exactly;
    - ``"gptqmodel"``: ``GPTQModel.load(..., backend=GPTQ_TORCH)``; its torch kernel accepts only float16
      or bfloat16 (default bfloat16), so ``W_Q`` is rounded to that dtype.
    For a ``none`` artifact the full-precision source model is loaded (plain ``nn.Linear`` layers).
    """
    out_dir = Path(out_dir)
    if loader not in ("transformers", "gptqmodel"):
        raise ValueError(f"loader={loader!r}: allowed values are transformers, gptqmodel")
    marker = out_dir / NONE_MARKER
    if marker.exists():
        from transformers import AutoModelForCausalLM

        source = json.loads(marker.read_text())["source"]
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32, device_map=device)
        return model.eval()
    if not (out_dir / "quantize_config.json").exists():
        raise FileNotFoundError(f"{out_dir} holds no quantized model (quantize_config.json missing)")
    if loader == "gptqmodel":
        from gptqmodel import BACKEND, GPTQModel

        wrapped = GPTQModel.load(
            str(out_dir), device=device, backend=BACKEND.GPTQ_TORCH, dtype=dtype or torch.bfloat16
        )
        return eager_dequantize(wrapped.model, weight_cache).eval()
    from gptqmodel import BACKEND
    from transformers import AutoModelForCausalLM, GPTQConfig

    # Without a backend, GPTQModel's auto-selection picks TorchAtenLinear for 4-bit on CPU; ask for
    # the torch kernel (TorchLinear) so that every bit width loads as the same, trainable class.
    saved = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    override = GPTQConfig(bits=saved["bits"], backend=BACKEND.GPTQ_TORCH.value)
    model = AutoModelForCausalLM.from_pretrained(
        str(out_dir), dtype=dtype or torch.float32, device_map=device, quantization_config=override
    )
    adapter = json.loads((out_dir / "quantize_config.json").read_text()).get("adapter")
    if adapter:
        attach_checkpoint_lora(model, out_dir, adapter)
    return eager_dequantize(model, weight_cache).eval()


def attach_checkpoint_lora(model: nn.Module, out_dir: Path, adapter: dict) -> None:
    """Give each quantized layer the GPTQModel LoRA stored in the checkpoint itself.

    A ``quantize_config.json`` entry ``"adapter": {"name": "lora", "path": "", "rank": R}`` means
    ``<module>.lora_A`` ``[d_in, R]`` / ``.lora_B`` ``[R, d_out]`` live in the model's safetensors (the
    LoTA-QAF merge writes its fractional zero-point shift this way, :mod:`qwha.adapters.lota_merge`).
    ``GPTQModel.load`` applies them itself; the transformers/optimum loader drops them, so they are
    attached here with GPTQModel's own ``Lora`` (computing ``out += (x @ lora_A) @ lora_B``).
    """
    from gptqmodel.adapter.adapter import Lora
    from safetensors import safe_open

    if adapter.get("name") != "lora" or adapter.get("path") not in (None, ""):
        raise ValueError(
            f"{out_dir}: quantize_config adapter {adapter!r} is not a LoRA stored in the checkpoint"
        )
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(out_dir).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if k.endswith((".lora_A", ".lora_B"))})
    for name, module in quantized_linears(model).items():
        if f"{name}.lora_A" not in tensors:
            raise ValueError(f"{out_dir}: no {name}.lora_A although quantize_config names an adapter")
        dev = module.qweight.device
        module.adapter = Lora(rank=int(adapter["rank"]), path="")
        module.adapter.post_init(
            weight_key=name,
            device=dev,
            lora_A=tensors[f"{name}.lora_A"].to(dev),
            lora_B=tensors[f"{name}.lora_B"].to(dev),
        )


def eager_dequantize(model: nn.Module, weight_cache: bool = True) -> nn.Module:
    """Undo GPTQModel's ``torch.compile`` of ``TorchLinear.dequantize_weight`` (set in ``post_init``).

    Its guards key on each layer's cached zero-point state, so a model with hundreds of quantized layers
    recompiles per layer until dynamo's recompile limit, which made a 2k-token perplexity pass take
    minutes on CPU; the eager method computes the same values.
    """
    for module in model.modules():
        if "dequantize_weight" in vars(module):  # the compiled wrapper shadows the class method
            del module.dequantize_weight
        if hasattr(module, "enable_weight_cache"):
            # GPTQModel's TorchLinear dequantizes its packed weight on every forward unless asked to keep
            # it (keyed by dtype; never filled or read in training mode). Kept here for inference: greedy
            # decoding of the quantized SmolLM2 with KV cache went from 0.88 to 0.18 s per step (batch 8,
            # 1 thread), for 4 bytes per weight. The cache does not see edits of the packed tensors:
            # code that rewrites them calls `clear_weight_cache()` (the LoTA merge does).
            module.enable_weight_cache(weight_cache)
    return model
