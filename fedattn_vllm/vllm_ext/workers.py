"""The engine's view of FedAttn's worker-side state: one worker in the engine's process, or one per tensor-parallel
rank in vLLM's worker processes.

The sync-layer hook keeps its sessions (`sessions.REGISTRY`) where the model runs, in each worker; under tensor
parallelism every rank holds, publishes and fetches its own heads' K/V. The engine reads and frees that state
through vLLM's `collective_rpc`, which runs a function on every worker (a direct call for a worker in this
process) and returns each one's result, rank 0 first.
"""

from __future__ import annotations

from collections.abc import Callable

from fedattn_vllm.exchange import ExchangeStats, KVExchange, PayloadKind
from fedattn_vllm.vllm_ext.sessions import REGISTRY
from fedattn_vllm.vllm_ext.surface import run_eager, tensor_parallel_rank
from kernels.paged import blocks_in_use


def _failed(worker, session_ids: list[str]) -> dict[str, str]:
    return REGISTRY.failed(session_ids)


def _stats(worker, session_id: str) -> tuple[dict[int, int], dict[int, int]]:
    stats = REGISTRY.exchange.stats(session_id)
    return dict(stats.published_bytes), dict(stats.received_bytes)


def _release(worker, session_id: str) -> None:
    REGISTRY.release(session_id)


def _sessions(worker) -> int:
    return len(REGISTRY)


def _paged_blocks(worker) -> int:
    return blocks_in_use()


def _run_eager(worker) -> None:
    run_eager()


def _install(worker, make: Callable[[int, frozenset[PayloadKind]], KVExchange]) -> None:
    REGISTRY.exchange = make(tensor_parallel_rank(), REGISTRY.exchange.counted)


class Workers:
    """FedAttn's state in every worker of one `vllm.LLM`."""

    def __init__(self, llm):
        self._rpc = llm.collective_rpc

    def failed(self, session_ids) -> dict[str, str]:
        """The error of each of `session_ids` that failed on any worker (the lowest rank's, if several)."""
        errors: dict[str, str] = {}
        for failed in self._rpc(_failed, args=(list(session_ids),)):
            for session_id, error in failed.items():
                errors.setdefault(session_id, error)
        return errors

    def stats(self, session_id: str) -> ExchangeStats:
        """The session's payload bytes per participant, summed over the ranks (each moves its own heads')."""
        total = ExchangeStats()
        for published, received in self._rpc(_stats, args=(session_id,)):
            for n, nbytes in published.items():
                total.published_bytes[n] += nbytes
            for n, nbytes in received.items():
                total.received_bytes[n] += nbytes
        return total

    def release(self, session_id: str) -> None:
        """Free the session's state and K/V on every worker (idempotent)."""
        self._rpc(_release, args=(session_id,))

    def install_exchange(self, make: Callable[[int, frozenset[PayloadKind]], KVExchange]) -> None:
        """Give every worker the exchange `make(rank, kinds it counts)` (picklable: it travels to the workers)."""
        self._rpc(_install, args=(make,))

    def run_eager(self) -> None:
        """torch.compile off in every worker (`surface.run_eager`): for workers in processes of their own."""
        self._rpc(_run_eager)

    def sessions(self) -> int:
        """Sessions some worker still holds state of."""
        return max(self._rpc(_sessions))

    def paged_blocks(self) -> int:
        """Blocks of FedAttn's paged keys (kernels/paged.py) in use, over every worker."""
        return sum(self._rpc(_paged_blocks))
