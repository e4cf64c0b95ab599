"""Files written the way diffusers' training scripts write them load exactly (PEFT is the reference)."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers

from dora_diffusion.testing import build_tiny_sdxl_pipeline
from helpers import max_diff, render

peft = pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def perturb_peft(model: torch.nn.Module, seed: int) -> None:
    """Non-zero B and magnitudes away from ||W0||, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(0.8 + 0.4 * torch.rand(p.shape, generator=g))


def write_like_diffusers_scripts(pipe, path, unet_cfg: LoraConfig, te_cfg: LoraConfig) -> None:
    def meta(cfg):
        return {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.to_dict().items()}

    StableDiffusionXLPipeline.save_lora_weights(
        path,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder)),
        text_encoder_2_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder_2)),
        unet_lora_adapter_metadata=meta(unet_cfg),
        text_encoder_lora_adapter_metadata=meta(te_cfg),
        text_encoder_2_lora_adapter_metadata=meta(te_cfg),
    )


@pytest.mark.parametrize("use_dora", [True, False])
def test_peft_linear_and_conv_adapter_loads_exactly(tmp_path, pipe, use_dora: bool) -> None:
    unet_cfg = LoraConfig(r=4, lora_alpha=6, use_dora=use_dora, init_lora_weights="gaussian", target_modules=UNET_TARGETS)
    te_cfg = LoraConfig(r=3, lora_alpha=5, use_dora=use_dora, init_lora_weights="gaussian", target_modules=TE_TARGETS)
    reference = build_tiny_sdxl_pipeline(seed=0)
    reference.set_progress_bar_config(disable=True)
    base = render(reference)
    reference.unet.add_adapter(unet_cfg)
    reference.text_encoder.add_adapter(te_cfg)
    reference.text_encoder_2.add_adapter(te_cfg)
    for i, model in enumerate((reference.unet, reference.text_encoder, reference.text_encoder_2)):
        perturb_peft(model, seed=10 + i)
    want = render(reference)
    assert max_diff(want, base) > 1e-3  # the adapter changes the images
    write_like_diffusers_scripts(reference, tmp_path, unet_cfg, te_cfg)

    name = pipe.load_dora_weights(tmp_path)
    got = render(pipe)
    assert max_diff(got, want) <= 1e-4
    # Conv2d and Linear modules were both adapted, in all three components.
    from dora_diffusion.core.inject import adapted_layers

    kinds = {type(layer.base_layer).__name__ for layer in adapted_layers(pipe.unet).values()}
    assert kinds == {"Linear", "Conv2d"}
    assert all(adapted_layers(m) for m in (pipe.text_encoder, pipe.text_encoder_2))
    assert pipe.get_dora_adapters() == [name]


def test_our_file_loads_in_diffusers_load_lora_weights(tmp_path, pipe) -> None:
    """UNet-only Linear DoRA saved by us gives the same images through diffusers' own loader."""
    from dora_diffusion import AdapterConfig, add_adapter

    add_adapter(pipe.unet, AdapterConfig(rank=4, alpha=8, targets="attn_ff"), "mine")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if name.endswith(".B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif name.endswith(".magnitude"):
                p.mul_(0.8 + 0.4 * torch.rand(p.shape, generator=g))
    ours = render(pipe)
    path = pipe.save_dora_weights(tmp_path)
    assert path.name == "pytorch_lora_weights.safetensors"

    theirs = build_tiny_sdxl_pipeline(seed=0)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(tmp_path)
    assert max_diff(render(theirs), ours) <= 1e-4

    again = build_tiny_sdxl_pipeline(seed=0)
    again.set_progress_bar_config(disable=True)
    again.load_dora_weights(tmp_path)
    assert max_diff(render(again), ours) <= 1e-4
