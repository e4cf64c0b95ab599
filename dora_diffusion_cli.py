"""The ``dora-diffusion`` command's entry point: it parses the arguments before anything heavy is imported.

``import dora_diffusion`` imports torch and diffusers (seconds), so the command's arguments are declared here, in a
module outside the package: ``dora-diffusion --help``, ``convert --help``, ``--version`` and usage errors answer
without them, and only a command that runs imports ``dora_diffusion.cli``, which does the work. The package's own
parsers (``dora_diffusion.cli.build_parser``, ``dora_diffusion.analysis.add_analyze_parser``) reuse the declarations
below and add each subcommand's function.
"""

from __future__ import annotations

import argparse
import sys

PROG = "dora-diffusion"
CONVERT_FORMATS = ("diffusers", "kohya", "comfyui")
"""``--to`` choices: ``dora_diffusion.formats.WRITE_FORMATS`` (a test keeps the two equal)."""
ANALYZE_DTYPES = ("bfloat16", "float16", "float32")
"""``analyze --dtype`` choices: ``dora_diffusion.analysis.scan.BASE_DTYPES`` (a test keeps the two equal)."""
TOOL_FORMATS = ("diffusers", "kohya")
"""The toolbox's ``--to`` choices: ``dora_diffusion.tools.output.OUTPUT_FORMATS`` (a test keeps the two equal)."""
DYNAMIC_METHODS = ("sv_ratio", "sv_cumulative", "sv_fro")
"""``resize --dynamic-method`` choices: ``dora_diffusion.tools.svd.DYNAMIC_METHODS`` (a test keeps the two equal)."""
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
"""``extract --components`` choices: ``dora_diffusion.formats.COMPONENTS`` (a test keeps the two equal)."""
DESCRIPTION = "DoRA adapters for SDXL: convert and inspect adapter files, analyze what they changed."


def declare_convert(subparsers) -> argparse.ArgumentParser:
    """``convert``'s arguments."""
    p = subparsers.add_parser(
        "convert",
        help="rewrite an adapter file in the diffusers or kohya dialect",
        description="Convert an SDXL DoRA/LoRA file between the diffusers/PEFT and kohya/LyCORIS dialects "
        "(kohya UNet names are written in SGM form). No model is loaded, except --base for ComfyUI-rule files.",
    )
    p.add_argument("input", help="adapter .safetensors file (or a directory holding one)")
    p.add_argument("output", help="where to write the converted .safetensors file")
    p.add_argument("--to", required=True, choices=CONVERT_FORMATS, type=str.lower,
                   help="dialect to write (any case): diffusers, kohya (LyCORIS-exact) or comfyui (kohya with a "
                   "dora_scale that ComfyUI/Forge render exactly; needs --base)")  # fmt: skip
    p.add_argument("--base", metavar="MODEL", default=None,
                   help="the base SDXL pipeline (directory or Hub id) the adapter was trained on; needed to write "
                   "--to comfyui and to read a file written that way")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    return p


def declare_inspect(subparsers) -> argparse.ArgumentParser:
    """``inspect``'s arguments."""
    p = subparsers.add_parser(
        "inspect",
        help="describe an adapter file",
        description="Print an adapter file's dialect, DoRA/LoRA and norm axis, ranks, alphas, module counts per "
        "component (Linear vs Conv2d), parameter count, base model and trigger words.",
    )
    p.add_argument("file", help="adapter .safetensors file (or a directory holding one)")
    return p


def declare_analyze(subparsers) -> argparse.ArgumentParser:
    """``analyze``'s arguments."""
    p = subparsers.add_parser(
        "analyze",
        help="magnitude and direction change per module (DoRA paper, Figure 2)",
        description="Apply each adapter alone to the base model and measure, per adapted module, the mean change of "
        "the output-channel norms (delta_M) and of their directions (delta_D, mean 1 - cos). Prints the slope and "
        "Pearson r of delta_M against delta_D per adapter, writes analysis.csv and the scatter plot analysis.png.",
    )
    p.add_argument("--base", required=True, metavar="MODEL",
                   help="the SDXL model the adapters were trained on: Hub id or local diffusers directory")  # fmt: skip
    p.add_argument("adapters", nargs="+", metavar="ADAPTER",
                   help="adapter .safetensors file or directory; a training output directory expands to its "
                   "checkpoint-N/ folders, ordered by step")  # fmt: skip
    p.add_argument("--out", default="analysis", metavar="DIR", help="output directory (default: ./analysis)")
    p.add_argument("--dtype", default="float32", choices=ANALYZE_DTYPES,
                   help="precision to load the base in; float16 halves memory (default: float32)")  # fmt: skip
    p.add_argument("--variant", default=None, help="weights variant to load, e.g. fp16 (as in from_pretrained)")
    p.add_argument("--modules", default=None, metavar="NAME[,NAME]",
                   help="only modules whose name ends with one of these (after a dot), e.g. to_q: the paper fits the "
                   "query matrices (Figure 2) or the value matrices (to_v, Figure 7), one kind of module at a time")  # fmt: skip
    p.add_argument("--title", default=None, help="plot title")
    return p


def _output_args(p: argparse.ArgumentParser, to_default: str | None) -> None:
    """The toolbox's output flags."""
    shown_default = "the input's dialect" if to_default is None else to_default
    p.add_argument("--to", choices=TOOL_FORMATS, default=to_default,
                   help=f"dialect to write (default: {shown_default}); kohya files carry ss_*/modelspec.* metadata")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (never an input)")
    p.add_argument("--summary-only", action="store_true", help="print the summary without a line per module")




def declare_bake(subparsers) -> argparse.ArgumentParser:
    """``bake``'s arguments (the toolbox, ``dora_diffusion.tools``)."""
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
    _output_args(p, None)
    return p


def declare_resize(subparsers) -> argparse.ArgumentParser:
    """``resize``'s arguments (the toolbox, ``dora_diffusion.tools``)."""
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
    _output_args(p, None)
    return p


def declare_extract(subparsers) -> argparse.ArgumentParser:
    """``extract``'s arguments (the toolbox, ``dora_diffusion.tools``)."""
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
    _output_args(p, "diffusers")
    return p


def declare_merge(subparsers) -> argparse.ArgumentParser:
    """``merge``'s arguments (the toolbox, ``dora_diffusion.tools``)."""
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
    _output_args(p, "diffusers")
    return p


DECLARATIONS = (
    declare_convert, declare_inspect, declare_analyze, declare_extract, declare_resize, declare_merge, declare_bake
)


def version() -> str:
    """The package's version, read from ``dora_diffusion/_version.py`` without importing the package."""
    import importlib.util
    import re
    from pathlib import Path

    spec = importlib.util.find_spec("dora_diffusion")
    text = (Path(spec.origin).parent / "_version.py").read_text(encoding="utf-8")
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


class _VersionAction(argparse.Action):
    """``--version``: prints ``dora-diffusion X.Y.Z`` and exits."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help="show the version and exit"):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{PROG} {version()}")
        parser.exit()


def build_parser(add=DECLARATIONS) -> tuple[argparse.ArgumentParser, list[argparse.ArgumentParser]]:
    """The top-level parser and the subcommands' parsers (declared by ``add``, in order)."""
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    parser.add_argument("--version", action=_VersionAction)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    return parser, [declare(subparsers) for declare in add]


def main(argv: list[str] | None = None) -> int:
    """Run ``dora-diffusion`` with ``argv`` (default: the process arguments); returns the exit status."""
    parser, _ = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors (argparse already printed)
        return int(exit_.code or 0)
    from dora_diffusion.cli import run_parsed

    return run_parsed(args)


if __name__ == "__main__":
    sys.exit(main())
