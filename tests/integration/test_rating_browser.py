"""A real browser: headless Chromium opens a rating link and submits the comment form."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from gateway.web.links import rating_links
from gateway.web.tokens import link_keys
from store.models import Rating
from tests.conftest import ROOT, SECRET, need_peer
from tests.mailbuild import make_mail, send

CHROMIUM = os.environ.get("DESKGATE_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("DESKGATE_ARTIFACTS", ROOT / "var" / "test-artifacts"))
# The machine's network is closed: keep Chromium from calling home at every start.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    return sqlite_url


async def test_browser_rates_and_comments(make_gateway: Any) -> None:
    if not shutil.which(CHROMIUM):
        need_peer("Chromium", f"{CHROMIUM} not found (apt-get install chromium)")
    from playwright.async_api import async_playwright

    gw = await make_gateway()
    await send(gw.inbound_port, make_mail(subject="Router keeps rebooting"))
    link = rating_links(f"http://127.0.0.1:{gw.web_port}", 1, datetime.now(UTC), 30,
                        link_keys(SECRET.encode()))["good"]
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = await browser.new_page(viewport={"width": 390, "height": 844})  # a phone
            await page.goto(link)
            assert "Router keeps rebooting" in await page.text_content("main")
            await page.fill("#comment", "Fixed in a day, thank you! 谢谢")
            await page.click("button[type=submit]")
            await page.wait_for_selector("p.saved")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "rating-page.png"), full_page=True)
        finally:
            await browser.close()
    async with gw.store.transaction() as session:
        ratings = [(r.value, r.comment) for r in await session.scalars(select(Rating))]
    assert ratings == [("good", "Fixed in a day, thank you! 谢谢")]
    assert (ARTIFACTS / "rating-page.png").stat().st_size > 1000
