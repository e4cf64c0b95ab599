"""The family of "delta kinds": how an adapter's tensors give its change of weight ``ΔW`` before DoRA.

Each kind turns its named factors into a dense, unscaled ``ΔW`` flattened to ``(d_out, K)`` (``K = in`` for a
Linear, ``in * kh * kw`` for a Conv2d, the layout of ``W0.reshape(d_out, -1)``), and says its scale ``s``:

    kind        factors (LyCORIS key)                         ΔW                                  s
    lowrank     down (r, K), up (d_out, r)                    up @ down                           alpha / r
    tucker      down (r, in, 1, 1), up (d_out, r, 1, 1),      einsum(mid, up, down)               alpha / r
                mid (r, r, kh, kw)  (lora_mid)
    hadamard    w1_a (d_out, r), w1_b (r, K), w2_a, w2_b      (w1_a w1_b) ⊙ (w2_a w2_b)           alpha / r
                Tucker: t1, t2 (r, r, kh, kw), w*_a (r, d_out), w*_b (r, in)   per half
    kronecker   w1 (a, b) or w1_a (a, r) w1_b (r, b);         kron(w1, w2)                        alpha / r if a side
                w2 (c, d[, kh, kw]) or w2_a (c, r) w2_b (r, d K);                                  is factored, else 1
                Tucker: t2 (r, r, kh, kw), w2_a (r, c), w2_b (r, d)
    full        diff (d_out, in[, kh, kw]), diff_b (d_out,)   diff (diff_b is a change of bias)   1

DoRA is applied on top of any kind by ``adapter.Adapter`` (one place): ``W' = m (W0 + s ΔW) / ||W0 + s ΔW||``.
The formulas are LyCORIS 4.1.3's training forward (``lycoris/functional/{loha,lokr,general}.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

Factors = Mapping[str, torch.Tensor]
Shapes = Mapping[str, tuple[int, ...]]


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS ``rebuild_tucker``: ``t`` (r, r, kh, kw), ``wa`` (r, out), ``wb`` (r, in) -> (out, in, kh, kw)."""
    return torch.einsum("i j ..., i p, j r -> p r ...", t, wa, wb)


def _lowrank(f: Factors) -> torch.Tensor:
    return _flat(f["up"]) @ _flat(f["down"])  # (d_out, K)


def _tucker_locon(f: Factors) -> torch.Tensor:
    up, down = _flat(f["up"]), _flat(f["down"])  # (d_out, r), (r, in)
    return _flat(torch.einsum("m n ..., i m, n j -> i j ...", f["mid"], up, down))  # (d_out, in kh kw)


def _hadamard(f: Factors) -> torch.Tensor:
    if "t1" in f:
        return _flat(_tucker(f["t1"], f["w1_a"], f["w1_b"]) * _tucker(f["t2"], f["w2_a"], f["w2_b"]))
    return (f["w1_a"] @ _flat(f["w1_b"])) * (f["w2_a"] @ _flat(f["w2_b"]))


def _kron_sides(f: Factors) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w1 (a, b), w2 (c, d K))`` with each factored side multiplied out."""
    w1 = f["w1"] if "w1" in f else f["w1_a"] @ f["w1_b"]
    if "w2" in f:
        w2 = f["w2"]
    elif "t2" in f:
        w2 = _tucker(f["t2"], f["w2_a"], f["w2_b"])
    else:
        w2 = f["w2_a"] @ _flat(f["w2_b"])
    return w1, _flat(w2)


def _kronecker(f: Factors) -> torch.Tensor:
    w1, w2 = _kron_sides(f)
    return torch.kron(w1, w2)  # (a c, b d K): row-major like W0.reshape(d_out, -1), kernel taps innermost


def _full(f: Factors) -> torch.Tensor:
    return _flat(f["diff"])


# ---------------------------------------------------------------------------------------------- shapes


def _prod(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _size_lowrank(s: Shapes) -> tuple[int, int]:
    return s["up"][0], _prod(s["down"][1:])


def _size_tucker(s: Shapes) -> tuple[int, int]:
    return s["up"][0], s["down"][1] * _prod(s["mid"][2:])


def _size_hadamard(s: Shapes) -> tuple[int, int]:
    if "t1" in s:
        return s["w1_a"][1], s["w1_b"][1] * _prod(s["t1"][2:])
    return s["w1_a"][0], _prod(s["w1_b"][1:])


def _size_kronecker(s: Shapes) -> tuple[int, int]:
    a, b = s["w1"] if "w1" in s else (s["w1_a"][0], s["w1_b"][1])
    if "w2" in s:
        c, dk = s["w2"][0], _prod(s["w2"][1:])
    elif "t2" in s:
        c, dk = s["w2_a"][1], s["w2_b"][1] * _prod(s["t2"][2:])
    else:
        c, dk = s["w2_a"][0], _prod(s["w2_b"][1:])
    return a * c, b * dk


def _size_full(s: Shapes) -> tuple[int, int]:
    return s["diff"][0], _prod(s["diff"][1:])


def _rank_lowrank(s: Shapes) -> int:
    return s["down"][0]


def _rank_hadamard(s: Shapes) -> int:
    return s["w1_b"][0]


def _rank_kronecker(s: Shapes) -> int:
    """The rank of the factored side (LyCORIS ``lora_dim``), or 0 when both sides are full matrices."""
    if "w1_b" in s:
        return s["w1_b"][0]
    if "w2_b" in s:
        return s["w2_b"][0]
    return 0


def _checks_tucker(s: Shapes) -> str | None:
    r = s["down"][0]
    if len(s["down"]) != 4 or s["down"][2:] != (1, 1) or len(s["up"]) != 4 or s["up"][1:] != (r, 1, 1):
        return f"lora_down {s['down']} / lora_up {s['up']} must be 1x1 convolutions of rank {r} around lora_mid"
    if len(s["mid"]) != 4 or s["mid"][:2] != (r, r):
        return f"lora_mid {s['mid']} must be ({r}, {r}, kh, kw)"
    return None


def _checks_hadamard(s: Shapes) -> str | None:
    if "t1" in s:
        t, r = s["t1"], s["t1"][0]
        want = {"t2": t, "w1_a": (r, s["w1_a"][1]), "w2_a": (r, s["w1_a"][1]), "w1_b": (r, s["w1_b"][1]),
                "w2_b": (r, s["w1_b"][1])}  # fmt: skip
        if len(t) != 4 or t[1] != r:
            return f"hada_t1 {t} must be (r, r, kh, kw)"
    else:
        r = s["w1_b"][0]
        want = {"w1_a": (s["w1_a"][0], r), "w2_a": (s["w1_a"][0], r), "w2_b": s["w1_b"]}
    for role, shape in want.items():
        if tuple(s[role]) != tuple(shape):
            return f"hada_{role} has shape {s[role]}, expected {shape} to pair with the other LoHa factors"
    return None


def _checks_kronecker(s: Shapes) -> str | None:
    if "w1_a" in s and (len(s["w1_a"]) != 2 or len(s["w1_b"]) != 2 or s["w1_a"][1] != s["w1_b"][0]):
        return f"lokr_w1_a {s['w1_a']} and lokr_w1_b {s['w1_b']} are not a rank pair"
    if "t2" in s:
        r = s["t2"][0]
        if len(s["t2"]) != 4 or s["t2"][1] != r or s["w2_a"][0] != r or s["w2_b"][0] != r:
            return f"lokr_t2 {s['t2']}, lokr_w2_a {s['w2_a']}, lokr_w2_b {s['w2_b']} are not a Tucker triple"
    elif "w2_a" in s and (len(s["w2_a"]) != 2 or s["w2_a"][1] != s["w2_b"][0]):
        return f"lokr_w2_a {s['w2_a']} and lokr_w2_b {s['w2_b']} are not a rank pair"
    if "w1" in s and len(s["w1"]) != 2:
        return f"lokr_w1 has shape {s['w1']}; expected a matrix"
    return None


def _checks_full(s: Shapes) -> str | None:
    if "diff_b" in s and tuple(s["diff_b"]) != (s["diff"][0],):
        return f"diff_b has shape {s['diff_b']}, expected ({s['diff'][0]},)"
    return None


@dataclass(frozen=True)
class DeltaKind:
    """One way of building ``ΔW`` from named factors."""

    name: str
    label: str
    """What users call it (LoRA/LoCon, LoHa, LoKr, ...)."""
    alternatives: tuple[tuple[str, ...], ...]
    """The accepted sets of factor names (optional ones such as ``diff_b`` not included)."""
    optional: tuple[str, ...]
    dense: Callable[[Factors], torch.Tensor]
    """Unscaled ``ΔW`` as ``(d_out, K)``."""
    size: Callable[[Shapes], tuple[int, int]]
    """``(d_out, K)`` from the factor shapes."""
    rank: Callable[[Shapes], int]
    """The rank the scale divides by (0: none, the scale is 1)."""
    checks: Callable[[Shapes], str | None]
    """A message if the factor shapes do not pair up, else None."""

    def scale(self, shapes: Shapes, alpha: float | None) -> float:
        """``s``: ``alpha / rank`` (alpha None: 1) when the kind has a rank, else 1."""
        r = self.rank(shapes)
        return 1.0 if r == 0 or alpha is None else float(alpha) / r

    def problem(self, shapes: Shapes) -> str | None:
        """None if ``shapes`` (role -> shape) are a complete, consistent set of this kind's factors."""
        roles = set(shapes) - set(self.optional)
        if not any(roles == set(alt) for alt in self.alternatives):
            options = " or ".join("{" + ", ".join(alt) + "}" for alt in self.alternatives)
            return f"{self.label} needs the factors {options}, the file has {{{', '.join(sorted(shapes))}}}"
        if any(0 in s for s in shapes.values()):
            return f"a {self.label} factor has a dimension of size 0: {dict(shapes)}"
        odd = {r: s for r, s in shapes.items() if len(s) not in ((1,) if r == "diff_b" else (2, 4))}
        if odd:
            return f"{self.label} factors are matrices or 4-D conv kernels (diff_b a vector), got {odd}"
        return self.checks(shapes)


def _no_checks(s: Shapes) -> str | None:
    return None


def _zero_rank(s: Shapes) -> int:
    return 0


KINDS: dict[str, DeltaKind] = {
    k.name: k
    for k in (
        DeltaKind("lowrank", "LoRA/LoCon", (("down", "up"),), (), _lowrank, _size_lowrank, _rank_lowrank, _no_checks),
        DeltaKind("tucker", "Tucker LoCon", (("down", "up", "mid"),), (), _tucker_locon, _size_tucker, _rank_lowrank,
                  _checks_tucker),
        DeltaKind("hadamard", "LoHa", (("w1_a", "w1_b", "w2_a", "w2_b"), ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")),
                  (), _hadamard, _size_hadamard, _rank_hadamard, _checks_hadamard),
        DeltaKind("kronecker", "LoKr",
                  tuple((*one, *two) for one in (("w1",), ("w1_a", "w1_b"))
                        for two in (("w2",), ("w2_a", "w2_b"), ("w2_a", "w2_b", "t2"))),
                  (), _kronecker, _size_kronecker, _rank_kronecker, _checks_kronecker),
        DeltaKind("full", "full diff", (("diff",),), ("diff_b",), _full, _size_full, _zero_rank, _checks_full),
    )
}  # fmt: skip
"""Every delta kind by name."""


def delta_weight(kind: str, factors: Factors) -> torch.Tensor:
    """Unscaled ``ΔW`` of ``kind`` as ``(d_out, K)``, in the factors' dtype (autograd flows through)."""
    return KINDS[kind].dense(factors)
