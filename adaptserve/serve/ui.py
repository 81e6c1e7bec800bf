"""Gradio UI at /ui: a streaming chat with a model picker, and a FinQA tab (table + question -> program -> answer).

The UI is another thin client of the engines: it goes through the same `ModelPool` as the HTTP routes. The server
imports this module (and gradio) only when /ui is first visited (`ui_mount.LazyUI`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from offline boxes

import gradio as gr
from fastapi import FastAPI
from gradio.routes import App

from adaptserve.serve.engine import SamplingParams, TextDelta
from adaptserve.serve.errors import APIError
from adaptserve.serve.finqa_answer import answer_finqa
from adaptserve.serve.pool import ModelPool
from adaptserve.serve.schema import FinQARequest, FinQAResponse

EXAMPLE_TABLE = """| 2015 | 2014
net revenue | $ 5829 | $ 5735
operating expenses | 3200 | 3150"""
EXAMPLE_QUESTION = "what is the percentage change in net revenue from 2014 to 2015?"


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


def build_ui(pool: ModelPool) -> gr.Blocks:
    async def chat(message: str, history: list[dict], model: str, temperature: float, max_tokens: int) -> AsyncIterator[str]:
        messages = [
            {"role": m["role"], "content": _text(m["content"])} for m in history if m.get("role") in ("user", "assistant")
        ]
        messages.append({"role": "user", "content": message})
        try:
            engine = pool.get(model)
            generation = pool.start(
                engine,
                engine.chat_prompt(messages),
                SamplingParams(max_tokens=int(max_tokens), temperature=float(temperature), stop=engine.chat_stops()),
            )
        except APIError as err:
            raise gr.Error(err.message) from None
        reply = ""
        async for event in generation.events():
            if isinstance(event, TextDelta):
                reply += event.text
                yield reply

    async def finqa(model: str, question: str, table_text: str, context: str, samples: float) -> tuple[str, str, str, str]:
        if not question.strip():
            raise gr.Error("Write a question first.")
        try:
            engine = pool.get(model)
            pre = [context] if context.strip() else []
            req = FinQARequest(question=question, table=parse_table(table_text), pre_text=pre, samples=int(samples))
            result = await answer_finqa(pool, engine, req)
        except APIError as err:
            raise gr.Error(err.message) from None
        answer = result.error if result.answer is None else str(result.answer)
        return result.program or "(none)", answer or "", confidence_text(result), result.raw

    with gr.Blocks(title="adaptserve", analytics_enabled=False) as demo:
        gr.Markdown("## adaptserve\nChat with the served models, or ask a FinQA question over a table.")
        with gr.Tab("Chat"):
            model = gr.Dropdown(pool.names, value=pool.names[0], label="Model")
            with gr.Accordion("Sampling", open=False):
                temperature = gr.Slider(0.0, 2.0, value=0.3, step=0.05, label="Temperature")
                max_tokens = gr.Slider(16, 1024, value=256, step=16, label="Max new tokens")
            gr.ChatInterface(chat, additional_inputs=[model, temperature, max_tokens], fill_height=False)
        with gr.Tab("FinQA"):
            fq_model = gr.Dropdown(pool.names, value=pool.names[-1], label="Model")
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


def gradio_app(parent: FastAPI, pool: ModelPool) -> App:
    """The UI's gradio app, set up as `gr.mount_gradio_app` sets it up at /ui of `parent` (which has started
    already), but left for the caller to route to and to run (`running`)."""
    lifespan = parent.router.lifespan_context
    gr.mount_gradio_app(parent, build_ui(pool), path="/ui", ssr_mode=False)
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
