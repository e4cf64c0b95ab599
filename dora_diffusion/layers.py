"""DoRA / LoRA wrappers around a frozen ``nn.Linear`` or ``nn.Conv2d``.

For an adapter with factors ``A`` (r x d_in), ``B`` (d_out x r), scale ``s`` and magnitude ``m`` (d_out,):

    W'   = diag(m / n) (W0 + s B A),       n_i = ||row_i(W0 + s B A)||_2   (DoRA, paper Eq. 5)
    W'   = W0 + s B A                                                       (plain LoRA)
    W(k) = W0 + sum_j k_j (W'_j - W0)                                       (strength k_j per active adapter)

The forward pass never forms ``W'``: with ``g = m / n`` (``n`` detached and cached),

    y = W0 x + b + sum_j k_j [ (g_j - 1) * (W0 x) + s_j (g_j * B_j) A_j dropout(x) ]

so the bias is never scaled and dropout touches only the low-rank path. For a Conv2d, ``A`` is a conv
with the base's kernel, stride, padding and dilation and ``B`` a 1x1 conv; a "row" is one output filter.
Legacy per-input DoRA (``norm_axis="in"``) normalises columns: ``W' = (W0 + s B A) diag(m / n)``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import NormAxis, lora_scale
from .dora_autograd import DoRALinearFunction, DoRAScaleFunction
from .norms import EPS, dense_col_norm, factored_row_norm, row_sq_norms


_ADD_ORDER = itertools.count()
"""Global sequence number of ``add_adapter`` calls, so adapters can be listed in the order they came."""


@dataclass(frozen=True)
class AdapterSpec:
    """Non-tensor settings of one adapter on one layer."""

    rank: int
    alpha: float
    use_dora: bool
    norm_axis: NormAxis = "out"
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return lora_scale(self.rank, self.alpha, self.use_rslora)


class AdaptedLayer(nn.Module):
    """Base class: a frozen base module plus any number of named DoRA/LoRA adapters."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.specs: dict[str, AdapterSpec] = {}
        self.added: dict[str, int] = {}
        self.active: dict[str, float] = {}
        self.disabled = False
        self.lean_training = True
        self.recompute_output = False
        """Lean DoRA step on a Linear: keep ``x`` (already kept for ``A``'s gradient) instead of the output
        ``y``, and recompute ``W0 x + s B h`` in the backward. Worth it only when nothing downstream keeps
        ``y``; ``inject.set_recompute`` sets it by module name."""
        self.fused: dict[str, float] = {}
        self._backup: torch.Tensor | None = None
        self._norm_cache: dict[str, tuple[tuple, torch.Tensor]] = {}
        self._sq_cache: tuple[tuple, torch.Tensor] | None = None

    # ------------------------------------------------------------------ shapes, overridden per kind
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def in_features(self) -> int:
        raise NotImplementedError

    @property
    def out_features(self) -> int:
        raise NotImplementedError

    def lora_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of (A, B) for an adapter of this rank, as stored in files."""
        raise NotImplementedError

    def _down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``A x`` for this layer kind (for a Conv2d: a conv with the base's geometry)."""
        raise NotImplementedError

    def _up(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``B h`` for this layer kind (for a Conv2d: a 1x1 conv)."""
        raise NotImplementedError

    def _lowrank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``B A x``."""
        return self._up(self._down(x, a), b)

    def _add_up(self, y: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> None:
        """``y += B h`` in place."""
        y.add_(self._up(h, b))

    supports_direct = False
    """True if the base matmul may be done here rather than by calling the base module."""

    def _base_nobias(self, x: torch.Tensor) -> torch.Tensor:
        """``W0 x`` without bias."""
        raise NotImplementedError

    def _lora_training_forward(self, x: torch.Tensor, base_in: torch.Tensor, running: dict[str, float]) -> torch.Tensor:
        """Plain LoRA with autograd, doing the base matmul here (only if ``supports_direct``)."""
        raise NotImplementedError

    def _channel_view(self, v: torch.Tensor) -> torch.Tensor:
        """Reshape a per-output-channel vector to broadcast against the output."""
        raise NotImplementedError

    # ------------------------------------------------------------------ adapters
    def add_adapter(
        self,
        name: str,
        rank: int,
        alpha: float | None = None,
        use_dora: bool = True,
        dropout: float = 0.0,
        use_rslora: bool = False,
        norm_axis: NormAxis = "out",
        dtype: torch.dtype = torch.float32,
        init: bool = True,
    ) -> None:
        """Add an untrained adapter: A Kaiming-uniform, B = 0, m = ||W0||, so the output is unchanged.

        ``init=False`` only allocates the tensors (for ``load_adapter_tensors`` to fill): no pass over W0.
        """
        if not name or "." in name:
            raise ValueError(f"adapter name {name!r} must be non-empty and contain no '.'")
        if name in self.specs:
            raise ValueError(f"adapter {name!r} already exists on this layer; delete it first")
        if self.fused:
            raise RuntimeError("adapters are fused into the base weights; call unfuse() before adding one")
        spec = AdapterSpec(int(rank), float(rank if alpha is None else alpha), bool(use_dora), norm_axis, use_rslora)
        a_shape, b_shape = self.lora_shapes(spec.rank)
        device = self.weight.device
        a = torch.empty(a_shape, dtype=dtype, device=device)
        if init:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=device))
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.specs[name] = spec
        self.added[name] = next(_ADD_ORDER)
        if use_dora:
            n_mag = self.out_features if norm_axis == "out" else self.in_features
            mag = self._norm(name).to(dtype, copy=True) if init else torch.empty(n_mag, dtype=dtype, device=device)
            self.lora_magnitude[name] = nn.Parameter(mag)
        self.active[name] = 1.0

    @torch.no_grad()
    def load_adapter_tensors(
        self, name: str, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor | None = None
    ) -> None:
        """Copy trained factors (file shapes) into an existing adapter, checking every shape."""
        spec = self.specs[name]
        a_shape, b_shape = self.lora_shapes(spec.rank)
        for label, t, shape in (("lora_A", a, a_shape), ("lora_B", b, b_shape)):
            if tuple(t.shape) != shape:
                raise ValueError(f"{label} of adapter {name!r} has shape {tuple(t.shape)}, this layer needs {shape}")
        self.lora_A[name].copy_(a)
        self.lora_B[name].copy_(b)
        if spec.use_dora:
            want = (self.out_features if spec.norm_axis == "out" else self.in_features,)
            if magnitude is None or magnitude.numel() != want[0]:
                got = None if magnitude is None else tuple(magnitude.shape)
                raise ValueError(f"magnitude of adapter {name!r} has shape {got}, this layer needs {want}")
            self.lora_magnitude[name].copy_(magnitude.reshape(want))
        self._norm_cache.pop(name, None)

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter and its parameters."""
        if name in self.fused:
            raise RuntimeError(f"adapter {name!r} is fused into the base weights; call unfuse() first")
        for store in (self.lora_A, self.lora_B, self.lora_magnitude, self.lora_dropout):
            if name in store:
                del store[name]
        self.specs.pop(name, None)
        self.added.pop(name, None)
        self.active.pop(name, None)
        self._norm_cache.pop(name, None)

    def set_active(self, weights: dict[str, float]) -> None:
        """Set which adapters run and their strengths k (adapters not on this layer are ignored)."""
        self.active = {n: float(k) for n, k in weights.items() if n in self.specs}

    # ------------------------------------------------------------------ norms
    def _w0_2d(self) -> torch.Tensor:
        return self.weight.reshape(self.weight.shape[0], -1)

    def _w0_sq(self) -> torch.Tensor:
        w = self.weight
        if torch.compiler.is_compiling():
            return row_sq_norms(self._w0_2d())
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._sq_cache is None or self._sq_cache[0] != key or _stale(self._sq_cache[1]):
            self._sq_cache = (key, row_sq_norms(self._w0_2d()))
        return self._sq_cache[1]

    def _norm(self, name: str) -> torch.Tensor:
        """Detached fp32 norm ``n`` of ``W0 + s B A``, (d_out,) or (in,) for legacy.

        Cached, keyed on the storage and version counters of A, B and W0, so it is recomputed once per
        optimizer step (not per gradient-accumulation micro-step or checkpoint recompute). Under
        ``torch.compile`` it is computed inside the graph instead.
        """
        if torch.compiler.is_compiling():
            return self._compute_norm(name)
        a, b, w, spec = self.lora_A[name], self.lora_B[name], self.weight, self.specs[name]
        key = (a.data_ptr(), a._version, b.data_ptr(), b._version, w.data_ptr(), w._version, spec)
        hit = self._norm_cache.get(name)
        if hit is not None and hit[0] == key and not _stale(hit[1]):
            return hit[1]
        n = self._compute_norm(name)
        self._norm_cache[name] = (key, n)
        return n

    def _compute_norm(self, name: str) -> torch.Tensor:
        """The norm in fp32 also under autocast (which would run its matmuls in bf16: 3e-5 relative error)."""
        a, b, spec = self.lora_A[name], self.lora_B[name], self.specs[name]
        r = spec.rank
        with torch.autocast(a.device.type, enabled=False):
            if spec.norm_axis == "out":
                return factored_row_norm(self._w0_2d(), a.reshape(r, -1), b.reshape(-1, r), spec.scale, self._w0_sq())
            return dense_col_norm(self._w0_2d(), a.reshape(r, -1), b.reshape(-1, r), spec.scale, self.in_features)

    def dora_factor(self, name: str) -> torch.Tensor:
        """``g = m / max(n, eps)`` in fp32; gradients reach ``m`` only (the norm is detached)."""
        return self.lora_magnitude[name].float() / self._norm(name).clamp_min(EPS)

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def delta_weight(self, name: str, strength: float = 1.0) -> torch.Tensor:
        """``k (W' - W0)`` in fp32, shaped like the base weight."""
        spec = self.specs[name]
        w0 = self.weight.float()
        r = spec.rank
        ba = (self.lora_B[name].float().reshape(-1, r) @ self.lora_A[name].float().reshape(r, -1)).view_as(w0)
        if not spec.use_dora:
            return (strength * spec.scale) * ba
        g = self.dora_factor(name)
        if spec.norm_axis == "out":
            g = g.view(-1, *([1] * (w0.dim() - 1)))
            delta = (g - 1.0) * w0 + (g * spec.scale) * ba
        else:
            g = g.view(1, -1, *([1] * (w0.dim() - 2)))
            delta = (w0 + spec.scale * ba) * g - w0
        return strength * delta

    @torch.no_grad()
    def fuse(self, weights: dict[str, float] | None = None) -> None:
        """Write ``W(k)`` into the base weight for ``{adapter: k}`` (default: the active adapters).

        The original weight is kept (on the CPU) so ``unfuse`` restores it bit for bit.
        """
        if self.fused:
            raise RuntimeError("adapters are already fused; call unfuse() first")
        weights = {n: k for n, k in (self.active if weights is None else weights).items() if n in self.specs}
        if not weights:
            return
        w = self.weight
        delta = sum(self.delta_weight(n, k) for n, k in weights.items())
        self._backup = w.detach().to("cpu", copy=True)
        w.copy_((w.float() + delta).to(w.dtype))
        self.fused = dict(weights)

    @torch.no_grad()
    def unfuse(self) -> None:
        """Restore the base weight saved by ``fuse`` bit for bit."""
        if not self.fused:
            return
        self.weight.copy_(self._backup.to(self.weight.device))
        self._backup = None
        self.fused = {}

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        autocast = torch.is_autocast_enabled(x.device.type)
        out_dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        base_in = x if autocast or x.dtype == w.dtype else x.to(w.dtype)
        running = {n: k for n, k in self.active.items() if k != 0.0}
        if self.disabled or self.fused or not running:
            return self.base_layer(base_in).to(out_dtype)
        direct = self.supports_direct and not _has_hooks(self.base_layer)
        specs = [self.specs[n] for n in running]
        compiling = torch.compiler.is_compiling()  # inductor fuses the plain path; the custom functions would break graphs
        if self.lean_training and not compiling and torch.is_grad_enabled() and len(running) == 1:
            y = self._training_forward(x, base_in, direct, autocast)
            if y is not None:
                return y.to(out_dtype)
        if not compiling and all(s.norm_axis == "out" for s in specs) and not _needs_autograd(self, running):
            return self._inference_forward(x, base_in, running).to(out_dtype)
        if direct and not any(s.use_dora for s in specs):
            return self._lora_training_forward(x, base_in, running).to(out_dtype)
        return self._general_forward(x, self.base_layer(base_in), running).to(out_dtype)

    def _general_forward(self, x: torch.Tensor, base_out: torch.Tensor, running: dict[str, float]) -> torch.Tensor:
        """Any mix of adapters, plain autograd: ``base_out + sum_j k_j [(g_j - 1) W0 x + s_j g_j B_j A_j x~]``."""
        if self.supports_direct and not any(self.specs[n].use_dora for n in running):
            # Plain LoRA on a Linear: add each B' h into the base output in place (autograd-safe: the base
            # matmul does not need its output for backward), no N x d_out temporaries.
            for name, k in running.items():
                a, b = self.lora_A[name], self.lora_B[name]
                h = self._down(self.lora_dropout[name](x).to(a.dtype), a)
                self._add_up(base_out, h.to(base_out.dtype), ((k * self.specs[name].scale) * b).to(base_out.dtype))
            return base_out
        result = base_out
        base_coef = None  # sum_j k_j (g_j - 1), per output channel
        for name, k in running.items():
            spec = self.specs[name]
            a, b = self.lora_A[name], self.lora_B[name]
            xd = self.lora_dropout[name](x).to(a.dtype)
            bshape = (-1,) + (1,) * (b.dim() - 1)
            if not spec.use_dora:
                term = self._lowrank(xd, a, (k * spec.scale) * b)
            elif spec.norm_axis == "out":
                g = self.dora_factor(name)
                base_coef = k * (g - 1.0) if base_coef is None else base_coef + k * (g - 1.0)
                term = self._lowrank(xd, a, (k * spec.scale * g).view(bshape) * b)
            else:
                c = self.dora_factor(name)  # per input channel
                cview = c.view(-1, *([1] * (x.dim() - 2))) if x.dim() == 4 else c
                term = self._lowrank(xd * cview, a, (k * spec.scale) * b)
                shifted = (x.to(a.dtype) * (cview - 1.0)).to(self.weight.dtype)
                term = term + k * self._base_nobias(shifted).to(term.dtype)
            result = result + term
        if base_coef is not None:
            coef = self._channel_view(base_coef)
            bias = self.base_layer.bias
            scaled = base_out * coef
            if bias is not None:
                scaled = scaled - self._channel_view(base_coef * bias.float())
            result = result + scaled
        return result

    @torch.no_grad()
    def _inference_forward(self, x: torch.Tensor, base_in: torch.Tensor, running: dict[str, float]) -> torch.Tensor:
        """Per-output DoRA / LoRA without autograd, built in place on the base output:
        ``y = (W0 x + b) * (1 + c) - b c + sum_j B'_j h_j`` with ``c = sum_j k_j (g_j - 1)``, ``B'_j = k_j s_j g_j B_j``.
        """
        y = self.base_layer(base_in)  # same op as the base module: bit-identical when c = 0 and B = 0
        coef = None
        terms = []
        for name, k in running.items():
            spec = self.specs[name]
            a, b = self.lora_A[name], self.lora_B[name]
            factor = torch.full((b.shape[0],), k * spec.scale, dtype=torch.float32, device=b.device)
            if spec.use_dora:
                g = self.dora_factor(name)
                coef = k * (g - 1.0) if coef is None else coef + k * (g - 1.0)
                factor = factor * g
            h = self._down(self.lora_dropout[name](x).to(a.dtype), a)  # (..., r)
            terms.append((h, factor.view((-1,) + (1,) * (b.dim() - 1)) * b))
        if coef is not None:
            bias = self.base_layer.bias
            scale = self._channel_view(1.0 + coef)
            if bias is None:
                y.mul_(scale)
            else:
                torch.addcmul(self._channel_view(-(bias.float() * coef)), y, scale, out=y)
        for h, bb in terms:
            self._add_up(y, h.to(y.dtype), bb.to(y.dtype))
        return y

    def _training_forward(self, x: torch.Tensor, base_in: torch.Tensor, direct: bool, autocast: bool) -> torch.Tensor | None:
        """The training step of one DoRA adapter at strength 1, keeping no extra activation (see
        ``dora_autograd``); None when that is not the situation."""
        ((name, k),) = ((n, k) for n, k in self.active.items() if k != 0.0)
        spec = self.specs[name]
        if k != 1.0 or not spec.use_dora or spec.norm_axis != "out":
            return None
        a, b, m = self.lora_A[name], self.lora_B[name], self.lora_magnitude[name]
        if not (a.requires_grad or b.requires_grad or m.requires_grad):
            return None
        xd = self.lora_dropout[name](x)
        if not autocast:  # under autocast F.linear casts by itself; an upcast here would be kept as a copy
            xd = xd.to(a.dtype)
        h = self._down(xd, a)  # (..., r); autograd keeps xd (or its autocast copy) for dL/dA
        g = self.dora_factor(name)
        bias = self.base_layer.bias
        if direct:
            # recompute only when the input we keep is the very tensor A's backward keeps: no extra memory.
            # (`base_in is x` already means x has the weight dtype; under autocast x must have the autocast dtype.)
            recompute = self.recompute_output and xd is x and base_in is x
            if recompute and autocast:
                recompute = x.dtype == torch.get_autocast_dtype(x.device.type)
            return DoRALinearFunction.apply(base_in, h, self.weight, bias, b, g, spec.scale, recompute)
        base_out = self.base_layer(base_in)
        return DoRAScaleFunction.apply(base_out, h, b, g, bias, spec.scale, isinstance(self, DoRAConv2d))

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={s.rank} alpha={s.alpha:g} {'dora' if s.use_dora else 'lora'}" for n, s in self.specs.items())


def _has_hooks(module: nn.Module) -> bool:
    """Modules with hooks (e.g. accelerate offloading) must be called, not bypassed with F.linear."""
    return bool(module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"))


def _needs_autograd(layer: AdaptedLayer, running: dict[str, float]) -> bool:
    """True if gradients must flow to some running adapter's parameters."""
    if not torch.is_grad_enabled():
        return False
    stores = (layer.lora_A, layer.lora_B, layer.lora_magnitude)
    return any(n in st and st[n].requires_grad for n in running for st in stores)


def _stale(t: torch.Tensor) -> bool:
    """A cached tensor made under inference_mode cannot be saved for backward outside it."""
    return t.is_inference() and not torch.is_inference_mode_enabled()


class DoRALinear(AdaptedLayer):
    """DoRA/LoRA adapters on a frozen ``nn.Linear``: ``y = g * (W0 x + s B A x) + b``."""

    def __init__(self, base_layer: nn.Linear) -> None:
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"DoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def lora_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (rank, self.in_features), (self.out_features, rank)

    def _down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return F.linear(x, a)  # (..., r)

    def _up(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(h, b)  # (..., d_out)

    supports_direct = True

    def _add_up(self, y: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> None:
        h2 = h.reshape(-1, h.shape[-1])
        if y.dim() == 2:  # in place on y itself: see _lora_training_forward
            y.addmm_(h2, b.t())
        else:
            y.view(-1, y.shape[-1]).addmm_(h2, b.t())  # no N x d_out temporary

    def _lora_training_forward(self, x: torch.Tensor, base_in: torch.Tensor, running: dict[str, float]) -> torch.Tensor:
        """LoRA with autograd, built in place on a 2-D base output. (``F.linear`` of a 3-D input with bias
        returns a view; autograd undoes an in-place op on a view with two full copies of the output gradient
        in the backward.)"""
        y = F.linear(base_in.reshape(-1, base_in.shape[-1]), self.weight, self.base_layer.bias)
        return self._general_forward(x, y, running).view(*base_in.shape[:-1], y.shape[-1])

    def _base_nobias(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def _channel_view(self, v: torch.Tensor) -> torch.Tensor:
        return v


class DoRAConv2d(AdaptedLayer):
    """DoRA/LoRA adapters on a frozen ``nn.Conv2d`` (groups=1, zero padding); norm per output filter."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        if not isinstance(base_layer, nn.Conv2d):
            raise TypeError(f"DoRAConv2d wraps nn.Conv2d, got {type(base_layer).__name__}")
        if base_layer.groups != 1:
            raise ValueError(f"DoRAConv2d supports groups=1 only, this Conv2d has groups={base_layer.groups}")
        if base_layer.padding_mode != "zeros":
            raise ValueError(f"DoRAConv2d supports padding_mode='zeros' only, got {base_layer.padding_mode!r}")
        super().__init__(base_layer)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_channels

    @property
    def out_features(self) -> int:
        return self.base_layer.out_channels

    def lora_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        kh, kw = self.base_layer.kernel_size
        return (rank, self.in_features, kh, kw), (self.out_features, rank, 1, 1)

    def _down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        c = self.base_layer
        return F.conv2d(x, a, None, c.stride, c.padding, c.dilation)  # (N, r, H', W')

    def _up(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.conv2d(h, b)  # (N, d_out, H', W')

    def _base_nobias(self, x: torch.Tensor) -> torch.Tensor:
        c = self.base_layer
        return F.conv2d(x, self.weight, None, c.stride, c.padding, c.dilation)

    def _channel_view(self, v: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1, 1, 1)


def wrap(module: nn.Module) -> AdaptedLayer:
    """Wrap an ``nn.Linear`` or ``nn.Conv2d`` in the matching adapter layer."""
    if isinstance(module, nn.Linear):
        return DoRALinear(module)
    if isinstance(module, nn.Conv2d):
        return DoRAConv2d(module)
    raise TypeError(f"cannot add a DoRA/LoRA adapter to {type(module).__name__}; only nn.Linear and nn.Conv2d")
