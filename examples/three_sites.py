"""Three organisations, one answer, and each party's text only ever on its own site.

    python examples/three_sites.py            # the default model; everything on loopback
    python examples/three_sites.py --model tiny-qwen2

What it starts, as three organisations would on three machines:

    coordinator   python -m fedattn_vllm.federated.coordinator --keypair coordinator.key_secret --trust trust/
                  relays sealed K/V; sees segment lengths, sizes and timing, never text or token ids
    site a, b, c  python -m server --role party --coordinator tcp://... --keypair a.key_secret
                  --coordinator-key coordinator.key     (each its own server and engine)

Every ZeroMQ link is CURVE (keys from `python -m fedattn_vllm.federated.curve new NAME`; the
coordinator trusts the three sites' public keys). Site a holds the coordinator's admin key, so
its client creates the session, naming each participant's site by its public key; the
invitation it gets back (the settings, and the key that seals K/V past the coordinator) goes to
the other parties' clients. Each client then posts only its own text, to its own site. The
question holder's site answers its client; the other two get a usage record.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx

from fedattn_vllm.federated.curve import public_key
from fedattn_vllm.federated.local import free_port
from server.launch import wait_until_healthy

SITES = ("a", "b", "c")
PARTS = [
    "Alice's note: the meeting with the supplier is in Lisbon. ",
    "Bob's note: the meeting is on Thursday at 3 pm. ",
    "Question: in which city is the meeting with the supplier, and on which day? Answer briefly.",
]


def make_keys(directory: Path) -> None:
    """Each site's keypair and the coordinator's, by the documented command; the coordinator trusts the sites."""
    for name in ("coordinator", *SITES):
        subprocess.run([sys.executable, "-m", "fedattn_vllm.federated.curve", "new", name, "--dir", str(directory)],
                       check=True, stdout=subprocess.DEVNULL)
    (directory / "trust").mkdir()
    for name in SITES:
        shutil.copyfile(directory / f"{name}.key", directory / "trust" / f"{name}.key")


def start_coordinator(stack: ExitStack, keys: Path, admin_key: str, logs: Path) -> str:
    """The coordinator process (stopped when `stack` closes): its endpoint."""
    ready = logs / "coordinator.ready"
    process = _start(stack, [sys.executable, "-m", "fedattn_vllm.federated.coordinator", "--bind", "tcp://127.0.0.1:*",
                             "--ready-file", str(ready), "--parent-pid", str(os.getpid()),
                             "--keypair", str(keys / "coordinator.key_secret"),
                             "--trust", str(keys / "trust")], logs / "coordinator.log", FEDATTN_ADMIN_KEY=admin_key)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the coordinator did not start; see {logs / 'coordinator.log'}")
        time.sleep(0.1)
    return ready.read_text()


def start_sites(stack: ExitStack, model: str, coordinator: str, keys: Path, admin_key: str, logs: Path,
                *flags: str) -> dict[str, str]:
    """One party-side server per site (site a may open sessions), all started at once: {site: url}."""
    urls, started = {}, []
    for name in SITES:
        port = free_port()
        args = [sys.executable, "-m", "server", model, "--role", "party", "--port", str(port),
                "--parent-pid", str(os.getpid()),
                "--coordinator", coordinator, "--keypair", str(keys / f"{name}.key_secret"),
                "--coordinator-key", str(keys / "coordinator.key"), *flags]
        admin = {"FEDATTN_ADMIN_KEY": admin_key} if name == "a" else {}
        started.append((_start(stack, args, logs / f"site-{name}.log", **admin), logs / f"site-{name}.log"))
        urls[name] = f"http://127.0.0.1:{port}"
    for (process, log), url in zip(started, urls.values()):
        wait_until_healthy(url, process, log, timeout_s=600)
    return urls


def _start(stack: ExitStack, args: list[str], log: Path, **env: str) -> subprocess.Popen:
    """A process whose output goes to `log`, terminated (then killed) when `stack` closes."""
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
    stack.callback(_stop, process)
    return process


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def ask(urls: dict[str, str], keys: Path, parts: list[str], **terms) -> tuple[dict, list[dict]]:
    """One session over the three sites: site a's client creates it, then each client joins at its own site with
    only its own part. (The created session with its invitation, every participant's reply in order.)"""
    model = httpx.get(f"{urls['a']}/v1/models").json()["data"][0]["id"]
    created = httpx.post(f"{urls['a']}/v1/fedattn/sessions", timeout=60, json={
        "model": model, "participants": len(SITES), "chat": True,
        "sites": [public_key(keys / f"{name}.key").decode() for name in SITES], **terms})
    created.raise_for_status()
    session = created.json()

    def join(n: int) -> dict:  # party n's client: its own site, its own text, the invitation
        reply = httpx.post(f"{urls[SITES[n]]}/v1/fedattn/sessions/{session['id']}/participants/{n}", timeout=600,
                           json={"invitation": session["invitation"], "content": parts[n]})
        reply.raise_for_status()
        return reply.json()

    with ThreadPoolExecutor(len(SITES)) as clients:
        return session, list(clients.map(join, range(len(SITES))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedattn-three-sites-") as tmp, ExitStack() as stack:
        keys, logs = Path(tmp) / "keys", Path(tmp)
        make_keys(keys)
        admin_key = secrets.token_urlsafe(32)
        coordinator = start_coordinator(stack, keys, admin_key, logs)
        print(f"coordinator on {coordinator} (CURVE); starting three party-side servers (logs in {logs})")
        urls = start_sites(stack, args.model, coordinator, keys, admin_key, logs, "--kv-cache-gib", "0.5",
                           "--max-model-len", "2048")  # three engines on one machine: a smaller cache each
        for name, url in urls.items():
            print(f"  site {name}: {url}")
        _, replies = ask(urls, keys, PARTS, max_tokens=args.max_tokens, temperature=0)
        for n, reply in enumerate(replies):
            print(f"\nsite {SITES[n]} (its client sent only: {PARTS[n]!r})")
            if "choices" in reply:  # the generator: the answer, and every participant's numbers
                print(f"  answer: {reply['choices'][0]['message']['content'].strip()!r}")
                usage = {k: v[n] for k, v in reply["fedattn"].items() if k in ("tokens", "published_bytes",
                                                                                 "received_bytes")}
            else:  # a usage record of its own part
                usage = reply["fedattn"]
            print(f"  {usage['tokens']} private tokens; published {usage['published_bytes'] / 1024:.1f} KiB, "
                  f"received {usage['received_bytes'] / 1024:.1f} KiB of sealed K/V")


if __name__ == "__main__":
    main()
