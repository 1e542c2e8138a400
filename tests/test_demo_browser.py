"""The demo in a real browser: Debian's chromium, headless, driven by Playwright for Python.

Run with ``bash scripts/test.sh -m browser`` (or ``.venv/bin/python -m pytest -m browser tests/test_demo_browser.py``).
Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``) and ``pip install playwright``; Playwright's own
browser download (``playwright install``) is never used. The screenshot is kept as a test artifact in
``outputs/screenshots/demo.png``.
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = Path(__file__).resolve().parents[1] / "outputs" / "screenshots" / "demo.png"
PROMPT = "a red circle at the top left and a blue square at the bottom right"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sync_playwright():
    if not CHROMIUM.is_file() and shutil.which("chromium") is None:
        pytest.skip(f"no chromium at {CHROMIUM}: apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install playwright (no `playwright install` needed)")
    return sync_playwright


@pytest.fixture
def served(tmp_path):
    from anygen.testing import random_engine
    from demo.app import RANDOM_NOTICE, build_demo

    demo = build_demo(random_engine("tiny"), notice=RANDOM_NOTICE, workdir=tmp_path)
    _, url, _ = demo.queue().launch(prevent_thread_lock=True, server_port=_free_port(), server_name="127.0.0.1",
                                    quiet=True)
    yield demo, url
    demo.close()


def test_a_typed_prompt_gets_an_image_in_the_chat(sync_playwright, served):
    demo, url = served
    executable = str(CHROMIUM) if CHROMIUM.is_file() else shutil.which("chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.locator("#prompt textarea").wait_for(timeout=60_000)
            assert "untrained tiny random model" in page.locator("#notice").inner_text()
            page.locator("#start-with").get_by_text("an image", exact=True).click()
            page.locator("#seed input").fill("0")
            page.locator("#max-images input").fill("1")  # the reply is that one image
            prompt = page.locator("#prompt textarea")
            prompt.fill(PROMPT)
            sent = time.perf_counter()
            prompt.press("Enter")
            page.locator("#chat img").first.wait_for(timeout=60_000)  # the canvas / first preview
            first_image_s = time.perf_counter() - sent
            # the reply is over when the chat's progress tracker hides again
            page.locator('#chat [data-testid="status-tracker"].hide').first.wait_for(state="attached", timeout=120_000)
            deadline = time.monotonic() + 60
            while "total_s" not in demo.runner.last_timings and time.monotonic() < deadline:
                page.wait_for_timeout(100)  # and the server is done with it
            page.wait_for_timeout(500)  # let the last update paint
            image = page.locator("#chat img").first
            assert image.evaluate("e => e.complete && e.naturalWidth") == 16 * 8  # 16×16 tokens, 8× downsampling
            assert PROMPT in page.locator("#chat").inner_text()
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()
    print(f"first image in the browser after {first_image_s:.2f} s; screenshot: {SCREENSHOT}")
    assert SCREENSHOT.is_file() and SCREENSHOT.stat().st_size > 20_000
