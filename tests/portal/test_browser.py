"""The portal in a real browser: Debian's headless Chromium driven by Playwright (never a
browser Playwright downloads). Screenshots of the main pages go to the test's tmp dir."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import RunningPortal

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(autouse=True)
def _chromium_installed() -> None:
    # A missing tool is a failure, not a skip: a skip would hide a deleted feature.
    assert os.path.exists(CHROMIUM), (
        "Debian's chromium is not installed (scripts/bootstrap --test installs it)")

PHONE = {"width": 390, "height": 844}


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-background-networking", "--disable-extensions",
            "--disable-sync", "--disable-default-apps", "--no-first-run",
            "--disable-component-update", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


def _login(page: Any, portal: RunningPortal, token: str) -> None:
    page.goto(portal.url + "/")
    assert page.url.endswith("/login")
    page.fill("#token", token)
    page.click("#login")
    page.wait_for_url(portal.url + "/")


def test_tenant_walks_through_the_portal(browser: Any, portal: RunningPortal,
                                         tmp_path: Path) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    _login(page, portal, "alice-token")
    cookies = context.cookies()
    assert [c["name"] for c in cookies] == ["mailplane_session"]
    assert cookies[0]["httpOnly"] and cookies[0]["secure"] and cookies[0]["sameSite"] == "Strict"
    assert page.locator("#namespaces li").all_inner_texts() == ["shop\nMessage log"]
    page.screenshot(path=str(tmp_path / "home.png"), full_page=True)

    page.click("text=Message log")
    page.wait_for_selector("table.log")
    assert page.locator("table.log tbody tr").count() == 50
    page.screenshot(path=str(tmp_path / "logs.png"), full_page=True)
    page.click("#next")
    page.wait_for_selector("table.log")
    assert page.locator("table.log tbody tr").count() == 50

    page.goto(portal.url + "/ns/shop/logs")
    page.fill("#f-recipient", "late@slow.example")
    page.click("#search")
    page.wait_for_selector("table.log")
    assert page.locator("table.log tbody tr").count() == 3
    page.screenshot(path=str(tmp_path / "search.png"), full_page=True)

    page.locator("a.queue").first.click()
    page.wait_for_selector("table.history")
    assert page.locator("#qid").inner_text() == "SHOPHIST"
    statuses = page.locator("table.history .status").all_inner_texts()
    assert statuses == ["received", "deferred", "delivered"]
    page.screenshot(path=str(tmp_path / "history.png"), full_page=True)

    page.click("text=Figures")
    page.wait_for_selector("svg.chart")
    assert page.locator("figure.figure-domain figcaption").inner_text().startswith(
        "Sender domain shop.example")
    page.screenshot(path=str(tmp_path / "figures.png"), full_page=True)
    page.click("text=Credentials & domains")
    page.wait_for_selector("table.credentials")
    page.screenshot(path=str(tmp_path / "resources.png"), full_page=True)

    # remove a suppression entry, with a reason
    page.click("text=Suppression")
    page.wait_for_selector("table.suppression")
    row = page.locator("table.suppression tr", has_text="customer7@mail.example")
    row.locator("input[name=reason]").fill("mailbox fixed")
    row.locator("button").click()
    page.wait_for_selector(".notice")
    assert "customer7@mail.example removed" in page.locator(".notice").inner_text()
    assert page.locator("table.suppression tr", has_text="customer7@").count() == 0
    page.screenshot(path=str(tmp_path / "suppression.png"), full_page=True)

    # request an erasure and follow it to its report
    page.click("text=Erasure")
    page.fill("#f-erase", "customer2@mail.example")
    page.click("#erase")
    page.wait_for_selector("#state")
    for _ in range(50):
        if page.locator("#state").inner_text() == "done":
            break
        page.wait_for_timeout(100)
        page.reload()
    assert page.locator("#state").inner_text() == "done"
    assert "as recipient" in page.locator("#report").inner_text()
    page.screenshot(path=str(tmp_path / "erasure.png"), full_page=True)
    page.click("text=Audit log")
    page.wait_for_selector("table.audit")
    audit = page.locator("table.audit").inner_text()
    assert "suppression.remove" in audit and "erasure.request" in audit
    assert "customer2@" not in audit
    page.screenshot(path=str(tmp_path / "audit.png"), full_page=True)

    # phone-sized screen: the table scrolls inside its box, the page does not overflow
    phone = browser.new_context(viewport=PHONE, is_mobile=True)
    ppage = phone.new_page()
    _login(ppage, portal, "alice-token")
    ppage.goto(portal.url + "/ns/shop/logs")
    ppage.screenshot(path=str(tmp_path / "logs-phone.png"), full_page=False)
    width = ppage.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], width
    phone.close()

    page.click("#logout")
    page.wait_for_url(portal.url + "/login")
    assert context.cookies() == []
    page.goto(portal.url + "/ns/shop/logs")
    assert page.url.endswith("/login")
    assert not errors, errors  # e.g. a CSP violation
    context.close()


def test_second_tenant_sees_nothing_of_the_first(browser: Any, portal: RunningPortal,
                                                 tmp_path: Path) -> None:
    context = browser.new_context()
    page = context.new_page()
    _login(page, portal, "bob-token")
    assert page.locator("#namespaces li").all_inner_texts() == ["blog\nMessage log"]
    page.goto(portal.url + "/ns/blog/logs")
    text = page.content()
    assert "BLOGSECRET1" in text and "SHOP" not in text and "shop.example" not in text
    for path in ("/ns/shop/logs", "/ns/shop/messages/SHOPHIST", "/ns/shop/logs.csv"):
        response = page.goto(portal.url + path)
        assert response is not None and response.status == 403, path
        assert "orders@shop.example" not in page.content()
    page.screenshot(path=str(tmp_path / "forbidden.png"), full_page=True)
    context.close()
