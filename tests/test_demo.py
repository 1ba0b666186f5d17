"""The demo page in a real browser: Debian's headless Chromium, driven through its
chromium-driver by Selenium, against two separate uvicorn processes, pane A on the first and
pane B on the second, set up the way `python -m service dev` sets it up.

The test saves a screenshot of the page after the exchange: to the path in the environment
variable DEMO_SCREENSHOT when set (`DEMO_SCREENSHOT=docs/demo.png` refreshes the README's),
else in the test's temporary folder, so that running the suite leaves the work tree clean.
For the README's, install an emoji font first (Debian: fonts-noto-color-emoji), or the
gesture labels show as boxes.
"""

import itertools
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from service.cli import demo_address
from service.suggestions import DAY, Context, compose, prompt

from .conftest import ROOT, SECRET, bearer

pytestmark = [pytest.mark.anyio, pytest.mark.multiprocess]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} missing: apt-get install chromium chromium-driver (.ci/run does)"
        )
    monkeypatch.setenv("SE_OFFLINE", "true")  # never let Selenium fetch a driver or browser
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(
        service=Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")),
        options=options,
    )
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def screenshot(tmp_path: Path) -> str:
    return str(Path(os.environ.get("DEMO_SCREENSHOT") or tmp_path / "demo.png").resolve())


def wait_for(driver: WebDriver, css: str, timeout: float = 15.0, text: str | None = None):
    """The first element matching `css` (and containing `text`), polled until `timeout`."""

    def found(d: WebDriver):
        for element in d.find_elements(By.CSS_SELECTOR, css):
            try:
                if text is None or text in element.text:
                    return element
            except WebDriverException:
                continue  # redrawn meanwhile
        return False

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(found)
    except WebDriverException:
        try:
            logs = driver.get_log("browser")
        except Exception:
            logs = []
        raise AssertionError(
            f"no {css!r} with {text!r} within {timeout} s; console: {logs}"
        ) from None


async def test_a_hug_crosses_processes_and_comes_back_as_a_kiss(
    processes, browser: WebDriver, screenshot: str
):
    p1, p2 = await processes(2)
    page = demo_address(p1.url, p2.ws_url, SECRET)
    assert "token" not in page.split("#")[0]  # the tokens are in the fragment only
    browser.get(page)

    # Each pane connected to its own process; each sees the other partner online.
    wait_for(browser, "#pane-a .conn[data-state=connected]")
    wait_for(browser, "#pane-b .conn[data-state=connected]")
    route = browser.find_element(By.ID, "route").text
    assert p1.ws_url in route and p2.ws_url in route
    wait_for(browser, "#pane-a .dot[data-online=true]")
    wait_for(browser, "#pane-b .dot[data-online=true]")

    # A asks for a suggested note: a clear answer whether or not this server makes them.
    async with httpx.AsyncClient() as http:
        paths = (await http.get(f"{p1.url}/openapi.json")).json()["paths"]
    browser.find_element(By.CSS_SELECTOR, "#pane-a .suggest").click()
    if "/api/gestures/generate-message" in paths:
        drew_on = wait_for(browser, "#pane-a .error.info", text="Suggested").text
        # What it drew on, in words: every suggestion reads the time of day.
        assert "the time of day" in drew_on and "_" not in drew_on, drew_on
        suggested = browser.find_element(By.CSS_SELECTOR, "#pane-a textarea")
        suggested = suggested.get_property("value").strip()
        assert suggested
        # Sent as it is, it carries its suggestion_id and arrives marked as suggested.
        browser.find_element(By.CSS_SELECTOR, "#pane-a .send").click()
        wait_for(browser, "#pane-b .received li[data-ai=true]", text=suggested)
        wait_for(browser, "#pane-a .sent li[data-ai=true]", text=suggested)
    else:
        wait_for(browser, "#pane-a .error", text="not available on this server")

    # A sends a hug with a note.
    browser.find_element(By.CSS_SELECTOR, "#pane-a .types [data-type=hug]").click()
    note = browser.find_element(By.CSS_SELECTOR, "#pane-a textarea")
    note.clear()
    note.send_keys("A warm hug from pane A <3")
    browser.find_element(By.CSS_SELECTOR, "#pane-a .send").click()
    sent = wait_for(browser, "#pane-a .sent li[data-type=hug]", text="A warm hug from pane A")
    hug_id = sent.get_attribute("data-gesture-id")

    # B's pane, on the other process, shows it; A's hug is marked delivered.
    received = wait_for(browser, f"#pane-b .received li[data-gesture-id='{hug_id}']")
    assert "Hug" in received.text and "A warm hug from pane A <3" in received.text
    wait_for(browser, f"#pane-a .sent li[data-gesture-id='{hug_id}'][data-delivered=true]")

    # B acknowledges, sending a kiss back.
    received.find_element(By.CSS_SELECTOR, "button[data-ack=kiss]").click()
    wait_for(
        browser,
        f"#pane-b .received li[data-gesture-id='{hug_id}'][data-acknowledged=true]",
        text="you sent back 💋 Kiss",
    )
    wait_for(browser, "#pane-b .sent li[data-type=kiss]")

    # A sees the acknowledgement on its hug, and the kiss arriving.
    wait_for(
        browser,
        f"#pane-a .sent li[data-gesture-id='{hug_id}'][data-acknowledged=true]",
        text="they sent back 💋 Kiss",
    )
    wait_for(browser, "#pane-a .received li[data-type=kiss]")
    wait_for(browser, "#pane-b .sent li[data-type=kiss][data-delivered=true]")
    assert browser.save_screenshot(screenshot)

    # B's pane disconnects: A's presence dot goes out, and lights up when B is back.
    browser.find_element(By.CSS_SELECTOR, "#pane-b .toggle").click()
    wait_for(browser, "#pane-b .conn[data-state=closed]")
    wait_for(browser, "#pane-a .dot[data-online=false]")
    wait_for(browser, "#pane-a .other-text", text="Partner B is offline")
    browser.find_element(By.CSS_SELECTOR, "#pane-b .toggle").click()
    wait_for(browser, "#pane-b .conn[data-state=connected]")
    wait_for(browser, "#pane-a .other-text", text="Partner B is online")


async def test_a_fresh_pane_says_so_and_a_gesture_can_be_acknowledged_without_one_back(
    processes, browser: WebDriver
):
    [p] = await processes(1)
    page = demo_address(p.url, p.ws_url, SECRET)
    tokens = parse_qs(urlsplit(page).fragment)
    browser.get(page)
    wait_for(browser, "#pane-a .conn[data-state=connected]")
    wait_for(browser, "#pane-b .conn[data-state=connected]")

    # Fresh panes: each list says that it is empty, and what to do.
    for pane, other in (("a", "B"), ("b", "A")):
        wait_for(browser, f"#pane-{pane} .empty-received", text="Nothing has arrived yet")
        wait_for(browser, f"#pane-{pane} .empty-received", text=f"When Partner {other} sends")
        wait_for(browser, f"#pane-{pane} .empty-sent", text="You have not sent anything yet")

    # A sends a "thinking of you": A's Sent and B's Received lists replace their empty states.
    browser.find_element(By.CSS_SELECTOR, "#pane-a .types [data-type=thinking_of_you]").click()
    browser.find_element(By.CSS_SELECTOR, "#pane-a .send").click()
    sent = wait_for(browser, "#pane-a .sent li[data-type=thinking_of_you]")
    gesture_id = sent.get_attribute("data-gesture-id")
    received = wait_for(browser, f"#pane-b .received li[data-gesture-id='{gesture_id}']")
    assert not browser.find_element(By.CSS_SELECTOR, "#pane-a .empty-sent").is_displayed()
    assert not browser.find_element(By.CSS_SELECTOR, "#pane-b .empty-received").is_displayed()

    # B acknowledges it without sending one back.
    received.find_element(By.CSS_SELECTOR, "button.ack-only").click()
    wait_for(
        browser,
        f"#pane-b .received li[data-gesture-id='{gesture_id}'][data-acknowledged=true]",
        text="acknowledged; nothing sent back",
    )
    # B's confirmation carried no response gesture: B's Sent list is still empty.
    assert browser.find_elements(By.CSS_SELECTOR, "#pane-b .sent li") == []
    assert browser.find_element(By.CSS_SELECTOR, "#pane-b .empty-sent").is_displayed()

    # A's pane shows its gesture acknowledged, with nothing sent back.
    acked = wait_for(
        browser, f"#pane-a .sent li[data-gesture-id='{gesture_id}'][data-acknowledged=true]"
    )
    assert "acknowledged" in acked.text and "sent back" not in acked.text

    # And the server holds it so: acknowledged by B, no response gesture, nothing else sent.
    async with httpx.AsyncClient(base_url=p.url, headers=bearer(tokens["b"][0])) as http:
        gesture = (await http.get(f"/api/gestures/{gesture_id}")).json()
        assert gesture["acknowledged_by"] == "partner_b"
        assert gesture["response_gesture_id"] is None
        recent = await http.get(
            "/api/gestures/recent", params={"relationship_id": tokens["rel"][0]}
        )
        assert recent.json()["count"] == 1
    assert browser.find_elements(By.CSS_SELECTOR, "#pane-a .received li") == []


def test_the_page_has_words_for_every_name_a_suggestion_may_draw_on():
    """demo.js's one table of words covers exactly the `context_used` names that the built-in
    composer and the provider's prompt produce, over contexts that reach every branch."""
    names: set[str] = set()
    for received, sent_age, streak, week, seed in itertools.product(
        (None, "hug"), (None, 60.0, DAY, 5 * DAY), (0, 3), (0, 12), range(2)
    ):
        ctx = Context(
            gesture_type="hug",
            local_hour=9,
            received_type=received,
            received_age=None if received is None else 3600.0,
            sent_age=sent_age,
            streak_days=streak,
            week_count=week,
        )
        names.update(compose(ctx, seed).context_used)
        names.update(prompt(ctx)[1])
    script = (ROOT / "service" / "demo" / "demo.js").read_text()
    table = re.search(r"const CONTEXT_WORDS = \{(.*?)\};", script, re.S)
    assert table, "demo.js has no CONTEXT_WORDS table"
    assert set(re.findall(r"^\s*(\w+):", table.group(1), re.M)) == names


async def test_the_demo_page_and_its_scripts_are_served_without_a_build_step(processes):
    [p] = await processes(1)
    async with httpx.AsyncClient(base_url=p.url) as http:
        page = await http.get("/demo")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["referrer-policy"] == "no-referrer"
        assert "/demo/demo.js" in page.text
        for asset, kind in (("demo.js", "javascript"), ("client.js", "javascript")):
            r = await http.get(f"/demo/{asset}")
            assert r.status_code == 200 and kind in r.headers["content-type"]
        assert (await http.get("/demo/demo.css")).status_code == 200
        assert (await http.get("/demo/nothing.js")).status_code == 404
        # No address outside this server: it works with no internet.
        for asset in ("index.html", "demo.js", "client.js", "demo.css"):
            text = (ROOT / "service" / "demo" / asset).read_text()
            assert "http://" not in text and "https://" not in text, asset


async def test_the_page_says_what_went_wrong_and_reconnects_after_a_restart(
    processes, browser: WebDriver
):
    p1, p2 = await processes(2, rate_limit_per_minute=1)
    browser.get(demo_address(p1.url, p2.ws_url, SECRET))
    wait_for(browser, "#pane-a .conn[data-state=connected]")
    wait_for(browser, "#pane-b .conn[data-state=connected]")

    # Past the rate limit: the error is said in words, next to the pane that sent.
    send = browser.find_element(By.CSS_SELECTOR, "#pane-a .send")
    send.click()
    wait_for(browser, "#pane-a .sent li[data-type=hug]")
    send.click()
    wait_for(browser, "#pane-a .error", text="Slow down: at most 1 gestures a minute")
    assert "retry after" in browser.find_element(By.CSS_SELECTOR, "#pane-a .error").text

    # B's process restarts: B's pane says so and reconnects by itself; A sees B come back.
    p2.stop()
    wait_for(browser, "#pane-b .conn[data-state=reconnecting]", text="reconnecting in")
    wait_for(browser, "#pane-a .other-text", text="Partner B is offline")
    p2.start()
    await p2.ready()
    wait_for(browser, "#pane-b .conn[data-state=connected]", timeout=30)
    wait_for(browser, "#pane-a .other-text", text="Partner B is online")
    # The hug that A sent is still there for B, from the greeting, shown once.
    wait_for(browser, "#pane-b .received li[data-type=hug]")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#pane-b .received li")) == 1
