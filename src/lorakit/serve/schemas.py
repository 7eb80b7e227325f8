"""OpenAI request bodies (validated with pydantic) and OpenAI-format errors."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Parameters lorakit does not implement: accepted only at their neutral value, refused otherwise.
NEUTRAL = {
    "n": 1, "best_of": 1, "echo": False, "logprobs": None, "top_logprobs": None, "logit_bias": None,
    "frequency_penalty": 0, "presence_penalty": 0, "suffix": None, "tools": None, "tool_choice": None,
    "functions": None, "function_call": None, "response_format": None,
}  # fmt: skip
# Accepted and ignored.
IGNORED = {"user", "metadata", "store", "parallel_tool_calls", "service_tier"}


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 409: "conflict_error", 500: "server_error", 503: "server_error"}  # fmt: skip

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    ignore_eos: bool = False  # vLLM's extension: keep generating past end-of-sequence (benchmarks)

    @model_validator(mode="after")
    def _neutral_only(self):
        for key, value in (self.model_extra or {}).items():
            if key in IGNORED:
                continue
            if key not in NEUTRAL:
                raise ValueError(f"unknown parameter {key!r}")
            if value is not None and value != NEUTRAL[key]:
                raise ValueError(f"parameter {key!r} is not supported (only {NEUTRAL[key]!r})")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("stop: at most 4 stop strings")
        return self

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]

    def prompts(self) -> list[str | list[int]]:
        """The prompts: one per choice (a string or a list of token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt is empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatBody(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class AdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    path: str


def parse(cls: type[BaseModel], raw: object) -> BaseModel:
    """`raw` validated as `cls`; raises APIError(400) naming the first bad field."""
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{where}: {message}" if where else message, where or None) from None
