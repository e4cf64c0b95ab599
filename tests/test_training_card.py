"""The model card of a trained adapter (README.md with Hub front matter)."""

from __future__ import annotations

from dora_diffusion.training import parse_args
from dora_diffusion.training.model_card import model_card


def test_model_card_for_a_hub_base():
    settings = vars(parse_args(["--dataset", "linoyts/3d_icon", "--train_text_encoder", "--validation_prompt", "a TOK icon"]))
    card = model_card(settings, "me/3d-icon", ["TOK"], ["validation/step-500/00.png"], "trainable parameters: 1")
    front = card.split("---")[1]
    assert 'base_model: "stabilityai/stable-diffusion-xl-base-1.0"' in front and "license: openrail++" in front
    assert '- text: "a TOK icon"' in front and 'url: "validation/step-500/00.png"' in front
    assert "pipe.load_dora_weights('me/3d-icon')" in card and "| text-encoder learning rate | `5e-06` |" in card
    assert "drops text-encoder DoRA magnitudes" in card
