"""The dashboard of ``harmony monitor --web``: a Starlette app served by uvicorn.

Routes: ``/`` the page, ``/static/…`` its script and style (package data, nothing from a CDN),
``/api/state`` one snapshot (JSON), ``/api/stream`` server-sent events (a snapshot each time the
state changes, at most every ``SEND_EVERY_S``; a comment every ``KEEPALIVE_S`` otherwise) and
``/metrics`` (Prometheus text format, :mod:`testbed.monitor.metrics`). Server-sent events rather
than a websocket: the page only listens, the browser's ``EventSource`` reconnects by itself, and
it is plain HTTP that any proxy passes."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from testbed.monitor.metrics import registry_for
from testbed.monitor.state import MonitorState

STATIC = Path(__file__).resolve().parent / "static"
SEND_EVERY_S = 0.25
KEEPALIVE_S = 10.0


def create_app(state: MonitorState) -> Starlette:
    """The dashboard over ``state``."""
    registry = registry_for(state)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def snapshot(request: Request) -> Response:
        return JSONResponse(state.snapshot())

    async def stream(request: Request) -> Response:
        async def events() -> AsyncIterator[str]:
            sent, quiet_since = -1, time.monotonic()
            yield "retry: 1000\n\n"
            while not await request.is_disconnected():
                if state.version != sent:
                    snap = state.snapshot()
                    sent, quiet_since = snap["version"], time.monotonic()
                    yield f"event: state\ndata: {json.dumps(snap)}\n\n"
                elif time.monotonic() - quiet_since > KEEPALIVE_S:
                    quiet_since = time.monotonic()
                    yield ": keep-alive\n\n"
                await asyncio.sleep(SEND_EVERY_S)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[
        Route("/", index),
        Route("/api/state", snapshot),
        Route("/api/stream", stream),
        Route("/metrics", metrics),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ])


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # run in a thread: the caller handles signals
        pass


class DashboardServer:
    """The app on ``host:port`` in a background thread (``port=0``: a free port, see :attr:`port`)."""

    def __init__(self, state: MonitorState, host: str = "127.0.0.1", port: int = 8765) -> None:
        config = uvicorn.Config(create_app(state), host=host, port=port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=1)
        self.server = _Server(config)
        self.host = host
        self._thread = threading.Thread(target=self.server.run, name="monitor-web", daemon=True)

    def start(self, timeout: float = 20.0) -> DashboardServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the dashboard did not start on {self.host}:{self.server.config.port} "
                                   "(is the port in use? pick another with --port)")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C: stop it)."""
        try:
            while self._thread.is_alive():
                self._thread.join(0.5)
        except KeyboardInterrupt:
            self.stop()
