"""What link security costs on the K/V path: publish + fetch through a real coordinator, plaintext, CURVE, CURVE + sealed.

    .venv/bin/python benchmarks/curve.py --tokens 50 200 400 --rounds 200

One coordinator per setting, in this process's threads, on loopback; two engine-side
clients publish one layer's K/V of a participant (the default model's shape: 2 KV heads x
64 channels) and fetch it back, settings interleaved round by round. Payloads as the
product sends them: exact fp32 and k4v2 (kv_wire.py); "sealed" adds end-to-end sealing of
the payload (sealing.py) on top of CURVE. Reported: median round trip per setting, the
ratios to plaintext, and the bytes on the wire beyond the payload (header, seal tags) per
publish, in benchmarks/results/curve.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from fedattn_vllm.config import FedAttnConfig, KVWire
from fedattn_vllm.federated.client import NetworkKVExchange, SessionAdmin
from fedattn_vllm.federated.coordinator import Coordinator
from fedattn_vllm.federated.curve import ClientCurve, Keypair, ServerCurve, public_key
from fedattn_vllm.federated.local import local_keys
from fedattn_vllm.federated.sealing import new_seal_key
from fedattn_vllm.kv_wire import encode_kv

ADMIN_KEY = b"benchmark-admin-key"
KV_HEADS, HEAD_DIM = 2, 64


def serve(curve: ServerCurve | None) -> tuple[Coordinator, threading.Thread]:
    coordinator = Coordinator("tcp://127.0.0.1:*", ADMIN_KEY, curve=curve)
    thread = threading.Thread(target=coordinator.serve_forever, daemon=True)
    thread.start()
    return coordinator, thread


def clients(endpoint: str, curves: dict) -> tuple[SessionAdmin, list[NetworkKVExchange]]:
    """The orchestrator's admin and two engines' exchanges, connected once (their handshakes outside the timing)."""
    return (SessionAdmin(endpoint, ADMIN_KEY, curve=curves.get("orchestrator")),
            [NetworkKVExchange(endpoint, curve=curves.get("engine")) for _ in range(2)])


def round_trips(admin: SessionAdmin, engines: list[NetworkKVExchange], payload, sessions: int, sealed: bool,
                first: int = 0) -> tuple[list[float], int]:
    """Seconds per publish + fetch of `payload`, one fresh session each (a layer is published once), and the
    publish's bytes on the wire beyond the payload."""
    plan = FedAttnConfig(sync_interval=1).resolve(1, 2)
    seconds, overhead = [], 0
    for s in range(first, first + sessions):
        name = f"s{s}"
        seal_key = new_seal_key() if sealed else None
        for n, credential in enumerate(admin.open(name, plan)):
            engines[n].join(name, n, credential, seal_key=seal_key)
        started = time.perf_counter()
        engines[0].publish(name, 0, 0, payload)
        engines[1].fetch(name, 1, 0, 0)
        seconds.append(time.perf_counter() - started)
        stats = admin.stats(name)
        overhead = stats["wire_bytes"]["up"][0] - stats["payload_bytes"]["up"][0]
        admin.close(name)
        for engine in engines:
            engine.release(name)
    return seconds, overhead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[50, 200, 400], help="tokens of one participant")
    parser.add_argument("--rounds", type=int, default=200, help="round trips per setting and size")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/curve.json"))
    args = parser.parse_args()
    keys = local_keys(tempfile.mkdtemp(prefix="fedattn-curve-"), engines=1)
    client = {name: ClientCurve(Keypair.load(keys / f"{name}.key_secret"), public_key(keys / "coordinator.key"))
              for name in ("orchestrator", "engine0")}
    server_curve = ServerCurve(Keypair.load(keys / "coordinator.key_secret"), keys)
    client_curves = {"orchestrator": client["orchestrator"], "engine": client["engine0"]}
    settings = {"plaintext": (None, {}, False), "curve": (server_curve, client_curves, False),
                "curve_sealed": (server_curve, client_curves, True)}
    servers = {name: serve(curve) for name, (curve, _, _) in settings.items()}  # one coordinator each
    connected = {name: clients(servers[name][0].endpoint, curves) for name, (_, curves, _) in settings.items()}
    sessions = iter(range(1 << 30))  # session names, unique per coordinator
    rows = []
    try:
        for tokens in args.tokens:
            kv = tuple(torch.randn(tokens, KV_HEADS, HEAD_DIM) for _ in range(2))
            for wire in (KVWire.NATIVE, KVWire.K4V2):
                payload = encode_kv(kv, wire)
                nbytes = sum(t.nbytes for t in payload)
                samples = {name: [] for name in settings}
                overhead = {}
                for name, (_, _, sealed) in settings.items():  # warm-up: first-call paths, socket buffers
                    round_trips(*connected[name], payload, 2, sealed, next(sessions) * 1000)
                for _ in range(max(1, args.rounds // 20)):  # interleaved in blocks of 20
                    for name, (_, _, sealed) in settings.items():
                        seconds, overhead[name] = round_trips(*connected[name], payload, 20, sealed,
                                                              next(sessions) * 1000)
                        samples[name] += seconds
                medians = {name: statistics.median(s) for name, s in samples.items()}
                row = {"tokens": tokens, "kv_wire": wire.value, "payload_bytes": nbytes,
                       **{f"{name}_ms": round(1e3 * m, 4) for name, m in medians.items()},
                       **{f"{name}_over_plaintext": round(medians[name] / medians["plaintext"], 3)
                          for name in ("curve", "curve_sealed")},
                       **{f"{name}_framing_bytes": b for name, b in overhead.items()},
                       "sealed_framing_fraction": round(overhead["curve_sealed"] / nbytes, 5)}
                rows.append(row)
                print(row, flush=True)
    finally:
        for coordinator, thread in servers.values():
            coordinator.stop()
            thread.join(timeout=5)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
              "rounds": args.rounds, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
