"""The diffusers code that renders one cell again, pixel for pixel on the same device."""

from __future__ import annotations

import torch

from dora_diffusion.hub import dtype_keyword
from dora_diffusion.compare.plan import SCHEDULERS, Cell, GenerationSettings


def reproduce_snippet(
    settings: GenerationSettings,
    cell: Cell,
    model: str,
    adapter_source: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    variant: str | None = None,
) -> str:
    """Python that renders ``cell`` again with diffusers and ``dora_diffusion`` alone (same pixels, same device)."""
    scheduler_cls, overrides = SCHEDULERS[settings.scheduler]
    imports = "from diffusers import StableDiffusionXLPipeline"
    if scheduler_cls:
        imports += f", {scheduler_cls}"
    load_kwargs = f", {dtype_keyword()}={dtype}" + (f", variant={variant!r}" if variant else "")
    lines = ["import torch", imports, ""]
    if cell.column.adapter is not None:
        lines += ["import dora_diffusion  # adds load_dora_weights / set_dora_adapters to diffusers pipelines", ""]
    lines.append(f"pipe = StableDiffusionXLPipeline.from_pretrained({model!r}{load_kwargs}).to({device!r})")
    if scheduler_cls:
        extra = "".join(f", {k}={v!r}" for k, v in overrides.items())
        lines.append(f"pipe.scheduler = {scheduler_cls}.from_config(pipe.scheduler.config{extra})")
    column = cell.column
    if column.adapter is not None:
        lines += [
            f"pipe.load_dora_weights({adapter_source!r}, adapter_name={column.adapter!r})",
            f"pipe.set_dora_adapters({column.adapter!r}, adapter_weights={column.strength!r})",
        ]
    call = [f"    {settings.prompt!r},"]
    if settings.negative_prompt:
        call.append(f"    negative_prompt={settings.negative_prompt!r},")
    call += [
        f"    num_inference_steps={settings.num_inference_steps},",
        f"    guidance_scale={settings.guidance_scale!r},",
        f"    width={settings.width},",
        f"    height={settings.height},",
        f"    generator=torch.Generator({device!r}).manual_seed({cell.seed}),",
    ]
    lines += ["image = pipe(", *call, ").images[0]", f"image.save({f'{column.label}_seed{cell.seed}.png'!r})"]
    return "\n".join(lines) + "\n"
