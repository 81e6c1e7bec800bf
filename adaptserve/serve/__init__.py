"""`adaptserve serve`: OpenAI-compatible HTTP API, FinQA endpoint, metrics and a Gradio UI over the engines."""

from __future__ import annotations

import logging
import signal
import socket
import sys
from types import FrameType

import uvicorn

from adaptserve.serve.app import create_app
from adaptserve.serve.config import ServeConfig, ServeConfigError
from adaptserve.serve.pool import ModelPool

__all__ = ["ServeConfig", "ServeConfigError", "create_app", "serve"]

log = logging.getLogger(__name__)

# What uvicorn's own wait for open connections adds to --shutdown-timeout: time for the engines to report their
# failures and for the streams to send their last event. Past it uvicorn cuts the connections.
_SHUTDOWN_MARGIN = 5.0


class _Server(uvicorn.Server):
    """uvicorn, whose shutdown first gives the engines their deadline: in-flight requests finish within it or
    end with a clean error (an SSE error event and [DONE] for a stream), rather than with a cut connection."""

    def __init__(self, config: uvicorn.Config, pool: ModelPool, timeout: float) -> None:
        super().__init__(config)
        self.pool, self.timeout = pool, timeout

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        log.info("shutting down: in-flight requests have %g s to finish", self.timeout)
        self.pool.drain(self.timeout)
        await super().shutdown(sockets)


def _exit_cleanly(sig: int, _: FrameType | None) -> None:
    # uvicorn re-raises the SIGTERM it drained for; a stop that drained cleanly is a success, so exit 0.
    sys.exit(0)


def serve(config: ServeConfig) -> None:
    """Run the server until SIGINT/SIGTERM; then drain (see _Server), close the models and exit 0."""
    if config.ray is not None:
        from adaptserve.serve.ray_app import run

        run(config)
        return
    app = create_app(config)
    uv = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level="info",
        timeout_graceful_shutdown=config.shutdown_timeout + _SHUTDOWN_MARGIN,
    )
    signal.signal(signal.SIGTERM, _exit_cleanly)
    _Server(uv, app.state.pool, config.shutdown_timeout).run()
