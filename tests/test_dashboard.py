"""The dashboard in a real browser: Debian's chromium driven by Playwright (no browser
download). With CI=true these tests fail, not skip, when the browser is missing.

Screenshots are kept as artifacts in test-artifacts/ (or $SPARKSTACK_ARTIFACTS).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import KEY, Gateway, fake

CHROMIUM = os.environ.get("SPARKSTACK_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("SPARKSTACK_ARTIFACTS")
                 or Path(__file__).resolve().parents[1] / "test-artifacts")
DATA = Path(__file__).with_name("data")


def _missing(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    try:
        from playwright.async_api import async_playwright
    except ImportError as e:
        _missing(f"playwright is not installed (pip install -e '.[dev]'): {e}")
    if not Path(CHROMIUM).exists():
        _missing(f"no chromium at {CHROMIUM} (apt-get install chromium; "
                 "scripts/system-deps.sh does it as root)")
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        await b.close()


async def open_dashboard(browser: Any, gw: Gateway, **context: Any) -> Any:
    page = await (await browser.new_context(**context)).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    await page.goto(gw.url + "/")
    await page.fill("#key-input", KEY)  # asked once...
    await page.click("#key-save")
    await page.wait_for_selector("#connection.live")
    return page


def models(*extra: str) -> str:
    return f"""
    chat:
      command: {fake("--served-name", "chat", "--tokens", "12", "--rate", "200",
                     "--allocate-mb", "60")}
      memory_gb: 0.1
      ttl: 10m
    coder:
      command: {fake("--served-name", "coder", "--load-log", DATA / "vllm-load.log",
                     "--start-delay", "1")}
      memory_gb: 2
    broken:
      command: {fake("--exit-at-start", "1")}
      memory_gb: 1
    """ + "".join(extra)


async def test_dashboard_lists_loads_and_shows_activity(start_gateway, browser):
    from playwright.async_api import expect

    gw = await start_gateway(models(), memory_gb=4, start_backoff="30s")
    page = await open_dashboard(browser, gw)
    rows = page.locator("#model-rows tr[data-model]")
    await expect(rows).to_have_count(3)
    await expect(rows.locator(".model-id")).to_have_text(["chat", "coder", "broken"])
    state = page.locator('#model-rows tr[data-model="chat"] .state')
    await expect(state).to_have_text("stopped")

    await page.click('button[aria-label="Load chat"]')  # no reload: the events update it
    await expect(state).to_have_text("ready", timeout=20_000)
    await expect(page.locator('#model-rows tr[data-model="chat"] .memcell')).to_contain_text(
        "measured", timeout=20_000)

    assert (await gw.chat("chat"))[0] == 200
    assert await gw.stream("chat")
    activity = page.locator("#activity-rows tr")
    await expect(activity).to_have_count(2, timeout=10_000)
    first = activity.first
    await expect(first.locator('td[data-label="Model"]')).to_have_text("chat")
    await expect(first.locator('td[data-label="Status"]')).to_have_text("200")
    await expect(first.locator('td[data-label="Tokens in → out"]')).to_have_text("1 → 12")
    await expect(first.locator('td[data-label="TTFT"]')).not_to_have_text("—")

    # Keyboard only: focus the button and press Enter.
    await page.focus('button[aria-label="Load broken"]')
    await page.keyboard.press("Enter")
    broken = page.locator('#model-rows tr[data-model="broken"] .state')
    await expect(broken).to_have_text("failed", timeout=20_000)
    await expect(page.locator('tr[data-error-of="broken"]')).to_contain_text("CUDA error")

    await page.click('button[aria-label="Follow the log of chat"]')
    await expect(page.locator("#logs")).to_contain_text("fake engine pid=")

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert page.errors == []


async def test_dashboard_shows_load_progress_then_ready(start_gateway, browser):
    from playwright.async_api import expect

    gw = await start_gateway(models(), memory_gb=4)
    page = await open_dashboard(browser, gw)
    await page.click('button[aria-label="Load coder"]')
    row = page.locator('#model-rows tr[data-model="coder"]')
    # The engine printed its whole (recorded vLLM) load log before it listens.
    await expect(row.locator(".progress-text")).to_contain_text("server", timeout=10_000)
    await expect(row.locator(".state")).to_have_text("ready", timeout=20_000)
    await expect(row.locator(".state-cell")).to_contain_text("loaded in")
    assert page.errors == []


@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_dashboard_on_a_phone_in_light_and_dark(start_gateway, browser, scheme):
    from playwright.async_api import expect

    gw = await start_gateway(models(), memory_gb=4)
    page = await open_dashboard(browser, gw, viewport={"width": 390, "height": 844},
                                color_scheme=scheme, is_mobile=True)
    await expect(page.locator("#model-rows tr[data-model]")).to_have_count(3)
    overflow = await page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, "nothing wider than the phone's screen"
    background = await page.evaluate("getComputedStyle(document.body).backgroundColor")
    dark = sum(int(x) for x in background[background.index("(") + 1:-1].split(",")[:3]) < 200
    assert dark == (scheme == "dark"), background
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"dashboard-phone-{scheme}.png"), full_page=True)


async def test_a_wrong_key_is_asked_again(start_gateway, browser):
    from playwright.async_api import expect

    gw = await start_gateway(models(), memory_gb=4)
    page = await (await browser.new_context()).new_page()
    await page.goto(gw.url + "/")
    await page.fill("#key-input", "sk-wrong-key-0000")
    await page.click("#key-save")
    await expect(page.locator("#key-error")).to_contain_text("refused")
    await page.fill("#key-input", KEY)
    await page.click("#key-save")
    await expect(page.locator("#connection")).to_have_text("live")
