"""What every job of the toolbox writes and prints: the checked output path, the per-module error report, and the
file with metadata saying what made it (``ss_*`` / ``modelspec.*`` for kohya files, JSON under ``dora_diffusion``
for diffusers ones)."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dora_diffusion import formats
from dora_diffusion._version import __version__
from dora_diffusion.formats import write_safetensors
from dora_diffusion.tools.weights import ModelFolder, Modules

OUTPUT_FORMATS = ("diffusers", "kohya")
"""The dialects the toolbox writes (a file for ComfyUI's ``dora_scale`` rule: ``dora-diffusion convert``)."""


@dataclass(frozen=True)
class ModuleError:
    """The error one module's result makes: ``error = ||W_out - W_target|| / ||W_target||`` and ``change_error =
    ||W_out - W_target|| / ||W_target - W0||`` (relative Frobenius norms; resize without a base measures the
    low-rank update instead of the weight: both are then its relative error)."""

    component: str
    module: str
    rank: int
    error: float
    change_error: float


@dataclass
class Report:
    """What a job did, module by module, and where it wrote it."""

    job: str
    rows: list[ModuleError] = field(default_factory=list)
    exact: bool = False
    """True where the result is exact by construction (up to fp32 rounding), whatever the errors show."""
    notes: list[str] = field(default_factory=list)
    output: Path | None = None

    def add(self, component: str, module: str, rank: int, error: float, change_error: float) -> None:
        """Record one module's result."""
        self.rows.append(ModuleError(component, module, rank, float(error), float(change_error)))

    def summary(self) -> dict[str, object]:
        """Counts, ranks and the mean / max errors (the max naming its module)."""
        if not self.rows:
            return {"exact": self.exact}
        worst = max(self.rows, key=lambda r: r.change_error)
        return {
            "modules": len(self.rows),
            "rank": f"{min(r.rank for r in self.rows)}..{max(r.rank for r in self.rows)}",
            "mean error": statistics.fmean(r.error for r in self.rows),
            "max error": max(r.error for r in self.rows),
            "mean change error": statistics.fmean(r.change_error for r in self.rows),
            "max change error": worst.change_error,
            "worst module": f"{worst.component}.{worst.module}",
            "exact": self.exact,
        }

    def lines(self, per_module: bool = True) -> list[str]:
        """The printed report: one line per module (optional), then the summary."""
        out = []
        if per_module and self.rows:
            out.append(f"{'rank':>5} {'error':>10} {'change err':>10}  module")
            out += [f"{r.rank:>5} {r.error:>10.3e} {r.change_error:>10.3e}  {r.component}.{r.module}" for r in self.rows]
        for key, value in self.summary().items():
            out.append(f"{key}: {value:.3e}" if isinstance(value, float) else f"{key}: {value}")
        out += self.notes
        if self.output is not None:
            out.append(f"wrote {self.output}")
        return out

    def metadata(self) -> dict[str, object]:
        """The summary as header metadata (numbers rounded to 4 significant digits)."""
        rounded = lambda v: float(f"{v:.4g}") if isinstance(v, float) and math.isfinite(v) else v  # noqa: E731
        return {k: rounded(v) for k, v in self.summary().items()}


def check_output(
    output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], overwrite: bool, folder: bool = False
) -> Path:
    """The output path, checked: a ``.safetensors`` file name (or a folder, with ``folder``), never one of the
    ``inputs`` (or inside one), and not an existing file or non-empty folder unless ``overwrite``."""
    out = Path(output)
    if not folder and out.suffix.lower() != ".safetensors":
        raise ValueError(f"{out}: the output file name must end in .safetensors (other names are refused when read)")
    resolved = out.resolve()
    for src in inputs:
        if src is None or not Path(src).exists():
            continue
        s = Path(src).resolve()
        if resolved == s or (s.is_dir() and s in resolved.parents) or (folder and resolved in s.parents):
            raise ValueError(f"the output {out} is (or is inside, or holds) the input {src}; write somewhere else")
    if out.exists() and not overwrite:
        if not folder or out.is_file() or any(out.iterdir()):
            raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if folder and out.is_file():
        raise ValueError(f"{out} is a file; the merged pipeline is written as a folder")
    return out


def tool_info(job: str, sources: dict[str, object], settings: dict[str, object], report: Report) -> dict[str, object]:
    """The metadata every output carries: the job, its sources and settings, the error summary, the version."""
    return {
        "library": "dora-diffusion",
        "version": __version__,
        "made_by": f"dora-diffusion {job}",
        "sources": {k: str(v) for k, v in sources.items() if v is not None},
        "settings": settings,
        "result": report.metadata(),
    }


def write_adapter(
    modules: Modules,
    output: Path,
    to: str,
    info: dict[str, object],
    base: ModelFolder | None = None,
    carried: dict[str, str] | None = None,
) -> Path:
    """Write ``modules`` to ``output`` in ``to`` (``OUTPUT_FORMATS``) with ``info``.

    Kohya files get ``ss_training_comment`` and ``modelspec.description`` saying what made them, plus the
    ``carried`` ``ss_*`` / ``modelspec.*`` keys of a single source (the computed network keys win); UNet names
    follow ``base``'s block layout when given (else SDXL base's).
    """
    if to not in OUTPUT_FORMATS:
        raise ValueError(f"--to must be one of {', '.join(OUTPUT_FORMATS)}, got {to!r}")
    info = {"adapter_name": output.stem, **info}
    unet_sgm = None
    if to == "kohya":
        comment = f"{info['made_by']} from {', '.join(info['sources'].values())}; {info['settings']}"
        info = {**(carried or {}), **info, "ss_training_comment": comment, "modelspec.description": comment}
        if base is not None and "unet" in modules:
            from dora_diffusion.formats.kohya import sgm_names

            unet_sgm = sgm_names(base.names()["unet"])
    state_dict, header = formats.write(modules, to, info, unet_sgm)
    return write_safetensors(state_dict, output, header)
