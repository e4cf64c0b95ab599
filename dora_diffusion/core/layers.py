"""DoRA / LoRA wrappers around a frozen ``nn.Linear`` or ``nn.Conv2d``: a base module plus named adapters.

For adapters ``j`` at strengths ``k_j`` (see ``adapter.py`` for ``W'_j``):

    W(k) = W0 + sum_j k_j (W'_j - W0)

Three pieces, each in its own module:

- ``geometry.Geometry``: how the base kind multiplies (``A x``, ``B h``, ``W0 x``, shapes, per-channel views);
- ``adapter.Adapter``: one adapter's tensors and its formula (``norm``, ``factor``, ``scaled``, ``delta``);
- ``forward_paths.FORWARD_PATHS``: the ordered table of forward computations, first match wins.

The forward pass never forms ``W'``; ``fuse`` writes ``W(k)`` into the base weight (and ``unfuse`` restores it).
"""

from __future__ import annotations

import torch
from torch import nn

from dora_diffusion.core.adapter import Adapter, AdapterSpec, DenseAdapter, make_adapter
from dora_diffusion.core.forward_paths import Call, choose
from dora_diffusion.core.geometry import Geometry, geometry_of

__all__ = ["AdaptedLayer", "Adapter", "AdapterSpec", "DoRAConv2d", "DoRALinear", "wrap"]


class AdaptedLayer(nn.Module):
    """A base module plus any number of named DoRA/LoRA adapters (``self.adapters``).

    Wrapping changes nothing about the base module: its parameters keep their ``requires_grad`` flags (training
    code freezes what it trains against: ``inject.add_adapter``, ``training.models``), and the wrapper takes the
    base module's ``training`` mode.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer  # its parameters keep their requires_grad: whoever trains freezes them
        self.train(base_layer.training)
        self.geometry: Geometry = geometry_of(base_layer)
        self.adapters = nn.ModuleDict()
        self.disabled = False
        self.lean_training = True
        """Use the lean DoRA training functions (``dora_autograd``) where they apply; False forces plain autograd."""
        self.compile_lean = False
        """Inside ``torch.compile``, run the lean DoRA functions too (they trace without a graph break) instead of the
        ``reference`` path that inductor fuses; off by default (``benchmarks/bench_compile.py`` compares them)."""
        self.recompute_output = False
        """Lean DoRA step: keep ``x`` (already kept for ``A``'s gradient) instead of the output ``y``, and
        recompute ``W0 x + s B h`` in the backward. Worth it only when nothing downstream keeps ``y``;
        ``inject.set_recompute`` sets it by module name."""
        self.fused: dict[str, float] = {}
        self._backup: torch.Tensor | None = None
        self._bias_backup: torch.Tensor | None = None

    weight = property(lambda self: self.geometry.weight, doc="The base module's weight ``W0``.")
    in_features = property(lambda self: self.geometry.in_features, doc="Input features (Conv2d: input channels).")
    out_features = property(lambda self: self.geometry.out_features, doc="Output features (Conv2d: output channels).")

    # ------------------------------------------------------------------ adapters
    def new_adapter(
        self, name: str, spec: AdapterSpec, dropout: float = 0.0, dtype: torch.dtype = torch.float32, init: bool = True
    ) -> Adapter:
        """Create adapter ``name`` on this layer, untrained (output unchanged) and active at strength 1.

        ``init=False`` only allocates the tensors (for ``load_adapter_tensors`` to fill): no pass over W0.
        """
        if not name or "." in name:
            raise ValueError(f"adapter name {name!r} must be non-empty and contain no '.'")
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer; delete it first")
        if self.fused:
            raise RuntimeError("adapters are fused into the base weights; call unfuse() before adding one")
        self.adapters[name] = make_adapter(spec, self.geometry, dropout, dtype, init)
        return self.adapters[name]

    def load_adapter_tensors(self, name: str, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor | None = None) -> None:
        """Copy trained factors (file shapes) into adapter ``name``, checking every shape."""
        try:
            self.adapters[name].load(a, b, magnitude)
        except ValueError as err:
            raise ValueError(f"adapter {name!r}: {err}") from None

    def load_adapter_factors(
        self, name: str, factors: dict[str, torch.Tensor], magnitude: torch.Tensor | None = None
    ) -> None:
        """Copy the factors of a dense delta kind (``DenseAdapter``, file shapes) into adapter ``name``."""
        try:
            self.adapters[name].load(factors, magnitude)
        except ValueError as err:
            raise ValueError(f"adapter {name!r}: {err}") from None

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter and its parameters."""
        if name in self.fused:
            raise RuntimeError(f"adapter {name!r} is fused into the base weights; call unfuse() first")
        if name in self.adapters:
            del self.adapters[name]

    def set_active(self, weights: dict[str, float]) -> None:
        """Set which adapters run and their strengths k (adapters not on this layer are ignored)."""
        for name, adapter in self.adapters.items():
            adapter.strength = float(weights[name]) if name in weights else None

    @property
    def active(self) -> dict[str, float]:
        """``{adapter: strength}`` of the active adapters, in the order they were added."""
        return {n: a.strength for n, a in self.adapters.items() if a.strength is not None}

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def fuse(self, weights: dict[str, float] | None = None) -> None:
        """Write ``W(k)`` into the base weight for ``{adapter: k}`` (default: the active adapters).

        The original weight is kept (on the CPU) so ``unfuse`` restores it bit for bit.
        """
        if self.fused:
            raise RuntimeError("adapters are already fused; call unfuse() first")
        if self.geometry.quantized:
            raise RuntimeError(
                "the base weight is stored in float8 (--fp8_base): an adapter cannot be fused into it; run unfused, "
                "or load the adapter on a bf16/fp32 base to fuse it"
            )
        weights = {n: k for n, k in (self.active if weights is None else weights).items() if n in self.adapters}
        if not weights:
            return
        w = self.weight
        delta = sum(self.adapters[n].delta(k) for n, k in weights.items())
        bias_delta = [k * self.adapters[n].bias_delta.float() for n, k in weights.items() if _bias_delta(self.adapters[n])]
        self._backup = w.detach().to("cpu", copy=True)
        if bias_delta:
            bias = self.geometry.bias
            if bias is None:
                raise RuntimeError("an adapter changes the bias (diff_b) of a layer that has none")
            self._bias_backup = bias.detach().to("cpu", copy=True)
            bias.copy_((bias.float() + sum(bias_delta)).to(bias.dtype))
        w.copy_((w.float() + delta).to(w.dtype))
        self.fused = dict(weights)

    @torch.no_grad()
    def unfuse(self) -> None:
        """Restore the base weight saved by ``fuse`` bit for bit."""
        if not self.fused:
            return
        self.weight.copy_(self._backup.to(self.weight.device))
        if self._bias_backup is not None:
            self.geometry.bias.copy_(self._bias_backup.to(self.geometry.bias.device))
        self._backup = self._bias_backup = None
        self.fused = {}

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = Call.of(self, x)
        return choose(self, call).run(self, call).to(call.out_dtype)

    def forward_path(self, x: torch.Tensor) -> str:
        """The name of the ``forward_paths.FORWARD_PATHS`` entry a call with ``x`` would take now."""
        return choose(self, Call.of(self, x)).name

    def extra_repr(self) -> str:
        return "fused" if self.fused else ""


class DoRALinear(AdaptedLayer):
    """DoRA/LoRA adapters on a frozen ``nn.Linear``."""

    def __init__(self, base_layer: nn.Linear) -> None:
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"DoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer)


class DoRAConv2d(AdaptedLayer):
    """DoRA/LoRA adapters on a frozen ``nn.Conv2d`` (groups=1, zero padding); norm per output filter."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        if not isinstance(base_layer, nn.Conv2d):
            raise TypeError(f"DoRAConv2d wraps nn.Conv2d, got {type(base_layer).__name__}")
        super().__init__(base_layer)


def _bias_delta(adapter: Adapter) -> bool:
    return isinstance(adapter, DenseAdapter) and adapter.bias_delta is not None


def wrap(module: nn.Module) -> AdaptedLayer:
    """Wrap an ``nn.Linear`` or ``nn.Conv2d`` in the matching adapter layer."""
    geometry_of(module)  # refuses any other kind, naming it
    return DoRALinear(module) if isinstance(module, nn.Linear) else DoRAConv2d(module)
