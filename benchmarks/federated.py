"""Time to first token: centralised vs. federated pipelined vs. federated serial, one run, same prompts.

    .venv/bin/python benchmarks/federated.py --problems 4 --shots 4 --participants 4 --rounds 3

A local cluster of N engine processes (one per participant) and a coordinator, on loopback.
Each GSM8K prompt (TokEx split) runs one session at a time, modes interleaved round by round:
  centralised  the whole prompt as one participant on engine 0 (plain inference);
  pipelined    all participants start at once; participant n waits at a sync layer only
               for 1..n-1's K/V of that layer;
  serial       participant n starts when n-1 has finished.
With --compare-security a second cluster runs beside it with plaintext links and unsealed
K/V, and its pipelined sessions join the interleaved rounds (what CURVE and sealing cost).
Reported: median TTFT (max_tokens=1), each engine's CPU time per session (its participant's
compute), bytes on the wire. This machine's cores are shared by all engines, so the wall
clock of the federated modes is inflated; the projection to one machine per participant
replays the measured compute layer by layer (participant n finishes layer l at
max(own layer l-1, every earlier sharer's layer l) + c_n / L, plus the layer's transfer
time at --link-gbps and --rtt-ms) and says what N machines would give.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import psutil
import torch
from transformers import AutoConfig

from fedattn_vllm import gsm8k
from fedattn_vllm.config import FedAttnConfig, FedAttnPlan, KVWire
from fedattn_vllm.cost import ModelShape
from fedattn_vllm.session import FedAttnSession
from fedattn_vllm.federated.local import LocalCluster
from fedattn_vllm.models import resolve_model
from fedattn_vllm.selection import SELECTORS


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--problems", type=int, default=4)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--participants", type=int, default=4)
    parser.add_argument("--sync-interval", type=int, default=4)
    parser.add_argument("--generator-sync-interval", type=int, help="the generator also reads every H_g layers")
    parser.add_argument("--kv-wire", default="native", choices=[w.value for w in KVWire], help="encoding of the shared K/V")
    parser.add_argument("--kv-share-ratio", type=float, default=1.0, help="tokens each participant shares")
    parser.add_argument("--kv-selection", default="random", choices=sorted(SELECTORS),
                        help="which tokens (question: the generators' queries choose; the publishers wait for them)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--link-gbps", type=float, default=1.0, help="projection: link bandwidth per machine")
    parser.add_argument("--rtt-ms", type=float, default=1.0, help="projection: round trip to the coordinator")
    parser.add_argument("--compare-security", action="store_true",
                        help="also run pipelined sessions on a plaintext, unsealed cluster (same rounds)")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/federated-<setting>.json")
    args = parser.parse_args()
    if args.out is None:
        hg = f"-hg{args.generator_sync_interval}" if args.generator_sync_interval else ""
        security = "-security" if args.compare_security else ""
        sparse = f"-r{args.kv_share_ratio:g}-{args.kv_selection}" if args.kv_share_ratio < 1 else ""
        args.out = Path(f"benchmarks/results/federated-N{args.participants}-H{args.sync_interval}{hg}{sparse}-"
                        f"{args.kv_wire}{security}.json")
    return args


def cpu_seconds(pids: list[int]) -> list[float]:
    return [sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids]


def projected_pipelined_s(compute: list[float], plan: FedAttnPlan, lengths: list[int], layer_bytes: list[int],
                          question_bytes: list[int], num_layers: int, link_gbps: float, rtt_ms: float) -> float:
    """TTFT with one machine per participant: per-layer compute c_n / L, waits on earlier sharers' layers; with
    question selection a publisher first waits for the generators' queries of the layer (sent when their previous
    layer is done)."""

    def transfer_s(nbytes: int) -> float:
        return rtt_ms / 1e3 + 8 * nbytes / (link_gbps * 1e9)

    finished = [0.0] * len(compute)
    for layer in range(num_layers):
        queries_sent = list(finished)  # each generator's queries of this layer leave once its previous layer is done
        for n in range(len(compute)):  # in order: n's wait depends on 1..n-1 at this layer
            start = finished[n]
            if askers := plan.asks(n, layer, lengths[n]):
                start = max(start, *(queries_sent[g] + transfer_s(question_bytes[g]) for g in askers))
            sources = [m for m in range(n) if plan.sees(n, m, layer, prefill=True)]
            if sources:
                start = max(start, *(finished[m] for m in sources)) + transfer_s(sum(layer_bytes[m] for m in sources))
            finished[n] = start + compute[n] / num_layers
    return finished[-1]


def main() -> None:
    args = parse_args()
    engine_args = {"dtype": args.dtype, "max_model_len": 4096, "max_num_batched_tokens": 8192, "seed": 0,
                   "kv_cache_memory_bytes": 512 << 20}
    config = FedAttnConfig(sync_interval=args.sync_interval, generator_sync_interval=args.generator_sync_interval,
                           kv_wire=args.kv_wire, kv_share_ratio=args.kv_share_ratio, kv_selection=args.kv_selection)
    n = args.participants
    print(f"starting a coordinator and {n} engines ...", flush=True)
    with contextlib.ExitStack() as clusters:
        local = clusters.enter_context(LocalCluster(args.model, engines=n, engine_args=engine_args, timeout_s=300))
        plain = clusters.enter_context(LocalCluster(args.model, engines=n, engine_args=engine_args, timeout_s=300,
                                                    insecure=True, seal=False)) if args.compare_security else None
        from transformers import AutoTokenizer
        from vllm import SamplingParams

        cluster = local.cluster
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
        first_token = SamplingParams(temperature=0.0, max_tokens=1)
        prompts = [gsm8k.segments(tokenizer, p, args.shots, n, "TokEx") for p in gsm8k.problems()[: args.problems]]
        modes = {
            "centralised": lambda s: cluster.generate([FedAttnSession([sum(s, [])], config, first_token)], [[0]]),
            "pipelined": lambda s: cluster.generate([FedAttnSession(s, config, first_token)], [list(range(n))]),
            "serial": lambda s: cluster.generate([FedAttnSession(s, config, first_token)], [list(range(n))],
                                                 pipelined=False),
        }
        if SELECTORS[args.kv_selection].needs_queries:  # the publishers wait for the generator: no serial mode
            del modes["serial"]
        if plain is not None:
            modes["pipelined_plaintext"] = lambda s: plain.cluster.generate([FedAttnSession(s, config, first_token)],
                                                                            [list(range(n))])
        for mode in modes.keys() & {"pipelined", "pipelined_plaintext"}:
            modes[mode](prompts[0])  # warm-up: allocator pools, first-call paths
        samples: dict[str, list[dict]] = {mode: [] for mode in modes}
        for _ in range(args.rounds):
            for segments in prompts:
                for mode, run in modes.items():
                    pids = (plain if mode == "pipelined_plaintext" else local).cluster.engine_pids
                    before = cpu_seconds(pids)
                    started = time.perf_counter()
                    [result] = run(segments)
                    wall = time.perf_counter() - started
                    cpu = [b - a for a, b in zip(before, cpu_seconds(pids))]
                    assert result.error is None, result.error
                    samples[mode].append({"ttft_s": wall, "cpu_s": cpu, "cost": result.cost.__dict__})
        plan = config.resolve(cluster.num_layers, n)
    report = summarise(args, samples, plan, cluster.num_layers, prompts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {args.out}")


def summarise(args, samples, plan: FedAttnPlan, num_layers: int, prompts) -> dict:
    n = args.participants
    median = statistics.median
    ttft = {mode: median(s["ttft_s"] for s in rows) for mode, rows in samples.items()}
    # Per-participant compute: engine n's CPU time in the serial runs (no sharing of cores mid-run), else in the
    # pipelined ones (cores shared: somewhat more)
    compute = [median(s["cpu_s"][p] for s in samples.get("serial", samples["pipelined"])) for p in range(n)]
    central_cpu = median(s["cpu_s"][0] for s in samples["centralised"])
    published = samples["pipelined"][0]["cost"]["published_bytes"]  # per participant, over its sync layers
    tokens = [len(s) for s in prompts[0]]
    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(resolve_model(args.model)), getattr(torch, args.dtype))
    question_bytes = [shape.question_bytes(length) for length in tokens]
    # K/V per sync layer (a generator's question queries, counted in what it published, left out)
    layer_bytes = [(published[p] - sum(1 for l in range(num_layers) if plan.question_readers(p, l, tokens))
                    * question_bytes[p]) // max(len(plan.publish_layers[p]), 1) for p in range(n)]
    projected = projected_pipelined_s(compute, plan, tokens, layer_bytes, question_bytes, num_layers, args.link_gbps,
                                      args.rtt_ms)
    projected_serial = sum(compute) if "serial" in samples else None
    wire, payload = _bytes(samples["pipelined"])
    print(f"\n{args.problems} GSM8K prompts x {args.rounds} rounds, {args.shots}-shot TokEx, N={n}, "
          f"H={args.sync_interval}, H_g={args.generator_sync_interval}, kv_wire={args.kv_wire}, share ratio "
          f"{args.kv_share_ratio:g} ({args.kv_selection}), {args.dtype}; first prompt's segments "
          f"{tokens} tokens")
    print(f"{'mode':<20} {'TTFT median (s)':>16} {'vs centralised':>15}")
    for mode, seconds in ttft.items():
        print(f"{mode:<20} {seconds:>16.3f} {seconds / ttft['centralised']:>14.2f}x")
    print(f"per-participant compute (CPU s, serial runs, median): {[round(c, 3) for c in compute]}; "
          f"centralised {central_cpu:.3f}")
    print(f"projected with one machine per participant ({args.link_gbps} Gbit/s, {args.rtt_ms} ms RTT): "
          f"pipelined {projected:.3f} s ({projected / central_cpu:.2f}x the centralised compute), "
          f"serial {projected_serial} s")
    print(f"bytes per session on the wire {wire:,} (K/V payload {payload:,}, framing "
          f"{100 * (wire - payload) / payload:.3f}%)")
    security = {}
    if "pipelined_plaintext" in samples:
        plain_wire, _ = _bytes(samples["pipelined_plaintext"])
        security = {"ttft_ratio_secure_over_plaintext": ttft["pipelined"] / ttft["pipelined_plaintext"],
                    "wire_bytes_plaintext": plain_wire}
        print(f"CURVE + sealed vs plaintext, pipelined: TTFT {security['ttft_ratio_secure_over_plaintext']:.3f}x; "
              f"bytes counted on the wire {wire:,} vs {plain_wire:,}")
    return {
        "args": vars(args), "machine": {"cpus": psutil.cpu_count(), "platform": platform.platform(),
                                        "loopback_qdisc": loopback_qdisc()},
        "ttft_median_s": ttft, "compute_cpu_s": compute, "centralised_cpu_s": central_cpu,
        "projected_pipelined_s": projected, "projected_serial_s": projected_serial,
        "wire_bytes": wire, "payload_bytes": payload, **security, "samples": samples,
    }


def loopback_qdisc() -> str | None:
    """How the loopback the engines talk over is shaped (`tc qdisc show dev lo`: e.g. a tbf at 1 Gbit/s for a
    measured link), None where tc is missing."""
    if shutil.which("tc") is None:
        return None
    return subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True).stdout.strip()


def _bytes(rows: list[dict]) -> tuple[int, int]:
    """Median bytes per session: whole messages on the wire, and K/V payload."""
    wire = statistics.median(sum(s["cost"]["published_wire_bytes"]) + sum(s["cost"]["received_wire_bytes"])
                             for s in rows)
    payload = statistics.median(sum(s["cost"]["published_bytes"]) + sum(s["cost"]["received_bytes"]) for s in rows)
    return wire, payload


if __name__ == "__main__":
    main()
