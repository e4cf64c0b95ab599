"""Textual-inversion embeddings that come with an adapter (pivotal tuning): the ``*_emb.safetensors`` file.

The file is the one diffusers' advanced SDXL script writes and A1111, ComfyUI and diffusers'
``load_textual_inversion`` read: ``clip_l`` (n, 768) for ``text_encoder`` and ``clip_g`` (n, 1280) for
``text_encoder_2``, one row per new token. Ours also names the tokens in its metadata
(``{"dora_diffusion": {"tokens": ["<s0>", "<s1>"], "token_abstraction": {"TOK": "<s0><s1>"}}}``); without that,
the tokens are ``<s0>``, ``<s1>``, ... as diffusers' script makes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .formats.safefile import AdapterFileError, read_safetensors, write_safetensors

EMB_SUFFIX = "_emb.safetensors"
ENCODERS = {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2")}
"""File key -> (text encoder, tokenizer) attribute of an SDXL pipeline."""


def embeddings_name(output_name: str) -> str:
    """``<output name>_emb.safetensors``."""
    return f"{output_name}{EMB_SUFFIX}"


def find_embeddings(directory: str | Path) -> Path | None:
    """The one ``*_emb.safetensors`` regular file in ``directory``, or None; several is an error."""
    found = sorted(p for p in Path(directory).glob(f"*{EMB_SUFFIX}") if p.is_file())
    if len(found) > 1:
        raise AdapterFileError(f"{directory} holds several embeddings files ({', '.join(p.name for p in found)})")
    return found[0] if found else None


def write_embeddings(path: str | Path, tensors: dict[str, torch.Tensor], tokens: list[str], abstraction: dict[str, str]) -> Path:
    """Write ``{"clip_l": (n, d1), "clip_g": (n, d2)}`` for ``tokens`` (n of them) to ``path``."""
    for key, t in tensors.items():
        if key not in ENCODERS or t.dim() != 2 or t.shape[0] != len(tokens):
            raise ValueError(f"embeddings {key}: expected ({len(tokens)}, dim) for tokens {tokens}, got {tuple(t.shape)}")
    header = {"dora_diffusion": json.dumps({"tokens": tokens, "token_abstraction": abstraction})}
    return write_safetensors({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, Path(path), header)


def read_embeddings(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The file's ``clip_l`` / ``clip_g`` tensors and its tokens (``<s0>``, ``<s1>``, ... when it names none)."""
    tensors, metadata = read_safetensors(Path(path))
    unknown = sorted(set(tensors) - set(ENCODERS))
    if unknown or not tensors:
        raise AdapterFileError(f"{path}: an embeddings file holds clip_l and clip_g, found {sorted(tensors)}")
    rows = {t.shape[0] if t.dim() == 2 else -1 for t in tensors.values()}
    if len(rows) != 1 or -1 in rows:
        raise AdapterFileError(f"{path}: clip_l and clip_g must be (tokens, dim) with the same number of tokens")
    (n,) = rows
    try:
        tokens = json.loads(metadata.get("dora_diffusion", "{}")).get("tokens") or [f"<s{i}>" for i in range(n)]
    except (ValueError, AttributeError):
        raise AdapterFileError(f"{path}: its dora_diffusion metadata is not a JSON object") from None
    if len(tokens) != n or not all(isinstance(t, str) and t for t in tokens):
        raise AdapterFileError(f"{path}: metadata names tokens {tokens!r} for {n} embedding rows")
    return tensors, tokens


def load_embeddings(pipe, path: str | Path) -> list[str]:
    """Add the file's tokens to both tokenizers and their rows to both text encoders (diffusers'
    ``load_textual_inversion``, as its docs load this file); returns the tokens."""
    tensors, tokens = read_embeddings(path)
    taken = [t for t in tokens if t in pipe.tokenizer.get_vocab()]
    if taken:
        raise AdapterFileError(f"{path}: tokens {taken} are already in the tokenizer (is its adapter loaded already?)")
    done = []
    try:
        for key, tensor in tensors.items():
            encoder_attr, tokenizer_attr = ENCODERS[key]
            encoder, tokenizer = getattr(pipe, encoder_attr), getattr(pipe, tokenizer_attr)
            pipe.load_textual_inversion(tensor.to(encoder.dtype), token=list(tokens), text_encoder=encoder, tokenizer=tokenizer)
            done.append(key)
    except BaseException:
        unload_embeddings(pipe, tokens, [k for k in done])
        raise
    return tokens


def unload_embeddings(pipe, tokens: list[str], keys: list[str] | None = None) -> None:
    """Remove ``tokens`` from the tokenizers and their rows from the text encoders."""
    for key in keys if keys is not None else list(ENCODERS):
        encoder_attr, tokenizer_attr = ENCODERS[key]
        tokenizer = getattr(pipe, tokenizer_attr)
        if any(t in tokenizer.get_vocab() for t in tokens):
            pipe.unload_textual_inversion(tokens=list(tokens), tokenizer=tokenizer, text_encoder=getattr(pipe, encoder_attr))
