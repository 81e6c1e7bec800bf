"""HTTP schema: OpenAI-compatible request/response bodies plus the FinQA endpoint.

Requests are strict: a string where a number belongs is a 400, not a silent coercion, and a parameter the server
does not honour is a 400 that names it (`unsupported_parameter`), never dropped silently. OpenAI parameters sent
at their no-op value (`logprobs: false`, `tool_choice: "none"`, ...) are accepted, as SDKs send some by default.
docs/serving.md lists every OpenAI parameter and what the server does with it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 4
MAX_STOP_LENGTH = 256
MAX_LOGIT_BIAS = 300  # entries; OpenAI's own limit
MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 16  # n, and prompts x n on completions

# OpenAI parameters this server does not honour, each with the values that ask for nothing (accepted) and why any
# other value is refused.
NOT_HONOURED: dict[str, tuple[tuple[Any, ...], str]] = {
    "suffix": ((None, ""), "suffix (insertion) is not supported"),
    "tools": ((None, []), "tool calling is not supported"),
    "tool_choice": ((None, "none"), "tool calling is not supported"),
    "parallel_tool_calls": ((None,), "tool calling is not supported"),
    "functions": ((None, []), "function calling is not supported"),
    "function_call": ((None, "none"), "function calling is not supported"),
    "modalities": ((None, ["text"]), "only text output is supported"),
    "audio": ((None,), "audio output is not supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "reasoning_effort": ((None,), "these models do not reason before answering"),
    "web_search_options": ((None,), "web search is not supported"),
    "store": ((None, False), "completions are not stored by this server"),
    "metadata": ((None, {}), "metadata is only kept with store, which this server does not offer"),
    "service_tier": ((None, "auto", "default"), "this server has one service tier"),
}


class UnsupportedParameter(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    @model_validator(mode="after")
    def _refuse_the_rest(self) -> _Request:
        """Anything not a field of this request: accepted only as an OpenAI parameter's no-op value."""
        for name, value in (self.model_extra or {}).items():
            if name not in NOT_HONOURED:
                raise UnsupportedParameter(name, "unrecognized parameter")
            accepted, why = NOT_HONOURED[name]
            if value not in accepted:
                raise UnsupportedParameter(name, why)
        return self


class StreamOptions(_Request):
    include_usage: bool = False


class JSONSchema(_Request):
    name: str = Field(..., min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema", description="the JSON schema the output follows")
    strict: bool | None = Field(None, description="always enforced: the grammar admits only what the schema allows")


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchema | None = None

    @model_validator(mode="after")
    def _schema_for_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given exactly when type is json_schema")
        return self


class SamplingFields(_Request):
    model: str | None = Field(None, description="a served model id; the first served model when omitted")
    max_tokens: int | None = Field(None, ge=1, description="completion tokens; default: up to the context window")
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens, by its newer name")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="choices to sample from the prompt, each with its own seed")
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="subtracted from a token's logit once it occurs")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="subtracted per occurrence so far")
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias in [-100, 100] added to its logit")
    user: str | None = Field(None, description="an end-user id: written to the access log, no effect on output")
    response_format: ResponseFormat | None = Field(None, description="text, or JSON (any object, or a schema's)")
    grammar: str | None = Field(None, max_length=65536, description="a GBNF grammar (root rule `root`) the output follows")
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias is None:
            return None
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens may be biased")
        for token, value in bias.items():
            if not token.isdigit():
                raise ValueError(f"keys are token ids, got {token!r}")
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"biases lie in [-100, 100], got {value} for token {token}")
        return bias

    @model_validator(mode="after")
    def _one_constraint(self) -> SamplingFields:
        if self.grammar is not None and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("send grammar or a JSON response_format, not both")
        return self

    @model_validator(mode="after")
    def _one_max_tokens(self) -> SamplingFields:
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ: send one of them")
        return self

    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logit_biases(self) -> tuple[tuple[int, float], ...]:
        return tuple(sorted((int(t), b) for t, b in (self.logit_bias or {}).items()))

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        if any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"stop strings are at most {MAX_STOP_LENGTH} characters")
        return stop

    def wants_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


Prompt = str | list[int]


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="a string or token ids, or a list of them: one choice (times n) per prompt"
    )
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="each token's log-probability and k alternatives")
    echo: bool = Field(False, description="return the prompt before the completion (with its log-probabilities)")
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES, description="sample this many, return the n most likely")

    @model_validator(mode="after")
    def _check_choices(self) -> CompletionRequest:
        prompts = self.prompts()
        if not prompts:
            raise ValueError("prompt: at least one prompt is needed")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError("best_of must be at least n")
        if len(prompts) * max(self.n, self.best_of or 1) > MAX_CHOICES:
            raise ValueError(f"prompts x n (or best_of) must be at most {MAX_CHOICES}")
        if self.stream and self.best_of not in (None, self.n):
            raise ValueError("best_of cannot be streamed: the best choices are known only at the end")
        return self

    def prompts(self) -> list[Prompt]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: bool = Field(False, description="each output token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="with logprobs: k alternatives per token")

    @model_validator(mode="after")
    def _check_top_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def message_dicts(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for "system"; chat templates only know the latter.
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class FinQARequest(_Request):
    question: str = Field(..., min_length=1)
    pre_text: list[str] | str = Field(default_factory=list)
    table: list[list[str]] = Field(default_factory=list)
    post_text: list[str] | str = Field(default_factory=list)
    model: str | None = None
    max_tokens: int = Field(96, ge=1, le=512)
    normalize: bool = Field(
        True, description="rewrite report-style numbers (1,234, (5), $1,234, a Unicode minus) into FinQA's form"
    )
    grammar: bool | None = Field(None, description="decode within FinQA's program grammar (default: where the backend can)")
    numbers_from_input: bool = Field(False, description="with the grammar: only numbers found in the question, table or text")
    samples: int = Field(1, ge=1, le=MAX_CHOICES, description="programs drawn: the greedy one plus samples - 1 sampled")
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="for the sampled programs")
    seed: int | None = None
    min_confidence: float = Field(0.0, ge=0.0, le=1.0, description="below this vote share, answer null instead")


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = Field(True, description="add the model's BOS token where it uses one")


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# ---- responses ----


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "adaptserve"
    description: str = ""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class FinQACandidate(BaseModel):
    program: str | None
    answer: float | str | None
    raw: str
    error: str | None = None


class NormalizationChange(BaseModel):
    where: str = Field(..., description='"question", "table[r][c]", "pre_text[i]" or "post_text[i]"')
    before: str
    after: str


class FinQAResponse(BaseModel):
    answer: float | str | None = Field(..., description="the program's execution; null when it did not execute")
    program: str | None = Field(..., description="the program the model wrote, as extracted from its output")
    raw: str = Field(..., description="the model's raw output")
    model: str
    error: str | None = Field(None, description="why no answer came out, when none did")
    confidence: float | None = Field(None, description="with samples > 1: the answer's share of the votes")
    candidates: list[FinQACandidate] = Field(default_factory=list, description="every program drawn, greedy first")
    normalized: list[NormalizationChange] = Field(default_factory=list, description="what normalization rewrote")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---- admin ----


class AdapterLoadRequest(_Request):
    name: str = Field(..., description="the served model id the adapter gets")
    path: str = Field(..., description="the adapter directory, absolute or relative to an --adapter-dir")


class AdapterCard(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    base: str
    path: str


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterCard]
