"""Autograd functions for the DoRA training step (one adapter at strength 1, norm per output channel).

    y = g * (W0 x + s * B h) + b,      h = A dropout(x),  g = m / ||W0 + s B A||  (detached norm)

Plain autograd keeps ``W0 x`` (or ``B h``) alive for ``dL/dg``. These functions keep only their output
``y`` (which the next layer usually keeps anyway) and recover ``W0 x + s B h = (y - b) / g`` in the
backward pass. With ``gy = dL/dy``:

    dL/dx += W0^T (g * gy),   dL/dh = s (g * gy) B,   dL/dB = s (g * gy)^T h,   dL/dg = sum_N gy * (y - b) / g

A channel whose ``g`` is about 0 (a magnitude at 0) cannot recover its pre-scale output from ``y``: the
forward keeps the ``_KEEP`` channels of smallest ``|g|`` exactly (an N x 4 tensor), chosen on the device, so no
forward or backward reads a value back to the host (each such read is a GPU sync).

``DoRALinearFunction`` also does the base matmul itself (or takes ``W0 x`` from its caller, who may have got it
from one matmul with ``A``'s rows stacked under ``x``: ``[x; A] W0^T`` gives the output and the norm's
``A W0^T`` in one pass over ``W0``), so the forward builds ``y`` in place (no N x d_out temporary beyond
``y``), and the backward works in blocks of rows and output channels (temporaries of about
``_CHUNK_ELEMENTS`` at most, each block of ``W0`` read once). With ``recompute=True`` it keeps the input ``x``
instead of ``y`` and recomputes ``W0 x + s B h`` block by block in the backward (one extra
``N x d_in x d_out`` matmul): no extra memory at all when ``x`` is kept anyway (by ``A``'s own backward) and
nothing downstream keeps ``y``. ``DoRAScaleFunction`` takes the base output as an input, for Conv2d and for
base modules with hooks (e.g. accelerate offloading) that must be called as modules; for a Conv2d it can
likewise keep ``x`` and recompute the base conv in the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_TINY = 1e-30
"""Channels with ``|g|`` below this cannot recover their pre-scale output from ``y``."""
_KEEP = 4
"""Pre-scale output channels kept exactly (the ``_KEEP`` smallest ``|g|``) for those channels' ``dL/dg``."""
_CHUNK_ELEMENTS = 1 << 20
_MIN_COLS = 256  # narrower channel blocks make the backward matmuls inefficient


def _channels(t: torch.Tensor, is_conv: bool) -> torch.Tensor:
    """View a per-channel vector so it broadcasts against activations."""
    return t.view(1, -1, 1, 1) if is_conv else t


def _up(h: torch.Tensor, b: torch.Tensor, is_conv: bool) -> torch.Tensor:
    """``B h`` in ``h``'s dtype: a 1x1 conv for a Conv2d, a matmul for a Linear."""
    return F.conv2d(h, b.to(h.dtype)) if is_conv else F.linear(h, b.to(h.dtype))


def _sum_but_channel(t: torch.Tensor, is_conv: bool) -> torch.Tensor:
    return t.sum(dim=(0, 2, 3)) if is_conv else t.reshape(-1, t.shape[-1]).sum(dim=0)


def _smallest(g: torch.Tensor) -> torch.Tensor:
    """Indices of the ``_KEEP`` channels with the smallest ``|g|``: the ones whose pre-scale output is kept.

    A fixed number, chosen on the device: deciding on the host which channels have ``g ~ 0`` would wait for
    the device on every forward.
    """
    return torch.topk(g.abs(), min(_KEEP, g.numel()), largest=False, sorted=False).indices


def _grad_g(
    dot: torch.Tensor, gsum: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None, idx: torch.Tensor, dot_kept: torch.Tensor
) -> torch.Tensor:
    """``dL/dg = sum gy * (y - b) / g`` from ``dot = sum gy * y`` and ``gsum = sum gy``, per channel.

    Where ``|g| < _TINY`` the division cannot recover the pre-scale output; there ``dot_kept`` (``sum gy * kept``
    over the channels ``idx``, kept exactly) is used, and a channel with ``g ~ 0`` beyond the ``_KEEP`` kept
    ones gets gradient 0. All on the device, no branch on values.
    """
    if bias is not None:
        dot = dot - bias.float() * gsum
    tiny = g.abs() < _TINY
    grad = torch.where(tiny, torch.zeros_like(dot), dot / torch.where(tiny, torch.ones_like(g), g))
    return grad.scatter(0, idx, torch.where(tiny[idx], dot_kept, grad[idx]))


def _blocks(n: int, d_out: int, exact_sum: bool) -> tuple[int, int]:
    """Rows and output channels per backward block, so a block's temporaries hold at most about
    ``_CHUNK_ELEMENTS`` values. Splitting the channels reads each block of ``W0`` once (splitting the rows
    re-reads all of ``W0`` per block); it needs ``grad_x`` summed over channel blocks, so only when that sum
    is exact enough (fp32). Blocks are of equal size, with no small remainder matmul."""
    cols = d_out
    if exact_sum and n * d_out > _CHUNK_ELEMENTS:
        cols = _even_split(d_out, max(_MIN_COLS, _CHUNK_ELEMENTS // n))
    return _even_split(n, max(1, _CHUNK_ELEMENTS // cols)), cols


def _even_split(total: int, most: int) -> int:
    """The size of ``ceil(total / most)`` equal parts of ``total`` (each at most ``most``)."""
    parts = -(-total // min(most, total))
    return -(-total // parts)


def _block(buf: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A contiguous view of the front of a flat buffer, shaped like ``like``."""
    return buf[: like.numel()].view(like.shape)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``out = a @ b`` on the first channel block, ``out += a @ b`` after."""
    if first:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)


class DoRALinearFunction(torch.autograd.Function):
    """``y = g * (x W0^T + s h B^T) + b`` for a Linear, including the base matmul."""

    @staticmethod
    def forward(ctx, x, h, w0, bias, b, g, scale: float, recompute: bool = False, w0x: list | None = None):  # type: ignore[override]
        d_out = w0.shape[0]
        cdt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else w0.dtype
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(cdt)
            h2 = h.reshape(-1, h.shape[-1]).to(cdt)
            y = w0x.pop() if w0x else x2 @ w0.to(cdt).t()  # (N, d_out); w0x: [the caller's W0 x], ours to overwrite
            y.addmm_(h2, b.to(cdt).t(), alpha=scale)  # W0 x + s B h, in place
            idx = None if recompute else _smallest(g)
            kept = None if recompute else y.index_select(1, idx)  # (N, _KEEP): the channels g ~ 0 may hide
            if bias is None:
                y.mul_(g)
            else:
                torch.addcmul(bias.to(cdt), y, g, out=y)  # g * (.) + b in one pass
        ctx.save_for_backward(h2, w0, bias, b, g, x2 if recompute else y, idx, kept)
        ctx.scale, ctx.cdt, ctx.recompute = scale, cdt, recompute
        ctx.x_shape, ctx.x_dtype, ctx.h_shape, ctx.h_dtype = x.shape, x.dtype, h.shape, h.dtype
        return y.view(*x.shape[:-1], d_out)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        h2, w0, bias, b, g, saved, idx, kept = ctx.saved_tensors
        cdt, scale = ctx.cdt, ctx.scale
        need_x, need_h, need_b, need_g = (ctx.needs_input_grad[i] for i in (0, 1, 4, 5))
        gy2 = gy.reshape(-1, gy.shape[-1])
        n, d_out = gy2.shape
        grad_x = torch.empty(n, w0.shape[1], dtype=cdt, device=gy.device) if need_x else None
        grad_h = torch.empty(n, h2.shape[1], dtype=cdt, device=gy.device) if need_h else None
        grad_b = torch.zeros(b.shape, dtype=torch.float32, device=gy.device) if need_b else None
        dot = torch.zeros(d_out, dtype=torch.float32, device=gy.device)
        gsum = torch.zeros(d_out, dtype=torch.float32, device=gy.device)
        w0c, sb = w0.to(cdt), (b * scale).to(cdt)
        rows, cols = _blocks(n, d_out, exact_sum=cdt == torch.float32)
        # Block temporaries live in two buffers allocated once: a fresh multi-MB tensor per block costs
        # more (page faults) than the elementwise work on it.
        gyg_buf = torch.empty(rows * cols, dtype=cdt, device=gy.device)
        prod_buf = torch.empty(rows * cols, dtype=torch.float32, device=gy.device) if need_g else None
        for j in range(0, d_out, cols):  # output channels outermost: each block of W0 is read once
            jj = slice(j, j + cols)
            w0j, sbj, gj = w0c[jj], sb[jj], g[jj]
            for i in range(0, n, rows):
                ii = slice(i, i + rows)
                gc = gy2[ii, jj]
                gyg = torch.mul(gc, gj, out=_block(gyg_buf, gc))  # g * gy, (rows, cols)
                if need_x:
                    _mm_into(grad_x[ii], gyg, w0j, first=j == 0)
                if need_h:
                    _mm_into(grad_h[ii], gyg, sbj, first=j == 0)
                if need_b:
                    grad_b[jj].addmm_(gyg.t().float(), h2[ii].float())
                if not need_g:
                    continue
                if ctx.recompute:  # saved = x: rebuild W0 x + s B h for this block
                    z = torch.mm(saved[ii], w0j.t(), out=_block(prod_buf, gc) if cdt == torch.float32 else None)
                    other = z.addmm_(h2[ii], sbj.t())
                else:
                    other = saved[ii, jj]
                    if bias is not None:  # for the bias term of (y - b) / g
                        gsum[jj] += gc.float().sum(dim=0)
                if gc.dtype == other.dtype == torch.float32:
                    dot[jj] += torch.mul(gc, other, out=_block(prod_buf, gc)).sum(dim=0)
                else:
                    dot[jj] += (gc.float() * other.float()).sum(dim=0)
        if not need_g:
            grad_g = None
        elif ctx.recompute:
            grad_g = dot
        else:
            dot_kept = (gy2.index_select(1, idx).float() * kept.float()).sum(dim=0)
            grad_g = _grad_g(dot, gsum, g, bias, idx, dot_kept)
        return (
            None if grad_x is None else grad_x.view(ctx.x_shape).to(ctx.x_dtype),
            None if grad_h is None else grad_h.view(ctx.h_shape).to(ctx.h_dtype),
            None,
            None,
            None if grad_b is None else (grad_b * scale).to(b.dtype),
            grad_g,
            None,
            None,
            None,
        )


class DoRAScaleFunction(torch.autograd.Function):
    """``y = g * (base_out - bias + scale * B h) + bias`` given the base output.

    Keeps ``y``; or, with ``base`` (the base product ``W0 x`` without bias, e.g. ``Conv2dGeometry.base``) and
    its input ``x``, keeps ``x`` instead and recomputes ``W0 x + s B h`` in the backward (one more base conv,
    no kept output). The backward's per-channel sums run in blocks of at most ``_CHUNK_ELEMENTS``: no
    full-size temporary beyond the gradient it returns.
    """

    @staticmethod
    def forward(ctx, base_out, h, b, g, bias, scale: float, is_conv: bool, x=None, base=None):  # type: ignore[override]
        lora = _up(h, b, is_conv)  # (..., d_out)
        combined = lora if lora.dtype == torch.float32 else lora.float()
        combined.mul_(scale).add_(base_out)
        bias32 = None if bias is None else _channels(bias.float(), is_conv)
        if bias32 is not None:
            combined.sub_(bias32)
        channel = 1 if is_conv else combined.dim() - 1
        recompute = x is not None
        idx = None if recompute else _smallest(g)
        kept = None if recompute else combined.index_select(channel, idx)  # the channels g ~ 0 may hide, kept exactly
        y = combined.mul_(_channels(g, is_conv))
        if bias32 is not None:
            y.add_(bias32)
        y = y.to(base_out.dtype)
        ctx.save_for_backward(h, b, g, bias, x if recompute else y, idx, kept)
        ctx.scale, ctx.is_conv, ctx.channel, ctx.base = scale, is_conv, channel, base
        ctx.base_dtype, ctx.b_dtype = base_out.dtype, b.dtype
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        h, b, g, bias, saved, idx, kept = ctx.saved_tensors
        is_conv, scale = ctx.is_conv, ctx.scale
        gy32 = gy.float()
        grad_g = None
        if ctx.needs_input_grad[3]:
            if ctx.base is not None:  # saved = x: rebuild the pre-scale output W0 x + s B h
                with torch.no_grad():
                    pre = ctx.base(saved)
                    pre = pre.add_(_up(h, b, is_conv), alpha=scale)
                grad_g = _channel_dot(gy32, pre, is_conv)
                del pre
            else:
                dot = _channel_dot(gy32, saved, is_conv)
                dot_kept = _sum_but_channel(gy32.index_select(ctx.channel, idx) * kept, is_conv)
                grad_g = _grad_g(dot, _sum_but_channel(gy32, is_conv), g, bias, idx, dot_kept)
        gyg = gy32 * _channels(g, is_conv)  # (..., d_out): the gradient of base_out, returned
        grad_h = grad_b = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gl = gyg.to(h.dtype)
            if ctx.needs_input_grad[1]:
                sb = (b * scale).to(h.dtype)
                grad_h = F.conv2d(gl, sb.transpose(0, 1)) if is_conv else gl @ sb
            if ctx.needs_input_grad[2]:
                if is_conv:
                    grad_b = torch.einsum("nohw,nrhw->or", gl, h)[:, :, None, None]
                else:
                    grad_b = gl.reshape(-1, gl.shape[-1]).t() @ h.reshape(-1, h.shape[-1])
                grad_b = (grad_b * scale).to(ctx.b_dtype)
        grad_base = gyg.to(ctx.base_dtype) if ctx.needs_input_grad[0] else None
        return grad_base, grad_h, grad_b, grad_g, None, None, None, None, None


def _channel_dot(a: torch.Tensor, b: torch.Tensor, is_conv: bool) -> torch.Tensor:
    """``sum(a * b)`` over every axis but the channel axis, in fp32, (C,); temporaries of at most
    ``_CHUNK_ELEMENTS`` values (blocks of rows for a Linear, of channels per sample for a Conv2d)."""
    if is_conv and not (a.is_contiguous() and b.is_contiguous()):
        return _sum_but_channel(a.float() * b.float(), is_conv)  # e.g. channels_last: no cheap channel blocks
    c = a.shape[1] if is_conv else a.shape[-1]
    out = torch.zeros(c, dtype=torch.float32, device=a.device)
    if is_conv:
        a3, b3 = a.reshape(a.shape[0], c, -1), b.reshape(b.shape[0], c, -1)  # (N, C, HW), views
        step = _even_split(c, max(1, _CHUNK_ELEMENTS // a3.shape[2]))
        blocks = [(a3[n, j : j + step], b3[n, j : j + step], slice(j, j + step), 1) for n in range(a3.shape[0]) for j in range(0, c, step)]
    else:
        a2, b2 = a.reshape(-1, c), b.reshape(-1, c)
        step = _even_split(a2.shape[0], max(1, _CHUNK_ELEMENTS // c))
        blocks = [(a2[i : i + step], b2[i : i + step], slice(None), 0) for i in range(0, a2.shape[0], step)]
    buf = None
    for x1, x2, where, dim in blocks:
        if x1.dtype == x2.dtype == torch.float32:
            if buf is None:
                buf = torch.empty(x1.numel(), dtype=torch.float32, device=a.device)
            prod = torch.mul(x1, x2, out=_block(buf, x1))
        else:
            prod = x1.float() * x2.float()
        out[where] += prod.sum(dim=dim)
    return out
