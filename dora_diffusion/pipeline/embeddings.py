"""Textual-inversion embeddings that come with an adapter (pivotal tuning): the ``*_emb.safetensors`` file.

The file is the one diffusers' advanced SDXL script writes and A1111, ComfyUI and diffusers'
``load_textual_inversion`` read: ``clip_l`` (n, 768) for ``text_encoder`` and ``clip_g`` (n, 1280) for
``text_encoder_2``, one row per new token. Ours also names the tokens in its metadata
(``{"dora_diffusion": {"tokens": ["<s0>", "<s1>"], "token_abstraction": {"TOK": "<s0><s1>"}}}``); without that,
the tokens are ``<s0>``, ``<s1>``, ... as diffusers' script makes them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from dora_diffusion.formats.safefile import AdapterFileError, check_floats, read_safetensors, shown, write_safetensors

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


MAX_TOKENS = 256
"""Most tokens an embeddings file may add (pivotal tuning trains a handful; CLIP reads 77 a prompt)."""
MAX_TOKEN_CHARS = 100
"""Longest token name accepted from a file's metadata."""


def _tokens(path: Path, metadata: dict[str, str], n: int) -> list[str]:
    """The tokens the file's metadata names for its ``n`` rows, or ``<s0>``, ``<s1>``, ... when it names none."""
    try:
        info = json.loads(metadata.get("dora_diffusion", "{}"))
    except (ValueError, RecursionError):
        raise AdapterFileError(f"{path}: its dora_diffusion metadata is not JSON") from None
    if not isinstance(info, dict):
        raise AdapterFileError(f"{path}: its dora_diffusion metadata is not a JSON object")
    tokens = info.get("tokens") or [f"<s{i}>" for i in range(n)]
    if not isinstance(tokens, list) or not all(isinstance(t, str) and 0 < len(t) <= MAX_TOKEN_CHARS for t in tokens):
        raise AdapterFileError(
            f"{path}: metadata 'tokens' must be a list of non-empty strings of at most {MAX_TOKEN_CHARS} characters, "
            f"got {shown(tokens)}"
        )
    spaced = [t for t in tokens if not t.isprintable() or any(c.isspace() for c in t)]
    if spaced:
        raise AdapterFileError(f"{path}: tokens {shown(spaced)} hold spaces or control characters; a token is one word")
    if len(tokens) != n or len(set(tokens)) != n:
        raise AdapterFileError(f"{path}: metadata names tokens {shown(tokens)} for {n} embedding rows (one distinct token a row)")
    return tokens


def read_embeddings(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The file's ``clip_l`` / ``clip_g`` tensors and its tokens (``<s0>``, ``<s1>``, ... when it names none).

    Checked as adapter tensors are: floating point, finite in fp32, (n, dim) with the same n >= 1 (at most
    ``MAX_TOKENS``) in both, one distinct token name per row.
    """
    path = Path(path)
    tensors, metadata = read_safetensors(path)
    unknown = sorted(set(tensors) - set(ENCODERS))
    if unknown or not tensors:
        raise AdapterFileError(f"{path}: an embeddings file holds clip_l and clip_g, found {shown(sorted(tensors))}")
    for key, t in tensors.items():
        check_floats(f"{path}: embeddings {key}", t)
        if t.dim() != 2 or not 1 <= t.shape[0] <= MAX_TOKENS:
            raise AdapterFileError(
                f"{path}: embeddings {key} has shape {tuple(t.shape)}; expected (tokens, dim) with 1 to {MAX_TOKENS} tokens"
            )
    rows = {t.shape[0] for t in tensors.values()}
    if len(rows) != 1:
        raise AdapterFileError(f"{path}: clip_l and clip_g must have the same number of rows (tokens), got {sorted(rows)}")
    (n,) = rows
    return tensors, _tokens(path, metadata, n)


def _is_a_word(tokenizer, token: str) -> bool:
    """True if ``tokenizer`` already reads ``token`` as one known token (``cat`` -> ``cat</w>``)."""
    pieces = tokenizer.tokenize(token)
    return len(pieces) == 1 and tokenizer.convert_tokens_to_ids(pieces[0]) != tokenizer.unk_token_id


def _snapshot(encoder, tokenizer) -> tuple:
    """What loading embeddings changes: the embedding module (transformers' resize swaps its weight Parameter, or
    that Parameter's data, in place), the vocab size in the config, the tokenizer."""
    emb = encoder.get_input_embeddings()
    weight = (emb.weight, emb.weight.data, emb.num_embeddings, emb.padding_idx)
    return emb, weight, encoder.config.vocab_size, copy.deepcopy(tokenizer.__dict__)


def _restore(encoder, tokenizer, state: tuple) -> None:
    emb, (weight, data, num_embeddings, padding_idx), vocab_size, tokenizer_state = state
    weight.data = data
    emb.weight, emb.num_embeddings, emb.padding_idx = weight, num_embeddings, padding_idx
    encoder.set_input_embeddings(emb)
    encoder.config.vocab_size = vocab_size
    tokenizer.__dict__.clear()
    tokenizer.__dict__.update(tokenizer_state)


def load_embeddings(pipe, path: str | Path) -> list[str]:
    """Add the file's tokens to both tokenizers and their rows to both text encoders (diffusers'
    ``load_textual_inversion``, as its docs load this file); returns the tokens.

    All or nothing: every tensor is checked against its text encoder first, and on any error both encoders'
    embedding modules and vocab sizes and both tokenizers are put back as they were.
    """
    tensors, tokens = read_embeddings(path)
    pairs = {}
    for key, tensor in tensors.items():
        encoder_attr, tokenizer_attr = ENCODERS[key]
        encoder, tokenizer = getattr(pipe, encoder_attr, None), getattr(pipe, tokenizer_attr, None)
        if encoder is None or tokenizer is None:
            raise AdapterFileError(f"{path}: embeddings {key} are for {encoder_attr}, which {type(pipe).__name__} does not have")
        dim = encoder.get_input_embeddings().weight.shape[1]
        if tensor.shape[1] != dim:
            raise AdapterFileError(
                f"{path}: embeddings {key} has shape {tuple(tensor.shape)}; {encoder_attr} needs ({len(tokens)}, {dim})"
            )
        tensor = tensor.to(encoder.dtype)
        if not torch.isfinite(tensor).all():
            raise AdapterFileError(f"{path}: embeddings {key} overflow {encoder_attr}'s dtype {encoder.dtype}")
        taken = [t for t in tokens if t in tokenizer.get_vocab() or f"{t}_1" in tokenizer.get_vocab()]
        if taken:
            raise AdapterFileError(f"{path}: tokens {taken} are already in {tokenizer_attr} (is its adapter loaded already?)")
        words = [t for t in tokens if _is_a_word(tokenizer, t)]
        if words:
            raise AdapterFileError(
                f"{path}: tokens {shown(words)} are words {tokenizer_attr} already reads as one token; adding them would "
                "change that word in every prompt (pivotal tuning uses new tokens such as '<s0>')"
            )
        pairs[key] = (encoder, tokenizer, tensor)
    saved = {key: _snapshot(encoder, tokenizer) for key, (encoder, tokenizer, _) in pairs.items()}
    try:
        for encoder, tokenizer, tensor in pairs.values():
            pipe.load_textual_inversion(tensor, token=list(tokens), text_encoder=encoder, tokenizer=tokenizer)
    except BaseException:
        for key, (encoder, tokenizer, _) in pairs.items():
            _restore(encoder, tokenizer, saved[key])
        raise
    return tokens


def unload_embeddings(pipe, tokens: list[str], keys: list[str] | None = None) -> None:
    """Remove ``tokens`` from the tokenizers and their rows from the text encoders."""
    for key in keys if keys is not None else list(ENCODERS):
        encoder_attr, tokenizer_attr = ENCODERS[key]
        tokenizer = getattr(pipe, tokenizer_attr)
        if any(t in tokenizer.get_vocab() for t in tokens):
            pipe.unload_textual_inversion(tokens=list(tokens), tokenizer=tokenizer, text_encoder=getattr(pipe, encoder_attr))
