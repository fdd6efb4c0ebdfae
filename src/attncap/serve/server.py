"""Run the app with uvicorn: in the foreground (``attncap serve``) or in a background thread.

The listening socket is bound here rather than by uvicorn, so a port in use is one clear
:class:`AttncapError` and port 0 (an OS-chosen free port) tells its number. The background form
serves notebooks, the tests and benchmarks: a real HTTP server in-process, stopped on exit.

On Ctrl-C or SIGTERM the server stops accepting connections, the app answers every waiting
request with a 503 and lets the batch in the model finish (:func:`attncap.serve.app.begin_shutdown`),
then uvicorn waits up to ``GRACE_S`` for the responses to go out.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from typing import Iterator

import uvicorn
from fastapi import FastAPI

from ..errors import AttncapError
from .app import begin_shutdown

LOCAL = "127.0.0.1"
GRACE_S = 5


def bind(host: str = LOCAL, port: int = 0) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not yet listening; uvicorn does that)."""
    if not 0 <= port <= 65535:
        raise AttncapError(f"--port must be between 0 and 65535, got {port}")
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise AttncapError(f"cannot resolve --host {host} ({exc.strerror})") from None
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(info[4])
    except OSError as exc:
        sock.close()
        raise AttncapError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port "
                           "or --host") from None
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app first when it shuts down."""

    def __init__(self, app: FastAPI, quiet: bool):
        limits = getattr(app.state, "limits", None)
        super().__init__(uvicorn.Config(app, log_level="warning" if quiet else "info",
                                        access_log=not quiet, timeout_graceful_shutdown=GRACE_S,
                                        limit_concurrency=getattr(limits, "max_connections", None)))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if hasattr(self.config.app.state, "batcher"):
            begin_shutdown(self.config.app)
        await super().shutdown(sockets)


def run_server(app: FastAPI, host: str = LOCAL, port: int = 8000, quiet: bool = False,
               sock: socket.socket | None = None) -> None:
    """Serve until Ctrl-C on ``sock`` (see :func:`bind`) or ``host:port``.

    Binding anything but loopback is the caller's explicit choice.
    """
    sock = sock or bind(host, port)
    if host not in (LOCAL, "localhost", "::1"):
        print(f"warning: serving on {host}: other machines can reach this server", file=sys.stderr)
    url = f"http://{host}:{sock.getsockname()[1]}"
    print(f"attncap: {url}/ (web page), {url}/docs (API docs), {url}/health", flush=True)
    _Server(app, quiet).run(sockets=[sock])


@contextlib.contextmanager
def background_server(app: FastAPI, host: str = LOCAL, port: int = 0,
                      timeout: float = 60.0) -> Iterator[str]:
    """Serve ``app`` from a daemon thread; yields its base URL (``http://127.0.0.1:PORT``)."""
    sock = bind(host, port)
    server = _Server(app, quiet=True)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="attncap-server",
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {host}:{port} did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
