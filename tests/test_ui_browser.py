"""The Gradio UI in a real headless Chromium (Debian's package): load /ui, chat, see a streamed reply; FinQA tab."""

from __future__ import annotations

import itertools
import os
import shutil

import pytest

from tests.conftest import REPO, Server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.browser, pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")]

# Without the background-networking flags Chromium keeps dialling out, which this offline box refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def page(server: Server, tmp_path_factory: pytest.TempPathFactory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(f"{server.url}/ui/", wait_until="load", timeout=60_000)
        page.get_by_role("textbox").first.wait_for(timeout=60_000)
        yield page
        browser.close()


BOT_TEXT = (
    "() => { const b = [...document.querySelectorAll('[data-testid=\"bot\"]')].pop(); return b ? b.innerText.trim() : ''; }"
)


def test_chat_streams_a_reply(page) -> None:
    box = page.get_by_role("textbox").first
    box.fill("Write a short story about a lighthouse keeper.")
    box.press("Enter")
    seen: list[str] = []  # the reply as the browser shows it, sampled while it streams
    quiet = 0
    for _ in range(1200):
        text = page.evaluate(BOT_TEXT)
        if text and (not seen or text != seen[-1]):
            seen.append(text)
            quiet = 0
        quiet += 1
        if seen and quiet > 60:  # unchanged for 3 s: the stream is over
            break
        page.wait_for_timeout(50)
    assert len(seen) >= 3, f"expected the reply to grow while streaming, saw {seen}"
    assert all(later.startswith(earlier[:20]) for earlier, later in itertools.pairwise(seen))
    assert len(seen[-1]) > 20
    if os.environ.get("ADAPTSERVE_SCREENSHOT"):  # refresh the README screenshot: ADAPTSERVE_SCREENSHOT=1 make test
        page.screenshot(path=str(REPO / "docs" / "ui-chat.png"))


def test_finqa_tab_shows_program_and_answer(page) -> None:
    from playwright.sync_api import expect

    page.get_by_role("tab", name="FinQA").click()
    page.get_by_role("button", name="Answer").click()
    expect(page.get_by_label("Raw model output")).not_to_have_value("", timeout=240_000)  # 4 programs, on 2 busy cores
    assert page.get_by_label("Program the model wrote").input_value()
    assert page.get_by_label("Executed answer").input_value()
    assert "programs give this answer" in page.get_by_label("Confidence").input_value()  # 4 drawn by default
    if os.environ.get("ADAPTSERVE_SCREENSHOT"):
        page.screenshot(path=str(REPO / "docs" / "ui-finqa.png"))
