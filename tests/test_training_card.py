"""The model card of a trained adapter (README.md with Hub front matter)."""

from __future__ import annotations

from dora_diffusion.training import parse_args
from dora_diffusion.training.output.model_card import model_card


def test_model_card_for_a_hub_base():
    settings = vars(parse_args(["--dataset", "linoyts/3d_icon", "--train_text_encoder", "--validation_prompt", "a TOK icon"]))
    card = model_card(settings, "me/3d-icon", ["TOK"], ["validation/step-500/00.png"], "trainable parameters: 1")
    front = card.split("---")[1]
    assert 'base_model: "stabilityai/stable-diffusion-xl-base-1.0"' in front and "license: openrail++" in front
    assert '- text: "a TOK icon"' in front and 'url: "validation/step-500/00.png"' in front
    assert "pipe.load_dora_weights('me/3d-icon')" in card and "| text-encoder learning rate | `5e-06` |" in card
    assert "drops text-encoder DoRA magnitudes" in card


def test_captions_cannot_add_markdown_html_or_local_paths_to_the_card():
    """Issue 27 adversarial pass: a caption (here the validation prompt, as when no trigger is found) with
    backticks, HTML, a remote image and blank lines stays one code span; local paths show as their last part."""
    from markdown_it import MarkdownIt

    prompt = "a dog` <img src=x onerror=alert(1)> ![t](https://evil.example/p.png) `\n\n# Owned\n\u202eevil"
    settings = {"pretrained_model_name_or_path": "/home/me/models/sdxl", "adapter": "dora", "rank": 4, "seed": 0,
                "validation_prompt": prompt, "dataset": "/home/me/secret/photos|x"}  # fmt: skip
    card = model_card(settings, "me/x", ["a `b` <i>c</i>"], ["validation/step-2/00.png"], "params")
    tokens = MarkdownIt("commonmark").enable("table").parse(card.split("\n---\n", 1)[1])
    inline = [c for t in tokens for c in t.children or []]
    assert not {t.type for t in tokens + inline} & {"html_inline", "html_block"}
    assert [c.attrs["src"] for c in inline if c.type == "image"] == ["validation/step-2/00.png"]  # the gallery only
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert headings == ["SDXL DoRA adapter: x", "Use it", "Validation images", "Training settings"]
    assert "/home/me" not in card and "\u202e" not in card and "\\u202e" in card
    assert "Trigger words: ``a `b` <i>c</i>``" in card and "| dataset | `photos\\|x` |" in card
