"""Read and write adapter files: safetensors only, header checked before any tensor is allocated."""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 * 1024 * 1024

_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


class AdapterFileError(ValueError):
    """An adapter file or state dict that cannot be used; the message says why."""


def refuse_pickle(path: Path) -> None:
    """Raise for pickle-based checkpoints, which can run code when loaded."""
    raise AdapterFileError(
        f"{path} is not a safetensors file. Pickle-based checkpoints ({', '.join(PICKLE_SUFFIXES)}) can run "
        "arbitrary code when loaded, so dora-diffusion refuses them. Convert it with a tool you trust "
        "(e.g. `safetensors.torch.save_file(torch.load(path, weights_only=True), 'out.safetensors')`)."
    )


def _check_header(path: Path, data: bytes) -> dict:
    """Parse and validate the safetensors header: sizes, offsets and dtypes must fit the file."""
    if len(data) < 8:
        raise AdapterFileError(f"{path} is truncated or empty ({len(data)} bytes); not a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        if data[:2] == b"PK" or data[:1] == b"\x80":
            refuse_pickle(path)
        raise AdapterFileError(f"{path} is truncated or not a safetensors file (header claims {n} bytes)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"{path} has a corrupt safetensors header: {err}") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path} has a corrupt safetensors header (not a JSON object)")
    body = len(data) - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = math.prod(int(s) for s in shape)
        except (KeyError, TypeError, ValueError):
            raise AdapterFileError(f"{path}: tensor {key!r} has a malformed header entry") from None
        if dtype not in _DTYPE_BYTES:
            raise AdapterFileError(f"{path}: tensor {key!r} has unsupported dtype {dtype}")
        if any(int(s) < 0 for s in shape) or not (0 <= start <= end <= body) or end - start != numel * _DTYPE_BYTES[dtype]:
            raise AdapterFileError(
                f"{path}: tensor {key!r} claims shape {shape} ({dtype}) but its data does not fit the file "
                "(truncated or corrupt file)"
            )
    return header


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load ``path`` into (state_dict, header metadata) after validating it; refuses pickle files."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(path)
    data = path.read_bytes()
    header = _check_header(path, data)
    try:
        state_dict = load_bytes(data)
    except SafetensorError as err:
        raise AdapterFileError(f"{path} could not be read as safetensors: {err}") from None
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise AdapterFileError(f"{path}: safetensors metadata is not a string map")
    return state_dict, {str(k): str(v) for k, v in metadata.items()}


def check_tensors(state_dict: dict[str, torch.Tensor]) -> None:
    """Every value must be a finite floating-point tensor."""
    if not state_dict:
        raise AdapterFileError("the adapter holds no tensors")
    for key, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise AdapterFileError(f"adapter key {key!r} holds a {type(t).__name__}, not a tensor")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise AdapterFileError(
                f"adapter key {key!r} has dtype {t.dtype}; adapter tensors must be fp16, bf16, fp32 or fp64"
            )
        if not torch.isfinite(t).all():
            raise AdapterFileError(f"adapter key {key!r} contains NaN or inf values; the file is broken")


def write_safetensors(
    state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write atomically: a crash mid-write never leaves a half-written file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def resolve_file(
    source: str | os.PathLike, weight_name: str | None = None, **hub_kwargs
) -> Path:
    """Find the adapter file for a path, a directory or a Hugging Face Hub repo id."""
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        if weight_name is not None:
            if not (path / weight_name).is_file():
                raise AdapterFileError(f"{path} has no file {weight_name!r}")
            return path / weight_name
        if (path / DEFAULT_WEIGHT_NAME).is_file():
            return path / DEFAULT_WEIGHT_NAME
        found = sorted(p for p in path.iterdir() if p.suffix == ".safetensors")
        if len(found) == 1:
            return found[0]
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if not found and pickles:
            refuse_pickle(path / pickles[0])
        if not found:
            raise AdapterFileError(f"{path} holds no .safetensors adapter file")
        raise AdapterFileError(
            f"{path} holds several .safetensors files ({', '.join(p.name for p in found)}); pass weight_name="
        )
    return _download(str(source), weight_name, **hub_kwargs)


def _download(repo_id: str, weight_name: str | None, **hub_kwargs) -> Path:
    """Fetch an adapter file from the Hugging Face Hub (the path for users; unreachable in tests)."""
    if repo_id.count("/") != 1 or os.path.sep in repo_id.split("/")[0] or repo_id.startswith((".", "/", "~")):
        raise AdapterFileError(f"{repo_id!r} is not an existing file or directory, nor a Hub repo id 'owner/name'")
    from huggingface_hub import hf_hub_download, list_repo_files

    if weight_name is None:
        hub_list_kwargs = {k: v for k, v in hub_kwargs.items() if k in ("revision", "token", "repo_type")}
        files = list_repo_files(repo_id, **hub_list_kwargs)
        safes = [f for f in files if f.endswith(".safetensors")]
        if DEFAULT_WEIGHT_NAME in safes:
            weight_name = DEFAULT_WEIGHT_NAME
        elif len(safes) == 1:
            weight_name = safes[0]
        elif not safes:
            raise AdapterFileError(f"Hub repo {repo_id!r} has no .safetensors file (pickle files are refused)")
        else:
            raise AdapterFileError(f"Hub repo {repo_id!r} has several .safetensors files {safes}; pass weight_name=")
    if Path(weight_name).suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(Path(weight_name))
    return Path(hf_hub_download(repo_id, weight_name, **hub_kwargs))
