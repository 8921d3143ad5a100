"""OpenAI request bodies and the error body.

Every parameter OpenAI documents for /v1/completions and /v1/chat/completions is declared
here, and is either honoured or refused with a 400 that names it: none is silently dropped.
The ones llmray does not implement are in `NOT_YET` with the values that ask for nothing
(clients send `best_of: 1`, `store: false`, ...); any other value is refused. Implementing
one is: give it a real type, remove it from `NOT_YET`, honour it in the ingress and the
engines. Parameters that only label or hint (`user`, `metadata`, `safety_identifier`,
`prompt_cache_key`, ...) are accepted and change nothing in the answer. Fields OpenAI does
not document are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

INT64 = 2**63  # seed: OpenAI's range, and torch.manual_seed's
MAX_N = 128  # choices per request (OpenAI's bound; a deployment's limit may be lower)
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's bound for chat; vLLM's default)
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names

# Parameter -> the values llmray accepts for it until it implements it.
NOT_YET: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1),
    "suffix": (None, ""),
    "functions": (None, []),  # deprecated by OpenAI for `tools`, which llmray implements
    "function_call": (None, "none", "auto"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    "moderation": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "store": (None, False),  # nothing is stored
    "service_tier": (None, "auto", "default"),
}


def _not_yet(value: Any, info: ValidationInfo) -> Any:
    allowed = NOT_YET[info.field_name]
    # == as JSON compares (0 == 0.0), but true is not 1 and false is not 0
    if any(value == ok and isinstance(value, bool) == isinstance(ok, bool) for ok in allowed):
        return value
    accepted = " or ".join(json.dumps(ok) for ok in allowed)
    raise PydanticCustomError(
        "unsupported",
        "this server does not support {name} yet: leave it out or send {accepted}",
        {"name": info.field_name, "accepted": accepted},
    )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


Penalty = Annotated[float | None, Field(default=None, ge=-2, le=2)]


class _Request(_Strict):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(
        default=None, ge=0, description="Above generation.maxNewTokens: that limit."
    )
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1, description="0: the top token only.")
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_N, description="Choices, sampled apart.")
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    logit_bias: dict[str, float] | None = Field(
        default=None, description="Token id (as a string) -> bias added to its logit."
    )
    # Accepted, change nothing in the answer: labels and hints for OpenAI's own service.
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("up to 4 non-empty stop sequences")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isdigit():
                raise ValueError(f"keys are token ids, got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases are between -100 and 100, got {bias} for {token}")
        return value


class StreamOptions(_Strict):
    include_usage: bool | None = False
    # OpenAI pads stream events against a side channel; this server adds no padding field.
    include_obfuscation: bool | None = None


class CompletionRequest(_Request):
    # Required, but null (like "") generates as if from the beginning of a new document.
    prompt: str | list[str] | None
    logprobs: int | None = Field(
        default=None, ge=0, le=MAX_TOP_LOGPROBS, description="Top tokens with each token's."
    )
    echo: bool | None = Field(default=None, description="The prompt before the completion.")
    best_of: Any = None
    suffix: Any = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str] | None) -> str:
        if value is None:
            return ""
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("one prompt per request (a list of one string at most)")
            return value[0]
        return value

    _unsupported_here = field_validator("best_of", "suffix")(_not_yet)


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends a JSON string; some clients a dict


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: which call this is the result of
    name: str | None = None

    @model_validator(mode="after")
    def _content_unless_tool_calls(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates take it (llmray.chat.template_messages)."""
        # developer is OpenAI's newer name for system; chat templates know system.
        out: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text(),
        }
        if self.tool_calls:
            out["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            out["name"] = self.name
        return out


class FunctionDefinition(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # JSON Schema; absent: no parameters
    strict: bool | None = None  # llmray always constrains forced calls to the schema


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition

    @model_validator(mode="before")
    @classmethod
    def _function_tools_only(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") not in (None, "function"):
            raise PydanticCustomError(
                "unsupported",
                "this server supports function tools only, not {kind!r} tools",
                {"kind": value.get("type")},
            )
        return value


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class AllowedTools(_Strict):
    mode: Literal["auto", "required"]
    tools: list[NamedToolChoice] = Field(min_length=1)


class AllowedToolsChoice(_Strict):
    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice | AllowedToolsChoice


class JsonSchemaFormat(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    # OpenAI's key is "schema" (a BaseModel attribute name, hence the alias).
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the output always follows the schema (grammar-constrained)


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_json_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs json_schema: {"name", "schema"}')
        return self


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Accepted hints and labels (no effect on the answer; prompts sharing a prefix share its
    # KV cache anyway).
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    functions: Any = None
    function_call: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    moderation: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    store: Any = None
    service_tier: Any = None

    _unsupported_here = field_validator(
        "functions",
        "function_call",
        "modalities",
        "audio",
        "prediction",
        "web_search_options",
        "moderation",
        "reasoning_effort",
        "verbosity",
        "store",
        "service_tier",
    )(_not_yet)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_with_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):  # OpenAI's rule
            raise ValueError("top_logprobs needs logprobs: true")
        return value


def error_body(
    message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_Request.model_rebuild()
ChatMessage.model_rebuild()
ChatCompletionRequest.model_rebuild()
