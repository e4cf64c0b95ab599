"""``--compile`` (issue 31 item 4): a DoRA Linear and Conv2d compiled under gradient checkpointing (aot_eager here;
inductor with ``DORA_TEST_INDUCTOR=1``) equal the eager lean step within the tolerance docs/training.md states, a
compiled model saves under its own names, the latent sides of aspect buckets share one graph, the lean DoRA functions
trace with no graph break, and the script's step goes through the compiled UNet while validation, checkpoints and a
resume keep the eager one."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors.torch import load_file
from torch import nn

from dora_diffusion.adapter_io import attach_adapter, read_adapter, save_adapter
from dora_diffusion.core.config import AdapterConfig
from dora_diffusion.core.inject import adapted_layers, add_adapter, set_recompute, trainable_parameters
from dora_diffusion.testing import make_toy_imagefolder, save_tiny_sdxl_pipeline
from dora_diffusion.training.step.compiled import CompiledUNet

OUT_TOL = 1e-5
"""Compiled vs eager output: at most this times the largest |y| (fp32)."""
GRAD_TOL = 1e-4
"""Compiled vs eager gradients: at most this times the largest |gradient| of each tensor (fp32)."""
INDUCTOR_SKIP = "inductor compiles C++ kernels: about a minute on 2 busy cores; DORA_TEST_INDUCTOR=1 runs it"


class CheckpointedBlock(nn.Module):
    """A 3x3 conv and a token Linear in one non-reentrant checkpoint, as diffusers' blocks run under
    ``enable_gradient_checkpointing``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.proj = nn.Linear(8, 8)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self._inner, sample, use_reentrant=False)

    def _inner(self, sample: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv(sample))  # (N, 8, h, w)
        tokens = h.flatten(2).transpose(1, 2)  # (N, hw, 8)
        return self.proj(tokens).transpose(1, 2).reshape(h.shape)


def _trained_block(seed: int = 0) -> nn.Module:
    """A frozen block with a DoRA adapter on both layers, B and m moved away from their start (as after training),
    recompute off (as the script sets it under gradient checkpointing)."""
    torch.manual_seed(seed)
    block = CheckpointedBlock().requires_grad_(False)
    add_adapter(block, AdapterConfig(rank=4, alpha=4, use_dora=True, targets=["conv", "proj"]), "default")
    set_recompute(block, "none")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.endswith(".B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif name.endswith(".magnitude"):
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
    return block


def _step(fn, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    params = trainable_parameters(block, "default")
    for p in params:
        p.grad = None
    y = fn(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), [p.grad.clone() for p in params]


def _worst(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",  # dynamo + AOT autograd (the checkpoint's recompute, the partitioner), the ops unfused
        pytest.param("inductor", marks=pytest.mark.skipif(os.environ.get("DORA_TEST_INDUCTOR") != "1", reason=INDUCTOR_SKIP)),
    ],
)
def test_compiled_step_under_checkpointing_equals_eager_and_saves_under_its_own_names(backend, tmp_path):
    block = _trained_block()
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    assert adapted_layers(block)["conv"].forward_path(x) == "lean_scaled"  # eager: the lean step
    assert adapted_layers(block)["proj"].forward_path(torch.zeros(2, 36, 8)) == "lean_linear"
    y_eager, g_eager = _step(block, block, x)
    compiled = CompiledUNet(block, backend)
    y_comp, g_comp = _step(compiled, block, x)
    torch._dynamo.reset()
    assert _worst(y_comp, y_eager) <= OUT_TOL
    assert len(g_comp) == len(g_eager) == 6  # A, B, m of both layers
    for got, want in zip(g_comp, g_eager):
        assert _worst(got, want) <= GRAD_TOL
    assert not torch.equal(g_comp[2], torch.zeros_like(g_comp[2]))  # the magnitude gradient is there
    # an optimizer step in place, then save through torch.compile's wrapper: the file has the module's own names
    with torch.no_grad():
        for p, grad in zip(trainable_parameters(block, "default"), g_comp):
            p.add_(grad, alpha=-0.1)
    path = save_adapter({"unet": compiled.compiled}, tmp_path, "default")
    keys = sorted(load_file(path))
    assert not any("_orig_mod" in k for k in keys)
    assert "unet.conv.lora_A.weight" in keys and "unet.proj.lora_magnitude_vector" in keys
    fresh = copy.deepcopy(block)
    for layer in adapted_layers(fresh).values():
        layer.delete_adapter("default")
    parsed, _ = read_adapter(path)
    attach_adapter({"unet": fresh}, "default", parsed.modules)
    trained, loaded = adapted_layers(block), adapted_layers(fresh)
    for name in ("conv", "proj"):
        a, b = trained[name].adapters["default"], loaded[name].adapters["default"]
        for t in ("A", "B", "magnitude"):
            assert torch.equal(getattr(a, t), getattr(b, t)), (name, t)
    with torch.no_grad():
        assert torch.equal(fresh(x), block(x))


def test_bucket_sides_share_one_graph():
    """``dynamic_sides`` (the script's ``--buckets``): two latent sizes, one compiled graph (unmarked, dynamo compiles
    again at the second size, and again when the other side first changes)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1)).requires_grad_(False)
    add_adapter(conv, AdapterConfig(rank=2, use_dora=True, targets=["0"]), "default")
    torch._dynamo.reset()
    counters.clear()
    compiled = CompiledUNet(conv, "eager", dynamic_sides=True)
    for h, w in [(6, 6), (8, 4)]:
        x = torch.randn(1, 4, h, w)
        assert torch.allclose(compiled(x), conv(x), rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_lean_functions_trace_without_graph_breaks():
    """With ``compile_lean`` the lean DoRA functions of a Conv2d and a Linear run inside one graph (no break), and
    their traced forward and backward (run as traced, unfused) equal the eager lean step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 6 * 6, 12)).requires_grad_(False)
    add_adapter(model, AdapterConfig(rank=4, alpha=8, use_dora=True, targets=["0", "2"]), "default")
    layers = adapted_layers(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.adapters["default"].B.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 6, 6)
    assert [layer.forward_path(t) for layer, t in zip(layers.values(), (x, torch.zeros(2, 288)))] == ["lean_scaled", "lean_linear"]
    y_eager, g_eager = _step(model, model, x)
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    for layer in layers.values():
        layer.compile_lean = True
    y_comp, g_comp = _step(torch.compile(model, backend=recording, fullgraph=True), model, x)  # fullgraph: a break raises
    torch._dynamo.reset()
    assert len(graphs) == 1
    applied = [n for n in graphs[0].graph.nodes if "autograd_function_apply" in str(n.target)]
    assert len(applied) == 2  # both lean functions, not the reference path
    assert _worst(y_comp, y_eager) <= 1e-6
    for got, want in zip(g_comp, g_eager):
        assert _worst(got, want) <= 1e-6


# ---------------------------------------------------------------- the script
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    save_tiny_sdxl_pipeline(root / "model")
    make_toy_imagefolder(root / "data", n=3, caption="TOK, toy")
    return root


def test_compile_flag_errors(capsys):
    from dora_diffusion.training.args import parse_args

    for argv, message in (
        (["--dynamo_backend", "inductor"], "--dynamo_backend inductor does nothing without --compile"),
        (["--compile", "--dynamo_backend", "nonesuch"], "--dynamo_backend 'nonesuch' is not a torch.compile backend here"),
    ):
        with pytest.raises(SystemExit):
            parse_args(["--dataset", "d", *argv])
        assert message in capsys.readouterr().err
    assert parse_args(["--dataset", "d", "--torch_compile"]).dynamo_backend == "inductor"


@pytest.mark.exactness
def test_the_step_runs_the_compiled_unet_and_a_resume_is_bit_identical(work, monkeypatch):
    """``torch.compile`` is replaced by a recorder that runs the UNet it was given (compiling the tiny UNet takes a
    minute): every micro-batch goes through it, validation and the files see the eager UNet, a resume is exact."""
    from PIL import Image
    from test_training_e2e import argv, run

    from dora_diffusion.training import run as training_run

    compiled, stepped, rendered = [], [], []

    def recording_compile(module, backend):
        compiled.append((module, backend))

        def call(*a, **kw):
            stepped.append(module)
            return module(*a, **kw)

        return call

    def render(pipe, prompt, n, *a):
        rendered.append(pipe.unet)
        return [Image.new("RGB", (64, 64))] * n

    monkeypatch.setattr(torch, "compile", recording_compile)
    monkeypatch.setattr(training_run, "render", render)
    flags = ["--compile", "--gradient_accumulation_steps", "1", "--checkpointing_steps", "1", "--dropout", "0"]
    out, stdout = run(argv(work, "straight", *flags, "--validation_prompt", "TOK", "--num_validation_images", "1", steps=2))
    assert "--compile: the UNet's training step runs through torch.compile (backend inductor, one static shape)" in stdout
    ((unet, backend),) = compiled
    assert backend == "inductor" and type(unet).__name__ == "UNet2DConditionModel"
    assert len(stepped) == 2 and all(m is unet for m in stepped)
    assert rendered == [unet]  # validation: the eager UNet itself
    final = load_file(out / "pytorch_lora_weights.safetensors")
    assert final and not any("_orig_mod" in k for k in final)
    assert not any("_orig_mod" in k for k in load_file(out / "checkpoint-1" / "adapter_state.safetensors"))
    resumed, stdout = run(argv(work, "resumed", *flags, "--resume_from_checkpoint", str(out / "checkpoint-1"), steps=2))
    assert "at step 1" in stdout and len(stepped) == 3
    again = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
