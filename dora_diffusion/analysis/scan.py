"""Measuring adapters in a pipeline: one ``Row`` (delta_M, delta_D) per adapted module and adapter, as CSV.

``analyze_pipeline`` applies each loaded adapter alone at strength 1 and measures every module it adapts with
``decomposition.decompose``; ``load_base`` loads the SDXL base model the ``analyze`` command measures against.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Iterable
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from dora_diffusion.core.inject import adapted_layers
from dora_diffusion.pipeline import adaptable_models, get_dora_adapters
from dora_diffusion.analysis.decomposition import decompose


@dataclass(frozen=True)
class Row:
    """The change one adapter makes to one module (one point of the paper's Figure 2)."""

    adapter: str
    module: str
    """Full module name inside its component, e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``."""
    component: str
    """``unet``, ``text_encoder`` or ``text_encoder_2``."""
    kind: str
    """``Linear`` or ``Conv2d``."""
    rank: int
    delta_M: float
    delta_D: float
    method: str
    """``DoRA`` or ``LoRA``, or what the file's ``dora_diffusion`` metadata names under ``method`` (e.g. ``FT``
    for a full fine-tuning written as a full-rank LoRA)."""


def _method(use_dora: bool) -> str:
    return "DoRA" if use_dora else "LoRA"


def analyze_pipeline(pipe, adapter_names: list[str] | None = None) -> list[Row]:
    """One ``Row`` per adapted module per adapter (default: every loaded adapter, in load order).

    Each adapter is measured alone at strength 1, ``W' = W0 + Adapter.delta(1.0)``, whatever adapters are
    active, at what strengths, or disabled. Raises ``RuntimeError`` if adapters are fused into the weights
    (``W0`` would not be the base weight) and ``ValueError`` for names that are not loaded.
    """
    loaded = get_dora_adapters(pipe)
    names = loaded if adapter_names is None else list(adapter_names)
    if not loaded:
        raise ValueError(
            f"no adapters are loaded into this {type(pipe).__name__}; load some with pipe.load_dora_weights()"
        )
    missing = [n for n in names if n not in loaded]
    if missing:
        raise ValueError(f"adapters {missing} are not loaded; loaded adapters: {loaded}")
    layers = {comp: adapted_layers(model) for comp, model in adaptable_models(pipe).items()}
    if any(layer.fused for per in layers.values() for layer in per.values()):
        raise RuntimeError("adapters are fused into the weights; call pipe.unfuse_dora() before analysing them")
    rows = []
    for name in names:
        for comp, per in layers.items():
            for module, layer in per.items():
                spec = layer.adapters[name].spec if name in layer.adapters else None
                if spec is None:
                    continue
                w0 = layer.weight.detach().to("cpu", torch.float64)
                delta_m, delta_d = decompose(w0, w0 + layer.adapters[name].delta(1.0).to("cpu", torch.float64))
                kind = "Conv2d" if isinstance(layer.base_layer, nn.Conv2d) else "Linear"
                rows.append(Row(name, module, comp, kind, spec.rank, delta_m, delta_d, _method(spec.use_dora)))
    return rows


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""A spreadsheet reads a cell starting with one of these as a formula (OWASP, CSV injection)."""


def csv_cell(value: object) -> object:
    """``value`` as written to a CSV a spreadsheet may open: a string that would start a formula gets a ``'``
    in front (labels and methods come from file names and headers); numbers are written as they are."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def write_csv(rows: Iterable[Row], path: str | os.PathLike) -> Path:
    """Write ``rows`` with the header ``adapter,module,component,kind,rank,delta_M,delta_D,method``; return the path.

    Text cells that a spreadsheet would run as a formula are prefixed with ``'`` (``csv_cell``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([fl.name for fl in fields(Row)])
        writer.writerows([csv_cell(v) for v in astuple(r)] for r in rows)
    return path


BASE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""The ``--dtype`` choices of ``analyze``: the precision ``load_base`` loads the base model in."""


def load_base(pretrained_model_name_or_path: str, dtype: str = "float32", variant: str | None = None):
    """``StableDiffusionXLPipeline.from_pretrained`` on the CPU without the VAE (the analysis does not need it).

    Raises ``OSError`` with a one-line message if the model cannot be loaded.
    """
    from diffusers import StableDiffusionXLPipeline

    path = Path(pretrained_model_name_or_path)
    hub_id = len(path.parts) == 2 and not str(pretrained_model_name_or_path).startswith((".", "~", os.sep, "/"))
    if not path.exists() and not hub_id:
        raise OSError(f"--base {pretrained_model_name_or_path}: no such directory, and not a Hub repo id 'owner/name'")
    if path.is_file():
        raise OSError(f"--base {path} is a file; pass a diffusers model directory (with model_index.json) or a Hub id")
    try:
        with warnings.catch_warnings():  # newer diffusers ask for `dtype=`; `torch_dtype=` works in all we support
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            return StableDiffusionXLPipeline.from_pretrained(
                pretrained_model_name_or_path, torch_dtype=BASE_DTYPES[dtype], variant=variant, vae=None
            )
    except Exception as err:  # diffusers raises OSError, ValueError, EnvironmentError... with long messages
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OSError(f"could not load the base model {pretrained_model_name_or_path}: {first}") from None
