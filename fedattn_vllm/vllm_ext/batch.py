"""Which rows of a vLLM batch belong to which FedAttn participant; global positions.

Built once per forward from the model runner (the only place that knows the request
order) and made current for the duration of the model call.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fedattn_vllm.vllm_ext.sessions import METADATA_KEY, REGISTRY, ParticipantMetadata, SessionState

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
        if missing := [name for name in RUNNER_STATE if not hasattr(runner, name)]:
            raise UntestedVLLMError(f"vLLM's model runner has no {', '.join(missing)}: this vLLM is not the "
                                    f"{TESTED_VLLM}x series FedAttn reads")
        batch = runner.input_batch
        starts = runner.query_start_loc.np
        entries = []
        for i, req_id in enumerate(batch.req_ids[: batch.num_reqs]):
            params = runner.requests[req_id].sampling_params
            metadata = (params.extra_args or {}).get(METADATA_KEY) if params is not None else None
            if not isinstance(metadata, ParticipantMetadata):  # a plain request
                continue
            state = REGISTRY.get_or_create(metadata)
            n = metadata.participant
            start, end = int(starts[i]), int(starts[i + 1])
            local_start = int(batch.num_computed_tokens_cpu[i])
            prefill = local_start < state.request_len(n)
            if prefill and (local_start, end - start) != (0, state.request_len(n)):
                # A segment split across steps (chunked prefill, prefix caching) or recomputed after a
                # preemption: its sync layers cannot be reproduced, so the session fails (the engine lives on).
                state.fail(f"participant {n}'s segment was not computed whole in one step (preempted or chunked)")
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


TESTED_VLLM = "0.32."  # the vLLM series whose model runner internals `from_runner` reads
RUNNER_STATE = ("input_batch", "query_start_loc", "requests")  # what it reads of the runner, besides the request ids


class UntestedVLLMError(RuntimeError):
    """The installed vLLM is not the series the runner hook was written against."""


def check_vllm_version(version: str, allow_untested: bool) -> None:
    if not version.startswith(TESTED_VLLM) and not allow_untested:
        raise UntestedVLLMError(
            f"vllm {version}: FedAttn's runner hook reads model-runner internals of vllm {TESTED_VLLM}x only; "
            f"install vllm=={TESTED_VLLM}* (or set FEDATTN_ALLOW_UNTESTED_VLLM=1 and check the results against "
            "the oracle: tests/test_engine.py)")


def install_runner_hook() -> None:
    """Wrap the model runner's `_model_forward` (meant for overriding) once per process."""
    import vllm
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._model_forward
    if getattr(original, "_fedattn", False):
        return
    check_vllm_version(vllm.__version__, os.environ.get("FEDATTN_ALLOW_UNTESTED_VLLM") == "1")

    def _model_forward(self, input_ids=None, positions=None, *args, **kwargs):
        batch = FedAttnBatch.from_runner(self)
        if batch is None:
            return original(self, input_ids, positions, *args, **kwargs)
        with active(batch):
            return original(self, input_ids, batch.global_positions(positions), *args, **kwargs)

    _model_forward._fedattn = True
    GPUModelRunner._model_forward = _model_forward
