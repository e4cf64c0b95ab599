"""Adapters between files and models: read a source (file, folder or Hub repo) into the in-memory form, check
that its tensors fit a module, load them into models all or nothing, and collect one adapter's tensors to write
them in a dialect. The pipeline API, the CLI and the training run all go through here; the dialects themselves are
``formats``' business, where a source comes from ``hub``'s.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from torch import nn

from dora_diffusion import formats
from dora_diffusion._version import __version__
from dora_diffusion.core.geometry import Geometry, geometry_of
from dora_diffusion.core.inject import adapted_layers, add_adapter_to_modules, linear_conv_names, remove_adapter, uncompiled
from dora_diffusion.core.layers import AdaptedLayer
from dora_diffusion.formats import DEFAULT_WEIGHT_NAME, AdapterFileError, ModuleAdapter, ParsedAdapter, write_safetensors
from dora_diffusion.hub import resolve_file

SAVE_FORMATS = formats.WRITE_FORMATS


def read_adapter(
    source: str | os.PathLike | dict, weight_name: str | None = None, **hub_kwargs
) -> tuple[ParsedAdapter, Path | None]:
    """The adapter at ``source`` (a .safetensors file, a folder holding one, a Hub repo id, or a state dict) in
    the in-memory form, and the file it came from (None for a state dict)."""
    if isinstance(source, dict):
        return formats.parse_state_dict(dict(source), {}), None
    path = resolve_file(source, weight_name, **hub_kwargs)
    return formats.read_file(path), Path(path)


def check_fits(where: str, module: nn.Module, ma: ModuleAdapter) -> None:
    """Raise ``AdapterFileError`` if the adapter tensors do not fit ``module``, naming both shapes."""
    numel = None if ma.magnitude is None else ma.magnitude.numel()
    if ma.kind != "lowrank":
        problem = _dense_fit(geometry_of(module), ma)
    else:
        problem = geometry_of(module).check_fit(ma.rank, tuple(ma.a.shape), tuple(ma.b.shape), numel, ma.norm_axis)
    if problem is not None:
        raise AdapterFileError(f"shape mismatch at {where}: {problem}. Was the adapter trained for a different base model?")


def _dense_fit(geom: Geometry, ma: ModuleAdapter) -> str | None:
    """None if a dense delta kind's factors fit the module behind ``geom``, else a message naming both shapes."""
    w = tuple(geom.weight.shape)
    d_out, k = ma.size()
    what = f"the {ma.kind} adapter changes a ({d_out}, {k}) weight (out, in x kernel taps)"
    if (d_out, k) != (w[0], math.prod(w[1:])):
        return f"{what}, this {geom.kind} has weight {w}"
    kernels = {tuple(t.shape[2:]) for r, t in ma.factors.items() if t.dim() == 4 and r not in ("down", "up")}
    if any(kernel != w[2:] for kernel in kernels) or ("diff" in ma.factors and tuple(ma.factors["diff"].shape) != w):
        return f"{what} with kernel {sorted(kernels)}, this {geom.kind} has weight {w}"
    if ma.magnitude is not None and ma.magnitude.numel() != geom.magnitude_size(ma.norm_axis):
        return f"magnitude has {ma.magnitude.numel()} values, this {geom.kind} needs {geom.magnitude_size(ma.norm_axis)}"
    if "diff_b" in ma.factors and geom.bias is None:
        return f"the full diff changes the bias (diff_b), this {geom.kind} has none"
    return None


Layers = dict[str, dict[str, AdaptedLayer]]
"""``{component: {module name: wrapper}}``: a caller's record of the wrappers in its models (``adapted_layers``)."""


def attach_adapter(
    models: dict[str, nn.Module],
    adapter_name: str,
    modules: dict[str, dict[str, ModuleAdapter]],
    layers: Layers | None = None,
) -> None:
    """Add ``adapter_name`` to ``models`` (component -> model) with the tensors of ``modules`` (component ->
    module name -> tensors, names as in the models). ``layers``, if given, is kept in step and spares walking the
    models. All or nothing: on any error no model keeps a trace."""
    layers = {comp: adapted_layers(model) for comp, model in models.items()} if layers is None else layers
    done: list[str] = []
    try:
        for comp, mods in modules.items():
            done.append(comp)
            specs = {n: ma.spec() for n, ma in mods.items()}
            added = add_adapter_to_modules(models[comp], adapter_name, specs, init=False, layers=layers.setdefault(comp, {}))
            for layer, ma in zip(added, mods.values()):
                if ma.kind == "lowrank":
                    layer.load_adapter_tensors(adapter_name, ma.a, ma.b, ma.magnitude)
                else:
                    layer.load_adapter_factors(adapter_name, ma.factors, ma.magnitude)
    except BaseException:
        for comp in done:
            remove_adapter(models[comp], adapter_name, layers[comp])
        raise


def collect_adapter(
    models: dict[str, nn.Module], adapter_name: str, layers: Layers | None = None
) -> dict[str, dict[str, ModuleAdapter]]:
    """The tensors of ``adapter_name`` per component and module, detached copies on the CPU."""
    layers = {comp: adapted_layers(model) for comp, model in models.items()} if layers is None else layers
    out: dict[str, dict[str, ModuleAdapter]] = {}
    for comp in models:
        for name, layer in layers.get(comp, {}).items():
            if adapter_name not in layer.adapters:
                continue
            adapter = layer.adapters[adapter_name]
            copy = lambda t: None if t is None else t.detach().float().cpu().clone()  # noqa: E731
            spec = adapter.spec
            if spec.kind != "lowrank":
                factors = {role: copy(t) for role, t in adapter.factors.items()}
                if adapter.bias_delta is not None:
                    factors["diff_b"] = copy(adapter.bias_delta)
                out.setdefault(comp, {})[name] = ModuleAdapter(
                    None, None, copy(adapter.magnitude), spec.alpha, spec.norm_axis, False, spec.kind, factors,
                    layer.weight.dim(),
                )
                continue
            out.setdefault(comp, {})[name] = ModuleAdapter(
                copy(adapter.A), copy(adapter.B), copy(adapter.magnitude), spec.alpha, spec.norm_axis, spec.use_rslora
            )
    if not out:
        raise ValueError(f"no module holds an adapter named {adapter_name!r}")
    return out


def save_adapter(
    models: dict[str, nn.Module],
    save_directory: str | os.PathLike,
    adapter_name: str,
    weight_name: str | None = None,
    format: str = "diffusers",
    metadata: dict | None = None,
    layers: Layers | None = None,
) -> Path:
    """Write one adapter of ``models`` (component -> model) to ``save_directory/weight_name``.

    ``format``: ``"diffusers"``, ``"kohya"`` (UNet names in SGM form, following the UNet's own block layout) or
    ``"comfyui"`` (kohya, with ``dora_scale`` computed against the models' base weights for ComfyUI's rule; see
    ``formats.comfyui``). ``layers`` as in ``attach_adapter``. A ``torch.compile``d model is saved under its own
    module names (no ``_orig_mod.`` prefix).
    """
    if format not in SAVE_FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, SAVE_FORMATS))}, got {format!r}")
    models = {comp: uncompiled(model) for comp, model in models.items()}
    layers = {comp: adapted_layers(model) for comp, model in models.items()} if layers is None else layers
    modules = collect_adapter(models, adapter_name, layers)
    base = None
    if format == "comfyui":
        if any(layer.fused for comp in layers.values() for layer in comp.values()):
            raise RuntimeError("adapters are fused into the weights; call unfuse_dora() before saving format='comfyui'")
        base = {comp: {name: layers[comp][name].weight.detach() for name in mods} for comp, mods in modules.items()}
    return write_modules(modules, save_directory, adapter_name, weight_name, format, metadata, models.get("unet"), base)


def write_modules(
    modules: dict[str, dict[str, ModuleAdapter]],
    save_directory: str | os.PathLike,
    adapter_name: str,
    weight_name: str | None = None,
    format: str = "diffusers",
    metadata: dict | None = None,
    unet: nn.Module | None = None,
    base: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write collected ``modules`` (component -> module -> ``ModuleAdapter``) as ``save_adapter`` does: ``unet`` gives
    the SGM names of the kohya dialects, ``base`` the base weights ComfyUI's ``dora_scale`` is computed against."""
    info = {"library": "dora-diffusion", "version": __version__, "adapter_name": adapter_name, **(metadata or {})}
    unet_sgm = None
    if format != "diffusers" and unet is not None:
        from dora_diffusion.formats.kohya import sgm_names

        unet_sgm = sgm_names(linear_conv_names(unet))
    state_dict, header = formats.write(modules, format, info, unet_sgm, base)
    return write_safetensors(state_dict, Path(save_directory) / (weight_name or DEFAULT_WEIGHT_NAME), header)
