"""A federated deployment on this machine: a coordinator and engine processes on loopback.

    with LocalCluster("default", engines=3) as local:
        results = local.cluster.generate(sessions, placement)

    # one party's site: its own engine, joined to a coordinator elsewhere (party.py)
    site = LocalCluster("default", engines=1, coordinator=(endpoint, None), site=("keys/a.key_secret", "keys/coordinator.key"))

Every engine is its own OS process with its own vLLM engine; they talk only through the
coordinator, exactly as on separate machines. Fresh random keys guard the coordinator's
admin operations and the engines' control sockets, and every link is CURVE-encrypted with
a keypair per process, made in `keys_dir` (`log_dir`/keys unless given) and trusted by each
other (`insecure=True`: plaintext). Process logs go to `log_dir`. Every
process ends with this one (`--parent-pid`, however this one dies); an engine that dies
is restarted by the cluster (FederatedCluster.maintain).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedattn_vllm.federated.cluster import FederatedCluster
from fedattn_vllm.federated.curve import Keypair, OrchestratorKeys, new_keypair, public_key
from fedattn_vllm.federated.party import PartySite, SiteKeys


class LaunchError(RuntimeError):
    """A coordinator or engine process did not come up."""


def free_port() -> int:
    """A TCP port on loopback that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_keys(directory: str | Path, engines: int) -> Path:
    """The keypairs of a local cluster in `directory` (made where missing): `coordinator`, `orchestrator`
    and `engine0`.. Every process trusts the directory's public keys."""
    directory = Path(directory)
    for name in ["coordinator", "orchestrator", *_engine_names(engines)]:
        if not (directory / f"{name}.key_secret").exists():
            new_keypair(directory, name)
    return directory


def _engine_names(engines: int) -> list[str]:
    return [f"engine{e}" for e in range(engines)]


def _security_flags(process: str, trust: Path | None) -> list[str]:
    """A local process's link-security flags: its keypair, trusting `trust`'s public keys (None: plaintext)."""
    if trust is None:
        return ["--insecure"]
    flags = ["--keypair", str(trust / f"{process}.key_secret"), "--trust", str(trust)]
    return flags if process == "coordinator" else [*flags, "--coordinator-key", str(trust / "coordinator.key")]


def _site_keys(keypair: str | Path, coordinator_key: str | Path, trust: Path) -> SiteKeys:
    """A site's keys; its engine's control socket trusts only the site's own public key (`trust`)."""
    site = SiteKeys(Keypair.load(keypair), public_key(coordinator_key))
    trust.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.copyfile(Path(keypair).with_suffix(".key"), trust / "site.key")  # beside it, as `curve new` writes it
    return site


class LocalCluster:
    def __init__(self, model: str = "default", engines: int = 2, *, engine_args: dict | None = None,
                 timeout_s: float = 60.0, start_timeout_s: float = 600.0, log_dir: str | Path | None = None,
                 env: dict[str, str] | None = None, coordinator: tuple[str, bytes] | None = None,
                 keys_dir: str | Path | None = None, insecure: bool = False, seal: bool = True,
                 site: tuple[str | Path, str | Path] | None = None):
        """`coordinator`: (endpoint, admin key) of a running coordinator to use instead of starting one
        (with CURVE, it serves `keys_dir`/coordinator.key_secret and trusts `keys_dir`: see `local_keys`).
        `seal`: K/V sealed end to end past the coordinator (FederatedCluster).
        `site`: (this party's .key_secret file, the coordinator's public key file): one party's site, its one
        engine and its orchestrator (`cluster`, a PartySite) both speaking with the party's key; the
        coordinator's admin key may then be None (this party opens no sessions)."""
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="fedattn-cluster-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if site is not None and (engines != 1 or coordinator is None):
            raise ValueError("site: one engine, and the coordinator (endpoint, admin key or None) it joins")
        if site is not None:
            site_keys = None if insecure else _site_keys(*site, self.log_dir / "trust")
            self._security = {"engine0": ["--insecure"] if insecure else [
                "--keypair", str(site[0]), "--trust", str(self.log_dir / "trust"), "--coordinator-key", str(site[1])]}
        else:
            trust = None if insecure else local_keys(keys_dir or self.log_dir / "keys", engines)
            self._security = {name: _security_flags(name, trust) for name in ["coordinator", *_engine_names(engines)]}
            keys = trust and OrchestratorKeys(Keypair.load(trust / "orchestrator.key_secret"),
                                              public_key(trust / "coordinator.key"),
                                              tuple(public_key(trust / f"{name}.key") for name in _engine_names(engines)))
        admin_key = coordinator[1] if coordinator else secrets.token_hex(16).encode()
        control_key = secrets.token_hex(16)
        # Engines share this machine's cores: one OpenMP team each, no oversubscription (unless told otherwise).
        threads = str(max(1, (os.cpu_count() or 1) // engines))
        self._env = {"OMP_NUM_THREADS": threads, **os.environ, **(env or {}), "FEDATTN_ENGINE_KEY": control_key}
        self._env.pop("FEDATTN_ADMIN_KEY", None)  # only a coordinator this cluster starts gets it
        if coordinator is None:
            self._env["FEDATTN_ADMIN_KEY"] = admin_key.decode()
        self.processes: list[subprocess.Popen] = []
        try:
            self.coordinator_process: subprocess.Popen | None = None  # None: a coordinator this cluster does not own
            if coordinator:
                self.coordinator_endpoint = coordinator[0]
            else:  # a fixed port, so a restarted coordinator is where every engine already connects
                self._coordinator_args = ["fedattn_vllm.federated.coordinator",
                                          "--bind", f"tcp://127.0.0.1:{free_port()}"]
                self.coordinator_process = self._launch("coordinator", self._coordinator_args)
                self.coordinator_endpoint = self._await_ready(self.coordinator_process, "coordinator", start_timeout_s)
            self._engine_args = ["fedattn_vllm.federated.engine", "--model", model, "--coordinator",
                                 self.coordinator_endpoint, "--engine-args", json.dumps(engine_args or {})]
            self.engine_processes = [self._launch(f"engine{e}", self._engine_args) for e in range(engines)]
            endpoints = [self._await_ready(p, f"engine{e}", start_timeout_s)
                         for e, p in enumerate(self.engine_processes)]
            if site is not None:
                self.cluster = PartySite(endpoints[0], self.coordinator_endpoint, control_key=control_key.encode(),
                                         keys=site_keys, admin_key=admin_key, insecure=insecure, timeout_s=timeout_s,
                                         launcher=self)
            else:
                self.cluster = FederatedCluster(endpoints, self.coordinator_endpoint, admin_key,
                                                control_key=control_key.encode(), keys=keys, insecure=insecure,
                                                seal=seal, timeout_s=timeout_s, launcher=self)
        except BaseException:
            self.close()
            raise

    # -- the cluster's EngineLauncher -----------------------------------------------------------
    def process(self, engine: int) -> subprocess.Popen:
        return self.engine_processes[engine]

    def relaunch(self, engine: int) -> None:
        self.engine_processes[engine] = self._launch(f"engine{engine}", self._engine_args)

    def relaunch_coordinator(self) -> None:
        self.coordinator_process = self._launch("coordinator", self._coordinator_args)

    def coordinator_ready(self) -> bool:
        """The (re)launched coordinator listens (its ready file is written once it has bound)."""
        return (self.log_dir / "coordinator.ready").exists()

    def ready_endpoint(self, engine: int) -> str | None:
        ready = self.log_dir / f"engine{engine}.ready"
        if ready.exists():
            return ready.read_text()
        process = self.engine_processes[engine]
        if process.poll() is not None:
            raise LaunchError(f"engine{engine} exited with code {process.returncode}; "
                              f"see {self.log_dir / f'engine{engine}.log'}")
        return None

    def _launch(self, name: str, module_args: list[str]) -> subprocess.Popen:
        ready = self.log_dir / f"{name}.ready"
        ready.unlink(missing_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log:
            process = subprocess.Popen([sys.executable, "-m", *module_args, *self._security[name],
                                        "--ready-file", str(ready), "--parent-pid", str(os.getpid())],
                                       stdout=log, stderr=subprocess.STDOUT, env=self._env, start_new_session=True)
        self.processes.append(process)
        return process

    def _await_ready(self, process: subprocess.Popen, name: str, timeout_s: float) -> str:
        ready = self.log_dir / f"{name}.ready"
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if process.poll() is not None:
                raise LaunchError(f"{name} exited with code {process.returncode}; see {self.log_dir / f'{name}.log'}")
            if time.monotonic() > deadline:
                raise LaunchError(f"{name} not ready after {timeout_s:.0f} s; see {self.log_dir / f'{name}.log'}")
            time.sleep(0.2)
        return ready.read_text()

    def close(self) -> None:
        """Stop every process (the engines free their sessions on the way out)."""
        if hasattr(self, "cluster"):
            self.cluster.close()
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
