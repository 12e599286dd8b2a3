"""``workbench tui --serve``: the TUI in a web browser (textual-serve), guarded.

textual-serve itself has no authentication: anyone who can reach the port, or any web page open in
the user's own browser (a cross-site WebSocket), would get the app and could type into it, and every
connection starts one more app process. So the server is wrapped:

- a random **token** in the URL it prints: the page is served only with it (it then sets a
  same-site, HTTP-only cookie that the page's WebSocket carries); every other request without the
  token or the cookie is refused (403). Only textual-serve's own static files (JS, CSS, fonts) need none;
- the **Host** header must name the address served (a loopback name on a loopback address), which
  stops DNS-rebinding pages; a request with an **Origin** must come from that same origin;
- at most ``max_sessions`` app processes at once (503 beyond);
- a non-loopback ``--host`` only with ``--allow-remote`` (the token then crosses the network in
  plain HTTP: prefer ``ssh -L``).
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from workbench.errors import WorkbenchError

COOKIE = "workbench_tui_token"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]", "::1")


@dataclass(frozen=True)
class ServeConfig:
    """What the guarded server serves and to whom; ``token`` is the secret in the printed URL."""

    command: str
    host: str
    port: int
    token: str
    max_sessions: int
    loopback: bool

    @property
    def url(self) -> str:
        """The URL to open, token included: ``http://HOST:PORT/?token=…``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/?token={self.token}"


def check_serve_options(command: str, host: str, port: int, allow_remote: bool, max_sessions: int) -> ServeConfig:
    """Refuse, in one line, a port outside 1–65535, a host this machine cannot resolve, a host that
    other machines can reach without ``allow_remote``, a ``max_sessions`` < 1. Returns the
    :class:`ServeConfig` with a fresh random token."""
    if not 1 <= port <= 65535:
        raise WorkbenchError(f"--port must be between 1 and 65535, not {port}")
    if max_sessions < 1:
        raise WorkbenchError(f"--max-sessions must be ≥ 1, not {max_sessions}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as e:
        raise WorkbenchError(f"--host {host!r} is not an address this machine can listen on ({e})") from None
    addresses = {info[4][0] for info in infos}
    loopback = all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
    if not loopback and not allow_remote:
        raise WorkbenchError(f"--host {host} ({', '.join(sorted(addresses))}) can be reached from other machines; the TUI would "
                             "be served to them in plain HTTP: use an ssh tunnel to localhost, or pass --allow-remote")
    return ServeConfig(command, host, port, secrets.token_urlsafe(24), max_sessions, loopback)


def _allowed_hosts(config: ServeConfig) -> set[str] | None:
    """The Host header values accepted, or None (``--allow-remote``: any, the token guards)."""
    if not config.loopback:
        return None
    names = {config.host, *LOOPBACK_NAMES}
    return {f"{name}:{config.port}" for name in names} | ({name for name in names} if config.port == 80 else set())


def guard(config: ServeConfig) -> Callable[..., Awaitable[Any]]:
    """The aiohttp middleware that enforces the token, Host, Origin and the session cap."""
    from aiohttp import web

    hosts = _allowed_hosts(config)
    sessions = {"open": 0}

    def has_token(request: "web.Request") -> bool:
        given = request.query.get("token") or request.cookies.get(COOKIE) or ""
        return hmac.compare_digest(given.encode(), config.token.encode())

    @web.middleware
    async def middleware(request: "web.Request", handler: Callable[..., Awaitable[Any]]) -> Any:
        host = request.headers.get("Host", "")
        if hosts is not None and host not in hosts:
            raise web.HTTPForbidden(text=f"refused: Host {host!r} is not this server\n")
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"http://{host}":
            raise web.HTTPForbidden(text=f"refused: a request from another origin ({origin})\n")
        if request.path.startswith("/static/"):
            return await handler(request)
        if not has_token(request):
            raise web.HTTPForbidden(text="refused: open the URL with the token that `workbench tui --serve` printed\n")
        if request.path == "/ws":
            if sessions["open"] >= config.max_sessions:
                raise web.HTTPServiceUnavailable(text=f"refused: {config.max_sessions} sessions are open already (--max-sessions)\n")
            sessions["open"] += 1
            try:
                return await handler(request)
            finally:
                sessions["open"] -= 1
        response = await handler(request)
        if request.query.get("token"):
            response.set_cookie(COOKIE, config.token, httponly=True, samesite="Strict", path="/")
        return response

    return middleware


def guarded_app_factory(config: ServeConfig, title: str = "workbench tui") -> Callable[[], Awaitable[Any]]:
    """An async factory of textual-serve's aiohttp application with :func:`guard` in front of every
    route; returns the factory (``aiohttp.web.run_app`` takes its coroutine)."""
    from textual_serve.server import Server

    server = Server(config.command, host=config.host, port=config.port, title=title)

    async def make() -> Any:
        app = await server._make_app()  # textual-serve's routes; the guard runs before each
        app.middlewares.append(guard(config))
        app.on_startup.remove(server.on_startup)  # its banner names the URL without the token
        return app

    make.server = server  # type: ignore[attr-defined]
    return make


def serve(config: ServeConfig) -> None:
    """Print the URL (token included) and serve until Ctrl-C."""
    from aiohttp import web

    factory = guarded_app_factory(config)
    server = factory.server  # type: ignore[attr-defined]
    server.initialize_logging()
    print(f"serving the workbench TUI on {config.url} (ctrl+c stops; the token is the key: share it with no one; "
          f"at most {config.max_sessions} sessions)", flush=True)
    try:
        web.run_app(factory(), host=config.host, port=config.port, print=lambda *args: None)
    except OSError as e:
        raise WorkbenchError(f"cannot serve on {config.host}:{config.port}: {e.strerror or e}") from None
