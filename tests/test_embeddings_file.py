"""The pivotal-tuning embeddings file loaded beside an adapter: checked as adapter tensors are, loaded all or
nothing across both text encoders and tokenizers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dora_diffusion import AdapterFileError
from helpers import assert_unchanged, make_adapter_file, max_diff, pipeline_state, render

pytestmark = pytest.mark.exactness  # "a failed load changes nothing", tokenizers and embeddings included

DIMS = {"clip_l": 32, "clip_g": 48}  # the tiny pipeline's text encoder widths


@pytest.fixture(scope="module")
def adapter_bytes(tmp_path_factory) -> bytes:
    return make_adapter_file(tmp_path_factory.mktemp("adapter"), text=False).read_bytes()


@pytest.fixture
def adapter_dir(tmp_path, adapter_bytes):
    """``make(tensors, metadata)``: a folder with an adapter file and that embeddings file beside it."""

    def make(tensors: dict, metadata: dict | None = None):
        directory = tmp_path / "run"
        directory.mkdir()
        (directory / "pytorch_lora_weights.safetensors").write_bytes(adapter_bytes)
        save_file(tensors, directory / "run_emb.safetensors", metadata)
        return directory

    return make


def good(n: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(n, d, generator=g) * 0.1 for k, d in DIMS.items()}


@pytest.mark.parametrize(
    "tensors, metadata, match",
    [
        ({**good(), "clip_l": torch.full((2, 32), float("nan"))}, None, r"clip_l contains NaN or inf"),
        ({**good(), "clip_g": torch.full((2, 48), float("inf"))}, None, r"clip_g contains NaN or inf"),
        ({**good(), "clip_g": torch.full((2, 48), 1e300, dtype=torch.float64)}, None, r"clip_g holds fp64 values beyond"),
        ({**good(), "clip_l": torch.ones(2, 32, dtype=torch.int8)}, None, r"clip_l has dtype torch.int8"),
        ({**good(), "clip_g": torch.ones(2, 48, dtype=torch.bool)}, None, r"clip_g has dtype torch.bool"),
        ({"clip_l": torch.zeros(0, 32), "clip_g": torch.zeros(0, 48)}, None, r"clip_(l|g) has shape \(0, (32|48)\).*1 to 256"),
        (good(300), None, r"has shape \(300, (32|48)\).*1 to 256"),
        (good(), {"dora_diffusion": json.dumps({"tokens": 5})}, r"'tokens' must be a list of non-empty strings"),
        (good(), {"dora_diffusion": json.dumps({"tokens": ["<a>", "<a>"]})}, r"for 2 embedding rows \(one distinct"),
        (good(), {"dora_diffusion": "[1]"}, r"metadata is not a JSON object"),
        # tokens that would change every prompt: a space, an existing word, an escape sequence
        (good(1), {"dora_diffusion": json.dumps({"tokens": [" "]})}, r"hold spaces or control characters"),
        (good(1), {"dora_diffusion": json.dumps({"tokens": ["a photo"]})}, r"hold spaces or control characters"),
        (good(1), {"dora_diffusion": json.dumps({"tokens": ["\x1b[2J"]})}, r"hold spaces or control characters"),
        (good(1), {"dora_diffusion": json.dumps({"tokens": ["a"]})}, r"tokens \['a'\] are already in tokenizer"),
        # clip_l fits, clip_g does not: before, clip_l's tokens and rows stayed behind
        ({**good(), "clip_g": torch.zeros(2, 40)}, None, r"clip_g has shape \(2, 40\); text_encoder_2 needs \(2, 48\)"),
    ],
)
def test_bad_embeddings_are_refused_and_change_nothing(adapter_dir, pipe, tensors, metadata, match) -> None:
    directory = adapter_dir(tensors, metadata)
    before = pipeline_state(pipe)  # tokenizers, embedding modules and their weights, vocab sizes: all of the pipeline
    with pytest.raises(AdapterFileError, match=match):
        pipe.load_dora_weights(directory)
    assert_unchanged(before, pipe)


def test_failure_in_the_second_encoder_puts_both_back(adapter_dir, pipe, monkeypatch, base_images) -> None:
    """An error inside diffusers' load for the second encoder (after the first was extended): both tokenizers and encoders are as
    before, embedding modules included, and the pipeline renders the base images."""
    directory = adapter_dir(good())
    before = pipeline_state(pipe)
    real = type(pipe).load_textual_inversion

    calls = []

    def flaky(self, *args, **kwargs):
        calls.append(kwargs["text_encoder"])
        if len(calls) == 2:
            raise RuntimeError("disk gone")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "load_textual_inversion", flaky)
    with pytest.raises(RuntimeError, match="disk gone"):
        pipe.load_dora_weights(directory)
    assert len(calls) == 2 and calls[0] is not calls[1]
    assert_unchanged(before, pipe)
    assert max_diff(render(pipe), base_images) == 0.0


def test_good_embeddings_load_into_both_encoders(adapter_dir, pipe) -> None:
    tensors = good()
    directory = adapter_dir(tensors)
    pipe.load_dora_weights(directory)
    for key, (enc, tok) in {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2")}.items():
        ids = getattr(pipe, tok).convert_tokens_to_ids(["<s0>", "<s1>"])
        rows = getattr(pipe, enc).get_input_embeddings().weight[ids]
        assert torch.equal(rows, tensors[key])


def test_a_token_that_is_already_a_word_is_refused(adapter_dir, pipe, monkeypatch) -> None:
    """SDXL's CLIP reads ``cat`` as the one token ``cat</w>`` (the tiny byte-level tokenizer has no merges, so it
    is told so here): adding ``cat`` would change that word in every prompt."""
    tokenize = pipe.tokenizer_2.tokenize
    monkeypatch.setattr(pipe.tokenizer_2, "tokenize", lambda text, **kw: ["a</w>"] if text == "cat" else tokenize(text, **kw))
    directory = adapter_dir(good(1), {"dora_diffusion": json.dumps({"tokens": ["cat"]})})
    before = pipeline_state(pipe)
    with pytest.raises(AdapterFileError, match=r"tokens \['cat'\] are words tokenizer_2 already reads as one token"):
        pipe.load_dora_weights(directory)
    assert_unchanged(before, pipe)
