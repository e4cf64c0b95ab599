"""Adapter configuration: what an adapter is, independent of where it is injected or stored."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

NormAxis = Literal["out", "in"]


@dataclass
class AdapterConfig:
    """Hyper-parameters of one DoRA or LoRA adapter.

    The scale of the low-rank update is ``s = alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA).
    """

    rank: int = 8
    """Rank r of the low-rank update ``B A`` (B: d_out x r, A: r x d_in)."""
    alpha: float | None = None
    """LoRA alpha; ``None`` means alpha = rank (scale 1)."""
    use_dora: bool = True
    """True: DoRA (magnitude + direction); False: plain LoRA."""
    dropout: float = 0.0
    """Dropout probability on the input of the low-rank path (training only)."""
    use_rslora: bool = False
    """Scale by ``alpha / sqrt(rank)`` instead of ``alpha / rank``."""
    targets: str | list[str] = "attn"
    """A preset name (``attn``, ``attn_ff``, ``all``), a list of module names or suffixes, or a regex."""
    norm_axis: NormAxis = "out"
    """``out``: norm per output channel (paper, PEFT). ``in``: legacy per-input-column norm (LyCORIS < 3.2)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides, keyed by full module name."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides, keyed by full module name."""

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not math.isfinite(float(self.alpha)):
            raise ValueError(f"alpha must be a finite number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.norm_axis not in ("out", "in"):
            raise ValueError(f"norm_axis must be 'out' or 'in', got {self.norm_axis!r}")

    def rank_for(self, module_name: str) -> int:
        """Rank used for ``module_name`` (``rank_pattern`` wins over ``rank``)."""
        return int(self.rank_pattern.get(module_name, self.rank))

    def alpha_for(self, module_name: str) -> float:
        """Alpha used for ``module_name``; defaults to its rank."""
        if module_name in self.alpha_pattern:
            return float(self.alpha_pattern[module_name])
        if module_name in self.rank_pattern and self.alpha is None:
            return float(self.rank_for(module_name))
        return float(self.rank if self.alpha is None else self.alpha)

    def to_dict(self) -> dict:
        """JSON-serialisable dict of the fields."""
        return asdict(self)


def match_pattern(pattern: dict[str, float], names: list[str]) -> dict[str, float]:
    """Resolve a per-module pattern (``{"down_blocks.2": 16, "to_k": 4}``) to full module names.

    A key matches a module whose name holds it as whole dotted parts: ``down_blocks.2`` matches
    ``down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q``, ``to_k`` every ``...attn1.to_k``, but
    ``down_blocks.1`` never ``down_blocks.10``. Where several keys match, the one with most dotted parts wins
    (then the longer). Modules no key matches are left out.
    """
    ranked = sorted(pattern.items(), key=lambda kv: (kv[0].count("."), len(kv[0])), reverse=True)
    out = {}
    for name in names:
        padded = f".{name}."
        for key, value in ranked:
            if f".{key}." in padded:
                out[name] = value
                break
    return out


def lora_scale(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """The scale s of the low-rank update: ``alpha / r`` or ``alpha / sqrt(r)`` with rsLoRA."""
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)
