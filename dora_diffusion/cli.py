"""The ``dora-diffusion`` command: ``convert`` and ``inspect`` adapter files without loading a model.

Each subcommand is a pair of functions: ``add_<name>_parser(subparsers)`` declares its arguments and sets
``func`` to ``run_<name>(args) -> int``. Add a subcommand by writing the pair and listing the first in
``SUBCOMMANDS``. Errors a user can fix print one line to stderr and give a non-zero exit status (1 for a bad file, 2 for bad arguments).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from dora_diffusion import formats
from dora_diffusion._version import __version__
from dora_diffusion.adapter_io import read_adapter as read_source
from dora_diffusion.analysis import add_analyze_parser
from dora_diffusion.analysis.scan import load_base
from dora_diffusion.extras import MissingExtraError
from dora_diffusion.formats import COMPONENTS, AdapterFileError, ModuleAdapter, ParsedAdapter, write_safetensors
from dora_diffusion.formats.kohya import PREFIXES, key_prefix, to_sdxl_names, unet_naming
from dora_diffusion.formats.safefile import printable
from dora_diffusion.pipeline import base_weights

PROG = "dora-diffusion"
PRINTED_LIMIT = 4000
"""Longest line the command prints about a file (file names and error messages, control characters escaped)."""
CONVERT_FORMATS = formats.WRITE_FORMATS

LEGACY_TO_DIFFUSERS = (
    "{path} holds per-input (legacy LyCORIS < 3.2 / OneTrainer) DoRA: its magnitude rescales input columns, "
    "W' = (W0 + sBA) diag(m/||column||), while the diffusers/PEFT format can only rescale output rows. There is "
    "no lossless conversion; keep it as a kohya file (--to kohya) or load it directly with pipe.load_dora_weights()"
)


# ---------------------------------------------------------------------------------------------- reading


def read_adapter(path: str | Path) -> tuple[Path, ParsedAdapter]:
    """Read a local adapter file (or a directory holding one) in any supported dialect."""
    path = Path(path)
    if not path.exists():
        raise AdapterFileError(f"{path} does not exist")
    parsed, file = read_source(path)
    return file, parsed


def model_named(parsed: ParsedAdapter) -> dict[str, dict[str, ModuleAdapter]]:
    """The modules of ``parsed`` keyed by diffusers module names (kohya names are mapped onto SDXL base)."""
    if parsed.dialect == "kohya":
        return to_sdxl_names(parsed)
    return parsed.modules


# ---------------------------------------------------------------------------------------------- convert


def convert_file(
    src: str | Path, dst: str | Path, to: str, overwrite: bool = False, base: str | Path | object | None = None
) -> Path:
    """Rewrite the adapter ``src`` as ``dst`` in the ``to`` dialect (``"diffusers"``, ``"kohya"`` or ``"comfyui"``).

    Per-output DoRA and LoRA convert between diffusers and kohya with the same tensors; legacy per-input DoRA has
    no diffusers form. Writing ``"comfyui"`` (``dora_scale = m (||W0|| + eps) / ||W0 + s B A||``) or reading a file
    written that way needs ``base``: the pipeline the adapter was trained on, or its directory / Hub id.
    """
    if to not in CONVERT_FORMATS:
        raise ValueError(f"--to must be one of {', '.join(map(repr, CONVERT_FORMATS))}, got {to!r}")
    dst = Path(dst)
    if dst.suffix.lower() != ".safetensors":
        raise ValueError(f"{dst}: the output file name must end in .safetensors (other names are refused when read)")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
    src, parsed = read_adapter(src)
    modules = model_named(parsed)
    weights = None
    if formats.needs_base(parsed, to):
        if base is None:
            what = "writing --to comfyui"
            if parsed.comfyui_dora_scale:
                what = f"reading {src}, written for ComfyUI's rule,"
            raise ValueError(
                f"{what} needs the base model's weights W0 (dora_scale = m ||W0|| / ||W0 + s B A||); pass --base MODEL "
                "(the SDXL pipeline directory or Hub id the adapter was trained on)"
            )
        pipe = load_base(str(base)) if isinstance(base, (str, Path)) else base
        weights = base_weights(pipe, modules)
    if weights is not None:
        modules = formats.apply_base(parsed, modules, lambda _: weights)
    info = {"library": "dora-diffusion", "version": __version__, "adapter_name": dst.stem}
    info["converted_from"] = parsed.dialect + (" (ComfyUI dora_scale)" if parsed.comfyui_dora_scale else "")
    carried = {k: v for k, v in parsed.metadata.items() if k.startswith(("ss_", "modelspec."))}  # training info
    if to == "diffusers":
        if any(m.use_dora and m.norm_axis == "in" for mods in modules.values() for m in mods.values()):
            raise AdapterFileError(LEGACY_TO_DIFFUSERS.format(path=src))
        info = {**info, "source_metadata": carried} if carried else info
    else:
        info = {**carried, **info}
    state_dict, header = formats.write(modules, to, info, base=weights)
    return write_safetensors(state_dict, dst, header)


def add_convert_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="rewrite an adapter file in the diffusers or kohya dialect",
        description="Convert an SDXL DoRA/LoRA file between the diffusers/PEFT and kohya/LyCORIS dialects "
        "(kohya UNet names are written in SGM form). No model is loaded, except --base for ComfyUI-rule files.",
    )
    p.add_argument("input", help="adapter .safetensors file (or a directory holding one)")
    p.add_argument("output", help="where to write the converted .safetensors file")
    p.add_argument("--to", required=True, choices=CONVERT_FORMATS,
                   help="dialect to write: diffusers, kohya (LyCORIS-exact) or comfyui (kohya with a dora_scale that "
                   "ComfyUI/Forge render exactly; needs --base)")  # fmt: skip
    p.add_argument("--base", metavar="MODEL", default=None,
                   help="the base SDXL pipeline (directory or Hub id) the adapter was trained on; needed to write "
                   "--to comfyui and to read a file written that way")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    out = convert_file(args.input, args.output, args.to, args.overwrite, args.base)
    print(printable(f"wrote {out} ({args.to})", PRINTED_LIMIT))
    return 0


# ---------------------------------------------------------------------------------------------- inspect

_CONTEXT_DIMS = {2048: "SDXL", 768: "SD 1.x", 1024: "SD 2.x"}


_SHOWN_METADATA = ("ss_network_module", "ss_network_args", "ss_base_model_version", "modelspec.architecture",
                   "ss_output_name")  # fmt: skip
_AXIS_LABELS = {"out": "DoRA, per-output norm", "in": "DoRA, per-input norm (legacy LyCORIS < 3.2 / OneTrainer)"}


def _counts(values: Iterable) -> str:
    """``"4 (361 modules), 2 (1 module)"``: each value with how often it occurs, most common first."""
    parts = []
    for value, n in sorted(Counter(values).items(), key=lambda item: (-item[1], str(item[0]))):
        shown = f"{value:g}" if isinstance(value, (int, float)) else str(value)
        parts.append(f"{shown} ({n} module{'' if n == 1 else 's'})")
    return ", ".join(parts)


def _likely_base(parsed: ParsedAdapter) -> str:
    """A best guess from the UNet's cross-attention width, else the file's metadata, else a second text encoder."""
    for name, m in parsed.modules.get("unet", {}).items():
        if name.endswith(("attn2_to_k", "attn2.to_k")):
            dim = int(m.a.shape[1])
            if dim in _CONTEXT_DIMS:
                return f"{_CONTEXT_DIMS[dim]} (UNet cross-attention width {dim})"
            return f"unknown: UNet cross-attention width {dim} (SDXL 2048, SD 1.x 768, SD 2.x 1024)"
    hint = parsed.metadata.get("ss_base_model_version") or parsed.metadata.get("modelspec.architecture")
    if hint:
        return f"{printable(hint)} (from the file's metadata)"
    if "text_encoder_2" in parsed.modules:
        return "SDXL (has a second text encoder)"
    return "unknown"


def describe(parsed: ParsedAdapter) -> dict[str, str]:
    """What ``inspect`` prints: dialect, DoRA/LoRA and norm axis, ranks, alphas, module and parameter counts."""
    mods = [m for comp in parsed.modules.values() for m in comp.values()]
    dialect = parsed.dialect
    if dialect == "kohya":
        used = {key_prefix(keys[0]) for keys in parsed.source_keys.values()}
        details = [p for p in PREFIXES if p in used]
        if "unet" in parsed.modules:
            details.append(f"UNet names: {unet_naming(parsed.modules['unet'])}")
        dialect = f"kohya/LyCORIS ({', '.join(details)})"
        if parsed.comfyui_dora_scale:
            dialect += (
                "; ComfyUI variant: dora_scale = m ||W0|| / ||W0 + sBA|| (exact in ComfyUI/Forge; dora-diffusion "
                "reads it against the base model)"
            )
    kinds = Counter(_AXIS_LABELS[m.norm_axis] if m.use_dora else "LoRA" for m in mods)
    adapter = next(iter(kinds)) if len(kinds) == 1 else "mixed: " + _counts(kinds.elements())
    per_comp = []
    for comp, cm in sorted(parsed.modules.items(), key=lambda item: COMPONENTS.index(item[0])):
        n_conv = sum(1 for m in cm.values() if m.is_conv)
        per_comp.append(f"{comp} {len(cm)} (Linear {len(cm) - n_conv}, Conv2d {n_conv})")
    params = sum(m.a.numel() + m.b.numel() + (0 if m.magnitude is None else m.magnitude.numel()) for m in mods)
    alphas = _counts([m.alpha for m in mods])
    if any(m.use_rslora for m in mods):
        alphas += " (rsLoRA: scale alpha/sqrt(rank))"
    out = {
        "dialect": dialect,
        "adapter": adapter,
        "rank": _counts([m.rank for m in mods]),
        "alpha": alphas,
        "modules": "; ".join(per_comp),
        "parameters": f"{params:,}",
        "base model": _likely_base(parsed),
    }
    meta = [f"{k}={printable(parsed.metadata[k])}" for k in _SHOWN_METADATA if k in parsed.metadata]
    if meta:
        out["metadata"] = "; ".join(meta)
    return out


def add_inspect_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="describe an adapter file",
        description="Print an adapter file's dialect, DoRA/LoRA and norm axis, ranks, alphas, module counts per "
        "component (Linear vs Conv2d), parameter count and likely base model.",
    )
    p.add_argument("file", help="adapter .safetensors file (or a directory holding one)")
    p.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    path, parsed = read_adapter(args.file)
    rows = {"file": printable(str(path), PRINTED_LIMIT), **describe(parsed)}
    width = max(map(len, rows)) + 1
    for key, value in rows.items():
        print(f"{key + ':':<{width}} {value}")
    return 0


# ---------------------------------------------------------------------------------------------- the toolbox


def _print_report(report, per_module: bool = True) -> None:
    for line in report.lines(per_module):
        print(printable(line, PRINTED_LIMIT))


def _add_output_args(p, to_default: str | None) -> None:
    from dora_diffusion.tools.output import OUTPUT_FORMATS

    shown_default = "the input's dialect" if to_default is None else to_default
    p.add_argument("--to", choices=OUTPUT_FORMATS, default=to_default,
                   help=f"dialect to write (default: {shown_default}); kohya files carry ss_*/modelspec.* metadata")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (never an input)")
    p.add_argument("--summary-only", action="store_true", help="print the summary without a line per module")


def add_bake_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bake",
        help="turn a DoRA into a plain LoRA of rank r (for loaders without DoRA)",
        description="Bake a DoRA (or LoRA) into a plain LoRA: per module the change W' - W0 truncated by SVD to "
        "--rank. Prints each module's error and the rank that keeps every module's change error under --threshold. "
        "A LoRA at or under --rank is copied exactly.",
    )
    p.add_argument("input", help="adapter .safetensors file (or a directory holding one), any dialect")
    p.add_argument("output", help="where to write the LoRA .safetensors file")
    p.add_argument("--rank", type=int, required=True, help="rank of the LoRA (the most, with --dynamic)")
    p.add_argument("--base", metavar="DIR", default=None,
                   help="the SDXL diffusers folder the adapter was trained on (needed for DoRA: W' depends on W0)")  # fmt: skip
    p.add_argument("--threshold", type=float, default=0.05,
                   help="change error ||dW_r - dW|| / ||dW|| the recommended rank keeps (default 0.05)")  # fmt: skip
    p.add_argument("--dynamic", action="store_true", help="per module, the smallest rank under --threshold (at most --rank)")
    _add_output_args(p, None)
    p.set_defaults(func=run_bake)


def run_bake(args: argparse.Namespace) -> int:
    from dora_diffusion.tools import bake

    report = bake(args.input, args.output, args.rank, args.base, args.threshold, args.dynamic, args.to, args.overwrite)
    _print_report(report, not args.summary_only)
    return 0


def add_resize_parser(subparsers) -> None:
    from dora_diffusion.tools.svd import DYNAMIC_METHODS

    p = subparsers.add_parser(
        "resize",
        help="lower an adapter's rank (DoRA magnitudes kept exactly)",
        description="Resize an adapter: per module its update s B A truncated by SVD to --rank, or per module by a "
        "kohya dynamic method (capped by --rank). DoRA magnitudes are kept exactly; a module not above the new rank "
        "is copied unchanged.",
    )
    p.add_argument("input", help="adapter .safetensors file (or a directory holding one), any dialect")
    p.add_argument("output", help="where to write the resized .safetensors file")
    p.add_argument("--rank", "--new_rank", type=int, required=True, help="the new rank (the most, with --dynamic-method)")
    p.add_argument("--dynamic-method", "--dynamic_method", choices=DYNAMIC_METHODS, default=None,
                   help="per-module rank as kohya resize_lora.py: sv_ratio (keep S > S_max/param), sv_cumulative "
                   "(sum of S), sv_fro (retained Frobenius energy)")  # fmt: skip
    p.add_argument("--dynamic-param", "--dynamic_param", type=float, default=None, help="the dynamic method's parameter")
    p.add_argument("--base", metavar="DIR", default=None, help="the SDXL diffusers folder: adds the weight error")
    _add_output_args(p, None)
    p.set_defaults(func=run_resize)


def run_resize(args: argparse.Namespace) -> int:
    from dora_diffusion.tools import resize

    report = resize(args.input, args.output, args.rank, args.dynamic_method, args.dynamic_param, args.base, args.to,
                    args.overwrite)  # fmt: skip
    _print_report(report, not args.summary_only)
    return 0


def add_extract_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "extract",
        help="extract a DoRA or LoRA from a fine-tuned model and its base",
        description="Extract an adapter from a fine-tuned SDXL diffusers folder and its base, one module at a time. "
        "DoRA (default): m = the fine-tuned row norms exactly, the direction by truncated SVD; LoRA: the truncated "
        "SVD of W_t - W0. Prints each module's error ||W' - W_t|| / ||W_t|| and the summary.",
    )
    p.add_argument("finetuned", help="the fine-tuned SDXL diffusers folder")
    p.add_argument("base", help="its base SDXL diffusers folder")
    p.add_argument("output", help="where to write the adapter .safetensors file")
    p.add_argument("--rank", "--dim", type=int, default=None, help="rank per module (the most, with --energy)")
    p.add_argument("--energy", type=float, default=None, help="per module, the rank keeping this fraction of the change's Frobenius norm")
    p.add_argument("--kind", choices=("dora", "lora"), default="dora", help="what to extract (default dora)")
    p.add_argument("--components", nargs="+", default=None, choices=COMPONENTS, help="only these (default: all changed)")
    p.add_argument("--iterations", type=int, default=20, help="most rounds of the DoRA direction fit (default 20)")
    _add_output_args(p, "diffusers")
    p.set_defaults(func=run_extract)


def run_extract(args: argparse.Namespace) -> int:
    from dora_diffusion.tools import extract

    report = extract(args.finetuned, args.base, args.output, args.rank, args.energy, args.kind, args.components,
                     args.iterations, args.to, args.overwrite)  # fmt: skip
    _print_report(report, not args.summary_only)
    return 0


def add_merge_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "merge",
        help="merge adapters at strengths into one file, or into the base model",
        description="Merge adapters at strengths. LoRAs stack exactly (ranks add up); with a DoRA the merged weights "
        "W0 + sum k (W' - W0) are extracted at --rank/--energy (needs --base), the error printed. --into-base fuses "
        "them into the base pipeline and saves it with save_pretrained (OUTPUT is then a folder).",
    )
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter .safetensors files (or directories), any dialect")
    p.add_argument("-o", "--output", required=True, help="the merged .safetensors file (a folder with --into-base)")
    p.add_argument("--strengths", type=float, nargs="+", default=None, help="one strength per adapter (default 1)")
    p.add_argument("--base", metavar="DIR", default=None, help="the SDXL diffusers folder (needed with a DoRA and for --into-base)")
    p.add_argument("--rank", type=int, default=None, help="rank of the extraction (LoRAs: truncate the stack to it)")
    p.add_argument("--energy", type=float, default=None, help="per module, the rank keeping this fraction of the change's norm")
    p.add_argument("--kind", choices=("dora", "lora"), default=None, help="extract as (default: stacked LoRAs, or DoRA)")
    p.add_argument("--iterations", type=int, default=20, help="most rounds of the DoRA direction fit (default 20)")
    p.add_argument("--into-base", action="store_true", help="fuse into --base and save the pipeline to the folder OUTPUT")
    p.add_argument("--fp16", action="store_true", help="with --into-base: save the pipeline in float16")
    _add_output_args(p, "diffusers")
    p.set_defaults(func=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    from dora_diffusion.tools import merge_adapters, merge_into_base

    if args.into_base:
        if args.base is None:
            raise ValueError("--into-base needs --base (the SDXL pipeline to fuse the adapters into)")
        report = merge_into_base(args.adapters, args.base, args.output, args.strengths, args.fp16, args.overwrite)
        _print_report(report, per_module=False)
        return 0
    if args.fp16:
        raise ValueError("--fp16 applies to --into-base only")
    report = merge_adapters(args.adapters, args.output, args.strengths, args.base, args.rank, args.energy, args.kind,
                            args.iterations, args.to, args.overwrite)  # fmt: skip
    _print_report(report, not args.summary_only)
    return 0


# ---------------------------------------------------------------------------------------------- entry point

SUBCOMMANDS = [add_convert_parser, add_inspect_parser, add_analyze_parser, add_extract_parser, add_resize_parser,
               add_merge_parser, add_bake_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="DoRA adapters for SDXL: convert and inspect adapter files, analyze what they changed.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``dora-diffusion`` with ``argv`` (default: the process arguments); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors (argparse already printed)
        return int(exit_.code or 0)
    try:
        return args.func(args)
    except (AdapterFileError, MissingExtraError, ValueError, OSError) as err:
        print(printable(f"{PROG} {args.command}: error: {err}", PRINTED_LIMIT), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
