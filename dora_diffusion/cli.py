"""The ``dora-diffusion`` command: ``convert`` and ``inspect`` adapter files without loading a model.

Each subcommand is a pair of functions: ``add_<name>_parser(subparsers)`` registers the arguments that
``dora_diffusion_cli.declare_<name>`` declares (the entry point parses there before torch is imported) and sets
``func`` to ``run_<name>(args) -> int``. Add a subcommand by writing the pair and the declaration, listing the
first in ``SUBCOMMANDS``, the declaration in ``dora_diffusion_cli.DECLARATIONS`` and the function in ``run_parsed``. Errors a user can fix print one line to stderr and give a non-zero exit status (1 for a bad file, 2 for bad arguments).
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
from dora_diffusion.analysis import add_analyze_parser, run_analyze
from dora_diffusion.analysis.scan import load_base
from dora_diffusion.extras import MissingExtraError
from dora_diffusion.formats import COMPONENTS, AdapterFileError, ModuleAdapter, ParsedAdapter, trigger_words, write_safetensors
from dora_diffusion.formats.kohya import PREFIXES, key_prefix, to_sdxl_names, unet_naming
from dora_diffusion.formats.safefile import printable
from dora_diffusion.pipeline import base_weights

import dora_diffusion_cli as launcher
from dora_diffusion_cli import PROG, declare_convert, declare_inspect

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
    recorded_base, triggers = recorded_base_and_triggers(parsed.metadata)
    info.update({"base_model": recorded_base} if recorded_base else {}, **({"trigger_words": triggers} if triggers else {}))
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
    """Register ``convert`` (its arguments are declared in ``dora_diffusion_cli``)."""
    declare_convert(subparsers).set_defaults(func=run_convert)


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
            dim = m.size()[1]
            if dim in _CONTEXT_DIMS:
                return f"{_CONTEXT_DIMS[dim]} (UNet cross-attention width {dim})"
            return f"unknown: UNet cross-attention width {dim} (SDXL 2048, SD 1.x 768, SD 2.x 1024)"
    hint = parsed.metadata.get("ss_base_model_version") or parsed.metadata.get("modelspec.architecture")
    if hint:
        return f"{printable(hint)} (from the file's metadata)"
    if "text_encoder_2" in parsed.modules:
        return "SDXL (has a second text encoder)"
    return "unknown"


_DORA_SHORT = {"out": "DoRA per-output", "in": "DoRA per-input"}


def kind_label(m: ModuleAdapter) -> str:
    """One module's delta kind, rank or Kronecker factor, and DoRA axis: ``"LoKr w1 4x8 full, w2 rank 2, DoRA
    per-output"``, ``"LoHa Tucker rank 4"``, ``"LoRA/LoCon rank 8"``, ``"full diff + bias"``."""
    f = m.factors
    if m.kind == "kronecker":
        w1 = f["w1"].shape if "w1" in f else (f["w1_a"].shape[0], f["w1_b"].shape[1])
        side1 = f"w1 {w1[0]}x{w1[1]} " + ("full" if "w1" in f else f"rank {f['w1_b'].shape[0]}")
        side2 = "w2 full" if "w2" in f else f"w2 rank {f['w2_b'].shape[0]}" + (" Tucker" if "t2" in f else "")
        text = f"LoKr {side1}, {side2}"
    elif m.kind == "full":
        text = "full diff" + (" + bias" if "diff_b" in f else "")
    else:
        label = {"lowrank": "LoRA/LoCon", "tucker": "Tucker LoCon", "hadamard": "LoHa"}[m.kind]
        text = f"{label}{' Tucker' if 't1' in f else ''} rank {m.rank}"
    return text + (f", {_DORA_SHORT[m.norm_axis]}" if m.use_dora else "")


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
    kinds = Counter(_AXIS_LABELS[m.norm_axis] if m.use_dora else "LoRA" if m.kind == "lowrank" else "no DoRA" for m in mods)
    adapter = next(iter(kinds)) if len(kinds) == 1 else "mixed: " + _counts(kinds.elements())
    per_comp, per_kind = [], []
    for comp, cm in sorted(parsed.modules.items(), key=lambda item: COMPONENTS.index(item[0])):
        n_conv = sum(1 for m in cm.values() if m.is_conv)
        per_comp.append(f"{comp} {len(cm)} (Linear {len(cm) - n_conv}, Conv2d {n_conv})")
        per_kind.append(f"{comp}: {_counts(kind_label(m) for m in cm.values())}")
    params = sum(t.numel() for m in mods for t in m.tensors())
    alphas = _counts([m.alpha for m in mods])
    if any(m.use_rslora for m in mods):
        alphas += " (rsLoRA: scale alpha/sqrt(rank))"
    out = {
        "dialect": dialect,
        "adapter": adapter,
        "kind": "; ".join(per_kind),
        "rank": _counts([m.rank if m.rank else "none (full matrices)" for m in mods]),
        "alpha": alphas,
        "modules": "; ".join(per_comp),
        "parameters": f"{params:,}",
        "base model": _likely_base(parsed),
    }
    base, triggers = recorded_base_and_triggers(parsed.metadata)
    if base:
        out["base model"] = f"{printable(base, PRINTED_LIMIT)} (from the file's metadata; by its shapes: {out['base model']})"
    out["trigger words"] = printable(", ".join(triggers), PRINTED_LIMIT) if triggers else "none recorded in the file"
    meta = [f"{k}={printable(parsed.metadata[k])}" for k in _SHOWN_METADATA if k in parsed.metadata]
    if meta:
        out["metadata"] = "; ".join(meta)
    return out


def recorded_base_and_triggers(metadata: dict[str, str]) -> tuple[str | None, list[str]]:
    """The base model and trigger words a file's header records: dora-diffusion's ``dora_diffusion`` JSON
    (``base_model``), else kohya's ``ss_sd_model_name``; the words as ``formats.trigger_words`` reads them."""
    import json

    ours: dict = {}
    try:
        value = json.loads(metadata.get("dora_diffusion", "{}"))
        ours = value if isinstance(value, dict) else {}
    except (ValueError, RecursionError):
        pass
    base = ours.get("base_model") if isinstance(ours.get("base_model"), str) else metadata.get("ss_sd_model_name")
    return base or None, trigger_words(metadata)


def add_inspect_parser(subparsers) -> None:
    """Register ``inspect`` (its arguments are declared in ``dora_diffusion_cli``)."""
    declare_inspect(subparsers).set_defaults(func=run_inspect)


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


def add_bake_parser(subparsers) -> None:
    """Register ``bake`` (its arguments are declared in ``dora_diffusion_cli``)."""
    launcher.declare_bake(subparsers).set_defaults(func=run_bake)


def run_bake(args: argparse.Namespace) -> int:
    from dora_diffusion.tools import bake

    report = bake(args.input, args.output, args.rank, args.base, args.threshold, args.dynamic, args.to, args.overwrite)
    _print_report(report, not args.summary_only)
    return 0


def add_resize_parser(subparsers) -> None:
    """Register ``resize`` (its arguments are declared in ``dora_diffusion_cli``)."""
    launcher.declare_resize(subparsers).set_defaults(func=run_resize)


def run_resize(args: argparse.Namespace) -> int:
    from dora_diffusion.tools import resize

    report = resize(args.input, args.output, args.rank, args.dynamic_method, args.dynamic_param, args.base, args.to,
                    args.overwrite)  # fmt: skip
    _print_report(report, not args.summary_only)
    return 0


def add_extract_parser(subparsers) -> None:
    """Register ``extract`` (its arguments are declared in ``dora_diffusion_cli``)."""
    launcher.declare_extract(subparsers).set_defaults(func=run_extract)


def run_extract(args: argparse.Namespace) -> int:
    from dora_diffusion.tools import extract

    report = extract(args.finetuned, args.base, args.output, args.rank, args.energy, args.kind, args.components,
                     args.iterations, args.to, args.overwrite)  # fmt: skip
    _print_report(report, not args.summary_only)
    return 0


def add_merge_parser(subparsers) -> None:
    """Register ``merge`` (its arguments are declared in ``dora_diffusion_cli``)."""
    launcher.declare_merge(subparsers).set_defaults(func=run_merge)


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
    """The ``dora-diffusion`` parser, each subcommand with its function (``func``)."""
    parser, _ = launcher.build_parser(SUBCOMMANDS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``dora-diffusion`` with ``argv`` (default: the process arguments); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors (argparse already printed)
        return int(exit_.code or 0)
    return run_parsed(args)


def run_parsed(args: argparse.Namespace) -> int:
    """Run the subcommand ``args.command`` with its parsed arguments; errors a user can fix are one line, status 1."""
    func = getattr(args, "func", None) or {
        "convert": run_convert, "inspect": run_inspect, "analyze": run_analyze, "extract": run_extract,
        "resize": run_resize, "merge": run_merge, "bake": run_bake,
    }[args.command]  # fmt: skip
    if args.command in ("extract", "resize", "merge", "bake"):  # whole models, one module at a time
        from dora_diffusion.tools.weights import return_freed_memory

        return_freed_memory()
    try:
        return func(args)
    except (AdapterFileError, MissingExtraError, ValueError, OSError) as err:
        print(printable(f"{PROG} {args.command}: error: {err}", PRINTED_LIMIT), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
