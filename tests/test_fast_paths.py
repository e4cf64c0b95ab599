"""The fast paths (factored norm, lean autograd function, norm cache) equal the straightforward formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dora_diffusion.core.layers import AdapterSpec, wrap
from dora_diffusion.core.norms import factored_row_norm
from helpers import make_base, make_input, perturb_layer, run_step
from helpers import saved_bytes as helpers_saved_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,rank", [((12, 24), 4), ((12, 24), 40), ((7, 3 * 3 * 5), 64), ((1, 5), 3)])
def test_factored_norm_equals_dense(shape, rank, dtype) -> None:
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(shape, generator=g).to(dtype)
    a = torch.randn(rank, shape[1], generator=g)
    b = torch.randn(shape[0], rank, generator=g) * 0.1
    dense = (w0.double() + 0.7 * (b.double() @ a.double())).norm(dim=1)
    fast = factored_row_norm(w0, a, b, 0.7)
    assert fast.dtype == torch.float32
    assert torch.allclose(fast.double(), dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv_dilated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [2, 40])
def test_lean_training_step_equals_plain_autograd(kind, dtype, rank) -> None:
    base = make_base(kind, dtype)
    x = make_input(base, dtype)
    layer = wrap(base)
    layer.new_adapter("a", AdapterSpec(rank, 3.0, True))
    perturb_layer(layer, "a")
    y_plain, g_plain = run_step(layer, x, lean=False)
    y_lean, g_lean = run_step(layer, x, lean=True)
    assert y_lean.dtype == y_plain.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (y_lean.float() - y_plain.float()).abs().max().item() <= tol * max(1.0, y_plain.abs().max().item())
    for got, want in zip(g_lean, g_plain):
        scale = max(1.0, want.abs().max().item())
        assert (got.float() - want.float()).abs().max().item() <= tol * scale


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [2, 40])
def test_recompute_step_equals_plain_autograd(bias, dtype, rank) -> None:
    """The lean step that keeps x and recomputes W0 x + s B h in the backward (also with g = 0 rows)."""
    torch.manual_seed(0)
    base = nn.Linear(24, 12, bias=bias).to(dtype)
    x = torch.randn(3, 5, 24).to(dtype)
    layer = wrap(base)
    layer.new_adapter("a", AdapterSpec(rank, 3.0, True))
    perturb_layer(layer, "a")
    with torch.no_grad():
        layer.adapters["a"].magnitude[1] = 0.0
    y_plain, g_plain = run_step(layer, x, lean=False)
    y_lean, g_lean = run_step(layer, x, lean=True, recompute=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (y_lean.float() - y_plain.float()).abs().max().item() <= tol * max(1.0, y_plain.abs().max().item())
    assert g_plain[2][1].abs() > 0
    for got, want in zip(g_lean, g_plain):
        assert (got.float() - want.float()).abs().max().item() <= tol * max(1.0, want.abs().max().item())



@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_backward_equals_plain_autograd(recompute, dtype, monkeypatch) -> None:
    """With a tiny block budget the Linear backward runs in several blocks of rows and of channels
    (channel blocks only in fp32, where grad_x is summed over them); the result is unchanged."""
    import dora_diffusion.core.dora_autograd as autograd_mod

    monkeypatch.setattr(autograd_mod, "_CHUNK_ELEMENTS", 40)
    monkeypatch.setattr(autograd_mod, "_MIN_COLS", 5)
    rows, cols = autograd_mod._blocks(21, 12, exact_sum=dtype == torch.float32)
    assert rows < 21 and (cols < 12) == (dtype == torch.float32)
    torch.manual_seed(0)
    base = nn.Linear(24, 12).to(dtype)
    x = torch.randn(3, 7, 24).to(dtype)
    layer = wrap(base)
    layer.new_adapter("a", AdapterSpec(4, 3.0, True))
    perturb_layer(layer, "a")
    y_plain, g_plain = run_step(layer, x, lean=False)
    y_lean, g_lean = run_step(layer, x, lean=True, recompute=recompute)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (y_lean.float() - y_plain.float()).abs().max().item() <= tol * max(1.0, y_plain.abs().max().item())
    for got, want in zip(g_lean, g_plain):
        assert (got.float() - want.float()).abs().max().item() <= tol * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("n,d_out", [(1024, 10240), (1024, 1280), (4096, 1280), (77, 1280), (1, 7), (300000, 4)])
def test_backward_blocks_cover_and_stay_small(n, d_out) -> None:
    from dora_diffusion.core.dora_autograd import _CHUNK_ELEMENTS, _MIN_COLS, _blocks

    rows, cols = _blocks(n, d_out, exact_sum=True)
    assert 1 <= rows <= n and 1 <= cols <= d_out
    assert rows * cols <= max(_CHUNK_ELEMENTS, _MIN_COLS)  # the temporaries of one block
    assert cols == d_out or cols >= _MIN_COLS * 0.5  # equal blocks may round the width down a little
    if n * d_out <= _CHUNK_ELEMENTS:
        assert (rows, cols) == (n, d_out)  # small layers: one block

def test_lean_step_with_zero_magnitude_rows() -> None:
    """Channels with g = 0 cannot recover (y - b) / g; the function keeps (up to _KEEP of) them exactly instead."""
    base = make_base("linear", torch.float32)
    x = make_input(base, torch.float32)
    layer = wrap(base)
    layer.new_adapter("a", AdapterSpec(4, 4, True))
    perturb_layer(layer, "a")
    with torch.no_grad():
        layer.adapters["a"].magnitude[[0, 5]] = 0.0
    y_plain, g_plain = run_step(layer, x, lean=False)
    y_lean, g_lean = run_step(layer, x, lean=True)
    assert torch.allclose(y_lean, y_plain, atol=1e-6)
    assert g_plain[2][0].abs() > 0
    for got, want in zip(g_lean, g_plain):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_lean_step_keeps_no_extra_activation() -> None:
    """Saved for backward: DoRA keeps the same bytes as LoRA plus at most one N x d_out tensor."""
    base = nn.Linear(64, 96)
    x = torch.randn(8, 32, 64, requires_grad=True)

    def saved_bytes(use_dora: bool, recompute: bool = False) -> int:
        return helpers_saved_bytes(base, x, use_dora, recompute)

    extra = saved_bytes(True) - saved_bytes(False)
    n_out = 8 * 32 * 96 * 4
    assert 0 < extra <= n_out + 4096  # the output y (shared with the next layer in a real model) + small vectors
    # keeping x instead (already kept for dL/dA) and recomputing: only per-channel vectors on top of LoRA
    assert saved_bytes(True, recompute=True) - saved_bytes(False) <= 4096


def test_norm_computed_once_per_optimizer_step_under_accumulation_and_checkpointing(monkeypatch) -> None:
    """Gradient accumulation micro-steps and checkpoint recomputation reuse the cached norm."""
    import dora_diffusion.core.adapter as adapter_mod

    calls = {"n": 0}
    real = adapter_mod.factored_row_norm

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(adapter_mod, "factored_row_norm", counting)
    base = make_base("linear", torch.float32)
    layer = wrap(base)
    layer.new_adapter("a", AdapterSpec(4, 4, True))
    perturb_layer(layer, "a")
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    x = make_input(base, torch.float32)
    calls["n"] = 0
    for step in range(3):
        for _micro in range(4):
            y = torch.utils.checkpoint.checkpoint(layer, x.requires_grad_(True), use_reentrant=False)
            y.square().mean().backward()
        opt.step()
        opt.zero_grad()
        assert calls["n"] == step + 1
    # and the cached value is the norm of the current weights
    v = base.weight + layer.adapters["a"].spec.scale * layer.adapters["a"].B @ layer.adapters["a"].A
    assert torch.allclose(layer.adapters["a"].norm(), v.detach().norm(dim=1), rtol=1e-6)


def test_torch_compile_fullgraph_matches_eager() -> None:
    """A model with Linear and Conv2d DoRA layers compiles with no graph break; outputs and grads match."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16))
    model.requires_grad_(False)
    model[0] = wrap(model[0])
    model[3] = wrap(model[3])
    for layer in (model[0], model[3]):
        layer.new_adapter("a", AdapterSpec(4, 8, True))
        perturb_layer(layer, "a")
    x = torch.randn(2, 3, 6, 6)

    def grads(m) -> tuple[torch.Tensor, list[torch.Tensor]]:
        for p in model.parameters():
            p.grad = None
        y = m(x)
        y.square().sum().backward()
        return y.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    y_eager, g_eager = grads(model)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    y_comp, g_comp = grads(compiled)
    assert torch.allclose(y_comp, y_eager, atol=1e-5)
    assert len(g_comp) == len(g_eager) == 6
    for a, b in zip(g_comp, g_eager):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(compiled(x), y_eager, atol=1e-5)


@pytest.mark.parametrize("recompute", [False, True])
def test_lean_step_under_autocast_matches_plain(recompute, monkeypatch) -> None:
    """Mixed precision as in training (bf16 base, fp32 adapter, CPU autocast): lean step == plain autograd,
    and the recompute path is taken (the input is not copied for A, so keeping it is free)."""
    import dora_diffusion.core.forward_paths as paths_mod

    used = []
    real_apply = paths_mod.DoRALinearFunction.apply
    monkeypatch.setattr(paths_mod.DoRALinearFunction, "apply", lambda *a: used.append(a[7]) or real_apply(*a))  # recompute
    torch.manual_seed(0)
    layer = wrap(nn.Linear(24, 12).to(torch.bfloat16).requires_grad_(False))  # frozen, as training freezes it
    layer.new_adapter("a", AdapterSpec(4, 3.0, True))
    perturb_layer(layer, "a")
    x = torch.randn(3, 5, 24).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_plain, g_plain = run_step(layer, x, lean=False)
        y_lean, g_lean = run_step(layer, x, lean=True, recompute=recompute)
    assert used == [recompute]
    assert y_lean.dtype == torch.bfloat16
    assert (y_lean.float() - y_plain.float()).abs().max().item() <= 2e-2 * max(1.0, y_plain.abs().max().item())
    for got, want in zip(g_lean, g_plain):
        assert (got.float() - want.float()).abs().max().item() <= 3e-2 * max(1.0, want.abs().max().item())


def test_more_zero_magnitudes_than_kept_channels() -> None:
    """Beyond the ``_KEEP`` channels kept exactly, a channel with g = 0 gets dL/dm = 0 (documented); the rest is exact."""
    from dora_diffusion.core.dora_autograd import _KEEP

    base = nn.Linear(24, 12)
    layer = wrap(base.requires_grad_(False))
    layer.new_adapter("a", AdapterSpec(4, 4, True))
    perturb_layer(layer, "a")
    zero = list(range(_KEEP + 2))
    with torch.no_grad():
        layer.adapters["a"].magnitude[zero] = 0.0
    x = torch.randn(3, 5, 24)
    y_plain, g_plain = run_step(layer, x, lean=False)
    y_lean, g_lean = run_step(layer, x, lean=True)
    assert torch.allclose(y_lean, y_plain, atol=1e-6)
    dm_plain, dm_lean = g_plain[2], g_lean[2]
    rest = [i for i in range(12) if i not in zero]
    assert torch.allclose(dm_lean[rest], dm_plain[rest], rtol=1e-5, atol=1e-6)
    exact = torch.isclose(dm_lean[zero], dm_plain[zero], rtol=1e-5, atol=1e-6)
    assert int(exact.sum()) == _KEEP and bool((dm_lean[zero][~exact] == 0).all())
    assert bool((dm_plain[zero].abs() > 0).all())


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_norm_is_fp32_under_autocast(kind) -> None:
    """bf16 autocast does not reach the norm's matmuls: the same fp32 norm bit for bit."""
    layer = wrap(make_base(kind, torch.float32))
    layer.new_adapter("a", AdapterSpec(8, 8, True))
    perturb_layer(layer, "a")
    want = layer.adapters["a"].compute_norm()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer.adapters["a"].compute_norm()
    assert got.dtype == torch.float32 and torch.equal(got, want)
