"""Gradio UI at /ui: a streaming chat with a model picker, and a FinQA tab (table + question -> program -> answer).

The UI is one more client of the server's API: it calls /v1/chat/completions and /v1/finqa in process, through the
ASGI app that serves them (`LocalAPI`), so it behaves as any client does, on one server or on a Ray Serve cluster.
The server imports this module (and gradio) only when /ui is first visited (`ui_mount.LazyUI`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from offline boxes

import gradio as gr
from fastapi import FastAPI
from gradio.routes import App
from starlette.types import ASGIApp, Message

from adaptserve.serve import asgi
from adaptserve.serve.schema import FinQAResponse

EXAMPLE_TABLE = """| 2015 | 2014
net revenue | $ 5829 | $ 5735
operating expenses | 3200 | 3150"""
EXAMPLE_QUESTION = "what is the percentage change in net revenue from 2014 to 2015?"


class LocalAPI:
    """The server's HTTP API called in process: a request goes to `app` as ASGI messages, as it would from a socket."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.headers = [(b"content-type", b"application/json")]
        if api_key:
            self.headers.append((b"authorization", f"Bearer {api_key}".encode()))

    async def _call(self, path: str, body: dict[str, Any]) -> AsyncIterator[Message]:
        """The response's ASGI messages; leaving early tells the app the client disconnected."""
        data = json.dumps(body).encode()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [*self.headers, (b"content-length", str(len(data)).encode())],
            "client": ("127.0.0.1", 0),
            "server": ("127.0.0.1", 0),
        }
        async with contextlib.aclosing(asgi.call(self.app, scope, data)) as batches:
            async for batch in batches:
                for message in batch:
                    yield message

    async def chat(self, body: dict[str, Any]) -> AsyncIterator[str]:
        """The reply's text so far, after each streamed chunk; an error (as a status or an event) raises gr.Error."""
        reply, status, pending = "", 200, b""
        async with contextlib.aclosing(self._call("/v1/chat/completions", {**body, "stream": True})) as messages:
            async for message in messages:
                if message["type"] == "http.response.start":
                    status = message["status"]
                    continue
                pending += message.get("body", b"")
                if status != 200:
                    continue
                *events, pending = pending.split(b"\n\n")
                for event in (e.removeprefix(b"data: ") for e in events if e.startswith(b"data: ")):
                    if event == b"[DONE]":
                        return
                    chunk = json.loads(event)
                    if "error" in chunk:
                        raise gr.Error(chunk["error"]["message"])
                    reply += "".join(c["delta"].get("content") or "" for c in chunk["choices"])
                    yield reply
        if status != 200:
            raise gr.Error(_error_message(pending))

    async def finqa(self, body: dict[str, Any]) -> FinQAResponse:
        status, data = 200, b""
        async for message in self._call("/v1/finqa", body):
            if message["type"] == "http.response.start":
                status = message["status"]
            else:
                data += message.get("body", b"")
        if status != 200:
            raise gr.Error(_error_message(data))
        return FinQAResponse.model_validate_json(data)


def _error_message(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:200] or "the server failed to answer"


def _text(content: Any) -> str:
    """Gradio hands history content as a string or as a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def parse_table(text: str) -> list[list[str]]:
    """One row a line, cells split on `|` or tabs (commas are thousands separators in FinQA tables)."""
    sep = "|" if "|" in text else "\t"
    return [[cell.strip() for cell in line.strip().strip("|").split(sep)] for line in text.splitlines() if line.strip()]


def confidence_text(result: FinQAResponse) -> str:
    if result.confidence is None:
        return "one program drawn: no vote"
    agree = round(result.confidence * len(result.candidates))
    return f"{result.confidence:.0%} ({agree} of {len(result.candidates)} programs give this answer)"


def build_ui(api: LocalAPI, names: list[str]) -> gr.Blocks:
    async def chat(message: str, history: list[dict], model: str, temperature: float, max_tokens: int) -> AsyncIterator[str]:
        messages = [
            {"role": m["role"], "content": _text(m["content"])} for m in history if m.get("role") in ("user", "assistant")
        ]
        messages.append({"role": "user", "content": message})
        body = {"model": model, "messages": messages, "temperature": float(temperature), "max_tokens": int(max_tokens)}
        async for reply in api.chat(body):
            yield reply

    async def finqa(model: str, question: str, table_text: str, context: str, samples: float) -> tuple[str, str, str, str]:
        if not question.strip():
            raise gr.Error("Write a question first.")
        pre = [context] if context.strip() else []
        body = {"model": model, "question": question, "table": parse_table(table_text), "pre_text": pre}
        result = await api.finqa(body | {"samples": int(samples)})
        answer = result.error if result.answer is None else str(result.answer)
        return result.program or "(none)", answer or "", confidence_text(result), result.raw

    with gr.Blocks(title="adaptserve", analytics_enabled=False) as demo:
        gr.Markdown("## adaptserve\nChat with the served models, or ask a FinQA question over a table.")
        with gr.Tab("Chat"):
            model = gr.Dropdown(names, value=names[0], label="Model")
            with gr.Accordion("Sampling", open=False):
                temperature = gr.Slider(0.0, 2.0, value=0.3, step=0.05, label="Temperature")
                max_tokens = gr.Slider(16, 1024, value=256, step=16, label="Max new tokens")
            gr.ChatInterface(chat, additional_inputs=[model, temperature, max_tokens], fill_height=False)
        with gr.Tab("FinQA"):
            fq_model = gr.Dropdown(names, value=names[-1], label="Model")
            question = gr.Textbox(label="Question", value=EXAMPLE_QUESTION)
            table = gr.Textbox(label="Table (one row a line, cells separated by |)", value=EXAMPLE_TABLE, lines=6)
            context = gr.Textbox(label="Report text (optional)", lines=3)
            samples = gr.Slider(1, 16, value=4, step=1, label="Programs to draw (the answer most of them give wins)")
            ask = gr.Button("Answer", variant="primary")
            program = gr.Textbox(label="Program the model wrote")
            answer = gr.Textbox(label="Executed answer")
            confidence = gr.Textbox(label="Confidence")
            raw = gr.Textbox(label="Raw model output", lines=3)
            ask.click(finqa, [fq_model, question, table, context, samples], [program, answer, confidence, raw])
    return demo


def gradio_app(parent: FastAPI, api: LocalAPI, names: list[str]) -> App:
    """The UI's gradio app, set up as `gr.mount_gradio_app` sets it up at /ui of `parent` (which has started
    already), but left for the caller to route to and to run (`running`)."""
    lifespan = parent.router.lifespan_context
    gr.mount_gradio_app(parent, build_ui(api, names), path="/ui", ssr_mode=False)
    mount = parent.router.routes.pop()  # the Mount it appended: the caller already holds the route to /ui
    parent.router.lifespan_context = lifespan  # the parent's lifespan is running: gradio's part starts in `running`
    return mount.app


@contextlib.asynccontextmanager
async def running(app: App) -> AsyncIterator[None]:
    """What `gr.mount_gradio_app`'s lifespan does for its app: gradio's own lifespan and startup events (the queue)."""
    async with app.router.lifespan_context(app):
        app.get_blocks().run_startup_events()
        await app.get_blocks().run_extra_startup_events()
        yield
