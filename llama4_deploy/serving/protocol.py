"""The OpenAI wire protocol `llama4-deploy serve` speaks: request bodies as pydantic models mirroring
OpenAI's schemas (plus vLLM's `ignore_eos` and `stop_token_ids`), and the error object.

Every field is strictly typed, so the scheduler never sees a value it cannot use: no string or bool
where a number or token id is meant (`"max_tokens": "8"`, `true` as 1 and `[true, false]` as ids are
refused), numbers finite, seeds in [0, 2^64), and text made of Unicode scalar values (a lone surrogate,
which JSON's `\\ud800` escape can carry, is refused naming the field). A bad value becomes a 400 with an
OpenAI-style error object before the request reaches the scheduler.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, field_validator

MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs (completions allow 5; we allow the chat limit)
SEED_LIMIT = 2**64  # numpy's generators take any non-negative integer; OpenAI's seeds are 64-bit


def scalar_values(text: str) -> str:
    """Refuse text that is not a sequence of Unicode scalar values (it cannot be encoded as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"is not valid Unicode text: character {err.start} is a lone surrogate (U+{ord(text[err.start]):04X})"
        ) from None
    return text


Text = Annotated[str, Strict(), AfterValidator(scalar_values)]
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]  # an int is a number; a bool or string is not
Count = Annotated[int, Strict()]
TokenId = Annotated[int, Strict(), Field(ge=0)]
Flag = Annotated[bool, Strict()]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Strict):
    include_usage: Flag = False


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
    n: Count = 1
    ignore_eos: Flag = False  # vLLM's: generate max_tokens tokens whatever the model says
    user: Text | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"n is {n}; this server returns one choice per request (n=1)")
        return n

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, stop):
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError(f"stop has {len(stop)} entries; give at most 4")
        return stop

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

    _prompt_form = field_validator("prompt", mode="before")(_prompt_shape)

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported; the response holds the new text only")
        return echo


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[int, Strict(), Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Strict(), Field(ge=1)] | None = None
    logprobs: Flag = False
    top_logprobs: Annotated[int, Strict(), Field(ge=0, le=MAX_LOGPROBS)] | None = None


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
