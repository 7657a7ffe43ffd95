"""The sync-layer hook: vLLM's attention impl plus FedAttn's foreign K/V, merged exactly by log-sum-exp.

Every attention impl of a FedAttn model becomes a subclass of its backend's impl. The
stock forward runs first (it caches K/V and attends over the request's own tokens, which
is all a local layer needs). At a layer where a participant sees foreign K/V, its rows are
recomputed: in prefill as attention over its own K/V (causal) merged with attention over
the foreign K/V; in a generator's decode as one softmax over foreign + own K/V.
"""

from __future__ import annotations

import functools

import torch

from fedattn_vllm.exchange import KVExchangeError
from fedattn_vllm.kv_wire import decode_checked, encode_kv
from fedattn_vllm.selection import QUESTION_ROWS, question_bytes
from fedattn_vllm.vllm_ext.batch import FedAttnBatch, ParticipantRows, current_batch
from fedattn_vllm.vllm_ext.sessions import REGISTRY
from kernels import gather_tokens, merge_attention, partial_attention


def apply_sync_layer(
    batch: FedAttnBatch, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    output: torch.Tensor, scale: float,
) -> None:
    """Publish this layer's K/V, then overwrite the rows that see foreign K/V.

    query/output (T, H, D), key/value (T, H_kv, D): post-RoPE, rows as in `batch`.
    """
    # Pass 1: publish, so a participant later in this same batch finds its predecessors.
    asked: set[tuple[str, int]] = set()  # (session, generator) whose questions went out at this layer
    for e in batch.entries:
        if e.prefill and e.session.plan.publishes(e.participant, layer):
            asks = e.session.plan.asks(e.participant, layer, e.session.lengths[e.participant])
            questions = _questions(batch, e, query, scale) if asks else None
            _isolated(e, _publish, layer, key, value, questions)
            if questions is not None and e.session.error is None:
                _count_questions(e, layer, query, asked)
    # Pass 2: attention over own + foreign K/V for the rows that see any.
    for e in batch.entries:
        if layer in e.session.plan.sync_layers:  # elsewhere nobody in the session shares: stock output stands
            _isolated(e, _attend, layer, query, key, value, output, scale)


def _isolated(entry: ParticipantRows, step, *args) -> None:
    """Run one participant's step; an exchange error fails its session only, never the engine."""
    if entry.session.error is not None:
        return
    try:
        step(entry, *args)
    except KVExchangeError as error:
        entry.session.fail(str(error))


def _questions(batch: FedAttnBatch, e: ParticipantRows, query: torch.Tensor, scale: float) -> torch.Tensor | None:
    """(rows, H, D) scaled question queries of the generators that choose what `e` shares (None: one is
    not in this step; colocated sessions prefill in one step, so the session then fails)."""
    askers = e.session.plan.question_askers(e.participant)
    found = {a.participant: a for a in batch.entries if a.session is e.session and a.prefill and a.participant in askers}
    if len(found) != len(askers):
        return None
    return torch.cat([query[found[g].segment_rows][-QUESTION_ROWS:] for g in askers] or [query[:0]]) * scale


def _count_questions(e: ParticipantRows, layer: int, query: torch.Tensor, asked: set) -> None:
    """Bytes of the question queries `e` received (each generator sends its own once a layer)."""
    state = e.session
    for g in state.plan.asks(e.participant, layer, state.lengths[e.participant]):
        nbytes = question_bytes(state.lengths[g], query.shape[1], query.shape[2], query.element_size())
        REGISTRY.exchange.count_bytes(state.session_id, e.participant, received=nbytes)
        if (state.session_id, g) not in asked:
            asked.add((state.session_id, g))
            REGISTRY.exchange.count_bytes(state.session_id, g, published=nbytes)


def _publish(e: ParticipantRows, layer: int, key: torch.Tensor, value: torch.Tensor,
             questions: torch.Tensor | None) -> None:
    state, n = e.session, e.participant
    if questions is None and state.plan.asks(n, layer, state.lengths[n]):
        raise KVExchangeError(f"participant {n}: question selection needs the generators' prefill in the same step")
    keys = key[e.segment_rows]  # the public prefix is never exchanged
    shared = state.plan.shared_positions(n, layer, state.lengths[n], keys, questions)
    kv = (gather_tokens(keys, shared), gather_tokens(value[e.segment_rows], shared))
    REGISTRY.exchange.publish(state.session_id, n, layer, encode_kv(kv, state.plan.config.kv_wire))


def _attend(e: ParticipantRows, layer: int, query, key, value, output, scale: float) -> None:
    state, n = e.session, e.participant
    own = key[e.rows], value[e.rows]  # prefill: public prefix + segment

    def fetch(source: int):  # checked before use: it comes from another party
        payload = REGISTRY.exchange.fetch(state.session_id, n, source, layer)
        shape = (state.plan.shared_count(source, state.lengths[source]), *key.shape[1:])
        return decode_checked(payload, state.plan.config.kv_wire, key.dtype, shape)

    if not e.prefill:  # a generator's token: one softmax over foreign + own keys (or stock, if no foreign)
        if state.decodes_over_foreign(n, layer):
            keys, values = state.decode_keys(n, layer, own, fetch, e.max_tokens)
            output[e.rows] = partial_attention(query[e.rows], keys, values, scale)[0].to(output.dtype)
        return
    if state.decodes_over_foreign(n, layer):
        state.prompt_kv[n, layer] = (own[0].clone(), own[1].clone())
    foreign = state.foreign(n, layer, True, fetch)
    if foreign is None:
        return
    # Only the segment's rows see foreign K/V (the prefix precedes all of it); they are the last of `own`.
    q = query[e.segment_rows]
    out_own, lse_own = partial_attention(q, own[0], own[1], scale, causal=True)
    out_far, lse_far = partial_attention(q, foreign[0], foreign[1], scale)
    output[e.segment_rows] = merge_attention(out_far, lse_far, out_own, lse_own)[0].to(output.dtype)


@functools.cache
def fedattn_impl_class(base: type) -> type:
    """`base` (a vLLM attention impl) whose forward adds the sync-layer step; instances set `fedattn_layer`.

    A direct subclass, so an impl's class can be swapped in place (same object layout).
    """

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        result = base.forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        batch = current_batch()
        if batch is not None and attn_metadata is not None:  # warm-up / profile runs have neither
            apply_sync_layer(batch, self.fedattn_layer, query, key, value, output, self.scale)
        return result

    return type(f"FedAttn{base.__name__}", (base,), {"forward": forward})
