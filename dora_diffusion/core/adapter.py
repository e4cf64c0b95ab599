"""One named DoRA/LoRA adapter on one layer: its tensors, its settings, and its formula.

With factors ``A`` (r x K), ``B`` (d_out x r), scale ``s``, magnitude ``m`` and ``n`` the detached norm:

    W' = diag(g) (W0 + s B A),      g = m / max(n, eps),   n_i = ||row_i(W0 + s B A)||     (DoRA, paper Eq. 5)
    W' = (W0 + s B A) diag(g),      n_c = ||column c of W0 + s B A||                        (legacy per-input DoRA)
    W' = W0 + s B A                                                                          (plain LoRA)

At strength ``k`` the change of the weight, per output row, is

    k (W' - W0) = c * W0 + B' A,    c = k (g - 1),   B' = k s g B        (LoRA: c = 0, g = 1)

``Adapter.scaled`` returns ``(c, B')``: every forward path and ``Adapter.delta`` build on it, so this is the
one place the per-output formula is written.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn

from dora_diffusion.core.config import NormAxis, lora_scale
from dora_diffusion.core.delta_kinds import KINDS, delta_weight
from dora_diffusion.core.geometry import Geometry, stale
from dora_diffusion.core.norms import EPS, dense_col_norm, dense_norm, factored_row_norm

_ADD_ORDER = itertools.count()
"""Global sequence number of created adapters, so adapters can be listed in the order they came."""


@dataclass(frozen=True)
class AdapterSpec:
    """Non-tensor settings of one adapter on one layer."""

    rank: int
    alpha: float
    use_dora: bool
    norm_axis: NormAxis = "out"
    use_rslora: bool = False
    kind: str = "lowrank"
    """The delta kind (``delta_kinds.KINDS``): ``lowrank`` keeps ``A``/``B`` and the lean paths, the others
    (``tucker``, ``hadamard``, ``kronecker``, ``full``) are ``DenseAdapter``s."""
    factor_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """``(role, shape)`` of each factor of a dense kind (empty for ``lowrank``)."""

    @property
    def scale(self) -> float:
        if self.kind == "lowrank":
            return lora_scale(self.rank, self.alpha, self.use_rslora)
        return KINDS[self.kind].scale(dict(self.factor_shapes), self.alpha)


class Adapter(nn.Module):
    """``A``, ``B``, the magnitude ``m`` (DoRA only), the dropout on the low-rank input, and the spec.

    ``strength`` is ``k`` while the adapter is active and ``None`` while it is not.
    """

    def __init__(
        self, spec: AdapterSpec, geometry: Geometry, dropout: float = 0.0, dtype: torch.dtype = torch.float32, init: bool = True
    ) -> None:
        """A fresh adapter: ``A`` Kaiming-uniform, ``B = 0``, ``m = ||W0||``, so the layer's output is unchanged.

        ``init=False`` only allocates the tensors (for ``load`` to fill): no pass over ``W0``.
        """
        super().__init__()
        self.spec = spec
        self.geometry = geometry
        self.order = next(_ADD_ORDER)
        self.strength: float | None = 1.0
        self._norm: tuple[tuple, torch.Tensor] | None = None
        a_shape, b_shape = geometry.shapes(spec.rank)
        device = geometry.weight.device
        a = torch.empty(a_shape, dtype=dtype, device=device)
        if init:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.magnitude: nn.Parameter | None = None
        if spec.use_dora:
            size = geometry.magnitude_size(spec.norm_axis)
            mag = self.norm().to(dtype, copy=True) if init else torch.empty(size, dtype=dtype, device=device)
            self.magnitude = nn.Parameter(mag)

    @property
    def trainable(self) -> bool:
        """True if gradients must reach one of this adapter's parameters."""
        return any(p.requires_grad for p in self.parameters())

    @torch.no_grad()
    def load(self, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor | None = None) -> None:
        """Copy trained factors (file shapes) in, checking every shape first."""
        spec = self.spec
        numel = None if magnitude is None else magnitude.numel()
        problem = self.geometry.check_fit(spec.rank, tuple(a.shape), tuple(b.shape), numel, spec.norm_axis)
        if problem is None and spec.use_dora and magnitude is None:
            problem = "a DoRA adapter needs a magnitude, none was given"
        if problem is not None:
            raise ValueError(problem)
        self.A.copy_(a)
        self.B.copy_(b)
        if spec.use_dora:
            self.magnitude.copy_(magnitude.reshape(self.magnitude.shape))
        self._norm = None

    # ------------------------------------------------------------------ the formula
    def norm(self) -> torch.Tensor:
        """Detached fp32 norm ``n`` of ``W0 + s B A``: (d_out,), or (in,) for legacy per-input files.

        Cached, keyed on the storage and version counters of A, B and W0, so it is recomputed once per
        optimizer step (not per gradient-accumulation micro-step or checkpoint recompute). Under
        ``torch.compile`` it is computed inside the graph instead.
        """
        if torch.compiler.is_compiling():
            return self.compute_norm()
        key = self.norm_key()
        n = self.cached_norm(key)
        return self.remember_norm(key, self.compute_norm()) if n is None else n

    def norm_key(self) -> tuple:
        """What the cached norm depends on: A, B and W0, by storage and version."""
        a, b = self.A, self.B
        return (a.data_ptr(), a._version, b.data_ptr(), b._version, *self.geometry.weight_key(), self.spec)

    def cached_norm(self, key: tuple) -> torch.Tensor | None:
        """The cached norm if it was made for ``key`` (``norm_key()``) and can still be used, else None."""
        if self._norm is not None and self._norm[0] == key and not stale(self._norm[1]):
            return self._norm[1]
        return None

    def remember_norm(self, key: tuple, n: torch.Tensor) -> torch.Tensor:
        """Cache ``n`` as the norm for ``key`` and return it."""
        self._norm = (key, n)
        return n

    def compute_norm(self, w0_at: torch.Tensor | None = None) -> torch.Tensor:
        """The norm in fp32 also under autocast (which would run its matmuls in bf16: 3e-5 relative error).

        ``w0_at = W0 A^T`` (d_out, r) may be passed when a caller already has it from its own pass over ``W0``.
        """
        geom, spec, r = self.geometry, self.spec, self.spec.rank
        a, b = self.A.reshape(r, -1), self.B.reshape(-1, r)
        with torch.autocast(self.A.device.type, enabled=False):
            if spec.norm_axis == "out":
                return factored_row_norm(geom.w0_2d(), a, b, spec.scale, geom.w0_sq(), w0_at)
            return dense_col_norm(geom.w0_2d(), a, b, spec.scale, geom.in_features)

    def factor(self) -> torch.Tensor:
        """``g = m / max(n, eps)`` in fp32; gradients reach ``m`` only (the norm is detached)."""
        return self.magnitude.float() / self.norm().clamp_min(EPS)

    def up_factor(self) -> tuple[float, torch.Tensor]:
        """``(s, B)``: the scale and the tensor ``scaled`` multiplies per output row (``DenseAdapter``: ``(1, s ΔW)``)."""
        return self.spec.scale, self.B

    def scaled(self, k: float) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(c, B')`` with ``k (W' - W0) = c * W0 + B' A`` per output row: ``c = k (g - 1)`` (None for LoRA),
        ``B' = k s g B`` (fp32 for DoRA, where ``g`` is fp32). Per-output adapters only. Any delta kind: with
        ``(s, B) = up_factor()`` (a dense kind's ``B'`` is ``k g s ΔW`` and ``expand`` is the identity)."""
        scale, b = self.up_factor()
        if not self.spec.use_dora:
            return None, (k * scale) * b
        g = self.factor()
        return k * (g - 1.0), ((k * scale) * g).view((-1,) + (1,) * (b.dim() - 1)) * b

    def update(self) -> torch.Tensor:
        """The unscaled ``ΔW = B A`` as (d_out, K) (``delta_kinds``' ``lowrank``)."""
        r = self.spec.rank
        return self.B.float().reshape(-1, r) @ self.A.float().reshape(r, -1)

    def expand(self, b_scaled: torch.Tensor) -> torch.Tensor:
        """The dense (d_out, K) change ``B' A`` for the ``B'`` of ``scaled``."""
        r = self.spec.rank
        return b_scaled.float().reshape(-1, r) @ self.A.float().reshape(r, -1)

    @torch.no_grad()
    def delta(self, k: float = 1.0) -> torch.Tensor:
        """``k (W' - W0)`` in fp32, shaped like the base weight (any delta kind: ``update`` and ``expand`` are
        the kind's; the DoRA decomposition is written here and in ``scaled`` only)."""
        return self.change(k)

    def change(self, k: float) -> torch.Tensor:
        """``delta`` with autograd: ``k (W' - W0)`` in fp32, shaped like the base weight."""
        w0 = self.geometry.weight.float()
        if self.spec.norm_axis == "in":
            w = w0 + self.spec.scale * self.update().float().view_as(w0)
            g = self.factor().view(1, -1, *([1] * (w0.dim() - 2)))
            return k * (w * g - w0)
        c, b_scaled = self.scaled(k)
        delta = self.expand(b_scaled).view_as(w0)
        if c is not None:
            delta = delta + c.view(-1, *([1] * (w0.dim() - 1))) * w0
        return delta

    def extra_repr(self) -> str:
        s = self.spec
        kind = "dora" if s.use_dora else "lora"
        axis = "" if s.norm_axis == "out" else " per-input"
        return f"r={s.rank}, alpha={s.alpha:g}, {kind}{axis}"


class DenseAdapter(Adapter):
    """An adapter of a dense delta kind (``tucker``, ``hadamard``, ``kronecker``, ``full``): its factors, the
    magnitude ``m`` (DoRA) and, for ``full``, a change of bias ``diff_b``.

    ``ΔW`` is materialised: ``s ΔW`` and the norm ``n`` of ``W0 + s ΔW`` are built together and cached, keyed on
    the factors' and ``W0``'s storage and version, and the forward's ``k (W' - W0)`` once per strength and
    magnitude, after which ``s ΔW`` is let go (the norm stays). Costs: one d_out x K fp32 matrix held (two while
    it is built) and one dense product per call.
    The DoRA formula itself is ``Adapter``'s (``scaled``, ``change``, ``factor``), applied to ``update()``.
    """

    def __init__(self, spec: AdapterSpec, geometry: Geometry, dtype: torch.dtype = torch.float32, init: bool = True) -> None:
        """Allocate the factors of ``spec.factor_shapes``; ``init=True`` makes them zero (``ΔW = 0``, output
        unchanged) with ``m = ||W0||``, ``init=False`` leaves them for ``load``."""
        nn.Module.__init__(self)
        if spec.kind not in KINDS or spec.kind == "lowrank":
            raise ValueError(f"DenseAdapter holds a dense delta kind, not {spec.kind!r}")
        self.spec = spec
        self.geometry = geometry
        self.order = next(_ADD_ORDER)
        self.strength: float | None = 1.0
        self._norm = None
        self._update: tuple[tuple, torch.Tensor] | None = None
        self._change: tuple[tuple, torch.Tensor] | None = None
        device = geometry.weight.device
        make = torch.zeros if init else torch.empty
        shapes = dict(spec.factor_shapes)
        self.factors = nn.ParameterDict(
            {role: nn.Parameter(make(shape, dtype=dtype, device=device)) for role, shape in shapes.items() if role != "diff_b"}
        )
        self.bias_delta: nn.Parameter | None = None
        if "diff_b" in shapes:
            self.bias_delta = nn.Parameter(make(shapes["diff_b"], dtype=dtype, device=device))
        self.dropout = nn.Identity()
        self.magnitude = None
        if spec.use_dora:
            size = geometry.magnitude_size(spec.norm_axis)
            self.magnitude = nn.Parameter(self.norm().to(dtype, copy=True) if init else torch.empty(size, dtype=dtype, device=device))

    @torch.no_grad()
    def load(self, factors: dict[str, torch.Tensor], magnitude: torch.Tensor | None = None) -> None:  # type: ignore[override]
        """Copy a file's factors (and ``diff_b``, the magnitude) in, checking every shape first."""
        want = dict(self.spec.factor_shapes)
        got = {role: tuple(t.shape) for role, t in factors.items()}
        if got != want:
            raise ValueError(f"the {self.spec.kind} factors have shapes {got}, this adapter was made for {want}")
        if self.spec.use_dora and (magnitude is None or magnitude.numel() != self.magnitude.numel()):
            raise ValueError(f"a DoRA adapter needs a magnitude of {self.magnitude.numel()} values")
        for role, t in factors.items():
            (self.bias_delta if role == "diff_b" else self.factors[role]).copy_(t)
        if self.spec.use_dora:
            self.magnitude.copy_(magnitude.reshape(self.magnitude.shape))
        self._norm = self._update = self._change = None

    def norm_key(self) -> tuple:
        """What ``s ΔW`` and the norm depend on: the factors and W0, by storage and version."""
        return (*((t.data_ptr(), t._version) for t in self.factors.values()), *self.geometry.weight_key(), self.spec)

    def update(self) -> torch.Tensor:
        """The unscaled ``ΔW`` of the kind as (d_out, K) in fp32, with autograd."""
        factors = {role: t.float() for role, t in self.factors.items()}
        return delta_weight(self.spec.kind, factors)

    def scaled_update(self) -> torch.Tensor:
        """``s ΔW`` (d_out, K) fp32: built once per change of the factors or W0 (with autograd, when it is on and a
        factor requires grad, built fresh)."""
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in self.factors.values())):
            return self.spec.scale * self.update()
        key = self.norm_key()
        if self._update is None or self._update[0] != key or stale(self._update[1]):
            with torch.no_grad():
                self._update = (key, self.spec.scale * self.update())
        return self._update[1]

    def compute_norm(self, w0_at: torch.Tensor | None = None) -> torch.Tensor:
        """Detached fp32 norm of ``W0 + s ΔW`` per output row (or per input channel for legacy files)."""
        with torch.no_grad(), torch.autocast(self.geometry.weight.device.type, enabled=False):
            w = self.geometry.w0_2d().float() + self.scaled_update().detach()  # (d_out, K)
            return dense_norm(w, self.spec.norm_axis, self.geometry.in_features)

    def up_factor(self) -> tuple[float, torch.Tensor]:
        """``(1, s ΔW)``: ``scaled`` then gives ``B' = k g s ΔW``, dense (d_out, K)."""
        return 1.0, self.scaled_update()

    def expand(self, b_scaled: torch.Tensor) -> torch.Tensor:
        """``B'`` is already the dense change: (d_out, K) fp32."""
        return b_scaled.float()

    def change(self, k: float) -> torch.Tensor:
        """``k (W' - W0)`` (fp32, shaped like W0); without autograd cached per (factors, W0, m, k)."""
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and self.trainable):
            return super().change(k)
        m = self.magnitude
        key = (self.norm_key(), k, None if m is None else (m.data_ptr(), m._version))
        if self._change is None or self._change[0] != key or stale(self._change[1]):
            with torch.no_grad():
                self._change = (key, super().change(k))
            self._update = None  # the norm stays cached; s ΔW is rebuilt only if k or m changes: one matrix held
        return self._change[1]

    def extra_repr(self) -> str:
        s = self.spec
        kind = "dora" if s.use_dora else "lora"
        axis = "" if s.norm_axis == "out" else " per-input"
        return f"{s.kind}, r={s.rank}, alpha={s.alpha:g}, scale={s.scale:g}, {kind}{axis}"


def make_adapter(
    spec: AdapterSpec, geometry: Geometry, dropout: float = 0.0, dtype: torch.dtype = torch.float32, init: bool = True
) -> Adapter:
    """An ``Adapter`` for a low-rank spec, a ``DenseAdapter`` for any other delta kind (no dropout there)."""
    if spec.kind == "lowrank":
        return Adapter(spec, geometry, dropout, dtype, init)
    if dropout > 0:
        raise ValueError(f"dropout is not supported on {spec.kind} adapters")
    return DenseAdapter(spec, geometry, dtype, init)
