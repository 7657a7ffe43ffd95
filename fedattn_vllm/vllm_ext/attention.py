"""The sync-layer hook: vLLM's attention impl plus FedAttn's foreign K/V, in one softmax.

Every attention impl of a FedAttn model becomes a subclass of its backend's impl. The
stock forward runs first (it attends over the request's own tokens, which is all a local
layer needs). At a layer where a participant sees foreign K/V, its rows are recomputed;
where every row of the step would be (H = 1, a generator's decode at a layer it reads), the
stock forward is skipped on the CPU backend, which caches K/V outside it (`replaces_stock`).
On the CPU, vLLM's own attention kernel does it over keys copied into its paged
layout (`kernels.paged`): a prefill row over [public prefix, foreign, own segment] causally in
one softmax, a generator's decode over foreign + own prompt + generated keys, every recomputed
row of the layer in one call. Elsewhere (and in the prefill of a participant that keeps only
some of its own tokens: a mask the kernel cannot take) in prefill attention over its own K/V
(causal) merged exactly, by log-sum-exp, with attention over the foreign K/V (each a fused
kernel that returns its log-sum-exp, `kernels.fused`); in decode every decoding generator of
the layer in one padded call (`kernels.decode_attention`). A participant that attends to only
some of its own tokens (sparse local computation) is recomputed at every layer the same way.
"""

from __future__ import annotations

import functools

import torch

from fedattn_vllm.exchange import KV, KVExchangeError, PayloadKind
from fedattn_vllm.kv_wire import decode_checked, encode_kv, questions_checked
from fedattn_vllm.selection import QUESTION_ROWS
from fedattn_vllm.vllm_ext.batch import FedAttnBatch, ParticipantRows, current_batch
from fedattn_vllm.vllm_ext.sessions import REGISTRY, GrowingKV, SessionState
from fedattn_vllm.vllm_ext.surface import cpu_paging, head_combine, rank_agreement, stock_forward_skippable
from kernels import concat_kv, decode_attention, fused_partial_attention, gather_tokens, merge_attention
from kernels.paged import PagedKeys, append_each, fits_output, paged_attention, pool_for


def apply_sync_layer(
    batch: FedAttnBatch, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    output: torch.Tensor, scale: float, paging: tuple[int, str] | None = None, whole: bool = False,
) -> None:
    """Publish this layer's K/V, then overwrite the rows that see foreign K/V.

    query/output (T, H, D), key/value (T, H_kv, D): post-RoPE, rows as in `batch`. paging: vLLM's CPU cache
    (block size, instruction set), whose kernel then attends for the rows recomputed (None: the reference).
    whole: vLLM's own attention did not run (`replaces_stock`), so every row is written here, a participant's
    public prefix and a segment that sees no foreign K/V included.
    """
    # Pass 1: publish (the generators' questions first), so a participant later in this same batch finds its
    # predecessors' K/V, and a publisher that chooses by the questions finds them.
    for e in batch.entries:
        if e.prefill and e.session.plan.selection_needs_queries and e.session.plan.question_readers(
                e.participant, layer, e.session.lengths):
            _isolated(e, _publish_questions, layer, query, scale)
    for e in batch.entries:
        if e.prefill and e.session.plan.publishes(e.participant, layer):
            _isolated(e, _publish, layer, query, key, value)
    # Pass 2: attention over own (kept) + foreign K/V for the rows that see any or keep only some of their own.
    # On vLLM's CPU kernel every such row of the layer, prefill and decode, is one call; elsewhere the layer's
    # decoding generators are one padded torch call.
    # (entry, batch rows, keys whose last rows of the first `seen` (None: all) they are)
    paged: list[tuple[ParticipantRows, slice, PagedKeys, int | None]] = []
    temporary: list[PagedKeys] = []  # prefill keys no decode reads, released after the call
    decoding: list[tuple[ParticipantRows, GrowingKV]] = []
    growing: list[tuple[ParticipantRows, PagedKeys]] = []  # decoding generators' paged keys, before this token
    chains, chain_keepers = _key_chains(batch, layer, key, value, paging)
    for i, e in enumerate(batch.entries):
        if not e.session.recomputes(e.participant, layer):  # elsewhere vLLM's own output stands
            continue
        if e.prefill:
            chain, seen = chains.get(i, (None, None))
            held = _isolated(e, _attend_prefill, layer, query, key, value, output, scale, paging, whole, chain)
            if held is not None:
                paged.append((e, e.segment_rows, held, seen))
                if whole and e.session.prefix_len:  # the public prefix's rows over the prefix alone
                    paged.append((e, slice(e.rows.start, e.segment_rows.start), held, e.session.prefix_len))
                if chain is None and not e.session.decodes_from_buffer(e.participant, layer):  # else kept
                    temporary.append(held)
        elif e.session.decodes_from_buffer(e.participant, layer):
            held = _isolated(e, _decode_keys, layer, key, paging)
            if isinstance(held, PagedKeys):
                growing.append((e, held))
            elif held is not None:
                held.append((key[e.rows], value[e.rows]))
                decoding.append((e, held))
    if growing:  # every generator's new token in one cache write; it is then its keys' last row
        rows = torch.tensor([e.rows.start for e, _ in growing], device=key.device)
        append_each([held for _, held in growing], key[rows], value[rows])
        paged.extend((e, e.rows, held, None) for e, held in growing)
    # A session that failed after its rows were gathered (a later participant's exchange error) is left out: its
    # keys are released and its rows are the driver's to discard.
    live = sorted(((rows, held, seen) for e, rows, held, seen in paged if e.session.error is None),
                  key=lambda request: request[0].start)
    if live:
        _attend_paged(live, query, output, scale)
    for held in temporary:
        held.release()
    for held, state, last in chain_keepers:  # a chain its last user did not keep for its decode
        if state.prefill_keys.get((last, layer)) is not held:
            held.release()
    if whole:  # a session that failed in this step: rows the driver discards, zeros rather than what memory held
        for e in batch.entries:
            if e.session.error is not None:
                output[e.rows] = 0
    if decoding:
        rows = torch.tensor([e.rows.start for e, _ in decoding], device=query.device)  # one token each
        keys = [held.rows() for _, held in decoding]
        attended = decode_attention(query[rows], [k for k, _ in keys], [v for _, v in keys], scale)
        output[rows] = attended.to(output.dtype)


def _key_chains(batch: FedAttnBatch, layer: int, key: torch.Tensor, value: torch.Tensor,
                paging: tuple[int, str] | None
                ) -> tuple[dict[int, tuple[PagedKeys, int]], list[tuple[PagedKeys, SessionState, int]]]:
    """Key sets shared by a session's prefilling participants on vLLM's kernel: where participants' keys at `layer`
    are [public prefix, segment 0, ..., their own segment] (`SessionState.prefill_keys_chain`), one key set of the
    session's segments, in order, serves them all (each seeing its first rows), copied into the pool once instead
    of a segment once for every participant that sees it. The prefix is the first participant's rows (every
    participant's are the same computation: prefix rows see the prefix alone).

    Returns ({batch entry index: (its chain, how many rows it sees)}, [(chain, session, its last user)]). A
    generator whose decode goes on from its prefill keys uses a chain only as its last user; the chain is then
    kept for that decode, else released after the layer."""
    if paging is None:
        return {}, []
    sessions: dict[str, dict[int, tuple[int, ParticipantRows]]] = {}  # session id -> participant -> (index, rows)
    for i, e in enumerate(batch.entries):
        if e.prefill and e.session.error is None:
            sessions.setdefault(e.session.session_id, {})[e.participant] = (i, e)
    chains, keepers = {}, []
    for present in sessions.values():
        state = next(iter(present.values()))[1].session
        users = [n for n in sorted(present) if all(m in present for m in range(n))
                 and state.recomputes(n, layer) and state.prefill_keys_chain(n, layer)]
        users = [n for n in users if n == users[-1] or not state.decodes_from_buffer(n, layer)]
        if len(users) < 2:
            continue
        prefix = slice(present[0][1].rows.start, present[0][1].segment_rows.start)
        segments = [present[m][1].segment_rows for m in range(users[-1] + 1)]
        held = PagedKeys(pool_for(key, *paging))
        held.append(*((key[rows], value[rows]) for rows in [prefix, *segments]))
        chains |= {present[n][0]: (held, state.offset(n) + state.lengths[n]) for n in users}
        keepers.append((held, state, users[-1]))
    return chains, keepers


def _attend_paged(requests: list[tuple[slice, PagedKeys, int | None]], query: torch.Tensor, output: torch.Tensor,
                  scale: float) -> None:
    """The layer's recomputed rows (batch rows, their keys, how many of the keys they see; in row order) in one call
    of vLLM's kernel, which reads the queries and writes the output in place where the rows run unbroken (every row
    of a step it replaces, the usual case), else through a gathered copy."""
    lengths = [rows.stop - rows.start for rows, _, _ in requests]
    held, seen = [h for _, h, _ in requests], [n for _, _, n in requests]
    first, last = requests[0][0].start, requests[-1][0].stop
    if last - first == sum(lengths) and fits_output(output[first:last], query[first:last]):
        paged_attention(query[first:last], lengths, held, scale, seen, out=output[first:last])
        return
    rows = torch.cat([torch.arange(r.start, r.stop, device=query.device) for r, _, _ in requests])
    output[rows] = paged_attention(query[rows], lengths, held, scale, seen).to(output.dtype)


def replaces_stock(batch: FedAttnBatch, layer: int, rows: int) -> bool:
    """Whether `apply_sync_layer(..., whole=True)` on vLLM's CPU kernel writes all of a step's `rows` rows at
    `layer`: every row belongs to a participant that the sync step recomputes there (a prefill at a sync layer,
    every own token kept; a generator's decode over foreign or kept K/V). vLLM's own attention is then skipped:
    at H = 1 it would attend over each request's own tokens only for every row to be overwritten."""
    def recomputed(e: ParticipantRows) -> bool:
        state, n = e.session, e.participant
        if e.prefill:  # the paged path (not sparse local computation's masked one)
            return state.recomputes(n, layer) and not state.sparse_local(n)
        return state.decodes_from_buffer(n, layer)

    return sum(e.rows.stop - e.rows.start for e in batch.entries if recomputed(e)) == rows


def _isolated(entry: ParticipantRows, step, *args):
    """Run one participant's step (its result, or None); an exchange error fails its session only, never the
    engine."""
    if entry.session.error is not None:
        return None
    try:
        return step(entry, *args)
    except KVExchangeError as error:
        REGISTRY.fail(entry.session, str(error))
        return None


def _publish_questions(e: ParticipantRows, layer: int, query: torch.Tensor, scale: float) -> None:
    """A generator's question: the scaled queries of its last segment tokens, (rows, H, D)."""
    questions = query[e.segment_rows][-QUESTION_ROWS:] * scale
    REGISTRY.exchange.publish(e.session.session_id, e.participant, layer, (questions,), PayloadKind.QUESTIONS)


def _questions(e: ParticipantRows, layer: int, like: torch.Tensor) -> torch.Tensor | None:
    """(rows, H, D) the question queries of the generators that choose what `e` shares at `layer`, checked
    (they come from another party); None where it shares all of its tokens."""
    state = e.session
    askers = state.plan.asks(e.participant, layer, state.lengths[e.participant])
    if not askers:
        return None

    def fetch() -> torch.Tensor:
        questions = []
        for g in askers:
            payload = REGISTRY.exchange.fetch(state.session_id, e.participant, g, layer, PayloadKind.QUESTIONS)
            shape = (min(QUESTION_ROWS, state.lengths[g]), *like.shape[1:])
            questions.append(questions_checked(payload, like.dtype, shape).to(like.device))
        return torch.cat(questions)

    return _agreed(fetch, like.device)


def _publish(e: ParticipantRows, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    state, n = e.session, e.participant
    keys = key[e.segment_rows]  # the public prefix is never exchanged
    shared = state.plan.shared_positions(n, layer, state.lengths[n], keys, _questions(e, layer, query),
                                         head_combine())
    kv = (gather_tokens(keys, shared), gather_tokens(value[e.segment_rows], shared))
    REGISTRY.exchange.publish(state.session_id, n, layer, encode_kv(kv, state.plan.config.kv_wire))


def _fetcher(e: ParticipantRows, layer: int, like: torch.Tensor):
    """fetch(sources) -> their K/V at `layer` as `e` may see them, decoded and checked (they come from other
    parties): (tokens, H_kv, D) parts, the sources' tokens in order."""
    state = e.session

    def fetch(sources: list[int]) -> list[KV]:
        payloads = [REGISTRY.exchange.fetch(state.session_id, e.participant, m, layer) for m in sources]
        shapes = [(state.plan.shared_count(m, state.lengths[m]), *like.shape[1:]) for m in sources]
        return [(k.to(like.device), v.to(like.device))  # from the network they arrive on the CPU
                for k, v in decode_checked(payloads, state.plan.config.kv_wire, like.dtype, shapes)]

    return lambda sources: _agreed(fetch, like.device, sources)


def _agreed(read, device: torch.device, *args):
    """read(*args): what other parties sent, checked, as an outcome every tensor-parallel rank shares. Each rank
    checks only its own heads (a value that overflows in one of them, a non-finite one in colocated mode), so the
    ranks agree on success before any goes on: a session fails on every rank or on none (`surface.rank_agreement`)."""
    agree = rank_agreement()
    if agree is None:
        return read(*args)
    try:
        result, error = read(*args), None
    except Exception as failure:  # agreed on too, so that no rank waits in the agreement for one that left it
        result, error = None, failure
    if not agree(error is None, device):
        raise error or KVExchangeError("another tensor-parallel rank refused what it received")
    return result


def _decode_keys(e: ParticipantRows, layer: int, key, paging) -> GrowingKV | PagedKeys:
    """A generator's token: every key/value it attends to at `layer` before it (foreign + own kept prompt +
    generated)."""
    return e.session.decode_keys(e.participant, layer, _fetcher(e, layer, key), e.max_tokens, paging)


def _attend_prefill(e: ParticipantRows, layer: int, query, key, value, output, scale: float,
                    paging, whole: bool, chain: PagedKeys | None = None) -> PagedKeys | None:
    """The participant's segment rows over own (kept) + foreign K/V: on vLLM's CPU kernel the keys, paged, for the
    layer's one call (its rows are their last rows, or the first rows of its session's `chain` where given:
    `_key_chains`; `whole`: even where it sees no foreign K/V, vLLM's own attention having not run); elsewhere (or
    sparse local) attended here. None: done."""
    state, n = e.session, e.participant
    own = key[e.rows], value[e.rows]  # public prefix + segment
    fetch = _fetcher(e, layer, key)
    # own: public prefix rows 0..P-1, then the segment's; `kept` indexes the segment (None: all of it)
    prefix, length = state.prefix_len, state.lengths[n]
    kept = state.plan.kept_positions(n, layer, length, key[e.segment_rows], head_combine()) \
        if state.sparse_local(n) else None
    on_kernel = kept is None and paging is not None  # one causal softmax over [prefix, foreign, segment]
    buffered = state.decodes_from_buffer(n, layer)  # a generator whose decode needs these keys again
    if buffered and not on_kernel:
        rows = None if kept is None else torch.cat([torch.arange(prefix, device=kept.device), prefix + kept])
        state.prompt_kv[n, layer] = (gather_tokens(own[0], rows).clone(), gather_tokens(own[1], rows).clone())
    foreign = state.foreign(n, layer, True, fetch)
    # Only the segment's rows change (the prefix precedes every foreign token and keeps all of itself).
    if on_kernel and (foreign or whole or buffered):
        held = chain  # its first rows: the foreign K/V fetched above (checked, counted), exactly
        if held is None:
            held = PagedKeys(pool_for(own[0], *paging))
            held.append((own[0][:prefix], own[1][:prefix]), *foreign, (own[0][prefix:], own[1][prefix:]))
        if buffered:
            state.keep_for_decode(n, layer, held)
        return held if foreign or whole else None
    if not foreign and kept is None and not whole:
        return None
    q = query[e.segment_rows]
    mask = None if kept is None else _local_mask(prefix, length, kept.to(q.device))
    out_own, lse_own = fused_partial_attention(q, own[0], own[1], scale, causal=True, mask=mask)
    if foreign:
        out_far, lse_far = fused_partial_attention(q, *concat_kv(foreign), scale)
        out_own = merge_attention(out_far, lse_far, out_own, lse_own)[0]
    output[e.segment_rows] = out_own.to(output.dtype)
    return None


def _local_mask(prefix: int, length: int, kept: torch.Tensor) -> torch.Tensor:
    """(length, prefix + length) bool: a segment query sees the public prefix, the kept segment tokens and itself
    (the causal bound is applied with it)."""
    visible = torch.zeros(prefix + length, dtype=torch.bool, device=kept.device)
    visible[:prefix] = True
    visible[prefix + kept] = True
    mask = visible.expand(length, -1).clone()
    mask[torch.arange(length), prefix + torch.arange(length)] = True
    return mask


@functools.cache
def fedattn_impl_class(base: type) -> type:
    """`base` (a vLLM attention impl) whose forward adds the sync-layer step; instances set `fedattn_layer`.

    A direct subclass, so an impl's class can be swapped in place (same object layout).
    """

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        batch = current_batch()
        if batch is None or attn_metadata is None:  # warm-up / profile runs have neither
            return base.forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        paging = cpu_paging(layer, kv_cache, query.device)
        whole = paging is not None and stock_forward_skippable(layer, self) and \
            replaces_stock(batch, self.fedattn_layer, attn_metadata.num_actual_tokens)
        result = output if whole else \
            base.forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        apply_sync_layer(batch, self.fedattn_layer, query, key, value, output, self.scale, paging, whole)
        return result

    return type(f"FedAttn{base.__name__}", (base,), {"forward": forward})
