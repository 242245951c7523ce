"""The OpenAI wire format: pydantic request and response models with OpenAI's field names.

Only what the server implements is modelled; unknown request fields are ignored, as
OpenAI-compatible servers do, except the ones whose silent omission would change the
answer (``n`` > 1, ``logprobs``, ``echo``, ``best_of``, ``tools``, ``response_format``,
``logit_bias``, penalties, ``suffix``, non-text content parts), which are refused with a 400
naming the field. Types are strict, as OpenAI's are: a boolean is not a number, ``stream``
is a boolean, a number is not a string; text must be valid Unicode (no lone surrogates).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr

from ..decoding.sampling import GREEDY_BELOW, SEED_RANGE  # the decode core's limits, kept in one place

MAX_STOPS = 4  # stop sequences per request, as OpenAI allows
MAX_STOP_CHARS = 256  # characters per stop sequence: every decode step compares each one's prefixes with the text's end


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode: a lone surrogate at character {e.start}") from None
    return text


Text = Annotated[str, Strict(), AfterValidator(_valid_unicode)]
StopText = Annotated[str, Strict(), Field(max_length=MAX_STOP_CHARS), AfterValidator(_valid_unicode)]
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]  # an int is a number too; a boolean is not


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions (OpenAI's defaults)."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = None
    temperature: Number = Field(1.0, ge=0.0, le=2.0)  # below GREEDY_BELOW: greedy
    top_p: Number = Field(1.0, gt=0.0, le=1.0)
    top_k: Optional[StrictInt] = Field(None, ge=1)  # an extension, as in vLLM
    seed: Optional[StrictInt] = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: Optional[Union[StopText, Annotated[list[StopText], Field(max_length=MAX_STOPS)]]] = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    n: StrictInt = 1
    logprobs: Optional[Union[StrictBool, StrictInt]] = None
    best_of: Optional[StrictInt] = None
    user: Optional[StrictStr] = None
    # Modelled only to be refused when set: ignoring them would change the answer.
    logit_bias: Optional[dict[str, Any]] = None
    presence_penalty: Optional[Number] = None
    frequency_penalty: Optional[Number] = None
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    functions: Optional[list[Any]] = None
    function_call: Optional[Any] = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)

    @property
    def sampling_temperature(self) -> float:
        """The temperature to sample at: 0 (greedy) below ``GREEDY_BELOW``."""
        return 0.0 if self.temperature < GREEDY_BELOW else self.temperature

    def unsupported(self) -> Optional[tuple[str, str]]:
        """(param, message) for a request this server cannot answer faithfully, else None."""
        if self.n != 1:
            return "n", f"n must be 1 (this server returns one choice per request), got {self.n}"
        if self.best_of not in (None, 1):
            return "best_of", "best_of is not supported"
        if self.logprobs not in (None, False, 0):
            return "logprobs", "logprobs are not supported"
        if self.tools or self.functions:
            name = "tools" if self.tools else "functions"
            return name, f"{name} are not supported (this server generates text only)"
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none", "auto"):
                return name, f"{name} is not supported (this server generates text only)"
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            return "response_format", f"response_format {self.response_format.get('type')!r} is not supported (text only)"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name, f"{name} is not supported (0 only)"
        return None


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: one prompt (text, or token ids)."""

    prompt: Union[Text, list[Text], list[StrictInt], list[list[StrictInt]]]
    max_tokens: Optional[StrictInt] = 16  # OpenAI's default for completions
    echo: StrictBool = False
    suffix: Optional[StrictStr] = None  # refused when set

    def unsupported(self) -> Optional[tuple[str, str]]:
        if self.suffix:
            return "suffix", "suffix is not supported"
        return super().unsupported()


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: StrictStr
    text: Optional[Text] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[Text, list[ContentPart], None] = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(p.text or "" for p in self.content)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: messages rendered with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = None  # OpenAI's newer name for max_tokens
    top_logprobs: Optional[StrictInt] = None  # refused when set

    def unsupported(self) -> Optional[tuple[str, str]]:
        for i, message in enumerate(self.messages):
            for j, part in enumerate(message.content if isinstance(message.content, list) else ()):
                if part.type != "text":
                    return (f"messages[{i}].content[{j}]",
                            f"messages[{i}].content[{j}] is a {part.type!r} part: this server takes text content only")
                if part.text is None:
                    return f"messages[{i}].content[{j}].text", f"messages[{i}].content[{j}] is a text part without text"
        if self.top_logprobs:
            return "top_logprobs", "logprobs are not supported"
        return super().unsupported()


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "quicksilver"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
