"""The serving layer of sessions whose parts arrive one per client: private sessions and party-side sites.

A host creates a session (`create`); each participant's client joins with its own part (`join`); the
session runs once every part is in. At a party-side server (--role party) `create` opens the session at
the coordinator and answers an invitation, and `join` runs this party's part on its own engine. Errors
are returned as values, as in `server.serving`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse

from fedattn_vllm.config import FedAttnConfig, FedAttnConfigError
from fedattn_vllm.federated.client import CoordinatorError
from fedattn_vllm.federated.party import PartyTask, terms_digest
from fedattn_vllm.prompting import chat_prefix, encode_part
from fedattn_vllm.session import FedAttnSession, FedAttnSessionError
from server.errors import APIError, coordinator_error
from server.invite import created
from server.private import JoinError
from server.responses import StreamUsage
from server.sampling import failure, refusal, session_config
from server.schemas import SessionCreateRequest, SessionJoinRequest
from server.serving import Serving, errors_as_values
from server.worker import EngineDead, QueueFull, Timings


class SessionServing:
    def __init__(self, serving: Serving):
        self.serving = serving

    @property
    def _party(self) -> bool:
        return self.serving.settings.role == "party"

    @errors_as_values
    async def create(self, body: SessionCreateRequest):
        core = self.serving
        core.check_model(body.model)
        if body.participants > core.settings.max_participants:
            raise APIError(400, f"{body.participants} exceed max_participants={core.settings.max_participants}",
                           "participants")
        config = session_config(body.fedattn, single=body.participants == 1)
        plan = core.plan_of(config, body.participants)
        if (broken := body.contradiction(party=self._party)) is not None:
            raise APIError(400, broken[1], broken[0])
        prefix = await self._prefix(body)
        sampling = core.sampling_of(body, body.max_tokens)
        if self._party:
            return await self._invite(body, config, plan)
        try:
            session = core.private.create(body.participants, config, sampling, body.chat, body.join_timeout_s, prefix)
        except QueueFull as error:
            raise APIError(429, str(error), None, "rate_limit_error") from None
        return {"id": session.session_id, "object": "fedattn.session", "generators": list(plan.generators),
                "join_timeout_s": body.join_timeout_s, "host_token": session.host_token,
                "participants": [{"index": n, "token": t} for n, t in enumerate(session.tokens)]}

    async def _prefix(self, terms: SessionCreateRequest) -> list[int]:
        """The session's public prefix: the chat template's head (with the system message), or its own."""
        core = self.serving
        if terms.chat:
            core.check_chat_template()
            return await core.off_loop(chat_prefix, core.backend.tokenizer, terms.system)
        return await core.encode_prefix(terms.public_prefix)

    async def _segment(self, content, participant: int, size: int, chat: bool) -> list[int]:
        """A participant's part: text framed for its place in the session, or token ids as they are."""
        core = self.serving
        if isinstance(content, str):
            return await core.off_loop(lambda: encode_part(core.backend.tokenizer, content, participant, size,
                                                           chat=chat))
        return await core.encode(content, "content")

    async def _invite(self, body: SessionCreateRequest, config: FedAttnConfig, plan) -> dict:
        """A session across party-side servers, opened at the coordinator with each participant bound to its
        site's key: the invitation every party's client hands its own server (with a fresh seal key)."""
        core = self.serving
        site = core.backend.worker.cluster
        try:
            issued = await core.issued.open(body.participants, body.join_timeout_s, lambda: asyncio.to_thread(
                site.open_session, [key.encode() for key in body.sites], config))
        except QueueFull as error:
            raise APIError(429, str(error), None, "rate_limit_error") from None
        except FedAttnSessionError as error:
            raise APIError(403, str(error), None, "permission_error") from None
        except CoordinatorError as error:
            raise coordinator_error(error) from None
        return {**created(issued.session_id, body, plan), "host_token": issued.host_token}

    def listing(self) -> dict:
        """Open sessions waiting for parts (a party server: those it opened at the coordinator): ids, sizes,
        who joined; no tokens."""
        core = self.serving
        return {"object": "list", "data": core.issued.listing() if self._party else core.private.listing()}

    @errors_as_values
    async def delete(self, session_id: str, host_token: str):
        """The host ends an open session; whoever joined gets an error."""
        core = self.serving
        try:
            if not self._party:
                core.private.delete(session_id, host_token)
            else:
                core.issued.check(session_id, host_token)
                await asyncio.to_thread(core.backend.worker.cluster.close_session, session_id)
                core.issued.forget(session_id)
        except JoinError as error:
            raise APIError(error.status, str(error), error.param) from None
        except CoordinatorError as error:
            if error.code != "unknown_session":  # it is still open there: still listed, the host may try again
                raise coordinator_error(error) from None
            core.issued.forget(session_id)  # it ended at the coordinator already
        return {"id": session_id, "object": "fedattn.session.deleted", "deleted": True}

    @errors_as_values
    async def join(self, session_id: str, participant: int, body: SessionJoinRequest, request: Request):
        if self._party:
            return await self._join_party(session_id, participant, body, request)
        if body.token is None or body.invitation is not None:
            raise APIError(400, "token: a private session is joined with its participant's token (invitations are for "
                           "party-side servers)", "token")
        core = self.serving
        try:
            session = core.private.get(session_id)
            session.check_token(participant, body.token)
        except JoinError as error:
            raise APIError(error.status, str(error), error.param) from None
        segment = await self._segment(body.content, participant, session.size, session.chat)
        generators = session.config.resolve(core.backend.num_layers, session.size).generators
        if participant in generators and body.stream:
            session.streams[participant] = asyncio.Queue()
        session.parts[participant] = segment
        if len(session.parts) == session.size:
            self._start_private(session)
        try:
            started = await core.unless_disconnected(request, asyncio.shield(session.started))
        except JoinError as error:  # someone never joined, or left, or the host deleted the session
            raise APIError(error.status, str(error), None, error.kind) from None
        if started is None:  # this client left: the session ends for everyone
            if session.started.done() and session.started.exception() is None:
                core.backend.worker.cancel(session.worker_session)
            else:
                core.private.fail(session_id, JoinError(409, f"participant {participant} disconnected before the "
                                                        "session started", None, "cancelled_error"))
            return JSONResponse({}, status_code=499)
        future, timings = started
        return await self._participant_reply(request, body, session_id, participant, generators,
                                             session.worker_session, future, timings, session.streams.get(participant),
                                             "chat.completion" if session.chat else "text_completion",
                                             session.sampling.logprobs)

    async def _participant_reply(self, request: Request, body: SessionJoinRequest, session_id: str, participant: int,
                                 generators, worker_session: str, future, timings: Timings, pieces, kind: str,
                                 top_logprobs: int | None):
        """A joined participant's answer: a generator's own choice (streamed if it asked; with `top_logprobs`
        alternatives per token if the terms asked for logprobs), else a usage record."""
        core = self.serving
        response_id = f"fedsess-{uuid.uuid4().hex}"
        if pieces is not None:  # its own answer, as choice 0
            return core.stream(worker_session, future, pieces, response_id, kind, {participant: 0},
                               StreamUsage(body.include_usage), timings, "content", top_logprobs)
        try:
            result = await core.unless_disconnected(request, asyncio.wrap_future(future))
        except (FedAttnConfigError, FedAttnSessionError) as error:  # e.g. the parts together do not fit
            raise refusal(error, "content") from None
        if result is None:  # a participant that leaves ends the session for everyone
            core.backend.worker.cancel(worker_session)
            return JSONResponse({}, status_code=499)
        if (failed := failure(result, "content")) is not None:
            raise failed
        answer = core.reply(result, timings, response_id, kind, top_logprobs)
        if participant not in generators:  # a usage record of its own part only
            usage = answer["fedattn"]
            own = {"participants": usage["participants"], "tokens": usage["tokens"][participant],
                   "public_prefix_tokens": usage["public_prefix_tokens"], "sync_layers": usage["sync_layers"],
                   "published_bytes": usage["published_bytes"][participant],
                   "received_bytes": usage["received_bytes"][participant]}
            return {"id": response_id, "object": "fedattn.participation", "session": session_id,
                    "participant": participant, "fedattn": own}
        answer["choices"] = [c for c in answer["choices"] if c["participant"] == participant]
        return answer

    async def _join_party(self, session_id: str, participant: int, body: SessionJoinRequest, request: Request):
        """This party's part, on this party's own engine, of a session opened at the coordinator (--role party)."""
        core = self.serving
        site = core.backend.worker.cluster
        invitation = body.invitation
        if invitation is None:
            raise APIError(400, "invitation: a party-side server joins with the session's invitation (from the "
                           "server that created it)", "invitation")
        if invitation.session != session_id:
            raise APIError(400, f"invitation: made for session {invitation.session}", "invitation.session")
        terms = invitation.terms
        core.check_model(terms.model)
        if (broken := terms.contradiction(party=True)) is not None:
            raise APIError(400, f"invitation.terms.{broken[1]}", f"invitation.terms.{broken[0]}")
        if not 0 <= participant < terms.participants:
            raise APIError(400, f"participant: {participant} is not in 0..{terms.participants - 1}", "participant")
        if terms.sites[participant].encode() != site.public_key:
            raise APIError(403, f"participant {participant} is bound to site {terms.sites[participant]}; this server "
                           f"is site {site.public_key.decode()}", "participant", "permission_error")
        try:
            seal_key = base64.b64decode(invitation.seal_key, validate=True)
        except ValueError:
            seal_key = b""
        if len(seal_key) != 32:
            raise APIError(400, "invitation.seal_key: 32 bytes in base64", "invitation.seal_key")
        config = session_config(terms.fedattn, single=terms.participants == 1)
        try:
            plan = await asyncio.to_thread(site.describe, session_id, participant,
                                           sites=[key.encode() for key in terms.sites])
        except FedAttnSessionError as error:
            if error.field == "session":
                raise APIError(404, str(error), "session", "not_found_error") from None
            raise APIError(409, str(error), f"invitation.terms.{error.field}", "conflict_error") from None
        if plan.config.to_dict() != config.to_dict() or plan.num_participants != terms.participants:
            raise APIError(409, "invitation: its settings differ from the session's at the coordinator", "invitation")
        prefix = await self._prefix(terms)
        segment = await self._segment(body.content, participant, terms.participants, terms.chat)
        sampling = core.sampling_of(terms, terms.max_tokens)
        # of every term as this site reads it (defaults included: sites that would fill them differently disagree;
        # vLLM's request_id is drawn at random per parse)
        digest = terms_digest(session=session_id, terms=terms.model_dump(mode="json", exclude={"request_id"}),
                              seal_key=hashlib.sha256(seal_key).digest())
        task = PartyTask(session_id, participant, plan, segment, prefix, sampling, seal_key, digest,
                         terms.join_timeout_s)
        pieces = asyncio.Queue() if participant in plan.generators and body.stream else None
        try:
            worker_session, future, timings = core.backend.worker.submit(
                task, core.pieces_sink(lambda g: pieces) if pieces else None)
        except QueueFull as error:
            raise APIError(429, str(error), None, "rate_limit_error") from None
        except EngineDead as error:
            raise APIError(503, f"the engine is down: {error}", None, "server_error") from None
        return await self._participant_reply(request, body, session_id, participant, plan.generators, worker_session,
                                             future, timings, pieces,
                                             "chat.completion" if terms.chat else "text_completion", sampling.logprobs)

    def _start_private(self, session) -> None:
        """All parts are in: run the session; generators that stream get their pieces."""
        core = self.serving
        core.private.close_joins(session.session_id)
        segments = [session.parts[n] for n in range(session.size)]
        fedattn_session = FedAttnSession(segments, session.config, session.sampling, public_prefix=session.prefix)
        try:
            worker_session, future, timings = core.backend.worker.submit(
                fedattn_session, core.pieces_sink(session.streams.get), held=True)
        except EngineDead as error:
            session.started.set_exception(JoinError(503, f"the engine is down: {error}", None, "server_error"))
            return
        session.worker_session = worker_session
        session.started.set_result((future, timings))
