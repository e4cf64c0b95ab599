"""Issue 30: LyCORIS LoHa, LoKr, Tucker LoCon and full-diff files, with and without DoRA, against LyCORIS's forward.

Every file here is written by LyCORIS 4.1.3 itself: its modules are created on the tiny pipeline's Linear/Conv2d
layers (UNet and both text encoders), their tensors randomised, their ``custom_state_dict`` saved under kohya
names. The reference images are rendered with LyCORIS's modules applied (``apply_to``): its training-time forward,
what the user saw while training, not ``get_merged_weight`` (which is wrong for LoHa/LoKr, see the last test).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from lycoris.modules.full import FullModule
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dora_diffusion import AdapterFileError
from dora_diffusion.cli import convert_file, describe
from dora_diffusion.compare import Comparer, GenerationSettings, load_base_pipeline
from dora_diffusion.formats import parse_state_dict
from dora_diffusion.formats.kohya import kohya_module_name
from dora_diffusion.testing import TINY_RESOLUTION, save_tiny_sdxl_pipeline
from helpers import assert_unchanged, fresh_pipe, make_adapter_file, max_diff, pipeline_state, render, unet_output

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# kind -> (LyCORIS class, keyword arguments, rank for Linear, rank for Conv2d, factor std)
KINDS = {
    "loha": (LohaModule, {}, 4, 2, 0.25),
    "loha_tucker": (LohaModule, {"use_tucker": True}, 4, 2, 0.25),
    "lokr": (LokrModule, {}, 2, 2, 0.2),  # w1 full, w2 = w2_a w2_b (rank 2 < half the larger side)
    "lokr_full": (LokrModule, {}, 64, 64, 0.05),  # both sides full matrices: scale 1 whatever alpha says
    "lokr_both": (LokrModule, {"decompose_both": True, "factor": 4}, 1, 1, 0.3),  # w1 = w1_a w1_b too
    "lokr_tucker": (LokrModule, {"use_tucker": True}, 2, 2, 0.2),  # Conv2d 3x3: w2 from lokr_t2
    "locon_tucker": (LoConModule, {"use_tucker": True}, 4, 2, 0.05),  # Conv2d 3x3: lora_mid
    "full": (FullModule, {}, 1, 1, 0.01),
}


def linear_conv(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def kohya_key(comp: str, name: str, naming: str) -> str:
    """SGM (sd-scripts), diffusers-flattened or ``lycoris_`` UNet names; ``lora_te{1,2}_text_model_...`` for CLIP."""
    if comp == "unet" and naming == "diffusers":
        return "lora_unet_" + name.replace(".", "_")
    if comp == "unet" and naming == "lycoris":
        return "lycoris_" + name.replace(".", "_")
    return kohya_module_name(comp, name)


@torch.no_grad()
def randomise(lyco: nn.Module, std: float, g: torch.Generator) -> None:
    """Trained-looking tensors: every factor random, the magnitude 0.8-1.2 x LyCORIS's initial ||W0||."""
    for name, p in lyco.named_parameters():
        if name == "dora_scale":
            p.mul_(0.8 + 0.4 * torch.rand(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def sample_modules(model: nn.Module, every: bool) -> list[tuple[str, nn.Module]]:
    """All Linear/Conv2d modules, or a spread of each type (Linear, Conv2d 3x3, Conv2d 1x1): first, middle, last."""
    modules = sorted(linear_conv(model).items())
    if every:
        return modules
    out = []
    for kind in ("linear", "conv3", "conv1"):
        group = [(n, m) for n, m in modules if kind == _type(m)]
        out += [group[i] for i in sorted({0, len(group) // 2, len(group) - 1})] if group else []
    return out


def _type(m: nn.Module) -> str:
    return "linear" if isinstance(m, nn.Linear) else "conv1" if m.kernel_size == (1, 1) else "conv3"


def apply_lycoris(
    pipe, path, kinds: str | list[str], dora: str, naming: str = "sgm", seed: int = 0, every: bool = True
) -> list[nn.Module]:
    """LyCORIS modules on ``pipe``'s Linear/Conv2d layers (all, or ``sample_modules``' spread), applied (LyCORIS's
    forward runs), their state saved to ``path`` under kohya names. ``kinds``: one kind, or a list used in turn
    (a file mixing kinds). Returns the LyCORIS modules by ``(component, module name)``, to ``restore()`` them."""
    g = torch.Generator().manual_seed(seed)
    state_dict, applied = {}, {}
    i = 0
    for comp in COMPONENTS:
        for name, module in sample_modules(getattr(pipe, comp), every):
            kind = kinds if isinstance(kinds, str) else kinds[i % len(kinds)]
            cls, kwargs, rank_linear, rank_conv, std = KINDS[kind]
            rank = rank_conv if isinstance(module, nn.Conv2d) else rank_linear
            alpha = (0, 3.0, 8.0)[i % 3]  # 0: LyCORIS uses alpha = rank (the key is then dropped below)
            i += 1
            wd = {"weight_decompose": dora != "off", "wd_on_out": dora == "out"} if cls is not FullModule else {}
            lyco = cls("m", module, 1.0, rank, alpha, bypass_mode=False, **wd, **kwargs)
            randomise(lyco, std, g)
            lyco.apply_to()
            applied[comp, name] = lyco
            prefix = kohya_key(comp, name, naming)
            for key, value in lyco.custom_state_dict().items():
                if key == "alpha" and kind == "lokr_full":
                    value = torch.tensor(10000.0)  # LyCORIS writes alpha = rank here; other trainers a placeholder
                if not (key == "alpha" and alpha == 0):
                    state_dict[f"{prefix}.{key}"] = value.detach().float().contiguous()
    save_file(state_dict, path)
    return applied


def factor_keys(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {k.split(".", 1)[1] for k in f.keys()}


CASES = [
    ("loha", "off", "sgm"), ("loha", "out", "diffusers"), ("loha", "in", "lycoris"), ("loha_tucker", "out", "sgm"),
    ("lokr", "off", "diffusers"), ("lokr", "out", "sgm"), ("lokr", "in", "sgm"), ("lokr_full", "out", "lycoris"),
    ("lokr_both", "out", "sgm"), ("lokr_tucker", "out", "sgm"), ("lokr_tucker", "in", "diffusers"),
    ("locon_tucker", "off", "sgm"), ("locon_tucker", "out", "lycoris"), ("locon_tucker", "in", "sgm"),
    ("full", "off", "sgm"),
]  # fmt: skip
"""kind x DoRA (off / per-output / legacy per-input) x UNet naming; each file covers Linear, Conv2d 3x3 and 1x1 in
the UNet and the Linear layers of both text encoders."""
EXPECTED_KEYS = {
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
    "loha_tucker": {"hada_t1", "hada_t2"},
    "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b"},
    "lokr_full": {"lokr_w1", "lokr_w2"},
    "lokr_both": {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"},
    "lokr_tucker": {"lokr_t2"},
    "locon_tucker": {"lora_mid.weight"},
    "full": {"diff", "diff_b"},
}


@pytest.fixture(scope="module")
def pipes():
    """Two tiny pipelines: LyCORIS's modules go on the first, our loader on the second (undone after each use)."""
    return fresh_pipe(), fresh_pipe()


def layer_input(module: nn.Module, g: torch.Generator) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return torch.randn(2, 3, module.in_features, generator=g)
    return torch.randn(2, module.in_channels, 6, 6, generator=g)


@pytest.mark.parametrize("kind, dora, naming", CASES)
def test_lycoris_kind_layers_match_lycoris_forward(tmp_path, pipes, kind, dora, naming) -> None:
    src, dst = pipes
    path = tmp_path / "lyco.safetensors"
    applied = apply_lycoris(src, path, kind, dora, naming, every=False)
    try:
        keys = factor_keys(path)
        assert EXPECTED_KEYS[kind] <= keys and (("dora_scale" in keys) == (dora != "off"))
        name = dst.load_dora_weights(path)
        g = torch.Generator().manual_seed(1)
        worst, checked = 0.0, set()
        with torch.no_grad():
            for (comp, mname), lyco in applied.items():
                module = lyco.org_module[0]
                ours = getattr(dst, comp).get_submodule(mname)
                x = layer_input(module, g)
                want, got = module(x), ours(x)
                assert not torch.equal(want, ours.base_layer(x))  # the adapter changes this layer
                worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
                checked.add((comp, _type(module)))
        print(f"{kind}/{dora}/{naming}: {len(applied)} layers, max relative |ours - LyCORIS| = {worst:.2e}")
        assert worst <= 1e-5
        assert {c for c, _ in checked} == set(COMPONENTS) and {t for _, t in checked} == {"linear", "conv1", "conv3"}
        dst.delete_dora_adapters(name)
    finally:
        for lyco in applied.values():
            lyco.restore()


@pytest.mark.parametrize("dora, naming", [("off", "diffusers"), ("out", "sgm"), ("in", "lycoris")])
def test_mixed_kind_files_render_as_lycoris_forward(tmp_path, base_images, dora, naming) -> None:
    """Every module of the tiny pipeline, the kinds taken in turn: the images within 1e-4 of LyCORIS's."""
    path = tmp_path / "lyco.safetensors"
    kinds = [k for k in KINDS if k != "lokr_full"] if dora == "off" else [k for k in KINDS if k != "full"]
    reference_pipe = fresh_pipe()
    apply_lycoris(reference_pipe, path, kinds, dora, naming)
    reference = render(reference_pipe)
    pipe = fresh_pipe()
    pipe.load_dora_weights(path)
    ours = render(pipe)
    assert max_diff(ours, base_images) > 1e-2  # the adapter changes the images
    diff = max_diff(ours, reference)
    print(f"mixed/{dora}/{naming}: max |ours - LyCORIS forward| = {diff:.2e}")
    assert diff <= 1e-4


# ---------------------------------------------------------------------------------------------- like every adapter


@pytest.fixture(scope="module")
def stacked(tmp_path_factory):
    """Two LyCORIS files on the same spread of layers (``sample_modules``), both applied (LyCORIS's forward of one wraps the other's, which sums their
    changes ``W'_j - W0`` as ComfyUI and we do): A = LoKr + LoHa Tucker, per-output DoRA, SGM names; B = LoHa +
    Tucker LoCon + LoKr with both sides factored, legacy per-input DoRA, ``lycoris_`` names. Returns the files, the
    LyCORIS modules and LyCORIS's UNet output with both."""
    d = tmp_path_factory.mktemp("stacked")
    src = fresh_pipe()
    a = apply_lycoris(src, d / "a.safetensors", ["lokr", "loha_tucker"], "out", "sgm", seed=2, every=False)
    b = apply_lycoris(src, d / "b.safetensors", ["loha", "locon_tucker", "lokr_both"], "in", "lycoris", seed=3, every=False)
    return d / "a.safetensors", d / "b.safetensors", a, unet_output(src, grad=False)


def close(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x - y).abs().max() / y.abs().max()).item()


@pytest.mark.exactness
def test_lycoris_kinds_behave_like_every_adapter(stacked) -> None:
    path_a, path_b, _, reference = stacked
    pipe = fresh_pipe()
    before, base = pipeline_state(pipe), unet_output(pipe, grad=False)
    a, b = pipe.load_dora_weights(path_a), pipe.load_dora_weights(path_b)
    both = unet_output(pipe, grad=False)
    assert close(both, reference) <= 1e-5 and close(both, base) > 1e-2  # several at once = LyCORIS stacked
    pipe.set_dora_adapters([a, b], [0.0, 0.0])
    assert torch.equal(unet_output(pipe, grad=False), base)  # strength 0 is the base model exactly
    pipe.set_dora_adapters([a, b], [1.0, 1.0])
    pipe.disable_dora()
    assert torch.equal(unet_output(pipe, grad=False), base)
    pipe.enable_dora()
    assert torch.equal(unet_output(pipe, grad=False), both)
    pipe.fuse_dora()
    assert close(unet_output(pipe, grad=False), both) <= 1e-5
    pipe.unfuse_dora()
    assert torch.equal(unet_output(pipe, grad=False), both)  # caches rebuilt after the weights came back
    assert_unchanged(before, pipe, "after fuse/unfuse: ", base_only=True)
    pipe.delete_dora_adapters(a)
    assert pipe.get_dora_adapters() == [b] and close(unet_output(pipe, grad=False), base) > 1e-3
    pipe.unload_dora_weights()
    assert torch.equal(unet_output(pipe, grad=False), base)
    assert_unchanged(before, pipe, "after unload: ", base_only=True)


def test_strength_follows_comfyui_convention_on_each_kind(stacked) -> None:
    """At k = 0.5 a layer computes ``W0 + k (W' - W0)``, with ``W'`` read off LyCORIS's own forward."""
    path_a, _, lycos, _ = stacked
    pipe = fresh_pipe()
    pipe.set_dora_adapters(pipe.load_dora_weights(path_a), 0.5)
    seen = set()
    for (comp, name), lyco in lycos.items():
        module = lyco.org_module[0]
        if not isinstance(module, nn.Linear) or type(lyco).__name__ in seen:
            continue
        seen.add(type(lyco).__name__)
        with torch.no_grad():
            eye = torch.eye(module.in_features)
            bias = 0.0 if module.bias is None else module.bias
            w_lyco = (lyco(eye) - bias).t()  # W' of LyCORIS's forward, (out, in)
            w0 = module.weight
            x = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(0))
            want = torch.nn.functional.linear(x, w0 + 0.5 * (w_lyco - w0), module.bias)
            got = getattr(pipe, comp).get_submodule(name)(x)
        assert close(got, want) <= 1e-5, f"{comp}.{name} ({type(lyco).__name__})"
    assert seen == {"LokrModule", "LohaModule"}


def test_failed_load_rolls_back_and_strict(stacked, tmp_path) -> None:
    path_a, _, _, _ = stacked
    sd = load_file(str(path_a))
    pipe = fresh_pipe()
    before = pipeline_state(pipe)
    lokr = sorted(k for k in sd if k.endswith(".lokr_w1"))[-1]
    w1 = sd[lokr]
    broken = {k: v for k, v in sd.items() if k != lokr.replace("lokr_w1", "dora_scale")}
    broken[lokr] = torch.zeros(w1.shape[0] + 1, w1.shape[1])  # the last LoKr module no longer fits its layer
    with pytest.raises(AdapterFileError, match=r"shape mismatch.*kronecker adapter changes a \(\d+, \d+\) weight"):
        pipe.load_dora_weights(broken)
    assert pipe.get_dora_adapters() == []
    assert_unchanged(before, pipe, "after a failed load: ")
    module = sorted(k for k in sd if k.startswith("lora_unet_"))[0].split(".")[0]
    extra = {**sd, **{k.replace(module, module + "_no_such_layer"): v for k, v in sd.items() if k.startswith(module + ".")}}
    assert len(extra) > len(sd)
    with pytest.raises(AdapterFileError, match="no_such_layer.*strict=False"):
        pipe.load_dora_weights(extra)
    assert pipe.get_dora_adapters() == []
    name = pipe.load_dora_weights(extra, strict=False)
    layers = [m for m in pipe.unet.modules() if hasattr(m, "adapters") and name in m.adapters]
    assert len(layers) == len({k.split(".")[0] for k in sd if k.startswith("lora_unet_")})


def comfyui_weight(w0: torch.Tensor, s_delta: torch.Tensor, dora_scale: torch.Tensor, k: float) -> torch.Tensor:
    """ComfyUI's ``weight_decompose`` (``comfy/weight_adapter/base.py``) for any kind, restated: the per-output
    norm is of **W0** (+ finfo(fp32).eps), ``Wc = (W0 + s ΔW) d / (||W0|| + eps)``, then ``W0 + k (Wc - W0)``."""
    w = w0.detach().float()
    norm = w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1))
    wc = (w + s_delta) * (dora_scale.reshape(norm.shape) / (norm + torch.finfo(torch.float32).eps))
    return w + k * (wc - w)


def test_convert_round_trips_and_comfyui_file_is_exact_under_comfyui_rule(stacked, tmp_path) -> None:
    path_a, _, lycos, _ = stacked
    kohya = convert_file(str(path_a), str(tmp_path / "kohya.safetensors"), "kohya")
    src, out = load_file(str(path_a)), load_file(str(kohya))
    assert set(src) <= set(out) and all(torch.equal(src[k], out[k]) for k in src)  # bit-exact
    assert all(k.endswith(".alpha") for k in set(out) - set(src))  # alpha = rank written where the file had none
    twice = load_file(str(convert_file(str(kohya), str(tmp_path / "again.safetensors"), "kohya")))
    assert twice.keys() == out.keys() and all(torch.equal(twice[k], out[k]) for k in out)

    pipe = fresh_pipe()
    name = pipe.load_dora_weights(path_a)
    saved = load_file(str(pipe.save_dora_weights(tmp_path / "saved", adapter_name=name, format="kohya")))
    assert saved.keys() == out.keys() and all(torch.equal(saved[k], out[k]) for k in out)  # from the model: the same
    with pytest.raises(ValueError, match="format='kohya'"):
        pipe.save_dora_weights(tmp_path / "diffusers", adapter_name=name)

    model = save_tiny_sdxl_pipeline(tmp_path / "model")
    comfy = load_file(str(convert_file(str(path_a), str(tmp_path / "comfy.safetensors"), "comfyui", base=str(model))))
    worst_comfy, worst_standard, n = 0.0, 0.0, 0
    for (comp, mname), lyco in lycos.items():
        layer = getattr(pipe, comp).get_submodule(mname)
        prefix = kohya_key(comp, mname, "sgm")
        with torch.no_grad():
            s_delta = lyco.get_weight(lyco.shape).reshape(layer.weight.shape)  # LyCORIS's s ΔW (ComfyUI's for these kinds)
            ours = layer.weight + layer.adapters[name].delta(1.0)
            for k in (0.5, 1.0):
                ours_k = layer.weight + layer.adapters[name].delta(k)
                worst_comfy = max(worst_comfy, close(comfyui_weight(layer.weight, s_delta, comfy[f"{prefix}.dora_scale"], k), ours_k))
            worst_standard = max(worst_standard, close(comfyui_weight(layer.weight, s_delta, src[f"{prefix}.dora_scale"], 1.0), ours))
        n += 1
    print(f"{n} modules: ComfyUI rule on the comfyui file {worst_comfy:.1e}, on the standard file {worst_standard:.1e}")
    assert worst_comfy <= 1e-5 and worst_standard > 1e-3
    back = fresh_pipe()  # the ComfyUI file read back against the pipeline's base weights: the same adapter
    back.load_dora_weights(tmp_path / "comfy.safetensors")
    assert close(unet_output(back, grad=False), unet_output(pipe, grad=False)) <= 1e-6


def test_inspect_and_comparer_name_the_kinds(stacked, tmp_path) -> None:
    path_a, path_b, _, _ = stacked
    rows = describe(parse_state_dict(load_file(str(path_a))))
    assert re.search(r"unet: .*LoKr w1 \d+x\d+ full, w2 rank 2, DoRA per-output \(\d+ modules\)", rows["kind"])
    assert re.search(r"LoHa Tucker rank 2, DoRA per-output \(\d+ module", rows["kind"])
    assert re.search(r"text_encoder_2: .*LoHa rank 4, DoRA per-output", rows["kind"])
    rows = describe(parse_state_dict(load_file(str(path_b))))
    assert "LoKr w1 " in rows["kind"] and " rank 1, w2 rank 1, DoRA per-input" in rows["kind"]
    assert "Tucker LoCon rank 2, DoRA per-input" in rows["kind"]

    model = save_tiny_sdxl_pipeline(tmp_path / "model")
    lora = make_adapter_file(tmp_path / "lora", seed=2, use_dora=False)
    comparer = Comparer(load_base_pipeline(str(model), device="cpu"), str(model))
    comparer.load_adapter(str(path_a), "lokr")
    comparer.load_adapter(str(lora), "lora")
    assert [(a.name, a.kind) for a in comparer.adapters] == [("lokr", "LoHa + LoKr DoRA"), ("lora", "LoRA")]
    settings = GenerationSettings("a photo of TOK toy", num_inference_steps=2, width=TINY_RESOLUTION, height=TINY_RESOLUTION)
    plan = comparer.plan_grid(settings, "0", {"lokr": 1.0, "lora": 1.0}, include_base=False)
    results = list(comparer.render(plan))  # columns: lokr, lora
    images = [np.asarray(r.image, dtype=np.float64) / 255 for r in results]
    assert len(images) == 2 and max_diff(images[0], images[1]) > 1e-2
    assert comparer.grid(plan, results).width >= 2 * TINY_RESOLUTION
    from dora_diffusion.compare.render import AdapterInfo

    both_full = AdapterInfo("lokr", "f", "LoKr DoRA", (0, 4), 56)  # a LoKr whose w1 and w2 are both full: rank 0
    assert both_full.summary == "LoKr DoRA · rank full/4 · 56 modules"


@pytest.mark.exactness
def test_full_diff_changes_the_bias_and_fuse_unfuse_is_bit_exact(tmp_path) -> None:
    src = fresh_pipe()
    applied = apply_lycoris(src, tmp_path / "full.safetensors", "full", "off", every=False)
    reference = unet_output(src, grad=False)
    pipe = fresh_pipe()
    before, base = pipeline_state(pipe), unet_output(pipe, grad=False)
    name = pipe.load_dora_weights(tmp_path / "full.safetensors")
    unfused = unet_output(pipe, grad=False)
    assert close(unfused, reference) <= 1e-5 and close(unfused, base) > 1e-3
    with_bias = [(c, n) for (c, n), lyco in applied.items() if lyco.org_bias is not None and c == "unet"]
    comp, mname = with_bias[0]
    layer = getattr(pipe, comp).get_submodule(mname)
    bias0 = layer.base_layer.bias.detach().clone()
    pipe.fuse_dora()
    diff_b = load_file(str(tmp_path / "full.safetensors"))[kohya_key(comp, mname, "sgm") + ".diff_b"]
    assert torch.allclose(layer.base_layer.bias, bias0 + diff_b, atol=1e-6) and not torch.equal(layer.base_layer.bias, bias0)
    assert close(unet_output(pipe, grad=False), unfused) <= 1e-5
    pipe.unfuse_dora()
    assert_unchanged(before, pipe, "after fuse/unfuse: ", base_only=True)
    pipe.delete_dora_adapters(name)
    assert torch.equal(unet_output(pipe, grad=False), base)


def test_lycoris_merged_weight_squares_the_scale_for_loha_and_lokr() -> None:
    """lycoris-lora 4.1.3: ``get_merged_weight`` of LoHa and LoKr applies ``s`` twice (``get_diff_weight`` scales
    ``get_weight``, which is already scaled); its forward applies it once. Equal only when alpha = rank."""
    g = torch.Generator().manual_seed(0)
    for cls, rank in ((LohaModule, 4), (LokrModule, 2)):
        for alpha, ratio in ((8.0, 8.0 / rank), (float(rank), 1.0)):
            base = nn.Linear(64, 64)
            lyco = cls("m", base, 1.0, rank, alpha, bypass_mode=False)
            randomise(lyco, 0.3, g)
            with torch.no_grad():
                merged = lyco.get_merged_weight(1.0)[0] - base.weight
                lyco.apply_to()
                forward = (base(torch.eye(64)) - base.bias).t() - base.weight  # s ΔW as trained (no DoRA)
                lyco.restore()
            assert close(merged, ratio * forward) <= 1e-5, (cls.__name__, alpha)


M = "lora_unet_input_blocks_4_1_proj_in"


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"hada_w1_a": (64, 4), "hada_w1_b": (4, 64), "hada_w2_a": (64, 4)}, r"LoHa needs the factors"),
        ({"hada_w1_a": (64, 4), "hada_w1_b": (3, 64), "hada_w2_a": (64, 4), "hada_w2_b": (4, 64)}, r"hada_w1_a has shape"),
        ({"lokr_w1": (), "lokr_w2": (8, 8)}, r"matrices or 4-D conv kernels"),
        ({"lokr_w1": (8, 8), "lokr_w2_a": (8, 2), "lokr_w2_b": (3, 8)}, r"not a rank pair"),
        ({"diff": (64, 64), "diff_b": (32,)}, r"diff_b has shape"),
        ({"lokr_w1": (8, 8), "hada_w1_a": (64, 4)}, r"mixes the keys of hadamard and kronecker"),
        ({"lora_down.weight": (4, 64), "lora_up.weight": (64, 4), "lokr_w1": (8, 8)}, r"mixes lora_down/lora_up"),
        ({"lokr_w1": (8, 8), "lokr_w2": (8, 8), "dora_scale": (2, 64)}, r"dora_scale has shape \(2, 64\)"),
    ],
)
def test_malformed_lycoris_modules_are_named(tensors, message) -> None:
    sd = {f"{M}.{k}": torch.zeros(shape) for k, shape in tensors.items()}
    with pytest.raises(AdapterFileError, match=message):
        parse_state_dict(sd)
