"""Private multi-client sessions: each participant's client sends only its own part.

A host creates a session (size, FedAttn settings, sampling) and gets one join token per
participant, which it hands out. Each participant posts its part with its token; the
session runs once all parts are in. Generators receive the answer (streamed if asked),
the others a usage record. If a participant does not join in time, or one disconnects,
everyone in the session gets an error and nothing of it is kept.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
import uuid
from dataclasses import dataclass, field


class JoinError(Exception):
    """A join the session refuses: `status` and `param` for the OpenAI error shape."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
class PrivateSession:
    session_id: str
    size: int
    config: object  # FedAttnConfig
    sampling: object  # vllm.SamplingParams
    chat: bool
    tokens: list[str]
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
    """Open sessions by id, each failed as a whole when its join deadline passes."""

    def __init__(self) -> None:
        self.sessions: dict[str, PrivateSession] = {}

    def create(self, size: int, config, sampling, chat: bool, join_timeout_s: float,
               prefix: list[int]) -> PrivateSession:
        session = PrivateSession(f"fedsess-{uuid.uuid4().hex}", size, config, sampling, chat,
                                 [secrets.token_urlsafe(24) for _ in range(size)], time.monotonic() + join_timeout_s,
                                 prefix)
        self.sessions[session.session_id] = session
        asyncio.get_running_loop().call_later(join_timeout_s, self._expire, session.session_id)
        return session

    def get(self, session_id: str) -> PrivateSession:
        session = self.sessions.get(session_id)
        if session is None:
            raise JoinError(404, f"no open session {session_id} (never created, finished or expired)", "session")
        return session

    def close_joins(self, session_id: str) -> None:
        """Every part is in: the session leaves the registry (later joins get 404)."""
        self.sessions.pop(session_id, None)

    def fail(self, session_id: str, message: str) -> None:
        """End the session for everyone: waiters get `message`; its parts are dropped."""
        session = self.sessions.pop(session_id, None)
        if session is not None:
            session.parts.clear()
            if not session.started.done():
                session.started.set_exception(JoinError(408, message))

    def _expire(self, session_id: str) -> None:
        session = self.sessions.get(session_id)
        if session is not None and len(session.parts) < session.size:
            missing = sorted(set(range(session.size)) - set(session.parts))
            self.fail(session_id, f"participants {missing} did not join in time")
