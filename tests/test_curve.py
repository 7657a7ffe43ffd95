"""CURVE on the ZeroMQ links: key files, the allow-list, pinned server keys, and what a wire tap sees."""

from __future__ import annotations

import os
import socket
import stat
import threading

import pytest
import torch

from fedattn_vllm.config import FedAttnConfig
from fedattn_vllm.exchange import PayloadKind
from fedattn_vllm.federated import coordinator as coordinator_cli
from fedattn_vllm.federated.client import CoordinatorError, NetworkKVExchange, SessionAdmin
from fedattn_vllm.federated.coordinator import Coordinator
from fedattn_vllm.federated.curve import (
    ClientCurve, Keypair, KeyFileError, ServerCurve, main as curve_main, new_keypair, public_key,
)
from fedattn_vllm.federated.local import free_port

ADMIN_KEY = b"curve-test-admin-key-0123456789"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """trusted/: the coordinator's keypair and the public keys it admits; stranger/: a key it does not know."""
    trusted, stranger = tmp_path_factory.mktemp("trusted"), tmp_path_factory.mktemp("stranger")
    for name in ("coordinator", "engine", "orchestrator"):
        new_keypair(trusted, name)
    new_keypair(stranger, "intruder")
    return trusted, stranger


def test_key_files_are_private_and_never_overwritten(tmp_path, capsys):
    curve_main(["new", "site-a", "--dir", str(tmp_path / "keys")])
    assert "site-a.key_secret" in capsys.readouterr().out
    directory = tmp_path / "keys"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "site-a.key_secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((directory / "site-a.key").stat().st_mode) == 0o644
    pair = Keypair.load(directory / "site-a.key_secret")
    assert pair.public == public_key(directory / "site-a.key") and len(pair.secret) == 40
    assert pair.secret.decode() not in repr(pair)
    with pytest.raises(KeyFileError, match="exists already"):
        new_keypair(directory, "site-a")
    with pytest.raises(KeyFileError, match="no secret key"):
        Keypair.load(directory / "site-a.key")
    os.chmod(directory / "site-a.key_secret", 0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        Keypair.load(directory / "site-a.key_secret")
    with pytest.raises(KeyFileError, match="cannot read"):
        Keypair.load(directory / "missing.key_secret")
    with pytest.raises(KeyFileError, match="holds no public key"):
        ServerCurve(pair, tmp_path / "empty")


def test_the_coordinator_refuses_to_start_in_plaintext_unless_told(monkeypatch, capsys):
    monkeypatch.setenv("FEDATTN_ADMIN_KEY", "k")
    with pytest.raises(SystemExit):
        coordinator_cli.main(["--bind", "tcp://127.0.0.1:*"])
    assert "--keypair and --trust" in capsys.readouterr().err


class WireTap:
    """A TCP relay between clients and the coordinator that keeps every byte it forwards."""

    def __init__(self, target_port: int):
        self.captured = bytearray()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self._listener.getsockname()[1]}"
        self._target = target_port
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    self.captured += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                s.close()

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def secure_coordinator(keys):
    trusted, _ = keys
    port = free_port()
    server = Coordinator(f"tcp://127.0.0.1:{port}", ADMIN_KEY,
                         curve=ServerCurve(Keypair.load(trusted / "coordinator.key_secret"), trusted))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    tap = WireTap(port)
    yield server, tap
    tap.close()
    server.stop()
    thread.join(timeout=5)


def client(keys, name: str, directory=None) -> ClientCurve:
    trusted, _ = keys
    return ClientCurve(Keypair.load((directory or trusted) / f"{name}.key_secret"),
                       public_key(trusted / "coordinator.key"))


def test_trusted_peers_exchange_k_v_and_a_wire_tap_sees_neither_k_v_nor_keys(keys, secure_coordinator):
    server, tap = secure_coordinator
    plan = FedAttnConfig(sync_interval=2).resolve(4, 2)
    admin = SessionAdmin(tap.endpoint, ADMIN_KEY, timeout_s=10, curve=client(keys, "orchestrator"))
    credentials = admin.open("s", plan)
    engines = [NetworkKVExchange(tap.endpoint, wait_s=5.0, curve=client(keys, "engine")) for _ in credentials]
    for n, (engine, credential) in enumerate(zip(engines, credentials)):
        engine.join("s", n, credential)
    sent = tuple(torch.arange(4 * 2 * 64, dtype=torch.float32).reshape(4, 2, 64) + k for k in (0.5, 0.25))
    engines[0].publish("s", 0, 0, sent)
    received = engines[1].fetch("s", 1, 0, 0)
    assert len(received) == len(sent) and all(torch.equal(a, b) for a, b in zip(sent, received))
    wire = bytes(tap.captured)
    assert len(wire) > sum(t.nbytes for t in sent)  # the K/V crossed the tap...
    for secret in [sent[0][1].numpy().tobytes(), sent[1][2].numpy().tobytes(), ADMIN_KEY, credentials[0], b"publish"]:
        assert secret not in wire  # ...but nothing readable did


@pytest.mark.parametrize("who", ["unknown key", "plaintext", "wrong server key"])
def test_a_peer_the_coordinator_does_not_trust_gets_nothing(keys, secure_coordinator, who):
    server, _ = secure_coordinator
    trusted, stranger = keys
    curve = {"unknown key": client(keys, "intruder", stranger), "plaintext": None,
             "wrong server key": ClientCurve(Keypair.load(trusted / "engine.key_secret"),
                                             public_key(stranger / "intruder.key"))}[who]
    with pytest.raises(CoordinatorError) as refused:
        SessionAdmin(server.endpoint, ADMIN_KEY, timeout_s=1.0, curve=curve).counters()
    assert refused.value.code == "unreachable" and not server.sessions
    counters = SessionAdmin(server.endpoint, ADMIN_KEY, timeout_s=10, curve=client(keys, "orchestrator")).counters()
    assert counters["sessions"] == 0  # and it serves its trusted peers as before


def test_participants_bound_to_site_keys_need_no_credential_and_nobody_else_can_act_for_them(keys, secure_coordinator):
    """The opener binds each participant to its site's public key: it holds no credential of anyone's, and a
    connection with any other key (the opener's, another site's) cannot publish or fetch for that participant."""
    server, _ = secure_coordinator
    trusted, _ = keys
    plan = FedAttnConfig(sync_interval=1).resolve(2, 2)
    site_keys = [public_key(trusted / "engine.key"), public_key(trusted / "orchestrator.key")]
    admin = SessionAdmin(server.endpoint, ADMIN_KEY, timeout_s=10, curve=client(keys, "orchestrator"))
    assert admin.open("bound", plan, participant_keys=site_keys) == []
    site = [NetworkKVExchange(server.endpoint, wait_s=5.0, curve=client(keys, name)) for name in ("engine",
                                                                                             "orchestrator")]
    for n, exchange in enumerate(site):
        exchange.join("bound", n, None)
    sent = tuple(torch.ones(3, 2, 64) * k for k in (1.0, 2.0))
    site[0].publish("bound", 0, 0, sent)
    assert torch.equal(site[1].fetch("bound", 1, 0, 0)[0], sent[0])
    impostor = NetworkKVExchange(server.endpoint, wait_s=0.5, curve=client(keys, "orchestrator"))
    impostor.join("bound", 0, None)  # participant 0 is the engine site's; this connection has another key
    with pytest.raises(CoordinatorError) as dropped:
        impostor.publish("bound", 0, 1, sent)
    assert dropped.value.code == "unreachable" and server.dropped["unauthenticated"] >= 1
    assert (0, 1, PayloadKind.KV) not in server.sessions["bound"].kv


def test_binding_participants_to_keys_needs_curve():
    plain = Coordinator("tcp://127.0.0.1:*", ADMIN_KEY)
    thread = threading.Thread(target=plain.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(CoordinatorError, match="needs CURVE"):
            SessionAdmin(plain.endpoint, ADMIN_KEY, timeout_s=10).open(
                "s", FedAttnConfig().resolve(2, 2), participant_keys=[b"x" * 40, b"y" * 40])
    finally:
        plain.stop()
        thread.join(timeout=5)
