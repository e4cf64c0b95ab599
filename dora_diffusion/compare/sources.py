"""Which adapter sources a page visitor may name: local paths under the folders the server allows, or Hub ids.

The page's "Local path or Hub repo id" box is typed by whoever can open the page. Left open, it reads any
file the server can read, and its errors tell the visitor whether a path exists, how large it is, what its
first bytes claim, and which ``.safetensors`` files a folder holds. ``AdapterSources`` confines it:

- a local path (absolute, or relative to the server's working directory) is read only if its real path (links
  followed) lies under an allowed folder: the folders and files of ``--adapter``, ``--allow_dir`` folders, the
  demo's cache and the upload folder;
- any other text that has the form ``owner/name`` is looked up on the Hugging Face Hub only, never on disk;
- anything else is refused with one message that does not depend on what is on disk.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from dora_diffusion.hub import hub_file, resolve_file
from dora_diffusion.compare.loading import HUB_ID
from dora_diffusion.compare.plan import CompareError

MAX_SOURCE_LENGTH = 4096
"""Longest path or Hub id the page takes (Linux's PATH_MAX)."""


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(path))


class AdapterSources:
    """The folders (and single files) a page visitor may load adapters from, and the lookup that keeps to them."""

    def __init__(self, allowed: Iterable[str | os.PathLike]) -> None:
        self.allowed: list[Path] = []
        for path in allowed:
            real = _real(path)
            if real not in self.allowed:
                self.allowed.append(real)

    def allows(self, path: str | os.PathLike) -> bool:
        """True if the real path of ``path`` is an allowed file or lies under an allowed folder."""
        real = _real(path)
        return any(real == root or real.is_relative_to(root) for root in self.allowed)

    def refusal(self, source: str) -> CompareError:
        shown = source if len(source) <= 200 else source[:200] + "…"
        return CompareError(
            f"{shown!r} is not under a folder this page loads adapters from, nor a Hub repo id 'owner/name' (the "
            "page reads local files only under the folders given with --adapter or --allow_dir, and uploads)"
        )

    def resolve(self, source: str) -> Path:
        """The adapter file ``source`` names: under an allowed folder, or downloaded from the Hub.

        Raises ``CompareError`` for an empty, overlong or disallowed source (the same message whether or not the
        path exists), ``AdapterFileError`` for an allowed one that names no adapter file.
        """
        source = str(source).strip()
        if not source:
            raise CompareError("enter a path, a Hub repo id, or upload a .safetensors file")
        if len(source) > MAX_SOURCE_LENGTH or "\x00" in source:
            raise CompareError(
                f"the path or Hub repo id is {len(source)} characters long or holds a NUL character; a path has at "
                f"most {MAX_SOURCE_LENGTH}"
            )
        local = Path(source)
        if self.allows(local):
            file = resolve_file(local)  # errors name the path as the visitor wrote it
            if not self.allows(file):  # a file in an allowed folder that links out of it
                raise self.refusal(source)
            return file
        if HUB_ID.fullmatch(source) and not source.startswith("."):
            return hub_file(source)
        raise self.refusal(source)
