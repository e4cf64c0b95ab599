"""Read and write adapter files: safetensors only, header checked before any tensor is allocated."""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import struct
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_DIMS = 8
"""Most dimensions a tensor may have (adapter tensors have at most 4; PyTorch refuses more than 64)."""
MAX_TENSORS = 100_000
"""Most tensors a file may hold: an SDXL DoRA on every Linear and Conv2d of the UNet and both text encoders has
1059 modules, 4236 keys (8472 for LyCORIS kinds with 8 keys a module); the cap is checked before the header's
entries are parsed (1.25 M zero-size entries took 34 s and 2.5 GB to refuse)."""
MAX_HEADER_STRINGS = 5 * MAX_TENSORS + 100_000
"""Most JSON strings a header may hold (a tensor entry has 5, a metadata entry 2; kohya writes about 100 metadata
strings, a long value like ``ss_tag_frequency`` being one string), counted before it is parsed: 2 M metadata
entries in a 28 MB header took 14 s to parse on a loaded 2-core machine."""

_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


class AdapterFileError(ValueError):
    """An adapter file or state dict that cannot be used; the message says why."""


def shown(value: object, limit: int = 100) -> str:
    """``repr(value)`` cut to ``limit`` characters: how error messages quote what a file holds."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable(text: str, limit: int = 200) -> str:
    """A string from a file (a header value, a file name) as it is safe to print: control characters escaped (no
    terminal escape sequences), at most ``limit`` characters."""
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text[: limit + 1])
    return shown[:limit] + ("…" if len(text) > limit else "")


def refuse_pickle(path: Path) -> None:
    """Raise for pickle-based checkpoints, which can run code when loaded."""
    raise AdapterFileError(
        f"{path} is not a safetensors file. Pickle-based checkpoints ({', '.join(PICKLE_SUFFIXES)}) can run "
        "arbitrary code when loaded, so dora-diffusion refuses them. Convert it with a tool you trust "
        "(e.g. `safetensors.torch.save_file(torch.load(path, weights_only=True), 'out.safetensors')`)."
    )


def _header_length(path: Path, first: bytes, file_size: int) -> int:
    """The header length the first 8 bytes declare, checked against ``file_size``; refuses pickles."""
    if len(first) < 8:
        raise AdapterFileError(f"{path} is truncated or empty ({file_size} bytes); not a safetensors file")
    (n,) = struct.unpack("<Q", first)
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        if first[:2] == b"PK" or first[:1] == b"\x80":
            refuse_pickle(path)
        raise AdapterFileError(f"{path} is truncated or not a safetensors file (header claims {n} bytes)")
    return n


def _check_header(path: Path, raw: bytes, body: int) -> dict:
    """Parse and validate the safetensors header: sizes, offsets and dtypes must fit ``body`` data bytes."""
    if raw.count(b'"data_offsets"') > MAX_TENSORS:  # every entry has one; counted before parsing any
        raise AdapterFileError(f"{path} holds more than {MAX_TENSORS:,} tensors; no adapter has that many")
    strings = (raw.count(b'"') - raw.count(b'\\"')) // 2  # quotes inside strings are escaped (a slight undercount)
    if strings > MAX_HEADER_STRINGS:
        raise AdapterFileError(
            f"{path} has a header of about {strings:,} strings (at most {MAX_HEADER_STRINGS:,}); no adapter has that many"
        )
    try:
        header = json.loads(raw)
    except ValueError as err:  # UnicodeDecodeError, JSONDecodeError, an integer of more than 4300 digits
        raise AdapterFileError(f"{path} has a corrupt safetensors header: {err}") from None
    except RecursionError:
        raise AdapterFileError(f"{path} has a corrupt safetensors header (nested too deeply)") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path} has a corrupt safetensors header (not a JSON object)")
    if len(header) - ("__metadata__" in header) > MAX_TENSORS:
        raise AdapterFileError(f"{path} holds more than {MAX_TENSORS:,} tensors; no adapter has that many")
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = math.prod(int(s) for s in shape)
            start, end = int(start), int(end)
        except (KeyError, TypeError, ValueError):
            raise AdapterFileError(f"{path}: tensor {shown(key)} has a malformed header entry") from None
        if len(shape) > MAX_DIMS:
            raise AdapterFileError(f"{path}: tensor {shown(key)} has {len(shape)} dimensions; adapter tensors have at most 4")
        if dtype not in _DTYPE_BYTES:
            name = dtype if isinstance(dtype, str) and dtype.isalnum() and len(dtype) < 20 else shown(dtype)
            raise AdapterFileError(f"{path}: tensor {shown(key)} has unsupported dtype {name}")
        if any(int(s) < 0 for s in shape) or not (0 <= start <= end <= body) or end - start != numel * _DTYPE_BYTES[dtype]:
            raise AdapterFileError(
                f"{path}: tensor {shown(key)} claims shape {shown(shape)} ({dtype}) but its data does not fit the file "
                "(truncated or corrupt file)"
            )
    return header


def _data_end(header: dict) -> int:
    """Bytes of tensor data the header accounts for (the end of its last tensor)."""
    return max((int(info["data_offsets"][1]) for key, info in header.items() if key != "__metadata__"), default=0)


def open_nonblocking(path: str | os.PathLike) -> tuple[int, os.stat_result]:
    """Open ``path`` read-only without blocking (a FIFO cannot hang the open) and ``fstat`` the descriptor: the
    caller checks that it is a regular file on what it opened, and closes ``fd`` if not. ``OSError`` passes through
    (``ENXIO`` for a socket, ``EISDIR`` for a folder where the system refuses to open one)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    return fd, os.fstat(fd)


def _open_regular(path: Path) -> tuple[int, int]:
    """Open ``path`` for reading without blocking; returns (fd, size). Refuses FIFOs, devices and folders."""
    try:
        fd, st = open_nonblocking(path)
    except IsADirectoryError:
        raise AdapterFileError(f"{path} is a directory, not a safetensors file") from None
    except OSError as err:
        if err.errno != errno.ENXIO:  # ENXIO: a socket
            raise
        raise AdapterFileError(f"{path} is not a regular file (a socket); an adapter must be a regular .safetensors file") from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, socket or device)"
        raise AdapterFileError(f"{path} is {kind}; an adapter must be a regular .safetensors file")
    return fd, st.st_size


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load ``path`` into (state_dict, header metadata) after validating it; refuses pickle files.

    Only regular files are read, and only as many bytes as the validated header accounts for: a file
    with more data after its last tensor is refused before its data is read.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(path)
    fd, size = _open_regular(path)
    with os.fdopen(fd, "rb") as f:
        n = _header_length(path, f.read(8), size)
        body = size - 8 - n
        header = _check_header(path, f.read(n), body)
        end = _data_end(header)
        if end != body:
            raise AdapterFileError(
                f"{path} holds {body - end} bytes after its last tensor that the header does not account for "
                "(corrupt or not a safetensors file)"
            )
        f.seek(0)
        try:
            data = f.read(8 + n + end)
        except MemoryError:
            raise AdapterFileError(f"{path} holds {end / 2**30:.1f} GiB of tensors, more than this machine can load") from None
    if len(data) != 8 + n + end:
        raise AdapterFileError(f"{path} is truncated (it changed while being read)")
    try:
        state_dict = load_bytes(data)
    except SafetensorError as err:
        raise AdapterFileError(f"{path} could not be read as safetensors: {err}") from None
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise AdapterFileError(f"{path}: safetensors metadata is not a string map")
    return state_dict, {str(k): str(v) for k, v in metadata.items()}


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
"""Integer dtypes accepted for an ``.alpha`` (diffusers' ``convert_state_dict_to_kohya`` writes int64 ranks)."""


def check_floats(where: str, t: torch.Tensor) -> None:
    """``t`` must be a floating-point tensor whose values are finite in fp32, the dtype adapters are used in.

    fp64 values beyond fp32's range (1e300) are finite as read but inf once cast, so they are refused too.
    """
    if t.dtype not in FLOAT_DTYPES:
        raise AdapterFileError(f"{where} has dtype {t.dtype}; it must be fp16, bf16, fp32 or fp64")
    if not torch.isfinite(t).all():
        raise AdapterFileError(f"{where} contains NaN or inf values; the file is broken")
    if t.dtype == torch.float64 and not torch.isfinite(t.to(torch.float32)).all():
        raise AdapterFileError(
            f"{where} holds fp64 values beyond fp32's range (|x| > {torch.finfo(torch.float32).max:.3g}), which "
            "become inf when the adapter is used; the file is broken"
        )


def check_tensors(state_dict: dict[str, torch.Tensor]) -> None:
    """Every value must be a floating-point tensor, finite in fp32; an ``.alpha`` may also be an integer."""
    if not state_dict:
        raise AdapterFileError("the adapter holds no tensors")
    for key, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise AdapterFileError(f"adapter key {shown(key)} holds a {type(t).__name__}, not a tensor")
        if key.endswith(".alpha") and t.dtype not in FLOAT_DTYPES:
            if t.dtype in INT_DTYPES:
                continue  # an integer is finite; its size is checked against MAX_ALPHA where alpha is read
            raise AdapterFileError(f"adapter key {shown(key)} has dtype {t.dtype}; an alpha must be a float or an integer")
        check_floats(f"adapter key {shown(key)}", t)


def write_safetensors(
    state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write atomically: a crash mid-write never leaves a half-written file at ``path``.

    The data goes to ``.<name>.<random>.tmp`` beside it first (created with the usual permissions, as
    ``open`` would), then is renamed over ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "xb") as f:  # not safetensors' save_file, which creates the file with mode 0600
            f.write(save_bytes(tensors, metadata=metadata))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` string map of a safetensors file, read from its header alone (no tensor is loaded);
    the header is checked as ``read_safetensors`` checks it."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        first = f.read(8)
        n = _header_length(path, first, size)
        header = _check_header(path, f.read(n), size - 8 - n)
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise AdapterFileError(f"{path}: safetensors metadata is not a string map")
    return {str(k): str(v) for k, v in metadata.items()}
