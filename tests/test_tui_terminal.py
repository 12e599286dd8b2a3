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


def start_serving(run_path: Path, port: int, *extra: str) -> tuple[subprocess.Popen, str]:
    """``workbench tui RUN --serve`` on 127.0.0.1:``port``; returns the process and the URL it printed
    (token included), read within 60 s."""
    server = subprocess.Popen([*WORKBENCH, "tui", str(run_path), "--serve", "--host", "127.0.0.1", "--port", str(port), *extra],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def read_url() -> str | None:
        import select

        if select.select([server.stdout], [], [], 0.5)[0]:
            lines.append(server.stdout.readline())
        found = [w for line in lines for w in line.split() if w.startswith("http://")]
        assert server.poll() is None or found, "".join(lines)
        return found[0] if found else None

    try:
        url = poll(read_url, 60, "the --serve URL")
    except BaseException:
        stop(server)
        raise
    return server, url


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
    """(status, body, headers) of a GET, HTTP errors included; status 0 when nothing answers (the
    server not listening yet); 5 s timeout."""
    import urllib.error

    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)
    except OSError:
        return 0, "", {}


def test_serve_needs_the_token_and_refuses_other_origins_and_hosts(run_path):
    """The URL printed holds a token: without it, with a wrong one, from another Origin or with another
    Host header (DNS rebinding) nothing is served; with it, the page and a cookie for its WebSocket."""
    port = free_port()
    server, url = start_serving(run_path, port, "--max-sessions", "1")
    try:
        base = f"http://127.0.0.1:{port}"
        assert url.startswith(base + "/?token=") and len(url.split("token=")[1]) >= 20
        assert poll(lambda: fetch(base + "/")[0], 60, "the server to answer") == 403  # no token: refused
        assert fetch(base + "/?token=wrong")[0] == 403
        assert fetch(base + "/ws")[0] == 403
        assert fetch(url, {"Origin": "http://evil.example"})[0] == 403
        assert fetch(url, {"Host": f"evil.example:{port}"})[0] == 403
        status, page, headers = fetch(url)
        assert status == 200 and "/ws" in page
        assert "workbench_tui_token=" in headers.get("Set-Cookie", "") and "HttpOnly" in headers["Set-Cookie"]
        token = url.split("token=")[1]
        cookie = {"Cookie": f"workbench_tui_token={token}"}
        assert fetch(base + "/", cookie)[0] == 200
        assert fetch(base + "/ws", {**cookie, "Origin": "http://evil.example"})[0] == 403
    finally:
        stop(server)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make system-tools)")
def test_serve_answers_and_chromium_renders_the_first_screen(run_path, tmp_path):
    port = free_port()
    server, url = start_serving(run_path, port)
    try:
        page = poll(lambda: (lambda r: r[1] if r[0] == 200 else None)(fetch(url)), 60, "the --serve page")
        assert "textual" in page.lower() and "/ws" in page
        shot = tmp_path / "serve.png"
        chromium_screenshot(url, shot, ready=lambda png: viridis_pixels(png) > 50)
        keep = os.environ.get("TUI_SCREENSHOT_DIR")
        if keep:
            shutil.copy(shot, Path(keep) / "serve.png")
        # the app's first screen is up: the heatmap legend's yellow end is drawn (the splash page has none)
        assert viridis_pixels(shot) > 50, f"no app screen in the browser (see {shot})"
    finally:
        stop(server)


def test_serve_caps_the_sessions_open_at_once():
    """The guard in front of textual-serve: a WebSocket beyond --max-sessions is refused (503) while
    the others are open, and accepted again once one closes (a stand-in /ws handler holds it open)."""
    import asyncio

    from aiohttp import WSMsgType, web
    from aiohttp.test_utils import TestClient, TestServer

    from tui.serve import ServeConfig, guard

    async def scenario() -> None:
        release = asyncio.Event()

        async def held(request):
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await release.wait()
            await ws.close()
            return ws

        port = free_port()
        app = web.Application(middlewares=[guard(ServeConfig("true", "127.0.0.1", port, "tok", 2, True))])
        app.router.add_get("/ws", held)
        server = TestServer(app, host="127.0.0.1", port=port)
        async with TestClient(server) as client:
            first = await client.ws_connect("/ws?token=tok")
            second = await client.ws_connect("/ws?token=tok")
            third = await client.get("/ws?token=tok", headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                                                 "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "x3JJHMbDL1EzLkh9GBhXDw=="})
            assert third.status == 503, third.status
            release.set()
            assert (await first.receive()).type in (WSMsgType.CLOSE, WSMsgType.CLOSED)
            await second.receive()
            await first.close()
            await second.close()
            for _ in range(50):  # the handlers' finally blocks run after the close
                if (await client.get("/ws?token=tok")).status != 503:
                    break
                await asyncio.sleep(0.05)
            assert (await client.get("/ws?token=tok")).status != 503

    asyncio.run(asyncio.wait_for(scenario(), 30))
