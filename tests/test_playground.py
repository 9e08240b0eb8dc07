"""The playground page of `edgeguard serve` in a real browser: headless Chromium (Debian's
`chromium` + `chromium-driver`) driven by Selenium, against a real server on loopback with the
trained Stream fixture, so a planted unsafe sentence really turns its tokens Unsafe.

What the page shows is compared with what the server's own endpoints answer for the same input
(`/v1/check`, its per-token lines checked in turn against `edgeguard stream --json`); the live
mode's final state with the one-shot state. Screenshots of each state go to the pytest tmp dir.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeguard.cli import main
from tests.fixtures.converted import converted
from tests.fixtures.trained import STREAM_EXAMPLES, trained_stream_checkpoint
from tests.test_server import Server, cache_env  # noqa: F401

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
TOL = 1e-3  # a stream's scores equal the CLI's within float rounding (batched decodes)
KEY = "playground-test-key"

# A safe prompt, and a response with one planted Violent sentence (held out from training).
PROMPT, RESPONSE, _, UNSAFE_FROM = next(e for e in STREAM_EXAMPLES if e[2] == "Safe" and e[3] is not None)
SAFE_RESPONSE = next(e[1] for e in STREAM_EXAMPLES if e[2] == "Safe" and e[3] is None)
HOSTILE = ('Fine. <script>window.__ran = "script"</script><img src=x onerror="window.__ran = \'img\'"> '
           '</span><b>bold?</b> & &amp; "quotes"')

pytestmark = [pytest.mark.server]
needs_chromium = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                    reason="needs Chromium and its driver (Debian: apt-get install chromium "
                                           "chromium-driver)")


@pytest.fixture(scope="module")
def stream_model():
    return str(converted(trained_stream_checkpoint(), ("f16",)))


@pytest.fixture(scope="module")
def gen_model(gen_ckpt):
    return str(converted(gen_ckpt, ("f16",)))


@pytest.fixture(scope="module")
def server(gen_model, stream_model, cache_env):
    srv = Server("--model", gen_model, "--stream-model", stream_model, env=cache_env)
    yield srv
    assert srv.stop() == 0, srv.stderr


@pytest.fixture(scope="module")
def key_server(stream_model, cache_env):
    srv = Server("--stream-model", stream_model, "--api-key", KEY, env=cache_env, wait_ready=False)
    yield srv
    assert srv.stop() == 0, srv.stderr


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where each state's screenshot goes: the pytest tmp dir, or $EDGEGUARD_SCREENSHOTS."""
    chosen = os.environ.get("EDGEGUARD_SCREENSHOTS")
    if chosen:
        Path(chosen).mkdir(parents=True, exist_ok=True)
        return Path(chosen)
    return tmp_path_factory.mktemp("playground-screenshots")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the test extra)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Without the background-networking flags Chromium reaches for Google's services at start,
    # which a closed network refuses; a fresh profile keeps runs independent.
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


# -- page helpers -----------------------------------------------------------------------
def by_id(driver, id_: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, id_)


def open_page(driver, url: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 30).until(lambda d: not by_id(d, "check").get_property("disabled")
                                    or by_id(d, "key-form").is_displayed())


def fill(driver, prompt: str, response: str, live: bool = False) -> None:
    for id_, text in (("prompt", prompt), ("response", response)):
        box = by_id(driver, id_)
        box.clear()
        box.send_keys(text)
    if by_id(driver, "live").is_selected() != live:
        by_id(driver, "live").click()


def run_check(driver) -> str:
    """Click #check and wait for the page to finish: "done" or "error"."""
    from selenium.webdriver.support.ui import WebDriverWait

    by_id(driver, "check").click()
    WebDriverWait(driver, 90).until(lambda d: by_id(d, "verdict").get_attribute("data-state") in ("done", "error"))
    state = by_id(driver, "verdict").get_attribute("data-state")
    if state == "error":
        return by_id(driver, "error").get_attribute("textContent")
    return state


def page_state(driver) -> dict:
    """Everything the page shows about the verdicts, read through its documented hooks."""
    return driver.execute_script("""
        const q = (s) => document.querySelector(s);
        return {
          verdict: q('#verdict').dataset.label,
          gen: q('#gen').hidden ? null : q('#gen-label').dataset.label,
          bars: document.querySelectorAll('#gen-bars .bar').length,
          prompt: q('#stream-prompt').dataset.label,
          response: q('#stream-label').dataset.label,
          tokens: Array.from(document.querySelectorAll('span.token')).map((s) => ({
            index: Number(s.dataset.index), label: s.dataset.label, text: s.textContent, title: s.title})),
          flagged: Array.from(document.querySelectorAll('span.token.flagged-at')).map((s) => Number(s.dataset.index)),
        };""")


def check(server: Server, **body) -> dict:
    status, _, verdict = server.post("/v1/check", body)
    assert status == 200, verdict
    return verdict


# -- the page and the per-token check, without a browser ----------------------------------
def test_the_page_is_served_self_contained_with_a_strict_policy(server):
    for path in ("/", "/playground"):
        status, head, html = server.request("GET", path)
        assert status == 200 and head["content-type"].startswith("text/html"), (path, head)
        assert "script-src 'self'" in head["content-security-policy"]
        for hook in ('id="prompt"', 'id="response"', 'id="check"', 'id="verdict"'):
            assert hook in html
        assert "http://" not in html and "https://" not in html  # nothing from the network
    for path, kind in (("/playground.js", "text/javascript"), ("/playground.css", "text/css")):
        status, head, text = server.request("GET", path)
        assert status == 200 and head["content-type"].startswith(kind) and len(text) > 500
        assert "http://" not in text and "https://" not in text
        if kind == "text/javascript":
            assert "innerHTML" not in text and "insertAdjacentHTML" not in text and "eval(" not in text


def test_the_page_is_open_but_the_api_is_not(key_server):
    assert key_server.request("GET", "/")[0] == 200
    assert key_server.request("GET", "/playground.js")[0] == 200
    assert key_server.get("/v1/models")[0] == 401


def test_check_tokens_equal_the_stream_cli(server, stream_model, cache_env, monkeypatch):
    """/v1/check's per-token lines (the colors the page shows) are `edgeguard stream --json`'s,
    and its verdict's flagged_at and token count agree with them."""
    got = check(server, model="stream", prompt=PROMPT, response=RESPONSE, tokens=True)
    monkeypatch.setenv("EDGEGUARD_CACHE_DIR", cache_env["EDGEGUARD_CACHE_DIR"])
    result = CliRunner().invoke(main, ["stream", "--model", stream_model, "--prompt", PROMPT, "--response",
                                       RESPONSE, "--json"])
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    cli_tokens, cli_verdict = lines[:-1], lines[-1]
    assert len(got["tokens"]) == len(cli_tokens) == got["response_tokens"] > 10
    for ours, theirs in zip(got["tokens"], cli_tokens):
        assert (ours["index"], ours["token"], ours["text"], ours["label"], ours["category"]) == \
            (theirs["index"], theirs["token"], theirs["text"], theirs["label"], theirs["category"])
        assert all(abs(ours["scores"][k] - theirs["scores"][k]) <= TOL for k in theirs["scores"])
    assert got["label"] == cli_verdict["label"] == "Unsafe"
    assert got["flagged_at"] == cli_verdict["flagged_at"] is not None
    assert "".join(t["text"] for t in got["tokens"]) == RESPONSE


@pytest.mark.parametrize("body", [
    {"prompt": "hi", "response": "there", "tokens": "yes"},  # not a boolean
    {"prompt": "hi", "tokens": True},  # no response
    {"model": "gen", "prompt": "hi", "response": "there", "tokens": True},  # Gen has no tokens
])
def test_check_tokens_bad_requests(server, body):
    status, _, error = server.post("/v1/check", body)
    assert status == 400 and error["error"]["code"] == "invalid_input", error


# -- in the browser ---------------------------------------------------------------------------
def _one_shot(browser, server, shots) -> dict:
    open_page(browser, server.url + "/")
    fill(browser, PROMPT, RESPONSE)
    assert run_check(browser) == "done"
    browser.save_screenshot(str(shots / "one-shot.png"))
    return page_state(browser)


@pytest.mark.browser
@pytest.mark.slow
@needs_chromium
def test_one_shot_shows_what_check_answers(browser, server, shots):
    shown = _one_shot(browser, server, shots)
    default = check(server, prompt=PROMPT, response=RESPONSE)  # the server's default model: Gen
    gen = check(server, model="gen", prompt=PROMPT, response=RESPONSE)
    prompt_only = check(server, model="stream", prompt=PROMPT)
    stream = check(server, model="stream", prompt=PROMPT, response=RESPONSE, tokens=True)

    assert shown["verdict"] == default["label"] and shown["gen"] == gen["label"] and shown["bars"] == 3
    assert shown["prompt"] == prompt_only["label"] == "Safe"
    assert shown["response"] == stream["label"] == "Unsafe"
    assert len(shown["tokens"]) == stream["response_tokens"] == len(stream["tokens"])
    for i, (span, token) in enumerate(zip(shown["tokens"], stream["tokens"])):
        assert (span["index"], span["label"], span["text"]) == (i, token["label"], token["text"])
        assert f"Unsafe {token['scores']['Unsafe']:.3f}" in span["title"]
    assert shown["flagged"] == [stream["flagged_at"]]
    # The planted sentence is what fired the debounce, not the benign text before it.
    before = "".join(t["text"] for t in shown["tokens"][:stream["flagged_at"]])
    assert len(before) >= UNSAFE_FROM
    assert {t["label"] for t in shown["tokens"] if len("".join(x["text"] for x in shown["tokens"][:t["index"]]))
            < UNSAFE_FROM - 1} == {"Safe"}


@pytest.mark.browser
@pytest.mark.slow
@needs_chromium
def test_live_mode_ends_where_one_shot_does(browser, server, shots):
    one_shot = _one_shot(browser, server, shots)
    fill(browser, PROMPT, RESPONSE, live=True)
    assert run_check(browser) == "done"
    browser.save_screenshot(str(shots / "live.png"))
    live = page_state(browser)
    assert [(t["index"], t["label"], t["text"]) for t in live["tokens"]] == \
        [(t["index"], t["label"], t["text"]) for t in one_shot["tokens"]]
    for key in ("verdict", "gen", "prompt", "response", "flagged"):
        assert live[key] == one_shot[key], key

    fill(browser, PROMPT, SAFE_RESPONSE, live=True)
    assert run_check(browser) == "done"
    safe = page_state(browser)
    assert safe["response"] == "Safe" and safe["flagged"] == [] and safe["tokens"]
    browser.save_screenshot(str(shots / "live-safe.png"))


@pytest.mark.browser
@pytest.mark.slow
@needs_chromium
@pytest.mark.parametrize("live", [False, True], ids=["one-shot", "live"])
def test_markup_in_a_response_is_shown_never_run(browser, server, shots, live):
    open_page(browser, server.url + "/playground")
    fill(browser, "<b>hello</b>", HOSTILE, live=live)
    assert run_check(browser) == "done"
    browser.save_screenshot(str(shots / f"markup-{'live' if live else 'one-shot'}.png"))
    assert browser.execute_script("return window.__ran") is None
    shown = page_state(browser)
    assert "".join(t["text"] for t in shown["tokens"]) == HOSTILE
    assert browser.execute_script(
        "return document.querySelectorAll('#tokens script, #tokens img, #tokens b, main script').length") == 0


@pytest.mark.browser
@pytest.mark.slow
@needs_chromium
def test_api_key_is_asked_once_and_kept_in_the_tab(browser, key_server, shots):
    from selenium.webdriver.support.ui import WebDriverWait

    status, _ = key_server.get("/ready")
    assert status == 200
    browser.get(key_server.url + "/")
    browser.execute_script("sessionStorage.clear(); localStorage.clear();")
    open_page(browser, key_server.url + "/")
    assert by_id(browser, "key-form").is_displayed()
    by_id(browser, "api-key").send_keys("wrong")
    by_id(browser, "key-save").click()
    WebDriverWait(browser, 30).until(lambda d: "refused" in by_id(d, "key-form").text)
    by_id(browser, "api-key").send_keys(KEY)
    by_id(browser, "key-save").click()
    WebDriverWait(browser, 30).until(lambda d: not by_id(d, "check").get_property("disabled"))
    assert not by_id(browser, "key-form").is_displayed()
    status, _, want = key_server.post("/v1/check", {"prompt": PROMPT, "response": RESPONSE, "tokens": True},
                                      headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200 and want["label"] == "Unsafe"
    for live in (False, True):  # live: the key goes to /v1/stream as a WebSocket subprotocol
        fill(browser, PROMPT, RESPONSE, live=live)
        assert run_check(browser) == "done"
        browser.save_screenshot(str(shots / f"api-key-{'live' if live else 'one-shot'}.png"))
        shown = page_state(browser)
        assert shown["verdict"] == want["label"] and shown["flagged"] == [want["flagged_at"]]
        assert [t["label"] for t in shown["tokens"]] == [t["label"] for t in want["tokens"]]
    assert browser.execute_script("return [sessionStorage.length, localStorage.length]") == [1, 0]
    browser.refresh()  # the same tab: not asked again
    open_page(browser, key_server.url + "/")
    assert not by_id(browser, "key-form").is_displayed()


# -- the chat box, with --upstream ------------------------------------------------------------
@pytest.fixture(scope="module")
def upstream():
    from tests.fixtures.upstream import Reply, ScriptedUpstream, words

    with ScriptedUpstream(lambda body: Reply(words(RESPONSE), delay=0.01)) as up:
        yield up


@pytest.fixture(scope="module")
def proxy_server(stream_model, upstream, cache_env):
    srv = Server("--stream-model", stream_model, "--upstream", upstream.url, env=cache_env)
    yield srv
    assert srv.stop() == 0, srv.stderr


def streamed_chat(server: Server, messages: list) -> tuple[str, str, dict]:
    """(released content, refusal text, edgeguard object) of one streamed chat through the proxy."""
    status, _, body = server.post("/v1/chat/completions", {"model": "scripted-llm", "messages": messages,
                                                           "stream": True})
    assert status == 200, body
    content, refusal, info = "", "", None
    for line in body.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[len("data: "):])
        info = chunk.get("edgeguard", info)
        for choice in chunk.get("choices", []):
            piece = (choice.get("delta") or {}).get("content") or ""
            if choice.get("finish_reason") == "content_filter":
                refusal += piece
            else:
                content += piece
    return content, refusal, info


@pytest.mark.browser
@pytest.mark.slow
@needs_chromium
def test_chat_box_shows_where_the_proxy_cut(browser, proxy_server, server, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(browser, server.url + "/")  # no --upstream: no chat box
    assert not by_id(browser, "chat").is_displayed()

    open_page(browser, proxy_server.url + "/")
    WebDriverWait(browser, 30).until(lambda d: by_id(d, "chat").is_displayed())
    by_id(browser, "chat-input").send_keys(PROMPT)
    by_id(browser, "chat-send").click()
    answer = "#chat-log .message[data-role=assistant][data-state=done]"
    WebDriverWait(browser, 90).until(lambda d: d.find_elements(By.CSS_SELECTOR, answer))
    browser.save_screenshot(str(shots / "chat-cut.png"))
    shown = browser.execute_script(f"""
        const m = document.querySelector('{answer}');
        const text = (s) => (m.querySelector(s) || {{textContent: null}}).textContent;
        return {{action: m.dataset.action, released: text('.released'), refusal: text('.refusal'),
                 note: text('.guard-note')}};""")
    content, refusal, info = streamed_chat(proxy_server, [{"role": "user", "content": PROMPT}])
    assert info["action"] == shown["action"] == "cut"
    assert shown["released"] == content and shown["refusal"] == refusal and refusal
    assert RESPONSE.startswith(content) and len(content) < len(RESPONSE)
    assert f"at token {info['flagged_at']}" in shown["note"]
