#!/usr/bin/env python
"""A LoKr-DoRA trained by LyCORIS's own module beside the demo's LoRA in the comparison page (docs/app.md, issue 30).

    python docs/make_lokr_screenshot.py --out docs/img        # about 2 minutes on 2 CPU cores

Trains a LoKr with weight decomposition (``lycoris.modules.lokr.LokrModule``, ``weight_decompose=True``,
``wd_on_out=True``: DoRA per output channel) on the demo subject's images, on the toy world's attention layers, with
the training script's objective (``training.step.step.predict`` + ``loss.denoising_loss``); saves it as LyCORIS
does (kohya names, its ``custom_state_dict``); then opens ``python app.py`` with the toy base, that file and the
demo's LoRA, renders both at seeds 0-3 and screenshots the page (1400x1800).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "docs"))
sys.path.insert(0, str(REPO))

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def train_lokr_dora(pipe, data, path: Path, steps: int, seed: int = 0) -> Path:
    """LyCORIS LoKr-DoRA modules on the UNet's attention Linears, trained ``steps`` steps; saved in kohya naming."""
    import torch
    from lycoris.modules.lokr import LokrModule
    from safetensors.torch import save_file

    from dora_diffusion.toyworld.finetune import fit

    torch.manual_seed(seed)
    unet = pipe.unet.float().requires_grad_(False)
    modules = {n: m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(TARGETS)}
    lycos = {}
    for name, module in modules.items():
        lyco = LokrModule(name, module, 1.0, lora_dim=4, alpha=4, factor=8, weight_decompose=True, wd_on_out=True, bypass_mode=False)
        lyco.apply_to()
        lycos[name] = lyco
    params = [p for lyco in lycos.values() for p in lyco.parameters() if p.requires_grad]
    fit(pipe, unet, data, torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4), params, steps, seed)
    state = {}
    for name, lyco in lycos.items():
        for key, value in lyco.custom_state_dict().items():
            state[f"lora_unet_{name.replace('.', '_')}.{key}"] = value.detach().float().contiguous()  # LyCORIS' diffusers naming
        lyco.restore()
    save_file(state, path, metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "lokr", "dora_wd": true}'})
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "docs" / "img"))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--work", default="/tmp/lokr-screenshot")
    args = p.parse_args()
    import torch
    from playwright.sync_api import sync_playwright

    from dora_diffusion import toyworld
    from dora_diffusion.demo import SUBJECT, prepare_demo
    from dora_diffusion.toyworld.finetune import encode_subject
    from make_app_screenshots import generate, open_page, shrink, start_app

    torch.set_num_threads(2)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    assets = prepare_demo()
    pipe = toyworld.load_pipeline()
    start = time.perf_counter()
    lokr = train_lokr_dora(pipe, encode_subject(pipe, SUBJECT), work / "lokr_dora.safetensors", args.steps)
    print(f"trained the LoKr-DoRA ({args.steps} steps) in {time.perf_counter() - start:.0f} s: {lokr}")
    proc, url = start_app(["--base", str(assets.model_dir), "--adapter", f"lokr_dora={lokr}",
                           "--adapter", f"lora={assets.adapters['lora']}", "--num_threads", "2"])  # fmt: skip
    try:
        with sync_playwright() as pw:
            browser, page = open_page(pw, url)
            page.locator("#prompt textarea").fill(f"{SUBJECT.instance_prompt} on a striped background")
            generate(page)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(Path(args.out) / "app_lokr.png"), full_page=True)
            print(page.locator("#scores").inner_text())
            browser.close()
        shrink(Path(args.out) / "app_lokr.png")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
