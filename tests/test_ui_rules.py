"""Issue 19: what ComfyUI, Forge and A1111 users render from our files, against their rules stated in plain torch.

ComfyUI's ``weight_decompose`` (``comfy/weight_adapter/base.py``) and Forge's copy (``backend/patcher/lora.py``)
are restated in ``comfyui_rule``, A1111's ``NetworkModule.apply_weight_decompose`` (``extensions-builtin/Lora/
network.py``) in ``a1111_rule``, from what they compute, not imported: the standard kohya file renders
differently under ComfyUI's rule, the ``format="comfyui"`` file renders our images at every strength, and A1111
is exact for per-input DoRA only.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dora_diffusion import AdapterConfig, AdapterFileError, add_adapter, save_adapter
from dora_diffusion.cli import convert_file, describe, main, model_named, read_adapter
from dora_diffusion.formats import parse_state_dict
from dora_diffusion.formats.comfyui import RULE_KEY, to_comfyui_modules
from dora_diffusion.formats.kohya import PREFIXES, resolve_kohya
from dora_diffusion.core.inject import adapted_layers
from dora_diffusion.testing import save_tiny_sdxl_pipeline
from helpers import file_modules, fresh_pipe, max_diff, perturb_adapter, render

STRENGTHS = (0.5, 1.0, 1.5)


# ---------------------------------------------------------------------------------------------- ComfyUI's rule


def comfyui_rule(w0: torch.Tensor, params: dict[str, torch.Tensor], strength: float) -> torch.Tensor:
    """ComfyUI's patched weight for one kohya module (LoRAAdapter.calculate_weight + weight_decompose), fp32.

    ``diff = (up.flatten(1) @ down.flatten(1)) * alpha / rank`` (alpha missing: 1); without ``dora_scale`` the
    weight is ``W0 + k diff``. With it, ``Wc = W0 + diff`` is scaled by ``dora_scale / (norm + eps)``, the norm
    being of **W0** per output row when ``dora_scale.shape[0] == out``, else of ``Wc`` per input column; then
    ``W0 + k (Wc - W0)``. ``eps`` is ``finfo(float32).eps``: ComfyUI patches an fp32 copy of the weight.
    """
    w = w0.detach().float().clone()
    up, down = params["lora_up.weight"].float(), params["lora_down.weight"].float()
    alpha = params["alpha"].item() / down.shape[0] if "alpha" in params else 1.0
    diff = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * alpha
    scale = params.get("dora_scale")
    if scale is None:
        return w + strength * diff
    wc = w + diff
    ones = [1] * (w.dim() - 1)
    if scale.shape[0] == w.shape[0]:
        norm = w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *ones)
    else:
        norm = wc.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(w.shape[1], *ones).transpose(0, 1)
    wc = wc * (scale.float() / (norm + torch.finfo(torch.float32).eps))
    return w + strength * (wc - w)


def a1111_rule(w0: torch.Tensor, params: dict[str, torch.Tensor], strength: float) -> torch.Tensor:
    """A1111's patched weight for one kohya module (NetworkModuleLora.calc_updown + finalize_updown), fp32.

    ``updown = (up.flatten(1) @ down.flatten(1)) * alpha / rank`` (alpha missing: 1); with ``dora_scale`` ``d`` it
    becomes ``W1 d / ||columns of W1|| - W0``, ``W1 = W0 + updown``, the norm per input channel over (out, kh, kw)
    whatever the shape of ``d`` (no eps); the weight is ``W0 + k updown``.
    """
    w = w0.detach().float().clone()
    up, down = params["lora_up.weight"].float(), params["lora_down.weight"].float()
    alpha = params["alpha"].item() / down.shape[0] if "alpha" in params else 1.0
    updown = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * alpha
    scale = params.get("dora_scale")
    if scale is not None:
        w1 = w + updown
        cols = w1.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(w.shape[1], *[1] * (w.dim() - 1))
        updown = w1 * (scale.float() / cols.transpose(0, 1)) - w
    return w + strength * updown


def patch_with_rule(pipe, path, strength: float, rule=None) -> None:
    """Write a tool's patched weights (default ComfyUI's) for every module of the kohya file ``path`` into ``pipe``."""
    rule = comfyui_rule if rule is None else rule
    groups = file_modules(path)
    for prefix, comp in PREFIXES.items():
        model = getattr(pipe, comp, None)
        names = [g[len(prefix) :] for g in groups if g.startswith(prefix)]
        if model is None or not names:
            continue
        targets = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        mapping = resolve_kohya(comp, names, targets)
        assert len(mapping) == len(names)
        with torch.no_grad():
            for fname, name in mapping.items():
                weight = model.get_submodule(name).weight
                weight.copy_(rule(weight, groups[prefix + fname], strength))


# ---------------------------------------------------------------------------------------------- tiny pipeline


def trained_tiny(norm_axis: str = "out"):
    """The tiny pipeline with a trained-looking DoRA 'a' on every UNet Linear/Conv2d and both text encoders."""
    p = fresh_pipe()
    torch.manual_seed(0)  # add_adapter draws A from the global generator
    add_adapter(p.unet, AdapterConfig(rank=4, alpha=6, use_dora=True, targets="all", norm_axis=norm_axis), "a")
    perturb_adapter(p.unet, "a", seed=5)
    for i, te in enumerate((p.text_encoder, p.text_encoder_2)):
        add_adapter(te, AdapterConfig(rank=2, use_dora=True, targets="all", norm_axis=norm_axis), "a")
        perturb_adapter(te, "a", seed=6 + i)
    return p


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """The trained tiny pipeline, its standard kohya file and its ComfyUI-rule file."""
    d = tmp_path_factory.mktemp("tiny")
    p = trained_tiny()
    kohya = p.save_dora_weights(d, adapter_name="a", weight_name="kohya.safetensors", format="kohya")
    comfy = p.save_dora_weights(d, adapter_name="a", weight_name="comfyui.safetensors", format="comfyui")
    return p, kohya, comfy


def test_comfyui_rule_reproduces_our_images_only_from_the_comfyui_file(tiny_files) -> None:
    trained, kohya, comfy = tiny_files
    convs = [n for n, layer in adapted_layers(trained.unet).items() if isinstance(layer.base_layer, nn.Conv2d)]
    assert len(convs) > 10  # conv filters are normalised over (in, kh, kw) in both rules
    for k in STRENGTHS:
        trained.set_dora_adapters("a", k)
        ours = render(trained)
        diffs = {}
        for label, path in (("kohya", kohya), ("comfyui", comfy)):
            theirs = fresh_pipe()
            patch_with_rule(theirs, path, k)
            diffs[label] = max_diff(ours, render(theirs))
        print(f"strength {k}: max |ComfyUI rule - ours| standard file {diffs['kohya']:.2e}, "
              f"comfyui file {diffs['comfyui']:.2e}")  # fmt: skip
        assert diffs["comfyui"] <= 1e-4
        assert diffs["kohya"] > 1e-3


@pytest.mark.parametrize("norm_axis", ["out", "in"])
def test_comfyui_file_weights_equal_ours_at_every_strength(tmp_path, norm_axis) -> None:
    """Every adapted weight (UNet Linear/Conv2d, both CLIPs): ComfyUI's rule on the file = W0 + k (W' - W0)."""
    p = trained_tiny(norm_axis)
    path = p.save_dora_weights(tmp_path, adapter_name="a", format="comfyui")
    groups = file_modules(path)
    if norm_axis == "in":  # ComfyUI's per-input branch is right: those dora_scales are written unchanged
        kohya = file_modules(p.save_dora_weights(tmp_path / "k", adapter_name="a", format="kohya"))
        assert all(torch.equal(groups[g]["dora_scale"], kohya[g]["dora_scale"]) for g in groups)
    for k in STRENGTHS:
        theirs = fresh_pipe()
        patch_with_rule(theirs, path, k)
        worst = 0.0
        for comp in ("unet", "text_encoder", "text_encoder_2"):
            for name, layer in adapted_layers(getattr(p, comp)).items():
                ours = layer.weight.float() + layer.adapters["a"].delta(k)
                want = getattr(theirs, comp).get_submodule(name).weight
                worst = max(worst, ((want - ours).abs().max() / ours.abs().max()).item())
        print(f"{norm_axis} strength {k}: max relative |ComfyUI rule - ours| over all weights {worst:.1e}")
        assert worst <= 1e-6


@pytest.mark.parametrize("norm_axis, fmt", [("in", "kohya"), ("out", "kohya"), ("out", "comfyui")])
def test_a1111_rule_is_exact_for_per_input_dora_only(tmp_path, norm_axis, fmt) -> None:
    p = trained_tiny(norm_axis)
    path = p.save_dora_weights(tmp_path, adapter_name="a", format=fmt)
    for k in STRENGTHS:
        p.set_dora_adapters("a", k)
        theirs = fresh_pipe()
        patch_with_rule(theirs, path, k, a1111_rule)
        diff = max_diff(render(p), render(theirs))
        print(f"A1111 rule, {norm_axis} DoRA, {fmt} file, strength {k}: max |images - ours| = {diff:.2e}")
        if norm_axis == "in":
            assert diff <= 1e-4
        else:  # (out, 1) / (1, in) broadcasts into an (out, in) rescaling: wrong weights, no error
            assert diff > 1e-2


# ---------------------------------------------------------------------------------------------- toy world


def test_toyworld_trained_dora_images_under_comfyui_rule(tmp_path) -> None:
    """The measurement in docs/formats.md: a DoRA trained on the toy world (UNet Linear + Conv2d), 4 prompts x
    20 steps, our loader vs ComfyUI's rule on the standard kohya file and on the ComfyUI file."""
    from dora_diffusion import toyworld
    from dora_diffusion.toyworld import finetune

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = toyworld.load_pipeline()
        data = finetune.encode_subject(base, "dotted_heart")
        torch.manual_seed(0)  # add_adapter draws A from the global generator
        tuned = finetune.train_subject(base, data, "dora", steps=100, targets="all")
        kohya = save_adapter({"unet": tuned}, tmp_path, finetune.ADAPTER_NAME, "kohya.safetensors", "kohya")
        comfy = save_adapter({"unet": tuned}, tmp_path, finetune.ADAPTER_NAME, "comfyui.safetensors", "comfyui")
        subject = toyworld.SUBJECTS["dotted_heart"].instance_prompt
        prompts = [f"{subject} on a {b} background" for b in ("striped", "checkered", "blue", "gray")]

        def images(pipe) -> np.ndarray:
            gens = [torch.Generator().manual_seed(s) for s in range(4)]
            return pipe(prompts, num_inference_steps=20, guidance_scale=4.0, generator=gens, output_type="np").images

        ours_pipe = toyworld.load_pipeline()
        ours_pipe.load_dora_weights(str(kohya), adapter_name="kohya")
        ours_pipe.load_dora_weights(str(comfy), adapter_name="comfyui")
        base_images = images(base)
        for k in STRENGTHS:
            ours_pipe.set_dora_adapters("kohya", k)
            ours = images(ours_pipe)
            ours_pipe.set_dora_adapters("comfyui", k)
            reread = max_diff(ours, images(ours_pipe))  # both files read back to the same adapter
            line = [f"strength {k}: |ours - base| mean {np.abs(ours - base_images).mean():.2e};"]
            diffs = {}
            for label, path in (("standard", kohya), ("comfyui", comfy)):
                theirs = toyworld.load_pipeline()
                patch_with_rule(theirs, path, k)
                diffs[label] = np.abs(images(theirs).astype(np.float64) - ours)
                line.append(f"{label} file mean {diffs[label].mean():.2e} max {diffs[label].max():.2e}")
            print(" ".join(line) + f"; our reads of the two files differ by {reread:.1e}")
            assert reread <= 1e-4 and diffs["comfyui"].max() <= 1e-4
            assert diffs["standard"].mean() > 3e-4 and diffs["standard"].max() > 1e-2
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- round trips


def test_comfyui_file_reads_back_exactly(tiny_files) -> None:
    trained, _, comfy = tiny_files
    with safe_open(str(comfy), "pt") as f:
        header = f.metadata()
    assert header[RULE_KEY] == "comfyui" and json.loads(header["ss_network_args"])["wd_on_output"] == "True"
    loaded = fresh_pipe()
    loaded.load_dora_weights(comfy, adapter_name="a")
    worst = 0.0
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        ours, back = adapted_layers(getattr(trained, comp)), adapted_layers(getattr(loaded, comp))
        assert ours.keys() == back.keys()
        for name, layer in ours.items():
            assert torch.equal(layer.adapters["a"].A, back[name].adapters["a"].A)
            assert torch.equal(layer.adapters["a"].B, back[name].adapters["a"].B)
            m, m_back = layer.adapters["a"].magnitude, back[name].adapters["a"].magnitude
            worst = max(worst, ((m_back - m).abs() / m.abs()).max().item())
    print(f"max relative |m read back - m| = {worst:.1e}")
    assert worst <= 1e-6
    trained.set_dora_adapters("a", 1.0)
    assert max_diff(render(loaded), render(trained)) <= 1e-5


def test_inspect_and_convert_round_trip(tmp_path, capsys, tiny_files) -> None:
    trained, _, comfy = tiny_files
    base = save_tiny_sdxl_pipeline(tmp_path / "base")
    assert "ComfyUI variant" in describe(read_adapter(comfy)[1])["dialect"]
    assert main(["inspect", str(comfy)]) == 0
    assert "ComfyUI variant" in capsys.readouterr().out
    src = trained.save_dora_weights(tmp_path / "src", adapter_name="a")  # diffusers
    converted, back = tmp_path / "c.safetensors", tmp_path / "back.safetensors"
    assert main(["convert", str(src), str(converted), "--to", "comfyui", "--base", str(base)]) == 0
    assert main(["convert", str(converted), str(back), "--to", "diffusers", "--base", str(base)]) == 0
    a = {k.replace("text_model.", ""): v for k, v in load_file(str(src)).items()}
    b = {k.replace("text_model.", ""): v for k, v in load_file(str(back)).items()}  # convert writes `text_model.`
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith("lora_magnitude_vector"):
            assert ((b[key] - a[key]).abs() / a[key].abs()).max().item() <= 1e-6
        else:
            assert torch.equal(a[key], b[key])
    ours, theirs = file_modules(comfy), file_modules(converted)  # CLI and save_dora_weights agree
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[g]["dora_scale"], theirs[g]["dora_scale"], rtol=1e-6, atol=0) for g in ours)


# ---------------------------------------------------------------------------------------------- errors


def test_base_model_missing_is_a_clear_error(tmp_path, capsys, tiny_files) -> None:
    trained, kohya, comfy = tiny_files
    assert main(["convert", str(kohya), str(tmp_path / "c.safetensors"), "--to", "comfyui"]) == 1
    assert "writing --to comfyui needs the base model's weights W0" in capsys.readouterr().err
    assert main(["convert", str(comfy), str(tmp_path / "k.safetensors"), "--to", "kohya"]) == 1
    err = capsys.readouterr().err
    assert "written for ComfyUI's rule, needs the base model's weights W0" in err and "--base MODEL" in err
    assert not (tmp_path / "c.safetensors").exists() and not (tmp_path / "k.safetensors").exists()
    parsed = read_adapter(kohya)[1]
    needs_base = r"of (unet|text_encoder|text_encoder_2)\.\S+ is m \|\|W0\|\| / \|\|W0 \+ s B A\|\|, so it needs the base"
    with pytest.raises(ValueError, match=needs_base):
        to_comfyui_modules(model_named(parsed), {})
    trained.fuse_dora()
    try:
        with pytest.raises(RuntimeError, match="unfuse_dora"):
            trained.save_dora_weights(tmp_path, adapter_name="a", format="comfyui")
    finally:
        trained.unfuse_dora()
    with pytest.raises(ValueError, match="format must be one of 'diffusers', 'kohya', 'comfyui'"):
        trained.save_dora_weights(tmp_path, adapter_name="a", format="comfy")


def test_bad_input_is_a_clear_error(tmp_path, tiny_files) -> None:
    from dora_diffusion import toyworld

    trained, _, comfy = tiny_files
    save_file(load_file(str(comfy)), str(tmp_path / "odd.safetensors"), metadata={RULE_KEY: "auto"})
    pipe = fresh_pipe()
    with pytest.raises(AdapterFileError, match=r"header key 'dora_diffusion.dora_scale' is 'auto'"):
        pipe.load_dora_weights(tmp_path / "odd.safetensors")
    src = trained.save_dora_weights(tmp_path / "d", adapter_name="a")  # diffusers
    save_file(load_file(str(src)), str(tmp_path / "marked.safetensors"), metadata={RULE_KEY: "comfyui"})
    with pytest.raises(AdapterFileError, match="marks a kohya dora_scale, but this file is diffusers"):
        pipe.load_dora_weights(tmp_path / "marked.safetensors")
    assert pipe.get_dora_adapters() == []
    wrong_base = r"StableDiffusionXLPipeline(\.\S+ .*different base model| has no module .* made for)"
    with pytest.raises(AdapterFileError, match=wrong_base):
        convert_file(comfy, tmp_path / "x.safetensors", "diffusers", base=toyworld.load_pipeline())  # wrong base
    assert not (tmp_path / "x.safetensors").exists()


def test_diffusers_kohya_export_keeps_magnitudes_under_names_no_loader_reads() -> None:
    """What README / docs say of diffusers' ``convert_state_dict_to_kohya``: DoRA magnitudes are kept, 1-D, under
    ``<module with its last dot kept>.lora_magnitude_vector`` keys, and alpha = rank."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    sd = {f"{name}.lora_A.weight": torch.zeros(4, 8), f"{name}.lora_B.weight": torch.zeros(8, 4),
          f"{name}.lora_magnitude_vector": torch.ones(8)}  # fmt: skip
    out = convert_state_dict_to_kohya(sd)
    prefix = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1"
    assert set(out) == {f"{prefix}_to_q.lora_down.weight", f"{prefix}_to_q.lora_up.weight", f"{prefix}_to_q.alpha",
                        f"{prefix}.to_q.lora_magnitude_vector"}  # fmt: skip
    alpha = out[f"{prefix}_to_q.alpha"]
    assert alpha.dtype == torch.int64 and alpha.item() == 4
    assert out[f"{prefix}.to_q.lora_magnitude_vector"].shape == (8,)
    # dora-diffusion reads it as the DoRA it came from: the int64 alpha, the magnitude under its odd name
    (module,) = parse_state_dict(out, {}).modules["unet"].values()
    assert module.use_dora and module.alpha == 4.0 and torch.equal(module.magnitude.flatten(), torch.ones(8))
