"""The offline API: `FederatedLLM(model).generate(sessions)` runs FedAttn sessions in one vLLM engine.

Colocated mode: every participant of every session is an ordinary request of this engine
whose prompt is only its own segment; the in-process K/V exchange couples them at sync
layers. Many sessions batch together in one call, admitted whole (see `admission`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence

from fedattn_vllm.admission import EngineCapacity, GangAdmission, SessionDemand
from fedattn_vllm.config import FedAttnConfig
from fedattn_vllm.plugin import FEDATTN_ARCHITECTURES
from fedattn_vllm.driver import SessionDriver
from fedattn_vllm.session import (FedAttnSession, FedAttnSessionError, GeneratorOutput, SessionCost, SessionResult,
                                  SessionRun)
from fedattn_vllm.vllm_ext.sessions import METADATA_KEY, ParticipantMetadata
from fedattn_vllm.vllm_ext.surface import (CPU_BINDING_ENV, ENGINE_ENV, EngineHandle, check_vllm, cpu_rank_binding,
                                          on_cpu)
from fedattn_vllm.vllm_ext.workers import Workers
DEFAULT_CPU_KV_CACHE_BYTES = 2 << 30  # vLLM's CPU default sizes the cache from free memory; several engines share it
# Engine arguments FedAttn needs: each segment is computed whole, in one step, at every layer.
_REQUIRED_ENGINE_ARGS = {"enable_prefix_caching": False, "enable_chunked_prefill": False}


class FedAttnEngineError(FedAttnSessionError):
    """An engine argument FedAttn cannot run with; `field` names it."""


class FederatedLLM:
    """A vLLM engine whose requests can be FedAttn participants.

    Colocated mode: `generate` runs whole sessions here. Every host (this, the server's engine
    thread, a federated engine server) drives sessions through a `SessionDriver`, which calls
    the primitives below (`plan_run`, `reserve`, `start`, `step`, `finish`); in federated mode
    the engine holds only its own participants, their K/V exchanged over the network.
    """

    def __init__(self, model: str = "default", **engine_args):
        check_vllm()
        for name, value in ENGINE_ENV.items():
            if os.environ.setdefault(name, value) != value:
                raise RuntimeError(f"FederatedLLM needs {name}={value} (the K/V exchange runs in the engine's process)")
        for name, value in _REQUIRED_ENGINE_ARGS.items():
            if engine_args.get(name, value) != value:
                raise FedAttnEngineError(name, f"must be {value} for FedAttn (each segment is computed whole)")
        from transformers import AutoConfig
        from vllm import LLM

        from fedattn_vllm.models import resolve_model
        from fedattn_vllm.plugin import register

        register()  # the entry point does this too; the engine lives in this process
        path = resolve_model(model, engine_args.get("revision"))
        hf_config = AutoConfig.from_pretrained(path)
        arch = (hf_config.architectures or ["?"])[0]
        if arch not in FEDATTN_ARCHITECTURES:
            raise FedAttnEngineError("model", f"architecture {arch} is not supported; one of {sorted(FEDATTN_ARCHITECTURES)}")
        self.model_path = str(path)
        self.num_layers = hf_config.num_hidden_layers
        self.num_heads = hf_config.num_attention_heads
        self.num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or self.num_heads
        # Without chunked prefill one step computes a whole sequence: the batch must hold the longest one.
        longest = engine_args.get("max_model_len") or getattr(hf_config, "max_position_embeddings", None) or 16384
        args = {"enforce_eager": True, "max_num_batched_tokens": max(16384, longest), **engine_args,
                **_REQUIRED_ENGINE_ARGS}
        args.pop("revision", None)  # `path` is that revision already
        self.tensor_parallel_size = args.get("tensor_parallel_size", 1)
        binding = None
        if on_cpu():
            if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
                args.setdefault("kv_cache_memory_bytes", DEFAULT_CPU_KV_CACHE_BYTES)
            if CPU_BINDING_ENV not in os.environ:
                binding = cpu_rank_binding(self.tensor_parallel_size)
        try:  # the binding only while this engine's workers start (another engine may have other ranks)
            if binding is not None:
                os.environ[CPU_BINDING_ENV] = binding
            self.llm = LLM(model=str(path), hf_overrides={"architectures": [FEDATTN_ARCHITECTURES[arch]]}, **args)
        finally:
            if binding is not None:
                os.environ.pop(CPU_BINDING_ENV, None)
        self.engine = EngineHandle(self.llm)
        self.workers = Workers(self.llm)  # FedAttn's state where the model runs (one worker per rank)
        if self.tensor_parallel_size > 1:  # the ranks are processes of their own: no compile inside a step
            self.workers.run_eager()
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.engine.max_model_len
        self.admission = GangAdmission(EngineCapacity(
            max_batched_tokens=self.engine.max_batched_tokens, max_seqs=self.engine.max_seqs,
            kv_blocks=self.engine.kv_blocks, block_size=self.engine.block_size,
        ))
        self._active: dict[str, SessionRun] = {}  # started sessions
        self._requests: dict[str, tuple[SessionRun, int]] = {}  # vLLM request id -> (its run, its participant)

    def encode(self, segment: str | Sequence[int], field: str) -> list[int]:
        """A segment (or the public prefix) as token ids; text is tokenized without special tokens.

        field: what to name in errors, e.g. "segments[2]".
        """
        if isinstance(segment, str):
            ids = self.tokenizer(segment, add_special_tokens=False)["input_ids"]
        elif isinstance(segment, (bytes, dict)) or not isinstance(segment, Sequence):
            raise FedAttnSessionError(field, "must be text or a list of token ids")
        else:
            ids = list(segment)
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < len(self.tokenizer) for t in ids):
                raise FedAttnSessionError(field, "token ids must be ints in the vocabulary")
        if not ids:
            raise FedAttnSessionError(field, "is empty")
        return ids

    def encode_prefix(self, prefix: str | Sequence[int] | None) -> list[int]:
        """The public prefix's token ids ([] for none)."""
        if prefix is None or (isinstance(prefix, (str, Sequence)) and len(prefix) == 0):
            return []
        return self.encode(prefix, "public_prefix")

    def plan_run(self, session_id: str, prompts: dict[int, list[int]], num_participants: int, config: FedAttnConfig,
                 sampling_params=None, prefix: list[int] = ()) -> SessionRun:
        """Validate this engine's part of a session (its participants' token ids); nothing is submitted yet."""
        from vllm import SamplingParams

        if not isinstance(config, FedAttnConfig):
            raise FedAttnSessionError("config", f"expected a FedAttnConfig, got {type(config).__name__}")
        params = sampling_params or SamplingParams(temperature=0.0, max_tokens=64)
        if not isinstance(params, SamplingParams):
            raise FedAttnSessionError("sampling_params", f"expected vllm.SamplingParams, got {type(params).__name__}")
        if params.n != 1:
            raise FedAttnSessionError("sampling_params.n", "FedAttn generators produce one completion each (n=1)")
        plan = config.resolve(self.num_layers, num_participants)
        hosted = sorted(prompts)
        own = len(prefix) + sum(len(prompts[n]) for n in hosted)
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - own  # a bound
        demand = SessionDemand(tuple(len(prefix) + len(prompts[n]) for n in hosted),
                               tuple(max_tokens if n in plan.generators else 1 for n in hosted))
        if (why := self.admission.why_never(demand)) is not None:
            raise FedAttnSessionError("segments", f"the session can never fit this engine: {why}")
        return SessionRun(session_id, {n: prompts[n] for n in hosted}, list(prefix), num_participants, params, plan,
                          demand)

    def check_lengths(self, run: SessionRun, lengths: list[int]) -> int:
        """Check every participant's segment length against the run and the model; the generators' max_tokens."""
        if len(lengths) != run.num_participants or any(lengths[n] != len(p) for n, p in run.prompts.items()):
            raise FedAttnSessionError("lengths", f"{lengths} do not match this engine's segments")
        prompt_len = len(run.prefix) + sum(lengths)
        max_tokens = run.sampling.max_tokens
        if max_tokens is None:
            max_tokens = self.max_model_len - prompt_len
        if prompt_len + max_tokens > self.max_model_len:
            raise FedAttnSessionError(
                "segments", f"{prompt_len} prompt tokens + max_tokens={max_tokens} exceed max_model_len={self.max_model_len}"
            )
        return max_tokens

    def _participant_params(self, run: SessionRun, lengths: list[int]) -> dict[int, object]:
        """Each hosted participant's SamplingParams, carrying the session's metadata."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        max_tokens = self.check_lengths(run, lengths)
        params = {}
        for n in run.prompts:
            if n in run.plan.generators:
                sp = run.sampling.clone()
                sp.max_tokens = max_tokens
                sp.output_kind = RequestOutputKind.CUMULATIVE  # the driver reports what is new past what it sent
            else:  # only prefills (vLLM samples one token, which is discarded)
                sp = SamplingParams(temperature=0.0, max_tokens=1)
            metadata = ParticipantMetadata(run.session_id, n, tuple(lengths), len(run.prefix), run.plan)
            sp.extra_args = {**(sp.extra_args or {}), METADATA_KEY: metadata}
            params[n] = sp
        return params

    def prepare(self, session: FedAttnSession) -> tuple[SessionRun, list[int]]:
        """Validate a whole session for colocated mode: its run and segment lengths; nothing is submitted yet."""
        if not isinstance(session, FedAttnSession):
            raise FedAttnSessionError("session", f"expected a FedAttnSession, got {type(session).__name__}")
        if isinstance(session.segments, (str, bytes)) or not session.segments:
            raise FedAttnSessionError("segments", "a session needs a list of at least one participant segment")
        prompts = {n: self.encode(s, f"segments[{n}]") for n, s in enumerate(session.segments)}
        run = self.plan_run(f"fedattn-{uuid.uuid4().hex}", prompts, len(prompts), session.config,
                            session.sampling_params, self.encode_prefix(session.public_prefix))
        lengths = [len(prompts[n]) for n in range(len(prompts))]
        self.check_lengths(run, lengths)
        return run, lengths

    # -- driving the engine ------------------------------------------------------------------
    def reserve(self, run: SessionRun) -> bool:
        """Hold room for the run if the next step can prefill it beside everything held (gang admission)."""
        return self.admission.try_reserve(run.session_id, run.demand, run.request_ids)

    def start(self, run: SessionRun, lengths: list[int]) -> None:
        """Hand a reserved run's requests to vLLM; `lengths` are every participant's segment lengths."""
        params = self._participant_params(run, lengths)
        self.engine.add([(run.request_id(n), run.prefix + run.prompts[n], sp) for n, sp in params.items()])
        for n in params:
            self._requests[run.request_id(n)] = (run, n)
        self.admission.start(run.session_id)
        run.started = True
        self._active[run.session_id] = run

    @property
    def busy(self) -> bool:
        return bool(self._active)

    @property
    def running(self) -> int:
        """Started sessions (a length: safe to read from another thread)."""
        return len(self._active)

    def holdings(self) -> dict:
        """What this engine holds now (counts only): session state, its paged keys' blocks, requests with reserved
        cache, vLLM's own."""
        return {"sessions": self.workers.sessions(), "paged_blocks": self.workers.paged_blocks(),
                "requests": self.admission.live_requests, "unfinished": self.engine.unfinished}

    def step(self, on_output=None) -> list[SessionRun]:
        """One engine step; returns the runs that completed or failed in it (finish them next).

        `on_output(session_id, participant, request_output)` sees every output of the step (streaming).
        """
        for output in self.engine.step():
            if output.request_id not in self._requests:  # late news of a request already finished or aborted
                continue
            run, n = self._requests[output.request_id]
            if on_output is not None:
                on_output(run.session_id, n, output)
            if output.finished:
                run.finished[n] = output
                self.admission.finished(output.request_id)
        self.admission.stepped()
        for session_id, error in (self.workers.failed(self._active) if self._active else {}).items():
            self._active[session_id].error = error
        done = [run for run in self._active.values() if run.done]
        for run in done:
            del self._active[run.session_id]
        return done

    def generate(self, sessions: Sequence[FedAttnSession], *, use_tqdm: bool = False) -> list[SessionResult]:
        """Run every session, batched together; one result per session, in order.

        Every session is validated before any runs. A session that fails while running
        (e.g. its K/V cannot be exchanged) gets `error` set; the others complete.
        """
        from tqdm import tqdm

        if self._active:
            raise RuntimeError("generate() is not reentrant: this engine is already running sessions")
        prepared = [self.prepare(s) for s in sessions]
        driver = SessionDriver(self)
        for run, lengths in prepared:
            driver.submit(run, lengths)
        results: dict[str, SessionResult] = {}
        with tqdm(total=len(prepared), desc="sessions", disable=not use_tqdm) as progress:
            try:
                while driver.holding:
                    for run, result in driver.advance().finished:
                        results[run.session_id] = result
                        progress.update()
            finally:
                driver.fail_all("generate() was interrupted")  # an exception left these behind
        return [results[run.session_id] for run, _ in prepared]

    def finish(self, run: SessionRun, error: str | None = None) -> SessionResult:
        """Abort what is left of the run (started or only reserved), free its K/V and account for it."""
        run.error = run.error or error
        self._active.pop(run.session_id, None)
        for request_id in run.request_ids:
            self._requests.pop(request_id, None)
        unfinished = [run.request_id(n) for n in run.prompts if n not in run.finished]
        try:
            if run.started and unfinished:
                self.engine.abort(unfinished)
            stats = self.workers.stats(run.session_id)
        finally:  # whatever failed above, the run holds nothing afterwards
            self.admission.cancel(run.session_id, run.request_ids)
            self.workers.release(run.session_id)
        participants = range(run.num_participants)
        cost = SessionCost(
            tokens=[len(run.prompts.get(n, ())) for n in participants],
            sync_layers=run.plan.sync_layers,
            published_bytes=[stats.published_bytes.get(n, 0) for n in participants],
            received_bytes=[stats.received_bytes.get(n, 0) for n in participants],
            prefix_tokens=len(run.prefix),
        )
        if run.error is not None:
            return SessionResult(outputs={}, cost=cost, error=run.error)
        outputs = {}
        for g in run.plan.generators:
            if g in run.finished:
                completion = run.finished[g].outputs[0]
                outputs[g] = GeneratorOutput(g, completion.text, list(completion.token_ids), completion.finish_reason,
                                             completion.logprobs)
        return SessionResult(outputs=outputs, cost=cost)

