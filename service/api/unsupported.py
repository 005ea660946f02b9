"""OpenAI request fields chatloop does not honour (yet): each is accepted only at a value that asks for nothing,
and refused with a 400 naming it otherwise, never silently ignored.

Every field is typed as the values that ask for nothing (`None`, `False`, `0`, `{"type": "text"}`...), so
/openapi.json says exactly what validation accepts; a `before` validator turns any other value into one clear
"not supported yet" error (pydantic's own "Input should be None" would say nothing useful). The fields that
are harmless to ignore at any value (README, API) are plain optional fields of the request models.
"""

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

UNSUPPORTED = "unsupported"  # the pydantic error type; service/api/errors.py keeps its message as it is


def refuse_unless(harmless: Callable[[Any], bool], why: str) -> BeforeValidator:
    """A validator that lets a harmless value through (to the field's own type) and refuses any other."""

    def check(value: Any) -> Any:
        if not harmless(value):
            raise PydanticCustomError(UNSUPPORTED, "not supported yet: {why}", {"why": why})
        return value

    return BeforeValidator(check)


def _absent(value: Any) -> bool:
    return value is None


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == {}


def _zero(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool) and value == 0)


def Null(why: str) -> Any:
    """A field refused at any value but null."""
    return Annotated[None, refuse_unless(_absent, why)]


def Empty(why: str) -> Any:
    """A list field refused unless null or empty."""
    return Annotated[Annotated[list, Field(max_length=0)] | None, refuse_unless(_empty, why)]


class TextFormat(BaseModel):
    """Plain text output, the only format chatloop produces yet."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


def _text_format(value: Any) -> bool:
    return value is None or not isinstance(value, dict) or value.get("type") == "text"


PLAIN_TEXT = refuse_unless(_text_format, "only plain text output; JSON output (json_object, json_schema) needs the "
                                         "constrained decoding of a later release")
ResponseFormat = Annotated[TextFormat | None, PLAIN_TEXT]

NO_TOOLS = "tool calls (tools, functions)"
Tools = Empty(NO_TOOLS)
# Without tools, "none" and "auto" both mean what chatloop does: answer in text. Any other choice needs a tool.
ToolChoice = Annotated[Literal["none", "auto"] | None, refuse_unless(lambda v: v in (None, "none", "auto"), NO_TOOLS)]
TopLogprobs = Annotated[Literal[0] | None, refuse_unless(_zero, "top_logprobs")]
LogitBias = Annotated[Annotated[dict[str, int], Field(max_length=0)] | None, refuse_unless(_empty, "logit_bias")]
Penalty = Annotated[Annotated[float, Field(ge=0, le=0)] | None,
                    refuse_unless(_zero, "presence and frequency penalties (only 0)")]
Modalities = Annotated[list[Literal["text"]] | None, refuse_unless(
    lambda v: not isinstance(v, list) or all(m == "text" for m in v), "audio output (modalities other than text)")]
# OpenAI's metadata: at most 16 pairs, keys of up to 64 characters, values of up to 512.
Metadata = Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                     Field(max_length=16)]
