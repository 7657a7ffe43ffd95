"""Private multi-client sessions: each participant's client sends only its own part.

A host creates a session (size, FedAttn settings, sampling) and gets one join token per
participant, which it hands out. Each participant posts its part with its token; the
session runs once all parts are in. Generators receive the answer (streamed if asked),
the others a usage record of their own part. If a participant does not join in time, or
one disconnects, everyone in the session gets an error and nothing of it is kept. An open
session holds one of the server's session slots from its creation (`acquire`/`release`,
the engine worker's), so abandoned sessions cannot pile up; the host lists its open
sessions and deletes one with the host token it got at creation.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
import uuid
from dataclasses import dataclass, field


class JoinError(Exception):
    """A join the session refuses, or the end of a session: `status`, `param` and `kind` for the OpenAI error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind


@dataclass
class PrivateSession:
    session_id: str
    size: int
    config: object  # FedAttnConfig
    sampling: object  # vllm.SamplingParams
    chat: bool
    tokens: list[str]
    host_token: str  # lets the host delete the session before it starts
    deadline: float
    prefix: list[int]  # the public prefix's token ids (the chat template head in chat)
    parts: dict[int, list[int]] = field(default_factory=dict)  # participant -> its token ids
    started: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    streams: dict[int, asyncio.Queue] = field(default_factory=dict)  # generator -> its text pieces
    worker_session: str | None = None  # the engine worker's id once submitted

    def check_token(self, participant: int, token: str) -> None:
        if not 0 <= participant < self.size:
            raise JoinError(404, f"participant {participant} not in a session of {self.size}", "participant")
        if not hmac.compare_digest(token.encode(), self.tokens[participant].encode()):
            raise JoinError(403, f"bad join token for participant {participant}", "token")
        if participant in self.parts:
            raise JoinError(409, f"participant {participant} already joined", "participant")


class PrivateSessions:
    """Open sessions by id, each failed as a whole when its join deadline passes.

    `acquire()` takes a server session slot (raising when none is free) and `release()`
    gives it back; an open session holds one until it starts (the engine then owns it) or ends.
    """

    def __init__(self, acquire, release) -> None:
        self.sessions: dict[str, PrivateSession] = {}
        self._acquire, self._release = acquire, release

    def create(self, size: int, config, sampling, chat: bool, join_timeout_s: float,
               prefix: list[int]) -> PrivateSession:
        self._acquire()
        session = PrivateSession(f"fedsess-{uuid.uuid4().hex}", size, config, sampling, chat,
                                 [secrets.token_urlsafe(24) for _ in range(size)], secrets.token_urlsafe(24),
                                 time.monotonic() + join_timeout_s, prefix)
        self.sessions[session.session_id] = session
        asyncio.get_running_loop().call_later(join_timeout_s, self._expire, session.session_id)
        return session

    def listing(self) -> list[dict]:
        """Open sessions: id, size, who joined, seconds left to join (no tokens, no content)."""
        now = time.monotonic()
        return [{"id": s.session_id, "object": "fedattn.session", "participants": s.size, "joined": sorted(s.parts),
                 "expires_in_s": round(max(0.0, s.deadline - now), 3)} for s in self.sessions.values()]

    def delete(self, session_id: str, host_token: str) -> None:
        session = self.get(session_id)
        if not hmac.compare_digest(host_token.encode(), session.host_token.encode()):
            raise JoinError(403, f"bad host token for session {session_id}", "host_token")
        self.fail(session_id, JoinError(409, "the host deleted the session", None, "cancelled_error"))

    def get(self, session_id: str) -> PrivateSession:
        session = self.sessions.get(session_id)
        if session is None:
            raise JoinError(404, f"no open session {session_id} (never created, finished or expired)", "session")
        return session

    def close_joins(self, session_id: str) -> None:
        """Every part is in: the session leaves the registry (later joins get 404); its slot goes to the engine."""
        self.sessions.pop(session_id, None)

    def fail(self, session_id: str, error: JoinError) -> None:
        """End the session for everyone before it starts: waiters get `error`; its parts and its slot are freed."""
        session = self.sessions.pop(session_id, None)
        if session is not None:
            session.parts.clear()
            self._release()
            if not session.started.done():
                session.started.set_exception(error)

    def _expire(self, session_id: str) -> None:
        session = self.sessions.get(session_id)
        if session is not None and len(session.parts) < session.size:
            missing = sorted(set(range(session.size)) - set(session.parts))
            self.fail(session_id, JoinError(408, f"participants {missing} did not join in time", None, "timeout_error"))
