"""The request bodies of /v1/completions and /v1/chat/completions, validated strictly.

Fields are OpenAI's; types are strict (a "16" is not 16, a true is not 1), an unknown field is refused
rather than ignored, and a field OpenAI has that the engine cannot honour is accepted only at its
neutral value (presence_penalty 0, echo false, ...). Two extensions, as vLLM offers them: `top_k` and
`ignore_eos` (a load generator needs fixed output lengths).

Every failure becomes one `ApiError` (400) whose `param` names the field.
"""

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kvlab.engine.request import MAX_LOGPROBS
from kvlab.server.errors import ApiError, bad_request

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's limit on `logprobs`
MAX_SEED = 2**63 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields both endpoints share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # extension; 0 disables it
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: Any = Field(None, validate_default=True)  # -> tuple[str, ...]
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension
    user: str | None = None  # accepted and ignored, as an end-user id is for logging only
    # OpenAI fields the engine has no use for: allowed only at the value that changes nothing.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must be non-empty")
        return tuple(stops)

    def check_supported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise unsupported(name, "only 0 is supported")
        if self.logit_bias:
            raise unsupported("logit_bias", "only an empty map is supported")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    prompt: Any  # a string, a list of token ids, or a one-element list of either (checked below)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> str | list[int]:
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
            value = value[0]  # a batch of one
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return value
        raise ValueError("prompt must be a string, a list of token ids, or a one-element list of either")

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise unsupported("echo", "only echo=false is supported")
        if self.suffix:
            raise unsupported("suffix", "suffix (insertion) is not supported")
        if self.best_of not in (None, 1):
            raise unsupported("best_of", "only best_of=1 is supported; use n for several choices")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Any  # a string or a list of {"type": "text", "text": ...} parts (checked below)
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, value: Any) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            parts = [TextPart.model_validate(part) if isinstance(part, dict) else None for part in value]
            if all(parts):
                return "".join(part.text for part in parts)
        raise ValueError("content must be a string or a list of {type: text, text: ...} parts")

    def as_template_input(self) -> dict[str, str]:
        """{role, content} as chat templates read it (a developer message is a system message)."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise bad_request("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")

    @property
    def num_logprobs(self) -> int | None:
        """The engine's `logprobs` (alternatives per token), None when not asked."""
        return (self.top_logprobs or 0) if self.logprobs else None


def parse_body(raw: bytes, model: type[_Sampling]) -> Any:
    """JSON bytes -> a validated request, or an ApiError(400) naming the first problem."""
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, bad UTF-8, NaN/Infinity, nesting
        raise bad_request(f"could not parse the JSON body: {str(error)[:200]}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the JSON body must be an object")
    try:
        request = model.model_validate(data)
    except ValidationError as error:
        raise _as_api_error(error) from None
    request.check_supported()
    return request


def unsupported(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="unsupported")


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _as_api_error(error: ValidationError) -> ApiError:
    first = error.errors(include_url=False)[0]
    param = _param(first["loc"])
    kind = first["type"]
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'", param, "missing_required_parameter")
    message = first["msg"].removeprefix("Value error, ")
    return bad_request(f"Invalid value for '{param}': {message}", param, "invalid_value")


def _param(loc: tuple) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
