"""The in-memory form every file dialect is read into and written from."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dora_diffusion.core.config import NormAxis
from dora_diffusion.core.delta_kinds import KINDS
from dora_diffusion.core.layers import AdapterSpec
from dora_diffusion.formats.safefile import AdapterFileError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
MAX_ALPHA = 1e6
"""Largest |alpha| accepted from a file: far above any trained adapter's, far below fp32 overflow in the forward."""


@dataclass
class ModuleAdapter:
    """One module's adapter tensors, in file shapes: A (r, in[, kh, kw]), B (out, r[, 1, 1]), m 1-D.

    For the other delta kinds (``core.delta_kinds``: ``tucker``, ``hadamard``, ``kronecker``, ``full``) ``a`` and
    ``b`` are None and ``factors`` holds the file's tensors by role (``w1_a``, ``t2``, ``diff``, ``diff_b``...);
    ``ndim`` is the weight's number of dimensions where the file says it (a 4-D factor or ``dora_scale``), else 0.
    """

    a: torch.Tensor | None
    b: torch.Tensor | None
    magnitude: torch.Tensor | None
    alpha: float
    norm_axis: NormAxis = "out"
    use_rslora: bool = False
    kind: str = "lowrank"
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    ndim: int = 0

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``{role: shape}`` of a dense kind's factors."""
        return {role: tuple(t.shape) for role, t in self.factors.items()}

    @property
    def rank(self) -> int:
        """The rank the scale divides by (0 for LoKr with both sides full and for full diffs)."""
        if self.kind == "lowrank":
            return int(self.a.shape[0])
        return KINDS[self.kind].rank(self.shapes())

    @property
    def use_dora(self) -> bool:
        return self.magnitude is not None

    @property
    def is_conv(self) -> bool:
        if self.kind == "lowrank":
            return self.a.dim() == 4
        return self.ndim == 4

    def size(self) -> tuple[int, int]:
        """``(d_out, K)`` of the weight this module changes (``K = in * kh * kw``)."""
        if self.kind == "lowrank":
            return int(self.b.shape[0]), math.prod(self.a.shape[1:])
        return KINDS[self.kind].size(self.shapes())

    def spec(self) -> AdapterSpec:
        if self.kind == "lowrank":
            return AdapterSpec(self.rank, self.alpha, self.use_dora, self.norm_axis, self.use_rslora)
        shapes = tuple(sorted(self.shapes().items()))
        return AdapterSpec(self.rank, self.alpha, self.use_dora, self.norm_axis, False, self.kind, shapes)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the module (factors, magnitude)."""
        own = [self.a, self.b] if self.kind == "lowrank" else list(self.factors.values())
        return own + ([] if self.magnitude is None else [self.magnitude])


@dataclass
class ParsedAdapter:
    """An adapter file read into ``modules[component][file module name]``, with the keys it came from."""

    dialect: str
    modules: dict[str, dict[str, ModuleAdapter]] = field(default_factory=dict)
    source_keys: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    comfyui_dora_scale: bool = False
    """True if per-output magnitudes hold ComfyUI's ``d = m (||W0|| + eps) / ||W0 + s B A||``, not ``m``
    (``formats.comfyui``): they become ``m`` only against the base weights."""

    def num_modules(self) -> int:
        return sum(len(v) for v in self.modules.values())


def build_module(
    where: str,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    magnitude: torch.Tensor | None,
    alpha: float | None,
    norm_axis: NormAxis = "out",
    use_rslora: bool = False,
) -> ModuleAdapter:
    """Check one module's tensors for consistency and return them as a ``ModuleAdapter``.

    ``where`` names the module in error messages (a key prefix of the file).
    """
    if a is None or b is None:
        missing = "down/A" if a is None else "up/B"
        raise AdapterFileError(f"adapter module {where!r} has no {missing} weight")
    if a.dim() not in (2, 4) or b.dim() != a.dim():
        raise AdapterFileError(
            f"adapter module {where!r}: down/A {tuple(a.shape)} and up/B {tuple(b.shape)} are not a Linear (2-D) "
            "or Conv2d (4-D) pair"
        )
    if b.shape[1] != a.shape[0] or (b.dim() == 4 and tuple(b.shape[2:]) != (1, 1)):
        raise AdapterFileError(
            f"adapter module {where!r}: ranks do not match, down/A has shape {tuple(a.shape)} and up/B "
            f"{tuple(b.shape)}"
        )
    if a.shape[0] == 0:
        raise AdapterFileError(f"adapter module {where!r} has rank 0")
    if a.numel() == 0 or b.numel() == 0:
        raise AdapterFileError(
            f"adapter module {where!r}: down/A {tuple(a.shape)} or up/B {tuple(b.shape)} has a dimension of size 0"
        )
    rank = int(a.shape[0])
    if alpha is None:
        alpha = float(rank)
    if not math.isfinite(alpha) or abs(alpha) > MAX_ALPHA:
        raise AdapterFileError(f"adapter module {where!r} has alpha {alpha!r}; expected a finite number within +-{MAX_ALPHA:g}")
    if magnitude is not None:
        want = b.shape[0] if norm_axis == "out" else a.shape[1]
        if magnitude.numel() != want:
            raise AdapterFileError(
                f"adapter module {where!r}: magnitude has shape {tuple(magnitude.shape)}, expected {want} values "
                f"(one per {'output' if norm_axis == 'out' else 'input'} channel)"
            )
        magnitude = magnitude.reshape(want)
    return bounded_rank(where, ModuleAdapter(a, b, magnitude, float(alpha), norm_axis, use_rslora))


def bounded_rank(where: str, ma: ModuleAdapter) -> ModuleAdapter:
    """``ma`` itself, or, if its rank exceeds ``min(d_out, K)`` (``K = in * kh * kw``), the same update ``s B A``
    at rank ``min(d_out, K)``: ``B' = s B A`` and ``A' = I`` (or ``B' = I``, ``A' = s B A``), alpha = rank.

    The factored norm's ``A A^T`` is r x r and the low-rank activation ``A x`` has r channels, so a file's rank
    would otherwise buy memory quadratic in it (a 51 MB file of rank 100000 on a 64-wide layer: 40 GB a render).
    Past ``min(d_out, K)`` the dense product is the smaller form and loses nothing but fp32 rounding (it is
    computed in fp64). Raises ``AdapterFileError`` if the product overflows fp32.
    """
    r, d_out = ma.rank, int(ma.b.shape[0])
    k = math.prod(ma.a.shape[1:])
    if r <= min(d_out, k):
        return ma
    delta = ma.spec().scale * (ma.b.reshape(d_out, r).double() @ ma.a.reshape(r, k).double())  # (d_out, K)
    delta = delta.float()
    if not torch.isfinite(delta).all():
        raise AdapterFileError(f"adapter module {where!r}: s B A overflows fp32 (rank {r}); the file is broken")
    ones = (1, 1) if ma.is_conv else ()
    if k <= d_out:
        a, b = torch.eye(k).reshape(k, *ma.a.shape[1:]), delta.reshape(d_out, k, *ones)
    else:
        a, b = delta.reshape(d_out, *ma.a.shape[1:]), torch.eye(d_out).reshape(d_out, d_out, *ones)
    return ModuleAdapter(a, b, ma.magnitude, float(min(d_out, k)), ma.norm_axis, use_rslora=False)


def build_dense_module(
    where: str,
    kind: str,
    factors: dict[str, torch.Tensor],
    magnitude: torch.Tensor | None,
    alpha: float | None,
    norm_axis: NormAxis = "out",
    ndim: int = 0,
) -> ModuleAdapter:
    """Check the factors of a dense delta kind (``core.delta_kinds``) and return them as a ``ModuleAdapter``.

    ``magnitude`` is already flat, with one value per output (``norm_axis="out"``) or input channel.
    """
    shapes = {role: tuple(t.shape) for role, t in factors.items()}
    problem = KINDS[kind].problem(shapes)
    if problem is not None:
        raise AdapterFileError(f"adapter module {where!r}: {problem}")
    d_out, k = KINDS[kind].size(shapes)
    rank = KINDS[kind].rank(shapes)
    if alpha is None:
        alpha = float(rank) if rank else 1.0
    if not math.isfinite(alpha) or abs(alpha) > MAX_ALPHA:
        raise AdapterFileError(f"adapter module {where!r} has alpha {alpha!r}; expected a finite number within +-{MAX_ALPHA:g}")
    if magnitude is not None:
        n = magnitude.numel()
        if (norm_axis == "out" and n != d_out) or (norm_axis == "in" and k % max(n, 1) != 0):
            raise AdapterFileError(
                f"adapter module {where!r}: magnitude has {n} values; this {KINDS[kind].label} module changes a "
                f"weight of {d_out} outputs and {k} inputs x kernel taps"
            )
        magnitude = magnitude.reshape(n)
    if not ndim:
        ndim = 4 if any(t.dim() == 4 for t in factors.values()) else 0
    return ModuleAdapter(None, None, magnitude, float(alpha), norm_axis, False, kind, dict(factors), ndim)
