"""Calibration Grams `XXᵀ` of the adapted linears, and docs/method.md §2's damping.

Conventions: a linear computes `y = W x` with `W [d_out, d_in]`; stacking the calibration tokens as
columns, `X [d_in, tokens]`; the Gram is `G = X Xᵀ = Σ_tokens x xᵀ` (a sum, not a mean) in float64.

Damping (docs/method.md §2, as in the authors' code): `G_d = G + λ I` with `λ = 1e-4 · mean(diag G)`,
eigenvalues of `G_d` clamped at 0. A PSD `G` plus `λ I` is positive definite, so the clamp only acts
when round-off made `G_d` indefinite; we therefore try a Cholesky factorisation first (cheap) and
only fall back to the eigendecomposition + clamp when it fails. The result is the same matrix the
`U Σ Uᵀ` route gives, and `R = U Σ^{1/2}` is never formed: every init works with `G_d` itself
(`‖E R‖_F² = tr(E G_d Eᵀ)`), or with any `R` such that `R Rᵀ = G_d` (the Cholesky factor).

Shared inputs: q/k/v (and gate/up) read the same tensor. The forward pre-hook keeps a reference to
the last input it saw; when the next hooked module receives that very tensor object (same Python
object, unchanged version counter) it reuses the Gram of that batch and, after the first batch,
shares the accumulator itself, so those modules' entries in the returned dict are one tensor.
Detection is by tensor identity at run time, never by module names.

Block by block (`blockwise_grams`): the inputs of the first decoder block are captured once, then each
block runs on its own over the calibration sample and hands its outputs to the next, so only one
block's Grams (and the hidden states of the sample) are held at a time: one forward's worth of
compute, like `calibration_grams`, with the same float operations in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

__all__ = [
    "blockwise_grams",
    "calibration_grams",
    "damped_gram",
    "decoder_blocks",
    "gram_factor",
    "plan_gram_passes",
    "select_target_modules",
]

DEFAULT_REL_DAMP = 1e-4


def damped_gram(xtx: Tensor, rel_damp: float = DEFAULT_REL_DAMP) -> tuple[Tensor, float]:
    """Damped Gram `G_d = G + λI`, `λ = rel_damp · mean(diag G)`, negative eigenvalues clamped.

    Args:
        xtx: `G = X Xᵀ [d_in, d_in]`, any float dtype (symmetrised and promoted to float64).
        rel_damp: relative damping (docs/method.md: 1e-4).

    Returns:
        `(G_d [d_in, d_in] float64, λ)`.
    """
    if xtx.dim() != 2 or xtx.shape[0] != xtx.shape[1]:
        raise ValueError(f"xtx: expected a square Gram [d_in, d_in], got shape {tuple(xtx.shape)}")
    g = xtx.to(torch.float64)
    g = 0.5 * (g + g.transpose(0, 1))
    lam = float(rel_damp * g.diagonal().mean())
    if not lam > 0.0:
        raise ValueError(
            "xtx: the Gram has a non-positive mean diagonal (no calibration data reached this layer?)"
        )
    gd = g + lam * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    _, info = torch.linalg.cholesky_ex(gd)
    if int(info) == 0:
        return gd, lam
    evals, evecs = torch.linalg.eigh(gd)
    return (evecs * evals.clamp_min(0.0)) @ evecs.transpose(0, 1), lam


def gram_factor(gd: Tensor) -> Tensor:
    """A factor `R [d_in, d_in]` with `R Rᵀ = G_d` (lower Cholesky; eigen route if that fails).

    `‖E R‖_F` does not depend on which such `R` is used (two factors differ by an orthogonal
    matrix on the right), so this can stand in for docs/method.md's `U Σ^{1/2}`.
    """
    chol, info = torch.linalg.cholesky_ex(gd)
    if int(info) == 0:
        return chol
    evals, evecs = torch.linalg.eigh(gd)
    return evecs * evals.clamp_min(0.0).sqrt()


def select_target_modules(model: nn.Module, target_modules: Iterable[str]) -> dict[str, nn.Module]:
    """Modules of `model` whose name equals, or ends with `.` + , an entry of `target_modules`."""
    targets = list(target_modules)
    found = {}
    for name, module in model.named_modules():
        if not name:
            continue
        if any(name == t or name.endswith("." + t) for t in targets):
            if not hasattr(module, "in_features"):
                raise ValueError(f"target_modules: {name} matched but is not a linear layer (no in_features)")
            found[name] = module
    if not found:
        raise ValueError(f"target_modules: none of {targets} matched a module of the model")
    return found


class _GramAccumulator:
    """Forward pre-hooks that add `xᵀx` of every hooked input into float64 accumulators."""

    def __init__(self, modules: dict[str, nn.Module], product_dtype: torch.dtype, store_device):
        self.modules = modules
        self.product_dtype = product_dtype
        self.store_device = store_device
        self.grams: dict[str, Tensor] = {}
        self.alias_of: dict[str, str] = {}  # module -> module whose accumulator it shares
        self._last_input: Tensor | None = None
        self._last_version = -1
        self._last_gram: Tensor | None = None
        self._last_owner: str | None = None
        self._added: set[str] = set()  # accumulators already updated with the cached batch Gram
        self._handles = []

    def __enter__(self):
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._forget()

    def _forget(self):
        self._last_input = None
        self._last_gram = None
        self._last_owner = None
        self._added = set()

    def _make_hook(self, name: str):
        def hook(module, args):
            x = args[0] if args else None
            if not isinstance(x, Tensor):
                raise RuntimeError(f"calibration_grams: {name} was called without a tensor input")
            self._accumulate(name, x)

        return hook

    def _accumulate(self, name: str, x: Tensor) -> None:
        shared = x is self._last_input and x._version == self._last_version
        if not shared:
            flat = x.detach().reshape(-1, x.shape[-1]).to(self.product_dtype)
            gram = (flat.transpose(0, 1) @ flat).to(device=self.store_device, dtype=torch.float64)
            self._last_input, self._last_version = x, x._version
            self._last_gram, self._last_owner = gram, name
            self._added = set()
        if name not in self.grams:
            if shared and self._last_owner in self.grams and name not in self.alias_of:
                # First time this module is seen and it reads the same tensor as the owner:
                # share the owner's accumulator (the batch Gram is already in there).
                owner = self.alias_of.get(self._last_owner, self._last_owner)
                self.grams[name] = self.grams[owner]
                self.alias_of[name] = owner
                return
            self.grams[name] = torch.zeros_like(self._last_gram)
        owner = self.alias_of.get(name, name)
        if name in self.alias_of:
            if not shared or self.alias_of.get(self._last_owner, self._last_owner) != owner:
                raise RuntimeError(
                    f"calibration_grams: {name} shared its input with {owner} in batch 1 but not later"
                )
        if owner not in self._added:
            self.grams[owner] += self._last_gram
            self._added.add(owner)


def calibration_grams(
    model: nn.Module,
    calib: Tensor,
    target_modules: Iterable[str],
    *,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    modules: Iterable[str] | None = None,
    product_dtype: torch.dtype = torch.float64,
    store_device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """`X Xᵀ` (sum over tokens, float64) of the input of every adapted linear of `model`.

    One plain forward pass of the (full-precision) model per batch with forward pre-hooks; no
    activation is stored, only one `[d_in, d_in]` float64 accumulator per distinct input (layers that
    read the same tensor, q/k/v and gate/up in Llama, share one; see the module docstring).

    Memory: `Σ_distinct inputs 8·d_in²` bytes on `store_device` (SmolLM2-135M: ≈0.8 GB); pass
    `modules` (a subset of the names) to split a big model's layers over several passes.

    Args:
        model: a causal LM taking `input_ids` (a transformers model); run under no_grad (inference
            tensors carry no version counter, which the sharing check reads).
        calib: token ids `[n, L]` (LongTensor), every token counts (no padding).
        target_modules: projection names, e.g. `["q_proj", "k_proj", ...]` (suffix match).
        batch_size: sequences per forward.
        device: where the forward runs (default: the device of the model's first parameter).
        modules: optional subset of matched module names to hook.
        product_dtype: dtype of the per-batch `xᵀx` product (float64 default; float32 is faster,
            the accumulation across batches is float64 either way).
        store_device: where the accumulators live.

    Returns:
        `{module name: G [d_in, d_in] float64}`; entries of modules sharing an input are one tensor.
    """
    _check_calibration(calib, batch_size)
    hooked = select_target_modules(model, target_modules)
    if modules is not None:
        wanted = list(modules)
        missing = [m for m in wanted if m not in hooked]
        if missing:
            raise ValueError(f"modules: {missing} are not target modules of the model")
        hooked = {m: hooked[m] for m in wanted}
    if device is None:
        device = next(model.parameters()).device
    acc = _GramAccumulator(hooked, product_dtype, torch.device(store_device))
    was_training = model.training
    model.eval()
    # The decoder alone reaches every hooked projection; skipping the LM head saves the logits, the
    # largest activation of a small model (batch 4 × 512 tokens × 49,152 vocab in float32 = 0.4 GB
    # for SmolLM2). Models without a separate decoder run whole.
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    if decoder is None or any(not _contains(decoder, m) for m in hooked.values()):
        decoder = model
    try:
        with acc, torch.no_grad():
            for start in range(0, calib.shape[0], batch_size):
                batch = calib[start : start + batch_size].to(device=device, dtype=torch.long)
                decoder(input_ids=batch, use_cache=False)
                acc._forget()
    finally:
        model.train(was_training)
    missing = [m for m in hooked if m not in acc.grams]
    if missing:
        raise RuntimeError(f"calibration_grams: no input reached {missing[:3]}...")
    return dict(acc.grams)


def _check_calibration(calib: Tensor, batch_size: int) -> None:
    if calib.dim() != 2 or calib.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"calib: expected token ids LongTensor [n, L], got {calib.dtype} {tuple(calib.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")


def _contains(root: nn.Module, module: nn.Module) -> bool:
    return any(m is module for m in root.modules())


def plan_gram_passes(model: nn.Module, target_modules: Iterable[str], max_bytes: int) -> list[list[str]]:
    """Split the target modules, in model order, into groups whose Grams fit in `max_bytes`.

    Each group is one `calibration_grams(..., modules=group)` pass over the calibration data.
    The estimate counts `8·d_in²` bytes per module (no sharing assumed, so it is an upper bound;
    q/k/v actually share one Gram). A single module larger than `max_bytes` gets a group of its own.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes: must be > 0, got {max_bytes}")
    groups: list[list[str]] = [[]]
    used = 0
    for name, module in select_target_modules(model, target_modules).items():
        size = 8 * int(module.in_features) ** 2
        if groups[-1] and used + size > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


class _BlockInputsCaptured(Exception):
    """Raised by the capture hook to stop the forward at the first decoder block."""


def decoder_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The stack of decoder blocks of a transformers causal LM, if each block can run on its own.

    That is ``model.get_decoder().layers`` (Llama, Mistral, Qwen, Gemma, Phi-3, ...) when every block
    gets the same attention mask: models mixing attention types (``config.layer_types`` with both
    sliding-window and full layers) pass each block its own mask, so they return ``None`` and the
    caller falls back to whole-model passes.
    """
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    blocks = getattr(decoder, "layers", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        return None
    layer_types = getattr(getattr(model, "config", None), "layer_types", None)
    if layer_types is not None and len(set(layer_types)) > 1:
        return None
    if len({getattr(b, "attention_type", None) for b in blocks}) > 1:
        return None
    return blocks


def blockwise_grams(
    model: nn.Module,
    calib: Tensor,
    target_modules: Iterable[str],
    *,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    product_dtype: torch.dtype = torch.float64,
    store_device: torch.device | str = "cpu",
) -> Iterator[dict[str, Tensor]]:
    """`calibration_grams`, one decoder block at a time: yield each block's `{module: X Xᵀ}`.

    The first block's inputs (hidden states and the keyword arguments the decoder passes, such as
    rotary embeddings and the mask) are captured per batch; then block `i` runs over every batch,
    its targets' Grams are yielded, and its outputs become block `i + 1`'s inputs. Memory: the
    calibration hidden states (`tokens · hidden` in the model's dtype) plus one block's Grams.
    Blocks without a target still run (their outputs feed the next block) but yield nothing. The
    model stays in eval mode until the generator is exhausted or closed.

    Raises:
        ValueError: the model has no uniform stack of decoder blocks (see `decoder_blocks`), or a
            target module lies outside the blocks; use `calibration_grams` for such models.
    """
    _check_calibration(calib, batch_size)
    blocks = decoder_blocks(model)
    if blocks is None:
        raise ValueError("blockwise_grams: the model has no uniform stack of decoder blocks")
    hooked = select_target_modules(model, target_modules)
    per_block: list[dict[str, nn.Module]] = [{} for _ in blocks]
    owner = {id(m): i for i, block in enumerate(blocks) for m in block.modules()}
    for name, module in hooked.items():
        if id(module) not in owner:
            raise ValueError(f"blockwise_grams: target {name} is not inside a decoder block")
        per_block[owner[id(module)]][name] = module
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        # no_grad only around the compute: a context left open across `yield` would switch autograd
        # off in the caller's code too.
        with torch.no_grad():
            states = _capture_block_inputs(model, blocks[0], calib, batch_size, device)
        for i, block in enumerate(blocks):
            acc = _GramAccumulator(per_block[i], product_dtype, torch.device(store_device))
            with acc, torch.no_grad():
                for j, (hidden, args, kwargs) in enumerate(states):
                    out = block(hidden, *args, **kwargs)
                    acc._forget()
                    states[j] = (out[0] if isinstance(out, tuple) else out, args, kwargs)
            if per_block[i]:
                missing = [m for m in per_block[i] if m not in acc.grams]
                if missing:
                    raise RuntimeError(f"blockwise_grams: no input reached {missing[:3]}")
                yield dict(acc.grams)
            del acc
    finally:
        model.train(was_training)


def _capture_block_inputs(model, first_block, calib, batch_size, device) -> list[tuple[Tensor, tuple, dict]]:
    """Per calibration batch, the `(hidden_states, other args, kwargs)` the first block receives."""
    captured: list[tuple[Tensor, tuple, dict]] = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, tuple(args[1:]), kwargs))
        raise _BlockInputsCaptured

    decoder = model.get_decoder()
    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, calib.shape[0], batch_size):
            batch = calib[start : start + batch_size].to(device=device, dtype=torch.long)
            try:
                decoder(input_ids=batch, use_cache=False)
            except _BlockInputsCaptured:
                pass
            else:
                raise RuntimeError("blockwise_grams: the decoder never called its first block")
    finally:
        handle.remove()
    return captured
