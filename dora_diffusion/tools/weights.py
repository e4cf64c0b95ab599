"""Weights for the toolbox: a diffusers model folder read one module at a time, and an adapter's change of a weight.

``ModelFolder`` lists the Linear and Conv2d modules of each component (``unet``, ``text_encoder``,
``text_encoder_2``) from a skeleton built on the ``meta`` device (no weights allocated) and reads one weight at a
time from the folder's safetensors files (``WeightFile``: plain reads, no memory map): the jobs hold a few weights
of one module, never a model.
``adapter_delta`` computes ``k (W' - W0)`` with the layer core's own formula (``core.adapter.Adapter.delta``).
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from dora_diffusion import formats
from dora_diffusion.core.adapter import Adapter
from dora_diffusion.core.geometry import geometry_of
from dora_diffusion.core.inject import linear_conv_names
from dora_diffusion.formats import COMPONENTS, AdapterFileError, ModuleAdapter, ParsedAdapter, shown

Modules = dict[str, dict[str, ModuleAdapter]]
"""``{component: {module name: ModuleAdapter}}``, names as in the models."""

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
_VARIANT_FILES = ("diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors")
"""Read when a component has no full-precision file (the weights are upcast to fp32 per module anyway)."""


def check_low_rank(where: str, ma: ModuleAdapter) -> None:
    """Raise ``AdapterFileError`` unless ``ma`` is a low-rank (LoRA / LoCon / DoRA) module: the toolbox's factors
    are ``B A``; LyCORIS's other kinds (LoHa, LoKr, full ``diff``) are refused by name."""
    kind = getattr(ma, "kind", None)
    if kind not in (None, "lowrank") or getattr(ma, "a", None) is None:
        raise AdapterFileError(
            f"adapter module {where} is a {kind or 'non-low-rank'} module; the toolbox reads low-rank (LoRA, LoCon, "
            "DoRA) modules only (load this adapter with load_dora_weights, or convert it to a LoRA elsewhere first)"
        )


def _module_for(w0: torch.Tensor) -> nn.Module:
    """A bias-free Linear or Conv2d holding ``w0`` (no copy), for the layer core's geometry."""
    if w0.dim() == 2:
        module: nn.Module = nn.Linear(w0.shape[1], w0.shape[0], bias=False, device="meta")
    else:
        module = nn.Conv2d(w0.shape[1], w0.shape[0], tuple(w0.shape[2:]), bias=False, device="meta")
    module.weight = nn.Parameter(w0, requires_grad=False)
    return module


def layer_adapter(where: str, ma: ModuleAdapter, w0: torch.Tensor) -> Adapter:
    """``ma`` as the layer core's ``Adapter`` over the base weight ``w0`` (fp32): its ``delta`` and ``scaled`` are
    the formulas every forward path uses. Raises ``AdapterFileError`` naming ``where`` if the tensors do not fit."""
    check_low_rank(where, ma)
    geometry = geometry_of(_module_for(w0.float()))
    numel = None if ma.magnitude is None else ma.magnitude.numel()
    problem = geometry.check_fit(ma.rank, tuple(ma.a.shape), tuple(ma.b.shape), numel, ma.norm_axis)
    if problem is not None:
        raise AdapterFileError(f"shape mismatch at {where}: {problem}. Was the adapter made for another base model?")
    adapter = Adapter(ma.spec(), geometry, init=False)
    mag = None if ma.magnitude is None else ma.magnitude.float()
    adapter.load(ma.a.float(), ma.b.float(), mag)
    return adapter


@torch.no_grad()
def adapter_delta(where: str, ma: ModuleAdapter, w0: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """``k (W' - W0)`` of one module in fp32, shaped like ``w0`` (per-output and legacy per-input DoRA, LoRA)."""
    return layer_adapter(where, ma, w0).delta(strength)


def flat(w: torch.Tensor) -> torch.Tensor:
    """A weight as ``(d_out, K)``."""
    return w.reshape(w.shape[0], -1)


def factors_shaped(b: torch.Tensor, a: torch.Tensor, weight_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D factors ``B (d_out, r)``, ``A (r, K)`` in file shapes for a weight of ``weight_shape`` (Conv2d: ``A (r,
    c_in, kh, kw)``, ``B (d_out, r, 1, 1)``), contiguous fp32."""
    r = a.shape[0]
    if len(weight_shape) == 4:
        return b.reshape(weight_shape[0], r, 1, 1).contiguous(), a.reshape(r, *weight_shape[1:]).contiguous()
    return b.contiguous(), a.contiguous()


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}  # fmt: skip
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def return_freed_memory(mmap_threshold: int = 128 * 1024) -> bool:
    """Make glibc hand every freed block of ``mmap_threshold`` bytes or more back to the system at once (``mallopt``: a
    fixed ``M_MMAP_THRESHOLD``, and a 128 KiB ``M_TRIM_THRESHOLD``), for a process that reads a model one module at a
    time.

    By default glibc raises its mmap threshold each time a large block is freed, so the next ones (a module's fp32
    copies, SVD workspaces: up to 32 MiB) come from its heap, which fragments and never shrinks: extracting from a
    full SDXL UNet peaked at 4.5 GiB of resident memory that way (a LoRA extraction), against 1.5 GiB with this. The toolbox's
    commands call it first; a Python caller may (it is process-wide). Returns False where there is no glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(-3, mmap_threshold)) and bool(libc.mallopt(-1, 128 * 1024))  # M_MMAP_ / M_TRIM_THRESHOLD


class WeightFile:
    """A model's safetensors file read one tensor at a time with plain reads (no memory map: resident memory
    holds the tensors asked for, not the pages of a multi-GB file); the header is checked against the file size."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            first = f.read(8)
            n = int.from_bytes(first, "little") if len(first) == 8 else -1
            if not 0 < n <= min(_MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"{path} is not a safetensors file (truncated, or its header claims {n} bytes)")
            try:
                header = json.loads(f.read(n))
            except ValueError as err:
                raise ValueError(f"{path} has a corrupt safetensors header: {err}") from None
        self.path, self.start = path, 8 + n
        self.entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            try:
                dtype, shape, (begin, end) = _DTYPES[info["dtype"]], [int(d) for d in info["shape"]], info["data_offsets"]
                fits = 0 <= begin <= end <= size - self.start and end - begin == math.prod(shape) * dtype.itemsize
            except (KeyError, TypeError, ValueError):
                fits = False
            if not fits:
                raise ValueError(f"{path}: tensor {shown(key)} has a header entry that does not fit the file")
            self.entries[key] = (dtype, list(shape), begin, end)

    def get(self, key: str) -> torch.Tensor:
        """One tensor, read from the file (a fresh copy)."""
        dtype, shape, begin, end = self.entries[key]
        data = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.start + begin)
            if f.readinto(data) != len(data):
                raise ValueError(f"{self.path} was truncated while reading {shown(key)}")
        if not data:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)


@functools.lru_cache(maxsize=8)
def _skeleton_shapes(library: str, class_name: str, config_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The Linear/Conv2d module names and weight shapes of ``class_name`` built from a config on the ``meta``
    device (no weights allocated; cached per config: a base and its fine-tune share one skeleton)."""
    cls = getattr(importlib.import_module(library), class_name)
    config = json.loads(config_json)
    with torch.device("meta"):
        if hasattr(cls, "from_config") and hasattr(cls, "load_config"):  # diffusers
            model = cls.from_config(config)
        else:  # transformers
            model = cls(cls.config_class.from_dict(config))
    return tuple((n, tuple(model.get_submodule(n).weight.shape)) for n in linear_conv_names(model))


class ModelFolder:
    """A diffusers pipeline folder (``model_index.json`` and one folder per component), read lazily."""

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if not path.is_dir():
            raise ValueError(
                f"{path} is not a folder; the toolbox reads diffusers pipeline folders (download a Hub model first, "
                "e.g. `huggingface-cli download stabilityai/stable-diffusion-xl-base-1.0 --local-dir DIR`)"
            )
        index = path / "model_index.json"
        if not index.is_file():
            raise ValueError(f"{path} has no model_index.json; is it a diffusers pipeline folder (save_pretrained)?")
        self.path = path
        listed = json.loads(index.read_text(encoding="utf-8"))
        self.classes = {c: v for c, v in listed.items() if c in COMPONENTS and v and v[0]}
        if "unet" not in self.classes:
            raise ValueError(f"{path}/model_index.json names no unet; the toolbox reads SDXL pipeline folders")
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        self._files: dict[str, dict[str, Path]] = {}
        self._handles: dict[Path, WeightFile] = {}

    def __repr__(self) -> str:
        return f"ModelFolder({str(self.path)!r})"

    @property
    def components(self) -> list[str]:
        """The SDXL components the folder has (``unet`` first), in ``COMPONENTS`` order."""
        return [c for c in COMPONENTS if c in self.classes]

    def shapes(self, component: str) -> dict[str, tuple[int, ...]]:
        """``{module name: weight shape}`` of the component's Linear and Conv2d modules."""
        if component not in self._shapes:
            library, name = self.classes[component]
            config = (self.path / component / "config.json").read_text(encoding="utf-8")
            self._shapes[component] = dict(_skeleton_shapes(library, name, config))
        return self._shapes[component]

    def names(self) -> dict[str, list[str]]:
        """``{component: Linear and Conv2d module names}``, as ``formats.match`` takes them."""
        return {c: list(self.shapes(c)) for c in self.components}

    def _key_files(self, component: str) -> dict[str, Path]:
        if component in self._files:
            return self._files[component]
        where = self.path / component
        single = [where / f for f in _WEIGHT_FILES + _VARIANT_FILES if (where / f).is_file()]
        indexes = [where / (f + ".index.json") for f in _WEIGHT_FILES if (where / (f + ".index.json")).is_file()]
        if single:
            self._handles[single[0]] = WeightFile(single[0])
            files = {k: single[0] for k in self._handles[single[0]].entries}
        elif indexes:
            weight_map = json.loads(indexes[0].read_text(encoding="utf-8"))["weight_map"]
            files = {k: where / v for k, v in weight_map.items()}
        else:
            raise ValueError(
                f"{where} has no {' or '.join(_WEIGHT_FILES)} (or its fp16 variant, or a sharded index of one); the "
                "toolbox reads safetensors weights only"
            )
        self._files[component] = files
        return files

    def keys(self, component: str) -> list[str]:
        """Every tensor name of the component's weight files."""
        return list(self._key_files(component))

    def tensor(self, component: str, key: str) -> torch.Tensor | None:
        """One tensor of the component's weight files by its file name, or None if there is none."""
        files = self._key_files(component)
        if key not in files:
            return None
        if files[key] not in self._handles:  # its header is read once
            self._handles[files[key]] = WeightFile(files[key])
        return self._handles[files[key]].get(key)

    def weight(self, component: str, name: str) -> torch.Tensor:
        """The weight of one module, read from its file alone."""
        for key in (f"{name}.weight", f"{name.removeprefix('text_model.')}.weight", f"text_model.{name}.weight"):
            found = self.tensor(component, key)
            if found is not None:
                return found
        raise ValueError(f"{self.path}/{component} holds no weight for module {name!r}; is the folder complete?")

    def modules(self) -> Iterator[tuple[str, str, tuple[int, ...]]]:
        """``(component, module name, weight shape)`` of every Linear and Conv2d module, in model order."""
        for comp in self.components:
            for name, shape in self.shapes(comp).items():
                yield comp, name, shape

    def base_weights(self, modules: Modules) -> dict[str, dict[str, torch.Tensor]]:
        """``{component: {module name: W0}}`` for ``modules`` (for ``formats.apply_base``)."""
        return {comp: {name: self.weight(comp, name) for name in mods} for comp, mods in modules.items()}


def model_modules(parsed: ParsedAdapter, source: str, base: ModelFolder | None) -> Modules:
    """The modules of an adapter keyed by the base model's module names, with their true magnitudes.

    With ``base``, every module must match one of its Linear/Conv2d modules with fitting shapes (a ComfyUI-rule
    ``dora_scale`` is undone against its weights); without, kohya names are mapped onto SDXL base's. Raises
    ``AdapterFileError`` naming ``source`` and the modules that do not match.
    """
    for comp, mods in parsed.modules.items():
        for name, ma in mods.items():
            check_low_rank(f"{source}: {comp}.{name}", ma)
    if base is None:
        if parsed.comfyui_dora_scale:
            raise ValueError(
                f"{source} was written for ComfyUI's dora_scale rule, which needs the base weights to read; pass --base"
            )
        if parsed.dialect == "kohya":
            from dora_diffusion.formats.kohya import to_sdxl_names

            return to_sdxl_names(parsed)
        return parsed.modules
    matched, unmatched = formats.match(parsed, base.names())
    if unmatched:
        raise AdapterFileError(
            f"{len(unmatched)} keys of {source} match no module of the base model {base.path}, e.g. "
            f"{', '.join(shown(k) for k in unmatched[:3])}; is it the base the adapter was made for?"
        )
    for comp, mods in matched.items():
        shapes = base.shapes(comp)
        for name, ma in mods.items():
            want = shapes[name]
            _module = _module_for(torch.empty(want, device="meta"))
            numel = None if ma.magnitude is None else ma.magnitude.numel()
            problem = geometry_of(_module).check_fit(ma.rank, tuple(ma.a.shape), tuple(ma.b.shape), numel, ma.norm_axis)
            if problem is not None:
                raise AdapterFileError(
                    f"shape mismatch at {comp}.{name} of {source}: {problem}. Is {base.path} the base the adapter was "
                    "made for?"
                )
    return formats.apply_base(parsed, matched, base.base_weights)


def adapted_weights(modules: Modules, folder: ModelFolder, strength: float = 1.0) -> dict[str, dict[str, torch.Tensor]]:
    """``{component: {module: W0 + k (W' - W0)}}`` of ``modules`` over ``folder``'s base weights, fp32."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for comp, mods in modules.items():
        for name, ma in mods.items():
            w0 = folder.weight(comp, name).float()
            out.setdefault(comp, {})[name] = w0 + adapter_delta(f"{comp}.{name}", ma, w0, strength)
    return out


def count(modules: Modules) -> int:
    """How many modules ``modules`` holds."""
    return sum(len(m) for m in modules.values())


def relative(num: float, den: float) -> float:
    """``num / den``, 0 for 0 / 0 and inf for x / 0."""
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den
