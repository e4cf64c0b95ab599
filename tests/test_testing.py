"""The tiny offline SDXL pipeline and toy data every other test stands on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from dora_diffusion.testing import (
    MODEL_MAX_LENGTH,
    TINY_RESOLUTION,
    build_tiny_sdxl_pipeline,
    make_toy_imagefolder,
    make_toy_images,
    save_tiny_sdxl_pipeline,
)
from helpers import max_diff, render

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def state_dicts(pipe: StableDiffusionXLPipeline) -> dict[str, dict[str, torch.Tensor]]:
    return {name: getattr(pipe, name).state_dict() for name in COMPONENTS}


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = state_dicts(build_tiny_sdxl_pipeline(seed=0))
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    b = state_dicts(build_tiny_sdxl_pipeline(seed=0))
    c = state_dicts(build_tiny_sdxl_pipeline(seed=1))
    for name in COMPONENTS:
        assert a[name].keys() == b[name].keys() == c[name].keys()
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
        changed = [k for k in a[name] if not torch.equal(a[name][k], c[name][k])]
        weights = [k for k in a[name] if k.endswith("weight") and "norm" not in k]
        assert set(weights) <= set(changed), (name, set(weights) - set(changed))


def test_two_steps_give_finite_varied_images(pipe) -> None:
    images = render(pipe)
    assert images.shape == (1, TINY_RESOLUTION, TINY_RESOLUTION, 3)
    assert images.dtype == np.float32
    assert np.isfinite(images).all()
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert images.std() > 0.05  # an image, not a constant
    assert max_diff(images, render(pipe)) == 0.0  # same prompt and seed: bit-identical
    default = pipe("x", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert default.shape == (1, TINY_RESOLUTION, TINY_RESOLUTION, 3)  # TINY_RESOLUTION is the default size


def test_prompt_and_seed_change_the_image(pipe) -> None:
    base = render(pipe, "a photo of TOK toy")
    other_prompt = render(pipe, "a green cube on the grass")
    other_seed = render(pipe, "a photo of TOK toy", seed=1)
    assert np.abs(base - other_prompt).mean() > 5e-3
    assert np.abs(base - other_seed).mean() > 5e-3


def test_save_and_load_round_trip(tmp_path, pipe) -> None:
    path = save_tiny_sdxl_pipeline(tmp_path / "tiny-sdxl", seed=0)
    assert path == tmp_path / "tiny-sdxl"
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = StableDiffusionXLPipeline.from_pretrained(path)
    loaded.set_progress_bar_config(disable=True)
    for name, tensors in state_dicts(pipe).items():
        reloaded = getattr(loaded, name).state_dict()
        assert reloaded.keys() == tensors.keys(), name
        assert all(torch.equal(reloaded[k], v) for k, v in tensors.items()), name
    assert loaded.config.force_zeros_for_empty_prompt is True
    assert loaded.tokenizer_2.pad_token == "!"
    assert loaded.tokenizer("café 🎨").input_ids == pipe.tokenizer("café 🎨").input_ids
    assert max_diff(render(loaded), render(pipe)) == 0.0


@pytest.mark.parametrize("which", ["tokenizer", "tokenizer_2"])
@pytest.mark.parametrize("prompt", ["café 🎨", "a photo of TOK toy", "日本語のテキスト", ""])
def test_tokenizers_take_any_text(pipe, which: str, prompt: str) -> None:
    tokenizer = getattr(pipe, which)
    encoder = pipe.text_encoder if which == "tokenizer" else pipe.text_encoder_2
    ids = tokenizer(prompt, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True).input_ids
    n_bytes = len(prompt.replace(" ", "").encode("utf-8"))  # one token per byte; spaces only split words
    assert len(ids) == MODEL_MAX_LENGTH
    assert ids[0] == tokenizer.bos_token_id and ids[n_bytes + 1] == tokenizer.eos_token_id
    assert all(i == tokenizer.pad_token_id for i in ids[n_bytes + 2 :])
    assert max(ids) < encoder.config.vocab_size == len(tokenizer) == 514
    assert tokenizer.decode(ids[: n_bytes + 2], skip_special_tokens=True) == prompt.lower()


def test_special_ids_match_sdxl_conventions(pipe) -> None:
    t1, t2 = pipe.tokenizer, pipe.tokenizer_2
    assert (t1.bos_token_id, t1.eos_token_id, t1.pad_token_id) == (512, 513, 513)  # pads with <|endoftext|>
    assert (t2.bos_token_id, t2.eos_token_id, t2.pad_token_id) == (512, 513, 0)  # pads with "!"
    for tokenizer, encoder in ((t1, pipe.text_encoder), (t2, pipe.text_encoder_2)):
        config = encoder.config
        assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        )
        assert tokenizer.model_max_length == config.max_position_embeddings == MODEL_MAX_LENGTH
    assert (pipe.text_encoder.config.hidden_act, pipe.text_encoder_2.config.hidden_act) == ("quick_gelu", "gelu")


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("down_blocks.0.resnets.0.conv1", torch.nn.Conv2d),
        ("down_blocks.0.resnets.1.time_emb_proj", torch.nn.Linear),
        ("down_blocks.0.downsamplers.0.conv", torch.nn.Conv2d),
        ("down_blocks.1.resnets.0.conv_shortcut", torch.nn.Conv2d),
        ("down_blocks.1.attentions.0.proj_in", torch.nn.Linear),
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", torch.nn.Linear),
        ("down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_out.0", torch.nn.Linear),
        ("down_blocks.2.attentions.1.transformer_blocks.1.ff.net.0.proj", torch.nn.Linear),
        ("down_blocks.2.attentions.1.transformer_blocks.1.ff.net.2", torch.nn.Linear),
        ("mid_block.resnets.0.conv1", torch.nn.Conv2d),
        ("mid_block.attentions.0.transformer_blocks.2.attn2.to_k", torch.nn.Linear),
        ("up_blocks.0.upsamplers.0.conv", torch.nn.Conv2d),
        ("up_blocks.0.resnets.2.conv_shortcut", torch.nn.Conv2d),
        ("up_blocks.0.attentions.2.transformer_blocks.2.attn1.to_v", torch.nn.Linear),
        ("up_blocks.1.attentions.2.proj_out", torch.nn.Linear),
        ("up_blocks.2.resnets.2.conv2", torch.nn.Conv2d),
        ("add_embedding.linear_1", torch.nn.Linear),
    ],
)
def test_unet_has_sdxl_module_names(pipe, name: str, kind: type[torch.nn.Module]) -> None:
    assert type(pipe.unet.get_submodule(name)) is kind


def test_unet_block_counts_and_conditioning_sizes(pipe) -> None:
    unet, config = pipe.unet, pipe.unet.config
    assert [len(b.resnets) for b in unet.down_blocks] == [2, 2, 2]
    assert [len(b.resnets) for b in unet.up_blocks] == [3, 3, 3]  # as SDXL's output_blocks 0..8
    assert not hasattr(unet.down_blocks[0], "attentions") and not hasattr(unet.up_blocks[2], "attentions")
    assert [len(a.transformer_blocks) for b in unet.down_blocks[1:] for a in b.attentions] == [2, 2, 3, 3]
    assert [len(a.transformer_blocks) for a in unet.mid_block.attentions] == [3]
    assert [len(a.transformer_blocks) for b in unet.up_blocks[:2] for a in b.attentions] == [3, 3, 3, 2, 2, 2]
    shortcut = unet.down_blocks[1].resnets[0].conv_shortcut
    assert (shortcut.in_channels, shortcut.out_channels) == (32, 64)
    te1, te2 = pipe.text_encoder.config, pipe.text_encoder_2.config
    assert config.cross_attention_dim == te1.hidden_size + te2.hidden_size == 80
    assert unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.in_features == 80
    assert config.projection_class_embeddings_input_dim == 6 * config.addition_time_embed_dim + te2.projection_dim
    assert unet.add_embedding.linear_1.in_features == config.projection_class_embeddings_input_dim
    assert config.sample_size * pipe.vae_scale_factor == TINY_RESOLUTION
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.latent_channels == 4


def test_scheduler_is_sdxl_base_euler(pipe) -> None:
    config = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    expected = {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "num_train_timesteps": 1000,
    }
    assert {k: config[k] for k in expected} == expected
    assert pipe.config.force_zeros_for_empty_prompt is True


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_casts_every_model(dtype: torch.dtype, capfd) -> None:
    pipe = build_tiny_sdxl_pipeline(seed=0, dtype=dtype)
    assert capfd.readouterr().err == ""  # no "modules to keep in float32" warning
    for name in COMPONENTS:
        assert {p.dtype for p in getattr(pipe, name).parameters()} == {dtype}, name


def test_toy_images_are_deterministic_rgb_with_a_red_disc() -> None:
    images = make_toy_images(3, size=48, seed=7)
    assert [(im.mode, im.size) for im in images] == [("RGB", (48, 48))] * 3
    again = make_toy_images(3, size=48, seed=7)
    arrays = [np.asarray(im) for im in images]
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(arrays, again))
    assert not np.array_equal(arrays[0], np.asarray(make_toy_images(1, size=48, seed=8)[0]))
    assert not np.array_equal(arrays[0], arrays[1])
    for a in arrays:
        red = np.all(a == (220, 30, 30), axis=-1).mean()
        assert 0.05 < red < 0.35  # the disc covers a visible part of every image
    with pytest.raises(ValueError, match="size >= 8"):
        make_toy_images(1, size=4)


def test_toy_imagefolder_loads_with_datasets(tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    root = make_toy_imagefolder(tmp_path / "toy", n=5, seed=3, caption="a sks dog TOK", caption_column="text")
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == [f"{i:04d}.png" for i in range(5)]
    dataset = datasets.load_dataset(str(root), split="train", cache_dir=str(tmp_path / "cache"))
    assert dataset.column_names == ["image", "text"] and len(dataset) == 5
    assert all(text.startswith("a sks dog TOK") for text in dataset["text"])
    assert len(set(dataset["text"])) > 1  # captions vary a little
    expected = make_toy_images(5, seed=3)
    for row, image in zip(dataset, expected):
        assert isinstance(row["image"], Image.Image) and row["image"].size == (TINY_RESOLUTION, TINY_RESOLUTION)
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(image))  # PNG is lossless
    default = make_toy_imagefolder(tmp_path / "default")
    imagefolder = datasets.load_dataset("imagefolder", data_dir=str(default), cache_dir=str(tmp_path / "cache"))
    assert imagefolder["train"].column_names == ["image", "prompt"] and len(imagefolder["train"]) == 4
