"""Pivotal tuning (diffusers' ``--train_text_encoder_ti``): new tokens whose embeddings train with the adapter.

Each ``--token_abstraction`` word (``TOK``) in the captions becomes ``--num_new_tokens_per_abstraction`` new
tokens (``<s0><s1>``) added to both CLIP tokenizers. Their embedding rows, one per token in each text encoder,
start as Gaussian noise with the standard deviation of the existing rows (as diffusers) and are trained for the
first ``--train_text_encoder_ti_frac`` of the steps, then frozen. The existing rows never change: the new rows
live in their own parameter (``NewTokenEmbedding``), so the optimizer holds state for n x d values, not for the
whole 49408 x d table.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from dora_diffusion.training.data.sampling import ADAPTER_INIT, derive_seed
from dora_diffusion.training.models import Components

EMBEDDINGS = ("text_encoder", "text_encoder_2")
"""The text encoders that get new rows; the parameter of each is named ``<encoder>.token_embedding.new``."""


def token_plan(abstractions: str, per_abstraction: int) -> dict[str, list[str]]:
    """``"TOK"``, 2 -> ``{"TOK": ["<s0>", "<s1>"]}``; further comma-separated words continue the numbering."""
    words = [w.strip() for w in abstractions.split(",") if w.strip()]
    if not words:
        raise ValueError("--token_abstraction is empty")
    if per_abstraction < 1:
        raise ValueError(f"--num_new_tokens_per_abstraction must be at least 1, got {per_abstraction}")
    return {w: [f"<s{k * per_abstraction + i}>" for i in range(per_abstraction)] for k, w in enumerate(words)}


def _word(word: str) -> str:
    """A regex matching ``word`` as a whole word (not inside another word or a ``<token>``)."""
    return rf"(?<![\w<]){re.escape(word)}(?![\w>])"


def mentions(text: str, word: str) -> bool:
    """True if ``text`` holds ``word`` as a whole word (as ``replace_abstractions`` would replace it)."""
    return re.search(_word(word), text) is not None


def replace_abstractions(text: str, new_tokens: dict[str, list[str]]) -> str:
    """Every whole-word occurrence of an abstraction replaced by its tokens: ``"a TOK icon"`` -> ``"a <s0><s1> icon"``."""
    for word, tokens in new_tokens.items():
        text = re.sub(_word(word), "".join(tokens), text)
    return text


class NewTokenEmbedding(nn.Module):
    """A token embedding with ``n`` new rows after the ``V`` rows of ``base``: ids ``>= V`` read ``new``.

    ``forward(ids) = base(ids)`` where ``ids < V``, ``new[ids - V]`` elsewhere; gradients reach ``new`` only.
    ``new`` (fp32) lives in a child module registered after ``base``, so the text encoder's first parameter, which
    transformers reads as the model's dtype, stays the base table.
    """

    def __init__(self, base: nn.Embedding, new: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.extra = nn.Embedding.from_pretrained(new, freeze=False)

    @property
    def new(self) -> nn.Parameter:
        """The new rows, (n, dim) fp32."""
        return self.extra.weight

    @property
    def weight(self) -> torch.Tensor:
        """The whole table (V + n rows), for code that reads ``get_input_embeddings().weight``."""
        return torch.cat([self.base.weight, self.new.to(self.base.weight.dtype)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        v = self.base.num_embeddings
        out = F.embedding(ids.clamp(max=v - 1), self.base.weight)
        extra = F.embedding((ids - v).clamp(min=0), self.new.to(out.dtype))
        return torch.where((ids >= v).unsqueeze(-1), extra, out)


def add_new_tokens(
    components: Components, new_tokens: dict[str, list[str]], seed: int
) -> list[tuple[str, nn.Parameter]]:
    """Add ``new_tokens`` (``{word: tokens}`` from ``token_plan``) to both tokenizers and their (fp32, trainable)
    rows to both text encoders.

    Returns ``[("text_encoder.token_embedding.new", p), ("text_encoder_2.token_embedding.new", p2)]``.
    """
    tokens = [t for ts in new_tokens.values() for t in ts]
    named = []
    g = torch.Generator().manual_seed(derive_seed(seed, ADAPTER_INIT, 1))
    for name, tokenizer in zip(EMBEDDINGS, (components.tokenizer, components.tokenizer_2)):
        encoder = getattr(components, name)
        base = encoder.get_input_embeddings()
        taken = [t for t in tokens if t in tokenizer.get_vocab()]
        if taken:
            raise ValueError(f"pivotal tuning: tokens {taken} are already in {name}'s tokenizer")
        if len(tokenizer) != base.num_embeddings:
            raise ValueError(
                f"pivotal tuning: {name}'s tokenizer has {len(tokenizer)} tokens but its embedding {base.num_embeddings} rows"
            )
        tokenizer.add_tokens(tokens)
        ids = tokenizer.convert_tokens_to_ids(tokens)
        if ids != list(range(base.num_embeddings, base.num_embeddings + len(tokens))):
            raise ValueError(f"pivotal tuning: {name}'s tokenizer gave the new tokens ids {ids}")
        std = float(base.weight.float().std())
        init = torch.randn(len(tokens), base.embedding_dim, generator=g) * std
        wrapper = NewTokenEmbedding(base, init.to(base.weight.device))
        encoder.set_input_embeddings(wrapper)
        named.append((f"{name}.token_embedding.new", wrapper.new))
    return named


def new_token_rows(components: Components) -> dict[str, torch.Tensor]:
    """``{"clip_l": (n, 768), "clip_g": (n, 1280)}``: the trained rows, as the embeddings file holds them."""
    rows = {}
    for key, name in zip(("clip_l", "clip_g"), EMBEDDINGS):
        rows[key] = getattr(components, name).get_input_embeddings().new.detach()
    return rows


def ti_steps(max_steps: int, frac: float) -> int:
    """Steps during which the new embeddings train: ``ceil(frac * max_steps)``."""
    return math.ceil(frac * max_steps)
