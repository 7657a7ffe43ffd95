"""Requests/s and latency under concurrent load: our server vs. plain `vllm serve`, same prompts, one run.

    .venv/bin/python benchmarks/server_load.py --requests 24 --concurrency 4 --rounds 2

Starts vLLM's OpenAI server and ours twice on the same model with the same engine settings
(fp32, eager, no prefix caching or chunked prefill: FedAttn needs both off, so plain vLLM
runs without them too; every engine may use every core: vLLM's CPU engine core would otherwise
leave one to its API server): ours with its engine in the server's process (the default), and ours
with `--engines 1`, its engine in a process of its own as vLLM's server runs its engine core
(the same process layout). Then sends, round by round, interleaved:
  plain-vllm            single-party completions (the concatenated prompt as token ids) to vLLM's server;
  single, multi         the same requests to our in-process server; the same prompts split TokEx among
                        N participants (`participants`, H = 4);
  single-engine-proc,   the same two against our server with its engine process.
  multi-engine-proc
Reports requests/s and p50/p95 latency (medians over rounds) and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from fedattn_vllm import gsm8k
from fedattn_vllm.federated.local import free_port
from fedattn_vllm.models import resolve_model
from server.launch import wait_until_healthy


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--requests", type=int, default=24, help="requests per mode per round")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--participants", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/server_load.json"))
    return parser.parse_args()


def start(command: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    wait_until_healthy(f"http://127.0.0.1:{port}", process, log, timeout_s=600)
    return process


async def load(url: str, bodies: list[dict], concurrency: int) -> tuple[float, list[float]]:
    """(wall seconds, per-request latencies) for all bodies with at most `concurrency` in flight."""
    limit = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(client: httpx.AsyncClient, body: dict) -> None:
        async with limit:
            started = time.perf_counter()
            reply = await client.post(url, json=body, timeout=600)
            reply.raise_for_status()
            latencies.append(time.perf_counter() - started)

    async with httpx.AsyncClient() as client:
        started = time.perf_counter()
        await asyncio.gather(*(one(client, body) for body in bodies))
        return time.perf_counter() - started, latencies


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    args = parse_args()
    from transformers import AutoTokenizer

    path = str(resolve_model(args.model))
    tokenizer = AutoTokenizer.from_pretrained(path)
    problems = gsm8k.problems()[: args.requests]
    splits = [gsm8k.segments(tokenizer, p, args.shots, args.participants, "TokEx") for p in problems]
    common = {"max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
    logs = Path(tempfile.mkdtemp(prefix="fedattn-load-"))
    ours, ours_proc, plain = free_port(), free_port(), free_port()
    engine = ["--dtype", "float32", "--max-model-len", "4096", "--max-num-batched-tokens", "8192"]
    our_server = [sys.executable, "-m", "server", "--model", args.model, "--kv-cache-gib", "2",
                  "--parent-pid", str(os.getpid()), *engine]
    servers = [
        start([*our_server, "--port", str(ours)], ours, logs / "server.log"),
        start([*our_server, "--port", str(ours_proc), "--engines", "1"], ours_proc, logs / "server-engine-proc.log"),
        start([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--port", str(plain),
               "--enforce-eager", "--no-enable-prefix-caching", "--no-enable-chunked-prefill",
               "--kv-cache-memory-bytes", str(2 << 30), *engine], plain, logs / "vllm.log",
              # vLLM's CPU engine core leaves one core to its API server by default; ours take every core
              env={"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}),
    ]
    try:
        urls = {name: f"http://127.0.0.1:{port}" for name, port in (("plain", plain), ("ours", ours),
                                                                     ("ours_proc", ours_proc))}
        names = {url: httpx.get(f"{url}/v1/models").json()["data"][0]["id"] for url in urls.values()}

        def single(url: str) -> tuple[str, list[dict]]:
            return url, [{"model": names[url], "prompt": sum(s, []), **common} for s in splits]

        def multi(url: str) -> tuple[str, list[dict]]:
            return url, [{"model": names[url], "participants": s, "fedattn": {"sync_interval": 4}, **common}
                         for s in splits]

        modes = {"plain-vllm": single(urls["plain"]), "single": single(urls["ours"]), "multi": multi(urls["ours"]),
                 "single-engine-proc": single(urls["ours_proc"]), "multi-engine-proc": multi(urls["ours_proc"])}
        for url, bodies in modes.values():  # warm-up
            asyncio.run(load(f"{url}/v1/completions", bodies[:2], 2))
        samples: dict[str, list[dict]] = {mode: [] for mode in modes}
        for _ in range(args.rounds):
            for mode, (url, bodies) in modes.items():
                wall, latencies = asyncio.run(load(f"{url}/v1/completions", bodies, args.concurrency))
                samples[mode].append({"requests_per_s": len(bodies) / wall, "p50_s": percentile(latencies, 50),
                                      "p95_s": percentile(latencies, 95)})
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=60)
    report = {mode: {k: statistics.median(s[k] for s in rows) for k in rows[0]} for mode, rows in samples.items()}
    print(f"\n{args.requests} GSM8K prompts ({args.shots}-shot) x {args.rounds} rounds, concurrency "
          f"{args.concurrency}, {args.max_tokens} tokens each, fp32; multi: TokEx N={args.participants}, H=4")
    print(f"{'mode':<19} {'req/s':>8} {'vs plain':>9} {'p50 s':>8} {'p95 s':>8}")
    for mode, row in report.items():
        ratio = row["requests_per_s"] / report["plain-vllm"]["requests_per_s"]
        print(f"{mode:<19} {row['requests_per_s']:>8.3f} {ratio:>8.2f}x {row['p50_s']:>8.2f} {row['p95_s']:>8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args), "median": report, "samples": samples}, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
