"""Pipeline methods on the tiny SDXL pipeline: strength, disable, fuse, unload, several adapters."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import dora_diffusion
from dora_diffusion.core.inject import adapted_layers
from helpers import assert_unchanged, make_adapter_file, max_diff, pipeline_state, render, unet_output


@pytest.mark.exactness
def test_strength_disable_fuse_unload(tmp_path, pipe, base_images) -> None:
    render(pipe)  # transformers adds its output-recording hooks to CLIP at the first call: a used pipeline
    before = pipeline_state(pipe)
    base_out = unet_output(pipe)
    name = pipe.load_dora_weights(make_adapter_file(tmp_path))
    assert_unchanged(before, pipe, "while an adapter is loaded: ", base_only=True)
    full = render(pipe)
    assert max_diff(full, base_images) > 1e-3

    pipe.set_dora_adapters(name, 0.0)
    assert max_diff(render(pipe), base_images) == 0.0  # strength 0 is the base model exactly
    assert torch.equal(unet_output(pipe), base_out)  # in grad mode too
    assert torch.equal(unet_output(pipe, grad=False), base_out)

    pipe.set_dora_adapters(name, 0.5)
    half = render(pipe)
    assert max_diff(half, base_images) > 1e-4 and max_diff(half, full) > 1e-4
    pipe.set_dora_adapters(name, 1.0)
    pipe.fuse_dora(lora_scale=0.5)
    assert max_diff(render(pipe), half) <= 1e-4  # weight 0.5 equals fusing at 0.5
    pipe.unfuse_dora()
    assert max_diff(render(pipe), full) == 0.0

    pipe.set_dora_adapters(name, 0.5)
    pipe.fuse_dora()
    assert max_diff(render(pipe), half) <= 1e-4
    pipe.unfuse_dora()
    assert_unchanged(before, pipe, "after fuse and unfuse: ", base_only=True)

    pipe.disable_dora()
    assert max_diff(render(pipe), base_images) == 0.0
    assert torch.equal(unet_output(pipe), base_out)
    pipe.enable_dora()
    assert max_diff(render(pipe), half) == 0.0

    pipe.unload_dora_weights()
    assert not any(adapted_layers(m) for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2))
    assert_unchanged(before, pipe, "after unload: ")  # modules, flags, hooks, weights, tokenizers: as before
    assert max_diff(render(pipe), base_images) == 0.0
    assert torch.equal(unet_output(pipe), base_out)


@pytest.mark.exactness
def test_delete_and_eval_mode_leave_the_base_as_it_was(tmp_path, pipe) -> None:
    """A pipeline in eval mode with a partly frozen UNet (as a user may have it): delete_dora_adapters restores
    every flag; the wrappers run in the base modules' mode."""
    pipe.unet.eval()
    pipe.unet.down_blocks.requires_grad_(False)
    before = pipeline_state(pipe)
    a = pipe.load_dora_weights(make_adapter_file(tmp_path / "a"))
    b = pipe.load_dora_weights(make_adapter_file(tmp_path / "b", seed=2, targets="attn"))
    assert_unchanged(before, pipe, "while two adapters are loaded: ", base_only=True)
    assert not any(layer.training for layer in adapted_layers(pipe.unet).values())
    pipe.delete_dora_adapters(b)
    pipe.delete_dora_adapters(a)
    assert_unchanged(before, pipe, "after deleting both adapters: ")


@pytest.mark.exactness
def test_two_adapters_and_same_file_twice(tmp_path, pipe, base_images) -> None:
    f1 = make_adapter_file(tmp_path / "one", seed=1)
    f2 = make_adapter_file(tmp_path / "two", seed=2, use_dora=False, targets="attn")
    a = pipe.load_dora_weights(f1)
    b = pipe.load_dora_weights(f2, adapter_name="lora")
    with pytest.warns(UserWarning, match=r"already loaded as adapter 'default_0'.*set_dora_adapters\('default_0', 2.0\)"):
        c = pipe.load_dora_weights(f1)  # the same file again gets its own name, with a warning naming the first
    assert pipe.get_dora_adapters() == ["default_0", "lora", "default_1"] == [a, b, c]

    pipe.set_dora_adapters(a)
    only_a = render(pipe)
    pipe.set_dora_adapters(c)
    assert max_diff(render(pipe), only_a) == 0.0
    pipe.set_dora_adapters(b)
    only_b = render(pipe)
    assert max_diff(only_b, only_a) > 1e-3
    pipe.set_dora_adapters([a, b], [1.0, 1.0])
    both = render(pipe)
    assert max_diff(both, only_a) > 1e-4 and max_diff(both, only_b) > 1e-4
    pipe.fuse_dora()
    assert max_diff(render(pipe), both) <= 1e-4
    pipe.unfuse_dora()

    pipe.delete_dora_adapters([a, c])
    assert pipe.get_dora_adapters() == ["lora"]
    pipe.set_dora_adapters("lora")
    assert max_diff(render(pipe), only_b) == 0.0


def test_save_round_trip_is_bit_exact(tmp_path, pipe) -> None:
    src = make_adapter_file(tmp_path / "src")
    pipe.load_dora_weights(src)
    out = pipe.save_dora_weights(tmp_path / "out")
    a, b = load_file(src), load_file(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_magnitude_vector") and v.dim() == 4 for k, v in b.items())  # Conv2d (1,out,1,1)


def test_plain_functions_and_state_dict_input(tmp_path, pipe) -> None:
    sd = load_file(make_adapter_file(tmp_path))
    name = dora_diffusion.load_dora_weights(pipe, sd, adapter_name="from_dict")
    assert dora_diffusion.get_dora_adapters(pipe) == [name] == ["from_dict"]
    assert dora_diffusion.get_active_dora_adapters(pipe) == {"from_dict": 1.0}
    dora_diffusion.set_dora_adapters(pipe, "from_dict", {"unet": 0.5, "text_encoder": 0.0})
    layers = adapted_layers(pipe.unet)
    assert all(layer.active == {"from_dict": 0.5} for layer in layers.values())
    assert all(layer.active == {"from_dict": 0.0} for layer in adapted_layers(pipe.text_encoder).values())
    assert all(layer.active == {"from_dict": 1.0} for layer in adapted_layers(pipe.text_encoder_2).values())


@pytest.mark.exactness
def test_text_encoder_keys_with_and_without_text_model(tmp_path, pipe) -> None:
    """transformers 4 wrote `text_encoder.text_model.encoder…`, transformers 5 `text_encoder.encoder…`."""
    sd = load_file(make_adapter_file(tmp_path))
    has_wrapper = any(n.startswith("text_model.") for n, _ in pipe.text_encoder.named_modules())
    renamed = {}
    for k, v in sd.items():
        if k.startswith("text_encoder.") and not has_wrapper:
            k = k.replace("text_encoder.", "text_encoder.text_model.", 1)
        elif k.startswith("text_encoder.text_model."):
            k = k.replace("text_encoder.text_model.", "text_encoder.", 1)
        renamed[k] = v
    assert renamed.keys() != sd.keys()
    pipe.load_dora_weights(sd, adapter_name="orig")
    want = render(pipe)
    pipe.unload_dora_weights()
    pipe.load_dora_weights(renamed, adapter_name="renamed")
    assert max_diff(render(pipe), want) == 0.0


def _count_walks(monkeypatch, pipe) -> dict[str, int]:
    """Count ``named_modules`` calls on the pipeline's three models (``parameters()`` walks through it too)."""
    models = {id(m): c for c in ("unet", "text_encoder", "text_encoder_2") if (m := getattr(pipe, c, None)) is not None}
    calls = {c: 0 for c in models.values()}
    original = torch.nn.Module.named_modules

    def counting(self, *args, **kwargs):
        if id(self) in models:
            calls[models[id(self)]] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "named_modules", counting)
    return calls


def test_a_load_walks_each_model_once_and_switching_walks_none(tmp_path, pipe, monkeypatch) -> None:
    first = make_adapter_file(tmp_path / "a", seed=1)
    second = make_adapter_file(tmp_path / "b", seed=2, use_dora=False)
    calls = _count_walks(monkeypatch, pipe)
    pipe.load_dora_weights(first, adapter_name="a")
    assert calls == {"unet": 1, "text_encoder": 1, "text_encoder_2": 1}  # the registry is built by the first load
    pipe.load_dora_weights(second, adapter_name="b")
    pipe.set_dora_adapters(["a", "b"], [0.5, 1.0])
    pipe.disable_dora()
    pipe.enable_dora()
    assert pipe.get_dora_adapters() == ["a", "b"]
    assert pipe.get_active_dora_adapters() == {"a": 0.5, "b": 1.0}
    pipe.fuse_dora()
    pipe.unfuse_dora()
    pipe.delete_dora_adapters("a")
    assert calls == {"unet": 1, "text_encoder": 1, "text_encoder_2": 1}  # nothing after the first load walked
    from dora_diffusion.core.inject import add_adapter
    from dora_diffusion import AdapterConfig

    add_adapter(pipe.unet, AdapterConfig(rank=2, targets="attn"), "behind")  # behind the registry's back: noticed
    assert pipe.get_dora_adapters() == ["b", "behind"]
    assert calls["text_encoder"] == 2 and calls["text_encoder_2"] == 2  # one rebuild: one more walk each


def test_old_positional_order_still_works_with_a_deprecation(tmp_path, pipe) -> None:
    path = make_adapter_file(tmp_path, seed=3)
    with pytest.warns(FutureWarning, match="by position is deprecated"):
        name = dora_diffusion.load_dora_weights(pipe, path.parent, path.name, "old")
    assert name == "old" and pipe.get_dora_adapters() == ["old"]
    with pytest.raises(TypeError, match="both by position and by keyword"):
        pipe.load_dora_weights(path.parent, path.name, weight_name=path.name)
    with pytest.warns(FutureWarning):
        pipe.fuse_dora(["old"], 0.5)
    pipe.unfuse_dora()
    with pytest.warns(UserWarning, match="already loaded as adapter 'old'"):
        assert pipe.load_dora_weights(path, adapter_name="new") == "new"  # diffusers' order, by keyword
