"""Where models and adapter files come from: a local file or folder, or a Hugging Face Hub repo id (downloaded
once into the Hub cache), and whether the Hub can be reached at all; ``from_pretrained`` for the base pipeline."""

from __future__ import annotations

import contextlib
import os
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch

from dora_diffusion.formats.safefile import DEFAULT_WEIGHT_NAME, PICKLE_SUFFIXES, AdapterFileError, refuse_pickle


def resolve_file(
    source: str | os.PathLike, weight_name: str | None = None, **hub_kwargs
) -> Path:
    """Find the adapter file for a path, a directory or a Hugging Face Hub repo id.

    In a directory only regular files (or links to them) count; FIFOs, devices and folders named
    ``*.safetensors`` are named in the error instead of being opened.
    """
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        if weight_name is not None:
            chosen = path / weight_name
            if not chosen.exists():
                raise AdapterFileError(f"{path} has no file {weight_name!r}")
            if not chosen.is_file():
                raise AdapterFileError(f"{chosen} is not a regular file; an adapter must be a .safetensors file")
            return chosen
        if (path / DEFAULT_WEIGHT_NAME).is_file():
            return path / DEFAULT_WEIGHT_NAME
        entries = sorted(path.iterdir())
        named = [p for p in entries if p.suffix == ".safetensors"]
        found = [p for p in named if p.is_file()]
        if len(found) == 1:
            return found[0]
        pickles = sorted(p.name for p in entries if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
        if not found and pickles:
            refuse_pickle(path / pickles[0])
        if not found:
            skipped = [p.name for p in named]
            raise AdapterFileError(
                f"{path} holds no .safetensors adapter file"
                + (f" ({', '.join(skipped[:3])} {'is' if len(skipped) == 1 else 'are'} not a regular file)" if skipped else "")
            )
        raise AdapterFileError(
            f"{path} holds several .safetensors files ({', '.join(p.name for p in found)}); pass weight_name="
        )
    if path.exists():
        raise AdapterFileError(f"{path} is not a regular file or directory (a FIFO, socket or device)")
    return _download(str(source), weight_name, **hub_kwargs)


HUB_CONNECT_TIMEOUT = 3.0
"""Seconds a TCP connection to the Hub may take before the Hub counts as unreachable."""


def hub_unreachable(timeout: float = HUB_CONNECT_TIMEOUT) -> str | None:
    """Why the Hugging Face Hub certainly cannot be reached (offline mode, its host name does not resolve, no TCP
    connection within ``timeout`` seconds), or None.

    Checked before asking the Hub, whose client retries a dead network for about 25 s.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # the proxy resolves names
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.getaddrinfo(host, port)
    except OSError as err:
        return f"{host} cannot be resolved ({err})"
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"no connection to {host}:{port} within {timeout:g} s ({err or type(err).__name__})"
    return None


@contextlib.contextmanager
def quiet_hub_deprecations():
    """Hide huggingface_hub's warning about ``local_dir_use_symlinks``, an argument it deprecated that diffusers and
    its own ``snapshot_download`` still pass (a warning per file, nothing the user can act on)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        yield


def hub_file(repo_id: str, weight_name: str | None = None, **hub_kwargs) -> Path:
    """The adapter file of Hub repo ``repo_id``, downloaded once; never a local path, even one spelt the same."""
    return _download(repo_id, weight_name, **hub_kwargs)


def _download(repo_id: str, weight_name: str | None, **hub_kwargs) -> Path:
    """Fetch an adapter file from the Hugging Face Hub (the path for users; unreachable in tests)."""
    missing = f"{repo_id!r} is not an existing file or directory"
    if repo_id.count("/") != 1 or os.path.sep in repo_id.split("/")[0] or repo_id.startswith((".", "/", "~")):
        raise AdapterFileError(f"{missing}, nor a Hub repo id 'owner/name'")
    if Path(repo_id).suffix.lower() in (".safetensors", *PICKLE_SUFFIXES):  # a file name, not a repo id
        raise AdapterFileError(f"{missing} (no such file here)")
    unreachable = hub_unreachable()
    if unreachable:
        raise AdapterFileError(f"{missing} here, and the Hugging Face Hub cannot be reached to look it up as a repo id: {unreachable}")
    from huggingface_hub import hf_hub_download, list_repo_files

    try:
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
    except AdapterFileError:
        raise
    except Exception as err:  # noqa: BLE001 - the Hub client's errors (HTTP, network, missing repo) vary by version
        raise AdapterFileError(f"{missing} here, and the Hub lookup of {repo_id!r} failed: {type(err).__name__}: {err}") from err


def dtype_keyword() -> str:
    """``dtype``, the name diffusers >= 0.37 uses in ``from_pretrained``, or ``torch_dtype`` for older releases."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


def load_base_pipeline(model: str, device: str | None = None, dtype: str = "auto", variant: str | None = None):
    """``StableDiffusionXLPipeline.from_pretrained(model)`` on ``device`` (default: cuda if present, else cpu).

    ``dtype="auto"`` is float16 on a GPU and float32 on the CPU.
    """
    from diffusers import StableDiffusionXLPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "float16"
    torch_dtype = getattr(torch, dtype)
    pipe = StableDiffusionXLPipeline.from_pretrained(model, variant=variant, **{dtype_keyword(): torch_dtype})
    return pipe.to(device)
