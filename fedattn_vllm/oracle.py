"""The reference oracle: FedAttn as a plain Hugging Face masked simulation of the spec.

All participants' tokens run through the stock HF decoder layers as one sequence at
global positions; each layer gets its own attention mask saying which keys a query may
see (own tokens always; foreign tokens only where their owner shares at that layer).
Each generator then decodes greedily with a KV cache. Every other mode is judged
against this module, so it favours obviousness over speed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from fedattn_vllm.config import FedAttnConfig, FedAttnConfigError, FedAttnPlan, KVWire
from fedattn_vllm.selection import QUESTION_ROWS

Tokens = list[int]


@dataclass
class OracleOutput:
    tokens: dict[int, Tokens]  # generator -> greedy tokens
    first_logits: dict[int, torch.Tensor]  # generator -> (V,) logits of its first new token
    prompt_logits: torch.Tensor | None = None  # (L, V), if asked for
    hidden_states: torch.Tensor | None = None  # (M+1, L, d): embeddings, then each layer's output
    sync_layers: tuple[int, ...] = field(default=())


class _Visibility:
    """Per-layer key visibility over the prompt tokens, from a plan, the segment lengths and the public prefix.

    Token owners: the public prefix (positions 0..P-1, owner N), which every participant computes
    itself and sees at every layer, then participants 0..N-1 in order.
    """

    def __init__(self, plan: FedAttnPlan, lengths: list[int], prefix_len: int = 0):
        n = len(lengths)
        self.public = n
        self.owner = torch.repeat_interleave(torch.tensor([n, *range(n)]), torch.tensor([prefix_len, *lengths]))  # (L,)
        self.plan = plan
        self.lengths = lengths
        self.offsets = [prefix_len + sum(lengths[:m]) for m in range(n)]
        self._keys: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _positions_mask(self, participant: int, positions: torch.Tensor | None) -> torch.Tensor:
        """(L,) bool: the given segment positions of `participant` (None: all of its tokens)."""
        mask = self.owner == participant
        if positions is not None:
            mask = torch.zeros_like(mask)
            mask[self.offsets[participant] + positions] = True
        return mask

    def _segment(self, n: int, rows: torch.Tensor) -> torch.Tensor:
        return rows[self.offsets[n]: self.offsets[n] + self.lengths[n]]

    def questions(self, participant: int, layer_queries: torch.Tensor) -> torch.Tensor:
        """(rows, H, D): the question queries of the generators that choose what `participant` shares."""
        return torch.cat([self._segment(g, layer_queries)[-QUESTION_ROWS:]
                          for g in self.plan.question_askers(participant)] or [layer_queries[:0]])

    def keys(
        self, layer: int, layer_keys: torch.Tensor | None = None, layer_queries: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(L,) bools: keys visible to their owner, and keys their owner shares at `layer` (public: both).

        layer_keys (L, H_kv, D), layer_queries (L, H, D, scaled): every prompt token's post-RoPE key
        and query at `layer`, for a selector that reads them.
        """
        if layer in self._keys:
            return self._keys[layer]
        own = self.owner == self.public
        shared = own.clone()
        for n, length in enumerate(self.lengths):
            keys = None if layer_keys is None else self._segment(n, layer_keys)
            own |= self._positions_mask(n, self.plan.kept_positions(n, layer, length, keys))
            if self.plan.publishes(n, layer):
                queries = None if layer_queries is None else self.questions(n, layer_queries)
                shared |= self._positions_mask(n, self.plan.shared_positions(n, layer, length, keys, queries))
        self._keys[layer] = own, shared
        return own, shared

    def _sees(self, layer: int, prefill: bool) -> torch.Tensor:
        """(N+1, N+1) bool [viewer owner, source owner]: foreign visibility (the plan's rule; public: always)."""
        n = self.public
        pair = torch.tensor([[self.plan.sees(v, m, layer, prefill) for m in range(n)] for v in range(n)],
                            dtype=torch.bool).reshape(n, n)
        pair = torch.cat([pair, torch.ones(n, 1, dtype=torch.bool)], dim=1)  # everyone sees the prefix
        return torch.cat([pair, torch.zeros(1, n + 1, dtype=torch.bool)])  # the prefix sees only itself

    def prefill_mask(
        self, layer: int, layer_keys: torch.Tensor | None = None, layer_queries: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(L, L) bool [query, key]: causal, own kept tokens, visible foreign shared tokens, and itself."""
        own, shared = self.keys(layer, layer_keys, layer_queries)
        length = self.owner.numel()
        same = self.owner[:, None] == self.owner[None, :]
        foreign = self._sees(layer, prefill=True)[self.owner][:, self.owner]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        allowed = (same & own[None, :]) | (foreign & shared[None, :]) | torch.eye(length, dtype=torch.bool)
        return causal & allowed

    def decode_mask(self, layer: int, generator: int, num_generated: int) -> torch.Tensor:
        """(1, L + num_generated) bool: what a generator's new token sees."""
        own, shared = self.keys(layer)
        mine = self.owner == generator
        foreign = self._sees(layer, prefill=False)[generator][self.owner]
        prompt = (mine & own) | (foreign & shared)
        return torch.cat([prompt, torch.ones(num_generated, dtype=torch.bool)])[None, :]


def _additive(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """bool (Q, K) -> additive float mask (1, 1, Q, K) with -inf where not allowed, in `like`'s dtype and device."""
    mask = mask.to(like.device)
    return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(~mask, float("-inf"))[None, None]


class FedAttnOracle:
    """Runs FedAttn sessions on a Hugging Face Qwen2 / Llama causal LM."""

    def __init__(self, model: PreTrainedModel):
        text_config = model.config.get_text_config(decoder=True)
        if any(t != "full_attention" for t in getattr(text_config, "layer_types", None) or []):
            raise ValueError("the oracle supports full-attention models only (no sliding window)")
        self.model = model.eval()
        self.decoder = model.model  # embed_tokens, layers, norm, rotary_emb
        self.num_layers = len(self.decoder.layers)
        gen = model.generation_config
        eos = gen.eos_token_id if gen is not None and gen.eos_token_id is not None else model.config.eos_token_id
        self.eos_token_ids = set([eos] if isinstance(eos, int) else eos or [])

    def _layer_queries_keys(self, layer_idx: int, hidden: torch.Tensor, position_embeddings) -> tuple:
        """(L, H, D) queries times the attention scale and (L, H_kv, D) keys that layer `layer_idx`
        computes from `hidden` (1, L, d), after RoPE, as its attention sees them."""
        attn = self.decoder.layers[layer_idx].self_attn
        normed = self.decoder.layers[layer_idx].input_layernorm(hidden)
        q, k = (proj(normed).view(1, hidden.shape[1], -1, attn.head_dim).transpose(1, 2)
                for proj in (attn.q_proj, attn.k_proj))
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)  # (1, heads, L, D)
        return q[0].transpose(0, 1) * attn.scaling, k[0].transpose(0, 1)

    def _layers(self, hidden, positions, masks, cache, hidden_out=None):
        """Run every decoder layer with its own mask, masks(layer, its input, position embeddings);
        returns the final-norm hidden states."""
        position_embeddings = self.decoder.rotary_emb(hidden, positions[None, :])
        for layer_idx, layer in enumerate(self.decoder.layers):
            hidden = layer(
                hidden,
                attention_mask=_additive(masks(layer_idx, hidden, position_embeddings), hidden),
                position_ids=positions[None, :],
                past_key_values=cache,
                use_cache=True,
                position_embeddings=position_embeddings,
            )
            if hidden_out is not None:
                hidden_out.append(hidden[0])
        return self.decoder.norm(hidden)

    @torch.no_grad()
    def generate(
        self,
        segments: list[Tokens],
        config: FedAttnConfig,
        max_new_tokens: int = 16,
        *,
        ignore_eos: bool = False,
        output_prompt_logits: bool = False,
        output_hidden_states: bool = False,
        public_prefix: Tokens = (),
    ) -> OracleOutput:
        """Prefill the public prefix and all participants' segments, then let each generator decode greedily.

        public_prefix: token ids at positions 0..P-1, computed by every participant and seen by all at
        every layer (never exchanged). Logits and hidden states cover prefix and segments.
        """
        if not segments or any(len(s) == 0 for s in segments):
            raise ValueError("segments: every participant needs at least one token")
        public_prefix = list(public_prefix)
        if config.kv_wire is not KVWire.NATIVE:
            raise FedAttnConfigError("kv_wire", "the oracle models the spec's exact K/V only ('native')")
        plan = config.resolve(self.num_layers, len(segments))
        lengths = [len(s) for s in segments]
        vis = _Visibility(plan, lengths, len(public_prefix))
        prompt_len = len(public_prefix) + sum(lengths)
        device = self.model.device  # masks and selections are built on the CPU; the model runs where it lives
        input_ids = torch.tensor(public_prefix + [tok for seg in segments for tok in seg], device=device)[None, :]

        cache = DynamicCache(config=self.model.config)
        hidden = self.decoder.embed_tokens(input_ids)
        hidden_out = [hidden[0]] if output_hidden_states else None
        def prefill_mask(layer: int, layer_input: torch.Tensor, position_embeddings) -> torch.Tensor:
            if not plan.selection_needs_keys:
                return vis.prefill_mask(layer)
            queries, keys = self._layer_queries_keys(layer, layer_input, position_embeddings)
            return vis.prefill_mask(layer, keys, queries if plan.selection_needs_queries else None)

        normed = self._layers(hidden, torch.arange(prompt_len, device=device), prefill_mask, cache, hidden_out)

        out = OracleOutput(tokens={}, first_logits={}, sync_layers=plan.sync_layers)
        if output_prompt_logits:
            out.prompt_logits = self.model.lm_head(normed[0]).float()
        if output_hidden_states:
            out.hidden_states = torch.stack(hidden_out)

        for g in plan.generators:
            last = vis.offsets[g] + lengths[g] - 1
            logits = self.model.lm_head(normed[0, last]).float()
            out.first_logits[g] = logits
            own_cache = copy.deepcopy(cache)
            tokens: Tokens = []
            while len(tokens) < max_new_tokens:
                token = int(logits.argmax())
                tokens.append(token)
                if (token in self.eos_token_ids and not ignore_eos) or len(tokens) == max_new_tokens:
                    break
                step = len(tokens)  # generated tokens in the cache after this step
                position = torch.tensor([prompt_len + step - 1], device=device)
                hidden = self.decoder.embed_tokens(torch.tensor([[token]], device=device))
                normed_step = self._layers(
                    hidden, position, lambda l, *_: vis.decode_mask(l, g, step), own_cache
                )
                logits = self.model.lm_head(normed_step[0, -1]).float()
            out.tokens[g] = tokens
        return out
