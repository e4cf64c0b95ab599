"""Layer math against a dense reference written in plain torch (DESIGN.md, "The math contract")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dora_diffusion.core.layers import AdapterSpec, DoRAConv2d, DoRALinear, wrap
from helpers import make_base, make_input, perturb_layer


def reference_weight(layer, name: str, w0: torch.Tensor) -> torch.Tensor:
    """W' from the paper's formula, dense, fp32."""
    spec = layer.adapters[name].spec
    r = spec.rank
    ba = (layer.adapters[name].B.detach().float().reshape(-1, r) @ layer.adapters[name].A.detach().float().reshape(r, -1))
    v = w0.float() + spec.scale * ba.view_as(w0)
    if not spec.use_dora:
        return v
    m = layer.adapters[name].magnitude.detach().float()
    if spec.norm_axis == "out":
        n = v.reshape(v.shape[0], -1).norm(dim=1)
        return (m / n).view(-1, *[1] * (v.dim() - 1)) * v
    n = v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1)
    return v * (m / n).view(1, -1, *[1] * (v.dim() - 2))


def apply(base: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    b = None if base.bias is None else base.bias.float()
    if isinstance(base, nn.Linear):
        return F.linear(x.float(), w, b)
    return F.conv2d(x.float(), w, b, base.stride, base.padding, base.dilation)


CASES = [
    (kind, rank, dora, dtype)
    for kind in ("linear", "conv3x3", "conv_dilated", "conv1x1")
    for rank in (1, 4, 32)  # 32 > min(d_in, d_out) for every layer here
    for dora in (True, False)
    for dtype in (torch.float32, torch.bfloat16)
]


@pytest.mark.exactness
@pytest.mark.parametrize("kind,rank,dora,dtype", CASES)
def test_layer_table(kind: str, rank: int, dora: bool, dtype: torch.dtype) -> None:
    base = make_base(kind, dtype)
    x = make_input(base, dtype)
    with torch.no_grad():
        y_base = base(x)
    w0 = base.weight.detach().clone()
    layer = wrap(base)
    layer.new_adapter("a", AdapterSpec(rank, rank / 2 + 1, dora))
    assert layer.adapters["a"].A.dtype == torch.float32

    # Untrained: the output is the base output, bit for bit, in the input dtype.
    with torch.no_grad():
        y0 = layer(x)
    assert y0.dtype == dtype
    assert torch.equal(y0, y_base)

    # Trained: matches W' = m (W0 + s B A) / ||W0 + s B A|| applied densely.
    perturb_layer(layer, "a")
    w_ref = reference_weight(layer, "a", w0)
    with torch.no_grad():
        y = layer(x)
        y_ref = apply(base, x, w_ref)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert y.dtype == dtype
    assert (y.float() - y_ref).abs().max().item() <= tol * max(1.0, y_ref.abs().max().item())
    assert (y.float() - y_base.float()).abs().max().item() > 10 * tol  # the adapter does something

    # Fused equals unfused; unfuse restores W0 bit for bit.
    layer.fuse()
    with torch.no_grad():
        y_fused = layer(x)
    assert (y_fused.float() - y.float()).abs().max().item() <= tol * max(1.0, y_ref.abs().max().item())
    layer.unfuse()
    assert torch.equal(layer.weight, w0)


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_gradients_match_detached_norm_reference(kind: str) -> None:
    """dL/dA, dL/dB, dL/dm, dL/dx equal autograd through the dense formula with the norm detached."""
    base = make_base(kind, torch.float32)
    x = make_input(base, torch.float32).requires_grad_(True)
    layer = wrap(base)
    layer.new_adapter("a", AdapterSpec(3, 5.0, True))
    perturb_layer(layer, "a")
    layer(x).square().sum().backward()

    a = layer.adapters["a"].A.detach().clone().requires_grad_(True)
    b = layer.adapters["a"].B.detach().clone().requires_grad_(True)
    m = layer.adapters["a"].magnitude.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    w0 = base.weight.detach()
    s = layer.adapters["a"].spec.scale
    v = w0 + s * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).view_as(w0)
    n = v.reshape(v.shape[0], -1).norm(dim=1).detach()  # paper section 4.3
    w = (m / n).view(-1, *[1] * (v.dim() - 1)) * v
    apply(base, x2, w).square().sum().backward()

    for got, want in ((layer.adapters["a"].A.grad, a.grad), (layer.adapters["a"].B.grad, b.grad),
                      (layer.adapters["a"].magnitude.grad, m.grad), (x.grad, x2.grad)):  # fmt: skip
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()
    assert base.weight.grad is None


@pytest.mark.exactness
@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_strength_and_stacking(kind: str) -> None:
    """W(k) = W0 + sum_j k_j (W'_j - W0); k = 0 is the base output exactly."""
    base = make_base(kind, torch.float32)
    x = make_input(base, torch.float32)
    w0 = base.weight.detach().clone()
    with torch.no_grad():
        y_base = base(x)
    layer = wrap(base)
    layer.new_adapter("d", AdapterSpec(4, 4, True))
    layer.new_adapter("l", AdapterSpec(2, 4, False))
    perturb_layer(layer, "d", 3)
    perturb_layer(layer, "l", 4)
    wd, wl = reference_weight(layer, "d", w0), reference_weight(layer, "l", w0)
    with torch.no_grad():
        layer.set_active({"d": 0.0})
        assert torch.equal(layer(x), y_base)
        layer.set_active({"d": 0.5})
        assert torch.allclose(layer(x), apply(base, x, w0 + 0.5 * (wd - w0)), atol=1e-5)
        layer.set_active({"d": 0.7, "l": 1.3})
        want = apply(base, x, w0 + 0.7 * (wd - w0) + 1.3 * (wl - w0))
        assert torch.allclose(layer(x), want, atol=1e-5)
        layer.fuse()
        assert torch.allclose(layer(x), want, atol=1e-5)
        layer.unfuse()
        layer.disabled = True
        assert torch.equal(layer(x), y_base)


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_legacy_per_input_norm(kind: str) -> None:
    base = make_base(kind, torch.float32)
    x = make_input(base, torch.float32)
    w0 = base.weight.detach().clone()
    with torch.no_grad():
        y_base = base(x)
    layer = wrap(base)
    layer.new_adapter("old", AdapterSpec(4, 2.0, True, "in"))
    assert layer.adapters["old"].magnitude.shape == (layer.in_features,)
    with torch.no_grad():
        assert (layer(x) - y_base).abs().max().item() <= 1e-6
    perturb_layer(layer, "old")
    with torch.no_grad():
        assert torch.allclose(layer(x), apply(base, x, reference_weight(layer, "old", w0)), atol=1e-5)


def test_dropout_only_on_low_rank_path() -> None:
    """With B = 0 dropout has nothing to drop: the output stays the base output in train mode."""
    base = make_base("linear", torch.float32)
    x = make_input(base, torch.float32)
    layer = wrap(base)
    layer.new_adapter("a", AdapterSpec(4, 4, True), dropout=0.9)
    layer.train()
    with torch.no_grad():
        layer.adapters["a"].magnitude.mul_(1.5)
        assert torch.allclose(layer(x), 1.5 * (base(x) - base.bias) + base.bias, atol=1e-5)


@pytest.mark.exactness
def test_fp16_unfuse_bit_exact_after_100_cycles() -> None:
    base = make_base("conv3x3", torch.float16)
    w0 = base.weight.detach().clone()
    layer = wrap(base)
    layer.new_adapter("a", AdapterSpec(4, 4, True))
    perturb_layer(layer, "a")
    for _ in range(100):
        layer.fuse()
        assert not torch.equal(layer.weight, w0)
        layer.unfuse()
    assert torch.equal(layer.weight, w0)


def test_norm_cache_follows_optimizer_steps() -> None:
    """The cached norm is recomputed after A or B change in place, and only then."""
    base = make_base("linear", torch.float32)
    layer = wrap(base)
    layer.new_adapter("a", AdapterSpec(4, 4, True))
    perturb_layer(layer, "a")
    n1 = layer.adapters["a"].norm()
    assert layer.adapters["a"].norm() is n1
    opt = torch.optim.SGD(list(layer.parameters()), lr=0.1)
    x = make_input(base, torch.float32)
    layer(x).sum().backward()
    opt.step()
    n2 = layer.adapters["a"].norm()
    assert n2 is not n1
    v = base.weight + layer.adapters["a"].spec.scale * layer.adapters["a"].B @ layer.adapters["a"].A
    assert torch.allclose(n2, v.detach().norm(dim=1), rtol=1e-6)


@pytest.mark.exactness
def test_zero_rows_give_no_nan() -> None:
    base = make_base("linear", torch.float32)
    with torch.no_grad():
        base.weight[3].zero_()
    x = make_input(base, torch.float32)
    layer = wrap(base)
    layer.new_adapter("a", AdapterSpec(2, 2, True))
    with torch.no_grad():
        y = layer(x)
    assert torch.isfinite(y).all() and torch.equal(y, base(x))


def test_rejected_modules() -> None:
    with pytest.raises(ValueError, match="groups=1 only, this Conv2d has groups=2"):
        DoRAConv2d(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode='zeros'"):
        DoRAConv2d(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(TypeError, match="only nn.Linear and nn.Conv2d"):
        wrap(nn.Embedding(4, 4))
    layer = DoRALinear(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="contain no '.'"):
        layer.new_adapter("a.b", AdapterSpec(2, 2, True))


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_lora_gradients_match_dense_reference(kind: str) -> None:
    base = make_base(kind, torch.float32)
    x = make_input(base, torch.float32).requires_grad_(True)
    layer = wrap(base)
    layer.new_adapter("l", AdapterSpec(3, 5.0, False))
    perturb_layer(layer, "l")
    layer(x).square().sum().backward()
    a = layer.adapters["l"].A.detach().clone().requires_grad_(True)
    b = layer.adapters["l"].B.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    w0 = base.weight.detach()
    w = w0 + layer.adapters["l"].spec.scale * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).view_as(w0)
    apply(base, x2, w).square().sum().backward()
    for got, want in ((layer.adapters["l"].A.grad, a.grad), (layer.adapters["l"].B.grad, b.grad), (x.grad, x2.grad)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()
