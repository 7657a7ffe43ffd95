"""`python -m fedattn_vllm.eval {gsm8k,recall,fidelity,attention,plots}`: accuracy and recall runs, fidelity and
attention sweeps, figures."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedattn_vllm.eval import accuracy, attention, fidelity, plots, recall
from fedattn_vllm.eval.cli import add_run_arguments


def _sweep_parser(sub, name: str, module, help: str, default_limit: int) -> None:
    """A subcommand that runs one of the fidelity sweeps' variant lists on the reference oracle."""
    p = sub.add_parser(name, help=help, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", choices=sorted(fidelity.SWEEPS))
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--limit", type=int, default=default_limit, help=f"problems (default {default_limit})")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results") / name, help="directory for <sweep>.json")
    p.set_defaults(run=module.run)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fedattn_vllm.eval", description=__doc__)
    sub = parser.add_subparsers(dest="task", required=True)

    p = sub.add_parser("gsm8k", help="GSM8K accuracy on the vLLM engine (few-shot chain of thought)",
                       description=accuracy.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, Path("results/gsm8k"), max_tokens=256)
    p.add_argument("--participants", "-N", type=int, default=4)
    p.add_argument("--sync-interval", "-H", type=int, default=4)
    p.add_argument("--placement", default="uniform")
    p.add_argument("--split", default="TokEx", choices=["TokAg", "SemAg", "TokEx", "SemEx"])
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--kv-share-ratio", type=float, default=1.0)
    p.add_argument("--publisher-dense", action="store_true",
                   help="keep the question holder (the last participant) at ratio 1.0 while the others share sparsely")
    p.add_argument("--publisher-sync-interval", type=int, help="the question holder shares every H_p layers")
    p.add_argument("--generator-sync-interval", type=int, help="the generator also reads everyone every H_g layers")
    p.add_argument("--kv-selection", default="random", help="which tokens sparse sharing keeps: random, key_norm")
    p.add_argument("--local-keep-ratio", type=float, default=1.0,
                   help="sparse local computation (the paper's ablation): the share of its own tokens a participant "
                        "attends to at every layer, chosen by --kv-selection")
    p.add_argument("--limit", type=int, help="problems to run (default: all 1319)")
    p.set_defaults(run=accuracy.run)

    p = sub.add_parser("recall", help="cross-party recall: a fact held by one party, the question by the last",
                       description=recall.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, Path("results/recall"), max_tokens=24)
    recall.add_arguments(p)
    p.set_defaults(run=recall.run)

    _sweep_parser(sub, "fidelity", fidelity, "hidden-state deviation, next-token agreement and KL vs centralised", 30)
    _sweep_parser(sub, "attention", attention, "where the generator's attention goes, layer by layer (adds centralised)",
                  10)

    p = sub.add_parser("plots", help="every figure and table from saved results",
                       description=plots.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path("evaluation"), help="holds gsm8k/, fidelity/ and attention/")
    p.add_argument("--out", type=Path, help="figure directory (default: <results>/figures)")
    p.set_defaults(run=plots.run)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    main()
