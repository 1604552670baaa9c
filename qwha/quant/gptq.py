"""GPTQ through GPTQModel, with MagR run on each layer's weight right before GPTQ quantizes it.

Everything GPTQ is GPTQModel's own: its layer-by-layer looper, Hessian capture, GPTQ solver, packing and
checkpoint format. This module adds two things at the one place where a layer's weight and its
calibration statistics meet — the per-module task object (``gptqmodel.quantization.gptq.GPTQ``) whose
``quantize()`` turns the accumulated Hessian ``H = 2 XᵀX / n`` into the quantized weight:

1. MagR (optional): ``quantize()`` first finalises ``H`` (GPTQModel's own call), runs :func:`magr` on the
   layer's weight with ``H`` as the Gram (MagR normalises it by its top eigenvalue, so the factor ``2/n``
   is irrelevant), and hands the result to GPTQ through ``module_copy`` — the attribute GPTQ's
   ``quantize()`` reads as "the weight to quantize" instead of cloning the module's weight. GPTQ then
   picks its static group grids from, and solves for, the MagR weight.
2. Coordinate descent (optional, ``cd_iters`` > 0): the authors' variant re-rounds GPTQ's codes column
   by column on GPTQ's own grid to lower ``‖(W − Ŵ) X‖`` against the ORIGINAL weight with their damped
   Gram (:mod:`qwha.quant.coordinate_descent`) and hands GPTQModel the re-rounded ``Q`` in place of
   GPTQ's; the processor packs it with the unchanged scales and zero-points.
3. Per-layer error: after GPTQ returns ``W_Q`` the task records ``‖W − W_Q‖_F`` and
   ``‖(W − W_Q) X‖_F = sqrt(n/2 · tr(ΔW H ΔWᵀ))`` against the ORIGINAL weight ``W`` (what an adapter
   must correct), with ``X`` the calibration inputs GPTQ saw for that layer (outputs of the already
   quantized layers before it, GPTQ's sequential setting).

Why a patch: GPTQModel 7.6.0 offers no public hook between Hessian capture and the GPTQ solve. Its
``LoopExtension`` only observes finished steps, its ``subset_callback`` receives module names but no
Hessian, and ``QuantizeConfig.preprocessors`` is a closed set of weight-only transforms that never see
calibration data. ``GPTQProcessor.preprocess`` builds each task as ``GPTQ(module=..., qcfg=...)`` from
its module namespace, so :func:`gptq_task_class` swaps that ONE name for a subclass for the duration of
one ``quantize()`` call and restores it afterwards. The swap also keeps GPTQModel's shared-input
Hessian dedup (q/k/v, gate/up share one capture), which tests ``type(task) is GPTQ`` against the same
name.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from qwha.quant.coordinate_descent import coordinate_descent, grid_codes
from qwha.quant.magr import magr
from qwha.quant.metrics import gram_error

log = logging.getLogger("qwha.quant")


@dataclass(frozen=True)
class MagRSettings:
    """Options applied inside the GPTQ task: MagR before the solve (``enabled=False``: plain GPTQ, errors
    still recorded) and ``cd_iters`` coordinate-descent sweeps after it (0: none)."""

    enabled: bool
    alpha: float = 1e-5
    iters: int = 200
    cd_iters: int = 0
    cd_damp: float = 0.75


class LayerErrorSink:
    """Thread-safe collector of per-layer statistics written by the GPTQ tasks (GPTQModel may run
    several modules of a layer in worker threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rows: dict[str, dict[str, float]] = {}

    def put(self, name: str, row: dict[str, float]) -> None:
        with self._lock:
            self.rows[name] = row


def _as_stored(
    w_q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor
) -> torch.Tensor:
    """GPTQ's ``W_Q`` [d_out, d_in] as the checkpoint will hold it: integer codes with float16 scales.

    GPTQ computes its grid with float32 scales; the GPTQ format stores them as float16, so the weight a
    loader reconstructs differs by that rounding (≈ 2⁻¹¹ of a scale). Errors are reported for the stored
    weight, which is what the adapters are trained on.
    """
    g = g_idx.long().to(w_q.device)
    s = scale.float().to(w_q.device)[:, g]
    z = zero.float().to(w_q.device)[:, g]
    codes = torch.round(w_q / s + z)
    return (codes - z) * s.half().float()


def _group_linf(w: torch.Tensor, group_size: int) -> float:
    """Mean over (channel, group) of the group's max |w| (``w`` ``[d_out, d_in]``)."""
    d_out, d_in = w.shape
    g = d_in if group_size in (-1, 0) else group_size
    return w.abs().view(d_out, d_in // g, g).amax(-1).mean().item()


def gptq_task_class(settings: MagRSettings, sink: LayerErrorSink):
    """A subclass of GPTQModel's ``GPTQ`` task bound to ``settings`` and ``sink``."""
    from gptqmodel.quantization.gptq import GPTQ

    class MagRGPTQ(GPTQ):
        """GPTQModel's GPTQ task; MagR on the weight before the solve; per-layer error after it."""

        def quantize(self, blocksize: int = 128):
            if isinstance(self.module, nn.Embedding) or self._tp_pad_cols:
                return super().quantize(blocksize=blocksize)
            target = getattr(self.module, "target_device", None)
            h = self.finalize_hessian(target_device=target).clone()
            nsamples = int(self.nsamples)
            w = self.clone_module(device=h.device)
            # H = 2XᵀX/n, so ‖ΔW X‖_F = sqrt(tr(ΔW H ΔWᵀ)) · sqrt(n/2).
            scale = math.sqrt(nsamples / 2.0)
            row: dict[str, float] = {"nsamples": float(nsamples)}
            if settings.enabled and nsamples > 0:
                start = time.perf_counter()
                w_hat = magr(w, h, self.qcfg.group_size, alpha=settings.alpha, iters=settings.iters)
                row["magr_seconds"] = time.perf_counter() - start
                row["group_linf_before"] = _group_linf(w, self.qcfg.group_size)
                row["group_linf_after"] = _group_linf(w_hat, self.qcfg.group_size)
                row["magr_dw_x_fro"] = gram_error(w_hat - w, h) * scale
                log.debug(
                    "MagR %s: %.2f s, mean group max|w| %.5f -> %.5f",
                    self.name,
                    row["magr_seconds"],
                    row["group_linf_before"],
                    row["group_linf_after"],
                )
                # GPTQ.quantize() quantizes ``module_copy`` when set (instead of cloning the weight).
                self.module_copy = w_hat
            result = super().quantize(blocksize=blocksize)
            w_q, q_scale, q_zero, g_idx = result[:4]
            w_q = w_q.to(device=w.device, dtype=torch.float32).reshape(w.shape)
            if settings.cd_iters > 0 and nsamples > 0:
                w_q = self._coordinate_descent(w, w_q, q_scale, q_zero, g_idx, h, row)
                result = (w_q.to(result[0].device, result[0].dtype).reshape(result[0].shape), *result[1:])
            dw = w - _as_stored(w_q, q_scale, q_zero, g_idx)
            row["dw_fro"] = dw.norm().item()
            row["w_fro"] = w.norm().item()
            row["dw_x_fro"] = gram_error(dw, h) * scale
            row["w_x_fro"] = gram_error(w, h) * scale
            name = self._named_module.full_name if self._named_module is not None else self.name
            sink.put(name, row)
            return result

        def _coordinate_descent(self, w, w_q, q_scale, q_zero, g_idx, h, row) -> torch.Tensor:
            """GPTQ's ``W_Q`` re-rounded by coordinate descent on its own grid (float32 scales, as GPTQ
            computed ``W_Q``; the processor packs the result with those same scales)."""
            start = time.perf_counter()
            maxq = 2**self.qcfg.bits - 1
            scale, zero = q_scale.float().to(w.device), q_zero.float().to(w.device)
            codes = grid_codes(w_q, scale, zero, g_idx.to(w.device), maxq)
            cd = coordinate_descent(
                w,
                codes,
                scale,
                zero,
                g_idx,
                h.to(w.device),
                maxq=maxq,
                sweeps=settings.cd_iters,
                damp=settings.cd_damp,
            )
            gidx = g_idx.long().to(w.device)
            row["cd_seconds"] = time.perf_counter() - start
            row["cd_sweeps"] = float(cd.sweeps)
            row["cd_changed"] = float(sum(cd.changed))
            row["cd_objective_ratio"] = cd.objective[-1] / cd.objective[0] if cd.objective[0] > 0 else 1.0
            return (cd.codes.float() - zero[:, gidx]) * scale[:, gidx]

    return MagRGPTQ


@contextlib.contextmanager
def gptq_task_class_installed(settings: MagRSettings, sink: LayerErrorSink) -> Iterator[None]:
    """Make GPTQModel's GPTQ processor build :func:`gptq_task_class` tasks inside this block."""
    import gptqmodel.looper.gptq_processor as processor_module

    # The one patch point (see the module docstring): GPTQProcessor.preprocess() instantiates
    # ``GPTQ(module=..., qcfg=...)`` by this module-level name, and its shared-input Hessian dedup checks
    # ``type(task) is GPTQ`` by the same name, so swapping it keeps both working with the subclass.
    # GPTQModel 7.6.0 has no public hook between Hessian capture and the GPTQ solve.
    original = processor_module.GPTQ
    processor_module.GPTQ = gptq_task_class(settings, sink)
    try:
        yield
    finally:
        processor_module.GPTQ = original
