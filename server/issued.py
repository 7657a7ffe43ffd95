"""Sessions a party server opened at the coordinator (`POST /v1/fedattn/sessions` with `--role party`).

Each stays on the list until its join deadline: the host sees them (`GET /v1/fedattn/sessions`),
ends one with the host token it got at creation (`DELETE`: closed at the coordinator, so every
site that joined gets an error), and cannot hold more than `max_sessions` at once (then 429),
so one API key cannot fill the coordinator with sessions nobody joins.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from server.private import JoinError
from server.worker import QueueFull


@dataclass(frozen=True)
class Issued:
    session_id: str
    participants: int
    host_token: str
    deadline: float  # time.monotonic() when joining ends


class IssuedSessions:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._issued: dict[str, Issued] = {}
        self._opening = 0  # opens in flight at the coordinator (they count against the limit too)

    async def open(self, participants: int, join_timeout_s: float, open_at_coordinator: Callable[[], Awaitable[str]]
                   ) -> Issued:
        """Open one (QueueFull at the limit); `open_at_coordinator()` opens it there and gives its id."""
        self._prune()
        if len(self._issued) + self._opening >= self.limit:
            raise QueueFull(f"{len(self._issued) + self._opening} sessions opened by this server are waiting for "
                            f"their parties (max_sessions={self.limit}); delete one or wait for its join deadline")
        self._opening += 1
        try:
            session_id = await open_at_coordinator()
        finally:
            self._opening -= 1
        issued = Issued(session_id, participants, secrets.token_urlsafe(24), time.monotonic() + join_timeout_s)
        self._issued[session_id] = issued
        return issued

    def listing(self) -> list[dict]:
        """Sessions still open for joining: id, size, seconds left (no tokens, nothing any party posted)."""
        self._prune()
        now = time.monotonic()
        return [{"id": s.session_id, "object": "fedattn.session", "participants": s.participants,
                 "expires_in_s": round(s.deadline - now, 3)} for s in self._issued.values()]

    def check(self, session_id: str, host_token: str) -> None:
        """JoinError unless `session_id` is listed and `host_token` is its host's."""
        self._prune()
        issued = self._issued.get(session_id)
        if issued is None:
            raise JoinError(404, f"no open session {session_id} opened by this server (never, or its join deadline "
                            "passed)", "session")
        if not hmac.compare_digest(host_token.encode(), issued.host_token.encode()):
            raise JoinError(403, f"bad host token for session {session_id}", "host_token")

    def forget(self, session_id: str) -> None:
        """Off the list (closed at the coordinator)."""
        self._issued.pop(session_id, None)

    def __len__(self) -> int:
        self._prune()
        return len(self._issued)

    def _prune(self) -> None:
        now = time.monotonic()
        for session_id in [i for i, s in self._issued.items() if s.deadline <= now]:
            del self._issued[session_id]
