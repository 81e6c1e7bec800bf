"""The Gradio UI's mount at /ui, which imports and builds the UI (`ui.py`) at its first request."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)


class LazyUI:
    """The Gradio UI at /ui, imported and built at its first request: gradio's import time and memory
    (benchmarks/results/footprint) are then paid only by a server whose UI is used.

    The UI calls the API of `api`, or of the app it is mounted in when None, with the first of `keys` if any."""

    def __init__(self, names: list[str], keys: list[str], api: ASGIApp | None = None) -> None:
        self._names, self._key, self._api = names, keys[0] if keys else None, api
        self._app: ASGIApp | None = None
        self._building = asyncio.Lock()
        self._running = contextlib.AsyncExitStack()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is None:
            async with self._building:
                if self._app is None:
                    self._app = await self._start(scope["app"])
        await self._app(scope, receive, send)

    async def _start(self, parent: FastAPI) -> ASGIApp:
        log.info("starting the UI at /ui")
        # The import runs off the event loop, so that streams in flight do not stall for it.
        ui = await asyncio.to_thread(importlib.import_module, "adaptserve.serve.ui")
        app = ui.gradio_app(parent, ui.LocalAPI(self._api or parent, self._key), self._names)
        await self._running.enter_async_context(ui.running(app))
        return app

    async def close(self) -> None:
        await self._running.aclose()
