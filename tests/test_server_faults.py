"""Killed processes behind a real federated server (`--engines 2`, tiny random Qwen2): only the session in
flight fails, /health tells the truth throughout, the process comes back, and nothing outlives the server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from conftest import HEADERS, MODEL, assert_nothing_held, server_command, start_server

from fedattn_vllm.federated.local import free_port

TIMEOUT_S = 10  # --session-timeout-s: how long a participant waits for a peer


@pytest.fixture(scope="module")
def cluster_server(tmp_path_factory):
    url, process, _ = start_server(tmp_path_factory, "--engines", "2", "--session-timeout-s", str(TIMEOUT_S))
    yield url, process
    process.terminate()
    process.wait(timeout=60)


def children(process) -> dict[str, psutil.Process]:
    """The server's coordinator and engine processes, by role ('coordinator', 'engine')."""
    found = {}
    for child in psutil.Process(process.pid).children():
        try:
            args = " ".join(child.cmdline())
        except psutil.Error:  # gone, or a zombie the server has not reaped yet
            continue
        for role in ("coordinator", "engine"):
            if f"fedattn_vllm.federated.{role}" in args:
                found.setdefault(role, []).append(child)
    return found


def long_session(url: str) -> httpx.Response:
    body = {"model": MODEL, "participants": [[5] * 20, [6] * 20], "max_tokens": 200, "ignore_eos": True,
            "fedattn": {"sync_interval": 1}}
    return httpx.post(f"{url}/v1/completions", json=body, headers=HEADERS, timeout=120)


def short_session(url: str) -> httpx.Response:
    body = {"model": MODEL, "participants": [[7] * 10, [8] * 10], "max_tokens": 3, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, headers=HEADERS, timeout=120)


def wait_healthy(url: str, deadline_s: float) -> list[int]:
    """Poll /health until 200; the statuses seen on the way."""
    seen, deadline = [], time.monotonic() + deadline_s
    while True:
        status = httpx.get(f"{url}/health", timeout=10).status_code
        seen.append(status)
        if status == 200:
            return seen
        assert time.monotonic() < deadline, f"/health still {status}"
        time.sleep(0.5)


def single_party(url: str) -> httpx.Response:
    """A one-participant session: participant 0, on engine 0 only."""
    body = {"model": MODEL, "prompt": [9] * 12, "max_tokens": 4, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, headers=HEADERS, timeout=120)


def kill_mid_session(url: str, victim: psutil.Process, hold: psutil.Process,
                     alongside=None) -> tuple[httpx.Response, httpx.Response | None]:
    """SIGKILL `victim` while a session is in flight: `hold` (an engine) is stopped first, so the session
    cannot finish before the kill, and resumed after it. `alongside(url)`: a request sent while the session
    waits on the stopped engine; its reply is the second value."""
    hold.send_signal(signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(long_session, url)
            time.sleep(1.5)  # submitted; waiting on the stopped engine
            other = alongside and pool.submit(alongside, url)
            time.sleep(0.5)
            assert not running.done()
            victim.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            if hold.pid != victim.pid:
                hold.send_signal(signal.SIGCONT)
            reply = running.result()
            assert time.monotonic() - killed < TIMEOUT_S + 10, "the session did not fail within its timeout"
            return reply, other and other.result()
    finally:
        if hold.pid != victim.pid and hold.is_running():
            hold.send_signal(signal.SIGCONT)


def test_a_killed_engine_fails_its_session_alone_frees_everything_and_comes_back(cluster_server):
    url, process = cluster_server
    assert short_session(url).status_code == 200
    expected = single_party(url).json()["choices"][0]["text"]
    engine = children(process)["engine"][1]
    reply, bystander = kill_mid_session(url, engine, hold=engine, alongside=single_party)
    assert reply.status_code == 500 and "exited" in reply.json()["error"]["message"]
    assert bystander.status_code == 200 and bystander.json()["choices"][0]["text"] == expected  # engine 0 only
    health = httpx.get(f"{url}/health", timeout=10)
    assert health.status_code == 503 and "restarting" in health.json()["error"]
    assert short_session(url).status_code == 500  # fails at once while it restarts
    assert single_party(url).status_code == 200  # sessions that do not need engine 1 run meanwhile
    assert 503 in wait_healthy(url, 240)
    assert engine.pid not in [p.pid for p in children(process)["engine"]] and not engine.is_running()
    assert short_session(url).status_code == 200
    assert_nothing_held(url)


def test_a_killed_coordinator_fails_the_session_in_flight_frees_everything_and_comes_back(cluster_server):
    url, process = cluster_server
    coordinator = children(process)["coordinator"][0]
    reply, _ = kill_mid_session(url, coordinator, hold=children(process)["engine"][0])
    assert reply.status_code == 500 and "coordinator" in reply.json()["error"]["message"]
    wait_healthy(url, 60)
    deadline = time.monotonic() + 60
    while (after := short_session(url)).status_code != 200:  # engines reconnect to the new coordinator
        assert time.monotonic() < deadline, after.text
        time.sleep(1)
    assert children(process)["coordinator"][0].pid != coordinator.pid and not coordinator.is_running()
    status = assert_nothing_held(url)
    assert status["health"] == "ok" and status["coordinator"]["sessions"] == 0


def test_nothing_outlives_a_killed_server(tmp_path_factory):
    url, process, _ = start_server(tmp_path_factory, "--engines", "2")
    spawned = [p for group in children(process).values() for p in group]
    assert len(spawned) == 3
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    gone, alive = psutil.wait_procs(spawned, timeout=15)
    assert not alive, f"left behind: {[p.pid for p in alive]}"


def test_a_server_started_with_parent_pid_ends_with_whoever_started_it(tmp_path):
    """Its launcher is SIGKILLed (no cleanup of its own): the server and its engine processes exit by themselves."""
    port, log = free_port(), tmp_path / "server.log"
    script = ("import os, subprocess, sys, time\n"
              f"with open({str(log)!r}, 'wb') as log:\n"
              f"    server = subprocess.Popen({server_command(port, '--engines', '1')!r} + "
              "['--parent-pid', str(os.getpid())], stdout=log, stderr=subprocess.STDOUT)\n"
              "print(server.pid, flush=True)\n"
              "server.wait()\n")  # the launcher reaps the server if it fails to start
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    spawned: list[psutil.Process] = []
    try:
        server = psutil.Process(int(launcher.stdout.readline()))
        deadline = time.monotonic() + 180
        while not _healthy(f"http://127.0.0.1:{port}"):
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
            time.sleep(0.5)
        spawned = [server, *server.children(recursive=True)]
        assert len(spawned) >= 3  # the server, its coordinator and its engine
        launcher.kill()
        launcher.wait(timeout=10)
        _, alive = psutil.wait_procs(spawned, timeout=60)
        assert not alive, f"left behind: {[p.pid for p in alive]}"
    finally:  # on a failure: nothing left behind by the test either
        launcher.kill()
        for process in spawned:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
