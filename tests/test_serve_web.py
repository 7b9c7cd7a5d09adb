"""The web chat page at / in headless Chromium (Debian's `chromium` + `chromium-driver`,
driven by selenium): type a message, see the streamed answer appear, and it is the
server's answer; with an API key, and on a keyless server, whose Host and Content-Type
checks the page's own requests must pass. Chromium is installed with apt-get when
missing; the test skips, with the reason, only if that is impossible."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from test_serve_api import API_KEY, Server, long_context_copy

PACKAGES = ["chromium", "chromium-driver"]


def _found() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def chromium() -> tuple[str, str]:
    """(browser, chromedriver), installing Debian's packages once if they are missing."""
    if _found():
        return _found()
    if shutil.which("apt-get") is None:
        pytest.skip("Chromium is not installed and there is no apt-get to install it with")
    if os.geteuid() != 0:
        pytest.skip("Chromium is not installed and installing it needs root (apt-get install -y chromium chromium-driver)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = [["apt-get", "install", "-y", *PACKAGES], ["apt-get", "update"], ["apt-get", "install", "-y", *PACKAGES]]
    last = None
    for cmd in steps:
        last = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
        if cmd[1] == "install" and last.returncode == 0 and _found():
            return _found()
    pytest.skip(f"Chromium could not be installed ({' '.join(steps[-1])} exited {last.returncode}: "
                f"{(last.stderr or last.stdout).strip().splitlines()[-1:]})")


@pytest.fixture(scope="module")
def browser(chromium):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def checkpoint(trained_checkpoint, tmp_path_factory):
    return long_context_copy(trained_checkpoint, tmp_path_factory.mktemp("web") / "micro.bin", 1024)


@pytest.fixture(scope="module")
def server(checkpoint):
    srv = Server(checkpoint, "--api-key", API_KEY)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def keyless_server(checkpoint):
    """No key: the page's own requests must pass the Host and Content-Type checks."""
    srv = Server(checkpoint)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def expected(trained_checkpoint):
    from smedjan.chat import render
    from smedjan.infer import Engine, SamplingParams
    from smedjan.model import load_model

    model, tok, _ = load_model(trained_checkpoint)
    engine = Engine(model, tok)

    def answer(messages):
        ids = render(tok, messages, add_generation_prompt=True).ids
        return engine.generate([ids], SamplingParams(temperature=0, max_new_tokens=40))[0].text

    return answer


def _open(browser, server, key: str | None):
    """The page, with the model named, temperature 0 and 40 tokens; returns ask(text) -> reply."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)
    browser.get(server.url + "/")
    assert browser.title == "smedjan chat"
    if key is not None:
        browser.find_element(By.ID, "api-key").send_keys(key, Keys.TAB)  # the page reads /v1/models once it changes
    wait.until(lambda d: "micro.bin" in d.find_element(By.ID, "model").text)
    for field, value in (("temperature", "0"), ("max-tokens", "40")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)

    def ask(text: str) -> str:
        n = len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
        box = browser.find_element(By.ID, "input")
        box.send_keys(text, Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.msg.assistant[data-done="1"]')) == n + 1)
        reply = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[n]
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
        return browser.execute_script("return arguments[0].textContent", reply)

    return ask


def test_the_page_streams_the_servers_answer(browser, server, expected):
    ask = _open(browser, server, API_KEY)
    first = ask("Good morrow, cousin")
    assert first == expected([{"role": "user", "content": "Good morrow, cousin"}]) and first
    # The page sends the whole conversation: the second answer depends on the first.
    second = ask("What news?")
    assert second == expected([{"role": "user", "content": "Good morrow, cousin"},
                               {"role": "assistant", "content": first}, {"role": "user", "content": "What news?"}])
    assert server.health()["active"] == 0


def test_the_page_works_on_a_keyless_server(browser, keyless_server, expected):
    ask = _open(browser, keyless_server, None)
    reply = ask("Good morrow, cousin")
    assert reply == expected([{"role": "user", "content": "Good morrow, cousin"}]) and reply
