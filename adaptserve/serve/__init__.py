"""`adaptserve serve`: OpenAI-compatible HTTP API, FinQA endpoint, metrics and a Gradio UI over the engines."""

from __future__ import annotations

import logging

import uvicorn

from adaptserve.serve.app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app", "serve"]

log = logging.getLogger(__name__)


def serve(config: ServeConfig) -> None:
    """Run the server until SIGINT/SIGTERM; uvicorn then runs the app's shutdown, which closes the models."""
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=10)
