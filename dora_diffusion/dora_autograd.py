"""One autograd function for the DoRA training step (one adapter at strength 1, norm per output channel).

    y = g * (base_out - b + s * B h) + b,      base_out = W0 x + b,  h = A dropout(x),  g = m / ||W0 + s B A||

Plain autograd would keep ``base_out`` (or ``B h``) alive for ``dL/dg``; this function keeps only its own
output ``y`` (which the next layer usually keeps anyway) and recovers ``base_out - b + s B h = (y - b) / g``
in the backward pass. Gradients, with ``gy = dL/dy``:

    dL/dbase_out = g * gy,   dL/dh = s (g * gy) B,   dL/dB = s (g * gy)^T h,   dL/dg = sum_N gy * (y - b) / g

The scale by ``g`` is applied in fp32 whatever the activation dtype, so a bf16 forward does not round
``g`` (which starts at exactly 1) to bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_TINY = 1e-30


def _channels(t: torch.Tensor, is_conv: bool) -> torch.Tensor:
    """View a per-channel vector so it broadcasts against activations."""
    return t.view(1, -1, 1, 1) if is_conv else t


def _sum_but_channel(t: torch.Tensor, is_conv: bool) -> torch.Tensor:
    return t.sum(dim=(0, 2, 3)) if is_conv else t.reshape(-1, t.shape[-1]).sum(dim=0)


class DoRAScaleFunction(torch.autograd.Function):
    """``y = g * (base_out - bias + scale * B h) + bias`` keeping only ``y`` for backward."""

    @staticmethod
    def forward(ctx, base_out, h, b, g, bias, scale: float, is_conv: bool):  # type: ignore[override]
        lora = F.conv2d(h, b.to(h.dtype)) if is_conv else F.linear(h, b.to(h.dtype))  # (..., d_out)
        combined = lora if lora.dtype == torch.float32 else lora.float()
        combined.mul_(scale).add_(base_out)
        bias32 = None if bias is None else _channels(bias.float(), is_conv)
        if bias32 is not None:
            combined.sub_(bias32)
        divisible = not bool((g.abs() < _TINY).any())
        kept = None if divisible else combined.clone()  # g has zeros: (y - b) / g is not recoverable
        y = combined.mul_(_channels(g, is_conv))
        if bias32 is not None:
            y.add_(bias32)
        y = y.to(base_out.dtype)
        ctx.save_for_backward(h, b, g, bias, y if divisible else kept)
        ctx.scale, ctx.is_conv, ctx.divisible = scale, is_conv, divisible
        ctx.base_dtype, ctx.b_dtype = base_out.dtype, b.dtype
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        h, b, g, bias, kept = ctx.saved_tensors
        is_conv, scale = ctx.is_conv, ctx.scale
        gy32 = gy.float()
        gyg = gy32 * _channels(g, is_conv)  # (..., d_out)
        grad_base = gyg.to(ctx.base_dtype) if ctx.needs_input_grad[0] else None
        grad_g = None
        if ctx.needs_input_grad[3]:
            dot = _sum_but_channel(gy32 * kept.float(), is_conv)  # sum gy * y  (or gy * combined)
            if ctx.divisible:
                if bias is not None:
                    dot = dot - bias.float() * _sum_but_channel(gy32, is_conv)
                dot = dot / g
            grad_g = dot
        grad_h = grad_b = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gl = (gyg * scale).to(h.dtype)
            if ctx.needs_input_grad[1]:
                bb = b.to(h.dtype)
                grad_h = F.conv2d(gl, bb.transpose(0, 1)) if is_conv else gl @ bb
            if ctx.needs_input_grad[2]:
                if is_conv:
                    grad_b = torch.einsum("nohw,nrhw->or", gl, h)[:, :, None, None]
                else:
                    grad_b = gl.reshape(-1, gl.shape[-1]).t() @ h.reshape(-1, h.shape[-1])
                grad_b = grad_b.to(ctx.b_dtype)
        return grad_base, grad_h, grad_b, grad_g, None, None, None
