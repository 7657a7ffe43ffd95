"""Where the generator's attention goes, layer by layer, on real GSM8K prompts (the reference oracle).

For centralised inference and each variant of a fidelity sweep: the attention probability
(mean over heads and the generator's prompt tokens) on the other participants' tokens, on
their first tokens, and on the generator's own first token. A sequence's first token grows
into an attention sink; under FedAttn each segment's first token may grow into one in its
local layers, which is what these measures watch.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import accumulate

import torch

from fedattn_vllm import gsm8k
from fedattn_vllm.config import FedAttnConfig
from fedattn_vllm.eval.fidelity import SWEEPS, Variant, config_json
from fedattn_vllm.oracle import FedAttnOracle

CENTRALISED = Variant("centralised", 4, FedAttnConfig(sync_interval=1))
MEASURES = ("foreign", "foreign_first", "own_first")


@dataclass
class AttentionMass:
    """Per layer, the generator's mean attention probability on each kind of key."""

    foreign: list[float]  # every other participant's token
    foreign_first: list[float]  # the other participants' first tokens
    own_first: list[float]  # the generator's first token


@contextmanager
def recorded_attention(oracle: FedAttnOracle):
    """Yields {layer: (Q, K) attention probabilities averaged over heads} of the forward passes inside."""
    probs: dict[int, torch.Tensor] = {}

    def record(layer_idx, _module, _inputs, output):
        if output[1] is None:
            raise ValueError("attention probabilities need the model loaded with attn_implementation='eager'")
        probs[layer_idx] = output[1][0].float().mean(0)

    hooks = [layer.self_attn.register_forward_hook(lambda *a, i=i: record(i, *a))
             for i, layer in enumerate(oracle.decoder.layers)]
    try:
        yield probs
    finally:
        for hook in hooks:
            hook.remove()


def attention_mass(oracle: FedAttnOracle, segments: list[list[int]], config: FedAttnConfig) -> AttentionMass:
    """The last participant's (the generator's) attention over one prefill of `segments`."""
    if list(config.generators) != [-1]:
        raise ValueError("generators: attention mass is measured for the last participant only")
    starts = list(accumulate([0] + [len(s) for s in segments[:-1]]))
    own = starts[-1]
    with recorded_attention(oracle) as probs:
        oracle.generate(segments, config, 1)
    rows = [probs[layer][own:] for layer in range(oracle.num_layers)]  # (Q_generator, K) each
    return AttentionMass(
        foreign=[r[:, :own].sum(-1).mean().item() for r in rows],
        foreign_first=[r[:, starts[:-1]].sum(-1).mean().item() for r in rows],
        own_first=[r[:, own].mean().item() for r in rows],
    )


def run(args) -> dict:
    """Centralised and every variant of `args.sweep` over `args.limit` problems; writes <out>/<sweep>.json."""
    import json

    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedattn_vllm.models import resolve_model

    path = resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype), attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(path)
    oracle = FedAttnOracle(model)
    variants = [CENTRALISED] + SWEEPS[args.sweep]
    problems = gsm8k.problems()[args.offset: args.offset + args.limit]
    per_problem = [  # one random draw per problem (its test-set index), as in the fidelity sweeps
        [attention_mass(oracle, gsm8k.segments(tokenizer, p, args.shots, v.participants, v.split),
                        replace(v.config, seed=args.offset + i)) for v in variants]
        for i, p in enumerate(tqdm(problems, desc=f"attention {args.sweep}", unit="problem"))]
    rows = []
    for j, v in enumerate(variants):
        row = {"label": v.label, "participants": v.participants, "split": v.split, "config": config_json(v.config)}
        for name in MEASURES:
            row[name] = torch.tensor([getattr(p[j], name) for p in per_problem]).mean(0).tolist()
        rows.append(row)
    result = {"sweep": args.sweep, "model": str(args.model), "dtype": args.dtype, "shots": args.shots,
              "offset": args.offset, "problems": len(problems), "variants": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.sweep}.json").write_text(json.dumps(result))
    for row in rows:
        print(f"{row['label']:>28}: mean over layers: foreign {sum(row['foreign']) / len(row['foreign']):.3f}  "
              f"own first token {sum(row['own_first']) / len(row['own_first']):.3f}")
    return result
