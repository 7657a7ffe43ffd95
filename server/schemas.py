"""OpenAI request bodies, plus FedAttn's extension fields `participants` and `fedattn`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


class StreamOptions(BaseModel):
    include_usage: bool = False  # a last chunk with the usage (and no choices), as OpenAI and vLLM send it


class _Sampling(BaseModel):
    # Fields beyond ours are kept aside (model_extra): those vLLM knows are refused by name (server/unsupported.py),
    # the rest ignored, as vLLM ignores them.
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)  # integers reach msgpack and vLLM: bounded here
    # Sampling: null or absent takes the model's generation_config, else OpenAI's default (vLLM's rule).
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=MAX_TOKENS)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED - 1)  # it reaches torch: a signed 64-bit integer
    stop: StopString | list[StopString] | None = Field(None, max_length=16)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
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


class CompletionRequest(_Sampling):
    logprobs: int | None = Field(None, ge=0, le=20)  # the legacy shape: alternatives per token
    prompt: Segment | None = None
    participants: list[Segment] | None = Field(None, min_length=1)  # multi-party: one segment per participant
    public_prefix: Segment | None = None  # multi-party: public text before participant 0, seen by all at every layer

    def logprob_count(self) -> int | None:
        return self.logprobs


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


class ChatCompletionRequest(_Sampling):
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)  # alternatives per token, with logprobs

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, top: int | None, info):
        if top and not info.data.get("logprobs"):
            raise ValueError("only with logprobs: true")
        return top
    messages: list[ChatMessage] | None = None
    # multi-party: each participant's private part of one user turn (the chat template frames the whole)
    participants: list[str] | None = Field(None, min_length=1)
    system: str | None = None  # optional system prompt for a multi-party turn (with the template head: public)
    public_prefix: Segment | None = None  # refused: in multi-party chat the system message is the public prefix

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class SessionCreateRequest(_Sampling):
    """A private multi-client session: its size and settings; parts come later, one per client."""

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
    """vLLM's /tokenize: a prompt, or chat messages under the model's chat template."""

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model: str
    tokens: list[Annotated[int, Field(ge=0)]] = Field(max_length=1 << 20)

