"""FedAttnConfig: a session's FedAttn settings, validated once; FedAttnPlan: resolved for a model and N.

Participants are indexed 0..N-1 in prompt order; negative indices count from the end
(-1 is the last participant, the paper's question holder).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from enum import Enum
from functools import cached_property

import torch

from fedattn_vllm.schedule import Placement, resolve_sync_layers
from fedattn_vllm.selection import SELECTORS, HeadCombine, kept_count


class FedAttnConfigError(ValueError):
    """A FedAttn setting is invalid; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


MAX_SEED = 1 << 63  # seeds reach torch and vLLM, which take signed 64-bit integers
MAX_INTERVAL = 1 << 20  # intervals and layer indices: far beyond any model's depth, well inside vLLM's integers


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_ratio(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FedAttnConfigError(name, f"must be a number in (0, 1], got {value!r}")
    if not 0.0 < value <= 1.0:
        raise FedAttnConfigError(name, f"must be in (0, 1], got {value!r}")
    return float(value)


def _check_interval(name: str, value: object) -> int:
    if not _is_int(value) or not 1 <= value <= MAX_INTERVAL:
        raise FedAttnConfigError(name, f"must be an int in [1, {MAX_INTERVAL}], got {value!r}")
    return value


def _check_index(name: str, value: object, n: int | None = None) -> int:
    if not _is_int(value) or not -MAX_INTERVAL <= value < MAX_INTERVAL:
        raise FedAttnConfigError(name, f"must be a participant index (int), got {value!r}")
    if n is not None and not -n <= value < n:
        raise FedAttnConfigError(name, f"participant {value} out of range for {n} participants")
    return value if n is None else value % n


class KVWire(str, Enum):
    """How shared K/V travel between participants (beyond the paper)."""

    NATIVE = "native"  # the engine's dtype, exact
    INT8 = "int8"  # int8 with float32 scales: ~1.9x fewer bytes than bf16, lossy
    INT4 = "int4"  # 4-bit codes with float16 scales and minima per group: ~3.6x fewer than bf16
    K4V2 = "k4v2"  # 4-bit keys, 2-bit values (keys carry the outliers): ~4.3x fewer than bf16
    INT2 = "int2"  # 2-bit codes in smaller groups: ~5.3x fewer than bf16


@dataclass(frozen=True, slots=True)
class FedAttnConfig:
    """Everything that decides a FedAttn session's semantics besides the segments themselves."""

    sync_interval: int = 4  # H: the uniform schedule syncs layers with l % H == 0
    placement: Placement = Placement.UNIFORM
    sync_layers: tuple[int, ...] | None = None  # the layers, with placement="explicit" only
    kv_share_ratio: float | tuple[float, ...] = 1.0  # fraction of tokens shared, global or per participant
    kv_selection: str = "random"  # name in fedattn_vllm.selection.SELECTORS
    local_keep_ratio: float = 1.0  # sparse local computation: fraction of own tokens attended to
    publisher: int = -1  # the question holder
    publisher_sync_interval: int | None = None  # H_p < H: the publisher shares more often
    generators: tuple[int, ...] = (-1,)  # participants that decode an answer
    # H_g (beyond the paper): generators also read foreign K/V at every layer l % H_g == 0 (None: at S only)
    generator_sync_interval: int | None = None
    seed: int = 0  # seeds every random selection of the session
    kv_wire: KVWire = KVWire.NATIVE  # encoding of the shared K/V (quantised: fewer bytes, lossy; kv_wire.py)

    def __post_init__(self) -> None:
        def set_(name: str, value: object) -> None:  # frozen: normalise via object.__setattr__
            object.__setattr__(self, name, value)

        _check_interval("sync_interval", self.sync_interval)
        try:
            set_("placement", Placement(self.placement))
        except ValueError:
            names = ", ".join(p.value for p in Placement)
            raise FedAttnConfigError("placement", f"unknown {self.placement!r}; one of {names}") from None
        if self.placement is Placement.EXPLICIT:
            if not isinstance(self.sync_layers, (list, tuple)):
                raise FedAttnConfigError("sync_layers", "placement 'explicit' needs a list of layers")
            layers = tuple(self.sync_layers)
            if not all(_is_int(l) and 0 <= l < MAX_INTERVAL for l in layers):
                raise FedAttnConfigError("sync_layers", f"must be layer indices >= 0, got {layers!r}")
            if len(set(layers)) != len(layers):
                raise FedAttnConfigError("sync_layers", f"has duplicates: {layers!r}")
            set_("sync_layers", tuple(sorted(layers)))
        elif self.sync_layers is not None:
            raise FedAttnConfigError("sync_layers", "is only allowed with placement 'explicit'")
        if isinstance(self.kv_share_ratio, (list, tuple)):
            if not self.kv_share_ratio:
                raise FedAttnConfigError("kv_share_ratio", "per-participant list is empty")
            set_("kv_share_ratio", tuple(_check_ratio("kv_share_ratio", r) for r in self.kv_share_ratio))
        else:
            set_("kv_share_ratio", _check_ratio("kv_share_ratio", self.kv_share_ratio))
        if not isinstance(self.kv_selection, str) or self.kv_selection not in SELECTORS:
            raise FedAttnConfigError("kv_selection", f"unknown {self.kv_selection!r}; one of {sorted(SELECTORS)}")
        set_("local_keep_ratio", _check_ratio("local_keep_ratio", self.local_keep_ratio))
        if SELECTORS[self.kv_selection].needs_queries and self.local_keep_ratio != 1.0:
            raise FedAttnConfigError("local_keep_ratio", f"{self.kv_selection!r} selection chooses shared tokens only")
        _check_index("publisher", self.publisher)
        if self.publisher_sync_interval is not None:
            _check_interval("publisher_sync_interval", self.publisher_sync_interval)
            if self.placement is Placement.EXPLICIT:
                raise FedAttnConfigError("publisher_sync_interval", "needs an interval placement, not 'explicit'")
        if self.generator_sync_interval is not None:
            _check_interval("generator_sync_interval", self.generator_sync_interval)
        if isinstance(self.generators, (str, bytes)) or not hasattr(self.generators, "__iter__"):
            raise FedAttnConfigError("generators", f"must be a list of participant indices, got {self.generators!r}")
        generators = tuple(_check_index("generators", g) for g in self.generators)
        if not generators:
            raise FedAttnConfigError("generators", "at least one participant must generate")
        set_("generators", generators)
        if not _is_int(self.seed) or not 0 <= self.seed < MAX_SEED:
            raise FedAttnConfigError("seed", f"must be an int in [0, 2**63), got {self.seed!r}")
        try:
            set_("kv_wire", KVWire(self.kv_wire))
        except ValueError:
            names = ", ".join(w.value for w in KVWire)
            raise FedAttnConfigError("kv_wire", f"unknown {self.kv_wire!r}; one of {names}") from None

    def to_dict(self) -> dict:
        """Plain msgpack/JSON-able values (the config travels in SamplingParams.extra_args and on the wire)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, Enum) else (list(value) if isinstance(value, tuple) else value)
        return out

    def sync_layers_for(self, num_layers: int, interval: int | None = None) -> tuple[int, ...]:
        """The concrete sync-layer set S for a model of `num_layers` layers."""
        if not _is_int(num_layers) or num_layers < 1:
            raise FedAttnConfigError("num_layers", f"must be an int >= 1, got {num_layers!r}")
        if self.placement is Placement.EXPLICIT and any(l >= num_layers for l in self.sync_layers):
            raise FedAttnConfigError("sync_layers", f"{self.sync_layers!r} exceed a {num_layers}-layer model")
        return resolve_sync_layers(num_layers, interval or self.sync_interval, self.placement, self.sync_layers)

    def resolve(self, num_layers: int, num_participants: int) -> FedAttnPlan:
        """Bind the config to a model depth and a participant count."""
        n = num_participants
        if not _is_int(n) or n < 1:
            raise FedAttnConfigError("participants", f"need at least one participant, got {n!r}")
        base = frozenset(self.sync_layers_for(num_layers))
        publisher = _check_index("publisher", self.publisher, n)
        share_layers = [base] * n
        if self.publisher_sync_interval is not None:
            share_layers[publisher] = frozenset(self.sync_layers_for(num_layers, self.publisher_sync_interval))
        hg = self.generator_sync_interval
        generator_layers = frozenset(range(0, num_layers, hg)) if hg is not None else frozenset()
        if isinstance(self.kv_share_ratio, tuple):
            if len(self.kv_share_ratio) != n:
                raise FedAttnConfigError(
                    "kv_share_ratio", f"has {len(self.kv_share_ratio)} ratios for {n} participants"
                )
            share_ratios = self.kv_share_ratio
        else:
            share_ratios = (self.kv_share_ratio,) * n
        generators = tuple(sorted({_check_index("generators", g, n) for g in self.generators}))
        return FedAttnPlan(
            config=self,
            num_layers=num_layers,
            num_participants=n,
            share_layers=tuple(share_layers),
            generator_layers=generator_layers,
            share_ratios=share_ratios,
            generators=generators,
            publisher=publisher,
        )


# The best point measured on the cross-party recall frontier (RESULTS.md): every layer synced with K/V on
# the wire as 4-bit keys and 2-bit values (beyond the paper), a quarter of exact full sync's bytes. The
# generators' every-layer reading (generator_sync_interval=1) adds nothing at H=1; it is kept so that a
# setting which raises sync_interval still lets the generators read everyone at every layer. The server's
# and the demo's multi-party default; FedAttnConfig() stays the paper's.
RECOMMENDED = FedAttnConfig(sync_interval=1, generator_sync_interval=1, kv_wire=KVWire.K4V2)


@dataclass(frozen=True)
class FedAttnPlan:
    """A config bound to a model depth and N participants: who shares what, where."""

    config: FedAttnConfig
    num_layers: int
    num_participants: int
    share_layers: tuple[frozenset[int], ...]  # per participant: the paper's layers, where everyone reads it
    generator_layers: frozenset[int]  # where generators also read everyone (generator_sync_interval)
    share_ratios: tuple[float, ...]  # per participant
    generators: tuple[int, ...]
    publisher: int
    _selection_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def sees(self, viewer: int, source: int, layer: int, prefill: bool) -> bool:
        """Whether `viewer`'s queries attend to `source`'s shared K/V at `layer`: the one visibility rule.

        At `source`'s share layers everyone reads it; generators also read it at the generator
        layers. In prefill only earlier participants are visible (causal); a generator's decoded
        tokens see everyone. A participant's own tokens are not foreign (always visible to it).
        """
        if source == viewer or (prefill and source > viewer):
            return False
        return layer in self.share_layers[source] or (viewer in self.generators and layer in self.generator_layers)

    def reads(self, viewer: int, source: int, layer: int) -> bool:
        """Whether `viewer` ever needs `source`'s K/V at `layer`: in its prefill, or its decode if it generates."""
        return self.sees(viewer, source, layer, prefill=True) or (
            viewer in self.generators and self.sees(viewer, source, layer, prefill=False)
        )

    @cached_property
    def publish_layers(self) -> tuple[frozenset[int], ...]:
        """Per participant: the layers it publishes K/V at (its share layers, as the paper counts them
        even where nobody reads; the generator layers where some other participant reads them)."""
        return tuple(
            self.share_layers[m] | frozenset(
                l for l in self.generator_layers if any(self.reads(v, m, l) for v in self.generators)
            )
            for m in range(self.num_participants)
        )

    @cached_property
    def sync_layers(self) -> tuple[int, ...]:
        """Layers at which anyone shares."""
        return tuple(sorted(frozenset().union(*self.publish_layers)))

    def publishes(self, participant: int, layer: int) -> bool:
        return layer in self.publish_layers[participant]

    def _select(
        self, purpose: str, participant: int, layer: int, length: int, ratio: float,
        keys: torch.Tensor | None, queries: torch.Tensor | None = None, combine: HeadCombine | None = None,
    ) -> torch.Tensor | None:
        count = kept_count(length, ratio)
        if count == length:
            return None
        selector = SELECTORS[self.config.kv_selection]
        choose = functools.partial(selector.select, length, count, seed=self.config.seed, participant=participant,
                                   layer=layer, purpose=purpose, keys=keys, queries=queries,
                                   combine=combine)
        if selector.needs_keys:  # depends on the data: nothing to cache
            return choose()
        key = (purpose, participant, layer, length)
        if key not in self._selection_cache:
            self._selection_cache[key] = choose()
        return self._selection_cache[key]

    def shared_positions(
        self, participant: int, layer: int, length: int, keys: torch.Tensor | None = None,
        queries: torch.Tensor | None = None, combine: HeadCombine | None = None,
    ) -> torch.Tensor | None:
        """Segment positions whose K/V `participant` shares at a sync `layer` (None: all of them).

        keys: the participant's post-RoPE keys at `layer` (length, H_kv, D), for a selector that needs them;
        queries: the question queries of `question_askers(participant)` at `layer` (rows, H, D), scaled;
        combine: joins scores over these heads with the other tensor-parallel ranks' (selection.HeadCombine).
        """
        return self._select("share", participant, layer, length, self.share_ratios[participant], keys, queries,
                            combine)

    def kept_positions(
        self, participant: int, layer: int, length: int, keys: torch.Tensor | None = None,
        combine: HeadCombine | None = None,
    ) -> torch.Tensor | None:
        """Sparse local computation: own positions attended to at `layer` (None: all of them)."""
        return self._select("keep", participant, layer, length, self.config.local_keep_ratio, keys, None, combine)

    @property
    def selection_needs_keys(self) -> bool:
        return SELECTORS[self.config.kv_selection].needs_keys

    @property
    def selection_needs_queries(self) -> bool:
        return SELECTORS[self.config.kv_selection].needs_queries

    def question_askers(self, participant: int) -> tuple[int, ...]:
        """Generators whose question queries choose what `participant` shares (question selection)."""
        return tuple(g for g in self.generators if g != participant)

    def asks(self, participant: int, layer: int, length: int | None = None) -> tuple[int, ...]:
        """Generators whose question queries `participant` (of `length` tokens) receives at `layer`: those
        of question selection, at a layer where it publishes fewer than all of its tokens (`length` None: not
        known, as at the coordinator: wherever it publishes with a share ratio below 1)."""
        if length is None:
            sparse = self.share_ratios[participant] < 1
        else:
            sparse = self.shared_count(participant, length) < length
        if not (self.selection_needs_queries and self.publishes(participant, layer) and sparse):
            return ()
        return self.question_askers(participant)

    def question_readers(self, generator: int, layer: int, lengths: Sequence[int | None]) -> tuple[int, ...]:
        """Participants that receive `generator`'s question queries at `layer` (it sends them once a layer)."""
        return tuple(p for p, length in enumerate(lengths) if generator in self.asks(p, layer, length))

    def shared_count(self, participant: int, length: int) -> int:
        """Tokens `participant` shares at each of its sync layers."""
        return kept_count(length, self.share_ratios[participant])

    def kept_count(self, length: int) -> int:
        """Own segment tokens a participant of `length` attends to at each layer (sparse local computation)."""
        return kept_count(length, self.config.local_keep_ratio)
