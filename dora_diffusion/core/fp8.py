"""Frozen base weights stored in float8 (e4m3fn) and computed in a wider dtype, one layer at a time.

A ``Float8Linear`` / ``Float8Conv2d`` replaces a frozen ``nn.Linear`` / ``nn.Conv2d`` and keeps its weight as

    q = e4m3fn(W / s),   s_i = 2^ceil(log2(max_j |W_ij| / 448))     per output channel i (s_i = 1 for a zero row)
    W~ = q * s                                                       (``weight``: dequantized in ``compute_dtype``)

448 is e4m3fn's largest finite value. The scale is a power of two, so ``q * s`` is exact in bf16, fp16 (within
its range) and fp32 alike: the dequantized ``W~`` is the same number whatever dtype computes with it. A plain
cast (kohya's ``--fp8_base``: ``unet.to(torch.float8_e4m3fn)``, upcast per op by autocast) has no scale, and
e4m3fn's smallest normal is 2^-6: SDXL's weights are mostly below 0.05 in magnitude, and those below 2^-6 keep 1
to 3 significant bits or flush to zero; with the per-channel scale a row's largest weight lands in (224, 448] and every
weight down to 1/14336 of it (2^-6 s) keeps e4m3fn's 4 significant bits.

The product ``W~ x`` runs through ``Float8Product``, which dequantizes in its forward and again in its backward,
so autograd keeps no dequantized copy of the weight between them (a plain ``F.linear(x, W~)`` would keep one per
layer until the backward, more memory than the bf16 base). The bias stays a parameter in the compute dtype.

Every reader of the weight (the forward, DoRA's norm and initial magnitude, ``Adapter.delta``) sees ``weight``,
the one dequantized ``W~``: an untrained DoRA adapter on a float8 base reproduces that base.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

E4M3_MAX = 448.0
"""Largest finite value of ``torch.float8_e4m3fn``."""


def float8_dtype() -> torch.dtype:
    """``torch.float8_e4m3fn``; a clear error on a torch without it (it arrived in torch 2.1)."""
    dtype = getattr(torch, "float8_e4m3fn", None)
    if dtype is None:
        raise RuntimeError(
            f"torch {torch.__version__} has no float8_e4m3fn dtype, which a float8 base (--fp8_base) stores its "
            "weights in: install torch >= 2.1, or train without --fp8_base"
        )
    return dtype


@torch.no_grad()
def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, s)``: ``q`` float8 e4m3fn shaped like ``weight``, ``s`` (d_out,) fp32 powers of two, ``W ~ q * s``."""
    w = weight.detach().float()
    amax = w.reshape(w.shape[0], -1).abs().amax(dim=1)  # (d_out,)
    if not torch.isfinite(amax).all():
        raise ValueError(
            f"a weight of shape {tuple(weight.shape)} has NaN or infinite values: it cannot be stored in float8"
        )
    exponent = torch.ceil(torch.log2(amax / E4M3_MAX))
    scale = torch.where(amax > 0, torch.exp2(exponent), torch.ones_like(amax))  # (d_out,)
    q = (w / _per_row(scale, w)).to(float8_dtype())  # |w / s| <= 448: no overflow
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * s`` in ``dtype`` (exact: ``q`` has 4 significant bits and ``s`` is a power of two)."""
    return q.to(dtype) * _per_row(scale.to(dtype), q)


def _per_row(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


class Float8Weight:
    """What ``Float8Linear`` and ``Float8Conv2d`` share: the stored ``weight_fp8`` and ``weight_scale`` buffers,
    ``compute_dtype``, and ``weight``, the dequantized ``W~``, built afresh on each read (never kept).

    ``module.to(dtype)`` changes ``compute_dtype`` (and the bias) and keeps the weight in float8.
    """

    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor
    compute_dtype: torch.dtype

    def _store(self, weight: torch.Tensor, bias: nn.Parameter | None, compute_dtype: torch.dtype) -> None:
        q, scale = quantize(weight)
        self.register_buffer("weight_fp8", q)
        self.register_buffer("weight_scale", scale)
        kept = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        self.register_parameter("bias", kept)
        self.compute_dtype = compute_dtype

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight ``W~`` in ``compute_dtype`` (a new tensor each read; it never requires grad)."""
        return dequantize(self.weight_fp8, self.weight_scale, self.compute_dtype)

    def weight_key(self) -> tuple:
        """What ``weight`` depends on, by storage and version: the cache key of norms computed from it."""
        q, s = self.weight_fp8, self.weight_scale
        return (q.data_ptr(), q._version, s.data_ptr(), s._version, self.compute_dtype, q.device)

    def product(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``W~ x (+ bias)`` with no dequantized weight kept for the backward."""
        return Float8Product.apply(x, self, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x, self.bias)

    def _apply(self, fn, recurse: bool = True):
        q, scale = self.weight_fp8, self.weight_scale
        super()._apply(fn, recurse)  # a dtype change casts every floating buffer, the float8 values and scale too
        device = self.weight_fp8.device
        if self.weight_fp8.dtype != q.dtype:  # module.to(dtype): compute in it, keep the stored values as they were
            self.compute_dtype = self.weight_fp8.dtype
            self.weight_fp8 = q.to(device)
        if self.weight_scale.dtype != scale.dtype:  # an fp16 cast could flush a scale below 2^-24 to zero
            self.weight_scale = scale.to(device)
        return self

    def extra_repr(self) -> str:
        compute = str(self.compute_dtype).removeprefix("torch.")
        return f"{super().extra_repr()}, weight float8_e4m3fn x per-channel scale, compute {compute}"


class Float8Linear(Float8Weight, nn.Linear):
    """A frozen ``nn.Linear`` whose weight is stored in float8 e4m3fn with a per-output-row scale."""

    def __init__(self, source: nn.Linear, compute_dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = source.in_features, source.out_features
        self._store(source.weight, source.bias, compute_dtype)
        self.train(source.training)


class Float8Conv2d(Float8Weight, nn.Conv2d):
    """A frozen ``nn.Conv2d`` whose weight is stored in float8 e4m3fn with a per-output-filter scale."""

    def __init__(self, source: nn.Conv2d, compute_dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):  # fmt: skip
            setattr(self, name, getattr(source, name))
        if self.padding_mode != "zeros":
            raise ValueError(f"a float8 Conv2d supports padding_mode='zeros' only, got {self.padding_mode!r}")
        self._store(source.weight, source.bias, compute_dtype)
        self.train(source.training)


class Float8Product(torch.autograd.Function):
    """``y = W~ x + b`` for a ``Float8Linear`` or ``Float8Conv2d`` that keeps nothing but the module: the backward
    dequantizes ``W~`` again for ``dL/dx = W~^T dL/dy`` (the weight is frozen: no ``dL/dW``)."""

    @staticmethod
    def forward(ctx, x, module, bias):  # type: ignore[override]
        w = module.weight
        if isinstance(module, nn.Conv2d):
            y = F.conv2d(x, w, bias, module.stride, module.padding, module.dilation, module.groups)
        else:
            y = F.linear(x, w, bias)
        ctx.module, ctx.x_shape, ctx.x_dtype, ctx.y_dtype = module, x.shape, x.dtype, y.dtype
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        module = ctx.module
        need_x, _, need_bias = ctx.needs_input_grad
        grad_x = grad_bias = None
        if need_x:
            with torch.autocast(gy.device.type, enabled=False):
                w = dequantize(module.weight_fp8, module.weight_scale, ctx.y_dtype)
                g = gy.to(ctx.y_dtype)
                if isinstance(module, nn.Conv2d):
                    grad_x = torch.nn.grad.conv2d_input(
                        ctx.x_shape, w, g, module.stride, module.padding, module.dilation, module.groups
                    )
                else:
                    grad_x = g @ w  # (..., d_in)
            grad_x = grad_x.to(ctx.x_dtype)
        if need_bias:
            grad_bias = gy.sum(dim=(0, 2, 3)) if isinstance(module, nn.Conv2d) else gy.reshape(-1, gy.shape[-1]).sum(0)
        return grad_x, None, grad_bias


def to_float8(model: nn.Module, compute_dtype: torch.dtype | None = None) -> int:
    """Replace every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` (zero padding) by its float8 twin, in place;
    returns how many were replaced. Each computes in ``compute_dtype`` (default: its weight's dtype until now).
    Call it on a frozen model before adapters are added: their initial magnitudes must come from the dequantized
    weights, so a model that already carries adapters is refused."""
    float8_dtype()
    if any(hasattr(m, "base_layer") and len(getattr(m, "adapters", ())) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} already carries adapters: store the base in float8 first, then add the adapters "
            "(their magnitudes start at the norms of the dequantized weights)"
        )
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear or (type(child) is nn.Conv2d and child.padding_mode == "zeros"):
                if child.weight.requires_grad or (child.bias is not None and child.bias.requires_grad):
                    raise ValueError(
                        f"{name} ({type(child).__name__}) has trainable weights; a float8 base is frozen: call "
                        "model.requires_grad_(False) first"
                    )
                twin = Float8Linear if isinstance(child, nn.Linear) else Float8Conv2d
                setattr(parent, name, twin(child, compute_dtype or child.weight.dtype))
                count += 1
    return count


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by ``model``'s parameters and buffers (a float8 weight counts 1 byte a value)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


__all__ = [
    "E4M3_MAX", "Float8Conv2d", "Float8Linear", "Float8Product", "Float8Weight", "dequantize", "float8_dtype",
    "quantize", "to_float8", "weight_bytes",
]  # fmt: skip
