"""End to end in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright): open the
app, upload a generated image, read its token count, ask the chat about it and see the answer and the
drawn box. The chat model is the gen-2 checkpoint of conftest_app.make_box_model, whose weights make
greedy decoding write one fixed box. Screenshots go to $QVL_ARTIFACTS when set, else out/screenshots/ (git-ignored);
`QVL_ARTIFACTS=docs/screenshots pytest tests/test_app_browser.py` refreshes the ones in the docs.

Skipped only when /usr/bin/chromium (apt: chromium) or the playwright package is missing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from conftest_app import BOX_LABEL, BOX_TEXT, launch, make_box_model, make_tiny_model, write_png

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
SHOTS = Path(os.environ.get("QVL_ARTIFACTS") or ROOT / "out" / "screenshots")

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not installed (apt-get install chromium)")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
from playwright.sync_api import expect, sync_playwright  # noqa: E402

from qvl import media  # noqa: E402

expect.set_options(timeout=60_000)  # 2 shared cores: one step can take seconds


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    d = tmp_path_factory.mktemp("browser_models")
    bundled = d / "bundled"  # stands in for assets/models
    make_box_model(bundled / "box-gen2")
    make_tiny_model(bundled / "tiny-gen2.5", "2.5")
    demo, url = launch([], bundled)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu",
                                                                "--no-first-run", "--disable-background-networking",
                                                                "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})

    def loopback_only(route):
        url = route.request.url
        host = url.split("/")[2].split(":")[0] if "://" in url else ""
        if url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            route.abort()  # never wait on the outside world

    ctx.route("**/*", loopback_only)
    ctx.set_default_timeout(60_000)
    pg = ctx.new_page()
    pg.js_errors = []
    pg.on("pageerror", lambda e: pg.js_errors.append(str(e)))
    yield pg
    ctx.close()


def _save(page_or_locator, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / name
    page_or_locator.screenshot(path=str(path), **({"full_page": True} if hasattr(page_or_locator, "goto") else {}))
    return path


def _images_loaded(page, selector: str) -> None:
    page.wait_for_function(
        "s => { const i = [...document.querySelectorAll(s)]; return i.length > 0 && "
        "i.every(x => x.complete && x.naturalWidth > 0); }", arg=selector)


def test_upload_count_chat_and_box(page, app_url, tmp_path):
    png = write_png(tmp_path / "scene.png", 320, 240)
    n = media.account(png)["2.5"]["visual_tokens"]

    page.goto(app_url, wait_until="domcontentloaded")
    expect(page.locator("#media input[type='file']")).to_be_attached()

    # Tokens view: upload, read the count, see the patch grid
    page.locator("#media input[type='file']").set_input_files(png)
    expect(page.locator("#tok_count")).to_contain_text(f"Qwen2.5-VL: {n} · Qwen2-VL: {n} · Qwen-VL: 256")
    _images_loaded(page, "#grid_img img")
    _save(page, "tokens.png")

    # Chat: the bundled box model answers with a box, drawn on the image
    page.get_by_role("tab", name="Chat").click()
    page.locator("#model input").click()  # the default is the newest generation (tiny-gen2.5): pick the box model
    page.get_by_role("option", name="box-gen2").click()
    expect(page.locator("#model input")).to_have_value("box-gen2")
    mm = page.locator("#mm")
    mm.locator("input[type='file']").set_input_files(png)
    expect(mm.locator(".thumbnail-wrapper img")).to_be_visible()
    mm.locator("textarea[data-testid='textbox']").fill(f"Where is the {BOX_LABEL}?")
    mm.locator("button[data-testid='submit-button']").click()

    expect(page.locator("#chat [data-testid='bot']").last).to_contain_text(BOX_TEXT)
    expect(page.locator("#chat_stats")).to_contain_text("time to first token")
    annot = page.locator("#annot")
    expect(annot.locator("img.mask")).to_have_count(1)
    expect(annot.locator(".legend-item")).to_have_text(BOX_LABEL)
    expect(page.locator("#annot_note")).to_contain_text("Qwen2-VL convention")
    _images_loaded(page, "#annot img")
    # pick a generated token: its attention over the image appears
    page.locator("#attn_token input").click()
    page.get_by_role("option", name="4:").click()
    expect(page.locator("#attn_img [data-testid='status-tracker']")).to_have_class(re.compile("hide"))
    _images_loaded(page, "#attn_img img")
    _save(page, "chat_box.png")
    annot.screenshot(path=str(SHOTS / "chat_box_annotated.png"))
    assert page.js_errors == []


def test_positions_and_windows_render(page, app_url, tmp_path):
    png = write_png(tmp_path / "wide.png", 640, 300, seed=3)
    page.goto(app_url, wait_until="domcontentloaded")
    page.locator("#media input[type='file']").set_input_files(png)
    expect(page.locator("#tok_count")).to_contain_text("Qwen2.5-VL:")
    page.get_by_role("tab", name="Positions").click()
    expect(page.locator("#pos_plot .main-svg").first).to_be_visible()
    expect(page.locator("#pos_table")).to_contain_text("image 0")
    _save(page, "positions.png")
    page.get_by_role("tab", name="Window attention").click()
    _images_loaded(page, "#win_img img")
    expect(page.locator("#win_table")).to_contain_text("windows")
    _save(page, "windows.png")
    assert page.js_errors == []


# --------------------------------------------------------------------------------------------------
# The shipped qvl-tiny-2.5 (the app's default model) on a held-out generated scene
# --------------------------------------------------------------------------------------------------

SHIPPED = ROOT / "assets" / "models"


@pytest.fixture(scope="module")
def shipped_url():
    if not (SHIPPED / "qvl-tiny-2.5" / "config.json").exists():
        pytest.skip("assets/models/qvl-tiny-2.5 not trained yet")
    demo, url = launch([], SHIPPED)
    yield url
    demo.close()


def test_shipped_tiny_model_answers_with_a_box(page, shipped_url, tmp_path):
    from qvl.data import eval_samples

    sample = eval_samples("ground", "2.5", 1)[0]
    items = sample.prompt()[0]["content"]
    png = tmp_path / "held_out_scene.png"
    next(it["image"] for it in items if it.get("type") == "image").save(png)
    question = next(it["text"] for it in items if it.get("type") == "text")

    page.goto(shipped_url, wait_until="domcontentloaded")
    page.get_by_role("tab", name="Chat").click()
    expect(page.locator("#model input")).to_have_value("qvl-tiny-2.5")  # the default: newest generation
    mm = page.locator("#mm")
    mm.locator("input[type='file']").set_input_files(png)
    expect(mm.locator(".thumbnail-wrapper img")).to_be_visible()
    mm.locator("textarea[data-testid='textbox']").fill(question)
    mm.locator("button[data-testid='submit-button']").click()
    expect(page.locator("#chat [data-testid='bot']").last).to_contain_text("bbox_2d")
    expect(page.locator("#annot img.mask")).not_to_have_count(0)
    expect(page.locator("#annot_note")).to_contain_text("Qwen2.5-VL convention")
    # no block label drawn over the image's top-left corner, where a box often is (the heading sits above it)
    expect(page.locator("#annot [data-testid='block-label']")).to_be_hidden()
    expect(page.locator("#chat_stats")).to_contain_text("time to first token")
    _images_loaded(page, "#annot img")
    _save(page, "chat_tiny_model.png")
    SHOTS.mkdir(parents=True, exist_ok=True)
    (SHOTS / "chat_tiny_model_stats.txt").write_text(page.locator("#chat_stats").inner_text() + "\n")
    assert page.js_errors == []


def test_shipped_models_side_by_side_in_compare(page, shipped_url, tmp_path):
    """Compare: one held-out scene through every shipped tiny generation; one row each, with that
    generation's image-token count (qvl.media.account of the uploaded file)."""
    from qvl.data import eval_samples
    from qvl.train.tiny import GEN1_QUERIES

    shipped = sorted(d.name for d in SHIPPED.glob("qvl-tiny-*") if (d / "config.json").exists())
    sample = eval_samples("ground", "2", 1)[0]
    png = tmp_path / "held_out_scene.png"
    next(it["image"] for it in sample.prompt()[0]["content"] if it.get("type") == "image").save(png)
    acc = media.account(png)

    page.goto(shipped_url, wait_until="domcontentloaded")
    page.locator("#media input[type='file']").set_input_files(png)
    expect(page.locator("#tok_count")).to_contain_text("Qwen2.5-VL")
    page.get_by_role("tab", name="Compare").click()
    page.locator("#cmp_prompt textarea").fill(sample.qas[-1].question)
    page.locator("#cmp_btn").click()
    table = page.locator("#cmp_table")
    names = {"1": "Qwen-VL", "2": "Qwen2-VL", "2.5": "Qwen2.5-VL"}
    for name in shipped:  # each model, its generation's name and its own image-token count appear in the table
        g = name.removeprefix("qvl-tiny-")
        expect(table).to_contain_text(name)
        expect(table).to_contain_text(names[g])
        expect(table).to_contain_text(str(acc[g]["visual_tokens"] if g != "1" else GEN1_QUERIES))
    expect(page.locator("#cmp_gallery img")).not_to_have_count(0)
    # the whole drawing in each thumbnail: a cropping fit hid boxes at the top edge (and the convention note)
    expect(page.locator("#cmp_gallery img").first).to_have_css("object-fit", "contain")
    expect(page.locator("#cmp_gallery [data-testid='block-label']")).to_be_hidden()  # nothing over the corner
    _save(page, "compare_tiny_models.png")
    assert page.js_errors == []
