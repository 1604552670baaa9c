"""Quantization: MagR + GPTQ through GPTQModel, RTN and no-quantization baselines.

Light on imports on purpose: :func:`validate` and the constants must be usable before torch models or
GPTQModel are loaded. :func:`quantize_model` and :func:`load_quantized` live in ``qwha.quant.pipeline``
and are imported on first access.

Methods (``quant.method``):
- ``none``: the full-precision model, nothing quantized (the artifact is a marker naming the source).
- ``rtn``: GPTQModel's weight-only round-to-nearest (``RTNConfig``), no calibration data.
- ``gptq``: GPTQModel's GPTQ, asymmetric, static groups, no act-order, damping 0.01.
- ``magr_gptq``: MagR on every layer's weight, with that layer's GPTQ Hessian, right before GPTQ.
Both calibrated methods take ``cd_iters`` sweeps of coordinate-descent re-rounding after GPTQ (the
authors' variant, :mod:`qwha.quant.coordinate_descent`).
"""

from __future__ import annotations

from typing import Any

from qwha.quant.calibration import check_sample_size

QUANT_METHODS = ("none", "rtn", "gptq", "magr_gptq")
BITS = (2, 3, 4, 8)
# Group sizes GPTQModel's TorchLinear kernel accepts (-1: one group per output channel).
GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)
CALIBRATED_METHODS = ("gptq", "magr_gptq")

__all__ = [
    "BITS",
    "CALIBRATED_METHODS",
    "GROUP_SIZES",
    "QUANT_METHODS",
    "input_widths",
    "load_quantized",
    "quantize_model",
    "validate",
]


def validate(
    bits: int,
    group_size: int,
    widths: list[int],
    n_windows: int | None,
    window_len: int | None,
    n_tokens: int | None,
    *,
    method: str = "magr_gptq",
    damp: float = 0.01,
    magr_alpha: float = 1e-5,
    magr_iters: int = 200,
    cd_iters: int = 0,
    cd_damp: float = 0.75,
) -> None:
    """Raise a one-line ValueError naming the offending key if the quantization request is invalid.

    Args:
        bits, group_size: ``quant.bits`` / ``quant.group_size``.
        widths: input widths ``d_in`` of every layer to be quantized (e.g. hidden and intermediate size).
        n_windows, window_len: calibration sample shape ``[n, L]``; n_tokens: tokens in the calibration
            text. All three are ignored (may be None) for methods that use no calibration.
        method: one of :data:`QUANT_METHODS`; damp, magr_alpha, magr_iters: GPTQ / MagR settings;
            cd_iters, cd_damp: coordinate-descent sweeps after GPTQ and their Gram damping.

    Meant to run before any model is loaded: it reads no files.
    """
    if method not in QUANT_METHODS:
        raise ValueError(f"quant.method={method!r}: allowed values are {', '.join(QUANT_METHODS)}")
    if method == "none":
        return
    if bits not in BITS:
        raise ValueError(f"quant.bits={bits}: allowed values are {', '.join(map(str, BITS))}")
    if group_size not in GROUP_SIZES:
        raise ValueError(
            f"quant.group_size={group_size}: allowed values are {', '.join(map(str, GROUP_SIZES))}"
        )
    if group_size > 0:
        bad = sorted({w for w in widths if w % group_size})
        if bad:
            raise ValueError(
                f"quant.group_size={group_size} does not divide the layer input width(s) "
                f"{', '.join(map(str, bad))}; choose a group size dividing every d_in"
            )
    if method not in CALIBRATED_METHODS:
        return
    if not 0 < damp < 1:
        raise ValueError(f"quant.damp={damp}: must lie in (0, 1)")
    if isinstance(cd_iters, bool) or not isinstance(cd_iters, int) or cd_iters < 0:
        raise ValueError(f"quant.cd_iters={cd_iters!r}: must be an integer >= 0 (sweeps; 0 = none)")
    if cd_iters > 0 and not cd_damp > 0:
        raise ValueError(f"quant.cd_damp={cd_damp}: must be > 0 (fraction of the Gram's mean diagonal)")
    if method == "magr_gptq":
        if not magr_alpha > 0:
            raise ValueError(f"quant.magr_alpha={magr_alpha}: must be > 0")
        if magr_iters < 0:
            raise ValueError(f"quant.magr_iters={magr_iters}: must be >= 0")
    if n_windows is None or window_len is None:
        raise ValueError(f"quant.method={method} needs a calibration sample (quant.calib_windows/calib_len)")
    # Without a token count (sample already drawn) only the shape is checked: n_tokens := n · L.
    check_sample_size(n_windows * window_len if n_tokens is None else n_tokens, n_windows, window_len)


def input_widths(config: dict) -> list[int]:
    """Input widths ``d_in`` of the adapted projections of a Llama-style model, from its ``config.json``
    (as a dict): ``hidden_size`` (q/k/v, gate/up), ``num_attention_heads · head_dim`` (o_proj) and
    ``intermediate_size`` (down_proj). For :func:`validate` before any weights are read."""
    hidden = int(config["hidden_size"])
    heads = int(config.get("num_attention_heads", 1))
    head_dim = int(config.get("head_dim") or hidden // heads)
    return sorted({hidden, heads * head_dim, int(config["intermediate_size"])})


def __getattr__(name: str) -> Any:
    if name in ("quantize_model", "load_quantized"):
        from qwha.quant import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'qwha.quant' has no attribute {name!r}")
