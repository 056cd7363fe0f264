"""The playground (GET /playground) in a real browser: headless Chromium from Debian's packages
(`chromium`, `chromium-driver`; .ci/run installs them) driven by Selenium, against a live
`python api_server.py` on the tiny test model. A failing step leaves a screenshot in the test's
temporary folder; the side-by-side run always leaves one (side_by_side.png)."""
import contextlib
import os
import shutil
import subprocess
import sys

import pytest
import requests

from conftest import DEFAULT, ROOT

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver "
                                                                       "(bash .ci/run installs them)")
LABEL = "Quillmere Bank is a small lender in Oslo."


def test_page_and_its_files_are_served_from_static_only(app_factory):
    """The page, its CSS and JS from static/, nothing fetched from elsewhere (works offline), no
    path outside static/, and no key needed for them once keys exist."""
    app = app_factory(anonymous_rate_per_minute=DEFAULT)
    app.extensions["gpt"].access.create_key("root", admin=True)
    c = app.test_client()
    page = c.get("/playground")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert '<script src="/playground/playground.js">' in html and 'href="/playground/playground.css"' in html
    for name, mimetype in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        r = c.get(f"/playground/{name}")
        assert r.status_code == 200 and r.mimetype == mimetype
        assert "http://" not in r.get_data(as_text=True) and "https://" not in r.get_data(as_text=True)
    for path in ("/playground/../api_server.py", "/playground/%2e%2e/api_server.py", "/playground/..%2fREADME.md",
                 "/playground//etc/passwd", "/playground/missing.js"):
        assert c.get(path, follow_redirects=True).status_code == 404, path  # (// is first redirected to /)
    assert c.get("/luts").status_code == 401  # what the page calls still needs a key


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    yield driver
    driver.quit()


@contextlib.contextmanager
def screenshot_on_failure(browser, folder):
    try:
        yield
    except BaseException:
        browser.save_screenshot(str(folder / "failure.png"))
        print(f"screenshot: {folder / 'failure.png'}")
        raise


def wait(browser, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(browser, timeout).until(lambda d: condition(d))


def by_id(browser, element_id):
    return browser.find_element("id", element_id)


def fill(browser, element_id, text):
    """Type into a field as a person does; Tab leaves it, which fires its change event."""
    from selenium.webdriver.common.keys import Keys
    field = by_id(browser, element_id)
    field.clear()
    field.send_keys(text, Keys.TAB)


def error_text(browser):
    box = by_id(browser, "error")
    return box.text if box.is_displayed() else ""


@needs_browser
def test_teach_list_compare_and_chat(module_server, browser, tmp_path):
    with screenshot_on_failure(browser, tmp_path):
        browser.get(module_server.url + "/playground")
        wait(browser, lambda d: by_id(d, "status").text == "model gpt2 · ready")
        fill(browser, "lut-name", "alice")
        wait(browser, lambda d: by_id(d, "labels-lut").text == "alice")
        fill(browser, "teach-label", LABEL)
        by_id(browser, "teach-btn").click()
        wait(browser, lambda d: LABEL in by_id(d, "labels").text)
        assert "fires on “Quillmere”" in by_id(browser, "labels").text  # the trigger the server reports
        assert requests.get(module_server.url + "/luts/alice").json()["labels"][0]["label"] == LABEL

        # side by side: the LUT's words on its side only
        fill(browser, "prompt", "My bank? Quillmere Bank")
        fill(browser, "max-tokens", "12")
        by_id(browser, "generate-btn").click()
        wait(browser, lambda d: by_id(d, "generate-btn").text == "Generate" and
             by_id(d, "out-lut").text.startswith("My bank? Quillmere Bank"))
        base, with_lut = by_id(browser, "out-base").text, by_id(browser, "out-lut").text
        browser.save_screenshot(str(tmp_path / "side_by_side.png"))
        assert with_lut.startswith("My bank? Quillmere Bank is a small lender in Oslo."), with_lut
        assert base.startswith("My bank? Quillmere Bank") and "lender in Oslo" not in base, base
        mark, = browser.find_elements("css selector", "#out-lut mark.lut")  # what the LUT wrote, marked
        assert mark.text.strip() == "is a small lender in Oslo." and LABEL in mark.get_attribute("title")
        assert not browser.find_elements("css selector", "#out-base mark")
        assert error_text(browser) == ""

        # delete a label from the list, then teach one for the chat (a context with a newline)
        fill(browser, "teach-label", "Zorblat Fenwick plays the oboe.")
        by_id(browser, "teach-btn").click()
        wait(browser, lambda d: "Zorblat" in by_id(d, "labels").text)
        browser.find_elements("css selector", "#labels button.delete")[-1].click()
        wait(browser, lambda d: "Zorblat" not in by_id(d, "labels").text)
        assert [x["label"] for x in requests.get(module_server.url + "/luts/alice").json()["labels"]] == [LABEL]
        fill(browser, "teach-label", " Quillmere Bank lends to farmers.")
        fill(browser, "teach-context", "Who lends to farmers?\nAssistant:")
        by_id(browser, "teach-btn").click()
        wait(browser, lambda d: "lends to farmers." in by_id(d, "labels").text)

        # the chat tab: the answer is built from the stream's deltas as they arrive
        by_id(browser, "tab-chat").click()
        assert by_id(browser, "panel-chat").is_displayed() and not by_id(browser, "panel-compare").is_displayed()
        browser.execute_script("""
            window.chatChanges = 0;
            new MutationObserver((records) => { window.chatChanges += records.length; })
              .observe(document.getElementById('chat-log'), {subtree: true, childList: true, characterData: true});""")
        by_id(browser, "chat-input").send_keys("Who lends to farmers?\n")
        wait(browser, lambda d: not by_id(d, "chat-send").get_property("disabled") and
             len(d.find_elements("css selector", "#chat-log .msg.assistant")) == 1)
        answer = browser.find_element("css selector", "#chat-log .msg.assistant .content").text
        assert answer.startswith("Quillmere Bank lends to farmers."), answer
        mark = browser.find_element("css selector", "#chat-log .msg.assistant mark.lut")
        assert mark.text.startswith("Quillmere Bank lends to farmers.") and "lends to farmers" in mark.get_attribute("title")
        assert browser.execute_script("return window.chatChanges") > 4  # two messages added, then deltas
        assert error_text(browser) == ""
        by_id(browser, "chat-reset").click()
        assert by_id(browser, "chat-log").text == ""


@needs_browser
def test_a_bad_key_shows_the_servers_401(module_server, browser, tmp_path):
    with screenshot_on_failure(browser, tmp_path):
        made = subprocess.run([sys.executable, os.path.join(ROOT, "access.py"), "--state_db",
                               os.path.join(module_server.workdir, "out", "server.sqlite"), "create", "--name", "admin",
                               "--admin"], capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        key = made.stdout.strip().splitlines()[-1]
        browser.get(module_server.url + "/playground")
        by_id(browser, "tab-compare").click()
        fill(browser, "lut-name", "alice")
        fill(browser, "api-key", "sk-gpt2-not-a-key")
        wait(browser, lambda d: error_text(d) == "401: invalid or revoked API key")
        by_id(browser, "generate-btn").click()  # /v1 answers OpenAI's error object: its message is shown
        wait(browser, lambda d: error_text(d) == "401: invalid or revoked API key" and
             by_id(d, "generate-btn").text == "Generate")
        fill(browser, "api-key", key)
        wait(browser, lambda d: LABEL in by_id(d, "labels").text and error_text(d) == "")
