#!/usr/bin/env python
"""Compare DoRA and LoRA adapters side by side at fixed seeds, in the browser (Gradio).

    python app.py --base stabilityai/stable-diffusion-xl-base-1.0 --adapter dora=runs/dora --adapter lora=runs/lora
    python app.py --demo        # offline on the CPU: the toy world's model, a DoRA and a LoRA trained on a subject

The page is built by ``dora_diffusion.app.ui``; planning, rendering, infotext, differences and scores live in
``dora_diffusion.compare``.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="app.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--base",
        "--pretrained_model_name_or_path",
        dest="base",
        default=None,
        help="SDXL base model: Hub id or local diffusers directory.",
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="An adapter to load at start (repeatable): a .safetensors file, a directory holding one, or a Hub "
        "repo id, in any dialect load_dora_weights reads. NAME is its column; without 'NAME=' it comes from PATH.",
    )
    p.add_argument("--demo", action="store_true", help="Offline CPU demo: the toy world's base model plus a DoRA and a LoRA trained on its ring-star subject.")
    p.add_argument(
        "--cache_dir", default=None, help="Cache of --demo's model and adapters (default ~/.cache/dora-diffusion/demo)."
    )
    p.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1: this machine only).")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="Also open a public gradio.live link.")
    p.add_argument("--device", default=None, help="cuda, cpu, mps... (default: cuda if available, else cpu).")
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        default="auto",
        help="Weights dtype (auto: float16 on a GPU, float32 on the CPU).",
    )
    p.add_argument("--variant", default=None, help="Weight variant of the base model files, e.g. fp16.")
    p.add_argument("--max_cells", type=int, default=64, help="Most images one grid may hold.")
    p.add_argument("--num_threads", type=int, default=None, help="Torch CPU threads (default: torch's; --demo: 1).")
    p.add_argument(
        "--score_model",
        default="openai/clip-vit-base-patch32",
        help="CLIP model (Hub id or local folder) that scores each column: CLIP-T, and CLIP-I with --instance_dir. "
        "'none' turns scores off. The toy world's model (--demo) uses its own scorer.",
    )
    p.add_argument(
        "--instance_dir",
        default=None,
        help="Folder of the subject's instance images: adds subject fidelity (CLIP-I) to the scores. Not read on the "
        "toy world's model, whose scorer knows the subject by its trigger word.",
    )
    p.add_argument(
        "--subject_model",
        default=None,
        help="With --instance_dir: a DINO model (e.g. facebook/dinov2-small) that adds DINO subject fidelity.",
    )
    p.add_argument(
        "--upload_dir",
        default=None,
        help="Where adapters uploaded on the page are kept (default ~/.cache/dora-diffusion/uploads).",
    )
    p.add_argument(
        "--allow_dir",
        action="append",
        default=[],
        metavar="DIR",
        help="A folder (repeatable) whose adapters visitors may load by path on the page. The page reads local "
        "files only under these, the --adapter paths, the demo's cache and --upload_dir; other text is a Hub repo id.",
    )
    args = p.parse_args(argv)
    if not args.demo and not args.base:
        p.error("give --base MODEL (with --adapter NAME=PATH ...), or --demo")
    if args.demo and args.base:
        p.error("--demo uses the toy world's base model; drop --base")
    if args.demo and args.adapter:
        p.error("--demo loads its own two adapters; add more from the page")
    if args.demo and args.device not in (None, "cpu"):
        p.error("--demo runs the toy world's pipeline on the CPU; drop --device")
    for folder in args.allow_dir:
        if not os.path.isdir(folder):
            p.error(f"--allow_dir {folder}: not an existing folder")
    if args.max_cells < 1:
        p.error(f"--max_cells must be at least 1, got {args.max_cells}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from dora_diffusion.extras import MissingExtraError, require

    try:
        require("app", "app.py")
        if args.demo:
            require("train", "app.py --demo (it trains its adapters)", ("accelerate",))
    except MissingExtraError as err:
        sys.exit(f"app.py: error: {err}")
    import torch

    from dora_diffusion import AdapterFileError
    from dora_diffusion.app.ui import analysis_tab, build_ui
    from dora_diffusion.compare import (
        CompareError,
        Comparer,
        GenerationSettings,
        check_adapter_args,
        load_base_pipeline,
        make_scorer,
    )

    try:
        adapters = check_adapter_args(args.adapter)  # before the base model: a typo fails in a second
    except (CompareError, AdapterFileError) as err:
        sys.exit(f"app.py: error: {err}")
    threads = args.num_threads if args.num_threads is not None else (1 if args.demo else 0)
    if threads:
        torch.set_num_threads(threads)
    if args.demo:
        from dora_diffusion import demo

        assets = demo.prepare_demo(args.cache_dir)
        comparer = demo.demo_comparer(assets)
        allow_dirs = [assets.root, *args.allow_dir]
        prompt, steps, seeds, guidance = demo.PROMPT, demo.STEPS, demo.SEEDS, demo.GUIDANCE
    else:
        try:
            pipe = load_base_pipeline(args.base, args.device, args.dtype, args.variant)
        except (OSError, ValueError) as err:
            sys.exit(f"app.py: error: --base {args.base}: {err}")
        comparer = Comparer(pipe, args.base, args.max_cells, args.variant)
        for name, source, file in adapters:
            try:
                comparer.load_adapter(source, name, file)
            except (CompareError, AdapterFileError, OSError, ValueError) as err:
                sys.exit(f"app.py: error: --adapter {name}={source}: {err}")
        prompt, steps, seeds, guidance = "", 25, "0-3", 5.0
        allow_dirs = list(args.allow_dir)
    comparer.max_cells = args.max_cells
    side = comparer.default_size
    settings = GenerationSettings(prompt, num_inference_steps=steps, guidance_scale=guidance, width=side, height=side)
    scorer = make_scorer(comparer.model, args.score_model, args.instance_dir, comparer.device.type, args.subject_model)
    ui = build_ui(
        comparer,
        settings,
        seeds,
        extra_tabs={"Analysis": analysis_tab},
        scorer=scorer,
        upload_dir=args.upload_dir,
        host=args.host,
        allow_dirs=allow_dirs,
    )
    ui.launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
