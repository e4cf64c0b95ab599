"""Adapters in and out of models: collect one adapter's tensors, write them in a file dialect, check that file
tensors fit a module, and load them into models all or nothing. The pipeline API and the training loop both
go through here.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from dora_diffusion._version import __version__
from dora_diffusion.formats import DEFAULT_WEIGHT_NAME, AdapterFileError, ModuleAdapter, to_diffusers, write_safetensors
from dora_diffusion.core.geometry import geometry_of
from dora_diffusion.core.inject import adapted_layers, add_adapter_to_modules, linear_conv_names, remove_adapter

SAVE_FORMATS = ("diffusers", "kohya", "comfyui")


def check_fits(where: str, module: nn.Module, ma: ModuleAdapter) -> None:
    """Raise ``AdapterFileError`` if the adapter tensors do not fit ``module``, naming both shapes."""
    numel = None if ma.magnitude is None else ma.magnitude.numel()
    problem = geometry_of(module).check_fit(ma.rank, tuple(ma.a.shape), tuple(ma.b.shape), numel, ma.norm_axis)
    if problem is not None:
        raise AdapterFileError(f"shape mismatch at {where}: {problem}. Was the adapter trained for a different base model?")


def attach_adapter(models: dict[str, nn.Module], adapter_name: str, modules: dict[str, dict[str, ModuleAdapter]]) -> None:
    """Add ``adapter_name`` to ``models`` (component -> model) with the tensors of ``modules`` (component ->
    module name -> tensors, names as in the models). All or nothing: on any error no model keeps a trace."""
    done: list[str] = []
    try:
        for comp, mods in modules.items():
            done.append(comp)
            specs = {n: ma.spec() for n, ma in mods.items()}
            layers = add_adapter_to_modules(models[comp], adapter_name, specs, init=False)
            for layer, ma in zip(layers, mods.values()):
                layer.load_adapter_tensors(adapter_name, ma.a, ma.b, ma.magnitude)
    except BaseException:
        for comp in done:
            remove_adapter(models[comp], adapter_name)
        raise


def collect_adapter(models: dict[str, nn.Module], adapter_name: str) -> dict[str, dict[str, ModuleAdapter]]:
    """The tensors of ``adapter_name`` per component and module, detached copies on the CPU."""
    out: dict[str, dict[str, ModuleAdapter]] = {}
    for comp, model in models.items():
        for name, layer in adapted_layers(model).items():
            if adapter_name not in layer.adapters:
                continue
            adapter = layer.adapters[adapter_name]
            copy = lambda t: None if t is None else t.detach().float().cpu().clone()  # noqa: E731
            spec = adapter.spec
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
) -> Path:
    """Write one adapter of ``models`` (component -> model) to ``save_directory/weight_name``.

    ``format``: ``"diffusers"``, ``"kohya"`` (UNet names in SGM form, following the UNet's own block layout) or
    ``"comfyui"`` (kohya, with ``dora_scale`` computed against the models' base weights for ComfyUI's rule; see
    ``formats.comfyui``).
    """
    if format not in SAVE_FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, SAVE_FORMATS))}, got {format!r}")
    modules = collect_adapter(models, adapter_name)
    info = {"library": "dora-diffusion", "version": __version__, "adapter_name": adapter_name, **(metadata or {})}
    if format == "diffusers":
        state_dict, header = to_diffusers(modules, info)
    else:
        from dora_diffusion.formats.comfyui import to_comfyui
        from dora_diffusion.formats.kohya import sgm_names, to_kohya

        unet_sgm = sgm_names(linear_conv_names(models["unet"])) if "unet" in models else None
        if format == "kohya":
            state_dict, header = to_kohya(modules, info, unet_sgm)
        else:
            layers = {comp: adapted_layers(model) for comp, model in models.items()}
            if any(layer.fused for comp in layers.values() for layer in comp.values()):
                raise RuntimeError(
                    "adapters are fused into the weights; call unfuse_dora() before saving format='comfyui'"
                )
            base = {comp: {name: layers[comp][name].weight.detach() for name in mods} for comp, mods in modules.items()}
            state_dict, header = to_comfyui(modules, base, info, unet_sgm)
    return write_safetensors(state_dict, Path(save_directory) / (weight_name or DEFAULT_WEIGHT_NAME), header)
