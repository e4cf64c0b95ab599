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
    p.add_argument("--title", default=None, help="plot title")
    return p


DECLARATIONS = (declare_convert, declare_inspect, declare_analyze)


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
