"""kohya / LyCORIS / ai-toolkit files: names, exactness against LyCORIS 4.1.3, strength, round trips, limits."""

from __future__ import annotations

import json
import math

import pytest
import torch
from lycoris.modules.locon import LoConModule
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dora_diffusion import AdapterConfig, AdapterFileError, add_adapter, save_adapter
from dora_diffusion.formats import parse_state_dict
from dora_diffusion.formats.kohya import (
    SDXL_LAYOUT,
    resolve_kohya,
    sdxl_module_names,
    sgm_names,
    unet_layout,
)
from dora_diffusion.core.inject import adapted_layers
from helpers import file_modules, fresh_pipe, make_adapter_file, max_diff, perturb_adapter, render

COMPONENT_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def linear_conv(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def sd_scripts_sgm(name: str) -> str | None:
    """Oracle: sd-scripts' ``make_unet_conversion_map`` for SDXL (3 levels, i = level, j = layer), restated."""
    pairs = [
        ("conv_in.", "input_blocks.0.0."),
        ("conv_out.", "out.2."),
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    for i in range(3):
        for j in range(2):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{3 * i + j + 1}.0."))
            pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{3 * i + j + 1}.1."))
        for j in range(3):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{3 * i + j}.0."))
            pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{3 * i + j}.1."))
        pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{3 * (i + 1)}.0.op."))
        pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{3 * i + 2}.2."))
    resnet = {"conv1.": "in_layers.2.", "conv2.": "out_layers.3.", "time_emb_proj.": "emb_layers.1.",
              "conv_shortcut.": "skip_connection."}  # fmt: skip
    dotted = name + "."
    for hf, sgm in pairs:
        if dotted.startswith(hf):
            rest = dotted[len(hf) :]
            if ".resnets." in hf:
                rest = resnet[rest]
            return (sgm + rest)[:-1]
    return None


def kohya_name(comp: str, name: str, unet: str = "sgm") -> str:
    """Oracle for the key prefix a kohya tool writes for a diffusers module name."""
    if comp == "unet":
        if unet == "lycoris":
            return "lycoris_" + name.replace(".", "_")
        return "lora_unet_" + (sd_scripts_sgm(name) if unet == "sgm" else name).replace(".", "_")
    return COMPONENT_PREFIX[comp] + "text_model_" + name.removeprefix("text_model.").replace(".", "_")


# ---------------------------------------------------------------------------------------------- names


def test_sgm_names_match_sd_scripts_and_formats_table() -> None:
    for names in (sdxl_module_names("unet"), linear_conv(fresh_pipe().unet)):
        got = sgm_names(names)
        assert got == {n: sd_scripts_sgm(n) for n in names}
    tiny = linear_conv(fresh_pipe().unet)
    assert unet_layout(tiny) == unet_layout(sdxl_module_names("unet")) == SDXL_LAYOUT
    assert sgm_names(tiny)["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == (
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    )
    assert sgm_names(tiny)["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"
    assert sgm_names(tiny)["down_blocks.1.downsamplers.0.conv"] == "input_blocks.6.0.op"
    assert sgm_names(tiny)["up_blocks.2.resnets.1.conv_shortcut"] == "output_blocks.7.0.skip_connection"


def test_sdxl_module_names_are_the_real_sdxl_models() -> None:
    """The names used for file-to-file conversion equal those of diffusers' SDXL UNet and the two CLIPs."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        )  # fmt: skip
        te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12))
        te2 = CLIPTextModelWithProjection(
            CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, projection_dim=1280)
        )

    def with_wrapper(names):  # transformers 5 dropped `text_model.` from CLIPTextModel
        return {n if n.startswith(("text_model.", "text_projection")) else "text_model." + n for n in names}

    assert set(linear_conv(unet)) == sdxl_module_names("unet") and len(sdxl_module_names("unet")) == 794
    assert with_wrapper(linear_conv(te1)) == sdxl_module_names("text_encoder")
    assert with_wrapper(linear_conv(te2)) == sdxl_module_names("text_encoder_2")


def test_resolve_text_model_wrapper_and_ambiguity() -> None:
    te1 = set(linear_conv(fresh_pipe().text_encoder))  # transformers 5: no text_model. wrapper
    te2 = set(linear_conv(fresh_pipe().text_encoder_2))  # has the wrapper
    files = ["text_model_encoder_layers_0_self_attn_q_proj", "encoder_layers_1_mlp_fc2"]
    assert resolve_kohya("text_encoder", files, te1) == {
        files[0]: "encoder.layers.0.self_attn.q_proj", files[1]: "encoder.layers.1.mlp.fc2"
    }
    assert resolve_kohya("text_encoder_2", files, te2) == {
        files[0]: "text_model.encoder.layers.0.self_attn.q_proj", files[1]: "text_model.encoder.layers.1.mlp.fc2"
    }
    unet = set(linear_conv(fresh_pipe().unet))
    assert resolve_kohya("unet", ["input_blocks_4_1_proj_in", "nonsense_to_q"], unet) == {
        "input_blocks_4_1_proj_in": "down_blocks.1.attentions.0.proj_in"
    }
    with pytest.raises(AdapterFileError, match="both name unet.down_blocks.1.attentions.0.proj_in"):
        resolve_kohya("unet", ["input_blocks_4_1_proj_in", "down_blocks_1_attentions_0_proj_in"], unet)


# ---------------------------------------------------------------------------------------------- LyCORIS files


def lycoris_file(path, wd: bool, wd_on_out: bool, unet_naming: str = "sgm", seed: int = 0):
    """LoConModules on every UNet Linear/Conv2d and both text encoders, saved under kohya names.

    Returns the file and LyCORIS's own merged weight of every module, keyed by (component, module name).
    """
    src = fresh_pipe()
    g = torch.Generator().manual_seed(seed)
    state_dict, merged = {}, {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        for i, (name, module) in enumerate(sorted(linear_conv(getattr(src, comp)).items())):
            rank = 2 if isinstance(module, nn.Conv2d) else 4
            alpha = (0, 3.0, 8.0)[i % 3]  # 0: LyCORIS uses alpha = rank; the key is then dropped below
            lyco = LoConModule(
                "m", module, 1.0, rank, alpha, weight_decompose=wd, wd_on_out=wd_on_out, bypass_mode=False
            )
            with torch.no_grad():
                lyco.lora_up.weight.copy_(torch.randn(lyco.lora_up.weight.shape, generator=g) * 0.05)
                if wd:
                    lyco.dora_scale.mul_(0.8 + 0.4 * torch.rand(lyco.dora_scale.shape, generator=g))
                merged[comp, name] = lyco.get_merged_weight(1.0)[0].detach().clone()
            prefix = kohya_name(comp, name, unet_naming)
            for key, value in lyco.custom_state_dict().items():
                if not (key == "alpha" and alpha == 0):
                    state_dict[f"{prefix}.{key}"] = value.detach().contiguous()
    save_file(state_dict, path)
    return path, merged


def pipe_with_weights(merged: dict, strength: float = 1.0):
    """A fresh pipeline whose adapted weights are ``W0 + k (W' - W0)`` (ComfyUI's strength convention)."""
    p = fresh_pipe()
    with torch.no_grad():
        for (comp, name), w in merged.items():
            base = getattr(p, comp).get_submodule(name).weight
            base.copy_(base + strength * (w - base))
    return p


@pytest.mark.parametrize(
    "kind, unet_naming",
    [("dora_out", "sgm"), ("dora_in", "sgm"), ("lora", "diffusers"), ("dora_out", "lycoris")],
)
def test_lycoris_files_match_lycoris_merged_weights(tmp_path, base_images, kind, unet_naming) -> None:
    path, merged = lycoris_file(tmp_path / "lyco.safetensors", kind != "lora", kind != "dora_in", unet_naming)
    pipe = fresh_pipe()
    name = pipe.load_dora_weights(path)
    specs = [layer.adapters[name].spec for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
             for layer in adapted_layers(m).values()]  # fmt: skip
    assert len(specs) == len(merged) == 373 + 12 + 19
    axes = {s.norm_axis for s in specs if s.use_dora}
    assert axes == {"dora_out": {"out"}, "dora_in": {"in"}, "lora": set()}[kind]
    assert any(s.alpha == s.rank for s in specs) and {3.0, 8.0} <= {s.alpha for s in specs}  # missing alpha = rank
    ours = render(pipe)
    assert max_diff(ours, base_images) > 1e-2  # the adapter changes the images
    diff = max_diff(ours, render(pipe_with_weights(merged)))
    print(f"{kind}/{unet_naming}: max |images - LyCORIS merged images| = {diff:.2e}")
    assert diff <= 1e-4


def test_strength_follows_comfyui_convention(tmp_path, base_images) -> None:
    path, merged = lycoris_file(tmp_path / "lyco.safetensors", wd=True, wd_on_out=True)
    pipe = fresh_pipe()
    pipe.set_dora_adapters(pipe.load_dora_weights(path), 0.5)
    half = render(pipe)
    assert max_diff(half, base_images) > 1e-2
    diff = max_diff(half, render(pipe_with_weights(merged, 0.5)))  # W0 + 0.5 (W' - W0)
    print(f"strength 0.5: max |images - ComfyUI-convention images| = {diff:.2e}")
    assert diff <= 1e-4


def test_ai_toolkit_magnitude_and_1d_dora_scale(pipe) -> None:
    """ai-toolkit: `.magnitude` (out,), no alpha, so scale 1; a 1-D dora_scale is per-output too."""
    g = torch.Generator().manual_seed(3)
    unet_name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    te_name = "text_model.encoder.layers.1.self_attn.v_proj"
    targets = {
        ("unet", unet_name, "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", "magnitude"),
        ("text_encoder_2", te_name, "lora_te2_text_model_encoder_layers_1_self_attn_v_proj", "dora_scale"),
    }
    state_dict, expected = {}, {}
    for comp, name, key, mag_key in targets:
        w0 = getattr(pipe, comp).get_submodule(name).weight.detach().clone()
        a, b = torch.randn(4, w0.shape[1], generator=g) * 0.2, torch.randn(w0.shape[0], 4, generator=g) * 0.2
        m = w0.norm(dim=1) * (0.8 + 0.4 * torch.rand(w0.shape[0], generator=g))
        state_dict.update({f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.{mag_key}": m})
        w = w0 + b @ a  # alpha missing: alpha = rank, scale 1
        expected[comp, name] = (m / w.norm(dim=1))[:, None] * w
    pipe.load_dora_weights(state_dict)
    pipe.fuse_dora()
    for (comp, name), want in expected.items():
        got = getattr(pipe, comp).get_submodule(name).weight
        assert (got - want).abs().max().item() <= 1e-6


# ---------------------------------------------------------------------------------------------- writing


def our_merged(pipe, adapter: str) -> dict[tuple[str, str], torch.Tensor]:
    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        for name, layer in adapted_layers(getattr(pipe, comp)).items():
            out[comp, name] = layer.weight.float() + layer.adapters[adapter].delta()
    return out


def trained_pipe(use_dora: bool = True, norm_axis: str = "out", use_rslora: bool = False):
    p = fresh_pipe()
    add_adapter(p.unet, AdapterConfig(rank=4, alpha=6, use_dora=use_dora, targets="all", norm_axis=norm_axis,
                                      use_rslora=use_rslora), "a")  # fmt: skip
    perturb_adapter(p.unet, "a", seed=5)
    for i, te in enumerate((p.text_encoder, p.text_encoder_2)):
        add_adapter(te, AdapterConfig(rank=2, use_dora=use_dora, targets="all", norm_axis=norm_axis), "a")
        perturb_adapter(te, "a", seed=6 + i)
    return p


def oracle_modules(pipe) -> dict[str, tuple[str, str, nn.Module]]:
    """kohya key prefix -> (component, name, base module), from the sd-scripts oracle."""
    return {
        kohya_name(comp, name): (comp, name, module)
        for comp in ("unet", "text_encoder", "text_encoder_2")
        for name, module in linear_conv(getattr(pipe, comp)).items()
    }


@pytest.mark.parametrize("kind", ["dora_out", "dora_in", "lora"])
def test_our_kohya_file_read_by_lycoris(tmp_path, kind) -> None:
    trained = trained_pipe(use_dora=kind != "lora", norm_axis="in" if kind == "dora_in" else "out")
    path = trained.save_dora_weights(tmp_path, adapter_name="a", format="kohya")
    ours = our_merged(trained, "a")
    groups = file_modules(path)
    where = oracle_modules(fresh_pipe())
    assert len(groups) == len(ours) and set(groups) <= set(where)  # SGM / text_model_ names, as sd-scripts writes
    worst = 0.0
    for prefix, params in groups.items():  # under no_grad, as LyCORIS loads files
        comp, name, base = where[prefix]
        assert params["alpha"].dim() == 0 and params["alpha"].dtype == torch.float32
        up, down, ds = params["lora_up.weight"], params["lora_down.weight"], params.get("dora_scale")
        ones = (1,) * (base.weight.dim() - 2)
        with torch.no_grad():
            if kind != "dora_in":
                assert (ds is None) == (kind == "lora")
                assert ds is None or (ds.dtype == torch.float32 and tuple(ds.shape) == (base.weight.shape[0], 1, *ones))
                lyco = LoConModule.make_module_from_state_dict(prefix, base, up, down, None, params["alpha"], ds)
            else:  # LyCORIS' loader always builds per-output modules; build a legacy one as LyCORIS < 3.2 did
                assert ds.dtype == torch.float32 and tuple(ds.shape) == (1, base.weight.shape[1], *ones)
                lyco = LoConModule(prefix, base, 1.0, down.shape[0], float(params["alpha"]), weight_decompose=True,
                                   wd_on_out=False)  # fmt: skip
                lyco.lora_up.weight.copy_(up)
                lyco.lora_down.weight.copy_(down)
                lyco.dora_scale.copy_(ds)
            theirs = lyco.get_merged_weight(1.0)[0]
        worst = max(worst, (theirs - ours[comp, name]).abs().max().item())
    print(f"{kind}: max |LyCORIS merged - ours| = {worst:.2e}")
    assert worst <= 1e-5

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_network_dim"] == "4"
    assert float(meta["ss_network_alpha"]) == 6.0 and args["algo"] == "locon" and args["conv_dim"] == "4"
    assert args["dora_wd"] == str(kind != "lora")
    assert args.get("wd_on_output") == {"dora_out": "True", "dora_in": "False", "lora": None}[kind]


def test_training_metadata_reaches_the_kohya_header(tmp_path) -> None:
    trained = trained_pipe()
    models = {c: getattr(trained, c) for c in ("unet", "text_encoder", "text_encoder_2")}
    meta = {"base_model": "stabilityai/stable-diffusion-xl-base-1.0", "trigger_words": ["TOK", "sks"],
            "ss_learning_rate": "0.0001", "ss_network_dim": "999", "training": {"rank": 4}}  # fmt: skip
    path = save_adapter(models, tmp_path, "a", weight_name="k.safetensors", format="kohya", metadata=meta)
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    assert header["ss_sd_model_name"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert header["modelspec.trigger_phrase"] == "TOK, sks" and header["ss_learning_rate"] == "0.0001"
    assert header["ss_network_dim"] == "4"  # computed keys win over passed-through ones
    assert json.loads(header["dora_diffusion"])["training"] == {"rank": 4}
    assert all(isinstance(v, str) for v in header.values())


def test_the_kohya_header_states_the_trained_resolution(tmp_path) -> None:
    """modelspec.resolution says the size the adapter was trained at (was: 1024x1024 even for a 64 px model);
    without training metadata it is SDXL's own size."""
    trained = trained_pipe()
    models = {c: getattr(trained, c) for c in ("unet", "text_encoder", "text_encoder_2")}
    headers = []
    for name, meta in (("t64", {"training": {"resolution": 64}}), ("plain", {})):
        path = save_adapter(models, tmp_path, "a", weight_name=f"{name}.safetensors", format="kohya", metadata=meta)
        with safe_open(str(path), "pt") as f:
            headers.append(f.metadata())
    assert headers[0]["modelspec.resolution"] == "64x64" and headers[0]["ss_resolution"] == "(64, 64)"
    assert headers[1]["modelspec.resolution"] == "1024x1024" and "ss_resolution" not in headers[1]


@pytest.mark.parametrize("use_dora", [True, False])
def test_diffusers_kohya_diffusers_round_trip_is_bit_exact(tmp_path, use_dora) -> None:
    src = make_adapter_file(tmp_path / "src", use_dora=use_dora)
    p1 = fresh_pipe()
    p1.load_dora_weights(src)
    kohya = p1.save_dora_weights(tmp_path / "kohya", format="kohya")
    p2 = fresh_pipe()
    p2.load_dora_weights(kohya)
    back = p2.save_dora_weights(tmp_path / "back")
    a, b = load_file(src), load_file(back)
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(src), "pt") as f1, safe_open(str(back), "pt") as f2:
        assert json.loads(f1.metadata()["lora_adapter_metadata"]) == json.loads(f2.metadata()["lora_adapter_metadata"])


def test_legacy_per_input_kohya_round_trip_is_bit_exact(tmp_path) -> None:
    trained = trained_pipe(norm_axis="in")
    path = trained.save_dora_weights(tmp_path / "one", adapter_name="a", format="kohya")
    p2 = fresh_pipe()
    p2.load_dora_weights(path, adapter_name="a")
    again = p2.save_dora_weights(tmp_path / "two", adapter_name="a", format="kohya")
    a, b = load_file(path), load_file(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rslora_alpha_is_folded_for_kohya_readers(tmp_path) -> None:
    trained = trained_pipe(use_rslora=True)
    path = trained.save_dora_weights(tmp_path, adapter_name="a", format="kohya")
    sd = load_file(path)
    assert sd["lora_unet_input_blocks_4_1_proj_in.alpha"].item() == pytest.approx(6 * math.sqrt(4))
    p2 = fresh_pipe()
    p2.load_dora_weights(path, adapter_name="a")
    ours, theirs = our_merged(trained, "a"), our_merged(p2, "a")
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6


# ---------------------------------------------------------------------------------------------- limits


@pytest.mark.parametrize(
    "param, what",
    [
        # lora_mid (Tucker LoCon), hada_* (LoHa), lokr_* (LoKr) and diff load since issue 30 (tests/test_lycoris.py)
        ("w_norm", "trained norm layers"),
        ("oft_blocks", "OFT/BOFT"),
        ("lora_middle.weight", "suffix 'lora_middle.weight'"),
    ],
)
def test_unsupported_modules_are_named_and_nothing_loads(pipe, param, what) -> None:
    good = "lora_unet_input_blocks_4_1_proj_in"
    bad = "lora_unet_input_blocks_4_1_proj_out"
    sd = {
        f"{good}.lora_down.weight": torch.zeros(4, 64), f"{good}.lora_up.weight": torch.zeros(64, 4),
        f"{bad}.lora_down.weight": torch.zeros(4, 64), f"{bad}.lora_up.weight": torch.zeros(64, 4),
        f"{bad}.{param}": torch.zeros(4, 4),
    }  # fmt: skip
    with pytest.raises(AdapterFileError, match=rf"{bad}\.{param}.*{what}.*not supported"):
        pipe.load_dora_weights(sd)
    assert pipe.get_dora_adapters() == []


def test_dora_scale_axis_from_shape() -> None:
    key = "lora_unet_input_blocks_4_1_proj_in"

    def parse(ds, a=(4, 48), b=(64, 4)):
        sd = {f"{key}.lora_down.weight": torch.zeros(a), f"{key}.lora_up.weight": torch.zeros(b),
              f"{key}.dora_scale": torch.ones(ds)}  # fmt: skip
        return parse_state_dict(sd).modules["unet"]["input_blocks_4_1_proj_in"]

    assert parse((64, 1)).norm_axis == "out" and parse((64,)).norm_axis == "out"
    assert parse((1, 48)).norm_axis == "in" and parse((1, 48)).magnitude.shape == (48,)
    assert parse((8, 1, 1, 1), (4, 6, 3, 3), (8, 4, 1, 1)).norm_axis == "out"
    assert parse((1, 6, 1, 1), (4, 6, 3, 3), (8, 4, 1, 1)).norm_axis == "in"
    with pytest.raises(AdapterFileError, match=r"dora_scale has shape \(48, 1\).*\(64, 1\).*\(1, 48\)"):
        parse((48, 1))
