"""Party-side servers over HTTP: three `python -m server --role party` processes (tiny random Qwen2, fp32), each
with its own engine, joined through a recording CURVE coordinator in this process; each client talks only to its
own site (examples/three_sites.py's flow, whose helpers start the servers)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from conftest import MODEL, RecordingCoordinator, federated_engine, greedy

from fedattn_vllm.federated.curve import Keypair, ServerCurve, new_keypair, public_key
from fedattn_vllm.prompting import encode_segments
from fedattn_vllm.session import FedAttnSession
from server.schemas import FedAttnBlock

ADMIN_KEY = "three-sites-test-admin"
MAX_SESSIONS = 16  # per site: sessions in its engine, and sessions it opened that wait for their parties
PARTS = ["alice: the vault code is 4417. ", "bob: the vault is in the cellar. ", "carol: what is the code?"]
FEDATTN = {"sync_interval": 2}
TERMS = {"max_tokens": 6, "temperature": 0, "ignore_eos": True, "system": "You answer in one word.",
         "fedattn": FEDATTN, "join_timeout_s": 20}


def _example():
    path = Path(__file__).parents[1] / "examples" / "three_sites.py"
    spec = importlib.util.spec_from_file_location("three_sites", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


three_sites = _example()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """The sites' and the coordinator's keys (the example's), and a neutral host's the coordinator trusts too."""
    directory = tmp_path_factory.mktemp("three-sites") / "keys"
    three_sites.make_keys(directory)
    new_keypair(directory, "host")
    shutil.copyfile(directory / "host.key", directory / "trust" / "host.key")
    return directory


@pytest.fixture(scope="module")
def coordinator(keys):
    server = RecordingCoordinator("tcp://127.0.0.1:*", ADMIN_KEY.encode(), session_ttl_s=120.0,
                                  curve=ServerCurve(Keypair.load(keys / "coordinator.key_secret"), keys / "trust"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.stop()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def sites(coordinator, keys, tmp_path_factory):
    """{site: url}: three party-side servers, logs beside them."""
    logs = tmp_path_factory.mktemp("three-sites-logs")
    with ExitStack() as stack:
        urls = three_sites.start_sites(stack, MODEL, coordinator.endpoint, keys, ADMIN_KEY, logs, "--dtype", "float32",
                                       "--max-model-len", "256", "--max-num-batched-tokens", "256", "--kv-cache-gib",
                                       "0.0625", "--session-timeout-s", "20", "--max-sessions", str(MAX_SESSIONS))
        yield urls | {"logs": logs}


def urls_of(sites) -> dict[str, str]:
    return {name: sites[name] for name in three_sites.SITES}


def create(sites, keys, **terms) -> dict:
    reply = httpx.post(f"{sites['a']}/v1/fedattn/sessions", timeout=60, json={
        "model": MODEL, "participants": 3, "chat": True,
        "sites": [public_key(keys / f"{name}.key").decode() for name in three_sites.SITES], **TERMS, **terms})
    assert reply.status_code == 200, reply.text
    return reply.json()


def join(url: str, session: dict, n: int, content: str, invitation: dict | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/fedattn/sessions/{session['id']}/participants/{n}", timeout=120,
                      json={"invitation": invitation or session["invitation"], "content": content})


def one_engine():
    """The session's answer from the offline API (one engine, every part): (its result, the segments)."""
    prefix, segments = encode_segments(federated_engine(MODEL).tokenizer, PARTS, chat=True, system=TERMS["system"])
    config = FedAttnBlock(**FEDATTN).to_config()  # the server's defaults for the rest
    [expected] = federated_engine(MODEL).generate([FedAttnSession(segments, config, greedy(6), public_prefix=prefix)])
    return expected, segments


def test_three_sites_answer_like_one_engine_and_each_gets_its_own_reply(sites, keys):
    session, replies = three_sites.ask(urls_of(sites), keys, PARTS, **TERMS)
    expected, segments = one_engine()
    answer = replies[2]
    assert answer["choices"][0]["message"]["content"] == expected.outputs[2].text
    assert answer["fedattn"]["tokens"] == [len(s) for s in segments]
    assert answer["fedattn"]["published_bytes"] == expected.cost.published_bytes
    assert answer["fedattn"]["received_bytes"] == expected.cost.received_bytes
    for n, reply in enumerate(replies[:2]):  # the others: a usage record of their own part
        assert reply["object"] == "fedattn.participation" and "choices" not in reply
        assert reply["fedattn"]["tokens"] == len(segments[n])
        assert reply["fedattn"]["published_bytes"] == expected.cost.published_bytes[n]
    assert session["generators"] == [2]
    terms = session["invitation"]["terms"]  # as the creator set them: none of vLLM's other request fields
    assert set(terms) <= {"model", "participants", "sites", "chat", *TERMS} and "request_id" not in terms


def test_no_site_and_not_the_coordinator_receives_another_partys_text_or_token_ids(sites, keys, coordinator):
    coordinator.received.clear()
    coordinator.sent.clear()
    session, replies = three_sites.ask(urls_of(sites), keys, PARTS, **TERMS)
    assert "choices" in replies[2]
    # what reaches any site from outside: its own client's request, the invitation, and the coordinator's replies
    from_outside = b"".join([*coordinator.sent, *(raw for _, raw in coordinator.received),
                             json.dumps(session["invitation"]).encode()])
    tokenizer = federated_engine(MODEL).tokenizer
    for part in PARTS:
        assert part.encode() not in from_outside and part.split(": ", 1)[1].encode() not in from_outside
        ids = tokenizer(part, add_special_tokens=False)["input_ids"]
        for width in (4, 8):  # not as the bytes of any integer width a tensor or header could carry them in
            assert b"".join(t.to_bytes(width, "little") for t in ids) not in from_outside
    headers = [header for header, _ in coordinator.received if header.get("session") == session["id"]]
    assert {"open", "describe", "announce", "publish", "fetch", "leave"} <= {h["op"] for h in headers} \
        <= {"open", "describe", "announce", "publish", "fetch", "leave", "alive"}  # alive: a heartbeat, if slow
    assert all(h["sealed"] for h in headers if h["op"] == "publish")
    for log in sites["logs"].glob("site-*.log"):  # and no site logs any text, its own included
        text = log.read_text(errors="replace")
        assert not any(part.strip() in text for part in PARTS)


def test_a_party_cannot_join_for_another_site_or_with_a_bad_invitation(sites, keys):
    session = create(sites, keys, join_timeout_s=5)
    wrong_site = join(sites["b"], session, 0, "x")  # b's server is not participant 0's site
    assert wrong_site.status_code == 403 and wrong_site.json()["error"]["param"] == "participant"
    bad_key = join(sites["b"], session, 1, "x", {**session["invitation"], "seal_key": "A" * 43 + "!"})
    assert bad_key.status_code == 400 and bad_key.json()["error"]["param"] == "invitation.seal_key"
    unknown = join(sites["b"], {"id": "fedattn-nope"}, 1, "x", {**session["invitation"], "session": "fedattn-nope"})
    assert unknown.status_code == 404
    no_invitation = httpx.post(f"{sites['b']}/v1/fedattn/sessions/{session['id']}/participants/1",
                               json={"token": "t", "content": "x"}, timeout=30)
    assert no_invitation.status_code == 400 and no_invitation.json()["error"]["param"] == "invitation"
    one_call = httpx.post(f"{sites['a']}/v1/completions", json={"model": MODEL, "participants": ["x", "y"]}, timeout=30)
    assert one_call.status_code == 400 and "one party's site" in one_call.json()["error"]["message"]
    not_admin = httpx.post(f"{sites['b']}/v1/fedattn/sessions", timeout=30, json={
        "model": MODEL, "participants": 3, "sites": session["invitation"]["terms"]["sites"]})
    assert not_admin.status_code == 403


def test_sites_joining_with_different_invitations_are_refused_together(sites, keys):
    session = create(sites, keys)
    altered = {**session["invitation"], "terms": {**session["invitation"]["terms"], "max_tokens": 2}}
    invitations = [session["invitation"], session["invitation"], altered]
    with ThreadPoolExecutor(3) as clients:
        replies = list(clients.map(lambda n: join(sites[three_sites.SITES[n]], session, n, PARTS[n], invitations[n]),
                                   range(3)))
    assert [r.status_code for r in replies] == [409, 409, 409]
    assert all(r.json()["error"]["param"] == "invitation" for r in replies)
    # the sites serve the next session as usual
    _, ok = three_sites.ask(urls_of(sites), keys, PARTS, **TERMS)
    assert "choices" in ok[2]



def test_a_neutral_host_opens_a_session_without_an_engine_and_the_sites_join_it(sites, keys, coordinator):
    opened = subprocess.run(
        [sys.executable, "-m", "server.invite", "--coordinator", coordinator.endpoint,
         "--keypair", str(keys / "host.key_secret"), "--coordinator-key", str(keys / "coordinator.key"),
         *(arg for name in three_sites.SITES for arg in ("--site", str(keys / f"{name}.key"))),
         "--model", MODEL, "--terms", json.dumps({"chat": True, **TERMS})],
        env={**os.environ, "FEDATTN_ADMIN_KEY": ADMIN_KEY}, capture_output=True, text=True, timeout=120)
    assert opened.returncode == 0, opened.stderr
    session = json.loads(opened.stdout)
    with ThreadPoolExecutor(3) as clients:
        replies = list(clients.map(lambda n: join(sites[three_sites.SITES[n]], session, n, PARTS[n]), range(3)))
    assert [r.status_code for r in replies] == [200, 200, 200]
    expected, _ = one_engine()
    assert replies[2].json()["choices"][0]["message"]["content"] == expected.outputs[2].text


def test_the_generators_site_streams_the_answer_to_its_own_client(sites, keys):
    session = create(sites, keys)
    pieces = []

    def stream_at_c() -> None:
        body = {"invitation": session["invitation"], "content": PARTS[2], "stream": True}
        url = f"{sites['c']}/v1/fedattn/sessions/{session['id']}/participants/2"
        with httpx.stream("POST", url, json=body, timeout=120) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {") and (choices := json.loads(line[6:])["choices"]):
                    pieces.append(choices[0]["delta"].get("content") or "")

    with ThreadPoolExecutor(3) as clients:
        others = [clients.submit(join, sites[name], session, n, PARTS[n]) for n, name in enumerate("ab")]
        clients.submit(stream_at_c).result()
        assert [o.result().status_code for o in others] == [200, 200]
    expected, _ = one_engine()
    assert "".join(pieces) == expected.outputs[2].text and len([p for p in pieces if p]) > 1


def _hostile_invitations():
    """(case, participant, invitation change, content): each must get a 4xx in the OpenAI shape."""
    def terms(**change):
        return lambda inv: {**inv, "terms": {**inv["terms"], **change}}

    def field(**change):
        return lambda inv: {**inv, **change}

    other_site = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yO"  # a well-formed key of a site that is not this one
    return [
        ("session type", 1, field(session=7), "x"), ("session long", 1, field(session="s" * 200), "x"),
        ("seal key short", 1, field(seal_key="AAAA"), "x"), ("seal key not base64", 1, field(seal_key="*" * 44), "x"),
        ("no terms", 1, lambda inv: {k: v for k, v in inv.items() if k != "terms"}, "x"),
        ("extra field", 1, field(admin="x"), "x"),
        ("participants 0", 1, terms(participants=0), "x"), ("participants huge", 1, terms(participants=2**64), "x"),
        ("max_tokens huge", 1, terms(max_tokens=2**64), "x"), ("top_k huge", 1, terms(top_k=2**64), "x"),
        ("seed huge", 1, terms(seed=2**64), "x"), ("empty stop", 1, terms(stop=[""]), "x"),
        ("temperature out of range", 1, terms(temperature=3.0), "x"),
        ("join timeout past the coordinator's bound", 1, terms(join_timeout_s=1200), "x"),
        ("sites short", 1, terms(sites=["a" * 40]), "x"), ("site key not Z85", 1, terms(sites=[" " * 40] * 3), "x"),
        ("another site's participant", 0, None, "x"),
        ("bound to another site", 1, lambda inv: {**inv, "terms": {**inv["terms"], "sites": [
            inv["terms"]["sites"][0], other_site, inv["terms"]["sites"][2]]}}, "x"),
        ("fedattn unknown field", 1, terms(fedattn={"nope": 1}), "x"),
        ("fedattn bad interval", 1, terms(fedattn={"sync_interval": 0}), "x"),
        ("settings differ", 1, terms(fedattn={"sync_interval": 3}), "x"),
        ("another model", 1, terms(model="gpt-4"), "x"),
        ("public prefix in chat", 1, terms(public_prefix="p"), "x"),
        ("deep terms", 1, terms(system=json.loads("[" * 64 + "]" * 64)), "x"),
        ("participant past the end", 5, None, "x"), ("participant negative", -1, None, "x"),
        ("empty content", 1, None, ""), ("token id out of vocabulary", 1, None, [10**6]),
        ("token id huge", 1, None, [2**70]),
    ]


@pytest.mark.parametrize("case, participant, change, content", _hostile_invitations(),
                         ids=[case[0] for case in _hostile_invitations()])
def test_a_hostile_invitation_gets_a_4xx_in_the_openai_shape(sites, keys, case, participant, change, content):
    session = hostile_session(sites, keys)
    invitation = change(session["invitation"]) if change else session["invitation"]
    reply = httpx.post(f"{sites['b']}/v1/fedattn/sessions/{session['id']}/participants/{participant}", timeout=30,
                       json={"invitation": invitation, "content": content})
    assert 400 <= reply.status_code < 500, (reply.status_code, reply.text)
    assert set(reply.json()["error"]) >= {"message", "type", "param"}


_hostile: dict = {}


def hostile_session(sites, keys) -> dict:
    """One session the hostile invitations are forged from (created once; nobody joins it rightly)."""
    if not _hostile:
        _hostile.update(create(sites, keys))
    return _hostile


def test_the_sites_serve_after_the_hostile_invitations(sites, keys):
    _, replies = three_sites.ask(urls_of(sites), keys, PARTS, **TERMS)
    expected, _ = one_engine()
    assert replies[2]["choices"][0]["message"]["content"] == expected.outputs[2].text


def test_the_host_lists_its_open_sessions_and_deletes_one_and_cannot_open_more_than_max_sessions(sites, keys,
                                                                                                 coordinator):
    """Deleting closes the session at the coordinator: a site that joined it gets an error, and its place is free
    again. (Sessions earlier tests opened at site a count until their join deadline: waited out first.)"""
    url = sites["a"]

    def listed() -> dict[str, dict]:
        return {s["id"]: s for s in httpx.get(f"{url}/v1/fedattn/sessions", timeout=10).json()["data"]}

    def post() -> httpx.Response:
        return httpx.post(f"{url}/v1/fedattn/sessions", timeout=60, json={
            "model": MODEL, "participants": 3, "chat": True, **TERMS, "join_timeout_s": 120,
            "sites": [public_key(keys / f"{name}.key").decode() for name in three_sites.SITES]})

    def delete(session: dict, token: str) -> httpx.Response:
        return httpx.delete(f"{url}/v1/fedattn/sessions/{session['id']}", headers={"X-FedAttn-Host-Token": token},
                            timeout=30)

    deadline = time.monotonic() + 60
    while listed():  # earlier tests' sessions reach their join deadline (20 s)
        assert time.monotonic() < deadline, listed()
        time.sleep(1)
    mine = []
    try:
        while (reply := post()).status_code == 200:
            mine.append(reply.json())
            assert len(mine) <= MAX_SESSIONS
        assert reply.status_code == 429 and reply.json()["error"]["type"] == "rate_limit_error"
        assert len(mine) == MAX_SESSIONS and set(listed()) == {s["id"] for s in mine}
        assert all(set(entry) == {"id", "object", "participants", "expires_in_s"} for entry in listed().values())
        victim = mine[0]
        with ThreadPoolExecutor(1) as pool:
            joined = pool.submit(join, sites["b"], victim, 1, PARTS[1])
            deadline = time.monotonic() + 60
            while 1 not in coordinator.sessions[victim["id"]].announced:  # b joined and waits for the others
                assert time.monotonic() < deadline and not joined.done()
                time.sleep(0.1)
            wrong = delete(victim, mine[1]["host_token"])
            assert wrong.status_code == 403 and wrong.json()["error"]["param"] == "host_token"
            deleted = delete(victim, victim["host_token"])
            assert deleted.status_code == 200 and deleted.json()["deleted"] is True
            reply = joined.result(timeout=60)
        assert reply.status_code >= 400 and "closed" in reply.json()["error"]["message"], reply.text
        assert victim["id"] not in listed() and victim["id"] not in coordinator.sessions
        assert delete(victim, victim["host_token"]).status_code == 404
        mine = mine[1:]
        again = post()  # its place is free again
        assert again.status_code == 200, again.text
        mine.append(again.json())
        assert post().status_code == 429
    finally:
        for session in mine:
            delete(session, session["host_token"])
