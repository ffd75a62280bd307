"""The dashboard end to end in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

A real gateway on a real socket and a real SQLite file; traffic through the official OpenAI SDK
while the page polls. The screenshots land in `test-output/` at the repository root (git-ignored):
`test-output/dashboard.png` (the live page after the denial) and `test-output/dashboard-login.png`.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from quotagate.admin import COOKIE

from .conftest import POLICY, Gateway, chat

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("QUOTAGATE_TEST_CHROMIUM", "/usr/bin/chromium")
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
TOKEN = "dashboard-admin-token"
LIVE = 10_000  # ms to wait for what the page shows next (it polls every 2 s; `poll_now` asks at once)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not shutil.which(CHROMIUM):
        pytest.fail(f"the browser tests need Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1440, "height": 900}, device_scale_factor=1)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    def console(message: ConsoleMessage) -> None:  # HTTP errors the test provokes are no page errors
        if message.type == "error" and "Failed to load resource" not in message.text:
            errors.append(message.text)

    page.on("console", console)
    yield page
    context.close()
    assert errors == [], f"errors in the page: {errors}"


def new_key(gw: Gateway, name: str, policies: list[str] | None = None) -> str:
    """A key made through the admin API (Playwright's running event loop rules out gw.key here)."""
    with gw.http() as http:
        response = http.post(
            "/admin/keys", json={"name": name, "policies": policies or []}, headers={"Authorization": f"Bearer {TOKEN}"}
        )
    assert response.status_code == 201, response.text
    return str(response.json()["key"])


def background_traffic(gw: Gateway) -> None:
    """Some keys, users and properties at various levels, so the page has something to sort."""
    mobile = gw.openai(new_key(gw, "mobile-app"), **{POLICY: "500;w=3600, 40;w=3600;s=user"})
    for user, calls in (("dana", 33), ("erik", 21), ("fatima", 9), ("george", 3)):
        for _ in range(calls):
            assert chat(mobile, **{"Helicone-User-Id": user}) == 200
    partners = gw.openai(new_key(gw, "partner-api", ["2000;w=86400;u=token;s=org"]), **{POLICY: "30;w=60;s=org"})
    for org, calls in (("acme-corp", 17), ("globex", 6)):
        for _ in range(calls):
            assert chat(partners, **{"Helicone-Property-Org": org}) == 200
    spend = gw.openai(new_key(gw, "internal-tools"), **{POLICY: "0.2;w=86400;u=cents;s=team"})
    for team, calls in (("research", 6), ("support", 2)):
        for _ in range(calls):
            assert chat(spend, **{"Helicone-Property-Team": team}) == 200


def poll_now(page: Page) -> None:
    """The page polls every 2 s, and at once when it becomes visible again: a test that changed the
    data asks it now rather than wait for the next poll."""
    page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")


def login(page: Page, url: str) -> None:
    page.goto(f"{url}/dashboard")
    expect(page.locator("#login")).to_be_visible()
    page.fill("#token", "not-the-token")
    page.click("#login-button")
    expect(page.locator("#login-error")).to_have_text("That admin token is not right.")
    page.fill("#token", TOKEN)
    page.click("#login-button")
    expect(page.locator("#app")).to_be_visible()


def test_watch_a_user_reach_the_limit(make_gateway: Callable[..., Gateway], page: Page) -> None:
    gw = make_gateway(admin_token=TOKEN)
    OUTPUT.mkdir(exist_ok=True)
    page.goto(f"{gw.url}/dashboard")
    expect(page.locator("#login")).to_be_visible()
    page.screenshot(path=str(OUTPUT / "dashboard-login.png"))
    login(page, gw.url)

    # the session is an HttpOnly, SameSite=Strict cookie that page scripts cannot read
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert cookies[COOKIE]["httpOnly"] is True and cookies[COOKIE]["sameSite"] == "Strict"
    assert TOKEN not in cookies[COOKIE]["value"]
    assert page.evaluate("document.cookie") == ""
    expect(page.locator("#budget-empty")).to_be_visible()

    background_traffic(gw)
    poll_now(page)
    expect(page.locator('#budget-list .row[data-value="dana"]')).to_be_visible(timeout=LIVE)

    chatbot = gw.openai(new_key(gw, "support-bot"), **{POLICY: "5;w=3600;s=user", "Helicone-User-Id": "alice"})
    alice = page.locator('#budget-list .row[data-value="alice"]')
    for sent in range(1, 5):  # alice approaches her limit, one call at a time, and the page follows
        assert chat(chatbot) == 200
        poll_now(page)
        expect(alice.locator(".amount")).to_have_text(f"{sent} / 5", timeout=LIVE)
    expect(alice).to_have_class(re.compile(r"\bnear\b"))
    expect(alice.locator(".pct")).to_have_text("80%")
    expect(alice.locator(".badge")).to_have_text("Near the limit")
    expect(page.locator('#denial-list li[data-value="alice"]')).to_have_count(0)

    assert chat(chatbot) == 200
    assert chat(chatbot) == 429  # the sixth is denied
    poll_now(page)
    expect(alice).to_have_class(re.compile(r"\bdenied\b"), timeout=LIVE)
    expect(alice.locator(".pct")).to_have_text("100%")
    expect(alice.locator(".badge")).to_contain_text("Denied")
    first = page.locator("#budget-list .row").first
    expect(first).to_have_attribute("data-value", "alice")  # closest to its limit: first
    denial = page.locator('#denial-list li[data-value="alice"]')
    expect(denial).to_have_count(1)
    expect(denial).to_contain_text("5;w=3600;s=user")
    expect(denial).to_contain_text("support-bot")
    expect(page.locator("#card-denied")).to_have_text("1")
    expect(page.locator("#chart rect.denied")).to_have_count(1, timeout=LIVE)
    assert page.locator("#chart rect.allowed").count() >= 1
    page.screenshot(path=str(OUTPUT / "dashboard.png"), full_page=True)

    # a reload keeps the session; signing out ends it
    page.reload()
    expect(page.locator("#app")).to_be_visible()
    page.click("#logout")
    expect(page.locator("#login")).to_be_visible()
    status = page.evaluate("fetch('/admin/budgets').then(r => r.status)")
    assert status == 401


def test_traffic_values_are_shown_as_text(make_gateway: Callable[..., Gateway], page: Page) -> None:
    """User ids and property values come from clients: the page must never interpret them as HTML."""
    gw = make_gateway(admin_token=TOKEN)
    login(page, gw.url)
    hostile = '<img src=x onerror="document.title=1">mallory'
    client = gw.openai(new_key(gw, "<b>key</b>"), **{POLICY: "3;w=60;s=user", "Helicone-User-Id": hostile})
    assert [chat(client) for _ in range(4)] == [200, 200, 200, 429]
    poll_now(page)
    row = page.locator("#budget-list .row").first
    expect(row.locator(".name")).to_have_text(hostile, timeout=LIVE)
    expect(row.locator(".meta")).to_contain_text("key <b>key</b>")
    expect(page.locator("#denial-list li").first).to_contain_text(hostile)
    assert page.locator("#app img, #app b").count() == 0
    assert page.title() != "1"


def test_create_and_revoke_a_key_from_the_page(make_gateway: Callable[..., Gateway], page: Page) -> None:
    gw = make_gateway(admin_token=TOKEN)
    login(page, gw.url)
    page.fill("#key-name", "web-frontend")
    page.fill("#key-policies", "100;w=60;s=user")
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-created")).to_be_visible()
    raw = page.locator("#key-created-value").inner_text()
    assert raw.startswith("qg_")
    row = page.locator('#key-rows tr[data-key="web-frontend"]')
    expect(row).to_contain_text("100;w=60;s=user")
    expect(row).to_contain_text("active")
    assert chat(gw.openai(raw), **{"Helicone-User-Id": "ann"}) == 200
    page.once("dialog", lambda dialog: dialog.accept())
    row.locator("button", has_text="Revoke").click()
    expect(row).to_contain_text("revoked")
    assert chat(gw.openai(raw), **{"Helicone-User-Id": "ann"}) == 401
    page.fill("#key-name", "bad")
    page.fill("#key-policies", "5;w=5")
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-error")).to_contain_text("invalid policy")
