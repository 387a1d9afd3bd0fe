"""The playground as a user meets it: `python inference.py serve` started as a subprocess on a free loopback port,
the page driven in headless Chromium (Debian's `chromium`, which tests/install_browser.sh installs; Playwright drives
it, no browser of its own downloaded), and stopped with SIGTERM.

References are independent of the page: `generate_inference` (merged, as a notebook calls it) for the adapter pane,
plain transformers greedy generation for the base pane, `GenerationOptions`' own ValueError for a bad option.
About 25 s on 2 shared cores: the adapter's five training steps, the server's start (torch, transformers, Gradio),
the two generations of 16 tokens and the references.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from playwright.sync_api import expect, sync_playwright
from transformers import AutoModelForCausalLM, AutoTokenizer

import inference
from conftest import REPO, SAMPLE, TINY_BLOOM, one_torch_thread
from prompter import Prompter
from support import generation

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
# Headless, and none of Chromium's own background connections (updates, sync, safe browsing...): on a machine
# without a network each one is refused, many at a time. Playwright gives every launch a fresh profile folder.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
MAX_NEW_TOKENS = 16
TIMEOUT_MS = 60_000  # generous: a shared CI machine can be slow to start a generation, never to finish one this short


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(adapter, tmp_path_factory):
    """The server process and its URL, once the page answers; killed at the end if a test left it running."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    # One torch thread: the toy model's ops take microseconds, and on a busy 2-core machine waiting for a second
    # thread costs more than the op (tests/test_inference.py runs single-threaded for the same reason).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "inference.py", "serve", "--lora-weights", str(adapter),
                                 "--model-path", str(TINY_BLOOM), "--port", str(port)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"the server did not answer within 90 s:\n{log.read_text()}"
        if port_answers(port):
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                pass
        time.sleep(0.2)
    proc.log = log
    yield proc, url, port
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.fail(f"no {CHROMIUM}: run sh tests/install_browser.sh (the README's test command does)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    _, url, _ = server
    page = browser.new_page(viewport={"width": 1100, "height": 1000})
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(url)
    expect(page.locator("#instruction textarea")).to_be_visible()
    yield page
    page.close()
    # Offline means nothing but the page's own server: no fonts, scripts or telemetry from elsewhere.
    assert all(u.startswith(url) for u in requested), [u for u in requested if not u.startswith(url)]


@pytest.fixture(scope="module")
def one_thread():
    with one_torch_thread():
        yield
    inference.clear_cache()


def base_reference(instruction: str, user_inp: str) -> str:
    """The base model's greedy answer, from transformers alone."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_BLOOM)
    model = AutoModelForCausalLM.from_pretrained(TINY_BLOOM).eval()
    ids = tokenizer(Prompter().generate_prompt(instruction, user_inp or None), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return Prompter().get_response(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))


def open_options(page) -> None:
    if not page.locator("#max_new_tokens input").is_visible():
        page.get_by_text("Generation options").click()


def set_option(page, name: str, value: str) -> None:
    """Type an option's value and leave the field (Tab), then check the field holds it: on a loaded machine a click
    on Generate right after a bare fill once sent the field's default (the run said "done" instead of the error)."""
    field = page.locator(f"#{name} input")
    for _ in range(2):  # the first use of a just-installed Chromium once saw the page reset the field to its default
        field.fill(value)
        field.press("Tab")
        with contextlib.suppress(AssertionError):
            expect(field).to_have_value(value, timeout=2000)
            return
    field.fill(value)
    field.press("Tab")
    expect(field).to_have_value(value)


def test_the_panes_show_generate_inference_and_the_base_model_as_they_stream(page, adapter, one_thread):
    record = json.loads(SAMPLE.read_text(encoding="utf-8"))[5]  # "Identify the odd one out.", with an input
    page.get_by_text(record["instruction"], exact=True).click()  # one of the examples
    expect(page.locator("#instruction textarea")).to_have_value(record["instruction"])
    expect(page.locator("#input textarea")).to_have_value(record["input"])
    open_options(page)
    set_option(page, "max_new_tokens", str(MAX_NEW_TOKENS))
    page.locator("#generate").click()
    expect(page.locator("#status")).to_have_text("done", timeout=TIMEOUT_MS)
    expect(page.locator("#generate")).to_be_enabled()

    expected = inference.generate_inference(record["instruction"], record["input"], str(TINY_BLOOM), adapter,
                                            max_new_tokens=MAX_NEW_TOKENS, device="cpu")
    expected_base = base_reference(record["instruction"], record["input"])
    # to_have_value retries: the status line can render a frame before a long textarea takes its last value (seen
    # on a loaded 2-core machine as a prefix of the answer); what the panes settle on must be these exactly.
    expect(page.locator("#adapter-pane textarea")).to_have_value(expected, timeout=5000)
    expect(page.locator("#base-pane textarea")).to_have_value(expected_base, timeout=5000)
    assert expected != expected_base  # the adapter changes the answer, so the panes are not trivially equal


def test_each_pane_streams_growing_answers_that_end_in_the_full_one(adapter, one_thread):
    """What the page streams, read where it is produced (a browser samples the pane once a frame, and on a busy
    machine may see only the end): growing prefixes of the answer, then exactly generate_responses' answer, for the
    adapter and for the base model (adapter disabled), the model left with its adapter on."""
    import playground

    loaded = inference.load_model(str(TINY_BLOOM), str(adapter), merge=False, device="cpu")
    page_model = playground.Playground(loaded, inference.PROMPTER)
    prompt = generation.build_prompt(inference.PROMPTER, "Identify the odd one out.", "Twitter, Instagram, Telegram")
    options = inference.GenerationOptions(max_new_tokens=MAX_NEW_TOKENS)
    answers = {}
    for with_adapter in (True, False):
        streamed = list(page_model.stream(prompt, options, adapter=with_adapter))
        final = streamed[-1]
        partial = [text for text in streamed[:-1] if text and text != final]
        assert len(partial) >= 3 and all(final.startswith(text) for text in partial), streamed
        answers[with_adapter] = final
    assert answers[True] == generation.generate_responses(loaded, [prompt], options, inference.PROMPTER)[0]
    with loaded.model.disable_adapter():
        assert answers[False] == generation.generate_responses(loaded, [prompt], options, inference.PROMPTER)[0]
    assert answers[True] != answers[False]


@pytest.mark.parametrize("sample, option, value, expected_options", [
    (False, "max_new_tokens", "0", {"max_new_tokens": 0}),
    (True, "top_p", "128", {"do_sample": True, "top_p": 128}),
])
def test_a_bad_option_is_its_message_on_the_page(page, sample, option, value, expected_options):
    with pytest.raises(ValueError) as raised:
        inference.GenerationOptions(**expected_options)
    page.locator("#instruction textarea").fill("Name three primary colors.")
    expect(page.locator("#top_p input")).to_be_hidden()  # sampling settings show only with "sample" ticked
    open_options(page)
    if sample:
        page.locator("#sample input").check()
    set_option(page, option, value)
    page.locator("#generate").click()
    expect(page.locator("#status")).to_have_text(f"error: {raised.value}", timeout=TIMEOUT_MS)
    assert page.locator("#adapter-pane textarea").input_value() == page.locator("#base-pane textarea").input_value()
    assert page.locator("#adapter-pane textarea").input_value() == ""


def test_sigterm_stops_the_server_cleanly_and_frees_the_port(server):
    proc, _, port = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.log.read_text()
    assert "playground stopped" in proc.log.read_text()
    assert "Traceback" not in proc.log.read_text()
    assert not port_answers(port)
