"""Paper section 3: how much an adapter changed the magnitude and the direction of each weight.

For a base weight ``W0`` and the weight ``W' = W0 + (W' - W0)`` of one adapter at strength 1, every output
channel ``i`` (a row of a Linear weight, one filter over (in_channels, kh, kw) of a Conv2d) is split into a
magnitude and a direction (paper Eq. 2):

    m_i = ||w_i||_2,        v_i = w_i / ||w_i||_2

and the changes are averaged over the ``d_out`` channels (paper Eq. 3 and 4):

    delta_M = 1/d_out  sum_i |m'_i - m0_i|
    delta_D = 1/d_out  sum_i (1 - cos(w'_i, w0_i))

The paper writes ``W`` as d x k with one magnitude per column; its k columns are the output features, so
this is the same decomposition in PyTorch's (d_out, d_in) layout, and the same axis DoRA normalises here.

Over the points ``(delta_D, delta_M)`` of many modules, ``fit_line`` gives the least-squares line
``delta_M = slope * delta_D + intercept`` and the Pearson correlation ``r = cov(delta_D, delta_M) / (sd sd)``,
the number the paper quotes for its Figure 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@torch.no_grad()
def channel_changes(w0: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel ``|m'_i - m0_i|`` and ``1 - cos(w'_i, w0_i)``, two float64 tensors of shape (d_out,).

    ``w0`` and ``w`` have the same shape, output channels on dim 0 (Linear (out, in), Conv2d (out, in, kh, kw)).
    ``1 - cos`` is computed as ``||w'_i/||w'_i|| - w0_i/||w0_i||||^2 / 2``, equal to it for non-zero rows and free
    of the cancellation that ``1 - cos`` suffers for the tiny angles of short training runs. A row that is zero
    in both weights counts as unchanged (0); a row zero in only one of them as orthogonal (1).
    """
    if w0.shape != w.shape:
        raise ValueError(f"base weight has shape {tuple(w0.shape)}, adapted weight {tuple(w.shape)}; they must match")
    a = w0.detach().to("cpu", torch.float64).reshape(w0.shape[0], -1)  # (d_out, K)
    b = w.detach().to("cpu", torch.float64).reshape(w.shape[0], -1)  # (d_out, K)
    m0, m1 = a.norm(dim=1), b.norm(dim=1)  # (d_out,)
    u0 = a / m0.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(1)
    u1 = b / m1.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(1)
    d = 0.5 * (u1 - u0).pow(2).sum(dim=1)
    zero0, zero1 = m0 == 0, m1 == 0
    d = torch.where(zero0 | zero1, (zero0 != zero1).to(d.dtype), d)
    return (m1 - m0).abs(), d


def decompose(w0: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """``(delta_M, delta_D)`` of the weight ``w`` against the base ``w0`` (paper Eq. 3-4, per output channel).

    ``delta_M = mean_i |m'_i - m0_i|`` with ``m_i = ||w_i||_2``; ``delta_D = mean_i (1 - cos(w'_i, w0_i))``.
    Pure rescaling of rows by ``c_i > 0`` gives ``delta_D = 0`` and ``delta_M = mean_i |c_i - 1| ||w0_i||``;
    a rotation that keeps row norms gives ``delta_M = 0``.
    """
    dm, dd = channel_changes(w0, w)
    return float(dm.mean()), float(dd.mean())


@dataclass(frozen=True)
class Fit:
    """Least-squares line ``delta_M = slope * delta_D + intercept`` and Pearson correlation ``r`` over ``n`` points.

    ``slope`` and ``r`` are NaN when they are undefined (fewer than 2 points, or no spread).
    """

    n: int
    slope: float
    intercept: float
    r: float


def fit_line(x: Sequence[float], y: Sequence[float]) -> Fit:
    """Fit ``y = slope x + intercept`` by least squares; ``r = cov(x, y) / (sd(x) sd(y))``."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"x has {n} values, y has {len(y)}")
    nan = float("nan")
    if n == 0:
        return Fit(0, nan, nan, nan)
    mx, my = math.fsum(x) / n, math.fsum(y) / n
    sxx = math.fsum((a - mx) ** 2 for a in x)
    syy = math.fsum((b - my) ** 2 for b in y)
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y))
    if n < 2 or sxx == 0:
        return Fit(n, nan, nan, nan)
    slope = sxy / sxx
    r = sxy / math.sqrt(sxx * syy) if syy > 0 else nan
    return Fit(n, slope, my - slope * mx, r)
