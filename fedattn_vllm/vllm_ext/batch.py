"""Which rows of a vLLM batch belong to which FedAttn participant; global positions.

Built once per forward from the model runner (the only place that knows the request
order) and made current for the duration of the model call.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fedattn_vllm.vllm_ext.sessions import METADATA_KEY, REGISTRY, ParticipantMetadata, SessionState
from fedattn_vllm.vllm_ext.surface import install_forward_hook, scheduled_requests

_current: FedAttnBatch | None = None


@dataclass(frozen=True)
class ParticipantRows:
    session: SessionState
    participant: int
    rows: slice  # token rows of this request in the flattened batch
    prefill: bool  # the rows are the whole prompt: public prefix + segment (else: one generated token)
    max_tokens: int  # the request's generation budget

    @property
    def segment_rows(self) -> slice:
        """The rows of the participant's own segment (prefill), after the public prefix."""
        return slice(self.rows.start + self.session.prefix_len, self.rows.stop)


@dataclass(frozen=True)
class FedAttnBatch:
    entries: list[ParticipantRows]

    @classmethod
    def from_runner(cls, runner) -> FedAttnBatch | None:
        """The batch's participant requests (None when it has none)."""
        entries = []
        for params, start, end, local_start in scheduled_requests(runner):
            metadata = (params.extra_args or {}).get(METADATA_KEY) if params is not None else None
            if not isinstance(metadata, ParticipantMetadata):  # a plain request
                continue
            state = REGISTRY.get_or_create(metadata)
            n = metadata.participant
            prefill = local_start < state.request_len(n)
            if prefill and (local_start, end - start) != (0, state.request_len(n)):
                # A segment split across steps (chunked prefill, prefix caching) or recomputed after a
                # preemption: its sync layers cannot be reproduced, so the session fails (the engine lives on).
                REGISTRY.fail(state, f"participant {n}'s segment was not computed whole in one step (preempted or "
                                     "chunked)")
            if state.error is not None:
                continue
            entries.append(ParticipantRows(state, n, slice(start, end), prefill, params.max_tokens or 1))
        return cls(entries) if entries else None

    def global_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Public prefix at 0..P-1, segment tokens at offset_n + i, generated tokens at L, L+1, ... (out of place)."""
        positions = positions.clone()
        for e in self.entries:
            state, local = e.session, positions[e.rows]
            prefix, end = state.prefix_len, state.request_len(e.participant)
            shifted = torch.where(local < end, local - prefix + state.offset(e.participant),
                                  local - end + state.prompt_len)
            positions[e.rows] = torch.where(local < prefix, local, shifted)
        return positions


def current_batch() -> FedAttnBatch | None:
    return _current


@contextmanager
def active(batch: FedAttnBatch):
    global _current
    _current = batch
    try:
        yield
    finally:
        _current = None


def install_runner_hook() -> None:
    """Every forward of the model runner first maps its rows (`FedAttnBatch`) and moves the positions."""
    def hook(runner, positions, forward):
        batch = FedAttnBatch.from_runner(runner)
        if batch is None:
            return forward(positions)
        with active(batch):
            return forward(batch.global_positions(positions))

    install_forward_hook(hook)
