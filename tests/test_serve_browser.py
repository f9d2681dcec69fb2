"""The real-browser tier (``make browser-test``; marker ``browser``, deselected from ``make test``): ``helios-jax
serve`` with the embedded nano model, its page in Debian's headless Chromium driven by Playwright.

The page loads with the server's defaults, two chunks or more play (the video element's
``getVideoPlaybackQuality().totalVideoFrames`` grows past one chunk's frames), a prompt switch sent while it
plays is acknowledged for a chunk that then arrives, and a screenshot is written to out/serve-screenshot.png.
A missing browser or Playwright is a failure that says how to install them, never a skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("HELIOS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# As root on a machine with no outside network: no sandbox, no GPU, none of Chromium's background connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"]
SCREENSHOT = os.path.join("out", "serve-screenshot.png")
READY_S = 300  # load + warm-up of the nano model on a busy 2-core machine (about 25 s idle)
CHUNK_FRAMES = 33
SWITCHED = "a yellow square moves left on a black background"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``helios-jax serve`` on a free local port, once /health answers (after its warm-up)."""
    port, log = _free_port(), tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "helios_jax.cli", "serve", "--port", str(port),
                                    "--output_dir", str(log.parent / "videos")], stdout=out, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + READY_S
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"helios-jax serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"helios-jax serve did not answer in {READY_S} s:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield url, log
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    if not os.path.isfile(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: `make browser-test` installs Debian's (apt-get install -y chromium, "
                    "as root), or set HELIOS_CHROMIUM to a Chromium binary")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is not installed: `make browser-test` installs it (pip install -c locks/test.txt "
                    "'.[browser]'); it drives the system Chromium, no browser download")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def _frames_played(page) -> int:
    return page.evaluate("document.getElementById('video').getVideoPlaybackQuality().totalVideoFrames")


def test_page_plays_chunks_and_takes_a_prompt_switch_mid_stream(server, browser):
    url, log = server
    page = browser.new_page()
    console = []
    page.on("console", lambda message: console.append(message.text))
    page.goto(url + "/")
    assert page.title() == "helios-jax serve"
    page.wait_for_function("document.getElementById('prompt').value.length > 0", timeout=10_000)
    page.fill("#num_frames", str(4 * CHUNK_FRAMES))  # four chunks: the switch lands while it plays
    page.click("#start")
    page.wait_for_function("window.heliosState.chunks >= 1", timeout=60_000)
    page.fill("#prompt", SWITCHED)
    page.click("#send_prompt")
    page.wait_for_function("window.heliosState.switches.length >= 1", timeout=10_000)
    page.wait_for_function("document.getElementById('state').textContent === 'done'", timeout=120_000)
    early = _frames_played(page)
    page.wait_for_function(f"document.getElementById('video').getVideoPlaybackQuality().totalVideoFrames > "
                           f"{max(early, CHUNK_FRAMES)}", timeout=30_000)
    time.sleep(1.0)
    state = page.evaluate("window.heliosState")
    played = _frames_played(page)
    os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
    page.screenshot(path=SCREENSHOT)
    context = f"state {state}, console {console}, server log:\n{log.read_text()[-2000:]}"
    assert not state["errors"], context
    assert state["indices"] == [0, 1, 2, 3], context
    assert played > CHUNK_FRAMES and played >= early, f"only {played} frames played; {context}"
    switch = state["switches"][0]
    assert 1 <= switch <= 3, f"the switch was not mid-stream (from chunk {switch}); {context}"
