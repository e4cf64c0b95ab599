"""The page in a real browser: Debian's chromium, driven by Playwright, against ``python app.py``.

Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``) and the ``playwright`` package (``pip install
playwright``; no browser download: Playwright drives the system chromium through ``executable_path``). The
test is skipped, naming what is missing, only when one of the two is absent. ``DORA_CHROMIUM`` points to
another chromium binary; ``DORA_SCREENSHOT_DIR`` keeps the screenshots (default: pytest's tmp_path).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dora_diffusion.testing import save_tiny_sdxl_pipeline
from helpers import free_port, make_adapter_file

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("DORA_CHROMIUM", "/usr/bin/chromium")
# the flags of a headless chromium on a machine with a closed network (no background connections)
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
PROMPT = "a photo of TOK toy on a table"

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright); it drives Debian's chromium"
)
if not Path(CHROMIUM).is_file():
    pytest.skip(
        f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)", allow_module_level=True
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``python app.py --base <tiny model> --adapter dora=... --adapter lora=...`` on a free 127.0.0.1 port."""
    root = tmp_path_factory.mktemp("browser")
    model = save_tiny_sdxl_pipeline(root / "model")
    dora = make_adapter_file(root / "dora", seed=1)
    lora = make_adapter_file(root / "lora", seed=2, use_dora=False)
    port = free_port()
    log = open(root / "app.log", "w")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(REPO / "app.py"), "--base", str(model), "--adapter", f"dora={dora}",
           "--adapter", f"lora={lora}", "--port", str(port), "--num_threads", "1", "--allow_dir", str(root)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{(root / 'app.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"app.py did not answer on {url} within 120 s:\n{(root / 'app.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            # the page's load event shows the adapters loaded now; on a busy machine its answer can land after a
            # test's first step (and hide a slot that step just added), so wait for it
            with page.expect_response(lambda r: r.request.method == "POST" and "/run/predict" in r.url):
                page.goto(server)
            page.wait_for_selector("#generate")
            page.wait_for_timeout(300)
            yield page
        finally:
            browser.close()


def _screenshot(page, tmp_path: Path, name: str, full_page: bool = True) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=full_page)
    keep = os.environ.get("DORA_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / name)
    print(f"screenshot: {path}")
    return path


def test_generate_a_grid_in_the_browser(page, tmp_path):
    expect = sync_api.expect
    prompt, seeds = page.locator("#prompt textarea"), page.locator("#seeds textarea")
    prompt.fill(PROMPT)
    page.locator("#steps input[type=number]").fill("2")

    # a malformed seed list: an error on the page, and nothing typed is lost
    seeds.fill("0-x")
    page.click("#generate")
    error = page.locator(".toast-body.error")
    expect(error).to_contain_text("'0-x' is not a seed")
    page.wait_for_timeout(500)  # the toast fades in
    _screenshot(page, tmp_path, "app_error.png")
    assert prompt.input_value() == PROMPT and seeds.input_value() == "0-x"
    assert page.locator("#steps input[type=number]").input_value() == "2"
    error.get_by_label("Close").click()
    expect(error).to_have_count(0)

    # Stop cancels a long grid (30 cells x 30 steps); the page then serves the next request at once
    seeds.fill("0-9")
    page.locator("#steps input[type=number]").fill("30")
    page.click("#generate")
    page.wait_for_selector("#gallery img")
    page.click("#stop")
    page.wait_for_timeout(1500)  # a person's pause; a click in the same instant would be cancelled too
    shown = page.locator("#gallery img").count()
    page.wait_for_timeout(1500)
    assert page.locator("#gallery img").count() == shown < 30  # no cell arrives after Stop
    page.locator("#steps input[type=number]").fill("2")

    seeds.fill("0-1")
    start = time.time()
    page.click("#generate")
    page.wait_for_selector("#grid-file a")  # the grid PNG comes last
    assert time.time() - start < 45
    expect(page.locator("#gallery img")).to_have_count(6)
    for caption in ("base · — · seed 0", "dora · 1.00 · seed 0", "lora · 1.00 · seed 1"):
        expect(page.locator("#gallery").get_by_text(caption)).to_be_visible()
    assert page.locator("#grid-file a").first.get_attribute("href").endswith("/grid.png")
    expect(page.locator("#snippet")).to_contain_text("adapter_name='dora'")
    shot = _screenshot(page, tmp_path, "app_grid.png")
    assert shot.stat().st_size > 20_000

    # choosing a cell shows its parameters and snippet
    page.locator("#gallery").get_by_text("lora · 1.00 · seed 1").click()
    expect(page.locator("#snippet")).to_contain_text("adapter_name='lora'")
    expect(page.locator("#snippet")).to_contain_text("manual_seed(1)")


def test_failed_load_and_restore_leave_the_form_as_it_was(page, tmp_path):
    """Issue 17: errors of Load adapter and Restore show as toasts (quotes kept) and on the message area; the
    form keeps its values and shows no error badge. Then Ctrl+Enter renders a 6-column sweep whose captions are
    whole and whose grid PNG shows on the page."""
    from PIL import Image

    expect = sync_api.expect
    page.locator("#prompt textarea").fill(PROMPT)
    page.locator("#seeds textarea").fill("0, 5")
    page.locator("#steps input[type=number]").fill("2")
    page.locator("#sweep-0 textarea, #sweep-0 input").first.fill("0, 0.25, 0.5, 0.75, 1")
    page.get_by_text("Add or remove adapters").click()
    page.locator("#add-source textarea, #add-source input").first.fill("no-such-adapter")
    page.click("#add-adapter")
    toast = page.locator(".toast-body.error")
    expect(toast).to_contain_text("'no-such-adapter' is not an existing file or directory")  # first quote kept
    expect(toast).to_contain_text("Hub repo id 'owner/name'.")  # and the last
    expect(page.locator("#message")).to_contain_text("Not done: 'no-such-adapter' is not an existing file")
    # text from a visitor (or a PNG, or a file) is shown as text: no HTML in the toast, no Markdown on the page
    page.locator("#add-source textarea, #add-source input").first.fill("/etc/<b>x</b><img src=http://127.0.0.1:9/x.png>")
    page.click("#add-adapter")
    expect(toast.filter(has_text="<img src=http://127.0.0.1:9/x.png>")).to_have_count(1)
    expect(page.locator("#message")).to_contain_text("<b>x</b><img src=")
    assert page.locator(".toast-body img, .toast-body b, #message img").count() == 0
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    page.get_by_text("Restore settings from a PNG made here").click()
    page.locator("#restore-upload input[type=file]").set_input_files(str(plain))
    expect(toast.filter(has_text="plain.png carries no generation parameters")).to_have_count(1)
    expect(page.locator("#message")).to_contain_text("Not done: plain.png carries no generation parameters")
    page.wait_for_timeout(500)
    form = ["#prompt", "#seeds", "#steps", "#scheduler", "#include-base", "#slot-0", "#slot-1", "#width", "#height"]
    for selector in form:
        expect(page.locator(f"{selector} span.error")).to_have_count(0)
    assert page.locator("#prompt textarea").input_value() == PROMPT
    assert page.locator("#seeds textarea").input_value() == "0, 5"
    assert page.locator("#steps input[type=number]").input_value() == "2"
    assert page.locator("#use-0 input").is_checked() and page.locator("#use-1 input").is_checked()
    _screenshot(page, tmp_path, "app_after_errors.png")
    for close in page.locator(".toast-body.error").get_by_label("Close").all():
        close.click()

    page.locator("#prompt textarea").press("Control+Enter")  # 2 seeds x (base + 5 dora strengths + lora)
    expect(page.locator("#gallery img")).to_have_count(14, timeout=60_000)
    expect(page.locator("#message")).to_contain_text("Done: 14 cells")
    captions = page.locator("#gallery .caption-label")
    expect(captions.filter(has_text="dora · 0.25 · seed 5")).to_have_count(1)
    for i in range(captions.count()):  # wrapped, never cut with '…'
        assert captions.nth(i).evaluate("e => e.scrollWidth <= e.clientWidth + 1"), captions.nth(i).inner_text()
    page.get_by_role("tab", name="Grid PNG").click()
    expect(page.locator("#grid-image img")).to_have_count(1)
    _screenshot(page, tmp_path, "app_sweep_grid.png")
    # issue 26: the label and the buttons float over the image's top corners; the image (its title) starts below
    # them, on a desktop and on a phone
    geometry = """() => { const r = s => document.querySelector(s).getBoundingClientRect();
        return [r("#grid-image label").bottom, r("#grid-image .icon-button-wrapper").bottom, r("#grid-image img").top]; }"""
    for width in (1400, 390):
        page.set_viewport_size({"width": width, "height": 1000})
        page.wait_for_timeout(300)
        label_bottom, buttons_bottom, image_top = page.evaluate(geometry)
        assert label_bottom <= image_top and buttons_bottom <= image_top, (width, label_bottom, buttons_bottom, image_top)
    page.locator("#grid-image").screenshot(path=str(tmp_path / "grid_phone.png"))
    page.set_viewport_size({"width": 1400, "height": 1000})

    # removing an adapter hides its slot; the others keep their ticks, strengths and sweeps
    page.get_by_role("tab", name="Cells").click()
    page.locator("#remove-choice input").click()
    page.get_by_role("option", name="lora").click()
    page.click("#remove-adapter")
    expect(page.locator("#message")).to_contain_text("Removed lora")
    expect(page.locator("#slot-1")).to_be_hidden()
    assert page.locator("#sweep-0 textarea").input_value() == "0, 0.25, 0.5, 0.75, 1"


def _png_with_parameters(path: Path, seed: int) -> Path:
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", f"{PROMPT}\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: {seed}, Size: 64x64, Model: m")
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


# each row: the check, and the JavaScript that returns the offending elements' text ([] when the layout holds)
LAYOUT_CHECKS = {
    "a gallery scrolls sideways": """() => [...document.querySelectorAll('#gallery .grid-wrap, #differences .grid-wrap')]
        .filter(e => e.offsetParent && e.scrollWidth > e.clientWidth + 1).map(e => e.closest('[id]').id)""",
    "a caption covers its image or is cut": """() => [...document.querySelectorAll('#gallery .thumbnail-item, #differences .thumbnail-item')]
        .filter(e => e.offsetParent).filter(e => { const c = e.querySelector('.caption-label'), i = e.querySelector('img');
          return c && (c.getBoundingClientRect().top < i.getBoundingClientRect().bottom - 1 || c.scrollWidth > c.clientWidth + 1); })
        .map(e => e.innerText)""",
    "a table scrolls sideways": """() => [...document.querySelectorAll('#scores *')]
        .filter(e => e.offsetParent && e.scrollWidth > e.clientWidth + 1 && /auto|scroll/.test(getComputedStyle(e).overflowX))
        .map(e => e.tagName + '.' + e.className + ' ' + e.scrollWidth + '>' + e.clientWidth)""",
    "a table header breaks inside a word or overflows": """() => [...document.querySelectorAll('#scores th')]
        .filter(e => { const s = getComputedStyle(e.querySelector('span') || e);
          return s.wordBreak !== 'normal' || s.overflowWrap !== 'normal' || e.scrollWidth > e.clientWidth + 1; })
        .map(e => e.innerText)""",
}


PROGRESS_WATCH = """() => {
  window.progressShownOn = new Set(); window.timerShown = false;
  new MutationObserver(() => {
    document.querySelectorAll('.progress-level').forEach(e => { if (e.offsetParent) window.progressShownOn.add(e.closest('[id]').id); });
    document.querySelectorAll('.meta-text').forEach(e => { if (e.offsetParent && /[0-9.]+s/.test(e.innerText)) window.timerShown = true; });
  }).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
}"""
"""Records, while a grid renders, which outputs showed a progress bar and whether an elapsed-time counter showed."""


def test_the_page_fits_a_desktop_and_a_phone(page, tmp_path, tmp_path_factory):
    """Issue 29 (4, 5, 7, 8): an empty prompt is refused (its placeholder is no prompt); one progress bar, on the
    gallery, without a timer; captions under their images; whole table headers; the chosen difference pair named
    in the table and the message; a wrapped snippet, a grey Stop while idle, local fonts; on a phone no gallery
    scrolls sideways and Generate is on the first screen; a second PNG restores without removing the first."""
    expect = sync_api.expect
    page.set_viewport_size({"width": 1400, "height": 1800})
    if not page.evaluate("() => [...document.querySelectorAll('#slot-1')].some(e => e.offsetParent)"):  # an earlier test of this server removed the LoRA: load it again
        lora = next(tmp_path_factory.getbasetemp().glob("browser*/lora/*.safetensors"))
        page.get_by_text("Add or remove adapters").click()
        page.locator("#add-source textarea, #add-source input").first.fill(str(lora))
        page.click("#add-adapter")
        expect(page.locator("#message")).to_contain_text("Loaded lora")
        page.get_by_text("Add or remove adapters").click()
    prompt = page.locator("#prompt textarea")
    assert prompt.input_value() == ""  # the tiny adapters' files name no trigger words
    assert prompt.get_attribute("placeholder").startswith("(empty) describe the image")
    page.click("#generate")
    expect(page.locator(".toast-body.error")).to_contain_text("the prompt is empty")
    page.locator(".toast-body.error").get_by_label("Close").click()
    assert "secondary" in page.locator("#stop").get_attribute("class")  # not the red 'stop' variant while idle
    assert page.evaluate("() => getComputedStyle(document.querySelector('h2')).fontFamily").startswith('"DejaVu Sans"')

    prompt.fill(PROMPT)
    page.locator("#seeds textarea").fill("0")
    page.locator("#steps input[type=number]").fill("4")
    page.locator("#sweep-0 textarea").fill("0, 0.5, 1")  # 5 columns: base, dora x 3, lora
    page.locator("#difference-pair input").fill("lora vs dora")
    page.locator("#difference-pair input").press("Enter")
    page.evaluate(PROGRESS_WATCH)  # the grid may take well under a second: record what its progress showed
    page.click("#generate")
    expect(page.locator("#message")).to_contain_text("Done: 5 cells", timeout=60_000)
    shown = page.evaluate("() => [[...window.progressShownOn], window.timerShown]")
    assert shown == [["gallery"], False]  # one progress bar, not one per output, and no elapsed-time counter
    expect(page.locator("#message")).to_contain_text("mean |lora − dora| compares lora with dora at the same strength")
    expect(page.locator("#scores th").last).to_contain_text("mean |lora − dora|")
    assert page.locator("#snippet .cm-lineWrapping").count() == 1
    for name, script in LAYOUT_CHECKS.items():
        assert page.evaluate(script) == [], name
    _screenshot(page, tmp_path, "app_desktop.png")
    page.get_by_role("tab", name="Differences").click()
    expect(page.locator("#differences img")).to_have_count(5)  # 4 against the base, 1 pair
    expect(page.locator("#differences").get_by_text("|lora 1.00 − dora 1.00| · seed 0", exact=False)).to_be_visible()
    assert page.evaluate(LAYOUT_CHECKS["a caption covers its image or is cut"]) == []
    page.get_by_role("tab", name="Cells").click()

    page.set_viewport_size({"width": 390, "height": 844})
    page.evaluate("() => window.scrollTo(0, 0)")
    page.wait_for_timeout(200)
    assert page.locator("#generate").bounding_box()["y"] + page.locator("#generate").bounding_box()["height"] <= 844
    for name, script in LAYOUT_CHECKS.items():
        assert page.evaluate(script) == [], f"phone: {name}"
    _screenshot(page, tmp_path, "app_phone.png", full_page=False)  # the form, Generate at the bottom
    page.evaluate("() => document.querySelector('#message').scrollIntoView()")
    page.wait_for_timeout(200)
    _screenshot(page, tmp_path, "app_phone_results.png", full_page=False)
    page.set_viewport_size({"width": 1400, "height": 1800})

    page.get_by_text("Restore settings from a PNG made here").click()
    upload = page.locator("#restore-upload input[type=file]")
    upload.set_input_files(str(_png_with_parameters(tmp_path / "seed3.png", 3)))
    expect(page.locator("#seeds textarea")).to_have_value("3")
    expect(page.locator("#restore-upload").get_by_text("seed3.png")).to_have_count(0)  # the box is empty again
    upload.set_input_files(str(_png_with_parameters(tmp_path / "seed4.png", 4)))
    expect(page.locator("#seeds textarea")).to_have_value("4")


def test_adding_an_adapter_fills_an_empty_prompt_with_its_trigger_words(page, tmp_path_factory):
    """Issue 29 (5): the prompt is filled from trigger words whenever an adapter is added while the box is empty
    (was: only when the page was built); a prompt the person typed is never replaced."""
    from dora_diffusion.formats import read_safetensors, write_safetensors

    expect = sync_api.expect
    root = next(tmp_path_factory.getbasetemp().glob("browser*"))
    state, meta = read_safetensors(next((root / "dora").glob("*.safetensors")))
    for name, words in (("trig", "TOK, sks"), ("trig2", "zwx")):
        write_safetensors(state, root / f"{name}.safetensors", {**meta, "modelspec.trigger_phrase": words})
    prompt = page.locator("#prompt textarea")
    prompt.fill("")
    page.get_by_text("Add or remove adapters").click()
    page.locator("#add-source textarea, #add-source input").first.fill(str(root / "trig.safetensors"))
    page.click("#add-adapter")
    expect(page.locator("#message")).to_contain_text("Loaded trig")
    expect(prompt).to_have_value("TOK, sks")
    prompt.fill(PROMPT)
    page.locator("#add-source textarea, #add-source input").first.fill(str(root / "trig2.safetensors"))
    page.click("#add-adapter")
    expect(page.locator("#message")).to_contain_text("Loaded trig2")
    page.wait_for_timeout(300)
    assert prompt.input_value() == PROMPT
    for name in ("trig", "trig2"):  # leave the server as the other tests expect it
        page.locator("#remove-choice input").click()
        page.get_by_role("option", name=name, exact=True).click()
        page.click("#remove-adapter")
        expect(page.locator("#message")).to_contain_text(f"Removed {name}")
