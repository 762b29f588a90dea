"""The OpenAI request schema (SPEC §6) as strict pydantic models, and their mapping to SamplingParams.

Strict: a string where a number belongs is a 400 naming the field, not a silent cast. Unknown
fields are ignored, as OpenAI-compatible servers do, so clients that send extras (`user`, ...) work.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationInfo, field_validator

from infer.sampling import INT64_MAX, INT64_MIN, MAX_TOP_LOGPROBS, SamplingParams

MAX_N = 16
MAX_STOPS = 16
MAX_PROMPTS = 64  # prompts in one completions request
MAX_SEQUENCES = 64  # prompts x n: the sequences one completions request may start
MAX_INPUTS = 64  # inputs in one embeddings request (OpenAI takes 2048; the engine's queue holds 256)


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: StrictStr
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None  # -1 or 0: off (vLLM's convention)
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    stop: StrictStr | list[StrictStr] | None = None  # at most MAX_STOPS strings (_stop_count)
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    seed: Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    stream: StrictBool = False
    stream_options: "StreamOptions | None" = None
    ignore_eos: StrictBool = False  # vLLM's extension: generate max_tokens whatever the model says (benchmarks)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_count(cls, value):
        """Before the union: checked inside it, a long list is reported by the union's first branch
        ("Input should be a valid string"), which does not say what is wrong."""
        if isinstance(value, list) and len(value) > MAX_STOPS:
            raise ValueError(f"{len(value)} strings; at most {MAX_STOPS} per request")
        return value

    def sampling(self, max_new_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None,
                 index: int = 0) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(0, self.top_k or 0),
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=None if self.seed is None else _wrap_int64(self.seed + index),  # n > 1: distinct, reproducible
            stop=[s for s in stop if s],
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _wrap_int64(x: int) -> int:
    """x into [INT64_MIN, INT64_MAX] as int64 addition wraps: seed + index for n > 1 must stay an int64."""
    return (x - INT64_MIN) % 2**64 + INT64_MIN


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: StrictBool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    reasoning_content: StrictStr | None = None

    def render(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        role = "system" if self.role == "developer" else self.role
        out = {"role": role, "content": text}
        if self.reasoning_content:
            out["reasoning_content"] = self.reasoning_content
        return out


class ChatRequest(_Request):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprob_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


TokenIds = Annotated[list[StrictInt], Field(min_length=1)]


class CompletionRequest(_Request):
    prompt: StrictStr | TokenIds | Annotated[list[StrictStr], Field(min_length=1)] | Annotated[
        list[TokenIds], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = 16  # OpenAI's default for completions
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_count(cls, value, info: ValidationInfo):
        """At most MAX_PROMPTS prompts, and MAX_SEQUENCES sequences (prompts x n, n validated before prompt:
        it is declared first); a list of token ids is one prompt."""
        count = 1 if isinstance(value, str) or isinstance(value[0], int) else len(value)
        if count > MAX_PROMPTS:
            raise ValueError(f"{count} prompts; at most {MAX_PROMPTS} per request")
        n = info.data.get("n", 1)
        if count * n > MAX_SEQUENCES:
            raise ValueError(f"{count} prompts x n={n} = {count * n} sequences; at most {MAX_SEQUENCES} per request "
                             f"(fewer prompts, or a smaller n)")
        return value

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        if isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings: `input` a string, a list of strings, a list of token ids or a list of those
    (OpenAI's four forms); one vector per input."""
    model_config = ConfigDict(strict=True, extra="ignore")

    model: StrictStr
    input: StrictStr | TokenIds | Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_INPUTS)] | Annotated[
        list[TokenIds], Field(min_length=1, max_length=MAX_INPUTS)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None

    def inputs(self) -> list[str | list[int]]:
        if isinstance(self.input, str) or isinstance(self.input[0], int):
            return [self.input]
        return list(self.input)


_Request.model_rebuild()
ChatRequest.model_rebuild()
CompletionRequest.model_rebuild()
