"""OpenAI request bodies (validated with pydantic) and OpenAI-format errors.

Every parameter is checked here, before anything reaches the engine: numbers are strict (no booleans, no
strings, no NaN or infinity) and in range, and whatever the engine turns into a tensor, a seed or a path
must be representable there (a seed within 64 bits, token ids as integers, adapter paths without NUL bytes,
bounded lengths). A bad value is a 400 naming the parameter.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from .registry import check_adapter_name
from .sampling import SEED_MAX, SEED_MIN

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
             404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 500: "server_error",
             503: "server_error"}  # fmt: skip

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


MAX_PROMPTS = 256  # prompts (choices) in one completion request
MAX_STOP_CHARS = 1000  # per stop string: each new token is checked against every prefix of every stop string
Number = StrictFloat | StrictInt  # JSON numbers; never true/false or "0.5"
StopString = Annotated[StrictStr, Field(max_length=MAX_STOP_CHARS)]
TokenIds = Annotated[list[StrictInt], Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool | None = None


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    stop: StopString | list[StopString] | None = None
    seed: StrictInt | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False  # vLLM's extension: keep generating past end-of-sequence (benchmarks)

    @model_validator(mode="after")
    def _neutral_only(self):
        # APIError (not ValueError) passes through pydantic unchanged, naming the parameter.
        for key, value in (self.model_extra or {}).items():
            if key in IGNORED:
                continue
            if key not in NEUTRAL:
                raise APIError(400, f"unknown parameter {key[:100]!r}", key[:100])
            if value is not None and value != NEUTRAL[key]:
                raise APIError(400, f"parameter {key!r} is not supported (only {NEUTRAL[key]!r})", key)
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise APIError(400, "stop: at most 4 stop strings", "stop")
        return self

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionBody(_Sampling):
    prompt: (
        StrictStr
        | Annotated[list[StrictStr], Field(max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS)]
    )

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

    role: StrictStr
    content: StrictStr | list[dict[str, Any]] | None = None

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
    max_completion_tokens: StrictInt | None = Field(None, ge=1)


class AdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr
    path: StrictStr = Field(min_length=1, max_length=4096)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        check_adapter_name(v)
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if "\x00" in v:
            raise ValueError("a NUL byte cannot be in a path")
        try:
            parts = v.encode("utf-8").split(b"/")
        except UnicodeEncodeError:
            raise ValueError("not encodable as UTF-8 (a lone surrogate?)") from None
        if any(len(part) > 255 for part in parts):
            raise ValueError("a path component is longer than 255 bytes")
        return v


def parse(cls: type[BaseModel], raw: object) -> BaseModel:
    """`raw` validated as `cls`; raises APIError(400) naming the first bad field."""
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"])[:200]
        message = first["msg"].removeprefix("Value error, ")[:500]
        raise APIError(400, f"{where}: {message}" if where else message, where or None) from None
