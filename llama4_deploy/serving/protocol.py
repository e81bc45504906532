"""The OpenAI wire protocol `llama4-deploy serve` speaks: request bodies as pydantic models mirroring
OpenAI's schemas (plus vLLM's `ignore_eos` and `stop_token_ids`), and the error object.

No request is answered 200 unless it is carried out: an unknown field is a 400 naming it, as OpenAI's own
API answers (`--ignore-unknown-fields`, for clients that send extras, drops them instead: the validation
context's `ignore_unknown`); every known field is honored, or refused with a 400 naming it unless it holds
its no-op value (`REFUSED`), or is one of the few accepted without effect (`store`, `metadata`, `user`).

Every field is strictly typed, so the scheduler never sees a value it cannot use: no string or bool
where a number or token id is meant (`"max_tokens": "8"`, `true` as 1 and `[true, false]` as ids are
refused), numbers finite, seeds in [0, 2^64), and text made of Unicode scalar values (a lone surrogate,
which JSON's `\\ud800` escape can carry, is refused naming the field). A bad value becomes a 400 with an
OpenAI-style error object before the request reaches the scheduler.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs (completions allow 5; we allow the chat limit)
SEED_LIMIT = 2**64  # numpy's generators take any non-negative integer; OpenAI's seeds are 64-bit


def scalar_values(text: str) -> str:
    """Refuse text that is not a sequence of Unicode scalar values (it cannot be encoded as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"not valid Unicode text: character {err.start} is a lone surrogate (U+{ord(text[err.start]):04X})"
        ) from None
    return text


Text = Annotated[str, Strict(), AfterValidator(scalar_values)]
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]  # an int is a number; a bool or string is not
Count = Annotated[int, Strict()]
TokenId = Annotated[int, Strict(), Field(ge=0)]
Flag = Annotated[bool, Strict()]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_unknown(cls, data: Any, info: ValidationInfo) -> Any:
        """With `--ignore-unknown-fields`, fields the schema does not name are dropped instead of refused."""
        if isinstance(data, dict) and info.context and info.context.get("ignore_unknown"):
            return {key: value for key, value in data.items() if key in cls.model_fields}
        return data


# Fields of OpenAI's (and vLLM's) requests this server does not carry out: refused with a 400 naming the field
# unless they hold the value that asks for nothing, given here as a predicate, with why they are refused.
REFUSED: dict[str, tuple[Any, str]] = {
    "suffix": (lambda v: v is None or v == "", "no fill-in-the-middle: the model has no suffix format"),
    "audio": (lambda v: v is None, "text output only"),
    "modalities": (lambda v: v is None or v == ["text"], "text output only"),
    "prediction": (lambda v: v is None, "no predicted outputs"),
    "reasoning_effort": (lambda v: v is None, "the model has no reasoning mode"),
    "web_search_options": (lambda v: v is None, "no web search"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "one service tier"),
    "functions": (lambda v: v is None or v == [], "no function calls"),
    "function_call": (lambda v: v is None or v == "none", "no function calls"),
}


def _refuse_unless_no_op(value: Any, info: ValidationInfo) -> Any:
    allowed, why = REFUSED[info.field_name]
    if not allowed(value):
        raise ValueError(f"not supported by this server ({why}); leave it out")
    return value


class StreamOptions(_Strict):
    include_usage: Flag = False


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[Text, Any] | None = None  # {"name", "schema", "strict", "description"}

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and not isinstance((self.json_schema or {}).get("schema"), dict):
            raise ValueError("type json_schema needs json_schema.schema, a JSON schema object")
        return self


class _Sampling(_Strict):
    model: Text
    temperature: Number = Field(1.0, ge=0.0, le=2.0)
    top_p: Number = Field(1.0, gt=0.0, le=1.0)
    seed: Annotated[int, Strict(), Field(ge=0, lt=SEED_LIMIT)] | None = None
    # strings end the text before them; integers are token ids (as `stop_token_ids`)
    stop: Text | list[Text | TokenId] | None = None
    stop_token_ids: list[TokenId] | None = None
    stream: Flag = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Strict(), Field(ge=1)] = 1  # samples per prompt, sharing its prefill; at most the rows
    # samples generated per prompt (sharing its prefill), of which the n with the highest cumulative log-probability
    # are returned (vLLM's ranking); at least n; None: n
    best_of: Annotated[int, Strict(), Field(ge=1)] | None = None
    ignore_eos: Flag = False  # vLLM's: generate max_tokens tokens whatever the model says
    # accepted without effect (OpenAI's bookkeeping fields; documented as such in the README)
    user: Text | None = None
    store: Flag | None = None
    metadata: dict[Text, Text] | None = None
    # runtime/sampling.py's controls, in OpenAI's ranges (vLLM's for top_k, min_p, repetition_penalty, min_tokens)
    top_k: Annotated[int, Strict(), Field(ge=-1)] | None = None  # -1 or 0: off
    min_p: Annotated[Number, Field(ge=0.0, le=1.0)] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0.0)] | None = None
    logit_bias: dict[Text, Annotated[Number, Field(ge=-100.0, le=100.0)]] | None = None  # {"token id": bias}
    min_tokens: Annotated[int, Strict(), Field(ge=0)] | None = None
    # known, and refused unless they ask for nothing (REFUSED says why)
    service_tier: Any = None
    # structured output (runtime/grammar.py): OpenAI's response_format, vLLM's guided_* extras
    response_format: ResponseFormat | None = None
    guided_json: dict[Text, Any] | Text | None = None
    guided_regex: Text | None = None
    guided_choice: Annotated[list[Text], Field(min_length=1)] | None = None
    guided_grammar: Text | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_keys(cls, bias):
        for key in bias or {}:
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"key {key!r} is not a token id (OpenAI's keys are token ids written as strings)")
        return bias

    @field_validator("service_tier")
    @classmethod
    def _refused(cls, value, info: ValidationInfo):
        return _refuse_unless_no_op(value, info)

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, stop):
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError(f"stop has {len(stop)} entries; give at most 4")
        return stop

    def structure(self) -> tuple[str, str, Any] | None:
        """(field, kind, source) of the one structure asked for, or None; two at once is refused."""
        asked = [
            (field, kind, value)
            for field, kind, value in [
                ("guided_json", "schema", self.guided_json),
                ("guided_regex", "regex", self.guided_regex),
                ("guided_choice", "choice", self.guided_choice),
                ("guided_grammar", "ebnf", self.guided_grammar),
            ]
            if value is not None
        ]
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            asked.append(("response_format", "json", None))
        elif rf is not None and rf.type == "json_schema":
            asked.append(("response_format", "schema", rf.json_schema["schema"]))
        if len(asked) > 1:
            raise ValueError(f"{asked[0][0]} and {asked[1][0]} both ask for a structure; give one")
        return asked[0] if asked else None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return tuple(s for s in stop if isinstance(s, str))

    def stop_ids(self) -> list[int]:
        stop = self.stop if isinstance(self.stop, list) else []
        return [s for s in stop if isinstance(s, int)] + list(self.stop_token_ids or [])


def _prompt_shape(prompt):
    """Name what is wrong with a prompt that is none of OpenAI's four forms, in one sentence."""
    forms = "a string, a list of token ids, or a list of either"
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list):
        raise ValueError(f"must be {forms}, got {type(prompt).__name__}")
    for i, item in enumerate(prompt):
        if isinstance(item, bool):
            raise ValueError(f"item {i} is {str(item).lower()}, a boolean, not a token id")
        if isinstance(item, list):
            for j, token in enumerate(item):
                if not isinstance(token, int) or isinstance(token, bool):
                    raise ValueError(f"item {i}, entry {j} is {token!r}, not an integer token id")
        elif not isinstance(item, (int, str)):
            raise ValueError(f"item {i} is {item!r}; it must be {forms}")
    return prompt


class CompletionRequest(_Sampling):
    prompt: Text | list[TokenId] | list[Text] | list[list[TokenId]]
    max_tokens: Annotated[int, Strict(), Field(ge=1)] | None = 16
    logprobs: Annotated[int, Strict(), Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: Flag = False
    suffix: Any = None

    @field_validator("suffix")
    @classmethod
    def _refused_here(cls, value, info: ValidationInfo):
        return _refuse_unless_no_op(value, info)

    _prompt_form = field_validator("prompt", mode="before")(_prompt_shape)


class ImageURL(_Strict):
    url: Text  # a data: URL, or a file under --allowed-local-media-path (remote URLs are refused)
    detail: Literal["auto"] | None = None  # Llama 4's processor has one resolution rule: tiles of image_size


class ContentPart(_Strict):
    """One part of a message's content: OpenAI's text part or image_url part (one model, so an error's location
    is the part's own field, `messages.0.content.0.text`)."""

    type: Literal["text", "image_url"]
    text: Text | None = None
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _one_kind(self):
        if self.type == "text" and (self.text is None or self.image_url is not None):
            raise ValueError("a text part holds text and no image_url")
        if self.type == "image_url" and (self.image_url is None or self.text is not None):
            raise ValueError("an image_url part holds image_url and no text")
        return self


class CalledFunction(_Strict):
    name: Text
    arguments: Text  # JSON, as OpenAI sends it back


class AssistantToolCall(_Strict):
    id: Text
    type: Literal["function"]
    function: CalledFunction


class FunctionSpec(_Strict):
    name: Annotated[str, Strict(), Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: Text | None = None
    parameters: dict[Text, Any] | None = None  # a JSON schema
    strict: Flag | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class FunctionName(_Strict):
    name: Text


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None  # OpenAI's participant name: passed to the chat template
    tool_calls: list[AssistantToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: Text | None = None  # a tool message answers this call

    def text(self, image_marker: str = "") -> str:
        """The message's text, each image part as `image_marker` where it stands."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text if part.type == "text" else image_marker for part in self.content)

    def image_urls(self) -> list[tuple[int, str]]:
        """(part index, url) of each image part, in order."""
        if not isinstance(self.content, list):
            return []
        return [(j, part.image_url.url) for j, part in enumerate(self.content) if part.type == "image_url"]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[int, Strict(), Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Strict(), Field(ge=1)] | None = None
    logprobs: Flag = False
    top_logprobs: Annotated[int, Strict(), Field(ge=0, le=MAX_LOGPROBS)] | None = None
    parallel_tool_calls: Flag | None = None  # without tools it asks for nothing
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    functions: Any = None
    function_call: Any = None
    chat_template_kwargs: dict[Text, Any] | None = None  # vLLM's: more variables for the chat template

    @field_validator("chat_template_kwargs")
    @classmethod
    def _not_reserved(cls, kwargs):
        reserved = sorted(set(kwargs or {}) & {"messages", "add_generation_prompt", "bos_token", "eos_token"})
        if reserved:
            raise ValueError(f"{', '.join(reserved)} cannot be set here: the server renders them from the request")
        return kwargs

    @field_validator(
        "audio",
        "modalities",
        "prediction",
        "reasoning_effort",
        "web_search_options",
        "functions",
        "function_call",
    )
    @classmethod
    def _refused_here(cls, value, info: ValidationInfo):
        return _refuse_unless_no_op(value, info)


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a prompt (or chat messages, rendered by the template) to token ids."""

    model: Text | None = None  # optional, as vLLM's (lm-eval's remote tokenizer sends none); checked when given
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: Flag = True


class DetokenizeRequest(_Strict):
    model: Text | None = None
    tokens: list[TokenId]


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
