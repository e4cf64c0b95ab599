"""``--adapter NAME=PATH`` arguments checked before the (slow) base model loads."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from dora_diffusion.compare.plan import CompareError, check_adapter_name, default_adapter_name, parse_adapter_arg

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
"""The form of a Hugging Face Hub repo id, ``owner/name``."""


def check_adapter_args(texts: Sequence[str]) -> list[tuple[str, str, Path | None]]:
    """Check ``--adapter NAME=PATH`` arguments before the (slow) base model loads: ``[(name, source, file)]``.

    Names are checked and made unique (a missing name comes from the path); a local path is resolved to its
    adapter file now (missing, pickle or empty folders fail here); a Hub repo id is left to load time
    (``file`` None). Raises ``CompareError`` or ``AdapterFileError`` naming the argument.
    """
    from dora_diffusion.formats import AdapterFileError
    from dora_diffusion.hub import resolve_file
    from dora_diffusion.formats.safefile import PICKLE_SUFFIXES, refuse_pickle

    out: list[tuple[str, str, Path | None]] = []
    taken: list[str] = []
    for text in texts:
        try:
            name, source = parse_adapter_arg(text)
            name = check_adapter_name(name, taken) if name else default_adapter_name(source, taken)
            local = Path(source).exists() or not HUB_ID.fullmatch(source)
            file = resolve_file(source) if local else None
            if file is not None and file.suffix.lower() in PICKLE_SUFFIXES:
                refuse_pickle(file)
        except (CompareError, AdapterFileError) as err:
            raise type(err)(f"--adapter {text}: {err}") from None
        taken.append(name)
        out.append((name, source, file))
    return out
