#!/usr/bin/env python
"""Screenshots of the comparison page with the toy-world demo, for docs/app.md (headless Debian chromium).

    python docs/make_app_screenshots.py --cache_dir /tmp/demo --out docs/img

Starts ``python app.py --demo`` on a free 127.0.0.1 port, renders a sweep of the DoRA adapter (0, 0.5, 1, 1.5)
beside the base model and the LoRA for seeds 0-3, and saves the Cells (the whole page at 1400x1800), Differences,
Grid PNG and Analysis views, and the page on a phone (390x844: the form, then the results). Prints the per-column
table and the difference means it read from the page.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shrink(path: Path) -> None:
    """Re-save a screenshot as a 256-colour PNG (a third of the size; text stays sharp)."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def start_app(flags: list[str]) -> tuple[subprocess.Popen, str]:
    """``python app.py FLAGS`` on a free 127.0.0.1 port; returns the process and its URL once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), *flags, "--port", str(port)], cwd=REPO)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(600):
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    return proc, url


def open_page(pw, url: str):
    """Headless Debian chromium on ``url`` at 1400x1800, once the page's Generate button is there."""
    browser = pw.chromium.launch(executable_path=shutil.which("chromium"), headless=True, args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.set_default_timeout(300_000)
    page.goto(url)
    page.wait_for_selector("#generate")
    return browser, page


def generate(page, timeout_ms: int = 300_000) -> None:
    """Start a render with Ctrl+Enter in the prompt and wait for "Done". A busy machine can serve the page before its
    key handler is attached, and the press then starts nothing: when no sign of a render (the progress's "cell 1 of
    N", or the message) shows within 30 s, click the Generate button instead, twice at most; then fail naming that."""
    from playwright.sync_api import expect

    started = (page.get_by_text(re.compile(r"cell \d+ of \d+"))
               .or_(page.locator("#message").get_by_text(re.compile("Rendering|Done|Stopped"))).first)  # fmt: skip
    for attempt in range(3):
        if attempt == 0:
            page.locator("#prompt textarea").press("Control+Enter")
        else:
            print(f"Generate showed no progress within 30 s; clicking the button (try {attempt + 1} of 3)")
            page.click("#generate")
        try:
            expect(started).to_be_visible(timeout=30_000)
            break
        except AssertionError:
            continue
    else:
        raise RuntimeError("Generate did not start: no progress within 30 s of Ctrl+Enter and of two clicks")
    expect(page.locator("#message")).to_contain_text("Done", timeout=timeout_ms)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache_dir", default=None, help="the demo's cache (python -m dora_diffusion.demo --cache_dir)")
    p.add_argument("--out", default=str(REPO / "docs" / "img"))
    args = p.parse_args()
    from playwright.sync_api import expect, sync_playwright

    cmd = ["--demo"] + (["--cache_dir", args.cache_dir] if args.cache_dir else [])
    proc, url = start_app(cmd)
    out = Path(args.out)
    try:
        with sync_playwright() as pw:
            browser, page = open_page(pw, url)
            page.locator("#sweep-0 textarea").fill("0, 0.5, 1, 1.5")
            generate(page)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(out / "app_cells.png"), full_page=True)
            print(page.locator("#scores").inner_text())
            page.get_by_role("tab", name="Differences").click()
            page.wait_for_timeout(1000)
            page.locator("#differences").screenshot(path=str(out / "app_differences.png"))
            page.get_by_role("tab", name="Grid PNG").click()
            page.wait_for_timeout(1000)
            page.locator("#grid-image").screenshot(path=str(out / "app_grid.png"))
            page.get_by_role("tab", name="Cells").click()
            page.set_viewport_size({"width": 390, "height": 844})
            page.evaluate("() => window.scrollTo(0, 0)")
            page.wait_for_timeout(1000)
            page.screenshot(path=str(out / "app_phone.png"))
            page.evaluate("() => document.querySelector('#message').scrollIntoView()")
            page.wait_for_timeout(1000)
            page.screenshot(path=str(out / "app_phone_results.png"))
            page.set_viewport_size({"width": 1400, "height": 1800})
            page.get_by_role("tab", name="Analysis").click()
            page.locator("#analysis-panels input").check()
            page.click("#analyse")
            expect(page.locator("#analysis-csv a")).to_have_count(1, timeout=120_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(out / "app_analysis.png"), full_page=True)
            browser.close()
        for name in ("app_cells.png", "app_differences.png", "app_grid.png", "app_analysis.png", "app_phone.png",
                     "app_phone_results.png"):
            shrink(out / name)
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
