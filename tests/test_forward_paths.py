"""The forward-path table (``forward_paths.FORWARD_PATHS``): which path runs when, and the paths added with it
(Conv2d DoRA keeping its input instead of its output; the norm's ``A W0^T`` from the forward matmul)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dora_diffusion.core.adapter as adapter_mod
from dora_diffusion.core.layers import AdapterSpec, wrap
from dora_diffusion.training.output.checkpoint import _current_name
from helpers import make_base, make_input, perturb_layer, run_step
from helpers import saved_bytes as helpers_saved_bytes


def _layer(kind: str, *specs: tuple[str, AdapterSpec]):
    layer = wrap(make_base(kind, torch.float32))
    for name, spec in specs:
        layer.new_adapter(name, spec)
        perturb_layer(layer, name)
    return layer


DORA, LORA, LEGACY = AdapterSpec(4, 4, True), AdapterSpec(4, 4, False), AdapterSpec(4, 4, True, "in")


@pytest.mark.parametrize(
    ("kind", "specs", "setup", "grad", "want"),
    [
        ("linear", [("a", DORA)], None, True, "lean_linear"),
        ("conv3x3", [("a", DORA)], None, True, "lean_scaled"),
        ("linear", [("a", DORA)], "hook", True, "lean_scaled"),
        ("linear", [("a", DORA)], None, False, "inference"),
        ("conv3x3", [("a", DORA), ("b", LORA)], None, False, "inference"),
        ("linear", [("a", LORA)], None, True, "lora_in_place"),
        ("conv3x3", [("a", LORA)], None, True, "reference"),
        ("linear", [("a", DORA), ("b", DORA)], None, True, "reference"),
        ("linear", [("a", DORA)], "half", True, "reference"),
        ("linear", [("a", DORA)], "plain", True, "reference"),
        ("linear", [("a", LEGACY)], None, False, "reference"),
        ("linear", [("a", DORA)], "off", True, "base"),
        ("linear", [("a", DORA)], "disabled", True, "base"),
        ("linear", [("a", DORA)], "fused", False, "base"),
    ],
)
@pytest.mark.exactness
def test_path_table(kind, specs, setup, grad, want) -> None:
    layer = _layer(kind, *specs)
    x = make_input(layer.base_layer, torch.float32)
    if setup == "hook":
        layer.base_layer.register_forward_hook(lambda m, i, o: None)
    elif setup == "half":
        layer.set_active({"a": 0.5})
    elif setup == "plain":
        layer.lean_training = False
    elif setup == "off":
        layer.set_active({"a": 0.0})
    elif setup == "disabled":
        layer.disabled = True
    elif setup == "fused":
        layer.fuse()
    with torch.set_grad_enabled(grad):
        assert layer.forward_path(x) == want
        y = layer(x)
    if want == "base" and setup != "fused":
        assert torch.equal(y, layer.base_layer(x))


@pytest.mark.parametrize("kind", ["conv3x3", "conv_dilated"])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_recompute_step_equals_plain_autograd(kind, bias) -> None:
    """Conv2d DoRA keeping x and recomputing conv(x, W0) + s B h in the backward (also with a g = 0 filter)."""
    base = make_base(kind, torch.float32)
    if not bias:
        base.bias = None
    layer = wrap(base)
    layer.new_adapter("a", AdapterSpec(3, 3.0, True))
    perturb_layer(layer, "a")
    with torch.no_grad():
        layer.adapters["a"].magnitude[1] = 0.0
    x = make_input(base, torch.float32)
    y_plain, g_plain = run_step(layer, x, lean=False)
    y_lean, g_lean = run_step(layer, x, lean=True, recompute=True)
    assert torch.allclose(y_lean, y_plain, atol=1e-5)
    assert g_plain[2][1].abs() > 0
    for got, want in zip(g_lean, g_plain):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()


def test_conv_recompute_keeps_no_output() -> None:
    """Saved for backward: Conv2d DoRA with recompute keeps what LoRA keeps plus per-channel vectors only;
    keeping the output costs one output-sized tensor."""
    base = nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(2, 8, 12, 12, requires_grad=True)

    def saved_bytes(use_dora: bool, recompute: bool = False) -> int:
        return helpers_saved_bytes(base, x, use_dora, recompute)

    n_out = 2 * 16 * 12 * 12 * 4
    lora = saved_bytes(False)
    assert n_out <= saved_bytes(True) - lora <= n_out + 2 * 4 * 12 * 12 * 4 + 4096  # y (+ the N x 4 kept channels)
    assert saved_bytes(True, recompute=True) - lora <= 4096


def test_norm_from_the_forward_matmul(monkeypatch) -> None:
    """An fp32 training step whose norm is not cached takes ``A W0^T`` from the forward's own matmul (A's rows
    stacked under x); the norm equals the dense one and is cached for the next micro-step."""
    passed = []
    real = adapter_mod.factored_row_norm
    monkeypatch.setattr(adapter_mod, "factored_row_norm", lambda *a, **k: passed.append(a[5]) or real(*a, **k))
    layer = _layer("linear", ("a", DORA))
    adapter = layer.adapters["a"]
    x = make_input(layer.base_layer, torch.float32).requires_grad_(True)
    passed.clear()
    layer(x).sum().backward()
    assert len(passed) == 1 and passed[0] is not None  # computed once, from the stacked matmul
    w = (layer.weight + adapter.spec.scale * adapter.B @ adapter.A).detach()
    assert torch.allclose(adapter.cached_norm(adapter.norm_key()), w.norm(dim=1), rtol=1e-6)
    layer(x).sum().backward()
    assert len(passed) == 1  # the second micro-step reuses it
    with torch.no_grad():
        y = layer(x)
    layer.lean_training = False
    adapter._norm = None
    assert torch.allclose(layer(x), y, atol=1e-6)


def test_checkpoint_parameter_names_from_older_versions() -> None:
    assert _current_name("unet.down.0.to_q.lora_A.default") == "unet.down.0.to_q.adapters.default.A"
    assert _current_name("text_encoder.l.q_proj.lora_magnitude.x") == "text_encoder.l.q_proj.adapters.x.magnitude"
    assert _current_name("unet.down.0.to_q.adapters.default.B") == "unet.down.0.to_q.adapters.default.B"


def test_hooked_conv_keeps_its_output() -> None:
    """A Conv2d whose module has hooks (accelerate offloading moves its weight) never recomputes the base conv in
    the backward: it keeps y even when recompute_output is set."""
    layer = _layer("conv3x3", ("a", DORA))
    layer.recompute_output = True
    x = make_input(layer.base_layer, torch.float32).requires_grad_(True)
    kept = []

    def pack(t: torch.Tensor):
        kept.append(t.shape)
        return t

    layer.base_layer.register_forward_pre_hook(lambda m, i: None)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert y.shape in kept  # the output, for dL/dm
    y.sum().backward()
    assert layer.adapters["a"].magnitude.grad is not None


@pytest.mark.exactness
@pytest.mark.parametrize("who", ["base", "input"])
def test_gradient_reaches_an_unfrozen_base_and_the_input(who) -> None:
    """Wrapping leaves a base the user did not freeze requiring grad, and frozen adapters never cut the graph: the
    call takes a path whose autograd reaches W0 (resp. x), with the gradient of the dense formula in plain torch."""
    base = make_base("linear", torch.float32).requires_grad_(who == "base")
    layer = wrap(base)
    layer.new_adapter("a", DORA)
    perturb_layer(layer, "a")
    layer.adapters["a"].requires_grad_(False)
    x = make_input(base, torch.float32).requires_grad_(who == "input")
    assert base.weight.requires_grad == (who == "base")
    assert layer.forward_path(x) == ("reference" if who == "base" else "lean_linear")  # never "inference" (no autograd)
    layer(x).square().sum().backward()

    ad = layer.adapters["a"]
    w0 = base.weight.detach().clone().requires_grad_(who == "base")
    xr = x.detach().clone().requires_grad_(who == "input")
    w = w0 + ad.spec.scale * ad.B.detach() @ ad.A.detach()
    w_dora = ad.magnitude.detach()[:, None] * w / w.detach().norm(dim=1, keepdim=True)  # norm detached (paper 4.3)
    torch.nn.functional.linear(xr, w_dora, base.bias.detach()).square().sum().backward()
    got, want = (base.weight.grad, w0.grad) if who == "base" else (x.grad, xr.grad)
    assert got is not None and want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
