"""Everything FedAttn reads or patches inside vLLM beyond its public API, and the vLLM series it was read from.

The public API (`LLM`, `SamplingParams`, `EngineArgs`, `ModelRegistry`, the model classes FedAttn
subclasses) is used where it is needed; what vLLM does not promise to keep lives here only:
  - the model runner: the batch's request order and row offsets (`scheduled_requests`) and the
    wrapper of `_model_forward` that rewrites positions (`install_forward_hook`);
  - the attention layers: their impls are swapped for subclasses (`swap_attention_impls`) whose
    `forward(layer, query, key, value, kv_cache, attn_metadata, output, ...)` runs the stock one first (or not,
    where FedAttn recomputes every row and the backend caches K/V outside it: `stock_forward_skippable`); on the
    CPU backend, its cache's block size and instruction set (`cpu_paging`), for its kernel;
  - tensor parallelism: the ranks' group, to choose tokens by scores over every rank's heads
    (`head_combine`), this worker's rank, and vLLM's split of the KV heads (`kv_head_span`,
    `replicates_kv_heads`);
  - the engine behind `LLM`: prompts as token ids in, one step, abort, capacity (`EngineHandle`), and
    the environment that keeps the engine core in this process (`ENGINE_ENV`).
`SUPPORTED_VLLM` is checked when the plugin registers (another series: FedAttn's models are not
registered and `FederatedLLM` raises `UntestedVLLMError`; FEDATTN_ALLOW_UNTESTED_VLLM=1 overrides, then
check the engine against the oracle: tests/test_engine.py). docs/engine.md says why vLLM's KV-connector
API does not replace these (evaluated on 0.32).
"""

from __future__ import annotations

import functools
import glob
import os
import re
from collections.abc import Callable, Iterator

import torch

SUPPORTED_VLLM = "0.32."  # the series whose internals this module reads
# The engine core runs in this process (so does its worker, and with it the K/V exchange, without tensor parallelism)
# and on the V1 model runner.
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_USE_V2_MODEL_RUNNER": "0"}
RUNNER_STATE = ("input_batch", "query_start_loc", "requests")  # what is read of the runner, besides request ids
_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


class UntestedVLLMError(RuntimeError):
    """The installed vLLM is not the series FedAttn's contact with its internals was written against."""


def unsupported_vllm(installed: str | None = None) -> str | None:
    """Why the installed vLLM cannot host FedAttn (None: it can)."""
    if installed is None:
        installed = installed_vllm()
    if installed.startswith(SUPPORTED_VLLM) or os.environ.get("FEDATTN_ALLOW_UNTESTED_VLLM") == "1":
        return None
    return (f"vllm {installed}: FedAttn reads model-runner and engine internals of vllm {SUPPORTED_VLLM}x only; "
            f"install vllm=={SUPPORTED_VLLM}* (or set FEDATTN_ALLOW_UNTESTED_VLLM=1 and check the results against "
            "the oracle: tests/test_engine.py)")


def installed_vllm() -> str:
    import vllm  # already imported wherever the plugin runs

    return vllm.__version__


def check_vllm() -> None:
    if (why := unsupported_vllm()) is not None:
        raise UntestedVLLMError(why)


def cpu_paging(layer, kv_cache, device) -> tuple[int, str] | None:
    """(block size, instruction set) of vLLM's CPU attention cache at `layer`, whose kernel then serves FedAttn's
    decode too (kernels/paged.py); None on other backends. The CPU backend's cache is (blocks, H_kv, block size,
    2 * D) and its builder sets `layer.isa`."""
    from kernels.paged import available

    isa = getattr(layer, "isa", None)
    if not isinstance(isa, str) or not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 4 \
            or not available(device.type):
        return None
    return kv_cache.shape[2], isa


def stock_forward_skippable(layer, impl) -> bool:
    """Whether a forward whose every row FedAttn recomputes can be skipped: `layer`'s backend writes the step's K/V
    into its cache before (not inside) the impl's forward, as the CPU backend does (`Attention.forward` calls
    `unified_kv_cache_update` first), and the CPU `impl` is a plain causal softmax (no sliding window, ALiBi,
    attention sinks or soft cap), which the paged recompute reproduces."""
    backend = getattr(layer, "attn_backend", None)
    return backend is not None and getattr(backend, "forward_includes_kv_cache_update", True) is False \
        and getattr(impl, "sliding_window", -1) in (None, -1) and getattr(impl, "alibi_slopes", None) is None \
        and getattr(impl, "sinks", None) is None and not getattr(impl, "logits_soft_cap", 0)


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


# -- the model runner ------------------------------------------------------------------------
def scheduled_requests(runner) -> Iterator[tuple[object, int, int, int]]:
    """(sampling params, first row, end row, tokens computed before this step) per request of the runner's
    batch, in row order."""
    if missing := [name for name in RUNNER_STATE if not hasattr(runner, name)]:
        raise UntestedVLLMError(f"vLLM's model runner has no {', '.join(missing)}: this vLLM is not the "
                                f"{SUPPORTED_VLLM}x series FedAttn reads")
    batch = runner.input_batch
    starts = runner.query_start_loc.np
    for i, req_id in enumerate(batch.req_ids[: batch.num_reqs]):
        yield (runner.requests[req_id].sampling_params, int(starts[i]), int(starts[i + 1]),
               int(batch.num_computed_tokens_cpu[i]))


def install_forward_hook(hook: Callable) -> None:
    """Wrap the model runner's `_model_forward` (meant for overriding) once per process:
    `hook(runner, positions, forward)` runs the model, `forward(positions)` being vLLM's own call."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._model_forward
    if getattr(original, "_fedattn", False):
        return
    check_vllm()

    def _model_forward(self, input_ids=None, positions=None, *args, **kwargs):
        return hook(self, positions, lambda moved: original(self, input_ids, moved, *args, **kwargs))

    _model_forward._fedattn = True
    GPUModelRunner._model_forward = _model_forward


# -- tensor parallelism -----------------------------------------------------------------------
CPU_BINDING_ENV = "VLLM_CPU_OMP_THREADS_BIND"  # the CPUs of each rank's OpenMP threads, "0-3|4-7"


def run_eager() -> None:
    """torch.compile off in this process: vLLM's helpers that still compile under `enforce_eager` (under tensor
    parallelism the vocab-parallel embedding's input masking, at every rank's first step; logprob counting at the
    first request for logprobs) run as the plain torch ops they are. Compiled just in time, they would run inside
    a step, and in federated mode every other party of that step's sessions waits on it: a TP = 2 engine's first
    step took 118 s on a loaded 2-core machine with a cold inductor cache (one rank building and probing C++, its
    peer spinning in the all-reduce). Only for processes FedAttn owns (a rank, a federated engine)."""
    import torch._dynamo

    torch._dynamo.config.disable = True


def cpu_rank_binding(ranks: int) -> str | None:
    """This process's CPUs split evenly among `ranks` CPU workers where vLLM's own choice ("auto", a NUMA node per
    rank) would refuse them for want of nodes; None where it would not."""
    if ranks == 1 or len(glob.glob("/sys/devices/system/node/node[0-9]*")) >= ranks:
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < ranks:
        raise ValueError(f"tensor_parallel_size {ranks}: only {len(cpus)} CPUs (one at least per rank)")
    share = len(cpus) // ranks
    return "|".join(",".join(map(str, cpus[r * share:(r + 1) * share])) for r in range(ranks))


@functools.cache
def head_combine():
    """selection.HeadCombine over this worker's tensor-parallel group (None with one rank): every rank holds some
    heads, and all of them must choose the same tokens. Gathered through vLLM's own group, then summed (or maxed)
    here in rank order: the same result, bit for bit, on every rank."""
    from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group

    if get_tensor_model_parallel_world_size() == 1:
        return None
    group = get_tp_group()

    def combine(score: torch.Tensor, op: str) -> torch.Tensor:
        every = group.all_gather(score.contiguous()[None], dim=0)  # (ranks, length)
        return every.sum(dim=0) if op == "sum" else every.amax(dim=0)

    return combine


@functools.cache
def rank_agreement():
    """agree(ok, device) -> whether `ok` holds on every rank of this worker's tensor-parallel group (None with one
    rank), through vLLM's own group: a check that sees only this rank's heads must fail a session on every rank or
    on none, since the ranks meet in collectives in the same order (vLLM's all-reduces, selection's all-gathers)."""
    from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group

    if get_tensor_model_parallel_world_size() == 1:
        return None
    group = get_tp_group()

    def agree(ok: bool, device: torch.device) -> bool:  # float32: vLLM's CPU all-gather takes no integers
        return bool(group.all_gather(torch.tensor([float(ok)], device=device), dim=0).min() > 0)

    return agree


def kv_head_span(rank: int, ranks: int, kv_heads: int) -> tuple[int, int]:
    """(first KV head, KV heads) that tensor-parallel `rank` of `ranks` holds: vLLM's split, contiguous blocks, and
    with more ranks than KV heads one head copied to ranks // kv_heads consecutive ranks."""
    if ranks <= kv_heads:
        return rank * (kv_heads // ranks), kv_heads // ranks
    return rank // (ranks // kv_heads), 1


def replicates_kv_heads(vllm_config) -> bool:
    """Whether this worker's K/V heads are a copy of a lower rank's."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    rank, ranks = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    heads = vllm_config.model_config.get_total_num_kv_heads()
    return rank > 0 and kv_head_span(rank, ranks, heads) == kv_head_span(rank - 1, ranks, heads)


def tensor_parallel_rank() -> int:
    from vllm.distributed import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()


# -- the attention layers --------------------------------------------------------------------
def swap_attention_impls(model, impl_class: Callable[[type], type]) -> None:
    """Give every attention layer of `model` the impl class `impl_class(stock class)`, its index as
    `fedattn_layer` (a direct subclass: same object layout, so the class is swapped in place)."""
    from vllm.model_executor.layers.attention.attention import Attention

    for module in model.modules():
        if isinstance(module, Attention):
            module.impl.__class__ = impl_class(type(module.impl))
            module.impl.fedattn_layer = int(_LAYER_INDEX.search(module.layer_name).group(1))


# -- the engine ------------------------------------------------------------------------------
class EngineHandle:
    """The engine behind a `vllm.LLM`, driven step by step with prompts as token ids."""

    def __init__(self, llm):
        self._engine = llm.llm_engine
        config = self._engine.vllm_config
        self.max_model_len: int = config.model_config.max_model_len
        self.max_batched_tokens: int = config.scheduler_config.max_num_batched_tokens
        self.max_seqs: int = config.scheduler_config.max_num_seqs
        self.kv_blocks: int = config.cache_config.num_gpu_blocks
        self.block_size: int = config.cache_config.block_size

    def add(self, requests: list[tuple[str, list[int], object]]) -> None:
        """(request id, prompt token ids, SamplingParams) each: all of them, or (raising) none."""
        inputs = self._engine.renderer.render_cmpl([{"prompt_token_ids": ids} for _, ids, _ in requests])
        added = []
        try:
            for (request_id, _, params), engine_input in zip(requests, inputs):
                self._engine.add_request(request_id, engine_input, params)
                added.append(request_id)
        except BaseException:
            if added:
                self._engine.abort_request(added)
            raise

    def step(self) -> list:
        """One engine step: the RequestOutputs it produced."""
        return self._engine.step()

    def abort(self, request_ids: list[str]) -> None:
        self._engine.abort_request(request_ids)

    @property
    def unfinished(self) -> int:
        return self._engine.get_num_unfinished_requests()
