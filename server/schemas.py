"""OpenAI request bodies on vLLM's own protocol classes, plus FedAttn's fields `participants`, `public_prefix`,
`fedattn`, and FedAttn's own endpoints' bodies."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vllm.entrypoints.generate.base.protocol import StreamOptions
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VLLMChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VLLMCompletionRequest
from vllm.entrypoints.serve.engine.protocol import OpenAIBaseModel

from fedattn_vllm.config import MAX_SEED, RECOMMENDED, FedAttnConfig
from fedattn_vllm.federated.messages import MAX_SIZE, MAX_TOKENS, MAX_WAIT_S

Segment = str | list[int]  # a participant's private text, or its token ids
StopString = Annotated[str, Field(min_length=1)]
Z85_KEY = r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$"  # a CURVE public key as ZeroMQ writes it


class FedAttnBlock(BaseModel):
    """The session's FedAttn settings (fields of fedattn_vllm.FedAttnConfig).

    The defaults are the best point measured on the recall benchmark (fedattn_vllm.config.RECOMMENDED,
    RESULTS.md): every layer synced, K/V as 4-bit keys and 2-bit values; a larger `sync_interval` keeps
    the generators reading everyone at every layer (`generator_sync_interval` 1). `kv_wire: "native"`
    gives exact K/V; with `generator_sync_interval: null` and `sync_interval: 4` it is the paper's default.
    """

    model_config = ConfigDict(extra="forbid")

    sync_interval: int = RECOMMENDED.sync_interval
    placement: str = "uniform"
    sync_layers: list[int] | None = None
    kv_share_ratio: float | list[float] = 1.0
    kv_selection: str = "random"
    local_keep_ratio: float = 1.0
    publisher: int = -1
    publisher_sync_interval: int | None = None
    generators: list[int] = Field(default_factory=lambda: [-1])
    generator_sync_interval: int | None = RECOMMENDED.generator_sync_interval
    seed: int = 0
    kv_wire: str = RECOMMENDED.kv_wire.value

    def to_config(self) -> FedAttnConfig:
        """The FedAttnConfig these settings give (null fields take the config's defaults); raises FedAttnConfigError."""
        values = self.model_dump(exclude_none=True)
        return FedAttnConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


class SamplingFields(OpenAIBaseModel):
    """The fields of vLLM's OpenAI requests this server implements, redeclared with the bounds every integer from
    outside gets here (integers reach msgpack, torch and vLLM). They mean what they mean in vLLM: the request
    classes below subclass vLLM's own, whose `to_sampling_params` builds the SamplingParams. A field of vLLM's
    class that is not redeclared here is not implemented: at its vLLM default it is accepted, else refused by
    name (server/unsupported.py). The FedAttn extension: `fedattn`."""

    model: str | None = None  # None: the served model, as vLLM
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    # Sampling: null or absent takes the model's generation_config, else OpenAI's default (vLLM's rule).
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=MAX_TOKENS)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED - 1)  # it reaches torch: a signed 64-bit integer
    stop: StopString | list[StopString] | None = Field(None, max_length=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's sampling extensions; token ids are checked against the vocabulary by the server
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS)
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=1024)
    allowed_token_ids: list[int] | None = Field(None, min_length=1, max_length=1 << 16)
    bad_words: list[Annotated[str, Field(max_length=256, pattern=r"\S")]] = Field(default_factory=list, max_length=64)
    fedattn: FedAttnBlock | None = None

    @model_validator(mode="wrap")
    @classmethod
    def _malformed_is_a_validation_error(cls, data, handler):
        """vLLM's before-validators read the raw body and some crash on shapes its fields would refuse (a
        `structured_outputs` string, `messages` a number): a validation error (400), never a 500."""
        try:
            return handler(data)
        except (TypeError, AttributeError, KeyError) as error:
            raise ValueError(f"malformed request ({type(error).__name__}: {error})") from None

    @model_validator(mode="before")
    @classmethod
    def validate_prompt_and_prompt_embeds(cls, data):
        """Replaces vLLM's completion check of that name: a multi-party request or a session has no prompt (the
        serving layer asks for exactly one of prompt and participants)."""
        return data

    def token_ids_outside(self, vocab: int) -> str | None:
        """The first field naming a token id outside 0..vocab-1, if any."""
        for name in ("stop_token_ids", "allowed_token_ids"):
            if any(not 0 <= t < vocab for t in getattr(self, name) or ()):
                return name
        for key in self.logit_bias or {}:
            if not (key.isascii() and key.isdigit() and len(key) <= 9 and int(key) < vocab):
                return "logit_bias"
        return None

    def logprob_count(self) -> int | None:
        """Alternatives per generated token whose log-probabilities the answer carries (None: no logprobs)."""
        return None


class CountedLogprobs(BaseModel):
    """Completions' legacy `logprobs`: alternatives per generated token (also a private session's terms)."""

    logprobs: int | None = Field(None, ge=0, le=20)

    def logprob_count(self) -> int | None:
        return self.logprobs


class CompletionRequest(CountedLogprobs, SamplingFields, VLLMCompletionRequest):
    prompt: Segment | None = None  # one prompt (vLLM's batches of prompts are refused)
    participants: list[Segment] | None = Field(None, min_length=1)  # multi-party: one segment per participant
    public_prefix: Segment | None = None  # multi-party: public text before participant 0, seen by all at every layer


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart]  # text, or text parts (joined by newlines, as vLLM does); no images or audio

    @field_validator("content")
    @classmethod
    def _text(cls, content):
        return content if isinstance(content, str) else "\n".join(part.text for part in content)


class ChatCompletionRequest(SamplingFields, VLLMChatCompletionRequest):
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = Field(0, ge=0, le=20)  # alternatives per token, with logprobs
    messages: list[ChatMessage] = Field(default_factory=list)  # single party; [] or absent beside participants
    # multi-party: each participant's private part of one user turn (the chat template frames the whole)
    participants: list[str] | None = Field(None, min_length=1)
    system: str | None = None  # optional system prompt for a multi-party turn (with the template head: public)
    public_prefix: Segment | None = None  # refused: in multi-party chat the system message is the public prefix

    @model_validator(mode="before")
    @classmethod
    def _null_messages_are_absent(cls, data):
        """`"messages": null` (sent beside participants) as absent, before vLLM's validators iterate it."""
        if isinstance(data, dict) and "messages" in data and data["messages"] is None:
            data = {name: value for name, value in data.items() if name != "messages"}
        return data

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class SessionCreateRequest(CountedLogprobs, SamplingFields, VLLMCompletionRequest):
    """A private multi-client session: its size and settings; parts come later, one per client. Its sampling
    fields mean what they mean in vLLM's requests; a field neither vLLM's nor ours is refused (an endpoint of
    our own has no clients that send fields for other servers)."""

    model_config = ConfigDict(extra="forbid")

    participants: int = Field(ge=1)
    chat: bool = True  # the parts form one user turn under the model's chat template
    system: str | None = None  # chat: the system message (the template head is the public prefix)
    public_prefix: Segment | None = None  # not chat: public text or token ids before participant 0
    join_timeout_s: float = Field(60.0, gt=0, le=3600)
    # party-side servers (--role party): each participant's site, by its CURVE public key (Z85, 40 characters)
    sites: list[Annotated[str, Field(pattern=Z85_KEY)]] | None = Field(None, max_length=MAX_SIZE)

    def contradiction(self, *, party: bool) -> tuple[str, str] | None:
        """(param, message) of the first rule these terms break beyond their fields' own bounds, if any;
        `party`: a session across party-side servers."""
        if self.chat and self.public_prefix is not None:
            return "public_prefix", "public_prefix: in chat the system message is the public prefix (use `system`)"
        if self.system is not None and not self.chat:
            return "system", "system: only with chat (use public_prefix)"
        if party and (self.sites is None or len(self.sites) != self.participants):
            return "sites", f"sites: one CURVE public key per participant ({self.participants}) at party-side servers"
        if party and self.join_timeout_s > MAX_WAIT_S:
            return "join_timeout_s", f"join_timeout_s: at most {MAX_WAIT_S:.0f} s between party-side servers"
        return None


class Invitation(BaseModel):
    """A session across party-side servers, as its creator's server made it: every party's client hands it to
    its own server with its part. `terms` are the create request (settings, public prefix, sampling);
    `seal_key` (base64) seals K/V past the coordinator: known to the parties and to whoever created the
    session, never to the coordinator."""

    model_config = ConfigDict(extra="forbid")

    session: str = Field(min_length=1, max_length=128)
    terms: SessionCreateRequest
    seal_key: str = Field(min_length=44, max_length=44)


class SessionJoinRequest(BaseModel):
    """One participant's own part of a session: a private session's join token, or at a party-side server
    the session's invitation."""

    model_config = ConfigDict(extra="forbid")

    token: str | None = None
    invitation: Invitation | None = None
    content: Segment = Field(min_length=1)
    stream: bool = False
    include_usage: bool = False  # streamed: a last chunk with the usage


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages under the model's chat template (strict types: no lax
    coercion of numbers to booleans or strings to token ids)."""

    model_config = ConfigDict(strict=True)

    model: str | None = None  # None: the served model
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True)

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]] = Field(max_length=1 << 20)

