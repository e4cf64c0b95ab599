"""How a frozen base module multiplies, for each kind that can carry an adapter.

A ``Geometry`` wraps one ``nn.Linear`` or ``nn.Conv2d`` (``groups=1``, zero padding) and answers every
shape question the adapter code has, so no other module branches on the layer kind:

    Linear:  A (r, d_in),             B (d_out, r),        A x = x A^T,            B h = h B^T
    Conv2d:  A (r, c_in, kh, kw),     B (c_out, r, 1, 1),  A x = conv(x, A) with the base's stride,
             padding and dilation,                        B h = 1x1 conv(h, B)

A "row" (one output channel) is a row of a Linear weight or one filter ``(c_in, kh, kw)`` of a Conv2d;
``w0_2d`` flattens the weight to ``(d_out, K)`` with ``K = d_in`` or ``c_in kh kw``. The loader checks file
tensors with ``check_fit`` before it wraps anything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dora_diffusion.core.config import NormAxis
from dora_diffusion.core.fp8 import Float8Weight
from dora_diffusion.core.norms import row_sq_norms


class Geometry:
    """Shapes and products of one base module; subclasses per kind."""

    kind = ""
    direct = False
    """True if the adapter may do the base matmul itself (``F.linear``) instead of calling the module."""
    sizes = ("in_features", "out_features")
    """The base module's attributes holding its input and output sizes."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._sq: tuple[tuple, torch.Tensor] | None = None
        self.quantized = isinstance(module, Float8Weight)
        """The weight is stored in float8 (``fp8.Float8Weight``): ``weight`` dequantizes it on each read, and the base
        product goes through the module (``Float8Product``), which keeps no dequantized copy for the backward."""
        if self.quantized:
            self.direct = False

    @property
    def weight(self) -> torch.Tensor:
        """``W0`` (a float8 base's dequantized weight, built on each read)."""
        return self.module.weight

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the base product computes in (without reading a float8 weight)."""
        return self.module.compute_dtype if self.quantized else self.module.weight.dtype

    @property
    def weight_requires_grad(self) -> bool:
        """True if gradients must reach ``W0`` itself (never for a float8 base, which is frozen)."""
        return not self.quantized and self.module.weight.requires_grad

    def weight_key(self) -> tuple:
        """What ``W0`` is, by storage and version: the cache key of anything computed from it."""
        if self.quantized:
            return self.module.weight_key()
        w = self.module.weight
        return (w.data_ptr(), w._version, w.dtype, w.device)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.module.bias

    @property
    def in_features(self) -> int:
        return getattr(self.module, self.sizes[0])

    @property
    def out_features(self) -> int:
        return getattr(self.module, self.sizes[1])

    def shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of ``(A, B)`` for an adapter of this rank, as stored in files."""
        raise NotImplementedError

    def magnitude_size(self, norm_axis: NormAxis) -> int:
        """Length of the magnitude vector: one per output channel, or per input channel for legacy files."""
        return self.out_features if norm_axis == "out" else self.in_features

    def check_fit(
        self, rank: int, a_shape: tuple[int, ...], b_shape: tuple[int, ...], magnitude_numel: int | None, norm_axis: NormAxis
    ) -> str | None:
        """None if tensors of these shapes fit this module, else a message naming both shapes."""
        want_a, want_b = self.shapes(rank)
        if tuple(a_shape) != want_a or tuple(b_shape) != want_b:
            return (
                f"the adapter has down/A {tuple(a_shape)} and up/B {tuple(b_shape)}, "
                f"this {self.kind} with weight {tuple(self.weight.shape)} needs {want_a} and {want_b}"
            )
        if magnitude_numel is not None and magnitude_numel != self.magnitude_size(norm_axis):
            return f"magnitude has {magnitude_numel} values, this {self.kind} needs {self.magnitude_size(norm_axis)}"
        return None

    def w0_2d(self) -> torch.Tensor:
        """The base weight as ``(d_out, K)``."""
        return self.weight.reshape(self.weight.shape[0], -1)

    def w0_sq(self) -> torch.Tensor:
        """``rowsum(W0^2)`` in fp32, (d_out,); cached until the weight's storage or version changes."""
        if torch.compiler.is_compiling():
            return row_sq_norms(self.w0_2d())
        key = self.weight_key()
        if self._sq is None or self._sq[0] != key or stale(self._sq[1]):
            self._sq = (key, row_sq_norms(self.w0_2d()))
        return self._sq[1]

    def down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``A x``."""
        raise NotImplementedError

    def up(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``B h``."""
        raise NotImplementedError

    def add_up(self, y: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> None:
        """``y += B h`` in place."""
        y.add_(self.up(h, b))

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """``W0 x`` without bias."""
        if self.quantized:
            return self.module.product(x)
        return self.apply(x, self.weight)

    def apply(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``W x`` without bias for a weight ``w`` shaped like ``W0`` (a dense change of weight)."""
        raise NotImplementedError

    def channel(self, v: torch.Tensor) -> torch.Tensor:
        """A per-output-channel vector viewed to broadcast against the output."""
        raise NotImplementedError

    def input_channel(self, v: torch.Tensor) -> torch.Tensor:
        """A per-input-channel vector viewed to broadcast against the input."""
        return self.channel(v)


class LinearGeometry(Geometry):
    """``nn.Linear``: ``y = x W0^T + b``."""

    kind = "Linear"
    direct = True

    def shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (rank, self.in_features), (self.out_features, rank)

    def down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return F.linear(x, a)  # (..., r)

    def up(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(h, b)  # (..., d_out)

    def add_up(self, y: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> None:
        h2 = h.reshape(-1, h.shape[-1])
        if y.dim() == 2:  # in place on y itself (autograd then keeps no copy of a view)
            y.addmm_(h2, b.t())
        else:
            y.view(-1, y.shape[-1]).addmm_(h2, b.t())  # no N x d_out temporary

    def apply(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w)

    def channel(self, v: torch.Tensor) -> torch.Tensor:
        return v


class Conv2dGeometry(Geometry):
    """``nn.Conv2d`` with ``groups=1`` and zero padding: ``y = conv(x, W0) + b``."""

    kind = "Conv2d"
    sizes = ("in_channels", "out_channels")

    def __init__(self, module: nn.Conv2d) -> None:
        if module.groups != 1:
            raise ValueError(f"DoRA/LoRA on a Conv2d supports groups=1 only, this Conv2d has groups={module.groups}")
        if module.padding_mode != "zeros":
            raise ValueError(f"DoRA/LoRA on a Conv2d supports padding_mode='zeros' only, got {module.padding_mode!r}")
        super().__init__(module)

    def shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        kh, kw = self.module.kernel_size
        return (rank, self.in_features, kh, kw), (self.out_features, rank, 1, 1)

    def down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        c = self.module
        return F.conv2d(x, a, None, c.stride, c.padding, c.dilation)  # (N, r, H', W')

    def up(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.conv2d(h, b)  # (N, d_out, H', W')

    def apply(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        c = self.module
        return F.conv2d(x, w, None, c.stride, c.padding, c.dilation)

    def channel(self, v: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1, 1, 1)


def geometry_of(module: nn.Module) -> Geometry:
    """The geometry of an ``nn.Linear`` or ``nn.Conv2d``; any other module is refused."""
    if isinstance(module, nn.Linear):
        return LinearGeometry(module)
    if isinstance(module, nn.Conv2d):
        return Conv2dGeometry(module)
    raise TypeError(f"cannot add a DoRA/LoRA adapter to {type(module).__name__}; only nn.Linear and nn.Conv2d")


def stale(t: torch.Tensor) -> bool:
    """A cached tensor made under inference_mode cannot be saved for backward outside it."""
    return t.is_inference() and not torch.is_inference_mode_enabled()
