"""Optional dependency groups: which extra a feature needs, and a clear error when it is missing.

``pip install dora-diffusion`` loads, fuses, saves and converts adapters. Training needs ``[train]``
(accelerate, datasets), the comparison page ``[app]`` (gradio; matplotlib for its Analysis tab), ``dora-diffusion analyze --plot``
``[analysis]`` (matplotlib); ``[all]`` has all three.
"""

from __future__ import annotations

import importlib.util

#: extra -> the modules it provides (import names).
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("accelerate", "datasets"),
    "app": ("gradio", "matplotlib"),
    "analysis": ("matplotlib",),
}


class MissingExtraError(ImportError):
    """A feature needs an optional dependency group that is not installed; the message names the extra."""


def require(extra: str, feature: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise ``MissingExtraError`` unless every module of ``extra`` (or just ``modules``) can be imported.

    ``feature`` names what the user asked for (``"app.py"``, ``"training"``), for the message.
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; one of {sorted(EXTRAS)}")
    missing = [m for m in (modules or EXTRAS[extra]) if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(
            f"{feature} needs the '{extra}' extra ({', '.join(missing)} not installed): "
            f"pip install 'dora-diffusion[{extra}]' (from a clone: pip install -e '.[{extra}]')"
        )
