"""Party-side sites: each party's own engine and orchestrator, joined through a coordinator that holds no
credential of anyone's (each participant bound to its site's CURVE key).

Three sites (tiny random Qwen2, fp32), one engine process each, and a recording coordinator in this
process that trusts only the sites' public keys. The fault test comes last: it kills a site's engine.
"""

from __future__ import annotations

import shutil
import threading
import time

import pytest
from conftest import TINY_ENGINE_ARGS, RecordingCoordinator, federated_engine, greedy

from fedattn_vllm.config import FedAttnConfig, KVWire
from fedattn_vllm.federated.curve import Keypair, ServerCurve, new_keypair, public_key
from fedattn_vllm.federated.local import LocalCluster
from fedattn_vllm.federated.party import PartySite, PartyTask
from fedattn_vllm.federated.sealing import new_seal_key
from fedattn_vllm.session import FedAttnSession, FedAttnSessionError

MODEL = "tiny-qwen2"
TIMEOUT_S = 6.0
ADMIN_KEY = b"party-test-admin"
SITES = ("a", "b", "c")
SEGMENTS = [[11, 12, 13, 14, 15, 16, 17], [21, 22, 23, 24, 25], [31, 32, 33, 34, 35, 36]]
PREFIX = [1, 2, 3]
CONFIG = FedAttnConfig(sync_interval=2, generator_sync_interval=1, kv_wire=KVWire.K4V2)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """The coordinator's and each site's keypair; the coordinator trusts the sites' public keys only."""
    directory = tmp_path_factory.mktemp("keys")
    for name in ("coordinator", *SITES):
        new_keypair(directory, name)
    trust = directory / "trust"
    trust.mkdir()
    for name in SITES:
        shutil.copyfile(directory / f"{name}.key", trust / f"{name}.key")
    return directory


@pytest.fixture(scope="module")
def coordinator(keys):
    server = RecordingCoordinator("tcp://127.0.0.1:*", ADMIN_KEY, session_ttl_s=60.0,
                                  curve=ServerCurve(Keypair.load(keys / "coordinator.key_secret"), keys / "trust"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.stop()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def sites(coordinator, keys, tmp_path_factory):
    """Site a may open sessions (it holds the admin key); b and c only join."""
    launched = {}
    try:
        for name in SITES:
            launched[name] = LocalCluster(
                MODEL, engines=1, engine_args=TINY_ENGINE_ARGS, timeout_s=TIMEOUT_S,
                log_dir=tmp_path_factory.mktemp(f"site-{name}"),
                coordinator=(coordinator.endpoint, ADMIN_KEY if name == "a" else None),
                site=(keys / f"{name}.key_secret", keys / "coordinator.key"))
        yield launched
    finally:
        for local in launched.values():
            local.close()


def site_key(keys, name: str) -> bytes:
    return public_key(keys / f"{name}.key")


def open_session(opener: PartySite, keys, names=SITES) -> tuple[str, list[bytes]]:
    """A session whose participant n is bound to site names[n]: (its id, the site keys every party is told)."""
    site_keys = [site_key(keys, name) for name in names]
    return opener.open_session(site_keys, CONFIG), site_keys


def task(site: PartySite, session: tuple[str, list[bytes]], n: int, segment: list[int], *, seal_key: bytes,
         terms: bytes = b"terms", prefix=PREFIX, max_tokens: int = 6) -> PartyTask:
    session_id, site_keys = session
    return PartyTask(session_id, n, site.describe(session_id, n, sites=site_keys), segment, prefix, greedy(max_tokens),
                     seal_key, terms, join_timeout_s=TIMEOUT_S)


def run(pairs: list[tuple[PartySite, PartyTask]], deadline_s: float = 120.0) -> list:
    """Submit each site's task, then drive every site until each has its result (results in the same order)."""
    for site, t in pairs:
        site.submit(t)
    ended: dict[tuple[int, str], object] = {}
    deadline = time.monotonic() + deadline_s
    while not all((id(site), t.session_id) in ended for site, t in pairs):
        assert time.monotonic() < deadline, "the sessions did not end in time"
        for site in {id(site): site for site, _ in pairs}.values():
            ended.update({(id(site), i): r for i, r in site.poll(10).items()})
    return [ended[id(site), t.session_id] for site, t in pairs]


def three_party(sites, keys, segments=SEGMENTS, **kwargs):
    a, b, c = (sites[name].cluster for name in SITES)
    session = open_session(a, keys)
    seal_key = new_seal_key()
    pairs = [(site, task(site, session, n, segments[n], seal_key=seal_key, **kwargs))
             for n, site in enumerate((a, b, c))]
    return session[0], run(pairs)


def test_three_sites_answer_like_one_engine_and_count_its_bytes(sites, keys, coordinator):
    session_id, results = three_party(sites, keys)
    [expected] = federated_engine(MODEL).generate([FedAttnSession(SEGMENTS, CONFIG, greedy(6), public_prefix=PREFIX)])
    for result in results:
        assert result.error is None, result.error
        assert result.cost.tokens == [len(s) for s in SEGMENTS]
        assert result.cost.published_bytes == expected.cost.published_bytes  # sizes: every site may know them
        assert result.cost.received_bytes == expected.cost.received_bytes
    assert results[0].outputs == results[1].outputs == {}  # the generator's answer stays at its own site
    assert results[2].outputs[2].token_ids == expected.outputs[2].token_ids
    assert session_id not in coordinator.sessions  # freed once every participant was done


def test_the_coordinator_holds_no_credential_and_sees_no_token_ids(sites, keys, coordinator):
    coordinator.received.clear()
    session_id, results = three_party(sites, keys)
    assert all(r.error is None for r in results)
    headers = [header for header, _ in coordinator.received if header.get("session") == session_id]
    assert {"open", "describe", "announce", "publish", "fetch", "leave"} <= {h["op"] for h in headers} \
        <= {"open", "describe", "announce", "publish", "fetch", "leave", "alive"}  # alive: a heartbeat, if slow
    assert not any("credential" in h or "credentials" in h or "segments" in h for h in headers)
    assert all(h["sealed"] for h in headers if h["op"] == "publish")
    raw = b"".join(frames for header, frames in coordinator.received if header.get("session") == session_id)
    for segment in SEGMENTS:  # not as the bytes of any integer width a tensor or header could carry them in
        for width in (4, 8):
            assert b"".join(t.to_bytes(width, "little") for t in segment) not in raw


def test_a_site_can_act_only_for_its_own_participant(sites, keys):
    a, b = sites["a"].cluster, sites["b"].cluster
    session_id, site_keys = open_session(a, keys)
    b.describe(session_id, 1, sites=site_keys)
    with pytest.raises(FedAttnSessionError, match="no such session for this site's key"):
        b.describe(session_id, 0, sites=site_keys, timeout_s=1.0)  # dropped unanswered: b's key is not 0's
    with pytest.raises(FedAttnSessionError) as misled:  # told that c computes with it, where the opener bound b
        b.describe(session_id, 1, sites=[site_keys[0], site_keys[2], site_keys[2]])
    assert misled.value.field == "sites"
    with pytest.raises(FedAttnSessionError) as refused:
        b.open_session([site_key(keys, name) for name in SITES], CONFIG)
    assert refused.value.field == "admin_key"


def test_sites_that_joined_with_different_terms_are_refused_together(sites, keys):
    a, b = sites["a"].cluster, sites["b"].cluster
    session = open_session(a, keys, ("a", "b"))
    seal_key = new_seal_key()
    results = run([(a, task(a, session, 0, SEGMENTS[0], seal_key=seal_key, terms=b"one prefix")),
                   (b, task(b, session, 1, SEGMENTS[1], seal_key=seal_key, terms=b"another prefix"))])
    assert all("different session terms" in r.error for r in results)


def test_a_killed_site_fails_its_session_everywhere_and_the_others_keep_serving(sites, keys, coordinator):
    a, b, c = (sites[name].cluster for name in SITES)
    session = open_session(a, keys)
    session_id = session[0]
    seal_key = new_seal_key()
    pairs = [(site, task(site, session, n, SEGMENTS[n], seal_key=seal_key, max_tokens=32))
             for n, site in enumerate((a, b, c))]
    b.submit(pairs[1][1])
    deadline = time.monotonic() + 60
    while 1 not in coordinator.sessions[session_id].announced:  # b's engine has its part: now the site dies
        assert time.monotonic() < deadline
        b.poll(10)
    sites["b"].engine_processes[0].kill()
    started = time.monotonic()
    results = run([pairs[0], pairs[2]])  # b's site is gone: nobody drives it any more
    assert all(r.error for r in results)
    assert time.monotonic() - started < 3 * TIMEOUT_S + 10
    assert session_id not in coordinator.sessions
    # a and c still serve each other
    pair = open_session(a, keys, ("a", "c"))
    seal_key = new_seal_key()
    ok = run([(a, task(a, pair, 0, SEGMENTS[0], seal_key=seal_key)),
              (c, task(c, pair, 1, SEGMENTS[2], seal_key=seal_key))])
    [expected] = federated_engine(MODEL).generate([FedAttnSession([SEGMENTS[0], SEGMENTS[2]], CONFIG, greedy(6),
                                                                  public_prefix=PREFIX)])
    assert ok[0].error is None and ok[1].outputs[1].token_ids == expected.outputs[1].token_ids
