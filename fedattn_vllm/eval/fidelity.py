"""Fidelity of FedAttn to centralised inference on real GSM8K prompts (the reference oracle, teacher-forced).

Each problem's few-shot prompt is split among N participants and the reference solution
is appended to the generator's segment, so every config is scored on the same tokens
(appended tokens see exactly what decoded ones would). Against one centralised forward
pass per problem, each config gets: the relative deviation of every layer's hidden states
on the generator's tokens, next-token agreement and KL(centralised || FedAttn) where the
answer is predicted, and the change in the answer's negative log-likelihood.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from fedattn_vllm import gsm8k
from fedattn_vllm.config import FedAttnConfig
from fedattn_vllm.oracle import FedAttnOracle


@dataclass(frozen=True)
class Variant:
    """One point of a sweep: participants, split policy and FedAttn settings."""

    label: str
    participants: int
    config: FedAttnConfig
    split: str = "TokEx"


def _uniform(h: int, **options) -> FedAttnConfig:
    return FedAttnConfig(sync_interval=h, **options)


SWEEPS: dict[str, list[Variant]] = {
    "interval": [Variant(f"H={h}", 4, _uniform(h)) for h in (1, 2, 3, 4, 6, 8, 12, 24)],
    "participants": [Variant(f"N={n}", n, _uniform(4)) for n in (1, 2, 3, 4, 5, 6)],
    # TokAg: the question holder's chunk (exemplar tail + question) shrinks as N grows
    "participants_tokag": [Variant(f"N={n}", n, _uniform(4), split="TokAg") for n in (1, 2, 3, 4, 5, 6)],
    "placement": [Variant(p, 4, _uniform(4, placement=p))
                  for p in ("uniform", "front_half", "back_half", "increasing", "decreasing")],
    "split": [Variant(s, 4, _uniform(4), split=s) for s in ("TokAg", "SemAg", "TokEx", "SemEx")],
    "sparse": [Variant(f"{sel} r={r:g}", 4, _uniform(4, kv_share_ratio=r, kv_selection=sel))
               for sel in ("random", "key_norm") for r in (1.0, 0.8, 0.5, 0.3, 0.1)],
    # the best placement with the best selection (N=4, 6 sync layers), against no sync at all
    # (the generator alone: its own segment only, which RoPE makes the zero-shot prompt)
    "combined": [Variant("no sync (generator alone)", 4, FedAttnConfig(placement="explicit", sync_layers=()))] + [
        Variant(f"{p} {sel} r={r:g}", 4, _uniform(4, placement=p, kv_share_ratio=r, kv_selection=sel))
        for p, sel, r in (("uniform", "random", 1.0), ("back_half", "random", 1.0), ("uniform", "key_norm", 0.5),
                          ("back_half", "key_norm", 0.5), ("back_half", "key_norm", 0.2))],
}


@dataclass
class Fidelity:
    """One variant on one problem, compared with centralised inference."""

    layer_deviation: list[float]  # per hidden state (embeddings, then each layer): mean ||h - h_c|| / ||h_c||
    agreement: float  # fraction of answer tokens where the argmax next token matches centralised
    kl: float  # mean KL(centralised || FedAttn) over the answer's next-token distributions, nats
    nll_change: float  # mean answer-token NLL minus centralised's, nats
    published_bytes: list[int]  # per participant for the prompt, from the cost model


def teacher_forced_segments(tokenizer, problem: dict, shots: int, participants: int,
                            split: str) -> tuple[list[list[int]], int]:
    """The prompt's segments with the reference solution appended to the last (the generator's), and its length."""
    segments = gsm8k.segments(tokenizer, problem, shots, participants, split)
    answer = tokenizer(gsm8k.solution_text(problem), add_special_tokens=False)["input_ids"]
    segments[-1] = segments[-1] + answer
    return segments, len(answer)


def _forward(oracle: FedAttnOracle, segments: list[list[int]], config: FedAttnConfig, answer_len: int):
    """Logits where the answer is predicted (A, V) and every layer's hidden states (M+1, L, d), from one prefill."""
    hidden = oracle.generate(segments, config, 1, output_hidden_states=True).hidden_states
    with torch.no_grad():  # only the positions that predict the answer need the vocabulary projection
        logits = oracle.model.lm_head(oracle.decoder.norm(hidden[-1, -answer_len - 1: -1]))
    return logits.float(), hidden


def compare(centralised, variant, tokens: torch.Tensor, generator_start: int) -> tuple[list[float], float, float, float]:
    """Deviation per layer on the generator's tokens; agreement, KL and NLL change on the answer.

    centralised/variant: (logits (A, V) predicting the last A tokens, hidden states (M+1, L, d)); tokens (L,).
    """
    (logits_c, h_c), (logits_v, h_v) = centralised, variant
    h_c, h_v = h_c[:, generator_start:].float(), h_v[:, generator_start:].float()
    deviation = ((h_v - h_c).norm(dim=-1) / h_c.norm(dim=-1).clamp_min(1e-12)).mean(dim=-1)  # (M+1,)
    logp_c, logp_v = torch.log_softmax(logits_c, dim=-1), torch.log_softmax(logits_v, dim=-1)  # (A, V)
    agreement = (logp_c.argmax(-1) == logp_v.argmax(-1)).float().mean().item()
    kl = (logp_c.exp() * (logp_c - logp_v)).sum(-1).mean().item()
    targets = tokens[-logits_c.shape[0]:, None]
    nll_change = (logp_c.gather(1, targets) - logp_v.gather(1, targets)).mean().item()
    return deviation.tolist(), agreement, kl, nll_change


def measure(oracle: FedAttnOracle, tokenizer, problem: dict, variants: list[Variant], shots: int,
            cost, seed: int = 0) -> list[Fidelity]:
    """Every variant on one problem, its random selections drawn from `seed`; cost(plan, lengths) -> bytes
    published per participant."""
    centralised, tokens = None, None
    results = []
    for v in variants:
        config = replace(v.config, seed=seed)
        segments, answer_len = teacher_forced_segments(tokenizer, problem, shots, v.participants, v.split)
        flat = torch.tensor([t for s in segments for t in s])
        if centralised is None:
            tokens = flat
            centralised = _forward(oracle, [flat.tolist()], FedAttnConfig(sync_interval=1), answer_len)
        if not torch.equal(flat, tokens):
            raise ValueError(f"{v.label}: the split changed the prompt's tokens")
        measured = compare(centralised, _forward(oracle, segments, config, answer_len), tokens,
                           len(flat) - len(segments[-1]))
        plan = config.resolve(oracle.num_layers, len(segments))
        prompt_lengths = [len(s) for s in segments[:-1]] + [len(segments[-1]) - answer_len]
        results.append(Fidelity(*measured, cost(plan, prompt_lengths)))
    return results


def config_json(config: FedAttnConfig) -> dict:
    """The config as JSON values (enums by value, tuples as lists)."""
    return {k: (list(x) if isinstance(x, tuple) else getattr(x, "value", x)) for k, x in asdict(config).items()}


def summarise(variants: list[Variant], per_problem: list[list[Fidelity]]) -> list[dict]:
    """Per variant: means over problems (and their standard errors) of every measure."""
    rows = []
    for i, v in enumerate(variants):
        items = [p[i] for p in per_problem]
        row = {"label": v.label, "participants": v.participants, "split": v.split,
               "config": config_json(v.config), "problems": len(items)}
        for name in ("agreement", "kl", "nll_change"):
            values = torch.tensor([getattr(f, name) for f in items], dtype=torch.float64)
            row[name] = values.mean().item()
            row[f"{name}_sem"] = (values.std() / len(values) ** 0.5).item() if len(values) > 1 else 0.0
        row["layer_deviation"] = torch.tensor([f.layer_deviation for f in items]).mean(0).tolist()
        row["mean_published_bytes"] = torch.tensor(
            [f.published_bytes for f in items], dtype=torch.float64).mean(0).tolist()
        rows.append(row)
    return rows


def run(args) -> dict:
    """One fidelity sweep over `args.limit` problems; writes <out>/<sweep>.json."""
    import json

    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedattn_vllm.cost import ModelShape, participant_costs
    from fedattn_vllm.models import resolve_model

    path = resolve_model(args.model)
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(path)
    oracle = FedAttnOracle(model)
    shape = ModelShape.from_hf_config(model.config, dtype)

    def cost(plan, lengths):
        return [c.upload_bytes for c in participant_costs(shape, plan, lengths)]

    variants = SWEEPS[args.sweep]
    problems = gsm8k.problems()[args.offset: args.offset + args.limit]
    # One random draw per problem (its test-set index): the exemplar segments are the same for every problem.
    per_problem = [measure(oracle, tokenizer, p, variants, args.shots, cost, seed=args.offset + i)
                   for i, p in enumerate(tqdm(problems, desc=f"fidelity {args.sweep}", unit="problem"))]
    result = {
        "sweep": args.sweep, "model": str(args.model), "dtype": args.dtype, "shots": args.shots,
        "offset": args.offset, "problems": len(problems), "num_layers": oracle.num_layers,
        "variants": summarise(variants, per_problem),
        "per_problem": [[asdict(f) for f in row] for row in per_problem],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.sweep}.json").write_text(json.dumps(result))
    for row in result["variants"]:
        print(f"{row['label']:>16}: agreement {row['agreement']:.3f}  KL {row['kl']:.4f}  "
              f"NLL change {row['nll_change']:+.4f}  last-layer deviation {row['layer_deviation'][-1]:.3f}")
    return result
