"""The real ``workbench tui`` command: in a tmux terminal, and served to headless Chromium (--serve)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tui_support import build_run

WORKBENCH = [sys.executable, "-m", "workbench"]


@pytest.fixture(scope="module")
def run_path(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("terminal") / "run.h5", n_samples=10, n_rounds=4)


def poll(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (make system-tools)")
def test_workbench_tui_in_tmux_steps_a_round(run_path, tmp_path):
    sock = f"wb-test-{os.getpid()}"
    tmux = ["tmux", "-L", sock]
    command = " ".join([*WORKBENCH, "tui", str(run_path)])
    env = {**os.environ, "TERM": "xterm-256color"}
    subprocess.run([*tmux, "new-session", "-d", "-s", "tui", "-x", "100", "-y", "30", command], check=True, env=env)
    try:
        def pane() -> str:
            return subprocess.run([*tmux, "capture-pane", "-p", "-t", "tui"], capture_output=True, text=True).stdout

        def pane_with(*texts: str):
            return lambda: (lambda p: p if all(t in p for t in texts) else None)(pane())

        poll(pane_with("round 1/4", "sample 1/10", "samples syn-", "clearly the answer is"), 60, "the first sample, round 1")
        subprocess.run([*tmux, "send-keys", "-t", "tui", "n"], check=True)
        poll(pane_with("round 2/4", "vs round 1:"), 20, "round 2/4 after n")
        subprocess.run([*tmux, "send-keys", "-t", "tui", "q"], check=True)
        poll(lambda: subprocess.run([*tmux, "has-session", "-t", "tui"], capture_output=True).returncode != 0, 20, "q to quit")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


def test_a_bad_run_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    for args, message in (([str(tmp_path / "missing.h5")], "run file not found"), ([str(bad)], "not a readable HDF5 file"),
                          ([], "give a RUN file"), ([str(bad), "--live"], "not both")):
        out = subprocess.run([*WORKBENCH, "tui", *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium_screenshot(url: str, out: Path, ready, timeout: float = 90) -> bytes:
    """Open ``url`` in headless Chromium and screenshot it (DevTools protocol, real time: the page
    talks to the app over a websocket) every second until ``ready(png_path)``; returns the PNG."""
    import asyncio
    import base64
    import json
    import re
    import tempfile

    import aiohttp

    profile = tempfile.mkdtemp(prefix="chromium-")
    browser = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1200,800", url],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            line = browser.stderr.readline()
            if m := re.search(r"DevTools listening on ws://[\d.]+:(\d+)/", line):
                port = int(m.group(1))
        assert port, "chromium did not open its DevTools port"

        async def shoot() -> bytes:
            async with aiohttp.ClientSession() as session:
                pages = poll_pages = None
                for _ in range(50):
                    async with session.get(f"http://127.0.0.1:{port}/json/list") as r:
                        poll_pages = [p for p in json.loads(await r.text()) if p.get("type") == "page"]
                    if poll_pages:
                        pages = poll_pages
                        break
                    await asyncio.sleep(0.2)
                assert pages, "chromium opened no page"
                async with session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    end = time.monotonic() + timeout
                    n = 0
                    while True:
                        n += 1
                        await ws.send_json({"id": n, "method": "Page.captureScreenshot", "params": {"format": "png"}})
                        while (reply := json.loads((await ws.receive()).data)).get("id") != n:
                            pass
                        png = base64.b64decode(reply["result"]["data"])
                        out.write_bytes(png)
                        if ready(out) or time.monotonic() > end:
                            return png
                        await asyncio.sleep(1.0)

        return asyncio.run(shoot())
    finally:
        stop(browser)
        shutil.rmtree(profile, ignore_errors=True)


def stop(process: subprocess.Popen) -> None:
    """Terminate ``process``; kill it if it has not ended 20 s later."""
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def viridis_pixels(png: Path) -> int:
    """How many pixels are close to the bright yellow end of the TUI's colour scale (heatmap legend)."""
    import numpy as np
    from matplotlib.image import imread

    rgb = (imread(png)[..., :3] * 255).astype(np.int32)
    return int((np.abs(rgb - np.array([0xFD, 0xE7, 0x25])).sum(-1) < 40).sum())


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make system-tools)")
def test_serve_answers_and_chromium_renders_the_first_screen(run_path, tmp_path):
    port = free_port()
    server = subprocess.Popen([*WORKBENCH, "tui", str(run_path), "--serve", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def index() -> str | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                    return response.read().decode() if response.status == 200 else None
            except OSError:
                return None

        page = poll(index, 60, "the --serve page")
        assert "textual" in page.lower() and "/ws" in page
        shot = tmp_path / "serve.png"
        chromium_screenshot(f"http://127.0.0.1:{port}/", shot, ready=lambda png: viridis_pixels(png) > 50)
        keep = os.environ.get("TUI_SCREENSHOT_DIR")
        if keep:
            shutil.copy(shot, Path(keep) / "serve.png")
        # the app's first screen is up: the heatmap legend's yellow end is drawn (the splash page has none)
        assert viridis_pixels(shot) > 50, f"no app screen in the browser (see {shot})"
    finally:
        stop(server)
