"""Worker-side session state: the resolved plan, segment lengths and each generator's own sync-layer K/V."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from fedattn_vllm.config import FedAttnPlan, KVWire
from fedattn_vllm.exchange import KV, InProcessKVExchange, KVExchange
from kernels import concat_kv
from kernels.paged import PagedKeys, pool_for, trim_pools

POOL_IDLE_S = 10.0  # seconds an idle worker keeps its paged pools' memory for the next sessions
METADATA_KEY = "fedattn"  # SamplingParams.extra_args[METADATA_KEY]: a ParticipantMetadata marks a participant


@dataclass(frozen=True)
class ParticipantMetadata:
    """What a participant's vLLM request carries: its session, place and the session's resolved plan."""

    session_id: str
    participant: int
    lengths: tuple[int, ...]  # every participant's segment tokens
    prefix_len: int  # public prefix tokens at the start of every request
    plan: FedAttnPlan


class GrowingKV:
    """Append-only keys and values (T, H_kv, D) with amortised O(1) appends (capacity doubles when full)."""

    def __init__(self, like: KV, rows: int):
        """Empty, with room for `rows` rows of `like`'s dtype, device and head shape."""
        self._k, self._v = (t.new_empty((max(rows, 1), *t.shape[1:])) for t in like)
        self.size = 0

    def append(self, kv: KV) -> None:
        """Add this step's rows."""
        end = self.size + kv[0].shape[0]
        if end > self._k.shape[0]:
            capacity = max(2 * self._k.shape[0], end)
            self._k, self._v = (
                torch.cat([t[: self.size], t.new_empty((capacity - self.size, *t.shape[1:]))]) for t in (self._k, self._v)
            )
        self._k[self.size : end], self._v[self.size : end] = kv
        self.size = end

    def rows(self) -> KV:
        """Views of everything so far."""
        return self._k[: self.size], self._v[: self.size]


@dataclass
class SessionState:
    session_id: str
    plan: FedAttnPlan
    lengths: list[int]  # segment tokens per participant
    prefix_len: int = 0  # public prefix tokens at the start of every participant's request
    # (generator, layer) -> its own prompt's K/V (public prefix and the segment's kept tokens), kept from its
    # prefill to its first decode step
    prompt_kv: dict[tuple[int, int], KV] = field(default_factory=dict)
    # (generator, layer) -> its prefill's paged keys (public prefix, the foreign K/V before it, its segment), which
    # its first decode step goes on from
    prefill_keys: dict[tuple[int, int], PagedKeys] = field(default_factory=dict)
    # (generator, layer) -> every key/value its decode attends over: foreign, own segment, generated so far
    decode_kv: dict[tuple[int, int], GrowingKV | PagedKeys] = field(default_factory=dict)
    # (generator, layer) -> the foreign K/V parts its prefill fetched, kept for its first decode step
    kept_foreign: dict[tuple[int, int], list[KV]] = field(default_factory=dict)
    error: str | None = None  # set when the session failed; its rows are then left alone
    _sources: dict[tuple[int, int, bool], tuple[int, ...]] = field(default_factory=dict, repr=False)  # memoised

    def fail(self, message: str) -> None:
        """Mark the session failed (first error wins) and drop its K/V; the driver aborts its requests."""
        if self.error is None:
            self.error = message
        self.drop_kv()

    def drop_kv(self) -> None:
        """Free the K/V this worker keeps for the session (paged decode keys give their blocks back)."""
        for held in [*self.decode_kv.values(), *self.prefill_keys.values()]:
            if isinstance(held, PagedKeys):
                held.release()
        self.prompt_kv.clear()
        self.prefill_keys.clear()
        self.decode_kv.clear()
        self.kept_foreign.clear()

    @property
    def prompt_len(self) -> int:
        """Public prefix and every segment: where generated tokens' global positions start."""
        return self.prefix_len + sum(self.lengths)

    def offset(self, participant: int) -> int:
        """Global position of the participant's first segment token."""
        return self.prefix_len + sum(self.lengths[:participant])

    def request_len(self, participant: int) -> int:
        """Prompt tokens of the participant's request: the public prefix, then its segment."""
        return self.prefix_len + self.lengths[participant]

    def sources(self, participant: int, layer: int, prefill: bool) -> tuple[int, ...]:
        """Participants whose K/V `participant` attends to at `layer` (earlier ones in prefill); asked for every
        participant at every layer of every step, computed once."""
        key = (participant, layer, prefill)
        if key not in self._sources:
            self._sources[key] = tuple(m for m in range(len(self.lengths))
                                       if self.plan.sees(participant, m, layer, prefill))
        return self._sources[key]

    def decodes_over_foreign(self, participant: int, layer: int) -> bool:
        """Whether `participant` generates and its decode sees foreign K/V at `layer`."""
        return participant in self.plan.generators and bool(self.sources(participant, layer, prefill=False))

    def sparse_local(self, participant: int) -> bool:
        """Whether `participant` attends to only some of its own segment's tokens (sparse local computation)."""
        return self.plan.kept_count(self.lengths[participant]) < self.lengths[participant]

    def recomputes(self, participant: int, layer: int) -> bool:
        """Whether the participant's rows at `layer` differ from vLLM's own attention over its request: someone
        in the session shares there, or it attends to only some of its own tokens."""
        return layer in self.plan.sync_layers or self.sparse_local(participant)

    def prefill_keys_chain(self, participant: int, layer: int) -> bool:
        """Whether the participant's prefill keys at `layer` are exactly [public prefix, segment 0, ..., its own
        segment]: it sees every earlier participant (and no other) at `layer`, each sharing its whole segment as
        exact K/V, and keeps all of its own. Such participants' keys are the first rows of one key set."""
        earlier = range(participant)
        return (self.plan.config.kv_wire is KVWire.NATIVE and not self.sparse_local(participant)
                and self.sources(participant, layer, prefill=True) == tuple(earlier)
                and all(self.plan.shared_count(m, self.lengths[m]) == self.lengths[m] for m in earlier))

    def decodes_from_buffer(self, participant: int, layer: int) -> bool:
        """Whether a generator's decode at `layer` needs keys the paged cache cannot give alone: foreign K/V, or
        only the kept part of its own prompt (then its prompt K/V are kept from prefill, in `prompt_kv`)."""
        return self.decodes_over_foreign(participant, layer) or (participant in self.plan.generators
                                                                 and self.sparse_local(participant))

    def foreign(self, participant: int, layer: int, prefill: bool, fetch) -> list[KV]:
        """Foreign K/V `participant` attends to at `layer`: (tokens, H_kv, D) parts, the sources' shared tokens in
        participant order (empty: none).

        fetch(sources) -> [KV] reads the exchange, all of a layer's sources at once (low-bit payloads then decode
        in one call, into one part); each source is fetched once per layer: a generator keeps what its prefill
        fetched (the participants before it) for its decode, which fetches only those after it.
        """
        sources = self.sources(participant, layer, prefill)
        kept = self.kept_foreign.pop((participant, layer), None)
        # what prefill fetched: the participants before this one (`FedAttnPlan.sees`), so kept parts come first
        fetched = self.sources(participant, layer, prefill=True) if kept is not None else ()
        missing = [m for m in sources if m not in fetched]
        parts = [*(kept or []), *(fetch(missing) if missing else [])]
        if prefill and self.decodes_over_foreign(participant, layer):
            self.kept_foreign[participant, layer] = parts
        return parts

    def keep_for_decode(self, participant: int, layer: int, keys: PagedKeys) -> None:
        """A generator's prefill keys at `layer` (public prefix, the foreign K/V before it, its whole segment) stay
        for its decode, which appends those of the participants after it: nothing of them is copied again."""
        self.kept_foreign.pop((participant, layer), None)  # in `keys` now
        self.prefill_keys[participant, layer] = keys

    def decode_keys(self, participant: int, layer: int, fetch, max_tokens: int,
                    paging: tuple[int, str] | None) -> GrowingKV | PagedKeys:
        """Keys/values a generator's decode attends to at `layer` before this step's tokens (the caller appends
        them): foreign (if any) + own prompt (kept tokens) + generated.

        Its prefill's paged keys where it kept them (`keep_for_decode`), else built once at the first decode step
        (the foreign set never changes after prefill); then grown: in
        vLLM's CPU cache layout where `paging` gives its (block size, instruction set), so that vLLM's kernel
        attends over it (kernels/paged.py; its blocks go back to their pool when the session drops it), else
        with room for the generator's `max_tokens`.
        """
        held = self.decode_kv.get((participant, layer))
        if held is not None:
            return held
        held = self.prefill_keys.pop((participant, layer), None)
        if held is not None:  # the participants after it join its prefill's keys
            self.decode_kv[participant, layer] = held
            before = self.sources(participant, layer, prefill=True)
            if later := [m for m in self.sources(participant, layer, prefill=False) if m not in before]:
                held.append(*fetch(later))
            return held
        parts = [*self.foreign(participant, layer, False, fetch), self.prompt_kv.pop((participant, layer))]
        if paging is not None:
            held = PagedKeys(pool_for(parts[-1][0], *paging))
            held.append(*parts)
        else:
            held = GrowingKV(parts[0], sum(k.shape[0] for k, _ in parts) + max_tokens)
            held.append(concat_kv(parts))
        self.decode_kv[participant, layer] = held
        return held


class SessionRegistry:
    """Sessions this worker has seen, keyed by id, and the exchange they publish to."""

    def __init__(self, exchange: KVExchange, pool_idle_s: float = POOL_IDLE_S):
        self.exchange, self.pool_idle_s = exchange, pool_idle_s
        self._lock = threading.Lock()
        self._sessions: dict[str, SessionState] = {}
        self._trim: threading.Timer | None = None  # the pending `_trim_when_idle`

    def get_or_create(self, metadata: ParticipantMetadata) -> SessionState:
        with self._lock:
            state = self._sessions.get(metadata.session_id)
            if state is None:
                state = self._sessions[metadata.session_id] = SessionState(
                    metadata.session_id, metadata.plan, list(metadata.lengths), metadata.prefix_len)
            return state

    def fail(self, state: SessionState, message: str) -> None:
        """Fail the session on this worker and say so to the exchange, so that no other worker (a tensor-parallel
        rank, in lockstep with this one) waits on this one's part of it."""
        first = state.error is None
        state.fail(message)
        if first:
            self.exchange.abandon(state.session_id, message)

    def failed(self, session_ids) -> dict[str, str]:
        """The error of each of `session_ids` that failed."""
        with self._lock:
            states = [self._sessions.get(i) for i in session_ids]
        return {s.session_id: s.error for s in states if s is not None and s.error is not None}

    def release(self, session_id: str) -> None:
        """Free the session's own and published K/V (idempotent); with no session left, the paged buffers' memory
        too once the worker has stayed idle (`_trim_when_idle`)."""
        with self._lock:
            state = self._sessions.pop(session_id, None)
            idle = not self._sessions
        if state is not None:
            state.drop_kv()
        self.exchange.release(session_id)
        if idle:
            self._trim_when_idle()

    def _trim_when_idle(self) -> None:
        """Give the paged pools' memory back if the worker still holds no session `pool_idle_s` from now: sessions
        back to back reuse it (growing a pool again copies it and faults its pages in anew), as vLLM keeps its own
        cache. A pool whose blocks are in use by then keeps them."""
        timer = threading.Timer(self.pool_idle_s, self._trim_if_idle)
        timer.daemon = True
        with self._lock:
            if self._trim is not None:
                self._trim.cancel()
            self._trim = timer
        timer.start()

    def _trim_if_idle(self) -> None:
        with self._lock:
            idle = not self._sessions
        if idle:
            trim_pools()

    def __len__(self) -> int:
        return len(self._sessions)


REGISTRY = SessionRegistry(InProcessKVExchange())  # colocated mode: one per engine process
