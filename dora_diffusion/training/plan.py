"""What a run will do, worked out from its config and its data before any model loads: the trigger words, pivotal
tuning's new tokens, the schedule, and the files it will write."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from dora_diffusion.training.config import TrainConfig
from dora_diffusion.training.data.records import DatasetError, trigger_words
from dora_diffusion.training.output.validation import validation_folder
from dora_diffusion.training.step.pivotal import mentions, replace_abstractions, token_plan

logger = logging.getLogger(__name__)


def resolve_triggers(config: TrainConfig, captions: list[str]) -> list[str]:
    """``--trigger``, else what the captions teach (``trigger_words``); warns where a prompt names a trigger the
    captions never hold (a diffusers command written for 3d_icon's old "TOK" captions, say)."""
    found = trigger_words(captions)
    triggers = [config.trigger] if config.trigger else found
    if config.trigger and not any(config.trigger in c for c in captions):
        logger.warning("--trigger %r appears in none of the %d captions; the adapter learns what the captions say", config.trigger, len(captions))
    for flag in ("instance_prompt", "validation_prompt"):
        prompt = getattr(config, flag)
        if not prompt or prompt.lower() == "none":
            continue
        unseen = [w for w in trigger_words([prompt]) if not any(w in c for c in captions)]
        if unseen and (flag == "validation_prompt" or all(c != prompt for c in captions)):
            logger.warning(
                "--%s %r names %s, which no caption holds: the model never saw it (the captions' trigger is %s)",
                flag, prompt, ", ".join(unseen), ", ".join(repr(t) for t in found) or "none",
            )  # fmt: skip
    return triggers


def apply_token_plan(config: TrainConfig, records: list) -> tuple[dict[str, list[str]], str | None]:
    """Pivotal tuning: replace each ``--token_abstraction`` word by its new tokens in the captions; returns
    ``{word: its new tokens}`` and ``--validation_prompt`` with the same replacement. A word no caption holds is an
    error (its tokens would never train)."""
    new_tokens = token_plan(config.token_abstraction, config.num_new_tokens_per_abstraction)
    captions = [r.caption for r in records]
    for word in new_tokens:
        if not any(mentions(c, word) for c in captions):
            found = trigger_words(captions)
            raise DatasetError(
                f"--train_text_encoder_ti: --token_abstraction {word!r} appears in none of the {len(captions)} captions, "
                "so its new tokens would never be trained"
                + (f". The captions' own trigger is {found[0]!r}: pass --token_abstraction {found[0].split()[-1]!r}" if found else "")
                + (" (linoyts/3d_icon's captions say 'a 3dicon' since 2024-08-14; --dataset_revision "
                   "6e1cf947876b1ec5b34daf6a99f11433d87791f5 has the old 'TOK' ones)" if "3d_icon" in str(config.dataset) else "")
            )  # fmt: skip
    for r in records:
        r.caption = replace_abstractions(r.caption, new_tokens)
    prompt = config.validation_prompt
    return new_tokens, replace_abstractions(prompt, new_tokens) if prompt else prompt


@dataclass(frozen=True)
class Schedule:
    """How long a run is: micro-batches per epoch, optimizer steps, and validation every ``validation_steps``."""

    per_epoch: int
    max_train_steps: int
    validation_steps: int | None


def resolve_schedule(config: TrainConfig, num_images: int, num_processes: int, per_epoch: int | None = None) -> Schedule:
    """The schedule: ``--max_train_steps`` (from ``--num_train_epochs`` if not given) and ``--validation_steps`` (from
    diffusers' ``--validation_epochs`` if not given), with the micro-batches per epoch.

    An epoch is ``num_images * repeats`` samples: ``ceil(samples / (batch * processes))`` micro-batches, and
    ``ceil(micro-batches / accumulation)`` optimizer steps. With buckets, pass their ``per_epoch``.
    """
    per_epoch = per_epoch or -(-num_images * config.repeats // (config.train_batch_size * num_processes))
    steps_per_epoch = math.ceil(per_epoch / config.gradient_accumulation_steps)
    max_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    every = config.validation_steps
    if every is None and config.validation_epochs is not None:
        every = config.validation_epochs * steps_per_epoch
    return Schedule(per_epoch, max_steps, every)


EXPORTS = {"export_kohya": "kohya", "export_comfyui": "comfyui"}
"""Flag -> format of the extra files a run writes beside ``pytorch_lora_weights.safetensors``."""


def export_name(stem: str, format: str) -> str:
    """``<stem>_<format>.safetensors``: ``_kohya`` (``--export_kohya``), ``_comfyui`` (``--export_comfyui``). The stem
    is the output folder's name (``TrainingRun.export_stem``; a pair's half: ``pair.half_export_stem``)."""
    return f"{stem}_{format}.safetensors"


def exports(config: TrainConfig, stem: str) -> dict[str, str]:
    """``{file name: format}`` of the exports this run writes, named ``<stem>_<format>.safetensors``."""
    return {export_name(stem, fmt): fmt for flag, fmt in EXPORTS.items() if getattr(config, flag, False)}


def inside_output(rel: str) -> bool:
    """True if ``rel`` is a plain relative path (no ``..``), so it stays inside the output folder."""
    return not Path(rel).is_absolute() and ".." not in Path(rel).parts and Path(rel).parts != ()


def planned_outputs(config: TrainConfig, output_dir: Path, stem: str | None = None) -> list[str]:
    """Paths (relative to ``output_dir``) this run will write whose names are fixed in advance (exports named after
    ``stem``, None: the folder's name)."""
    outputs = list(exports(config, stem or output_dir.resolve().name))
    if config.validation_prompt and (output_dir / "validation").is_dir():  # the existing validation/step-N that it will write
        every = config.validation_steps or config.max_train_steps
        for child in sorted((output_dir / "validation").iterdir()):
            m = re.fullmatch(r"step-([1-9][0-9]{0,9})", child.name)
            if m and int(m[1]) <= config.max_train_steps and (int(m[1]) % every == 0 or int(m[1]) == config.max_train_steps):
                outputs.append(validation_folder(int(m[1])))
    return outputs
