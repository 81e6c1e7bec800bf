"""One HTTP request run through an ASGI app in process, as a server would run it: the UI's calls to the API, and a
Ray Serve replica running the app for the ingress."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.types import ASGIApp, Message, Scope


async def call(app: ASGIApp, scope: Scope, body: bytes) -> AsyncIterator[list[Message]]:
    """The response's ASGI messages, in batches of those ready together. Closing the generator early is the client
    leaving: the app sees a disconnect, and gets a second to stop before it is cancelled."""
    pending, gone = [body], asyncio.Event()
    messages: asyncio.Queue[Message | None] = asyncio.Queue()

    async def receive() -> Message:
        if pending:
            return {"type": "http.request", "body": pending.pop(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        messages.put_nowait(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            messages.put_nowait(None)

    task = asyncio.create_task(run())
    try:
        while True:
            batch = [await messages.get()]
            while not messages.empty():
                batch.append(messages.get_nowait())
            if batch[-1] is None:
                if len(batch) > 1:
                    yield batch[:-1]
                return
            yield batch
    finally:
        gone.set()
        await asyncio.wait({task}, timeout=1.0)
        task.cancel()
