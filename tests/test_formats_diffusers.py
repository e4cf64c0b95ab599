"""Every diffusers/PEFT key dialect reads to the same adapter; alpha comes from metadata, else alpha = rank."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, safe_open

from dora_diffusion.formats import parse_state_dict
from dora_diffusion.formats.diffusers import METADATA_KEY
from helpers import make_adapter_file, max_diff, render

RENAMES = {
    "peft": {},
    "lora.down/up": {".lora_A.weight": ".lora.down.weight", ".lora_B.weight": ".lora.up.weight"},
    "lora_linear_layer": {".lora_A.weight": ".lora_linear_layer.down.weight", ".lora_B.weight": ".lora_linear_layer.up.weight"},
    "peft module names": {".lora_A.weight": ".lora_A.default.weight", ".lora_B.weight": ".lora_B.default.weight",
                          ".lora_magnitude_vector": ".lora_magnitude_vector.default.weight"},
}  # fmt: skip


def rename(sd: dict, mapping: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for old, new in mapping.items():
            if k.endswith(old):
                k = k[: -len(old)] + new
                break
        out[k] = v
    return out


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    path = make_adapter_file(tmp_path_factory.mktemp("a"), seed=3)
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    return path, load_file(path), metadata


def test_metadata_written_like_diffusers(adapter) -> None:
    _, sd, metadata = adapter
    packed = json.loads(metadata[METADATA_KEY])
    assert packed["unet.r"] == 4 and packed["unet.lora_alpha"] == 6 and packed["unet.use_dora"] is True
    assert packed["text_encoder.r"] == 2 and packed["text_encoder_2.lora_alpha"] == 2
    assert set(packed["unet.target_modules"]) == {
        k[len("unet.") : -len(".lora_A.weight")] for k in sd if k.startswith("unet.") and k.endswith(".lora_A.weight")
    }
    assert json.loads(metadata["dora_diffusion"])["library"] == "dora-diffusion"


@pytest.mark.parametrize("dialect", sorted(RENAMES))
def test_key_dialects_read_identically(adapter, dialect: str) -> None:
    _, sd, metadata = adapter
    ref = parse_state_dict(sd, metadata)
    got = parse_state_dict(rename(sd, RENAMES[dialect]), metadata)
    assert got.modules.keys() == ref.modules.keys()
    for comp, mods in ref.modules.items():
        assert got.modules[comp].keys() == mods.keys()
        for name, m in mods.items():
            g = got.modules[comp][name]
            assert torch.equal(g.a, m.a) and torch.equal(g.b, m.b) and torch.equal(g.magnitude, m.magnitude)
            assert g.alpha == m.alpha


def test_alpha_without_metadata_is_rank_and_with_metadata_is_read(adapter, pipe) -> None:
    _, sd, metadata = adapter
    with_meta = parse_state_dict(sd, metadata)
    no_meta = parse_state_dict(sd, {})
    unet_mod = next(iter(with_meta.modules["unet"].values()))
    assert unet_mod.alpha == 6.0 and unet_mod.rank == 4
    assert all(m.alpha == m.rank for mods in no_meta.modules.values() for m in mods.values())
    # The same tensors with alpha = rank are a different adapter: the images must differ.
    pipe.load_dora_weights(sd, adapter_name="no_meta")  # a state dict carries no header
    a = render(pipe)
    pipe.unload_dora_weights()
    pipe.load_dora_weights(adapter[0], adapter_name="with_meta")
    assert max_diff(render(pipe), a) > 1e-4


def test_old_attention_processor_keys(adapter) -> None:
    _, sd, metadata = adapter
    old = {}
    for k, v in sd.items():
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            for new_suffix, old_suffix in ((".lora_A.weight", "down"), (".lora_B.weight", "up")):
                tail = f".{proj}{new_suffix}"
                if k.startswith("unet.") and k.endswith(tail) and ".attn" in k:
                    short = proj.replace(".0", "")
                    old[k[: -len(tail)] + f".processor.{short}_lora.{old_suffix}.weight"] = v
    parsed = parse_state_dict(old, {})
    assert len(parsed.modules["unet"]) == len(old) // 2 > 0
    assert all(n.endswith(("to_q", "to_k", "to_v", "to_out.0")) for n in parsed.modules["unet"])


UNET_NAMES = [
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q",
    "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",
    "up_blocks.0.attentions.1.proj_in",
]
ALPHA_PATTERNS = [
    {UNET_NAMES[0]: 3.0},  # full module names: what diffusers and this package write
    {"to_k": 5.0, "attn1.to_q": 7.0},  # dotted suffixes
    {"to_q": 1.0, UNET_NAMES[0]: 9.0},  # PEFT takes the first key (in file order) that matches
    {f"^{UNET_NAMES[3]}": 2.0, "^to_q": 4.0, "proj_in$": 6.0},  # anchors
    {"q": 4.0, "1.to_q": 6.0, "attentions.1": 2.0},  # part of a name segment, or not at the end: no match
]


@pytest.mark.parametrize("patterns", ALPHA_PATTERNS, ids=range(len(ALPHA_PATTERNS)))
def test_alpha_pattern_is_read_as_peft_reads_it(patterns) -> None:
    """Every module gets the alpha PEFT's own lookup (``get_pattern_key``, a regex) gives it, without a regex."""
    from peft.utils.other import get_pattern_key

    sd = {}
    for name in UNET_NAMES:
        sd[f"unet.{name}.lora_A.weight"] = torch.zeros(4, 64)
        sd[f"unet.{name}.lora_B.weight"] = torch.zeros(64, 4)
    header = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": patterns}
    parsed = parse_state_dict(sd, {METADATA_KEY: json.dumps(header)})
    for name in UNET_NAMES:
        want = patterns.get(get_pattern_key(list(patterns), name), 8)
        assert parsed.modules["unet"][name].alpha == want, name
