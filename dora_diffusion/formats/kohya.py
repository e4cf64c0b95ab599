"""The kohya / LyCORIS / ai-toolkit dialect: ``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight``,
``.alpha``, ``.dora_scale`` (ai-toolkit: ``.magnitude``).

A key is ``<prefix><module path with "." replaced by "_">.<param>``. The SDXL UNet comes in two spellings:
SGM (Stability's original UNet, used by kohya sd-scripts: ``input_blocks_4_1_transformer_blocks_0_attn1_to_q``)
and diffusers-flattened (``down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q``, also under
``lycoris_``). File names are matched by flattening the model's own module names, never by splitting a file
name on ``_`` (``to_q``, ``proj_in`` and ``self_attn`` contain underscores).

The shape of ``dora_scale`` gives the norm axis: (out, 1) / (out, 1, 1, 1) per output channel (LyCORIS >= 3.2),
(1, in) / (1, in, 1, 1) per input channel (legacy: LyCORIS < 3.2, OneTrainer's default), 1-D per output.
ai-toolkit writes ``.magnitude`` (out,) and no alpha. A missing or zero alpha means alpha = rank (scale 1),
as in sd-scripts and LyCORIS.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from dora_diffusion.core.delta_kinds import KINDS
from dora_diffusion.formats.base import ModuleAdapter, ParsedAdapter, build_dense_module, build_module
from dora_diffusion.formats.diffusers import OWN_METADATA_KEY, _most_common
from dora_diffusion.formats.safefile import AdapterFileError, shown

PREFIXES: dict[str, str] = {
    "lora_unet_": "unet",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te_": "text_encoder",  # SD 1.x files
    "lycoris_": "unet",  # LyCORIS wrapper / SimpleTuner: diffusers-flattened UNet names
}
WRITE_PREFIXES: dict[str, str] = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}

_PARAMS = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "alpha": "alpha",
    "dora_scale": "dora_scale",
    "magnitude": "magnitude",  # ai-toolkit
}
FACTOR_KEYS: dict[str, tuple[str, str]] = {
    "lora_mid.weight": ("tucker", "mid"),
    **{f"hada_{r}": ("hadamard", r) for r in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f"lokr_{r}": ("kronecker", r) for r in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
    "diff": ("full", "diff"),
    "diff_b": ("full", "diff_b"),
}
"""LyCORIS key suffix -> (delta kind, factor role) for the kinds other than plain LoRA/LoCon."""
_FILE_KEY = {(kind, role): key for key, (kind, role) in FACTOR_KEYS.items()}
_PARAM_KEY = {"down": "lora_down.weight", "up": "lora_up.weight"}
_UNSUPPORTED: list[tuple[str, str]] = [
    ("oft_", "OFT/BOFT"),
    ("w_norm", "trained norm layers (LyCORIS 'norm', w_norm/b_norm)"),
    ("b_norm", "trained norm layers (LyCORIS 'norm', w_norm/b_norm)"),
    ("a1.weight", "GLoRA (a1/a2/b1/b2)"),
    ("on_input", "IA3"),
]

SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"
SDXL_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"


def _flat(name: str) -> str:
    return name.replace(".", "_")


# ---------------------------------------------------------------------------------------------- UNet layout


@dataclass(frozen=True)
class UNetLayout:
    """The block structure that fixes SGM indices: layers per block and which blocks have attention/samplers."""

    down_layers: tuple[int, ...]
    down_attentions: tuple[bool, ...]
    downsamplers: tuple[bool, ...]
    up_layers: tuple[int, ...]
    up_attentions: tuple[bool, ...]
    upsamplers: tuple[bool, ...]


SDXL_LAYOUT = UNetLayout(
    down_layers=(2, 2, 2),
    down_attentions=(False, True, True),
    downsamplers=(True, True, False),
    up_layers=(3, 3, 3),
    up_attentions=(True, True, False),
    upsamplers=(True, True, False),
)
"""SDXL base (and the tiny test pipeline): 3 levels, 2 resnets down / 3 up, no attention at full resolution."""

_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")
_FIXED_SGM = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "mid_block.attentions.0": "middle_block.1",
}
_RESNET_LEAVES = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def unet_layout(names: Iterable[str]) -> UNetLayout:
    """The block structure of a diffusers UNet, read from its module names."""
    seen: dict[tuple[str, int, str], set[int]] = {}
    for name in names:
        m = _BLOCK.match(name)
        if m:
            seen.setdefault((m[1], int(m[2]), m[3]), set()).add(int(m[4]))

    def blocks(side: str) -> range:
        return range(1 + max((i for s, i, _ in seen if s == side), default=-1))

    def count(side: str, i: int, kind: str) -> int:
        return len(seen.get((side, i, kind), ()))

    return UNetLayout(
        down_layers=tuple(count("down", i, "resnets") for i in blocks("down")),
        down_attentions=tuple(count("down", i, "attentions") > 0 for i in blocks("down")),
        downsamplers=tuple(count("down", i, "downsamplers") > 0 for i in blocks("down")),
        up_layers=tuple(count("up", i, "resnets") for i in blocks("up")),
        up_attentions=tuple(count("up", i, "attentions") > 0 for i in blocks("up")),
        upsamplers=tuple(count("up", i, "upsamplers") > 0 for i in blocks("up")),
    )


def _sgm_table(layout: UNetLayout) -> dict[str, str]:
    """diffusers name or name prefix -> SGM equivalent (sd-scripts' make_unet_conversion_map, any layout).

    SGM numbers the UNet's input blocks ``conv_in, (resnet[+attention]) x layers, [downsample]`` per level, and
    its output blocks ``(resnet[+attention][+upsample]) x layers`` per level, the upsample in the level's last one.
    """
    table = dict(_FIXED_SGM)
    resnets = {"mid_block.resnets.0": "middle_block.0", "mid_block.resnets.1": "middle_block.2"}
    k = 1
    for i, (layers, attn, down) in enumerate(zip(layout.down_layers, layout.down_attentions, layout.downsamplers)):
        for j in range(layers):
            resnets[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{k}.0"
            if attn:
                table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{k}.1"
            k += 1
        if down:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{k}.0.op"
            k += 1
    k = 0
    for i, (layers, attn, up) in enumerate(zip(layout.up_layers, layout.up_attentions, layout.upsamplers)):
        for j in range(layers):
            resnets[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{k}.0"
            if attn:
                table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{k}.1"
            k += 1
        if up:
            table[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{k - 1}.{2 if attn else 1}.conv"
    for hf, sgm in resnets.items():
        table.update({f"{hf}.{leaf}": f"{sgm}.{sgm_leaf}" for leaf, sgm_leaf in _RESNET_LEAVES.items()})
    return table


def sgm_names(names: Iterable[str], layout: UNetLayout | None = None) -> dict[str, str]:
    """``{diffusers UNet module name: SGM name}`` (dotted) for the names that have one.

    ``layout`` defaults to the one read from ``names``; a name matches the longest table entry that equals it
    or is a dotted prefix of it (attention blocks keep their inner names).
    """
    names = list(names)
    table = _sgm_table(unet_layout(names) if layout is None else layout)
    out = {}
    for name in names:
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            head = ".".join(parts[:cut])
            if head in table:
                out[name] = ".".join([table[head], *parts[cut:]])
                break
    return out


# ---------------------------------------------------------------------------------------------- SDXL names


def _attention_names(prefix: str, depth: int) -> list[str]:
    names = [f"{prefix}.proj_in", f"{prefix}.proj_out"]
    for t in range(depth):
        block = f"{prefix}.transformer_blocks.{t}"
        names += [f"{block}.{attn}.{p}" for attn in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")]
        names += [f"{block}.ff.net.0.proj", f"{block}.ff.net.2"]
    return names


def _resnet_names(prefix: str, shortcut: bool) -> list[str]:
    return [f"{prefix}.{leaf}" for leaf in _RESNET_LEAVES if shortcut or leaf != "conv_shortcut"]


def _sdxl_unet_names() -> list[str]:
    names = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
    names += ["add_embedding.linear_1", "add_embedding.linear_2"]
    down_depth, up_depth, mid_depth = (0, 2, 10), (10, 2, 0), 10  # transformer blocks per attention
    for i, depth in enumerate(down_depth):
        for j in range(SDXL_LAYOUT.down_layers[i]):
            names += _resnet_names(f"down_blocks.{i}.resnets.{j}", shortcut=(j == 0 and i > 0))
            names += _attention_names(f"down_blocks.{i}.attentions.{j}", depth) if depth else []
        names += [f"down_blocks.{i}.downsamplers.0.conv"] if SDXL_LAYOUT.downsamplers[i] else []
    names += _resnet_names("mid_block.resnets.0", False) + _resnet_names("mid_block.resnets.1", False)
    names += _attention_names("mid_block.attentions.0", mid_depth)
    for i, depth in enumerate(up_depth):
        for j in range(SDXL_LAYOUT.up_layers[i]):
            names += _resnet_names(f"up_blocks.{i}.resnets.{j}", shortcut=True)
            names += _attention_names(f"up_blocks.{i}.attentions.{j}", depth) if depth else []
        names += [f"up_blocks.{i}.upsamplers.0.conv"] if SDXL_LAYOUT.upsamplers[i] else []
    return names


def _clip_names(layers: int) -> list[str]:
    leaves = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
    return [f"text_model.encoder.layers.{i}.{leaf}" for i in range(layers) for leaf in leaves]


def sdxl_module_names(component: str) -> frozenset[str]:
    """Full names of the Linear/Conv2d modules of SDXL base's ``component`` (diffusers / transformers 4 layout).

    Used to convert files without loading a model; the tiny test pipeline's names are a subset.
    """
    if component == "unet":
        return frozenset(_sdxl_unet_names())
    if component == "text_encoder":
        return frozenset(_clip_names(12))
    if component == "text_encoder_2":
        return frozenset(_clip_names(32) + ["text_projection"])
    raise ValueError(f"unknown component {component!r}")


# ---------------------------------------------------------------------------------------------- reading


def key_prefix(key: str) -> str | None:
    """The kohya prefix ``key`` starts with (``"lora_unet_"``, ...), or None."""
    return next((p for p in PREFIXES if key.startswith(p)), None)


PEFT_MAGNITUDE = ".lora_magnitude_vector"
"""How diffusers' ``convert_state_dict_to_kohya`` keys a PEFT magnitude: its ``lora_magnitude_vector`` to
``dora_scale`` rename never runs, and it keeps the module name's last dot
(``lora_unet_..._attn1.to_q.lora_magnitude_vector``; PEFT shapes: (out,) Linear, (1, out, 1, 1) Conv2d)."""
_DIFFUSERS_LORA = "_lora"
"""diffusers' DreamBooth script's kohya file with text encoders: ``convert_all_state_dict_to_peft`` leaves the
UNet's ``.lora.down.weight`` keys, so they come out as ``lora_unet_..._to_q_lora.down.weight`` (no alpha)."""


def _split_key(key: str) -> tuple[str, str, str, str]:
    """``(component, file module name, role, module key prefix)``; raises for unsupported or unknown suffixes."""
    prefix = key_prefix(key)
    if prefix is not None and key.endswith(PEFT_MAGNITUDE) and len(key) > len(prefix) + len(PEFT_MAGNITUDE):
        lora_name = key[: -len(PEFT_MAGNITUDE)].replace(".", "_")
        return PREFIXES[prefix], lora_name[len(prefix) :], "peft_magnitude", lora_name
    lora_name, dot, param = key.partition(".")
    if param in ("down.weight", "up.weight") and lora_name.endswith(_DIFFUSERS_LORA) and prefix is not None:
        lora_name, param = lora_name[: -len(_DIFFUSERS_LORA)], "lora_" + param
    if prefix is None or not dot or len(lora_name) == len(prefix):
        raise AdapterFileError(f"adapter key {shown(key)} is not a kohya/LyCORIS key ('lora_unet_<module>.<param>')")
    role = _PARAMS.get(param) or ("factor:" + param if param in FACTOR_KEYS else None)
    if role is None:
        kind = next((label for start, label in _UNSUPPORTED if param.startswith(start)), None)
        what = f"{kind} modules are" if kind else f"the key suffix {param!r} is"
        raise AdapterFileError(
            f"adapter key {shown(key)}: {what} not supported. dora-diffusion reads LoRA/LoCon, Tucker LoCon, LoHa, "
            f"LoKr and full-diff modules, with or without DoRA ({', '.join('.' + p for p in [*_PARAMS, *FACTOR_KEYS])}); "
            "nothing was loaded"
        )
    return PREFIXES[prefix], lora_name[len(prefix) :], role, lora_name


def _alpha(where: str, t: torch.Tensor | None) -> float | None:
    if t is None:
        return None
    if t.numel() != 1:
        raise AdapterFileError(f"{where}.alpha has shape {tuple(t.shape)}; expected a single number")
    alpha = float(t.item())
    return None if alpha == 0.0 else alpha  # sd-scripts and LyCORIS: alpha 0 means alpha = rank


def _dora_axis(where: str, scale: torch.Tensor, down: torch.Tensor | None, up: torch.Tensor | None) -> str:
    """Norm axis from the shape of ``dora_scale``: (out, 1[, 1, 1]) per output, (1, in[, 1, 1]) per input."""
    if down is None or up is None or down.dim() not in (2, 4) or up.dim() < 1:
        return "out"  # build_module names the real problem
    if scale.dim() == 1:
        return "out"
    ones = (1,) * (down.dim() - 2)
    n_out, n_in = int(up.shape[0]), int(down.shape[1])
    if tuple(scale.shape) == (n_out, 1, *ones):
        return "out"
    if tuple(scale.shape) == (1, n_in, *ones):
        return "in"
    raise AdapterFileError(
        f"{where}.dora_scale has shape {tuple(scale.shape)}; for lora_down {tuple(down.shape)} and lora_up "
        f"{tuple(up.shape)} it must be {(n_out, 1, *ones)} (per-output norm) or {(1, n_in, *ones)} (legacy per-input)"
    )


def _peft_magnitude(where: str, m: torch.Tensor, down: torch.Tensor | None, up: torch.Tensor | None) -> torch.Tensor:
    """A PEFT ``lora_magnitude_vector`` read from a kohya file: (out,) for a Linear, (1, out, 1, 1) for a Conv2d."""
    if down is None or up is None or down.dim() not in (2, 4) or up.dim() < 1:
        return m  # build_module names the real problem
    n_out = int(up.shape[0])
    want = (n_out,) if down.dim() == 2 else (1, n_out, 1, 1)
    if tuple(m.shape) != want:
        raise AdapterFileError(f"{where}{PEFT_MAGNITUDE} has shape {tuple(m.shape)}; expected {want} (PEFT's magnitude)")
    return m


def _kind(where: str, slot: dict[str, torch.Tensor]) -> str:
    """The delta kind of a module's keys: ``lowrank`` unless a LyCORIS factor key names another (one only)."""
    kinds = {FACTOR_KEYS[r.removeprefix("factor:")][0] for r in slot if r.startswith("factor:")}
    if len(kinds) > 1:
        raise AdapterFileError(f"adapter module {where!r} mixes the keys of {' and '.join(sorted(kinds))} modules")
    kind = next(iter(kinds), "lowrank")
    if kind not in ("lowrank", "tucker") and ("down" in slot or "up" in slot):
        raise AdapterFileError(f"adapter module {where!r} mixes lora_down/lora_up with {kind} keys")
    return kind


def _dense_dora_axis(where: str, scale: torch.Tensor, d_out: int, k: int) -> str:
    """Norm axis of a dense kind's ``dora_scale``: (out, 1[, 1, 1]) per output, (1, in[, 1, 1]) per input."""
    if scale.dim() == 1 or (scale.shape[0] == d_out and all(n == 1 for n in scale.shape[1:])):
        return "out"
    if scale.dim() >= 2 and scale.shape[0] == 1 and all(n == 1 for n in scale.shape[2:]) and k % scale.shape[1] == 0:
        return "in"
    raise AdapterFileError(
        f"{where}.dora_scale has shape {tuple(scale.shape)}; for a weight of {d_out} outputs and {k} inputs x kernel "
        f"taps it must be ({d_out}, 1[, 1, 1]) (per-output norm) or (1, in[, 1, 1]) (legacy per-input)"
    )


def _build_dense(where: str, kind: str, slot: dict[str, torch.Tensor]) -> ModuleAdapter:
    factors = {FACTOR_KEYS[r.removeprefix("factor:")][1]: t for r, t in slot.items() if r.startswith("factor:")}
    if kind == "tucker":
        factors.update({role: slot[role] for role in ("down", "up") if role in slot})
    if "peft_magnitude" in slot:
        raise AdapterFileError(f"adapter module {where!r}: a PEFT magnitude on a {kind} module; expected .dora_scale")
    if "dora_scale" in slot and "magnitude" in slot:
        raise AdapterFileError(f"adapter module {where!r} has both .dora_scale and .magnitude; expected one magnitude")
    magnitude = slot.get("dora_scale", slot.get("magnitude"))
    axis, ndim = "out", 0
    if magnitude is not None:
        problem = KINDS[kind].problem({r: tuple(t.shape) for r, t in factors.items()})
        if problem is not None:
            raise AdapterFileError(f"adapter module {where!r}: {problem}")
        d_out, k = KINDS[kind].size({r: tuple(t.shape) for r, t in factors.items()})
        axis = _dense_dora_axis(where, magnitude, d_out, k)
        ndim = magnitude.dim() if magnitude.dim() > 1 else 0
    return build_dense_module(where, kind, factors, magnitude, _alpha(where, slot.get("alpha")), axis, ndim)


def _build(where: str, slot: dict[str, torch.Tensor]) -> ModuleAdapter:
    kind = _kind(where, slot)
    if kind != "lowrank":
        return _build_dense(where, kind, slot)
    down, up = slot.get("down"), slot.get("up")
    given = [k for k in ("dora_scale", "magnitude", "peft_magnitude") if k in slot]
    if len(given) > 1:
        names = [PEFT_MAGNITUDE if k == "peft_magnitude" else "." + k for k in given]
        raise AdapterFileError(f"adapter module {where!r} has both {' and '.join(names)}; expected one magnitude")
    magnitude, axis = None, "out"
    if "peft_magnitude" in slot:
        magnitude = _peft_magnitude(where, slot["peft_magnitude"], down, up)
    elif "dora_scale" in slot:
        magnitude = slot["dora_scale"]
        axis = _dora_axis(where, magnitude, down, up)
    elif "magnitude" in slot:
        magnitude = slot["magnitude"]
        if magnitude.dim() != 1:
            raise AdapterFileError(f"{where}.magnitude has shape {tuple(magnitude.shape)}; expected (out,)")
    return build_module(where, down, up, magnitude, _alpha(where, slot.get("alpha")), axis)


def parse_kohya(state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> ParsedAdapter:
    """Read a kohya / LyCORIS / ai-toolkit state dict; any unsupported module type is an error naming its key."""
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    keys: dict[tuple[str, str], list[str]] = {}
    where: dict[tuple[str, str], str] = {}
    for key, tensor in state_dict.items():
        comp, module, role, lora_name = _split_key(key)
        slot = groups.setdefault((comp, module), {})
        if role in slot:
            raise AdapterFileError(f"adapter module {comp}.{module} has two {role} tensors (e.g. {shown(key)})")
        slot[role] = tensor
        keys.setdefault((comp, module), []).append(key)
        where.setdefault((comp, module), lora_name)
    parsed = ParsedAdapter("kohya", metadata=metadata, source_keys=keys)
    for (comp, module), slot in groups.items():
        parsed.modules.setdefault(comp, {})[module] = _build(where[(comp, module)], slot)
    return parsed


def _text_forms(name: str) -> set[str]:
    """kohya names of a CLIP module, with and without the ``text_model`` wrapper transformers 5 removed."""
    inner = name.removeprefix("text_model.")
    return {_flat(inner), "text_model_" + _flat(inner)}


def flat_forms(component: str, model_names: Iterable[str]) -> dict[str, set[str]]:
    """Every kohya spelling of each model module name (SGM and diffusers-flattened for the UNet)."""
    model_names = list(model_names)
    if component != "unet":
        return {n: _text_forms(n) for n in model_names}
    sgm = sgm_names(model_names)
    return {n: {_flat(n)} | ({_flat(sgm[n])} if n in sgm else set()) for n in model_names}


def resolve_kohya(component: str, file_names: list[str], model_names: set[str]) -> dict[str, str]:
    """``{file module name: model module name}`` for the file names that match a module of the model.

    Two file modules naming the same model module (say SGM and diffusers spellings of one layer) are an error.
    """
    table = {form: name for name, forms in flat_forms(component, model_names).items() for form in forms}
    out: dict[str, str] = {}
    owner: dict[str, str] = {}
    for fname in file_names:
        name = table.get(fname)
        if name is None:
            continue
        if name in owner:
            raise AdapterFileError(
                f"adapter modules {owner[name]!r} and {fname!r} both name {component}.{name}; the file is ambiguous"
            )
        owner[name] = fname
        out[fname] = name
    return out


def to_sdxl_names(parsed: ParsedAdapter) -> dict[str, dict[str, ModuleAdapter]]:
    """The modules of a parsed kohya file keyed by SDXL base's module names (no model needed).

    Raises naming the keys of modules that SDXL base does not have.
    """
    out: dict[str, dict[str, ModuleAdapter]] = {}
    unmatched: list[str] = []
    for comp, mods in parsed.modules.items():
        mapping = resolve_kohya(comp, list(mods), set(sdxl_module_names(comp)))
        for fname, ma in mods.items():
            if fname in mapping:
                out.setdefault(comp, {})[mapping[fname]] = ma
            else:
                unmatched += parsed.source_keys.get((comp, fname), [fname])[:1]
    if unmatched:
        raise AdapterFileError(
            f"{len(unmatched)} modules of this kohya file are not modules of SDXL base, e.g. {unmatched[:3]}; "
            "only SDXL adapters can be converted"
        )
    return out


# ---------------------------------------------------------------------------------------------- writing

_SDXL_SGM = sgm_names(sdxl_module_names("unet"), SDXL_LAYOUT)
_UNET_SPELLINGS = {
    **{_flat(n): "diffusers-flattened" for n in _SDXL_SGM},
    **{_flat(s): "SGM" for s in _SDXL_SGM.values()},
}


def unet_naming(file_names: Iterable[str]) -> str:
    """How a kohya file spells SDXL UNet modules: ``"SGM"``, ``"diffusers-flattened"``, both, or ``"not SDXL"``."""
    return ", ".join(sorted({_UNET_SPELLINGS.get(n, "not SDXL") for n in file_names}))


def kohya_module_name(component: str, name: str, unet_sgm: Mapping[str, str] | None = None) -> str:
    """The kohya key prefix of a model module: SGM names for the UNet, ``text_model_`` for CLIP layers.

    ``unet_sgm`` maps the UNet's module names to SGM names (``sgm_names`` of the model's own modules); by default
    SDXL base's, which is what converting a file without a model assumes.
    """
    if component == "unet":
        table = _SDXL_SGM if unet_sgm is None else unet_sgm
        if name not in table:
            raise ValueError(
                f"unet module {name!r} has no SGM name in "
                f"{'SDXL base' if unet_sgm is None else 'this UNet'}'s layout; the kohya format written here names "
                "UNet modules the SGM way (save with format='diffusers' for other models)"
            )
        return WRITE_PREFIXES[component] + _flat(table[name])
    if component not in WRITE_PREFIXES:
        raise ValueError(f"unknown component {component!r}")
    inner = name.removeprefix("text_model.")
    inside = name.startswith("text_model.") or inner.startswith(("encoder.", "embeddings."))
    return WRITE_PREFIXES[component] + ("text_model_" if inside else "") + _flat(inner)


def _fmt(x: float) -> str:
    return f"{x:g}"


def _network_metadata(modules: dict[str, dict[str, ModuleAdapter]], info: dict) -> dict[str, str]:
    """The ``ss_*`` / ``modelspec.*`` header A1111, ComfyUI and sd-scripts' tools read; all values are strings."""
    mods = [m for comp in modules.values() for m in comp.values()]
    linear = [m for m in mods if not m.is_conv]
    conv = [m for m in mods if m.is_conv]
    dora = [m for m in mods if m.use_dora]
    args: dict[str, str] = {"algo": "locon" if conv else "lora"}
    kinds = {m.kind for m in mods}
    if len(kinds) == 1 and kinds != {"lowrank"}:
        kind = next(iter(kinds))
        args["algo"] = {"tucker": "locon", "hadamard": "loha", "kronecker": "lokr", "full": "full"}[kind]
        if kind == "tucker" or any(r in m.factors for m in mods for r in ("t1", "t2")):
            args["use_tucker"] = "True"
    if conv:
        args["conv_dim"] = str(_most_common([m.rank for m in conv]))
        args["conv_alpha"] = _fmt(_most_common([_file_alpha(m) for m in conv]))
    args["dora_wd"] = str(bool(dora))
    axes = {m.norm_axis for m in dora}
    if len(axes) == 1:
        args["wd_on_output"] = str(axes == {"out"})
    main = linear or conv
    name = str(info.get("adapter_name", "dora"))
    extra = {}
    if isinstance(info.get("base_model"), str):
        extra["ss_sd_model_name"] = info["base_model"]
    trained = info.get("training") if isinstance(info.get("training"), dict) else {}
    size = trained.get("resolution")
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:  # the size it was trained at (SDXL: 1024)
        extra["ss_resolution"] = f"({size}, {size})"
    else:
        size = 1024
    if info.get("trigger_words"):
        words = info["trigger_words"]
        extra["modelspec.trigger_phrase"] = words if isinstance(words, str) else ", ".join(map(str, words))
    return {
        **extra,
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(_most_common([m.rank for m in main])),
        "ss_network_alpha": _fmt(_most_common([_file_alpha(m) for m in main])),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": SDXL_BASE_MODEL_VERSION,
        "ss_v2": "False",
        "ss_output_name": name,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": SDXL_ARCHITECTURE,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": name,
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.prediction_type": "epsilon",
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _file_alpha(m: ModuleAdapter) -> float:
    """The alpha that gives this module's scale under kohya's ``alpha / rank`` (rsLoRA: ``alpha * sqrt(r)``)."""
    return m.alpha * math.sqrt(m.rank) if m.use_rslora else m.alpha


def to_kohya(
    modules: dict[str, dict[str, ModuleAdapter]], info: dict, unet_sgm: Mapping[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict and header of an SDXL kohya/LyCORIS file, read exactly by LyCORIS (>= 3.2).

    Keys ``lora_unet_<SGM name>`` / ``lora_te1_text_model_...`` / ``lora_te2_...`` with ``.lora_down.weight``,
    ``.lora_up.weight``, a 0-d fp32 ``.alpha`` on every module and an fp32 ``.dora_scale`` shaped (out, 1) /
    (out, 1, 1, 1), or (1, in) / (1, in, 1, 1) for legacy per-input DoRA. String values of ``info`` under
    ``ss_*`` / ``modelspec.*`` keys are copied into the header (the computed network keys win), ``base_model``
    becomes ``ss_sd_model_name`` and ``trigger_words`` ``modelspec.trigger_phrase``; the rest of ``info`` is
    stored as JSON under ``dora_diffusion``. ``unet_sgm``: the UNet's SGM names (see ``kohya_module_name``).
    """
    state_dict: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for comp, mods in modules.items():
        for name, m in mods.items():
            key = kohya_module_name(comp, name, unet_sgm)
            if key in used:
                raise ValueError(f"two {comp} modules map to the kohya name {key!r}")
            used.add(key)
            if m.kind == "lowrank":
                state_dict[f"{key}.lora_down.weight"] = m.a
                state_dict[f"{key}.lora_up.weight"] = m.b
            for role, t in m.factors.items():
                state_dict[f"{key}.{_FILE_KEY.get((m.kind, role), _PARAM_KEY.get(role))}"] = t
            if m.kind != "full":  # LyCORIS's full module has no alpha
                state_dict[f"{key}.alpha"] = torch.tensor(_file_alpha(m), dtype=torch.float32)
            if m.magnitude is not None:
                ones = (1,) * ((m.a.dim() if m.kind == "lowrank" else max(m.ndim, 2)) - 2)
                shape = (-1, 1, *ones) if m.norm_axis == "out" else (1, -1, *ones)
                state_dict[f"{key}.dora_scale"] = m.magnitude.reshape(shape).to(torch.float32)
    if not state_dict:
        raise ValueError("no adapter modules to write")
    passthrough = {k: v for k, v in info.items() if k.startswith(("ss_", "modelspec.")) and isinstance(v, str)}
    own = {k: v for k, v in info.items() if k not in passthrough}
    header = {**passthrough, **_network_metadata(modules, info)}
    header[OWN_METADATA_KEY] = json.dumps(own, sort_keys=True, default=str)
    return state_dict, header
