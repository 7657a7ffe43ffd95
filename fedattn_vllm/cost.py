"""The spec's analytic cost model: upload/download bytes, prefill FLOPs and K/V memory per participant."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedattn_vllm.config import FedAttnPlan, KVWire
from fedattn_vllm.kv_wire import payload_bytes
from fedattn_vllm.selection import question_bytes


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int  # d
    intermediate_size: int  # d_ff (SwiGLU)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    bytes_per_element: int

    @classmethod
    def from_hf_config(cls, config, dtype: torch.dtype | None = None) -> ModelShape:
        """Read the shape from a Hugging Face config; element size from `dtype` or the config's dtype."""
        config = config.get_text_config(decoder=True)
        dtype = dtype or getattr(config, "dtype", None) or torch.bfloat16
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            bytes_per_element=torch.empty((), dtype=dtype).element_size(),
        )

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """K and V of one token at one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.bytes_per_element

    def shared_layer_bytes(self, tokens: int, wire: KVWire) -> int:
        """K and V of `tokens` shared tokens at one layer, as encoded for the exchange."""
        return payload_bytes(wire, tokens, self.num_kv_heads, self.head_dim, self.bytes_per_element)

    def question_bytes(self, generator_tokens: int) -> int:
        """A generator's question queries at one layer (question selection), in the engine's dtype."""
        return question_bytes(generator_tokens, self.num_heads, self.head_dim, self.bytes_per_element)

    def layer_flops(self, t_q: int, t_kv: int) -> int:
        """2*T_q*d^2*(2+2r) + 4*T_q*T_kv*d + 6*T_q*d*d_ff, r = KV heads / query heads."""
        d, r = self.hidden_size, self.num_kv_heads / self.num_heads
        return round(2 * t_q * d * d * (2 + 2 * r) + 4 * t_q * t_kv * d + 6 * t_q * d * self.intermediate_size)


@dataclass(frozen=True)
class ParticipantCost:
    tokens: int  # L_n
    sync_layers: int  # layers at which it publishes
    upload_bytes: int  # K/V it publishes, and a generator's question queries (question selection)
    download_bytes: int  # foreign K/V it needs (earlier participants; everyone if it generates), questions
    prefill_flops: int  # attention + MLP over its own tokens
    kv_cache_bytes: int  # own K/V at every layer + the foreign K/V it holds


def participant_costs(shape: ModelShape, plan: FedAttnPlan, lengths: list[int],
                      prefix_len: int = 0) -> list[ParticipantCost]:
    """Modelled costs of one session's prefill for each participant.

    prefix_len: public prefix tokens every participant computes itself (never exchanged).
    """
    assert len(lengths) == plan.num_participants and shape.num_layers == plan.num_layers
    per_token = shape.kv_bytes_per_token_layer
    n_all = range(len(lengths))
    shared = [plan.shared_count(m, lengths[m]) for m in n_all]
    layer_bytes = [shape.shared_layer_bytes(shared[m], plan.config.kv_wire) for m in n_all]
    layers = range(shape.num_layers)
    costs = []
    for n, length in enumerate(lengths):
        own = prefix_len + length
        # (source, layer) pairs of foreign K/V that n fetches: in prefill, and in decode if it generates
        fetched = [(m, l) for m in n_all for l in range(shape.num_layers) if plan.reads(n, m, l)]
        flops = 0
        attended = prefix_len + plan.kept_count(length)  # own keys: all but what sparse local computation skips
        for layer in range(shape.num_layers):
            # The paper's key length at a layer: own tokens plus every foreign token n can see there,
            # earlier or later (L when dense), not only the causal part.
            foreign = sum(shared[m] for m in n_all if plan.sees(n, m, layer, prefill=False))
            flops += shape.layer_flops(own, attended + foreign)
        costs.append(
            ParticipantCost(
                tokens=length,
                sync_layers=len(plan.publish_layers[n]),
                upload_bytes=len(plan.publish_layers[n]) * layer_bytes[n]
                # question selection: a generator sends its queries once a layer, to every publisher that asks
                + sum(1 for l in layers if plan.question_readers(n, l, lengths)) * shape.question_bytes(length),
                download_bytes=sum(layer_bytes[m] for m, _ in fetched)
                + sum(shape.question_bytes(lengths[g]) for l in layers for g in plan.asks(n, l, length)),
                prefill_flops=flops,
                # foreign K/V is held decoded, in the engine's dtype
                kv_cache_bytes=shape.num_layers * own * per_token + sum(shared[m] for m, _ in fetched) * per_token,
            )
        )
    return costs


def centralised_prefill_flops(shape: ModelShape, prompt_len: int) -> int:
    """Ordinary inference on the whole concatenated prompt (the paper's baseline)."""
    return shape.num_layers * shape.layer_flops(prompt_len, prompt_len)
