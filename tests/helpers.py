"""Helpers the test files share (as PEFT's ``testing_common``): import them from here, not from another test file.

Tiny SDXL pipelines and a fixed way to render them, adapter files that look trained, single layers with their
inputs, and a free local port. Fixtures stay in ``conftest.py``.
"""

from __future__ import annotations

import copy
import hashlib
import os
import socket

import numpy as np
import torch
from torch import nn

import dora_diffusion  # noqa: F401  (installs the pipeline methods)
from dora_diffusion.core.layers import AdapterSpec, wrap
from dora_diffusion.testing import TINY_RESOLUTION, build_tiny_sdxl_pipeline

PROMPT = "a photo of TOK toy on a table"


# ---------------------------------------------------------------------------------------------- pipelines


def render(pipe, prompt: str = PROMPT, seed: int = 0) -> np.ndarray:
    """Two denoising steps with a fixed generator, fp32 numpy images."""
    out = pipe(
        prompt,
        num_inference_steps=2,
        height=TINY_RESOLUTION,
        width=TINY_RESOLUTION,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return out.images


BASE_GRAD = os.environ.get("DORA_TEST_BASE_GRAD", "requires")
"""The ``requires_grad`` of every base parameter of ``fresh_pipe()``: ``requires`` (as ``from_pretrained`` gives
them) or ``frozen`` (a user who froze the pipeline). ``.ci/run`` runs the exactness tests under both."""


def unet_output(pipe, grad: bool = True) -> torch.Tensor:
    """One UNet call on fixed inputs (grad mode on unless ``grad=False``), its output detached: the UNet alone,
    called as a user's training or guidance code calls it (``render`` runs under the pipeline's ``no_grad``)."""
    c = pipe.unet.config
    g = torch.Generator().manual_seed(3)
    text_dim = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    sample = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    context = torch.randn(2, 7, c.cross_attention_dim, generator=g)
    cond = {"text_embeds": torch.randn(2, text_dim, generator=g), "time_ids": torch.rand(2, 6, generator=g) * 64}
    with torch.set_grad_enabled(grad):
        return pipe.unet(sample, 500, encoder_hidden_states=context, added_cond_kwargs=cond).sample.detach()


def fresh_pipe():
    """A new tiny SDXL pipeline (same random weights every time), progress bar off, base parameters requiring
    grad or frozen as ``DORA_TEST_BASE_GRAD`` says."""
    if BASE_GRAD not in ("requires", "frozen"):
        raise ValueError(f"DORA_TEST_BASE_GRAD must be 'requires' or 'frozen', got {BASE_GRAD!r}")
    p = build_tiny_sdxl_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    for model in (p.unet, p.vae, p.text_encoder, p.text_encoder_2):
        model.requires_grad_(BASE_GRAD == "requires")
    return p


# ---------------------------------------------------------------------------------------------- "nothing changed"

STATE_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _module_state(module: nn.Module) -> tuple:
    hooks = tuple(
        tuple(getattr(module, h).keys())
        for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )
    return (
        id(module),
        type(module).__name__,
        module.training,
        hooks,
        id(getattr(module, "_hf_hook", None)),  # accelerate's hook, and the forward it replaces
        "forward" in module.__dict__,
    )


def _tensor_state(t: torch.Tensor, is_param: bool) -> tuple:
    data = t.detach()
    digest = hashlib.sha256(data.cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    where = (str(data.device), data.data_ptr(), tuple(data.shape), data.stride())
    return (id(t), is_param, t.requires_grad, data.dtype, where, digest)


def pipeline_state(pipe) -> dict[str, object]:
    """Everything about ``pipe`` that loading adapters for inference must leave as it was, by name: each base
    module (seen through adapter wrappers: the object, type, ``training``, hooks), each parameter and buffer
    (object, ``requires_grad``, dtype, device, shape, strides, the bytes of its value), the tokenizers' vocabularies
    and the text encoders' input embeddings and vocab sizes; and the adapters loaded (per adapted module: the
    wrapper, disabled/fused, each adapter's strength, spec and tensors)."""
    from dora_diffusion.core.inject import adapted_layers, base_modules
    from dora_diffusion.pipeline import AdapterRegistry

    state: dict[str, object] = {}
    for comp in STATE_COMPONENTS:
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        state[f"{comp} (model)"] = _module_state(model) + (model.dtype, str(model.device))
        for name, module in base_modules(model).items():
            key = f"{comp}.{name}" if name else comp
            state[key] = _module_state(module)
            for pname, t in module.named_parameters(recurse=False):
                state[f"{key}.{pname}"] = _tensor_state(t, True)
            for bname, t in module.named_buffers(recurse=False):
                state[f"{key}.{bname} (buffer)"] = _tensor_state(t, False)
        for name, layer in adapted_layers(model).items():
            adapters = tuple(
                (n, a.strength, a.spec, tuple(_tensor_state(p, True) for p in a.parameters()))
                for n, a in layer.adapters.items()
            )
            state[f"{comp}.{name} (adapters)"] = (id(layer), layer.training, layer.disabled, dict(layer.fused), adapters)
        if hasattr(model, "get_input_embeddings"):
            emb = model.get_input_embeddings()
            state[f"{comp} (input embeddings)"] = (id(emb), tuple(emb.weight.shape), model.config.vocab_size)
    loaded = AdapterRegistry.of(pipe).loaded.values()
    state["embeddings of adapters"] = {a.name: list(a.tokens) for a in loaded if a.tokens}
    for comp in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, comp, None)
        if tok is not None:
            vocab = sorted(tok.get_vocab().items())
            added = sorted(tok.get_added_vocab().items())
            digest = hashlib.sha256(repr((vocab, added)).encode()).hexdigest()
            state[f"{comp} (vocabulary)"] = (len(tok), digest, tuple(tok("a <s0> b").input_ids))
    return state


def assert_unchanged(before: dict[str, object], pipe, what: str = "", base_only: bool = False) -> None:
    """Assert that ``pipeline_state(pipe)`` equals ``before``, listing the first differences. ``base_only``: compare
    the base model alone (adapters and their embeddings may have come or gone)."""
    after = pipeline_state(pipe)
    if base_only:
        adapters = lambda k: k.endswith("(adapters)") or k == "embeddings of adapters"  # noqa: E731
        before = {k: v for k, v in before.items() if not adapters(k)}
        after = {k: v for k, v in after.items() if not adapters(k)}
    changed = [k for k in before.keys() | after.keys() if before.get(k) != after.get(k)]
    changed.sort()
    details = [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed[:6]]
    assert not changed, f"{what}{len(changed)} entries of the pipeline changed, e.g.\n" + "\n".join(details)


def file_modules(path) -> dict[str, dict[str, torch.Tensor]]:
    """``{module key prefix: {param: tensor}}`` of a kohya-style safetensors file (keys ``<module>.<param>``)."""
    from safetensors.torch import load_file

    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(path)).items():
        module, _, param = key.partition(".")
        groups.setdefault(module, {})[param] = t
    return groups


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    """The largest absolute difference between two images, in float64."""
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def perturb_adapter(model: torch.nn.Module, adapter_name: str, seed: int, b_std: float = 0.05) -> None:
    """Make an untrained adapter look trained: random B, magnitudes scaled by U(0.8, 1.2)."""
    from dora_diffusion.core.inject import adapted_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            if adapter_name not in layer.adapters:
                continue
            b = layer.adapters[adapter_name].B
            b.copy_(torch.randn(b.shape, generator=g) * b_std)
            if layer.adapters[adapter_name].magnitude is not None:
                m = layer.adapters[adapter_name].magnitude
                m.mul_(0.8 + 0.4 * torch.rand(m.shape, generator=g))


def make_adapter_file(directory, seed: int = 1, targets: str = "all", use_dora: bool = True, text: bool = True):
    """Write a random-but-trained-looking adapter for the tiny pipeline; returns the file path."""
    from dora_diffusion import AdapterConfig, add_adapter

    p = build_tiny_sdxl_pipeline(seed=0)
    add_adapter(p.unet, AdapterConfig(rank=4, alpha=6, use_dora=use_dora, targets=targets), "a")
    perturb_adapter(p.unet, "a", seed)
    if text:
        for i, te in enumerate((p.text_encoder, p.text_encoder_2)):
            add_adapter(te, AdapterConfig(rank=2, use_dora=use_dora, targets="all"), "a")
            perturb_adapter(te, "a", seed + 100 + i)
    return p.save_dora_weights(directory)


# ---------------------------------------------------------------------------------------------- single layers


def make_base(kind: str, dtype: torch.dtype) -> nn.Module:
    """A seeded, frozen base layer (as training freezes it): ``linear``, ``conv3x3`` (strided), ``conv_dilated``
    (no bias) or else a 1x1 conv."""
    torch.manual_seed(0)
    if kind == "linear":
        base = nn.Linear(24, 12)
    elif kind == "conv3x3":
        base = nn.Conv2d(6, 10, 3, stride=2, padding=1)
    elif kind == "conv_dilated":
        base = nn.Conv2d(5, 7, (3, 2), stride=(1, 2), padding=(2, 1), dilation=2, bias=False)
    else:
        base = nn.Conv2d(8, 4, 1)
    return base.to(dtype).requires_grad_(False)


def make_input(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A seeded input for ``base``: (3, 5, in_features) for a Linear, (2, in_channels, 9, 8) for a Conv2d."""
    g = torch.Generator().manual_seed(1)
    if isinstance(base, nn.Linear):
        return torch.randn(3, 5, base.in_features, generator=g).to(dtype)
    return torch.randn(2, base.in_channels, 9, 8, generator=g).to(dtype)


def perturb_layer(layer, name: str, seed: int = 2) -> None:
    """Give adapter ``name`` of one adapted layer a non-trivial B and magnitude, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        b = layer.adapters[name].B
        b.copy_(torch.randn(b.shape, generator=g) * 0.3)
        if layer.adapters[name].magnitude is not None:
            m = layer.adapters[name].magnitude
            m.mul_(0.5 + torch.rand(m.shape, generator=g))


# ---------------------------------------------------------------------------------------------- servers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_step(layer, x: torch.Tensor, lean: bool, recompute: bool = False):
    """One training step of adapter "a" on ``layer``: the output and the gradients of A, B, m and x."""
    layer.lean_training = lean
    layer.recompute_output = recompute
    for p in layer.parameters():
        p.grad = None
    xg = x.detach().clone().requires_grad_(True)
    y = layer(xg)
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = [layer.adapters["a"].A.grad, layer.adapters["a"].B.grad, layer.adapters["a"].magnitude.grad, xg.grad]
    return y.detach(), [g.clone() for g in grads]


def saved_bytes(base: nn.Module, x: torch.Tensor, use_dora: bool, recompute: bool = False) -> int:
    """Bytes autograd keeps for the backward of one step of a fresh rank-4 adapter on a copy of ``base``
    (storages of the saved tensors that are not parameters, each counted once)."""
    layer = wrap(copy.deepcopy(base).requires_grad_(False))
    layer.new_adapter("a", AdapterSpec(4, 4, use_dora))
    layer.recompute_output = recompute
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if not isinstance(t, nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    return sum(storages.values())


# ---------------------------------------------------------------------------------------------- the Hub


class FakeHub:
    """A stand-in for ``huggingface_hub.HfApi`` (patch it in): repos are ``me/<name>``; ``log`` records each
    call; ``sent[repo]`` is ``{path_in_repo: bytes}`` of its commits; ``public`` names repos that exist public."""

    def __init__(self, token=None, log=None, sent=None, public=()):
        self.token, self.log, self.sent, self.public = token, [] if log is None else log, {} if sent is None else sent, set(public)

    def __call__(self, token=None) -> FakeHub:
        """``HfApi(token=...)``: an instance sharing this fake's records."""
        return FakeHub(token, self.log, self.sent, self.public)

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        from types import SimpleNamespace

        full = "me/" + repo_id.split("/")[-1]
        self.log.append(("create", repo_id, private, self.token))
        if private is False:
            self.public.add(full)
        return SimpleNamespace(repo_id=full)

    def repo_info(self, repo_id, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(private=repo_id not in self.public)

    def upload_folder(self, repo_id, folder_path, commit_message=None, ignore_patterns=None, token=None, **kwargs):
        """``huggingface_hub.upload_folder``: what it would send (its own pattern filter), as one commit."""
        from pathlib import Path
        from types import SimpleNamespace

        from huggingface_hub.utils import filter_repo_objects

        root = Path(folder_path)
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        kept = filter_repo_objects(files, ignore_patterns=ignore_patterns)
        ops = [SimpleNamespace(path_in_repo=rel, path_or_fileobj=str(root / rel)) for rel in kept]
        FakeHub(token, self.log, self.sent, self.public).create_commit(repo_id, ops, commit_message)

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        from pathlib import Path

        self.log.append(("commit", repo_id, commit_message, self.token))
        files = self.sent.setdefault(repo_id, {})
        for op in operations:
            data = op.path_or_fileobj
            files[op.path_in_repo] = data if isinstance(data, bytes) else Path(data).read_bytes()


# ---------------------------------------------------------------------------------------------- PNG files


def png_chunk(ctype: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    import struct
    import zlib

    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def text_chunk(text: str, kind: str = "zTXt", keyword: str = "parameters") -> bytes:
    """A ``tEXt``, ``zTXt`` (level 9) or compressed ``iTXt`` chunk holding ``text``."""
    import zlib

    key = keyword.encode("latin-1") + b"\x00"
    if kind == "tEXt":
        return png_chunk(b"tEXt", key + text.encode("latin-1"))
    if kind == "zTXt":
        return png_chunk(b"zTXt", key + b"\x00" + zlib.compress(text.encode("latin-1"), 9))
    return png_chunk(b"iTXt", key + b"\x01\x00" + b"\x00\x00" + zlib.compress(text.encode("utf-8"), 9))


def crafted_png(path, chunks: list[bytes], width: int = 8, height: int = 8) -> int:
    """Write an RGB PNG of ``width x height`` black pixels with ``chunks`` before its image data; its size in
    bytes. The pixels are compressed row by row, so a huge image costs no memory to write."""
    import struct
    import zlib

    row = b"\x00" * (1 + 3 * width)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    data = b"\x89PNG\r\n\x1a\n" + ihdr + b"".join(chunks) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    path.write_bytes(data)
    return len(data)


def peak_rss_growth_mb(fn) -> tuple[float, object]:
    """(growth of this process's peak resident memory in MiB while ``fn()`` runs, its result); Linux only."""
    import re

    def kib(field: str) -> int:
        return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read())[1])

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    before = kib("VmRSS")
    result = fn()
    return (kib("VmHWM") - before) / 1024, result
