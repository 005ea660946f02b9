"""Request and response bodies of the OpenAI-compatible chat API.

The limits a deployment sets (CHATLOOP_MAX_N, CHATLOOP_MAX_STOP, ...) are part of the request model
(`chat_request_model`), so the schema in /openapi.json is the validation the server applies: a body the
schema allows is refused only for what no schema can say (a prompt too long for the context, an unknown
model).
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from service.api import unsupported
from service.api.unsupported import Metadata, TextFormat, refuse_unless
from service.settings import Settings

MAX_TOP_LOGPROBS = 20  # as OpenAI

Role = Literal["system", "developer", "user", "assistant"]


def _int64(schema: dict) -> None:
    # FastAPI writes numeric bounds into /openapi.json as floats, and 2**63 - 1 is no float: OpenAPI's int64
    # format (a signed 64-bit integer) says the range exactly.
    schema.pop("minimum", None)
    schema.pop("maximum", None)
    schema["format"] = "int64"


# OpenAI's seed is a signed 64-bit integer; the engine seeds choice i with seed + i (within what torch takes).
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1, json_schema_extra=_int64)]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Annotated[Literal["text"], refuse_unless(lambda v: v == "text" or not isinstance(v, str),
                                                   "content parts other than text (images, audio, files)")]
    text: str


FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]  # OpenAI's rule for function names


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: FunctionName
    arguments: Annotated[str, Field(max_length=65536)]  # a JSON object, as the model wrote it


class ToolCall(BaseModel):
    """A call the assistant made, in a conversation sent back (or in an answer)."""

    model_config = ConfigDict(extra="forbid")

    id: Annotated[str, Field(min_length=1, max_length=256)]
    type: Literal["function"] = "function"
    function: FunctionCall


class _Message(BaseModel):
    """What every message may carry; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(max_length=256)] | None = None  # accepted and ignored: the chat template has no place
    refusal: unsupported.Null("refusal") = None
    function_call: unsupported.Null("function_call (deprecated: use tool_calls)") = None
    audio: unsupported.Null("audio") = None

    def text(self) -> str:
        content = getattr(self, "content", None)
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        return "".join(part.text for part in content)


class SystemMessage(_Message):
    role: Literal["system", "developer"]
    content: str | list[TextPart]


class UserMessage(_Message):
    role: Literal["user"]
    content: str | list[TextPart]


class AssistantTurn(_Message):
    """An earlier answer; with the tool calls it made, its content may be null or absent."""

    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=128)] | None = None


class ToolMessage(_Message):
    """The result of a call; `tool_call_id` names the call."""

    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: Annotated[str, Field(min_length=1, max_length=256)]


MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")
# One model per role, told apart by `role`: /openapi.json then states what each role may carry, and a message of
# an unknown role (a deprecated "function" message among them) is refused naming messages.<i>.role.
ChatMessage = Annotated[SystemMessage | UserMessage | AssistantTurn | ToolMessage, Field(discriminator="role")]


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: FunctionName
    description: Annotated[str, Field(max_length=4096)] | None = None
    parameters: dict | None = None  # a JSON schema for the arguments object; none: no arguments
    strict: bool | None = None  # the arguments always match `parameters`, strict or not (README, API)


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: FunctionName


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: Annotated[dict, Field(alias="schema")] = Field(default_factory=lambda: {"type": "object"})
    strict: bool | None = None  # the answer always matches the schema, strict or not (README, API)


class JSONObjectFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_object"]


class JSONSchemaResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaResponseFormat, Field(discriminator="type")]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    include_obfuscation: bool | None = None  # no padding is sent: harmless to ignore


class ChatCompletionRequest(BaseModel):
    """The fields every deployment shares; `chat_request_model` adds the limits of one.

    Every OpenAI field is either honoured, harmless to ignore (labels and routing hints that change nothing in the
    answer), or refused with a 400 naming it unless it asks for nothing (unsupported.py); unknown fields are refused
    too (extra="forbid"), as OpenAI's own API does. README (API) lists which is which.
    """

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(examples=["chatloop"])] = "chatloop"
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    n: Annotated[int, Field(ge=1)] = 1
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: Annotated[str | list[str] | None, Field(validate_default=True)] = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    # Harmless to ignore.
    metadata: Metadata | None = None
    store: bool | None = None  # every answer is logged in the completion log whatever it says (README, Feedback)
    service_tier: str | None = None
    safety_identifier: Annotated[str, Field(max_length=256)] | None = None
    prompt_cache_key: Annotated[str, Field(max_length=256)] | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    modalities: unsupported.Modalities = None
    # Each sampled token's log-probability, and up to 20 most likely alternatives (needs logprobs: true).
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    # Not supported (yet): refused unless they ask for nothing.
    presence_penalty: unsupported.Penalty = None
    frequency_penalty: unsupported.Penalty = None
    logit_bias: unsupported.LogitBias = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # default true, as OpenAI's
    functions: unsupported.Null("functions (deprecated: use tools)") = None
    function_call: unsupported.Null("function_call (deprecated: use tool_choice)") = None
    audio: unsupported.Null("audio output") = None
    prediction: unsupported.Null("predicted outputs") = None
    reasoning_effort: unsupported.Null("reasoning_effort (the model does not reason)") = None
    verbosity: unsupported.Null("verbosity") = None
    web_search_options: unsupported.Null("web search") = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str]:
        return [v] if isinstance(v, str) else list(v or [])

    @property
    def answer_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def chat_request_model(settings: Settings) -> type[ChatCompletionRequest]:
    """The chat request body with this deployment's limits on `n` and the stop strings."""
    stop_string = Annotated[str, Field(min_length=1, max_length=settings.max_stop_chars)]
    stops = Annotated[list[stop_string], Field(max_length=settings.max_stop)]
    return create_model(
        "ChatCompletionRequest", __base__=ChatCompletionRequest,
        n=(Annotated[int, Field(ge=1, le=settings.max_n)], 1),
        stop=(Annotated[stop_string | stops | None, Field(validate_default=True)], None),
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str  # the token decoded on its own
    logprob: float  # -9999.0 for a token the sampler could not pick (outside the top_p nucleus), as OpenAI does
    bytes: list[int] | None  # the UTF-8 bytes of `token`


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "chatloop"
    adapter: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
