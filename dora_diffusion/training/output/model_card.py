"""The ``README.md`` model card of a trained adapter (Hugging Face Hub format, YAML front matter).

Text from the dataset (trigger words, the prompt) and from flags is written as code spans (``code``) and YAML/JSON
strings, so no caption can add Markdown or HTML to the page the Hub renders; local paths appear as their last part.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from dora_diffusion.training.args import SDXL_BASE
from dora_diffusion.training.output.hub import public_value

CARD_NAMES = ("README.md", "model_card.md")
"""Where the card goes: README.md (what the Hub shows), or model_card.md when README.md is the user's."""

CARD_SETTINGS = (
    ("adapter", "adapter"),
    ("rank", "rank"),
    ("alpha", "alpha"),
    ("rslora", "rsLoRA"),
    ("dropout", "dropout"),
    ("unet_targets", "UNet targets"),
    ("train_text_encoder", "text encoders trained"),
    ("text_encoder_targets", "text-encoder targets"),
    ("optimizer", "optimizer"),
    ("learning_rate", "learning rate"),
    ("text_encoder_lr", "text-encoder learning rate"),
    ("lr_scheduler", "lr schedule"),
    ("lr_warmup_steps", "warm-up steps"),
    ("max_train_steps", "steps"),
    ("train_batch_size", "batch size per process"),
    ("gradient_accumulation_steps", "gradient accumulation"),
    ("num_processes", "processes"),
    ("resolution", "resolution"),
    ("mixed_precision", "mixed precision"),
    ("snr_gamma", "Min-SNR gamma"),
    ("noise_offset", "noise offset"),
    ("loss_type", "loss"),
    ("huber_c", "Huber c"),
    ("huber_schedule", "Huber schedule"),
    ("min_timestep", "lowest timestep"),
    ("max_timestep", "timesteps below"),
    ("use_ema", "EMA of the adapter (the file holds it)"),
    ("ema_decay", "EMA decay"),
    ("loraplus_lr_ratio", "LoRA+ ratio (B's learning rate / A's)"),
    ("caption_dropout_rate", "caption dropout"),
    ("shuffle_caption", "shuffled caption tags"),
    ("keep_tokens", "tags kept in front"),
    ("with_prior_preservation", "prior preservation"),
    ("seed", "seed"),
    ("pretrained_vae_model_name_or_path", "VAE"),
    ("dataset", "dataset"),
)


_HIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")
"""Control, line-separator, zero-width and bidi characters: shown escaped (``\\u202e``), never as themselves."""


def code(value: object, table: bool = False) -> str:
    """``value`` as one Markdown code span: hidden characters escaped, a fence longer than any run of backticks in
    it; with ``table``, ``|`` escaped so it stays in its cell."""
    text = _HIDDEN.sub(lambda m: m[0].encode("unicode_escape").decode("ascii"), str(value))
    if table:
        text = text.replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _yaml(value: str) -> str:
    """A YAML scalar (JSON strings are valid YAML), hidden characters escaped (``\\u202e``)."""
    return _HIDDEN.sub(lambda m: f"\\u{ord(m[0]):04x}", json.dumps(value, ensure_ascii=False))


def _front_matter(settings: dict, trigger_words: list[str], validation_images: list[str], prompt: str) -> list[str]:
    """The card's YAML header: base model, license, the Hub widget's trigger and images."""
    base = settings["pretrained_model_name_or_path"]
    kind = settings["adapter"]
    front = ["---", "library_name: diffusers"]
    if not Path(base).exists() and public_value(base) == base:  # a Hub id; a local folder means nothing on the Hub
        front.insert(1, f"base_model: {_yaml(base)}")
    if base == SDXL_BASE:
        front.append("license: openrail++")
    instance = settings.get("instance_prompt") or " ".join(trigger_words)
    if instance:  # what the Hub's widget and its "trigger" field show
        front.append(f"instance_prompt: {_yaml(instance)}")
    front += ["tags:", *(f"- {t}" for t in ("text-to-image", "diffusers", "stable-diffusion-xl", kind, "dora-diffusion", "template:sd-lora"))]
    if validation_images:
        front.append("widget:")
        for path in validation_images:
            front += [f"- text: {_yaml(prompt)}", "  output:", f"    url: {_yaml(path)}"]
    front.append("---")
    return front


def _trigger_note(settings: dict, repo_id: str, trigger_words: list[str], embeddings: str | None = None) -> str:
    """How to prompt: the trigger words, and where pivotal tuning's embeddings are (the file ``embeddings``; None:
    ``<output folder name>_emb.safetensors``)."""
    triggers = (
        "Trigger words: " + ", ".join(code(w) for w in trigger_words) + " (use them in the prompt)."
        if trigger_words
        else "No trigger word was detected in the captions; prompt as the training captions do."
    )
    if settings.get("train_text_encoder_ti"):
        emb = embeddings or f"{Path(settings.get('output_dir') or repo_id).name}_emb.safetensors"
        triggers += (
            f"\n\nPivotal tuning: the trigger tokens are new; their embeddings are in `{emb}` (`clip_l`, `clip_g`), "
            "which `load_dora_weights` loads with the adapter. With diffusers alone: "
            f"`pipe.load_textual_inversion(state_dict[\"clip_l\"], token={trigger_words[0] and _tokens(trigger_words)!r}, "
            "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)`, and `clip_g` with `text_encoder_2`/`tokenizer_2`; "
            "A1111 and ComfyUI read the file as an embedding."
        )
    return triggers


def _settings_table(settings: dict) -> list[str]:
    """The training settings worth showing, as Markdown table rows."""
    rows = ["| setting | value |", "|---|---|"]
    text_encoder_keys = ("text_encoder_targets", "text_encoder_lr")
    huber = settings.get("loss_type") in ("huber", "smooth_l1")
    unused = {"ema_decay": not settings.get("use_ema"), "loss_type": settings.get("loss_type", "l2") == "l2",
              "huber_c": not huber, "huber_schedule": not huber}  # fmt: skip
    for key, name in CARD_SETTINGS:
        if key in text_encoder_keys and not settings.get("train_text_encoder"):
            continue
        if unused.get(key, False):
            continue
        if key in ("adapter", "rank", "seed") or settings.get(key) not in (None, False, "", 0, 0.0):
            rows.append(f"| {name} | {code(public_value(settings.get(key)), table=True)} |")
    return rows


def model_card(
    settings: dict,
    repo_id: str,
    trigger_words: list[str],
    validation_images: list[str],
    parameter_summary: str,
    exports: list[str] = (),
    embeddings: str | None = None,
) -> str:
    """The card text. ``repo_id`` is what the snippet loads (a Hub id or the output folder);
    ``validation_images`` are paths relative to the card; ``exports`` the names of the ``_kohya`` / ``_comfyui``
    files written beside the weights; ``embeddings`` the name of pivotal tuning's embeddings file (the run's
    ``embeddings_name``; None: ``<output folder name>_emb.safetensors``)."""
    shown_base = public_value(settings["pretrained_model_name_or_path"])
    kind = settings["adapter"]
    label = {"dora": "DoRA", "full": "full fine-tuning (FT, written as an exact LoRA)"}.get(kind, "LoRA")
    prompt = settings.get("validation_prompt") or settings.get("instance_prompt") or " ".join(trigger_words) or "a photo"
    front = _front_matter(settings, trigger_words, validation_images, prompt)
    title = f"SDXL {label} adapter: {Path(repo_id).name}"
    triggers = _trigger_note(settings, repo_id, trigger_words, embeddings)
    te_note = (
        "The text encoders were trained too. diffusers' own `load_lora_weights` drops text-encoder DoRA "
        "magnitudes under transformers 5, so load it with dora-diffusion as above."
        if settings.get("train_text_encoder") and kind == "dora"
        else "diffusers' own `pipe.load_lora_weights(...)` reads this file too (it needs `pip install peft`)."
    )
    rows = _settings_table(settings)
    gallery = "\n".join(f"![validation image {i}]({p})" for i, p in enumerate(validation_images))
    body = f"""
# {title}

A {label} adapter for {code(shown_base)}, trained with DreamBooth by dora-diffusion's `train_dreambooth_dora.py`.

{triggers}

## Use it

```python
import torch
import dora_diffusion  # adds load_dora_weights and friends to diffusers pipelines
from diffusers import StableDiffusionXLPipeline

{_load_line(shown_base, settings.get("mixed_precision"))}
pipe.load_dora_weights({repo_id!r})
image = pipe({prompt!r}, num_inference_steps=30).images[0]
image.save("out.png")
```

{te_note} The weights are `pytorch_lora_weights.safetensors` (diffusers/PEFT layout).{_exports_note(exports)}

## Validation images

{("Prompt: " + code(prompt) + chr(10) + chr(10) + gallery) if validation_images else "No validation prompt was given."}

## Training settings

{parameter_summary}

{chr(10).join(rows)}
"""
    return "\n".join(front) + "\n" + body


SNIPPET_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
"""The snippet loads the base in the precision the run trained in (``mixed_precision``), on the GPU it needed."""


def _load_line(base: str, mixed_precision: str | None) -> str:
    """The snippet's ``from_pretrained`` line: a half-precision run (a GPU's) in its dtype on ``cuda``; a float32 run
    (the CPU's, e.g. the toy world) in float32 on whatever device the reader has, since float16 on a CPU is slow
    or fails."""
    dtype = SNIPPET_DTYPES.get(mixed_precision or "")
    if dtype:
        return f'pipe = StableDiffusionXLPipeline.from_pretrained({base!r}, torch_dtype=torch.{dtype}).to("cuda")'
    return (
        'device = "cuda" if torch.cuda.is_available() else "cpu"  # trained in float32 (mixed_precision no)\n'
        f"pipe = StableDiffusionXLPipeline.from_pretrained({base!r}, torch_dtype=torch.float32).to(device)"
    )


EXPORT_NOTES = {
    "_kohya.safetensors": "kohya/LyCORIS key names, exact in LyCORIS and kohya's scripts",
    "_comfyui.safetensors": "for ComfyUI and Forge: kohya names, its `dora_scale` written for their DoRA rule so they "
    "render it as dora-diffusion does (`load_dora_weights` reads it too)",
}


def _exports_note(exports: list[str]) -> str:
    """One line per export file: its name and which programs it is for."""
    lines = [f"- `{name}`: {note}" for name in exports for suffix, note in EXPORT_NOTES.items() if name.endswith(suffix)]
    return ("\n\nAlso in this folder:\n\n" + "\n".join(lines)) if lines else ""


def _tokens(trigger_words: list[str]) -> list[str]:
    """``["<s0><s1>"]`` -> ``["<s0>", "<s1>"]``."""
    import re

    return [t for w in trigger_words for t in re.findall(r"<[^<>]+>", w)]


def write_model_card(path: str | Path, text: str) -> Path:
    """Write the card to ``path`` (one of ``CARD_NAMES`` in the output folder)."""
    path = Path(path)
    path.write_text(text, encoding="utf-8")
    return path
