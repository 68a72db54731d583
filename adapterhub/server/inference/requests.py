"""The request bodies of ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` as pydantic
models (as FastAPI and vLLM type them): every field of OpenAI's API is either honoured or refused with a
400 naming its ``param``; ``null`` is accepted wherever OpenAI accepts it; fields OpenAI does not know are
refused, except vLLM's sampling extras (``top_k``, ``min_p``, ``repetition_penalty``).

Fields accepted and ignored because they change nothing here: ``user``, ``metadata``, ``store`` (false),
``service_tier``, ``safety_identifier``, ``prompt_cache_key``. ``parallel_tool_calls: false`` holds an
``auto`` answer to one call at most (`tools`). Fields refused
unless null or their neutral value: ``audio``, ``modalities`` other than ``["text"]``, ``prediction``,
``functions``/``function_call``, ``web_search_options``, ``reasoning_effort``, ``verbosity``, ``suffix``,
``best_of`` other than ``n``, ``dimensions``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

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

from .refusal import Refusal

__all__ = ["ChatRequest", "CompletionRequest", "EmbeddingRequest", "Message", "parse", "parse_model"]

Number = Annotated[StrictFloat | StrictInt, Field(allow_inf_nan=False)]
Int64 = Annotated[StrictInt, Field(ge=-(1 << 63), lt=1 << 63)]
#: how many token ids, prompts, or stop strings one request may carry
MAX_STOP = 16
MAX_N = 128
MAX_TOP_LOGPROBS = 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, hide_input_in_errors=True)


class StreamOptions(_Strict):
    include_usage: StrictBool | None = None
    continuous_usage_stats: StrictBool | None = None  # vLLM's; accepted, usage comes at the end


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class Function(_Strict):
    name: StrictStr
    arguments: StrictStr


class ToolCall(_Strict):
    id: StrictStr
    type: Literal["function"]
    function: Function


class Message(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_call_id: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None
    refusal: StrictStr | None = None

    @model_validator(mode="after")
    def _content(self) -> Message:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class _Sampling(_Strict):
    """Fields common to chat and completions."""

    model: StrictStr = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    n: StrictInt | None = Field(None, ge=1, le=MAX_N)
    seed: Int64 | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    presence_penalty: Number | None = Field(None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(None, ge=-2, le=2)
    logit_bias: dict[StrictStr, Number] | None = None
    user: StrictStr | None = None
    # vLLM's sampling extras
    top_k: StrictInt | None = Field(None, ge=-1)
    min_p: Number | None = Field(None, ge=0, le=1)
    repetition_penalty: Number | None = Field(None, gt=0, le=10)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isdigit() or len(key) > 9:
                raise ValueError(f"logit_bias keys are token ids, not {key[:20]!r}")
            if not -100 <= bias <= 100:
                raise ValueError("logit_bias values are in [-100, 100]")
        return v

    @model_validator(mode="after")
    def _streaming(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


def _neutral(value: Any, *ok: Any) -> bool:
    return value is None or value in ok


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: StrictStr | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    metadata: dict[StrictStr, StrictStr] | None = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    modalities: list[StrictStr] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: StrictStr | dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    reasoning_effort: StrictStr | None = None
    verbosity: StrictStr | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> ChatRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def refused(self) -> Refusal | None:
        """A field set to what this server does not do."""
        for name in (
            "audio",
            "prediction",
            "functions",
            "function_call",
            "web_search_options",
            "reasoning_effort",
            "verbosity",
        ):
            if getattr(self, name) is not None:
                return _unsupported(name)
        if not _neutral(self.modalities, ["text"]):
            return _unsupported("modalities", "only text output")
        if self.store:
            return _unsupported("store", "completions are not stored")
        if self.tool_choice is not None and not self.tools:
            return Refusal(400, "tool_choice needs tools", param="tool_choice")
        return None

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


TokenIds = list[Annotated[StrictInt, Field(ge=0, lt=1 << 31)]]


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    echo: StrictBool | None = None
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: StrictInt | None = Field(None, ge=1, le=MAX_N)
    suffix: StrictStr | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("the prompt is empty")
        if isinstance(v, list) and any(isinstance(p, list) and not p for p in v):
            raise ValueError("a prompt of token ids is empty")
        return v

    def refused(self) -> Refusal | None:
        if self.suffix:
            return _unsupported("suffix")
        if self.best_of is not None and self.best_of != (self.n or 1):
            return _unsupported("best_of", "best_of must equal n")
        return None

    @property
    def limit(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class EmbeddingRequest(_Strict):
    model: StrictStr = Field(min_length=1)
    input: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: StrictInt | None = None
    user: StrictStr | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, v: Any) -> Any:
        if isinstance(v, list) and not 1 <= len(v) <= 2048:
            raise ValueError("input is a string or a list of 1-2048 inputs")
        return v

    def refused(self) -> Refusal | None:
        if self.dimensions is not None:
            return _unsupported("dimensions", "vectors keep the model's size")
        return None


def _unsupported(param: str, why: str = "") -> Refusal:
    return Refusal(
        400,
        f"{param} is not supported by this server{': ' + why if why else ''}",
        param=param,
        code="unsupported_parameter",
    )


def parse(kind: type[ChatRequest] | type[CompletionRequest] | type[EmbeddingRequest], body: Any) -> Any:
    """``body`` as ``kind``, or a 400 `Refusal` naming the first bad field (``messages[0].role``) or a
    field set to what this server does not do."""
    req = parse_model(kind, body)
    return req if isinstance(req, Refusal) else (req.refused() or req)


def parse_model(kind: type[BaseModel], body: Any) -> Any:
    """``body`` as the pydantic model ``kind``, or a 400 `Refusal` naming the first bad field."""
    if not isinstance(body, dict):
        return Refusal(400, "the request body must be a JSON object")
    try:
        return kind.model_validate(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        loc = [p for p in err["loc"] if not _is_type_tag(p)]
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
        if err["type"] == "extra_forbidden":
            return Refusal(
                400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter"
            )
        if err["type"] == "missing":
            return Refusal(
                400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
            )
        return Refusal(400, f"Invalid value for '{param}': {err['msg']}", param=param, code="invalid_value")


def _is_type_tag(p: Any) -> bool:
    """pydantic names the member of a union it tried (``str``, ``list[int]``, ``function-after[...]``)."""
    return isinstance(p, str) and (
        p in ("str", "int", "float", "bool", "list", "dict")
        or "[" in p
        or p.startswith(("function-", "constrained-"))
    )
