"""The OpenAI wire format: request bodies, response bodies, stream chunks and error bodies.

Requests validate strictly (a string where a number belongs is a 400, not a guess); fields of the
OpenAI API that do not change the reply (user, presence_penalty at 0, ...) are accepted and ignored.
Our extensions: `top_k` in requests, `speculation` (accepted tokens per step, tokens/s) in responses.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---- requests ----------------------------------------------------------------------------------


class _Request(BaseModel):
    # allow_inf_nan=False: a NaN or infinite number (JSON's NaN / Infinity) is refused as "not a finite number"
    # before any range check, whose message would name the wrong rule ("should be <= 2")
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingRequest(_Request):
    """What both endpoints share. None means the server's default (set on the command line)."""

    model: str
    max_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # what a torch generator takes
    stop: str | list[str] | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v):
        if v is not None and any(s == "" for s in ([v] if isinstance(v, str) else v)):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, v):
        if v not in (None, 1):
            raise ValueError("only n=1 is supported (requests are decoded one at a time, batch 1)")
        return v

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, gt=0)  # the newer name of max_tokens
    logprobs: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise ValueError("logprobs are not supported")
        return v

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingRequest):
    prompt: str | list[int]
    echo: bool | None = None
    logprobs: int | None = None

    @field_validator("echo", "logprobs")
    @classmethod
    def _unsupported(cls, v, info):
        if v:
            raise ValueError(f"{info.field_name} is not supported")
        return v

    def token_limit(self) -> int | None:
        return self.max_tokens


# ---- responses ---------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Speculation(BaseModel):
    """Extension: how the reply was decoded. steps counts base forward passes, the prefill included."""

    speculative: bool
    steps: int
    accepted_tokens_per_step: float
    tokens_per_s: float
    prefill_s: float
    wall_s: float


class Finished(BaseModel):
    """A decoded reply as the worker hands it over."""

    text: str
    finish_reason: Literal["stop", "length"]
    usage: Usage
    speculation: Speculation


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _head(id: str, object: str, model: str) -> dict:
    return {"id": id, "object": object, "created": int(time.time()), "model": model}


def completion_body(chat: bool, id: str, model: str, done: Finished) -> dict:
    """The non-streaming response: chat.completion or text_completion."""
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": done.text}, "logprobs": None,
                  "finish_reason": done.finish_reason}
    else:
        choice = {"index": 0, "text": done.text, "logprobs": None, "finish_reason": done.finish_reason}
    return {**_head(id, "chat.completion" if chat else "text_completion", model), "choices": [choice],
            "usage": done.usage.model_dump(), "speculation": done.speculation.model_dump()}


def chunk_body(chat: bool, id: str, model: str, text: str | None = None, finish_reason: str | None = None,
               first: bool = False) -> dict:
    """One stream chunk: a text delta, or (with finish_reason) the last chunk of the choice."""
    if chat:
        delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {**_head(id, "chat.completion.chunk" if chat else "text_completion", model), "choices": [choice]}


def usage_chunk_body(chat: bool, id: str, model: str, done: Finished) -> dict:
    """The stream's closing chunk with no choices (stream_options.include_usage), as OpenAI sends it."""
    return {**_head(id, "chat.completion.chunk" if chat else "text_completion", model), "choices": [],
            "usage": done.usage.model_dump(), "speculation": done.speculation.model_dump()}


def models_body(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                        "owned_by": "ctc-drafter"}]}
