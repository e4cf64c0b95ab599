"""Low-rank fits by singular value decomposition, shared by every job of the toolbox.

All functions take flattened 2-D weights (``(d_out, K)``, ``K = d_in`` or ``c_in kh kw``) and work in fp32 (the
singular vectors of an fp32 weight carry fp32 rounding; fp64 would cost several times the time on SDXL's 1280 x
11520 convolutions for no visible gain). A rank-``r`` fit of a change ``D`` is

    D ~ U_r diag(S_r) V_r^T = B A,    B = U_r diag(sqrt(S_r)),  A = diag(sqrt(S_r)) V_r^T,   alpha = r (scale 1)

(the singular values split evenly, so fp16 copies of ``A`` and ``B`` lose the same). The DoRA fit of a target
weight ``W_t`` keeps its row norms exactly and spends the rank on direction (``dora_fit``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DYNAMIC_METHODS = ("sv_ratio", "sv_cumulative", "sv_fro")
"""kohya ``resize_lora.py``'s ``--dynamic_method`` choices: keep singular values above ``S_max / ratio``; keep a
fraction of their sum; keep a fraction of their Frobenius norm (sqrt of the retained energy)."""

NORM_EPS = 1e-12
"""Floor of a row norm before dividing by it (as ``core.norms.EPS``)."""


@dataclass(frozen=True)
class Svd:
    """``D = U diag(S) Vh`` (economy form), singular values in decreasing order."""

    u: torch.Tensor  # (d_out, q)
    s: torch.Tensor  # (q,)
    vh: torch.Tensor  # (q, K)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` of the rank-``rank`` truncation: ``B (d_out, r)``, ``A (r, K)``."""
        r = min(rank, self.s.numel())
        root = self.s[:r].clamp_min(0).sqrt()
        return self.u[:, :r] * root, root[:, None] * self.vh[:r]

    def truncated(self, rank: int) -> torch.Tensor:
        """The rank-``rank`` truncation ``U_r diag(S_r) V_r^T`` (d_out, K)."""
        b, a = self.factors(rank)
        return b @ a

    def tail(self, rank: int) -> float:
        """Relative Frobenius error of the rank-``rank`` truncation: ``sqrt(sum_{i>r} S_i^2 / sum S_i^2)``."""
        energy = self.s.double().square()
        total = float(energy.sum())
        return 0.0 if total == 0 else math.sqrt(max(0.0, float(energy[rank:].sum()) / total))


def svd(delta: torch.Tensor) -> Svd:
    """The economy SVD of a 2-D matrix, computed in fp32. A wide matrix (SDXL's convolutions flatten to 1280 x
    11520) is decomposed through its transpose: the same factors, about 4x faster with LAPACK on CPU."""
    d = delta.float()
    if d.shape[0] < d.shape[1]:
        u, s, vh = torch.linalg.svd(d.t(), full_matrices=False)
        return Svd(vh.t(), s, u.t())
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return Svd(u, s, vh)


def low_rank_svd(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> Svd:
    """The SVD of ``scale * B A`` (``B (d_out, r)``, ``A (r, K)``) without forming it: QR of both factors, then the
    SVD of the r x r core. Exact up to fp32 rounding; costs ``O((d_out + K) r^2)``."""
    qb, rb = torch.linalg.qr(b.double())  # (d_out, r), (r, r)
    qa, ra = torch.linalg.qr(a.double().t())  # (K, r), (r, r)
    u, s, vh = torch.linalg.svd(scale * (rb @ ra.t()), full_matrices=False)
    return Svd((qb @ u).float(), s.float(), (vh @ qa.t()).float())


def check_rank(rank: int | None, what: str = "--rank") -> None:
    """Raise ``ValueError`` unless ``rank`` is None or a positive integer."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"{what} must be a positive whole number, got {rank!r}")


def check_fraction(value: float | None, what: str) -> None:
    """Raise ``ValueError`` unless ``value`` is None or in (0, 1]."""
    if value is not None and not (0 < value <= 1):
        raise ValueError(f"{what} must be in (0, 1], got {value!r}")


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """The smallest rank whose truncation keeps ``energy`` of the Frobenius norm: ``sqrt(sum_{i<=r} S_i^2 / sum
    S_i^2) >= energy`` (kohya's ``sv_fro``); 1 for an all-zero matrix."""
    sq = s.double().square()
    total = float(sq.sum())
    if total == 0:
        return 1
    kept = torch.cumsum(sq, 0) / total
    return min(int((kept < energy * energy - 1e-12).sum()) + 1, s.numel())


def dynamic_rank(s: torch.Tensor, method: str, param: float, max_rank: int | None = None) -> int:
    """A per-module rank from the singular values ``s``, as kohya ``resize_lora.py``'s ``--dynamic_method``:

    - ``sv_ratio``: keep values above ``S_max / param`` (``param >= 1``);
    - ``sv_cumulative``: the smallest rank whose values sum to ``param`` of the total;
    - ``sv_fro``: the smallest rank keeping ``param`` of the Frobenius norm (``energy_rank``).

    Capped by ``max_rank`` and at least 1. (kohya also caps at ``len(S) - 1``; here the full rank is allowed.)
    """
    if method not in DYNAMIC_METHODS:
        raise ValueError(f"dynamic method must be one of {', '.join(DYNAMIC_METHODS)}, got {method!r}")
    s = s.double()
    if method == "sv_ratio":
        if not param >= 1:
            raise ValueError(f"sv_ratio needs a ratio >= 1, got {param!r}")
        r = int((s > s[0] / param).sum()) if s.numel() and s[0] > 0 else 1
    elif method == "sv_cumulative":
        check_fraction(param, "sv_cumulative's fraction")
        total = float(s.sum())
        r = 1 if total == 0 else int((torch.cumsum(s, 0) / total < param - 1e-12).sum()) + 1
    else:
        check_fraction(param, "sv_fro's fraction")
        r = energy_rank(s, param)
    r = max(1, min(r, s.numel()))
    return r if max_rank is None else min(r, max_rank)


def normalized_rows(w: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """``diag(m / ||row||) W``: ``w`` with each row rescaled to the norm ``magnitude``."""
    n = w.norm(dim=1).clamp_min(NORM_EPS)
    return w * (magnitude / n)[:, None]


@dataclass(frozen=True)
class DoraFit:
    """A DoRA of rank ``rank`` for a target weight: ``W' = diag(m / ||W0 + B A||) (W0 + B A)``, alpha = rank."""

    b: torch.Tensor  # (d_out, r)
    a: torch.Tensor  # (r, K)
    magnitude: torch.Tensor  # (d_out,)
    rank: int


def dora_fit(
    target: torch.Tensor, w0: torch.Tensor, rank: int | None = None, energy: float | None = None, iterations: int = 20
) -> DoraFit:
    """Fit a DoRA to the weight ``target`` over the base ``w0`` (both (d_out, K)).

    ``m`` is the target's row norms, computed in fp64 (exact to fp32 rounding). Only the direction needs fitting:
    any row scaling ``c`` of the target has it, so ``B A`` is the rank-r truncation of ``diag(c) W_t - W0``, whose
    row space ``V`` (r x K) then gives the next ``c``: the least-squares ``c_i`` with ``c_i w_t_i - w0_i`` in ``V``,
    ``c_i = <P w_t_i, P w0_i> / ||P w_t_i||^2`` with ``P = I - V^T V`` (variable projection). It starts from ``c_i =
    ||W0_i|| / ||W_t_i||`` (the direction change alone) and stops after ``iterations`` rounds, or once the weight
    error falls by less than 1 % a round. When ``W_t`` is a rank-r DoRA's own weight the error falls about fivefold
    a round. With ``energy`` the rank is the one of the first truncation that keeps that fraction of the Frobenius
    norm (capped by ``rank`` if given).
    """
    t, w = target.float(), w0.float()
    magnitude = t.double().norm(dim=1).float()  # (d_out,)
    c = w.norm(dim=1) / t.norm(dim=1).clamp_min(NORM_EPS)
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    for _ in range(max(1, iterations)):
        fit = svd(c[:, None] * t - w)
        if best is None:  # the rank is fixed by the first truncation
            rank = fit.s.numel() if rank is None and energy is None else rank
            rank = rank if energy is None else min(energy_rank(fit.s, energy), rank or fit.s.numel())
        b, a = fit.factors(rank)
        direction = w + b @ a
        error = float((normalized_rows(direction, magnitude) - t).norm())
        if best is not None and error >= best[0] * (1 - 1e-2):
            if error < best[0]:
                best = (error, b, a)
            break
        best = (error, b, a)
        v = fit.vh[:rank]  # (r, K), orthonormal rows
        pt, pw = t - (t @ v.t()) @ v, w - (w @ v.t()) @ v
        c = (pt * pw).sum(1) / (pt * pt).sum(1).clamp_min(NORM_EPS)
    _, b, a = best
    return DoraFit(b, a, magnitude, int(b.shape[1]))
