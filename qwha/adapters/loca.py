"""LoCA's location learning (Du et al., ICLR 2025, arXiv 2502.06820) for the sparse spectral adapter.

LoCA trains a 2-D DCT adapter ``ΔW = s · C_out F C_inᵀ`` whose ``p`` coefficients start at random
locations with value zero (``init=random_zero``, ``adapter=dct2d``) and, during the first part of
training, also MOVE: the locations are continuous parameters ``u ∈ [0, 1]²`` per coefficient, the cell
used is ``(round(u_r (d_out − 1)), round(u_c (d_in − 1)))``, and their gradient is estimated by a
central finite difference of the loss across the neighbouring cells. With ``K = ∂L/∂F`` (the dense
gradient of the loss with respect to the spectrum, ``s · (g C_out)ᵀ (x C_in)`` summed over tokens
for layer input ``x`` and output gradient ``g``) and a coefficient of value ``c`` at ``(r, k)``:

    ∂L/∂row ≈ ½ · c · (K[r + 1, k] − K[r − 1, k]),     ∂L/∂col ≈ ½ · c · (K[r, k + 1] − K[r, k − 1])

(first-order change of the loss when the coefficient moves one cell either way; at an edge the
missing neighbour is the cell itself), each clamped to ``[−grad_clip, grad_clip]`` and multiplied by
``d − 1`` (the chain rule through ``u ↦ u (d − 1)``), then an Adam step on ``u`` with ``location_lr``.

Alternating schedule over optimizer steps ``t = 0, 1, ...`` (``B_a = coef_steps``,
``B_l = location_steps``, ``B_s = ⌊learn_fraction · total steps⌋``): step 0 and every step with
``t mod (B_a + B_l) < B_a`` train the coefficients (locations fixed); the other steps before ``B_s``
train the locations (coefficients frozen: their gradient is dropped, so AdamW neither moves them
nor advances their moments); from ``B_s`` on only coefficients train. This is the schedule of the
authors' code (``B_a = 10``, ``B_l = 20``, ``lr_positions = 1e-4``).

Deviations, each because the authors' choice does not fit this project's adapter:
* the schedule counts optimizer steps (the authors' code counts forward calls, i.e. micro-batches);
* ``u`` is clamped to ``[0, 1]`` (the authors clamp to ``[0, 0.999]`` before scaling, which for
  ``d > 500`` makes the last row/column unreachable);
* a move onto a cell that another coefficient holds after the step is not taken (that coefficient
  stays and its ``u`` snaps back to its cell): this adapter stores distinct locations, while the
  authors' dense scatter would add the two values;
* the location Adam has a constant learning rate and no weight decay.

The dense ``K`` of one layer lives only inside that layer's backward hook (one ``d_out × d_in``
product, as the authors' DCT of the dense gradient); what persists is ``[p, 4]`` per layer. Under
DDP the finite-difference sums are averaged over processes (as DDP averages gradients) before the
location step. Location steps hold each
adapted layer's input until its backward (already the case without gradient checkpointing).

``LocationLearner`` is the trainer's step hook (``qwha.finetune.trainer.train(step_hook=...)``):
``before_step`` arms the capture on location steps, ``before_optimizer`` turns the sums into a
location step and drops the coefficients' gradient, ``state_dict`` / ``load_state_dict`` go into the
checkpoint (locations are buffers, not trainable tensors, so the trainer would not save them).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qwha.adapters.base import unwrap_model
from qwha.adapters.wha import WHALinear
from qwha.transforms import apply_transform

log = logging.getLogger("qwha.adapters.loca")

__all__ = ["LoCAConfig", "LocationLearner", "location_learner", "neighbour_cells"]

COEFFICIENTS, LOCATIONS = "coefficients", "locations"
_BETAS, _EPS = (0.9, 0.999), 1e-8


@dataclass(frozen=True)
class LoCAConfig:
    """The ``adapter.loca`` keys (``conf/adapter/dct2d.yaml`` documents them)."""

    enabled: bool = False
    coef_steps: int = 10  # B_a
    location_steps: int = 20  # B_l
    learn_fraction: float = 0.1  # B_s as a fraction of the run's optimizer steps
    location_lr: float = 1e-4
    grad_clip: float = 1.0

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> LoCAConfig:
        """Read and check the keys; a bad value raises ``ValueError`` with one line naming it."""
        known = set(cls.__dataclass_fields__)
        extra = sorted(set(m) - known)
        if extra:
            raise ValueError(
                f"adapter.loca.{extra[0]} is unknown: allowed keys are {', '.join(sorted(known))}"
            )
        cfg = cls(**{k: m[k] for k in known if k in m})
        if not isinstance(cfg.enabled, bool):
            raise ValueError(f"adapter.loca.enabled={cfg.enabled!r} must be true or false")
        for key in ("coef_steps", "location_steps"):
            v = getattr(cfg, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"adapter.loca.{key}={v!r} must be a positive integer")
        if not isinstance(cfg.learn_fraction, int | float) or not 0 <= cfg.learn_fraction <= 1:
            raise ValueError(f"adapter.loca.learn_fraction={cfg.learn_fraction!r} must be in [0, 1]")
        for key in ("location_lr", "grad_clip"):
            v = getattr(cfg, key)
            if not isinstance(v, int | float) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"adapter.loca.{key}={v!r} must be a positive number")
        return cfg

    def learn_until(self, total_steps: int) -> int:
        """``B_s``: the first optimizer step from which locations stay fixed."""
        return int(math.floor(self.learn_fraction * total_steps))

    def phase(self, step: int, total_steps: int) -> str:
        """What optimizer step ``step`` (0-based) trains: ``"coefficients"`` or ``"locations"``."""
        if step == 0 or step >= self.learn_until(total_steps):
            return COEFFICIENTS
        return COEFFICIENTS if step % (self.coef_steps + self.location_steps) < self.coef_steps else LOCATIONS


def neighbour_cells(rows: torch.Tensor, cols: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    """Flat cells ``[p, 4]``: (r+1, k), (r−1, k), (r, k+1), (r, k−1); a missing edge neighbour is (r, k)."""
    up = torch.clamp(rows + 1, max=d_out - 1)
    down = torch.clamp(rows - 1, min=0)
    right = torch.clamp(cols + 1, max=d_in - 1)
    left = torch.clamp(cols - 1, min=0)
    return torch.stack((up * d_in + cols, down * d_in + cols, rows * d_in + right, rows * d_in + left), dim=1)


class LocationLearner:
    """Learns the locations of every :class:`WHALinear` of ``model`` by LoCA's rule (module docstring).

    Per layer it keeps ``u [p, 2]`` (float32, normalised (row, col) positions, in the layer's storage
    order) and its Adam moments. ``moved`` counts the coefficients that changed cell in the last
    location step (all layers), ``total_moved`` all such changes so far.
    """

    def __init__(self, model: nn.Module, config: LoCAConfig) -> None:
        self.config = config
        inner = unwrap_model(model)
        self.layers: dict[str, WHALinear] = {
            n: m for n, m in inner.named_modules() if isinstance(m, WHALinear)
        }
        if not self.layers:
            raise ValueError(
                "adapter.loca.enabled=true needs a model with sparse (WHA-family) adapter layers"
            )
        self._u: dict[str, torch.Tensor] = {}
        self._m: dict[str, torch.Tensor] = {}
        self._v: dict[str, torch.Tensor] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._cells: dict[str, torch.Tensor] = {}
        self.adam_steps = 0
        self.moved = 0
        self.total_moved = 0
        self._total_steps: int | None = None
        self._capturing = False
        for name, layer in self.layers.items():
            self._u[name] = self._positions(layer)
            self._m[name] = torch.zeros_like(self._u[name])
            self._v[name] = torch.zeros_like(self._u[name])
        self._handles = [
            layer.register_forward_hook(self._forward_hook(n)) for n, layer in self.layers.items()
        ]

    # ---- geometry -------------------------------------------------------------------------------
    @staticmethod
    def _extent(layer: WHALinear) -> torch.Tensor:
        return torch.tensor([layer.out_features - 1, layer.in_features - 1], dtype=torch.float32)

    def _positions(self, layer: WHALinear) -> torch.Tensor:
        """``u`` that rounds to the layer's current cells (``cell / (d − 1)``; 0 for a width of 1)."""
        idx = layer.indices().to(torch.float32)
        ext = self._extent(layer).to(idx.device)
        return torch.where(ext > 0, idx / ext.clamp_min(1), torch.zeros_like(idx))

    def _sync_device(self, name: str) -> None:
        dev = self.layers[name].wha_c.device
        if self._u[name].device != dev:
            for d in (self._u, self._m, self._v):
                d[name] = d[name].to(dev)

    # ---- the trainer's step hook ----------------------------------------------------------------
    def before_step(self, step: int, total_steps: int) -> None:
        """Before the forward passes of optimizer step ``step``: capture on location steps."""
        if self._total_steps != total_steps:
            self._total_steps = total_steps
            n = sum(self.config.phase(t, total_steps) == LOCATIONS for t in range(total_steps))
            (log.info if n else log.warning)(
                "LoCA: %d location steps of %d (B_a = %d, B_l = %d, B_s = %d)%s",
                *(n, total_steps, self.config.coef_steps, self.config.location_steps),
                self.config.learn_until(total_steps),
                "" if n else ": the locations stay fixed in this run",
            )
        self._capturing = self.config.phase(step, total_steps) == LOCATIONS
        if not self._capturing:
            return
        for name, layer in self.layers.items():
            self._sync_device(name)
            idx = layer.indices()
            self._cells[name] = neighbour_cells(idx[:, 0], idx[:, 1], layer.out_features, layer.in_features)
            self._sums[name] = torch.zeros(layer.budget, 4, dtype=torch.float32, device=layer.wha_c.device)

    def _forward_hook(self, name: str):
        def hook(module: WHALinear, args: tuple, output: torch.Tensor) -> None:
            if not self._capturing or not torch.is_grad_enabled() or not output.requires_grad:
                return
            x = args[0].detach()
            output.register_hook(lambda g: self._accumulate(name, module, x, g))

        return hook

    @torch.no_grad()
    def _accumulate(self, name: str, layer: WHALinear, x: torch.Tensor, g: torch.Tensor) -> None:
        """Add ``K = ∂L/∂F`` at the coefficients' four neighbour cells: ``K = s (g T_out)ᵀ (x T_in)``."""
        x2 = x.reshape(-1, layer.in_features).float()
        g2 = g.reshape(-1, layer.out_features).float()
        xt = apply_transform(x2, layer.transform, dim=1)
        gt = apply_transform(g2, layer.transform, dim=1) if layer.dims == 2 else g2
        k = (gt.T @ xt).reshape(-1)
        self._sums[name] += k[self._cells[name]] * layer.scale

    def location_gradients(self, name: str) -> torch.Tensor:
        """The finite-difference gradient with respect to ``u`` ``[p, 2]`` from the captured sums."""
        layer, cfg = self.layers[name], self.config
        sums = self._sums[name]
        c = layer.wha_c.detach().float().unsqueeze(1)
        fd = 0.5 * c * torch.stack((sums[:, 0] - sums[:, 1], sums[:, 2] - sums[:, 3]), dim=1)
        return fd.clamp(-cfg.grad_clip, cfg.grad_clip) * self._extent(layer).to(fd.device)

    def before_optimizer(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        """After the backward passes: on a location step, move the locations and freeze ``c``."""
        if not self._capturing:
            return
        self._capturing = False
        _all_reduce([self._sums[n] for n in self.layers])
        self.adam_steps += 1
        self.moved = 0
        for name, layer in self.layers.items():
            self._adam(name, self.location_gradients(name))
            self.moved += self._move(name, layer, optimizer)
            layer.wha_c.grad = None  # coefficients are frozen on location steps
        self._sums.clear()
        self._cells.clear()
        self.total_moved += self.moved
        log.debug("LoCA location step %d: %d coefficients changed cell", step + 1, self.moved)
        if self._total_steps is not None and self.config.phase(step + 1, self._total_steps) != LOCATIONS:
            log.info("LoCA: after step %d, %d location changes so far", step + 1, self.total_moved)

    def _adam(self, name: str, grad: torch.Tensor) -> None:
        (b1, b2), t = _BETAS, self.adam_steps
        m, v = self._m[name], self._v[name]
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        step = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + _EPS)
        self._u[name] = (self._u[name] - self.config.location_lr * step).clamp_(0.0, 1.0)

    @torch.no_grad()
    def _move(self, name: str, layer: WHALinear, optimizer) -> int:
        """Round ``u`` to cells, keep locations distinct, re-sort storage; returns how many moved."""
        d_in = layer.in_features
        ext = self._extent(layer).to(self._u[name].device)
        old = layer.indices().to(self._u[name].device)
        new = torch.round(self._u[name] * ext).long()
        new = torch.minimum(new, ext.long())
        old_flat = old[:, 0] * d_in + old[:, 1]
        new_flat = new[:, 0] * d_in + new[:, 1]
        while True:  # a move onto a cell that is taken after the step is not made
            counts = torch.zeros(layer.out_features * d_in, dtype=torch.int64, device=new_flat.device)
            counts.index_add_(0, new_flat, torch.ones_like(new_flat))
            clash = (counts[new_flat] > 1) & (new_flat != old_flat)
            if not bool(clash.any()):
                break
            new_flat = torch.where(clash, old_flat, new_flat)
            self._u[name][clash] = old[clash].float() / ext.clamp_min(1)
        moved = int((new_flat != old_flat).sum())
        if moved == 0:
            return 0
        order = torch.argsort(new_flat)
        layer.wha_c.copy_(layer.wha_c[order])
        for d in (self._u, self._m, self._v):
            d[name] = d[name][order]
        state = optimizer.state.get(layer.wha_c, {}) if optimizer is not None else {}
        for key, value in state.items():  # AdamW's moments follow their coefficient
            if torch.is_tensor(value) and value.shape == layer.wha_c.shape:
                state[key] = value[order]
        layer.wha_indices.copy_(new_flat[order].to(layer.wha_indices.dtype))
        return moved

    # ---- checkpoint -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Locations, ``u`` and its Adam moments per layer (CPU tensors), the Adam step count and
        ``total_moved``."""
        layers = {
            n: {
                "indices": layer.wha_indices.detach().cpu().clone(),
                "u": self._u[n].cpu().clone(),
                "m": self._m[n].cpu().clone(),
                "v": self._v[n].cpu().clone(),
            }
            for n, layer in self.layers.items()
        }
        return {"adam_steps": self.adam_steps, "total_moved": self.total_moved, "layers": layers}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if state is None or set(state.get("layers", {})) != set(self.layers):
            raise ValueError("the checkpoint has no LoCA location state for this model's adapter layers")
        self.adam_steps = int(state["adam_steps"])
        self.total_moved = int(state.get("total_moved", 0))
        for n, layer in self.layers.items():
            s = state["layers"][n]
            if s["indices"].shape != layer.wha_indices.shape:
                raise ValueError(
                    f"checkpoint LoCA state: {n} has {s['indices'].numel()} locations, not {layer.budget}"
                )
            layer.wha_indices.copy_(s["indices"].to(layer.wha_indices.device))
            dev = layer.wha_c.device
            self._u[n], self._m[n], self._v[n] = (s[k].to(dev).float() for k in ("u", "m", "v"))

    def remove(self) -> None:
        """Detach the forward hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []


def _all_reduce(tensors: list[torch.Tensor]) -> None:
    """Average over processes, as DDP averages gradients (each rank's loss is scaled by the world size)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)
            t.div_(dist.get_world_size())


def location_learner(model: nn.Module, adapter_cfg: Mapping[str, Any]) -> LocationLearner | None:
    """The step hook for ``adapter.loca`` (None unless ``adapter.loca.enabled``)."""
    loca = adapter_cfg.get("loca") if adapter_cfg is not None else None
    if loca is None:
        return None
    cfg = LoCAConfig.from_mapping(dict(loca))
    return LocationLearner(model, cfg) if cfg.enabled else None
