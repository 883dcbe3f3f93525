"""`latentdiff serve` in a real browser: headless Chromium, driven through selenium, on a local port.

Needs Debian's `chromium` and `chromium-driver` (`make test` installs them when run as root);
elsewhere the test is skipped with the command that installs them. Screenshots of both tabs are
saved under the test's tmp_path (printed with -s).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("gradio", reason="latentdiff serve needs gradio: pip install -e '.[serve]' (make setup does)")
pytest.importorskip("selenium", reason="the browser test needs selenium: pip install -e '.[dev]'")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from latentdiff.serve.app import start  # noqa: E402
from latentdiff.serve.generation import PNG_KEY  # noqa: E402

INSTALL = "apt-get update && apt-get install -y chromium chromium-driver (as root; `make test` does it)"
WAIT = 60  # seconds: an upper bound for any one page change, not a measured speed


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        # .ci/run sets LATENTDIFF_REQUIRE_BROWSER: there the test must run, not skip.
        (pytest.fail if os.environ.get("LATENTDIFF_REQUIRE_BROWSER") else pytest.skip)(
            f"headless Chromium is not installed: {INSTALL}"
        )
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser(tmp_path):
    chromium, driver_path = _browser_paths()
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        "--disable-gpu",
        "--no-first-run",
    ):
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # to list every request the page makes
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.downloads = downloads
    yield driver
    driver.quit()


@pytest.fixture
def server(prior_run, pipe):
    server = start(prior_run[0], port=_free_port(), pipe=pipe, device="cpu", quiet=True)
    yield server
    server.close()


def _fill(driver, selector: str, text: str) -> None:
    box = driver.find_element(By.CSS_SELECTOR, selector)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(text)


def _screenshot(driver, path: Path) -> Path:
    """The whole page: the window grown to the page's height (at most 2400 px), once its images have loaded."""
    height = driver.execute_script("return document.querySelector('.gradio-container').scrollHeight")
    driver.set_window_size(1400, min(height + 160, 2400))  # + the window's own chrome
    driver.execute_script("window.scrollTo(0, 0)")
    WebDriverWait(driver, WAIT).until(
        lambda d: d.execute_script("return Array.from(document.images).every(i => i.complete)")
    )
    driver.save_screenshot(str(path))
    return path


def test_generate_and_runs_tabs_in_headless_chromium(browser, server, pipe, tmp_path):
    wait = WebDriverWait(browser, WAIT)
    assert server.url.startswith("http://127.0.0.1:")
    browser.get(server.url)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#prompt textarea"))

    # A bad value: a message on the page, no traceback.
    _fill(browser, "#steps input", "0")
    browser.find_element(By.ID, "generate").click()
    toast = wait.until(lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, ".toast-body") if "steps" in e.text])
    assert "steps must be in 1.." in toast[0].text and "Traceback" not in browser.page_source
    browser.find_element(By.CSS_SELECTOR, ".toast-close").click()

    # A long request in this tab (1000 steps of 16 images: far more than a few seconds on a CPU)...
    _fill(browser, "#steps input", "1000")
    _fill(browser, "#n input[type=number]", "16")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .progress-text"))  # the sampling progress bar
    first = browser.current_window_handle

    # ...and a short one from a second tab: it waits in the queue, it does not run beside it or crash.
    browser.switch_to.new_window("tab")
    browser.get(server.url)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#prompt textarea"))
    _fill(browser, "#prompt textarea", "a large red circle on the left")
    _fill(browser, "#steps input", "3")
    _fill(browser, "#seed input", "5")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .meta-text, #gallery .progress-text"))  # pending
    assert server.generator.busy and server.generator.completed == 0

    # Cancel the long one in the first tab: it stops, writes nothing, and the queued one then runs.
    browser.switch_to.window(first)
    browser.find_element(By.ID, "cancel").click()
    wait.until(lambda d: server.generator.completed == 1 and not server.generator.busy)
    assert not browser.find_elements(By.CSS_SELECTOR, "#gallery img")
    browser.switch_to.window(next(h for h in browser.window_handles if h != first))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) == 4)
    command = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#command textarea").get_attribute("value"))
    assert command.startswith("latentdiff generate 'a large red circle on the left' --run ")
    assert "--steps 3" in command and "--seed 5" in command and "--n 4" in command

    # Download the first PNG as a user would: it decodes at the run's resolution and carries its settings.
    links = browser.find_elements(By.CSS_SELECTOR, "#files a[download]")
    assert len(links) == 4
    name = links[0].get_attribute("download")
    links[0].click()
    downloaded = browser.downloads / name
    wait.until(lambda d: downloaded.is_file() and not list(browser.downloads.glob("*.crdownload")))
    height, width = pipe("", n=1, steps=1).shape[-2:]
    with Image.open(downloaded) as png:
        assert png.format == "PNG" and png.size == (width, height)
        parameters = json.loads(png.text[PNG_KEY])
    assert parameters["prompts"] == ["a large red circle on the left"]
    assert (parameters["steps"], parameters["seed"], parameters["index"]) == (3, 5, 0)
    assert parameters["command"] == command
    generate_shot = _screenshot(browser, tmp_path / "serve_generate.png")

    # The Runs tab: the autoencoder's training curves are drawn (an image rendered from metrics.jsonl).
    browser.set_window_size(1400, 1000)
    next(b for b in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text == "Runs").click()
    plot = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#curves-autoencoder img"))[0]
    assert plot.get_attribute("src").startswith("data:image/png;base64,")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", plot) > 100)
    assert "summary.json" in browser.page_source
    runs_shot = _screenshot(browser, tmp_path / "serve_runs.png")

    # Offline: every request the page made went to this server (no CDN, fonts or analytics).
    urls = set()
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.add(message["params"]["request"]["url"])
    elsewhere = {u for u in urls if not u.startswith((server.url, "data:", "blob:"))}
    assert urls and not elsewhere, sorted(elsewhere)
    print(f"\nscreenshots: {generate_shot} {runs_shot}")
