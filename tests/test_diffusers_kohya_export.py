"""diffusers' own kohya export of a PEFT DoRA (``convert_state_dict_to_kohya``, ``--output_kohya_format``) loads
exactly as the PEFT model it came from renders (PEFT is the reference)."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from safetensors.torch import load_file, save_file

from dora_diffusion import AdapterFileError
from dora_diffusion.core.inject import adapted_layers
from helpers import fresh_pipe, max_diff, render

peft = pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def peft_dora():
    """A tiny pipeline with PEFT DoRA adapters (lora_alpha = r, as the export assumes) that look trained, and its
    images."""
    ref = fresh_pipe()
    ref.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, use_dora=True, init_lora_weights="gaussian", target_modules=UNET_TARGETS))
    for te in (ref.text_encoder, ref.text_encoder_2):
        te.add_adapter(LoraConfig(r=3, lora_alpha=3, use_dora=True, init_lora_weights="gaussian", target_modules=TE_TARGETS))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for comp in COMPONENTS:
            for name, p in getattr(ref, comp).named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
                elif "lora_magnitude_vector" in name:
                    p.mul_(0.8 + 0.4 * torch.rand(p.shape, generator=g))
    return ref, render(ref)


def kohya_export(ref) -> dict[str, torch.Tensor]:
    """``convert_state_dict_to_kohya`` of the three PEFT state dicts with diffusers' component prefixes."""
    peft_sd = {f"{comp}.{k}": v for comp in COMPONENTS for k, v in get_peft_model_state_dict(getattr(ref, comp)).items()}
    return convert_state_dict_to_kohya(peft_sd)


def test_diffusers_kohya_export_of_peft_dora_loads_exactly(tmp_path, peft_dora, base_images) -> None:
    ref, want = peft_dora
    state_dict = kohya_export(ref)
    # What makes this file unlike every other kohya file: integer alphas, PEFT magnitudes under split names.
    assert state_dict["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].dtype == torch.int64
    assert state_dict["lora_unet_down_blocks_0_resnets_0.conv1.lora_magnitude_vector"].shape == (1, 32, 1, 1)
    assert state_dict["lora_te2_text_model_encoder_layers_0_self_attn.q_proj.lora_magnitude_vector"].shape == (48,)
    save_file(state_dict, tmp_path / "pytorch_lora_weights_kohya.safetensors")
    assert max_diff(want, base_images) > 1e-2  # the adapter changes the images

    pipe = fresh_pipe()
    pipe.load_dora_weights(tmp_path / "pytorch_lora_weights_kohya.safetensors")
    diff = max_diff(render(pipe), want)
    print(f"diffusers kohya export vs PEFT: max |diff| = {diff:.2e}")
    assert diff <= 1e-4
    counts = {c: len(adapted_layers(getattr(pipe, c))) for c in COMPONENTS}
    want_counts = {c: sum(n.endswith(".lora_A") for n, _ in getattr(ref, c).named_modules()) for c in COMPONENTS}
    assert counts == want_counts and all(counts.values())
    kinds = {type(layer.base_layer).__name__ for layer in adapted_layers(pipe.unet).values()}
    assert kinds == {"Linear", "Conv2d"}
    # every magnitude came from the file (none left at ||W0 + s B A||, which would also render close)
    ref_mags = {n: p for n, p in ref.unet.named_parameters() if "lora_magnitude_vector" in n}
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    got = adapted_layers(pipe.unet)[name].adapters["default_0"].magnitude
    assert torch.equal(got, ref_mags[f"{name}.lora_magnitude_vector.default.weight"])


def test_diffusers_dreambooth_script_kohya_file_loads_exactly(tmp_path, peft_dora) -> None:
    """The SDXL DreamBooth script's ``--output_kohya_format`` path: its diffusers file, read back, converted with
    ``convert_all_state_dict_to_peft`` then ``convert_state_dict_to_kohya``. With text encoders that leaves the
    UNet's attention keys as ``..._to_q_lora.down.weight`` with no alpha."""
    ref, want = peft_dora
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path,
        **{f"{comp}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(getattr(ref, comp))) for comp in COMPONENTS},
    )
    lora_state_dict = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(lora_state_dict))
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q_lora.down.weight" in kohya
    (tmp_path / "kohya").mkdir()
    save_file(kohya, tmp_path / "kohya" / "pytorch_lora_weights_kohya.safetensors")

    pipe = fresh_pipe()
    pipe.load_dora_weights(tmp_path / "kohya")
    diff = max_diff(render(pipe), want)
    print(f"DreamBooth script kohya file vs PEFT: max |diff| = {diff:.2e}")
    assert diff <= 1e-4


def test_diffusers_kohya_export_errors_name_the_key(peft_dora) -> None:
    ref, _ = peft_dora
    sd = kohya_export(ref)
    mag = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1.to_q.lora_magnitude_vector"
    pipe = fresh_pipe()
    orphan = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1.to_x.lora_magnitude_vector": sd[mag]}
    with pytest.raises(AdapterFileError, match=r"attn1_to_x.*no down/A weight"):
        pipe.load_dora_weights({**sd, **orphan})
    bad_shape = {**sd, mag: sd[mag].reshape(1, -1)}
    with pytest.raises(AdapterFileError, match=r"attn1_to_q.*lora_magnitude_vector has shape \(1, 64\); expected \(64,\)"):
        pipe.load_dora_weights(bad_shape)
    both = {**sd, mag.replace(".to_q.lora_magnitude_vector", "_to_q.dora_scale"): sd[mag].reshape(-1, 1)}
    with pytest.raises(AdapterFileError, match=r"attn1_to_q.*both"):
        pipe.load_dora_weights(both)
    with pytest.raises(AdapterFileError, match=r"conv1.alpha' has dtype torch.bool; an alpha must be a float or an integer"):
        pipe.load_dora_weights({**sd, "lora_unet_down_blocks_0_resnets_0_conv1.alpha": torch.tensor(True)})
    assert pipe.get_dora_adapters() == []
