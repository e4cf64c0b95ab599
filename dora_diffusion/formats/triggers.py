"""Trigger words from an adapter file's header, in whichever dialect wrote them.

- our files: ``trigger_words`` in the JSON under the ``dora_diffusion`` key;
- kohya / LyCORIS files: ``modelspec.trigger_phrase`` (comma-separated), else the tags of ``ss_tag_frequency``
  (``{dataset folder: {tag: count}}``, written by sd-scripts) that the most captions hold.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from dora_diffusion.formats.diffusers import OWN_METADATA_KEY

MAX_TAG_TRIGGERS = 3
"""Most tags of ``ss_tag_frequency`` taken as trigger words (the most frequent ones)."""


def _json(text: str | None) -> object:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def trigger_words(metadata: Mapping[str, str]) -> list[str]:
    """The trigger words an adapter file's header names (module docstring), in order; ``[]`` if none."""
    own = _json(metadata.get(OWN_METADATA_KEY))
    if isinstance(own, dict):
        words = own.get("trigger_words")
        if isinstance(words, str):
            words = [words]
        if isinstance(words, list) and any(isinstance(w, str) and w.strip() for w in words):
            return [w.strip() for w in words if isinstance(w, str) and w.strip()]
    phrase = metadata.get("modelspec.trigger_phrase")
    if phrase and phrase.strip():
        return [w.strip() for w in phrase.split(",") if w.strip()]
    folders = _json(metadata.get("ss_tag_frequency"))
    counts: dict[str, int] = {}
    if isinstance(folders, dict):
        for tags in folders.values():
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    if isinstance(n, (int, float)) and str(tag).strip():
                        counts[str(tag).strip()] = counts.get(str(tag).strip(), 0) + int(n)
    if not counts:
        return []
    top = max(counts.values())
    return [t for t, n in sorted(counts.items(), key=lambda kv: -kv[1]) if n == top][:MAX_TAG_TRIGGERS]
