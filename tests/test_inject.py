"""Target presets, explicit names and regexes on the tiny SDXL UNet and both CLIP text encoders."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from dora_diffusion import AdapterConfig, add_adapter, find_targets, remove_adapter, trainable_parameters
from dora_diffusion.core.inject import adapted_layers
from dora_diffusion.testing import build_tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sdxl_pipeline()


def leaf_names(model: nn.Module, pattern: str) -> set[str]:
    return {n for n, m in model.named_modules() if re.search(pattern, n) and isinstance(m, (nn.Linear, nn.Conv2d))}


def test_unet_presets(tiny) -> None:
    unet = tiny.unet
    attn = set(find_targets(unet, "attn"))
    assert attn == leaf_names(unet, r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
    n_blocks = len([n for n, _ in unet.named_modules() if re.search(r"transformer_blocks\.\d+$", n)])
    assert len(attn) == 8 * n_blocks
    attn_ff = set(find_targets(unet, "attn_ff"))
    assert attn_ff - attn == leaf_names(unet, r"(proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2)$")
    every = set(find_targets(unet, "all"))
    convs = every - attn_ff
    assert convs == leaf_names(unet, r"(conv1|conv2|conv_shortcut|time_emb_proj|downsamplers\.0\.conv|upsamplers\.0\.conv)$")
    assert any(isinstance(unet.get_submodule(n), nn.Conv2d) for n in convs)
    assert not any(n.endswith(("conv_in", "conv_out")) for n in every)


@pytest.mark.parametrize("component", ["text_encoder", "text_encoder_2"])
def test_text_encoder_presets(tiny, component: str) -> None:
    te = getattr(tiny, component)
    n_layers = te.config.num_hidden_layers
    attn = find_targets(te, "attn")
    assert len(attn) == 4 * n_layers and all(re.search(r"self_attn\.(q|k|v|out)_proj$", n) for n in attn)
    every = find_targets(te, "all")
    assert len(every) == 6 * n_layers
    assert set(every) - set(attn) == leaf_names(te, r"mlp\.fc[12]$")


def test_explicit_names_and_regex(tiny) -> None:
    unet = tiny.unet
    assert find_targets(unet, ["mid_block.resnets.0.conv1"]) == ["mid_block.resnets.0.conv1"]
    assert set(find_targets(unet, ["to_k"])) == leaf_names(unet, r"\.to_k$")
    regex = r"down_blocks\.1\..*attn2\.to_(q|v)"
    assert set(find_targets(unet, regex)) == {n for n in leaf_names(unet, r"attn2\.to_(q|v)$") if n.startswith("down_blocks.1.")}
    with pytest.raises(ValueError, match="match no module"):
        find_targets(unet, ["no_such_layer"])
    with pytest.raises(ValueError, match="matches no nn.Linear/nn.Conv2d"):
        find_targets(unet, r"nothing\.here")
    with pytest.raises(ValueError, match="is a GroupNorm; only nn.Linear and nn.Conv2d"):
        find_targets(unet, ["mid_block.resnets.0.norm1"])


def test_add_remove_restores_objects_and_counts_params() -> None:
    pipe = build_tiny_sdxl_pipeline()
    unet = pipe.unet
    before = dict(unet.named_modules())
    names = add_adapter(unet, AdapterConfig(rank=4, targets="all", use_dora=True), "d")
    add_adapter(unet, AdapterConfig(rank=4, targets="all", use_dora=False), "l")
    layers = adapted_layers(unet)
    assert set(layers) == set(names)
    dora = sum(p.numel() for p in trainable_parameters(unet, "d"))
    lora = sum(p.numel() for p in trainable_parameters(unet, "l"))
    assert dora - lora == sum(layer.out_features for layer in layers.values())  # + one magnitude per output channel
    assert all(not p.requires_grad for n, p in unet.named_parameters() if ".adapters." not in n)
    with pytest.raises(ValueError, match="already exists"):
        add_adapter(unet, AdapterConfig(targets="attn"), "d")
    remove_adapter(unet, "d")
    assert all(set(layer.adapters) == {"l"} for layer in adapted_layers(unet).values())
    remove_adapter(unet, "l")
    assert not adapted_layers(unet)
    assert all(before[n] is m for n, m in unet.named_modules())


def test_rank_and_alpha_patterns() -> None:
    pipe = build_tiny_sdxl_pipeline()
    special = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    cfg = AdapterConfig(rank=4, alpha=8, targets="attn", rank_pattern={special: 2}, alpha_pattern={special: 1.0})
    add_adapter(pipe.unet, cfg, "p")
    layers = adapted_layers(pipe.unet)
    assert layers[special].adapters["p"].spec.rank == 2 and layers[special].adapters["p"].spec.scale == 0.5
    other = next(layer for n, layer in layers.items() if n != special)
    assert other.adapters["p"].spec.rank == 4 and other.adapters["p"].spec.scale == 2.0
    assert torch.equal(layers[special].adapters["p"].B, torch.zeros(layers[special].out_features, 2))


def test_recompute_modes_pick_layers_by_name_and_shape(tiny) -> None:
    """Only layers whose output feeds a residual add recompute W0 x; 'cheap' only where d_in <= d_out."""
    from dora_diffusion import set_recompute

    unet = build_tiny_sdxl_pipeline().unet
    add_adapter(unet, AdapterConfig(rank=2, targets="attn_ff"), "a")
    layers = adapted_layers(unet)

    suffixes = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")

    def chosen() -> set[str]:
        return {s for n, layer in layers.items() if layer.recompute_output for s in suffixes if n.endswith("." + s)}

    assert chosen() == {"to_out.0", "proj_out"}  # the default ('cheap'): ff.net.2 is 4x wider at its input
    assert all(layers[n].in_features <= layers[n].out_features for n in layers if layers[n].recompute_output)
    set_recompute(unet, "all")
    assert chosen() == {"to_out.0", "proj_out", "ff.net.2"}
    set_recompute(unet, "none")
    assert chosen() == set()
    with pytest.raises(ValueError, match="recompute mode"):
        set_recompute(unet, "some")
    te = build_tiny_sdxl_pipeline().text_encoder
    add_adapter(te, AdapterConfig(rank=2, targets="all"), "a")
    set_recompute(te, "all")
    assert {n.rsplit(".", 1)[-1] for n, layer in adapted_layers(te).items() if layer.recompute_output} == {"out_proj", "fc2"}
