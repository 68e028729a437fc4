"""The web pages in a real browser: headless Chromium (Debian's chromium and chromium-driver,
which .ci/run installs) driven by Selenium, against numllama-server on stories260K. Each test
saves a screenshot in its output folder (docs/ui-*.png are copies of these)."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time

import pytest
import requests

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT_S = 60


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        pytest.fail("headless Chromium is needed: apt-get install chromium chromium-driver (.ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860",
                "--disable-gpu", "--no-first-run"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def ui_server(stories_path):
    from server_util import Server
    s = Server(["-c", "2048", "-np", "2", "--metrics"], model=stories_path)
    yield s
    s.stop()


def wait_for(predicate, timeout=WAIT_S):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def open_page(browser, url):
    browser.get(url)
    browser.execute_script("localStorage.clear()")
    browser.get(url)


def set_field(browser, field_id, value):
    from selenium.webdriver.common.by import By
    el = browser.find_element(By.ID, field_id)
    browser.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('change'))",
                           el, str(value))


def words(text: str) -> str:
    return " ".join(text.split())


def assistant_texts(browser) -> list[str]:
    from selenium.webdriver.common.by import By
    return [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .content")]


def send(browser, text):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    box = browser.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def idle(browser) -> bool:
    from selenium.webdriver.common.by import By
    return browser.find_element(By.ID, "send").is_enabled()


def test_chat_streams_regenerates_and_edits(browser, ui_server, tmp_path):
    """A message gets the reply the API gives for the same conversation (greedy); Regenerate
    replaces it; Edit puts the message back in the box and drops what followed it."""
    from selenium.webdriver.common.by import By
    open_page(browser, ui_server.url + "/")
    browser.find_element(By.CSS_SELECTOR, "details.settings summary").click()
    set_field(browser, "temperature", 0)
    set_field(browser, "max_tokens", 40)
    send(browser, "Once upon a time")
    wait_for(lambda: idle(browser) and assistant_texts(browser) and assistant_texts(browser)[-1])
    want = ui_server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Once upon a time"}],
                                                   "temperature": 0, "max_tokens": 40}).json()
    assert words(assistant_texts(browser)[-1]) == words(want["choices"][0]["message"]["content"])
    browser.save_screenshot(str(tmp_path / "ui-chat.png"))
    # the conversation survives a reload (localStorage)
    browser.refresh()
    wait_for(lambda: assistant_texts(browser))
    assert words(assistant_texts(browser)[-1]) == words(want["choices"][0]["message"]["content"])
    browser.find_element(By.CSS_SELECTOR, ".msg.assistant .regenerate").click()
    wait_for(lambda: idle(browser) and len(assistant_texts(browser)) == 1 and assistant_texts(browser)[0])
    assert words(assistant_texts(browser)[0]) == words(want["choices"][0]["message"]["content"])
    browser.find_element(By.CSS_SELECTOR, ".msg.user .edit").click()
    assert browser.find_element(By.ID, "input").get_attribute("value") == "Once upon a time"
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []


def test_raw_mode_and_the_template_view(browser, ui_server):
    """Raw mode sends the text to /completion as it is; the settings show the prompt the chat
    template makes of the conversation (/apply-template)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    open_page(browser, ui_server.url + "/")
    browser.find_element(By.CSS_SELECTOR, "details.settings summary").click()
    Select(browser.find_element(By.ID, "mode")).select_by_value("raw")
    set_field(browser, "temperature", 0)
    set_field(browser, "max_tokens", 24)
    send(browser, "Once upon a time")
    wait_for(lambda: idle(browser) and assistant_texts(browser) and assistant_texts(browser)[-1])
    want = ui_server.post("/completion", {"prompt": "Once upon a time", "n_predict": 24, "temperature": 0}).json()
    assert words(assistant_texts(browser)[-1]) == words(want["content"])
    set_field(browser, "system", "Be brief.")
    browser.find_element(By.ID, "show-template").click()
    shown = wait_for(lambda: browser.find_element(By.ID, "template").text)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Once upon a time"},
                {"role": "assistant", "content": want["content"]}]
    assert words(shown) == words(ui_server.post("/apply-template", {"messages": messages}).json()["prompt"])


def test_stop_ends_the_generation_on_the_server(browser, ui_server):
    from selenium.webdriver.common.by import By
    open_page(browser, ui_server.url + "/")
    set_field(browser, "max_tokens", 1500)
    set_field(browser, "temperature", 1.0)
    send(browser, "Tell me a very long story")
    wait_for(lambda: assistant_texts(browser) and len(assistant_texts(browser)[-1]) > 20)
    browser.find_element(By.ID, "stop").click()
    wait_for(lambda: idle(browser))
    # the server frees the slot: the client went away
    wait_for(lambda: not any(s["is_processing"] for s in ui_server.get("/slots").json()), timeout=10)
    assert len(assistant_texts(browser)[-1]) > 20     # what came before the stop is kept


def test_model_text_is_never_html(browser, ui_server):
    """Markdown is rendered from escaped text: a reply holding HTML shows it as text."""
    from selenium.webdriver.common.by import By
    open_page(browser, ui_server.url + "/")
    browser.execute_script(
        "localStorage.setItem('numllama.chats', JSON.stringify([{id: 'x', title: 't', messages: ["
        "{role: 'user', content: 'hi'}, {role: 'assistant', content: "
        "'<img src=x onerror=window.pwned=1> **bold** and `code`'}]}]))")
    browser.refresh()
    wait_for(lambda: assistant_texts(browser))
    content = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .content")
    assert "<img src=x onerror=window.pwned=1>" in content.text
    assert content.find_elements(By.TAG_NAME, "img") == []
    assert content.find_element(By.TAG_NAME, "strong").text == "bold"
    assert browser.execute_script("return window.pwned === undefined")


def test_sampling_view_shows_the_apis_probabilities(browser, ui_server, tmp_path):
    """The alternatives the page shows for a token are the API's completion_probabilities:
    before the sampler chain (post_sampling_probs false) and after it (true), same seed."""
    from selenium.webdriver.common.by import By
    open_page(browser, ui_server.url + "/sampling")
    set_field(browser, "n_predict", 12)
    set_field(browser, "seed", 7)
    browser.find_element(By.ID, "generate").click()
    tokens = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#tokens .tok"))
    body = {"prompt": "Once upon a time", "n_predict": 12, "temperature": 0.8, "top_k": 40, "top_p": 0.95,
            "min_p": 0.05, "seed": 7, "n_probs": 5, "cache_prompt": True}
    after = ui_server.post("/completion", {**body, "post_sampling_probs": True}).json()["completion_probabilities"]
    before = ui_server.post("/completion", {**body, "post_sampling_probs": False}).json()["completion_probabilities"]
    assert [t.get_attribute("textContent") for t in tokens] == [p["token"] for p in after]
    for i in (0, len(tokens) - 1):
        tokens[i].click()
        shown_after = [(json.loads(r.find_element(By.CLASS_NAME, "token").text), r.find_element(By.CLASS_NAME, "p").text)
                       for r in browser.find_elements(By.CSS_SELECTOR, "#after tbody tr")]
        shown_before = [(json.loads(r.find_element(By.CLASS_NAME, "token").text), r.find_element(By.CLASS_NAME, "p").text)
                        for r in browser.find_elements(By.CSS_SELECTOR, "#before tbody tr")]
        assert shown_after == [(e["token"], f"{e['prob']:.4f}") for e in after[i]["top_probs"]]
        assert shown_before == [(e["token"], f"{2.718281828459045 ** e['logprob']:.4f}") for e in before[i]["top_logprobs"]]
        chosen = browser.find_element(By.CSS_SELECTOR, "#after tr.chosen")
        assert int(chosen.get_attribute("data-id")) == after[i]["id"]
    browser.save_screenshot(str(tmp_path / "ui-sampling.png"))


def test_operator_view_follows_the_slots(browser, ui_server, tmp_path):
    stop = threading.Event()

    def generate():   # the server busy for as long as the test looks
        while not stop.is_set():
            requests.post(ui_server.url + "/completion", json={"prompt": "Once", "n_predict": 1000, "ignore_eos": True,
                                                               "temperature": 1.0}, timeout=120)
    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    open_page(browser, ui_server.url + "/operator")
    # (read in one script: the page redraws its tables every second)
    slot_rows = "return [...document.querySelectorAll('#slots tr.slot')].map((r) => r.textContent)"
    rate = ("const c = [...document.querySelectorAll('#metrics td')].find((c) => c.dataset.name === "
            "'tokens generated per second (now)'); return c ? Number(c.textContent) : 0")
    wait_for(lambda: any("processing" in r for r in browser.execute_script(slot_rows)))
    assert wait_for(lambda: browser.execute_script(rate)) > 0
    wait_for(lambda: any("processing" in r for r in browser.execute_script(slot_rows)))
    browser.save_screenshot(str(tmp_path / "ui-operator.png"))
    assert len(browser.execute_script(slot_rows)) == 2
    stop.set()
    worker.join(120)


def test_pages_are_public_scripts_are_not_files(ui_server):
    for path in ("/", "/sampling", "/operator", "/static/chat.js", "/static/style.css"):
        r = requests.get(ui_server.url + path, timeout=10)
        assert r.status_code == 200 and "script-src 'self'" in r.headers["Content-Security-Policy"]
    for path in ("/static/../ui.py", "/static/ui.py", "/static/%2e%2e%2fui.py", "/static/missing.js"):
        assert requests.get(ui_server.url + path, timeout=10).status_code == 404


def test_chat_in_router_mode_names_the_chosen_model(browser, tmp_path):
    """With no model option the server is a router: the chat page lists its models, shows the
    chosen one's state with a button to load or unload it, and each request names the one
    chosen (the answer is that model's, as the API gives it)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    from server_util import Server
    snap = tmp_path / "models--org--tiny" / "snapshots" / ("1" * 40)
    snap.mkdir(parents=True)
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("1" * 40)
    shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "stories260K.gguf"),
                snap / "tiny-F32.gguf")
    s = Server(["-c", "512"], env={"LLAMA_CACHE": str(tmp_path)})
    try:
        open_page(browser, s.url + "/")
        wait_for(lambda: browser.find_element(By.ID, "model-choice").is_displayed())
        assert [o.text for o in Select(browser.find_element(By.ID, "model-select")).options] == ["org/tiny:F32"]

        def state():
            return browser.find_element(By.ID, "model-status").text
        wait_for(lambda: state() == "unloaded")
        browser.find_element(By.ID, "model-load").click()
        wait_for(lambda: state() == "loaded" and browser.find_element(By.ID, "model-unload").is_displayed())
        assert s.get("/models").json()["data"][0]["status"]["value"] == "loaded"
        browser.find_element(By.ID, "model-unload").click()
        wait_for(lambda: state() == "unloaded" and browser.find_element(By.ID, "model-load").is_displayed())
        assert s.get("/models").json()["data"][0]["status"]["value"] == "unloaded"
        browser.find_element(By.CSS_SELECTOR, "details.settings summary").click()
        set_field(browser, "temperature", 0)
        set_field(browser, "max_tokens", 12)
        send(browser, "Once upon a time")
        wait_for(lambda: idle(browser) and assistant_texts(browser) and assistant_texts(browser)[-1])
        want = s.post("/v1/chat/completions", {"model": "org/tiny:F32", "temperature": 0, "max_tokens": 12,
                                               "messages": [{"role": "user", "content": "Once upon a time"}]}).json()
        assert words(assistant_texts(browser)[-1]) == words(want["choices"][0]["message"]["content"])
        wait_for(lambda: state() == "loaded")   # (the request loaded it again)
        browser.save_screenshot(str(tmp_path / "ui-router.png"))
    finally:
        s.stop()
