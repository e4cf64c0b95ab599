"""What a dataset was, recorded in each checkpoint so that a resume on other images or captions is caught.

A fingerprint is ``{"images": n, "digest": sha256, "entries": [[name, hash], ...]}``: one 16-hex-digit hash per
image of its original size, its caption and an 8 x 8 thumbnail of its pixels, sorted by name. ``entries`` is kept
for up to ``MAX_ENTRIES`` images (so a difference can be named), the digest always: at most ~40 kB per checkpoint.
"""

from __future__ import annotations

import hashlib

from PIL import Image

from .data import Record

MAX_ENTRIES = 1000


def _entry_hash(record: Record) -> str:
    thumb = record.image.convert("RGB").resize((8, 8), Image.BOX).tobytes()  # (8, 8, 3) uint8
    w, h = record.size
    return hashlib.sha256(f"{w}x{h}\0{record.caption}\0".encode("utf-8", "surrogatepass") + thumb).hexdigest()[:16]


def dataset_fingerprint(records: list[Record]) -> dict:
    """The fingerprint of the training images and captions (order-independent)."""
    entries = sorted([r.name, _entry_hash(r)] for r in records)
    digest = hashlib.sha256("\n".join(f"{n}\0{h}" for n, h in entries).encode("utf-8", "surrogatepass")).hexdigest()
    out = {"images": len(entries), "digest": digest}
    if len(entries) <= MAX_ENTRIES:
        out["entries"] = entries
    return out


def _pairs(entries: object) -> dict[str, str] | None:
    """``entries`` as ``{name: hash}``; None if it is not a list of [name, hash] strings (absent, or tampered with)."""
    if not isinstance(entries, list) or not all(
        isinstance(e, list) and len(e) == 2 and all(isinstance(x, str) for x in e) for e in entries
    ):
        return None
    return dict(map(tuple, entries))


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def fingerprint_difference(old: dict, new: dict) -> str | None:
    """What differs between two fingerprints, in words (image count, names added/removed, images or captions
    changed); None if they are the same."""
    if old.get("digest") == new.get("digest"):
        return None
    parts = [f"{old.get('images')} images -> {new.get('images')} images"] if old.get("images") != new.get("images") else []
    a, b = _pairs(old.get("entries")), _pairs(new.get("entries"))
    if a is not None and b is not None:
        added, removed = sorted(set(b) - set(a)), sorted(set(a) - set(b))
        changed = sorted(n for n in set(a) & set(b) if a[n] != b[n])
        parts += [f"added {_names(added)}"] if added else []
        parts += [f"removed {_names(removed)}"] if removed else []
        parts += [f"changed (pixels, size or caption) {_names(changed)}"] if changed else []
    return "; ".join(parts) or "the images or captions differ"
