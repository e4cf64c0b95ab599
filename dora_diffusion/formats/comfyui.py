"""The ComfyUI variant of the kohya dialect: a ``dora_scale`` that ComfyUI's and Forge's rule turns into ``W'``.

ComfyUI (``comfy/weight_adapter/base.py``, ``weight_decompose``) and Forge (``backend/patcher/lora.py``) apply a
per-output ``dora_scale`` ``d`` with the norm of the *base* weight, not of the adapted one, and interpolate
strength ``k`` outside it (``eps = finfo(float32).eps``: they patch fp32 copies of the weights)::

    W_comfy(k) = W0 + k (diag(d / (||W0|| + eps)) (W0 + s B A) - W0)

The paper's (and LyCORIS', PEFT's, ours) trained weight is ``W' = diag(m / ||W0 + s B A||) (W0 + s B A)``, so a
standard file (``d = m``) renders differently there. The file written here stores, per output channel,

    d = m (||W0|| + eps) / ||W0 + s B A||

so ComfyUI's rule gives ``W_comfy(k) = W0 + k (W' - W0)``, our strength convention, at every ``k``. Reading it
back inverts the same formula, ``m = d ||W0 + s B A|| / (||W0|| + eps)``; both directions need the base weights
``W0`` the adapter was trained on. The file is a kohya file in every other respect and carries
``"dora_diffusion.dora_scale": "comfyui"`` in its header; per-input DoRA and LoRA modules are written unchanged
(ComfyUI's per-input branch already normalises ``W0 + s B A``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

import torch

from dora_diffusion.core.delta_kinds import delta_weight
from dora_diffusion.core.norms import EPS, exact_row_norms
from dora_diffusion.formats.base import ModuleAdapter
from dora_diffusion.formats.kohya import to_kohya
from dora_diffusion.formats.safefile import AdapterFileError

RULE_KEY = "dora_diffusion.dora_scale"
"""Header key naming how the file's ``dora_scale`` is to be read."""
COMFYUI_RULE = "comfyui"
"""Its value in files written for ComfyUI's rule (a file without the key holds ``m`` itself)."""
COMFYUI_EPS = torch.finfo(torch.float32).eps
"""What ComfyUI and Forge add to ``||W0||``: ``finfo(weight.dtype).eps`` of the fp32 weight they patch."""

BaseWeights = Mapping[str, Mapping[str, torch.Tensor]]
"""``{component: {module name: W0}}``: the base weights a ComfyUI-rule file is written for."""


def is_comfyui_rule(metadata: Mapping[str, str], dialect: str) -> bool:
    """True if the header marks a kohya file whose ``dora_scale`` follows ComfyUI's rule.

    Raises ``AdapterFileError`` for an unknown value or for the mark on a non-kohya file.
    """
    rule = metadata.get(RULE_KEY)
    if rule is None:
        return False
    if rule != COMFYUI_RULE:
        raise AdapterFileError(
            f"header key {RULE_KEY!r} is {rule[:40]!r}; the only value dora-diffusion writes is {COMFYUI_RULE!r}"
        )
    if dialect != "kohya":
        raise AdapterFileError(f"header key {RULE_KEY!r} marks a kohya dora_scale, but this file is {dialect}")
    return True


def _norms(w0: torch.Tensor, ma: ModuleAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||W0|| + eps, ||W0 + s ΔW||)`` per output channel, float64, shape (out,); ``ΔW = B A`` or any other
    delta kind's (``core.delta_kinds``: ComfyUI divides by ``||W0||`` for LoHa and LoKr too).

    The second is floored at ``norms.EPS`` as in the layers (an all-zero row of ``W0 + s ΔW`` stays zero).
    """
    if ma.kind == "lowrank":
        base, adapted = exact_row_norms(w0, ma.a, ma.b, ma.spec().scale)
    else:
        w = w0.reshape(w0.shape[0], -1).double()  # (d_out, K)
        factors = {r: t.to(w.device, torch.float64) for r, t in ma.factors.items() if r != "diff_b"}
        base, adapted = w.norm(dim=1), (w + ma.spec().scale * delta_weight(ma.kind, factors)).norm(dim=1)
    return base + COMFYUI_EPS, adapted.clamp_min(EPS)


def comfyui_dora_scale(w0: torch.Tensor, ma: ModuleAdapter) -> torch.Tensor:
    """``d = m (||W0|| + eps) / ||W0 + s B A||`` (fp32, shape (out,)) for a per-output DoRA module on base ``w0``."""
    base, adapted = _norms(w0, ma)
    return (ma.magnitude.double() * (base / adapted).to(ma.magnitude.device)).float()


def magnitude_from_comfyui(w0: torch.Tensor, ma: ModuleAdapter) -> torch.Tensor:
    """``m = d ||W0 + s B A|| / (||W0|| + eps)`` (fp32, shape (out,)), ``d`` being ``ma.magnitude`` as read."""
    base, adapted = _norms(w0, ma)
    return (ma.magnitude.double() * (adapted / base).to(ma.magnitude.device)).float()


def _convert(
    modules: Mapping[str, Mapping[str, ModuleAdapter]], base_weights: BaseWeights, forward: bool, hint: str
) -> dict[str, dict[str, ModuleAdapter]]:
    out: dict[str, dict[str, ModuleAdapter]] = {}
    for comp, mods in modules.items():
        for name, ma in mods.items():
            if ma.use_dora and ma.norm_axis == "out":
                w0 = base_weights.get(comp, {}).get(name)
                if w0 is None:
                    raise ValueError(
                        f"the ComfyUI-rule dora_scale of {comp}.{name} is m ||W0|| / ||W0 + s B A||, so it needs the "
                        f"base model's weight of that module, which was not given; {hint}"
                    )
                if ma.kind != "lowrank" and ma.size() != (w0.shape[0], math.prod(w0.shape[1:])):
                    raise ValueError(
                        f"{comp}.{name}: base weight {tuple(w0.shape)} does not fit the {ma.kind} module's "
                        f"{ma.size()} (out, in x kernel taps); is it the base model the adapter was trained on?"
                    )
                if ma.kind == "lowrank" and (tuple(w0.shape[:2]) != (ma.b.shape[0], ma.a.shape[1]) or w0.dim() != ma.a.dim()):
                    raise ValueError(
                        f"{comp}.{name}: base weight {tuple(w0.shape)} does not fit lora_down {tuple(ma.a.shape)} / "
                        f"lora_up {tuple(ma.b.shape)}; is it the base model the adapter was trained on?"
                    )
                mag = (comfyui_dora_scale if forward else magnitude_from_comfyui)(w0, ma)
                ma = replace(ma, magnitude=mag)
            out.setdefault(comp, {})[name] = ma
    return out


def to_comfyui_modules(
    modules: Mapping[str, Mapping[str, ModuleAdapter]], base_weights: BaseWeights, hint: str = "pass the base model"
) -> dict[str, dict[str, ModuleAdapter]]:
    """The same modules with each per-output DoRA magnitude ``m`` replaced by ComfyUI's ``d`` (see the module doc).

    Raises ``ValueError`` naming the module whose base weight is missing or does not fit; ``hint`` ends that message.
    """
    return _convert(modules, base_weights, True, hint)


def from_comfyui_modules(
    modules: Mapping[str, Mapping[str, ModuleAdapter]], base_weights: BaseWeights, hint: str = "pass the base model"
) -> dict[str, dict[str, ModuleAdapter]]:
    """Inverse of ``to_comfyui_modules``: the magnitudes ``m`` from a ComfyUI-rule file's ``dora_scale``."""
    return _convert(modules, base_weights, False, hint)


def to_comfyui(
    modules: Mapping[str, Mapping[str, ModuleAdapter]],
    base_weights: BaseWeights,
    info: dict,
    unet_sgm: Mapping[str, str] | None = None,
    hint: str = "pass the base model",
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict and header of a kohya file whose ``dora_scale`` ComfyUI's rule turns into ``W'`` exactly.

    ``to_kohya`` of ``to_comfyui_modules(modules, base_weights)``, with ``RULE_KEY: "comfyui"`` in the header.
    """
    state_dict, header = to_kohya(to_comfyui_modules(modules, base_weights, hint), info, unet_sgm)
    header[RULE_KEY] = COMFYUI_RULE
    return state_dict, header
