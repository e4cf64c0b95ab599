"""Weight norms of ``W0 + s B A`` without forming the d_out x d_in matrix where it can be avoided.

All functions take flattened 2-D views: ``w0`` (d_out, K), ``a`` (r, K), ``b`` (d_out, r), where
``K = d_in`` for a Linear and ``in_channels * kh * kw`` for a Conv2d, and return fp32 results.
"""

from __future__ import annotations

import torch

EPS = 1e-12
"""Floor of a norm before dividing by it: an all-zero row gives ``g = 0`` instead of NaN."""

_CHUNK_ELEMENTS = 1 << 24
"""At most this many elements of ``w0`` are upcast to fp32 at a time."""


def row_sq_norms(w0: torch.Tensor) -> torch.Tensor:
    """``rowsum(W0 ** 2)`` in fp32, shape (d_out,); upcasts at most ``_CHUNK_ELEMENTS`` at a time."""
    if w0.dtype == torch.float32:
        return (w0 * w0).sum(dim=1)
    out = torch.empty(w0.shape[0], dtype=torch.float32, device=w0.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, w0.shape[1]))
    for i in range(0, w0.shape[0], step):
        chunk = w0[i : i + step].float()
        out[i : i + step] = (chunk * chunk).sum(dim=1)
    return out


def _w0_at(w0: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``W0 A^T`` in fp32, shape (d_out, r); never holds more than a chunk of ``W0`` in fp32."""
    if w0.dtype == torch.float32:
        return w0 @ a.t()
    out = torch.empty(w0.shape[0], a.shape[0], dtype=torch.float32, device=w0.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, w0.shape[1]))
    for i in range(0, w0.shape[0], step):
        out[i : i + step] = w0[i : i + step].float() @ a.t()
    return out


@torch.no_grad()
def factored_row_norm(
    w0: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    w0_sq: torch.Tensor | None = None,
    w0_at: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-output-channel norm ``n_i = ||row_i(W0 + s B A)||_2`` in fp32, shape (d_out,).

    ``n^2 = rowsum(W0^2) + 2 s rowsum(B * (W0 A^T)) + s^2 rowsum(B * (B G))`` with ``G = A A^T``;
    memory O(d_out r + r^2). With ``B = 0`` the cross and Gram terms are exactly zero, so ``n`` equals
    ``sqrt(rowsum(W0^2))`` bit for bit. Pass a cached ``w0_sq = row_sq_norms(w0)`` to skip that term, and
    ``w0_at = W0 A^T`` (d_out, r) when the caller got it from its own pass over ``W0``.
    """
    a32, b32 = a.float(), b.float()
    sq = row_sq_norms(w0) if w0_sq is None else w0_sq
    cross = (b32 * (_w0_at(w0, a32) if w0_at is None else w0_at.float())).sum(dim=1)  # (d_out,)
    gram = (b32 * (b32 @ (a32 @ a32.t()))).sum(dim=1)  # (d_out,)
    n2 = sq + (2.0 * scale) * cross + (scale * scale) * gram
    return n2.clamp_min(0.0).sqrt()


@torch.no_grad()
def dense_col_norm(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, in_channels: int) -> torch.Tensor:
    """Legacy per-input norm: for each input channel c, ``||W0 + s B A||`` over (out, kh, kw), shape (in_channels,).

    Used for LyCORIS < 3.2 / OneTrainer files, which normalise ``W' = (W0 + s B A) diag(m / n)`` per input.
    """
    w = w0.float() + scale * (b.float() @ a.float())  # (d_out, K)
    col_sq = (w * w).sum(dim=0)  # (K,)
    return col_sq.view(in_channels, -1).sum(dim=1).sqrt()


@torch.no_grad()
def exact_row_norms(
    w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||row_i(W0)||, ||row_i(W0 + s B A)||)`` in float64, each (d_out,), for file conversions.

    ``w0`` is the base weight in any shape (d_out, ...); ``a`` (r, ...) and ``b`` (d_out, r, ...) are flattened
    like it. Dense and in float64 on ``w0``'s device, so a conversion and its inverse round-trip to fp32 rounding;
    not for the forward.
    """
    w = w0.reshape(w0.shape[0], -1).double()  # (d_out, K)
    r = a.shape[0]
    ba = b.reshape(-1, r).to(w.device, torch.float64) @ a.reshape(r, -1).to(w.device, torch.float64)  # (d_out, K)
    adapted = w + scale * ba
    return w.norm(dim=1), adapted.norm(dim=1)


def dense_norm(w: torch.Tensor, norm_axis: str, in_channels: int) -> torch.Tensor:
    """DoRA's norm of an adapted weight given whole, ``w = W0 + s ΔW`` as (d_out, K) fp32: per output row
    (d_out,), or for legacy per-input files per input channel over (out, kh, kw), (in_channels,)."""
    if norm_axis == "out":
        return w.norm(dim=1)
    return (w * w).sum(dim=0).view(in_channels, -1).sum(dim=1).sqrt()
