"""``--fp8_base`` (issue 31 item 3): float8 e4m3fn base weights with a per-channel scale (``core/fp8.py``), DoRA on
top of them, and the script's flag. References are written here in plain torch: the quantization formula, the
dequantized product, and DoRA's initial magnitude ``||row(W~)||``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from dora_diffusion import AdapterConfig, add_adapter
from dora_diffusion.core.fp8 import Float8Conv2d, Float8Linear, dequantize, quantize, to_float8, weight_bytes


def _reference_dequantized(w: torch.Tensor) -> torch.Tensor:
    """The formula of core/fp8.py written again: a power-of-two scale per output row, e4m3fn values, fp32 result."""
    w = w.float()
    amax = w.reshape(w.shape[0], -1).abs().amax(dim=1)
    s = torch.where(amax > 0, 2.0 ** torch.ceil(torch.log2(amax / 448.0)), torch.ones_like(amax))
    s = s.view(-1, *([1] * (w.dim() - 1)))
    return (w / s).to(torch.float8_e4m3fn).float() * s


def test_quantize_keeps_four_significant_bits_where_a_plain_cast_loses_small_weights():
    g = torch.Generator().manual_seed(0)
    errors = {}
    for std in (0.02, 0.004):  # SDXL's weights are mostly below 0.05; e4m3fn's smallest normal is 2^-6 = 0.0156
        w = torch.randn(64, 256, generator=g) * std
        w[3] = 0.0  # an all-zero row keeps scale 1
        q, s = quantize(w)
        assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s[3] == 1.0
        assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two
        wq = dequantize(q, s, torch.float32)
        assert torch.equal(wq, _reference_dequantized(w))
        assert torch.equal(dequantize(q, s, torch.bfloat16).float(), wq)  # exact in bf16 too: one W~ for every dtype
        # e4m3fn rounding: 2^-4 relative for normals, half a subnormal step (2^-10 s) below
        assert ((w - wq).abs() <= 2**-4 * w.abs() + 2**-10 * s[:, None]).all()
        plain = w.to(torch.float8_e4m3fn).float()  # kohya's --fp8_base cast
        errors[std] = ((wq - w).norm() / w.norm()).item(), ((plain - w).norm() / w.norm()).item()
    assert errors[0.02][0] < 0.028 and errors[0.004][0] < 0.028  # the scale makes the error independent of size
    assert errors[0.004][1] > 0.12  # the plain cast: 20% of these weights become 0


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.ModuleDict({"lin": nn.Linear(24, 40), "conv": nn.Conv2d(3, 8, 3, padding=1, stride=2)})
    return model.to(dtype).requires_grad_(False)


def _inputs(dtype: torch.dtype, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, z = torch.randn(2, 5, 24, generator=g).to(dtype), torch.randn(2, 3, 9, 9, generator=g).to(dtype)
    return x.requires_grad_(grad), z.requires_grad_(grad)


def _reference(model_full: nn.Module, x: torch.Tensor, z: torch.Tensor, dtype: torch.dtype):
    """``W~ x + b`` with W~ dequantized by the formula above, through plain autograd."""
    lin, conv = model_full["lin"], model_full["conv"]
    wl, wc = _reference_dequantized(lin.weight).to(dtype), _reference_dequantized(conv.weight).to(dtype)
    return F.linear(x, wl, lin.bias), F.conv2d(z, wc, conv.bias, stride=2, padding=1)


@pytest.mark.exactness
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_untrained_dora_on_a_float8_base_reproduces_it(dtype):
    """Bit-exact: the base product is the plain-torch one on W~, its input gradient too, and an untrained DoRA
    adapter starts at m = ||row(W~)|| (so g = 1) and changes no output of the inference path; in bf16 the training
    path too (``(y - b) + b`` is exact in fp32 for bf16 values; in fp32 it rounds, so only the inference path there)."""
    full, model = _model(dtype), _model(dtype)
    assert to_float8(model) == 2
    assert isinstance(model["lin"], Float8Linear) and isinstance(model["conv"], Float8Conv2d)
    x, z = _inputs(dtype, grad=True)
    xr, zr = _inputs(dtype, grad=True)
    ours = model["lin"](x), model["conv"](z)
    ref = _reference(full, xr, zr, dtype)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    (ours[0].float().square().sum() + ours[1].float().square().sum()).backward()
    (ref[0].float().square().sum() + ref[1].float().square().sum()).backward()
    assert torch.equal(x.grad, xr.grad) and torch.equal(z.grad, zr.grad)

    add_adapter(model, AdapterConfig(rank=4, use_dora=True, targets=["lin", "conv"]), "d")
    for name in ("lin", "conv"):
        w = _reference_dequantized(full[name].weight).to(dtype).float()
        norm = (w.reshape(w.shape[0], -1) ** 2).sum(dim=1).sqrt()
        assert torch.equal(model[name].adapters["d"].magnitude.view(-1), norm)
    with torch.no_grad():
        x, z = _inputs(dtype, grad=False)
        assert torch.equal(model["lin"](x), ref[0].detach()) and torch.equal(model["conv"](z), ref[1].detach())
    if dtype == torch.bfloat16:
        x, z = _inputs(dtype, grad=True)
        assert model["lin"].forward_path(x) == "lean_scaled"  # the float8 base is called as a module
        assert torch.equal(model["lin"](x), ref[0]) and torch.equal(model["conv"](z), ref[1])


def test_float8_product_keeps_no_dequantized_weight_and_dtype_changes_keep_float8():
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    lin = nn.Linear(64, 48).requires_grad_(False)
    x = torch.randn(2, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lin(x)
    assert 64 * 48 in saved  # plain autograd keeps the weight for dL/dx
    fp8 = Float8Linear(lin, torch.float32)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fp8(x)
    assert saved == []  # Float8Product dequantizes again in the backward instead
    y.sum().backward()
    torch.testing.assert_close(x.grad, fp8.weight.sum(dim=0).expand(2, -1), rtol=0, atol=1e-6)

    assert weight_bytes(lin.to(torch.bfloat16)) == (64 * 48 + 48) * 2
    assert weight_bytes(fp8) == 64 * 48 + 48 * 4 + 48 * 4  # float8 values, fp32 scale, fp32 bias
    fp8.to(torch.bfloat16)
    assert fp8.weight_fp8.dtype == torch.float8_e4m3fn and fp8.weight_scale.dtype == torch.float32
    assert fp8.compute_dtype == torch.bfloat16 and fp8.weight.dtype == torch.bfloat16 and fp8.bias.dtype == torch.bfloat16
    assert weight_bytes(fp8) == 64 * 48 + 48 * 4 + 48 * 2


def test_float8_refusals():
    model = _model(torch.float32)
    with pytest.raises(ValueError, match=r"lin \(Linear\) has trainable weights.*requires_grad_\(False\)"):
        to_float8(model.requires_grad_(True))
    model.requires_grad_(False)
    to_float8(model)
    add_adapter(model, AdapterConfig(rank=2, use_dora=True, targets=["lin"]), "d")
    with pytest.raises(RuntimeError, match=r"float8 \(--fp8_base\): an adapter cannot be fused"):
        model["lin"].fuse()
    adapted = _model(torch.float32)
    add_adapter(adapted, AdapterConfig(rank=2, targets=["lin"]), "d")
    with pytest.raises(ValueError, match="already carries adapters: store the base in float8 first"):
        to_float8(adapted)


def test_fp8_base_refused_on_a_torch_without_float8(monkeypatch, capsys):
    from dora_diffusion.training.args import parse_args

    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(SystemExit):
        parse_args(["--dataset", "d", "--fp8_base"])
    err = capsys.readouterr().err
    assert "--fp8_base: torch" in err and "has no float8_e4m3fn dtype" in err and "install torch >= 2.1" in err


@pytest.fixture(scope="module")
def fp8_run(tmp_path_factory):
    from test_training_e2e import argv, run

    from dora_diffusion.testing import make_toy_imagefolder, save_tiny_sdxl_pipeline

    work = tmp_path_factory.mktemp("fp8")
    save_tiny_sdxl_pipeline(work / "model")
    make_toy_imagefolder(work / "data", n=3)
    # the magnitudes learn at 1e-12: they stay where they started, ||row(W~)||, to the bit; A and B train
    path, out = run(argv(work, "fp8", *FP8_FLAGS, steps=2))
    return work, path, out


FP8_FLAGS = ("--fp8_base", "--magnitude_lr", "1e-12", "--checkpointing_steps", "1")


def test_a_fp8_base_run_saves_a_normal_adapter_whose_magnitudes_start_at_the_dequantized_norms(fp8_run):
    from diffusers import StableDiffusionXLPipeline

    from dora_diffusion.core.inject import adapted_layers

    work, path, out = fp8_run
    pipe = StableDiffusionXLPipeline.from_pretrained(work / "model")
    count = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
                for m in model.modules())  # fmt: skip
    assert f"--fp8_base: {count} Linear/Conv2d weights stored in float8 e4m3fn" in out
    file = path / "pytorch_lora_weights.safetensors"
    with safe_open(file, "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
        assert json.loads(f.metadata()["dora_diffusion"])["training"]["fp8_base"] is True
        mags = {k: f.get_tensor(k) for k in f.keys() if k.endswith("lora_magnitude_vector")}
    assert dtypes == {torch.float32}  # the adapter's own tensors: no float8 in the file
    assert len(mags) > 0
    pipe.load_dora_weights(path)  # loads on the full-precision base
    layers = adapted_layers(pipe.unet)
    assert len(layers) == len(mags)
    differs = 0
    for key, m in mags.items():
        layer = layers[key.removeprefix("unet.").removesuffix(".lora_magnitude_vector")]
        w0 = layer.base_layer.weight
        dequantized = _reference_dequantized(w0)
        assert torch.equal(m.view(-1), (dequantized.reshape(len(m.view(-1)), -1) ** 2).sum(dim=1).sqrt())
        differs += not torch.equal(m.view(-1), (w0.float().reshape(len(m.view(-1)), -1) ** 2).sum(dim=1).sqrt())
    assert differs == len(mags)  # every magnitude came from the float8 base, none from the full-precision one


@pytest.mark.parametrize("trained", [False, True])
def test_text_encoders_stay_in_the_training_dtype_when_they_train(trained):
    from types import SimpleNamespace

    from dora_diffusion.testing import build_tiny_sdxl_pipeline
    from dora_diffusion.training.fp8_base import store_in_float8

    pipe = build_tiny_sdxl_pipeline()
    models = (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    for model in models:
        model.requires_grad_(False)
    counts = [sum(type(m) in (nn.Linear, nn.Conv2d) for m in model.modules()) for model in models]
    before = [weight_bytes(model) for model in models]
    args = SimpleNamespace(train_text_encoder=trained, train_text_encoder_ti=False)
    report = store_in_float8(SimpleNamespace(unet=pipe.unet, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2), args, torch.float32)
    expected = {"unet": counts[0]} if trained else dict(zip(("unet", "text_encoder", "text_encoder_2"), counts))
    assert report.layers == expected
    after = [weight_bytes(model) for model in models]
    assert after[0] < before[0] / 2  # fp32 -> float8 values (+ a scale per channel)
    assert (after[1:] == before[1:]) == trained
    assert report.bytes_before == sum(b for b, n in zip(before, ("unet", "text_encoder", "text_encoder_2")) if n in expected)


@pytest.mark.exactness
def test_a_fp8_base_run_resumes_bit_identically(fp8_run):
    """The float8 base is rebuilt from the same weights on resume (the quantization is deterministic): 2 steps in one
    go and 1 + resume + 1 give the same adapter, bit for bit."""
    from safetensors.torch import load_file
    from test_training_e2e import argv, run

    work, whole, _ = fp8_run
    resumed, out = run(argv(work, "fp8-resumed", *FP8_FLAGS, "--resume_from_checkpoint", str(whole / "checkpoint-1"), steps=2))
    assert "resumed from" in out and "--fp8_base: " in out
    a, b = (load_file(p / "pytorch_lora_weights.safetensors") for p in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = load_file(whole / "checkpoint-1" / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(a[k], first[k]) for k in a)  # step 2 changed the adapter: the comparison means something
