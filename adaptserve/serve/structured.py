"""Structured output: a request's `response_format` or raw `grammar` as one GBNF grammar, which llama.cpp's grammar
sampler enforces token by token (llama_engine.py)."""

from __future__ import annotations

import json

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from adaptserve.serve.schema import ResponseFormat


class InvalidSchema(ValueError):
    """A JSON schema the grammar converter cannot turn into a grammar."""


def response_grammar(response_format: ResponseFormat | None, grammar: str | None) -> tuple[str | None, str]:
    """The GBNF grammar a request asks for (None: unconstrained), and the request field it came from."""
    if grammar is not None:
        return grammar, "grammar"
    if response_format is None or response_format.type == "text":
        return None, "response_format"
    if response_format.type == "json_object":
        return JSON_GBNF, "response_format"
    assert response_format.json_schema is not None  # the schema checks it
    try:
        return json_schema_to_gbnf(json.dumps(response_format.json_schema.schema_)), "response_format"
    except Exception as err:  # the converter raises whatever its walk over the schema hits
        raise InvalidSchema(f"the JSON schema cannot be turned into a grammar: {type(err).__name__}: {err}") from None
