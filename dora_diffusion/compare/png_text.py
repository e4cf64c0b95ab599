"""One text chunk of a PNG file, read without decoding its pixels, in time and memory bounded by the chunk.

PIL reads a PNG's text chunks that follow the image data only when it decodes the pixels (a 438 KB PNG can
decode to 440 MB, and PIL refuses images over 179 megapixels), and it inflates each ``zTXt`` chunk to up to
1 MB. This reader walks the chunk headers (``length``, ``type``), seeks past every chunk that is not a text
chunk, reads the keyword of each ``tEXt``/``zTXt``/``iTXt`` chunk, and reads and inflates only the chunk
asked for, refusing it once it holds more than ``max_bytes``.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from dora_diffusion.compare.plan import CompareError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_CHUNKS = 100_000
"""Most chunks a PNG may have before the reader gives up (a PNG written by PIL has one per 64 KB of pixels)."""
_TEXT_TYPES = (b"tEXt", b"zTXt", b"iTXt")
_MAX_KEYWORD = 79  # PNG's limit on a text chunk's keyword


def _inflate(data: bytes, max_bytes: int, what: str) -> bytes:
    """zlib data inflated to at most ``max_bytes``; a ``CompareError`` for more, or for damaged data."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, max_bytes + 1)
    except zlib.error as err:
        raise CompareError(f"{what} is damaged: its compressed text does not inflate ({err})") from None
    if len(out) > max_bytes:
        raise CompareError(f"{what} is longer than {max_bytes} bytes, the most this page reads")
    if not inflater.eof:
        raise CompareError(f"{what} is damaged: its compressed text ends early")
    return out


def _text_of(ctype: bytes, body: bytes, max_bytes: int, what: str) -> str:
    """The text of a ``tEXt``/``zTXt``/``iTXt`` chunk body after its keyword and NUL."""
    if ctype == b"tEXt":
        return body.decode("latin-1")
    if ctype == b"zTXt":
        if body[:1] != b"\x00":
            raise CompareError(f"{what} uses an unknown compression method")
        return _inflate(body[1:], max_bytes, what).decode("latin-1")
    # iTXt: compression flag, method, language tag NUL, translated keyword NUL, UTF-8 text
    if len(body) < 2:
        raise CompareError(f"{what} is damaged: it ends inside its header")
    compressed, method, rest = body[0], body[1], body[2:]
    parts = rest.split(b"\x00", 2)
    if len(parts) != 3:
        raise CompareError(f"{what} is damaged: it ends inside its header")
    data = parts[2]
    if compressed:
        if method != 0:
            raise CompareError(f"{what} uses an unknown compression method")
        data = _inflate(data, max_bytes, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CompareError(f"{what} is not valid UTF-8 ({err.reason} at byte {err.start})") from None


def read_png_text(path: str | Path, keyword: str, max_bytes: int) -> str | None:
    """The text chunk ``keyword`` of the PNG at ``path`` (None if it has none), never decoding pixels.

    Reads the 8-byte header of each chunk and seeks past all but text chunks; reads at most ``max_bytes``
    (plus the keyword) of the chunk asked for, and inflates it to at most ``max_bytes``. Raises
    ``CompareError`` for a file that is not a PNG, a damaged chunk, more than ``MAX_PNG_CHUNKS`` chunks, a
    keyword given twice, or a text over ``max_bytes`` bytes.
    """
    name = Path(path).name
    key = keyword.encode("latin-1")
    found: str | None = None
    with open(path, "rb") as f:
        if f.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
            raise CompareError(f"{name} is not a PNG image (restore reads the 'parameters' text of PNGs made here)")
        for _ in range(MAX_PNG_CHUNKS):
            head = f.read(8)
            if len(head) < 8:
                return found  # the end of the file (a PNG cut short keeps the chunks before the cut)
            length, ctype = struct.unpack(">I4s", head)
            if length > 2**31 - 1:
                raise CompareError(f"{name} is damaged: a {ctype!r} chunk claims {length} bytes (PNG allows 2^31 - 1)")
            if ctype == b"IEND":
                return found
            if ctype not in _TEXT_TYPES:
                f.seek(length + 4, 1)  # the data and its CRC, unread
                continue
            start = f.read(min(length, _MAX_KEYWORD + 1))
            if start.split(b"\x00", 1)[0] != key or b"\x00" not in start:
                f.seek(length - len(start) + 4, 1)
                continue
            what = f"the {keyword!r} text of {name}"
            if found is not None:
                raise CompareError(f"{name} carries two {keyword!r} texts; a PNG made here carries one")
            if length - len(key) - 1 > max_bytes + 64:  # room for iTXt's header and zlib's framing
                raise CompareError(f"{what} is {length} bytes, longer than {max_bytes}, the most this page reads")
            data = start + f.read(length - len(start))
            crc = f.read(4)
            if len(data) < length or len(crc) < 4:
                raise CompareError(f"{what} is damaged: the file ends inside it")
            if zlib.crc32(ctype + data) != struct.unpack(">I", crc)[0]:
                raise CompareError(f"{what} is damaged: its checksum (CRC) does not match")
            body = data[len(key) + 1 :]
            found = _text_of(ctype, body, max_bytes, what)
            if len(found) > max_bytes:  # a tEXt chunk is read whole (its length was checked above)
                raise CompareError(f"{what} is {len(found)} characters, longer than {max_bytes}, the most this page reads")
    raise CompareError(f"{name} has more than {MAX_PNG_CHUNKS} chunks; a PNG made here has far fewer")
