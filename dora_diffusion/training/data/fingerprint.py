"""What a dataset was, recorded in each checkpoint so that a resume on other images or captions is caught.

A fingerprint is ``{"images": n, "digest": sha256, "entries": [[name, hash, thumbnail], ...]}``, sorted by name.
``hash`` (16 hex digits) covers the image's original size and its caption, and ``digest`` all names and hashes:
both are exact. ``thumbnail`` is the image averaged to 4 x 4 RGB (base64, 48 bytes), compared with a tolerance of
``PIXEL_TOLERANCE`` levels, because the pixels training sees depend on ``--resolution`` (images are shrunk as they
are decoded), which may change on resume. ``entries`` is kept for up to ``MAX_ENTRIES`` images (so a difference can
be named), the digest always: about 100 bytes plus the name per image, at most ~350 kB. Beyond ``MAX_ENTRIES`` images, changed pixels of an
image that kept its name, size and caption go unnoticed.
"""

from __future__ import annotations

import base64
import hashlib

from PIL import Image

from dora_diffusion.training.data.records import Record

MAX_ENTRIES = 1000
PIXEL_TOLERANCE = 12
"""Largest difference (of 255) between two thumbnails' cells that still counts as the same image."""


def _entry(record: Record) -> list[str]:
    w, h = record.size
    meta = hashlib.sha256(f"{w}x{h}\0{record.caption}".encode("utf-8", "surrogatepass")).hexdigest()[:16]
    thumb = record.image.convert("RGB").resize((4, 4), Image.BOX).tobytes()  # (4, 4, 3) uint8
    return [record.name, meta, base64.b64encode(thumb).decode("ascii")]


def dataset_fingerprint(records: list[Record]) -> dict:
    """The fingerprint of the training images and captions (order-independent)."""
    entries = sorted(_entry(r) for r in records)
    digest = hashlib.sha256("\n".join(f"{n}\0{h}" for n, h, _ in entries).encode("utf-8", "surrogatepass")).hexdigest()
    out = {"images": len(entries), "digest": digest}
    if len(entries) <= MAX_ENTRIES:
        out["entries"] = entries
    return out


def _entries(value: object) -> dict[str, tuple[str, bytes]] | None:
    """``entries`` as ``{name: (hash, thumbnail bytes)}``; None if absent or malformed (a hand-edited checkpoint)."""
    if not isinstance(value, list):
        return None
    out = {}
    for e in value:
        if not (isinstance(e, list) and len(e) == 3 and all(isinstance(x, str) for x in e)):
            return None
        try:
            out[e[0]] = (e[1], base64.b64decode(e[2], validate=True))
        except ValueError:
            return None
    return out


def _same_pixels(a: bytes, b: bytes) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= PIXEL_TOLERANCE for x, y in zip(a, b))


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def fingerprint_difference(old: dict, new: dict) -> str | None:
    """What differs between two fingerprints, in words (image count, names added or removed, captions or sizes
    changed, pixels changed); None if they are the same."""
    a, b = _entries(old.get("entries")), _entries(new.get("entries"))
    if old.get("digest") == new.get("digest") and (a is None or b is None):
        return None
    parts = [f"{old.get('images')} images -> {new.get('images')} images"] if old.get("images") != new.get("images") else []
    if a is not None and b is not None:
        common = sorted(set(a) & set(b))
        added, removed = sorted(set(b) - set(a)), sorted(set(a) - set(b))
        captions = [n for n in common if a[n][0] != b[n][0]]
        pixels = [n for n in common if a[n][0] == b[n][0] and not _same_pixels(a[n][1], b[n][1])]
        parts += [f"added {_names(added)}"] if added else []
        parts += [f"removed {_names(removed)}"] if removed else []
        parts += [f"caption or size changed {_names(captions)}"] if captions else []
        parts += [f"pixels changed {_names(pixels)}"] if pixels else []
        if not parts:
            return None
    return "; ".join(parts) or "the images or captions differ"
