"""Issue 30: LyCORIS LoHa, LoKr, Tucker LoCon and full-diff files, with and without DoRA, against LyCORIS's forward.

Every file here is written by LyCORIS 4.1.3 itself: its modules are created on the tiny pipeline's Linear/Conv2d
layers (UNet and both text encoders), their tensors randomised, their ``custom_state_dict`` saved under kohya
names. The reference images are rendered with LyCORIS's modules applied (``apply_to``): its training-time forward,
what the user saw while training, not ``get_merged_weight`` (which is wrong for LoHa/LoKr, see the last test).
"""

from __future__ import annotations

import pytest
import torch
from lycoris.modules.full import FullModule
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from safetensors.torch import save_file
from torch import nn

from dora_diffusion.formats.kohya import kohya_module_name
from helpers import fresh_pipe, max_diff, render

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
def randomise(lyco: nn.Module, kind: str, std: float, g: torch.Generator) -> None:
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
    (a file mixing kinds). Returns the LyCORIS modules, to ``restore()`` them."""
    g = torch.Generator().manual_seed(seed)
    state_dict, applied = {}, []
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
            randomise(lyco, kind, std, g)
            lyco.apply_to()
            applied.append(lyco)
            prefix = kohya_key(comp, name, naming)
            for key, value in lyco.custom_state_dict().items():
                if key == "alpha" and kind == "lokr_full":
                    value = torch.tensor(10000.0)  # LyCORIS writes alpha = rank here; other trainers a placeholder
                if not (key == "alpha" and alpha == 0):
                    state_dict[f"{prefix}.{key}"] = value.detach().float().contiguous()
    save_file(state_dict, path)
    return applied


def factor_keys(path) -> set[str]:
    from safetensors import safe_open

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
            for lyco in applied:
                module = lyco.org_module[0]
                comp, mname = next((c, n) for c in COMPONENTS for n, m in getattr(src, c).named_modules() if m is module)
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
        for lyco in applied:
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
